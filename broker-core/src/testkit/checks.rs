//! The checks every backend passes since the first round: delivery, groups,
//! order, retries, dead letters, shutdown, limits.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use validator::Validate;

use super::*;
use crate::handler::{typed, HandlerError};
use crate::message::{from_millis_since_epoch, header};
use crate::topic::dead_letter_topic;
use crate::{BrokerError, Event, Message, Publisher, Received, Subscription};

/// Payload, key, headers, id, timestamp, correlation id and traceparent
/// arrive exactly as sent; so does a message with an empty payload and no key.
pub async fn roundtrip_keeps_payload_key_and_headers(b: &dyn TestBackend) {
    let topic = b.topic("roundtrip").await;
    let mut stream = subscribe(b, &topic, &unique("g")).await;
    let full = Message::new(&b"{\"amount\":42}"[..])
        .with_key("customer-7")
        .with_content_type("application/json")
        .with_header("x-unicode", "caf\u{e9} \u{2713}")
        .with_header("x-empty", "")
        .with_correlation_id("req-123")
        .with_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        .with_timestamp(SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123));
    let bare = Message::new(bytes::Bytes::new());
    let p = b.publisher().await;
    p.publish(&topic, full.clone()).await.expect("publish full");
    p.publish(&topic, bare.clone()).await.expect("publish bare");

    let mut got = take_acked(b, &mut stream, 2, "roundtrip").await;
    // No order between them: the bare one has no key, and Kafka may put
    // it on another partition than the full one.
    got.sort_by_key(|r| r.message.id() != full.id());
    assert_eq!(got[0].message, full, "full message changed in transit");
    assert_eq!(&*got[0].topic, topic);
    assert!(!got[0].redelivered, "first delivery flagged as redelivered");
    assert_eq!(got[1].message, bare, "bare message changed in transit");
}

/// A subscriber of one topic sees nothing of another.
pub async fn topics_are_isolated(b: &dyn TestBackend) {
    let (ta, tb) = (b.topic("iso-a").await, b.topic("iso-b").await);
    let group = unique("g");
    let mut sa = subscribe(b, &ta, &group).await;
    let mut sb = subscribe(b, &tb, &group).await;
    let (ma, mb) = (numbered(3, "a"), numbered(2, "b"));
    let p = b.publisher().await;
    publish_all(&*p, &ta, &ma).await;
    publish_all(&*p, &tb, &mb).await;

    assert_eq!(
        received_ids(&take_acked(b, &mut sa, 3, "topic a").await),
        ids(&ma)
    );
    assert_eq!(
        received_ids(&take_acked(b, &mut sb, 2, "topic b").await),
        ids(&mb)
    );
    assert_quiet(b, &mut sa, "topic a after its messages").await;
    assert_quiet(b, &mut sb, "topic b after its messages").await;
}

/// Two groups on one topic each receive every message.
pub async fn every_group_gets_every_message(b: &dyn TestBackend) {
    let topic = b.topic("groups").await;
    let mut g1 = subscribe(b, &topic, &unique("g1")).await;
    let mut g2 = subscribe(b, &topic, &unique("g2")).await;
    let sent = numbered(10, "m");
    publish_all(&*b.publisher().await, &topic, &sent).await;

    assert_eq!(
        received_ids(&take_acked(b, &mut g1, 10, "group 1").await),
        ids(&sent)
    );
    assert_eq!(
        received_ids(&take_acked(b, &mut g2, 10, "group 2").await),
        ids(&sent)
    );
    assert_quiet(b, &mut g1, "group 1 after all").await;
}

