//! Checks at a realistic scale: many members, many topics, the prefetch bound.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::*;

/// 50 members of one group share 5,000 messages: every message is handled,
/// none by two members, and more than one member gets work.
pub async fn fifty_members_share_five_thousand(b: &dyn TestBackend) {
    const MEMBERS: usize = 50;
    const MESSAGES: usize = 5_000;
    let caps = b.capabilities();
    if !caps.competing_consumers {
        eprintln!("skipped: {} has no competing consumers", caps.name);
        return;
    }
    let topic = b.topic("fifty").await;
    let group = unique("g");
    let subscriber = b.subscriber().await;
    // Joined together, as a deployment scaling out would (Kafka rebalances once).
    let members = futures::future::join_all((0..MEMBERS).map(|_| {
        subscriber.subscribe(Subscription::new(topic.clone(), group.clone()).with_prefetch(50))
    }))
    .await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (stop, _) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for (member, stream) in members.into_iter().enumerate() {
        let mut stream = stream.unwrap_or_else(|e| panic!("member {member} subscribe: {e}"));
        let tx = tx.clone();
        let mut stop = stop.subscribe();
        tasks.push(tokio::spawn(async move {
            loop {
                let d = tokio::select! {
                    _ = stop.changed() => break,
                    d = stream.next() => d,
                };
                match d {
                    Some(Ok(d)) => {
                        let _ =
                            tx.send((member, d.message().id().to_owned(), d.received.redelivered));
                        d.ack().await.expect("ack");
                    }
                    Some(Err(e)) => panic!("member {member}: {e}"),
                    None => break,
                }
            }
            stream.close().await.expect("close member");
        }));
    }
    drop(tx);
    let sent = numbered(MESSAGES, "fifty");
    publish_all(&*b.publisher().await, &topic, &sent).await;

    let mut seen: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + caps.receive_timeout * 6;
    while seen.len() < MESSAGES {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((member, id, _))) => seen.entry(id).or_default().push(member),
            Ok(None) => break,
            Err(_) => break,
        }
    }
    // Anything delivered twice shows up within the quiet period.
    while let Ok(Some((member, id, _))) = tokio::time::timeout(caps.quiet_period, rx.recv()).await {
        seen.entry(id).or_default().push(member);
    }
    let _ = stop.send(true);
    for t in tasks {
        t.await.expect("member task");
    }
    let missing = sent.iter().filter(|m| !seen.contains_key(m.id())).count();
    assert_eq!(missing, 0, "{missing} of {MESSAGES} messages never handled");
    let twice: Vec<_> = seen.iter().filter(|(_, by)| by.len() > 1).collect();
    assert!(
        twice.is_empty(),
        "{} messages handled more than once, e.g. {:?}",
        twice.len(),
        twice.first()
    );
    let busy: BTreeSet<usize> = seen.values().flatten().copied().collect();
    assert!(busy.len() > 1, "only members {busy:?} got work");
}

/// 20 topics published in parallel with the same message ids: each topic's
/// group gets exactly its own messages (ids are unique per topic, not
/// across topics).
pub async fn twenty_topics_with_the_same_ids(b: &dyn TestBackend) {
    const TOPICS: usize = 20;
    const PER_TOPIC: usize = 25;
    let mut topics = Vec::new();
    for i in 0..TOPICS {
        topics.push(b.topic(&format!("par{i}")).await);
    }
    let group = unique("g");
    let mut streams =
        futures::future::join_all(topics.iter().map(|t| subscribe(b, t, &group))).await;
    let template = numbered(PER_TOPIC, "same");
    let publisher = b.publisher().await;
    futures::future::join_all(topics.iter().map(|t| {
        // Same ids, payload naming the topic, so a mix-up shows.
        let batch: Vec<Message> = template
            .iter()
            .map(|m| {
                Message::restore(m.id(), t.clone(), m.timestamp()).with_key(m.key().expect("keyed"))
            })
            .collect();
        let publisher = publisher.clone();
        async move { publish_all(&*publisher, t, &batch).await }
    }))
    .await;
    let reads =
        futures::future::join_all(streams.iter_mut().zip(&topics).map(|(s, t)| async move {
            (t, take_acked(b, s, PER_TOPIC, &format!("topic {t}")).await)
        }))
        .await;
    for (t, got) in reads {
        assert_eq!(received_ids(&got), ids(&template), "ids on {t}");
        assert!(
            got.iter()
                .all(|r| r.message.payload() == t.as_bytes() && &*r.topic == t),
            "a message of another topic arrived on {t}"
        );
    }
    for (s, t) in streams.iter_mut().zip(&topics).take(3) {
        assert_quiet(b, s, &format!("{t} after its messages")).await;
    }
}

/// A stream holds at most `prefetch` unacknowledged deliveries, and acking
/// them lets the rest in (backends may refill in runs, not one per ack).
pub async fn prefetch_bounds_unacked_deliveries(b: &dyn TestBackend) {
    const PREFETCH: usize = 5;
    const TOTAL: usize = 4 * PREFETCH;
    let topic = b.topic("prefetch").await;
    let mut stream = b
        .subscriber()
        .await
        .subscribe(Subscription::new(&topic, unique("g")).with_prefetch(PREFETCH))
        .await
        .expect("subscribe");
    publish_all(&*b.publisher().await, &topic, &numbered(TOTAL, "pf")).await;
    let mut held = Vec::new();
    for i in 0..PREFETCH {
        held.push(next(b, &mut stream, &format!("delivery {i} within the prefetch")).await);
    }
    assert_quiet(
        b,
        &mut stream,
        "a delivery past the prefetch bound while none is acked",
    )
    .await;
    // The rest: hold what comes, ack everything held whenever nothing more does.
    let mut received = PREFETCH;
    let deadline = tokio::time::Instant::now() + b.capabilities().receive_timeout * 3;
    while received < TOTAL {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {received} of {TOTAL} delivered"
        );
        match tokio::time::timeout(Duration::from_millis(200), stream.next()).await {
            Ok(Some(Ok(d))) => {
                held.push(d);
                received += 1;
                assert!(
                    held.len() <= PREFETCH,
                    "{} unacked deliveries held with a prefetch of {PREFETCH}",
                    held.len()
                );
            }
            Ok(other) => panic!(
                "stream ended or failed: {:?}",
                other.map(|r| r.map(|d| d.received))
            ),
            Err(_) => {
                for d in held.drain(..) {
                    d.ack().await.expect("ack");
                }
            }
        }
    }
    for d in held {
        d.ack().await.expect("ack");
    }
}
