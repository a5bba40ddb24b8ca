//! Delivery counts that outlive a subscription, against the test broker: a
//! record left unsettled by one member is delivered to the next with a
//! higher `attempt`; while a partition recovers from that, deliveries come
//! one at a time; a clean close starts the counts over.

mod common;

use std::time::Duration;

use broker_core::testkit::{backend_selected, unique};
use broker_core::{Delivery, DeliveryStream, Message, Publisher, Subscriber, Subscription};
use broker_kafka::TopicSpec;

/// Group joins on tansu take seconds.
const RECEIVE: Duration = Duration::from_secs(45);

async fn next(stream: &mut Box<dyn DeliveryStream>) -> Delivery {
    tokio::time::timeout(RECEIVE, stream.next())
        .await
        .expect("a delivery in time")
        .expect("stream open")
        .expect("delivery")
}

fn seen(d: &Delivery) -> (String, u32) {
    (
        String::from_utf8_lossy(d.message().payload()).into_owned(),
        d.received.attempt,
    )
}

/// Nothing is handed out for a while.
async fn assert_held(stream: &mut Box<dyn DeliveryStream>, why: &str) {
    let more = tokio::time::timeout(Duration::from_secs(2), stream.next()).await;
    assert!(more.is_err(), "{why}: got {:?}", more.ok());
}

/// A new one-partition topic (named after `name`) and group.
async fn topic_and_group(name: &str) -> (broker_kafka::KafkaBroker, String, String) {
    let broker = common::broker().await;
    let topic = unique(&format!("kafka-test.{name}"));
    let spec = TopicSpec::default().partitions(1).replication_factor(1);
    broker
        .create_topic_with_dlq(&topic, &spec)
        .await
        .expect("create topic");
    (broker, topic, unique(name))
}

/// A member of `group` on `topic`, counting deliveries (prefetch 4).
async fn member(topic: &str, group: &str) -> Box<dyn DeliveryStream> {
    common::broker()
        .await
        .subscribe(
            Subscription::new(topic, group)
                .with_prefetch(4)
                .isolating_redeliveries(),
        )
        .await
        .expect("subscribe")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsettled_deliveries_count_across_subscriptions() {
    if !backend_selected("kafka") {
        return;
    }
    let (broker, topic, group) = topic_and_group("deliveries").await;
    for payload in ["a", "b", "c"] {
        broker
            .publish(&topic, Message::new(payload))
            .await
            .expect("publish");
    }
    let subscribe = || member(&topic, &group);

    // First member: a fresh group, deliveries in parallel. It stops with
    // `a` and `b` in flight (as if it had crashed on one of them).
    let mut stream = subscribe().await;
    let a = next(&mut stream).await;
    assert_eq!(seen(&a), ("a".into(), 1));
    let b = next(&mut stream).await;
    assert_eq!(
        seen(&b),
        ("b".into(), 1),
        "no recovery: a second hand-out at once"
    );
    stream.close().await.expect("close");
    drop((a, b));

    // Second member: `a` again, counted; the partition recovers, so `b`
    // waits for `a` to be settled, and is counted too (it was in flight
    // when the first member stopped). It stops with `b` in flight.
    let mut stream = subscribe().await;
    let a = next(&mut stream).await;
    assert_eq!(seen(&a), ("a".into(), 2));
    assert_held(&mut stream, "recovering: one delivery at a time").await;
    a.ack().await.expect("ack a");
    let b = next(&mut stream).await;
    assert_eq!(
        seen(&b),
        ("b".into(), 2),
        "b was in flight at the first stop"
    );
    stream.close().await.expect("close");
    drop(b);

    // Third member: `a` stays settled; `b` is counted again. `c` was never
    // handed out before. It settles everything and closes cleanly.
    let mut stream = subscribe().await;
    let b = next(&mut stream).await;
    assert_eq!(seen(&b), ("b".into(), 3));
    b.ack().await.expect("ack b");
    let c = next(&mut stream).await;
    assert_eq!(seen(&c), ("c".into(), 1));
    c.ack().await.expect("ack c");
    stream.close().await.expect("close");

    // Fourth member: after the clean close, new records are first
    // deliveries and come in parallel again.
    broker
        .publish(&topic, Message::new("d"))
        .await
        .expect("publish");
    broker
        .publish(&topic, Message::new("e"))
        .await
        .expect("publish");
    let mut stream = subscribe().await;
    let d = next(&mut stream).await;
    assert_eq!(seen(&d), ("d".into(), 1));
    let e = next(&mut stream).await;
    assert_eq!(seen(&e), ("e".into(), 1));
    d.ack().await.expect("ack d");
    e.ack().await.expect("ack e");
    stream.close().await.expect("close");
}

/// A record 40 past the committed offset is counted after an unclean stop:
/// the first member holds record 0 unsettled (so nothing is committed),
/// finishes 1..=39 and stops with 40 in flight, as if 40 had killed it.
/// Every record it may have left unsettled comes again counted, one at a
/// time, and 40 counts up with each stop, however far from the commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_far_past_the_commit_counts_across_subscriptions() {
    if !backend_selected("kafka") {
        return;
    }
    let (broker, topic, group) = topic_and_group("deliveries-far").await;
    let messages = (0..45).map(|i| Message::new(format!("r{i}"))).collect();
    broker
        .publish_batch(&topic, messages)
        .await
        .expect("publish");
    let subscribe = || member(&topic, &group);
    let label = |i: usize| format!("r{i}");

    let mut stream = subscribe().await;
    let first = next(&mut stream).await;
    assert_eq!(seen(&first), (label(0), 1));
    for i in 1..40 {
        let d = next(&mut stream).await;
        assert_eq!(
            seen(&d),
            (label(i), 1),
            "a clean start hands out in parallel"
        );
        d.ack().await.expect("ack");
    }
    let poison = next(&mut stream).await;
    assert_eq!(seen(&poison), (label(40), 1));
    stream.close().await.expect("close");
    drop((first, poison));

    // Nothing was committed: the second member starts at 0 and counts
    // every record up to 40, one at a time. It stops on 40 again.
    let mut stream = subscribe().await;
    for i in 0..40 {
        let d = next(&mut stream).await;
        assert_eq!(
            seen(&d),
            (label(i), 2),
            "in flight or uncommitted at the stop"
        );
        if i == 0 {
            assert_held(&mut stream, "recovering: one delivery at a time").await;
        }
        d.ack().await.expect("ack");
    }
    let poison = next(&mut stream).await;
    assert_eq!(seen(&poison), (label(40), 2));
    stream.close().await.expect("close");
    drop(poison);
    // The third member resumes at 40 (committed before it was handed
    // out) and counts it once more; past it, records are first deliveries.
    let mut stream = subscribe().await;
    let poison = next(&mut stream).await;
    assert_eq!(seen(&poison), (label(40), 3));
    poison.ack().await.expect("ack");
    for i in 41..45 {
        let d = next(&mut stream).await;
        assert_eq!(seen(&d), (label(i), 1));
        d.ack().await.expect("ack");
    }
    stream.close().await.expect("close");
}