/// Two members of one group split the messages: once the group is settled,
/// each message goes to exactly one member, and both get some.
pub async fn members_of_a_group_share_messages(b: &dyn TestBackend) {
    let caps = b.capabilities();
    if !caps.competing_consumers {
        eprintln!("skipped: {} has no competing consumers", caps.name);
        return;
    }
    let topic = b.topic("share").await;
    let group = unique("g");
    let members = [
        subscribe(b, &topic, &group).await,
        subscribe(b, &topic, &group).await,
    ];
    let members: Vec<_> = members
        .into_iter()
        .map(|s| Arc::new(tokio::sync::Mutex::new(s)))
        .collect();
    let p = b.publisher().await;

    // Drains both members for `window`, acking everything; returns ids per member.
    let drain = |window: Duration| {
        let members = members.clone();
        async move {
            let mut per_member = Vec::new();
            for m in members {
                per_member.push(tokio::spawn(async move {
                    let mut stream = m.lock().await;
                    let mut got = Vec::new();
                    while let Ok(Some(Ok(d))) = tokio::time::timeout(window, stream.next()).await {
                        got.push(d.message().id().to_owned());
                        d.ack().await.expect("ack");
                    }
                    got
                }));
            }
            let mut out = Vec::new();
            for h in per_member {
                out.push(h.await.expect("drain task"));
            }
            out
        }
    };

    // Warm up until both members have been given work (Kafka: partitions assigned).
    let deadline = tokio::time::Instant::now() + caps.receive_timeout * 2;
    let mut warm = [false, false];
    while warm != [true, true] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "members never both received messages: {warm:?}"
        );
        publish_all(&*p, &topic, &numbered(20, "warm")).await;
        for (i, got) in drain(caps.quiet_period).await.into_iter().enumerate() {
            warm[i] |= !got.is_empty();
        }
    }

    let sent = numbered(40, "share");
    publish_all(&*p, &topic, &sent).await;
    let got = drain(caps.quiet_period * 2).await;
    let mut count: HashMap<&str, usize> = HashMap::new();
    for id in got.iter().flatten() {
        *count.entry(id.as_str()).or_default() += 1;
    }
    let expected = ids(&sent);
    let received: BTreeSet<String> = count.keys().map(|s| s.to_string()).collect();
    assert_eq!(
        received, expected,
        "the group as a whole must receive every message"
    );
    assert!(
        count.values().all(|&c| c == 1),
        "a message went to more than one member: {count:?}"
    );
    assert!(
        got.iter().all(|g| !g.is_empty()),
        "one member received nothing: {:?}",
        got.iter().map(Vec::len).collect::<Vec<_>>()
    );
}

/// With concurrency 8, messages of one key are handled strictly in order,
/// while different keys are handled in parallel.
pub async fn per_key_order_holds_under_concurrency(b: &dyn TestBackend) {
    let topic = b.topic("order").await;
    let (keys, per_key) = (5usize, 40usize);
    let recorder = Recorder::default();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max_in_flight = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (recorder, in_flight, max_in_flight) =
            (recorder.clone(), in_flight.clone(), max_in_flight.clone());
        move |r: Received| {
            let (recorder, in_flight, max_in_flight) =
                (recorder.clone(), in_flight.clone(), max_in_flight.clone());
            async move {
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                max_in_flight.fetch_max(now, Ordering::SeqCst);
                let seq: u64 = String::from_utf8_lossy(r.message.payload())
                    .parse()
                    .unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(1 + seq % 3)).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                recorder.record(r);
                Ok(())
            }
        }
    };
    let handle = start(
        consumer(b, &topic, &unique("g"))
            .await
            .concurrency(8)
            .handler(handler),
    )
    .await;
    let messages: Vec<Message> = (0..per_key)
        .flat_map(|seq| {
            (0..keys).map(move |k| Message::new(seq.to_string()).with_key(format!("k{k}")))
        })
        .collect();
    publish_all(&*b.publisher().await, &topic, &messages).await;

    recorder
        .wait_until(
            b.capabilities().receive_timeout * 2,
            "all ordered messages handled",
            |s| s.len() >= keys * per_key,
        )
        .await;
    stop(handle).await;
    let mut by_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in recorder.seen() {
        let seq = String::from_utf8_lossy(r.message.payload())
            .parse()
            .unwrap();
        by_key
            .entry(r.message.key_str().unwrap().to_owned())
            .or_default()
            .push(seq);
    }
    let expected: Vec<u64> = (0..per_key as u64).collect();
    for (key, seqs) in &by_key {
        assert_eq!(seqs, &expected, "key {key} handled out of order");
    }
    assert_eq!(by_key.len(), keys);
    assert!(
        max_in_flight.load(Ordering::SeqCst) >= 2,
        "messages were never handled in parallel"
    );
}

/// A nacked delivery is delivered again.
pub async fn nack_redelivers(b: &dyn TestBackend) {
    let topic = b.topic("nack").await;
    let mut stream = subscribe(b, &topic, &unique("g")).await;
    let sent = Message::new("again").with_key("k");
    b.publisher()
        .await
        .publish(&topic, sent.clone())
        .await
        .expect("publish");

    let first = next(b, &mut stream, "first delivery").await;
    assert_eq!(first.message().id(), sent.id());
    first.nack(true).await.expect("nack");
    let second = next(b, &mut stream, "redelivery after nack").await;
    assert_eq!(
        second.message().id(),
        sent.id(),
        "a different message came instead of the redelivery"
    );
    if b.capabilities().reports_redelivery {
        assert!(second.received.redelivered, "redelivery not flagged");
    }
    second.ack().await.expect("ack");
    assert_quiet(b, &mut stream, "after ack").await;
}

