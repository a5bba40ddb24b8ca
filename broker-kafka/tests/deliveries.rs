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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsettled_deliveries_count_across_subscriptions() {
    if !backend_selected("kafka") {
        return;
    }
    let broker = common::broker().await;
    let topic = unique("kafka-test.deliveries");
    let spec = TopicSpec::default().partitions(1).replication_factor(1);
    broker
        .create_topic_with_dlq(&topic, &spec)
        .await
        .expect("create topic");
    for payload in ["a", "b", "c"] {
        broker
            .publish(&topic, Message::new(payload))
            .await
            .expect("publish");
    }
    let group = unique("deliveries");
    let subscribe = || async {
        common::broker()
            .await
            .subscribe(
                Subscription::new(&topic, &group)
                    .with_prefetch(4)
                    .isolating_redeliveries(),
            )
            .await
            .expect("subscribe")
    };

    // First member: a fresh group, deliveries in parallel. It stops with
    // `a` in flight (as if it had crashed on it).
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
    // waits for `a` to be settled. It stops with `b` in flight.
    let mut stream = subscribe().await;
    let a = next(&mut stream).await;
    assert_eq!(seen(&a), ("a".into(), 2));
    assert_held(&mut stream, "recovering: one delivery at a time").await;
    a.ack().await.expect("ack a");
    let b = next(&mut stream).await;
    assert_eq!(seen(&b), ("b".into(), 1), "b was never the head before");
    stream.close().await.expect("close");
    drop(b);

    // Third member: `a` stays settled; `b` is counted. It settles
    // everything and closes cleanly.
    let mut stream = subscribe().await;
    let b = next(&mut stream).await;
    assert_eq!(seen(&b), ("b".into(), 2));
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
