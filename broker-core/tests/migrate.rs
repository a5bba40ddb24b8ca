//! Dual publishing, bridging and dead-letter replay, on two in-memory brokers
//! standing in for the old and the new broker.

use std::time::Duration;

use broker_core::message::header;
use broker_core::migrate::{bridge, replay_dead_letters, DualPublisher, SecondaryPolicy};
use broker_core::testkit::{fast_retry, Recorder};
use broker_core::{
    BrokerError, Consumer, HandlerError, MemoryBroker, Message, Publisher, Received, Subscriber,
    Subscription,
};

async fn next(stream: &mut Box<dyn broker_core::DeliveryStream>) -> broker_core::Delivery {
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("delivery in time")
        .expect("stream open")
        .expect("delivery")
}

#[tokio::test]
async fn dual_publish_reaches_both_and_applies_the_secondary_policy() {
    let (old, new) = (MemoryBroker::new(), MemoryBroker::new());
    let mut on_old = old.subscribe(Subscription::new("t", "g")).await.unwrap();
    let mut on_new = new.subscribe(Subscription::new("t", "g")).await.unwrap();
    let dual = DualPublisher::new(old.clone(), new.clone(), SecondaryPolicy::BestEffort);
    let sent = Message::new("x").with_key("k").with_header("h", "v");
    dual.publish("t", sent.clone()).await.unwrap();
    assert_eq!(next(&mut on_old).await.message(), &sent);
    assert_eq!(next(&mut on_new).await.message(), &sent);

    // Secondary down: best effort still succeeds and counts; required fails.
    new.close().await.unwrap();
    dual.publish("t", Message::new("y")).await.unwrap();
    assert_eq!(dual.secondary_failures(), 1);
    let required = DualPublisher::new(old.clone(), new.clone(), SecondaryPolicy::Required);
    assert!(matches!(
        required.publish("t", Message::new("z")).await,
        Err(BrokerError::Closed(_))
    ));
    // Primary down: always an error.
    let primary_down = DualPublisher::new(new.clone(), old.clone(), SecondaryPolicy::BestEffort);
    assert!(primary_down.publish("t", Message::new("w")).await.is_err());
}

#[tokio::test]
async fn bridge_copies_messages_unchanged_to_the_other_broker() {
    let (old, new) = (MemoryBroker::new(), MemoryBroker::new());
    let mut on_new = new.subscribe(Subscription::new("t", "app")).await.unwrap();
    let running = bridge(old.clone(), new.clone(), "t", "bridge")
        .start()
        .await
        .unwrap();
    let sent: Vec<Message> = (0..20)
        .map(|i| {
            Message::new(format!("m{i}"))
                .with_key(format!("k{}", i % 3))
                .with_header("h", "v")
                .with_correlation_id("c")
        })
        .collect();
    old.publish_batch("t", sent.clone()).await.unwrap();
    for expected in &sent {
        let d = next(&mut on_new).await;
        assert_eq!(d.message(), expected);
        d.ack().await.unwrap();
    }
    running.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn dead_letters_replay_to_their_original_topic() {
    let broker = MemoryBroker::new();
    let handled = Recorder::default();
    // A consumer that dead-letters everything once.
    let failing = Consumer::builder(broker.clone(), "orders", "billing")
        .retry(fast_retry(1))
        .handler(|_r: Received| async { Err::<(), _>(HandlerError::permanent("bug")) })
        .start()
        .await
        .unwrap();
    let sent = Message::new("order-1").with_key("k").with_header("h", "v");
    broker.publish("orders", sent.clone()).await.unwrap();
    let mut dlq = broker
        .subscribe(Subscription::new("orders.dlq", "peek"))
        .await
        .unwrap();
    let letter = next(&mut dlq).await;
    assert_eq!(
        letter.message().headers()[header::DLQ_ORIGINAL_TOPIC],
        "orders"
    );
    letter.ack().await.unwrap();
    failing.shutdown(Duration::from_secs(5)).await.unwrap();

    // Bug fixed: a healthy consumer, then replay.
    let fixed = Consumer::builder(broker.clone(), "orders", "billing")
        .handler(handled.handler())
        .start()
        .await
        .unwrap();
    let report = replay_dead_letters(
        &broker,
        &broker,
        "orders.dlq",
        "replayer",
        100,
        Duration::from_millis(300),
    )
    .await
    .unwrap();
    assert_eq!((report.replayed, report.left), (1, 0));
    handled
        .wait_until(Duration::from_secs(5), "replayed message handled", |s| {
            s.len() == 1
        })
        .await;
    fixed.shutdown(Duration::from_secs(5)).await.unwrap();
    let replayed = &handled.seen()[0].message;
    assert_eq!(replayed.id(), sent.id());
    assert_eq!(
        replayed.headers(),
        sent.headers(),
        "x-dlq-* headers must be gone"
    );
}

#[tokio::test]
async fn replay_leaves_letters_without_an_original_topic() {
    let broker = MemoryBroker::new();
    broker
        .publish("orders.dlq", Message::new("orphan"))
        .await
        .unwrap();
    let report = replay_dead_letters(
        &broker,
        &broker,
        "orders.dlq",
        "replayer",
        10,
        Duration::from_millis(200),
    )
    .await
    .unwrap();
    assert_eq!((report.replayed, report.left), (0, 1));
    // Still there for the next reader of the group.
    let mut again = broker
        .subscribe(Subscription::new("orders.dlq", "replayer"))
        .await
        .unwrap();
    assert_eq!(next(&mut again).await.message().payload(), "orphan");
}