/// A failing handler is retried up to the policy's attempts, then the message
/// goes unchanged to `{topic}.dlq` with reason headers, and is acked.
pub async fn retries_then_dead_letters_with_headers(b: &dyn TestBackend) {
    let topic = b.topic("retry").await;
    let group = unique("g");
    let mut dlq = subscribe(b, &dead_letter_topic(&topic), &unique("dlq")).await;
    let attempts = Arc::new(AtomicUsize::new(0));
    let handler = {
        let attempts = attempts.clone();
        move |_r: Received| {
            attempts.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(HandlerError::retryable("boom: downstream unavailable")) }
        }
    };
    let handle = start(consumer(b, &topic, &group).await.handler(handler)).await;
    let sent = Message::new("payload").with_key("k1").with_header("h", "v");
    let before = crate::message::now_millis();
    b.publisher()
        .await
        .publish(&topic, sent.clone())
        .await
        .expect("publish");

    let letter = next(b, &mut dlq, "dead letter").await;
    let m = letter.message().clone();
    letter.ack().await.expect("ack dead letter");
    assert_eq!(m.id(), sent.id());
    assert_eq!(m.payload(), sent.payload());
    assert_eq!(m.key(), sent.key());
    assert_eq!(m.headers()["h"], "v", "original headers must be kept");
    let h = m.headers();
    assert!(
        h[header::DLQ_REASON]
            .to_text()
            .contains("boom: downstream unavailable"),
        "reason: {}",
        h[header::DLQ_REASON]
    );
    assert_eq!(h[header::DLQ_ERROR_KIND], "handler");
    assert_eq!(h[header::DLQ_ORIGINAL_TOPIC], topic);
    assert_eq!(h[header::DLQ_ATTEMPTS], "3");
    assert_eq!(h[header::DLQ_GROUP], group);
    let failed_at = from_millis_since_epoch(
        h[header::DLQ_FAILED_AT]
            .to_text()
            .parse()
            .expect("failed-at is ms"),
    );
    assert!(
        failed_at >= before,
        "failed-at {failed_at:?} before publish {before:?}"
    );

    stop(handle).await;
    assert_eq!(attempts.load(Ordering::SeqCst), 3, "handler attempts");
    // The original was acked: the group has nothing left.
    let mut again = subscribe(b, &topic, &group).await;
    assert_quiet(b, &mut again, "original topic after dead-lettering").await;
}

/// A permanent error skips retries: dead-lettered after one attempt.
pub async fn permanent_error_dead_letters_at_once(b: &dyn TestBackend) {
    let topic = b.topic("permanent").await;
    let mut dlq = subscribe(b, &dead_letter_topic(&topic), &unique("dlq")).await;
    let attempts = Arc::new(AtomicUsize::new(0));
    let handler = {
        let attempts = attempts.clone();
        move |_r: Received| {
            attempts.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(HandlerError::permanent("account closed")) }
        }
    };
    let metrics = Arc::new(crate::Metrics::default());
    let handle = start(
        consumer(b, &topic, &unique("g"))
            .await
            .metrics(metrics.clone())
            .handler(handler),
    )
    .await;
    let sent = Message::new("x");
    b.publisher()
        .await
        .publish(&topic, sent.clone())
        .await
        .expect("publish");

    let letter = next(b, &mut dlq, "dead letter").await;
    let h = letter.message().headers().clone();
    letter.ack().await.expect("ack");
    stop(handle).await;
    let metrics = metrics.snapshot();
    assert_eq!(h[header::DLQ_ATTEMPTS], "1");
    assert_eq!(h[header::DLQ_ERROR_KIND], "permanent");
    assert!(h[header::DLQ_REASON].to_text().contains("account closed"));
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
    assert_eq!(
        (metrics.failed, metrics.retried, metrics.dead_lettered),
        (1, 0, 1),
        "{metrics:?}"
    );
}

/// A panicking handler is retried like an error; the runtime survives and
/// the next attempt succeeds. Counters record it.
pub async fn panic_counts_as_error(b: &dyn TestBackend) {
    let topic = b.topic("panic").await;
    let attempts = Arc::new(AtomicUsize::new(0));
    let recorder = Recorder::default();
    let handler = {
        let (attempts, recorder) = (attempts.clone(), recorder.clone());
        move |r: Received| {
            let n = attempts.fetch_add(1, Ordering::SeqCst);
            let recorder = recorder.clone();
            async move {
                if n == 0 {
                    panic!("handler bug");
                }
                recorder.record(r);
                Ok(())
            }
        }
    };
    let metrics = Arc::new(crate::Metrics::default());
    let handle = start(
        consumer(b, &topic, &unique("g"))
            .await
            .metrics(metrics.clone())
            .handler(handler),
    )
    .await;
    b.publisher()
        .await
        .publish(&topic, Message::new("p"))
        .await
        .expect("publish");
    recorder
        .wait_until(
            b.capabilities().receive_timeout,
            "handled after panic",
            |s| !s.is_empty(),
        )
        .await;
    let seen = recorder.seen();
    assert_eq!(seen[0].attempt, 2, "the success must be the second attempt");
    stop(handle).await;
    let metrics = metrics.snapshot();
    assert_eq!(
        (
            metrics.failed,
            metrics.retried,
            metrics.handled,
            metrics.dead_lettered
        ),
        (1, 1, 1, 0),
        "{metrics:?}"
    );
}

/// Event used by [`invalid_payload_dead_letters`].
#[derive(Debug, Serialize, Deserialize, Validate)]
pub struct SampleEvent {
    /// Must be at least 1.
    #[validate(range(min = 1))]
    pub quantity: u32,
    /// Must not be empty.
    #[validate(length(min = 1))]
    pub sku: String,
}

impl Event for SampleEvent {
    const TOPIC: &'static str = "testkit.sample.created";
    fn partition_key(&self) -> Option<String> {
        Some(self.sku.clone())
    }
}

/// Undecodable and invalid payloads go to the dead-letter topic at once, with
/// the reason; the handler only sees the valid event.
pub async fn invalid_payload_dead_letters(b: &dyn TestBackend) {
    let topic = b.topic("invalid").await;
    let mut dlq = subscribe(b, &dead_letter_topic(&topic), &unique("dlq")).await;
    let recorder = Recorder::default();
    let handler = {
        let recorder = recorder.clone();
        typed(move |e: SampleEvent, r: Received| {
            let recorder = recorder.clone();
            async move {
                assert_eq!(e.sku, "sku-1");
                recorder.record(r);
                Ok(())
            }
        })
    };
    let handle = start(consumer(b, &topic, &unique("g")).await.handler(handler)).await;
    let garbage = Message::new("not json {");
    let invalid = Message::new(r#"{"quantity":0,"sku":"sku-1"}"#);
    let valid = SampleEvent {
        quantity: 2,
        sku: "sku-1".into(),
    }
    .to_message()
    .expect("valid event");
    let p = b.publisher().await;
    for m in [&garbage, &invalid, &valid] {
        p.publish(&topic, m.clone()).await.expect("publish");
    }
    // Invalid events are refused before publishing.
    assert!(matches!(
        SampleEvent {
            quantity: 0,
            sku: String::new()
        }
        .to_message(),
        Err(BrokerError::Validation(_))
    ));

    let letters: BTreeMap<String, Message> = take_acked(b, &mut dlq, 2, "dead letters")
        .await
        .into_iter()
        .map(|r| (r.message.id().to_owned(), r.message))
        .collect();
    recorder
        .wait_until(
            b.capabilities().receive_timeout,
            "valid event handled",
            |s| !s.is_empty(),
        )
        .await;
    stop(handle).await;
    let g = &letters[garbage.id()].headers();
    assert_eq!(g[header::DLQ_ERROR_KIND], "decode");
    assert_eq!(g[header::DLQ_ATTEMPTS], "1");
    let i = &letters[invalid.id()].headers();
    assert_eq!(i[header::DLQ_ERROR_KIND], "validation");
    assert!(
        i[header::DLQ_REASON].to_text().contains("quantity"),
        "reason should name the field: {}",
        i[header::DLQ_REASON]
    );
    assert_eq!(
        letters[garbage.id()].payload(),
        garbage.payload(),
        "payload must be kept unchanged"
    );
    assert_eq!(received_ids(&recorder.seen()), ids(&[valid]));
}

/// Deliveries never acked come back to the group after their subscription closes.
pub async fn unacked_redelivered_after_close(b: &dyn TestBackend) {
    let topic = b.topic("unacked").await;
    let group = unique("g");
    let mut first = subscribe(b, &topic, &group).await;
    let sent = numbered(3, "u");
    publish_all(&*b.publisher().await, &topic, &sent).await;
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(next(b, &mut first, &format!("first delivery {i}")).await);
    }
    first.close().await.expect("close");
    drop(held);

    let mut second = subscribe(b, &topic, &group).await;
    let again = take_acked(b, &mut second, 3, "redelivered after close").await;
    assert_eq!(received_ids(&again), ids(&sent));
    if b.capabilities().reports_redelivery {
        assert!(
            again.iter().all(|r| r.redelivered),
            "redeliveries not flagged"
        );
    }
}

/// `close` waits for publishes in flight: each publish either succeeded and
/// its message is delivered, or failed with `Closed`. After close, publishing fails.
pub async fn publisher_close_loses_nothing(b: &dyn TestBackend) {
    let topic = b.topic("close").await;
    let mut stream = subscribe(b, &topic, &unique("g")).await;
    let p = b.publisher().await;
    let batch = numbered(100, "batch");
    publish_all(&*p, &topic, &batch).await;
    let racing: Vec<_> = numbered(100, "racing")
        .into_iter()
        .map(|m| {
            let (p, topic) = (p.clone(), topic.clone());
            tokio::spawn(async move { (m.id().to_owned(), p.publish(&topic, m).await) })
        })
        .collect();
    tokio::task::yield_now().await;
    p.close().await.expect("close");
    let mut confirmed = ids(&batch);
    for task in racing {
        match task.await.expect("publish task") {
            (id, Ok(())) => {
                confirmed.insert(id);
            }
            (_, Err(BrokerError::Closed(_))) => {}
            (_, Err(e)) => panic!("a publish racing close failed with {e}, not Closed"),
        }
    }
    let after = p.publish(&topic, Message::new("late")).await;
    assert!(
        matches!(after, Err(BrokerError::Closed(_))),
        "publish after close: {after:?}"
    );

    let got = take_acked(b, &mut stream, confirmed.len(), "confirmed messages").await;
    assert_eq!(received_ids(&got), confirmed);
    assert_quiet(b, &mut stream, "after confirmed messages").await;
}

/// Many members of one group subscribing and closing at once leave the group
/// working: a member that stays receives every message published afterwards.
pub async fn concurrent_subscribe_and_close(b: &dyn TestBackend) {
    let topic = b.topic("churn").await;
    let group = unique("g");
    let sub = b.subscriber().await;
    let churn: Vec<_> = (0..8)
        .map(|_| {
            let (sub, topic, group) = (sub.clone(), topic.clone(), group.clone());
            tokio::spawn(async move {
                for _ in 0..3 {
                    let s = sub.subscribe(Subscription::new(&topic, &group)).await?;
                    s.close().await?;
                }
                Ok::<_, BrokerError>(())
            })
        })
        .collect();
    for task in churn {
        task.await.expect("churn task").expect("subscribe/close");
    }
    let mut stream = subscribe(b, &topic, &group).await;
    let sent = numbered(20, "after-churn");
    publish_all(&*b.publisher().await, &topic, &sent).await;
    assert_eq!(
        received_ids(&take_acked(b, &mut stream, 20, "after churn").await),
        ids(&sent)
    );
}

/// Shutdown with a generous deadline lets started handlers finish; with a
/// short one it abandons them; either way no message is lost: a new consumer
/// in the group handles whatever was not finished.
pub async fn shutdown_with_in_flight_messages(b: &dyn TestBackend) {
    let topic = b.topic("shutdown").await;
    let group = unique("g");
    // The group exists before the messages: a RabbitMQ queue only holds what
    // is published after its first subscribe.
    subscribe(b, &topic, &group)
        .await
        .close()
        .await
        .expect("close the first subscription");
    let started = Recorder::default();
    let finished = Recorder::default();
    let slow = |pause: Duration| {
        let (started, finished) = (started.clone(), finished.clone());
        move |r: Received| {
            let (started, finished) = (started.clone(), finished.clone());
            async move {
                started.record(r.clone());
                tokio::time::sleep(pause).await;
                finished.record(r);
                Ok(())
            }
        }
    };
    let sent = numbered(20, "inflight");
    publish_all(&*b.publisher().await, &topic, &sent).await;

    // Generous deadline: what started, finishes.
    let first = start(
        consumer(b, &topic, &group)
            .await
            .concurrency(4)
            .handler(slow(Duration::from_millis(200))),
    )
    .await;
    started
        .wait_until(
            b.capabilities().receive_timeout,
            "first handler started",
            |s| !s.is_empty(),
        )
        .await;
    first
        .shutdown(Duration::from_secs(10))
        .await
        .expect("graceful shutdown");
    let started_ids = received_ids(&started.seen());
    let finished_ids = received_ids(&finished.seen());
    assert!(
        started_ids.is_subset(&finished_ids),
        "a started handler was cut off despite the deadline"
    );

    // Short deadline: in-flight handlers are abandoned, not acked.
    let before = started.seen().len();
    let second = start(
        consumer(b, &topic, &group)
            .await
            .concurrency(4)
            .handler(slow(Duration::from_secs(5))),
    )
    .await;
    started
        .wait_until(
            b.capabilities().receive_timeout,
            "second handler started",
            |s| s.len() > before,
        )
        .await;
    second
        .shutdown(Duration::from_millis(100))
        .await
        .expect("shutdown at deadline");

    // Nothing lost: a fresh consumer finishes the rest.
    let third = start(
        consumer(b, &topic, &group)
            .await
            .concurrency(4)
            .handler(slow(Duration::ZERO)),
    )
    .await;
    let all = ids(&sent);
    finished
        .wait_until(
            b.capabilities().receive_timeout * 2,
            "every message finished once",
            |s| received_ids(s).is_superset(&all),
        )
        .await;
    stop(third).await;
}

/// A message of half the backend's limit arrives intact.
pub async fn large_message_roundtrip(b: &dyn TestBackend) {
    let topic = b.topic("large").await;
    let mut stream = subscribe(b, &topic, &unique("g")).await;
    let payload: Vec<u8> = (0..b.capabilities().max_message_bytes / 2)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let sent = Message::new(payload).with_key("big");
    b.publisher()
        .await
        .publish(&topic, sent.clone())
        .await
        .expect("publish large");
    let got = take_acked(b, &mut stream, 1, "large message").await;
    assert_eq!(got[0].message, sent);
}

/// A message over the limit is refused with `MessageTooLarge`, alone or in a
/// batch, and nothing of the refused call is delivered.
pub async fn oversized_message_rejected(b: &dyn TestBackend) {
    let caps = b.capabilities();
    let topic = b.topic("oversized").await;
    let mut stream = subscribe(b, &topic, &unique("g")).await;
    let p = b.publisher().await;
    assert_eq!(p.max_message_bytes(), caps.max_message_bytes);
    let huge = Message::new(vec![7u8; caps.max_message_bytes + 1]);
    let single = p.publish(&topic, huge.clone()).await;
    assert!(
        matches!(single, Err(BrokerError::MessageTooLarge { .. })),
        "single: {single:?}"
    );
    let batch = p
        .publish_batch(&topic, vec![Message::new("small"), huge])
        .await;
    assert!(
        matches!(batch, Err(BrokerError::MessageTooLarge { .. })),
        "batch: {batch:?}"
    );

    let marker = Message::new("marker");
    p.publish(&topic, marker.clone())
        .await
        .expect("publish marker");
    let got = take_acked(b, &mut stream, 1, "marker").await;
    assert_eq!(
        got[0].message.id(),
        marker.id(),
        "something of a refused publish was delivered"
    );
}

/// Bad topic names are refused with a typed error, on both sides.
pub async fn invalid_topic_rejected(b: &dyn TestBackend) {
    let p = b.publisher().await;
    let r = p.publish("bad topic/name", Message::new("x")).await;
    assert!(
        matches!(r, Err(BrokerError::InvalidTopic(_))),
        "publish: {r:?}"
    );
    let s = b
        .subscriber()
        .await
        .subscribe(Subscription::new("", "g"))
        .await;
    assert!(
        matches!(s, Err(BrokerError::InvalidTopic(_))),
        "subscribe: {:?}",
        s.err()
    );
}

/// Both sides report healthy against a running broker.
pub async fn health_is_reported(b: &dyn TestBackend) {
    let p = b.publisher().await.health().await;
    assert!(p.is_healthy(), "publisher: {p:?}");
    let s = b.subscriber().await.health().await;
    assert!(s.is_healthy(), "subscriber: {s:?}");
}
