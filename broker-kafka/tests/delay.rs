//! Delayed publish and delayed retries on Kafka, against the test broker,
//! beyond the conformance suite: a delayed message reaches each group of
//! the topic once, a retry copy only the group that failed it, and a delay
//! topic that does not fit is refused with a clear error.

mod common;

use std::time::{Duration, Instant};

use broker_core::message::header;
use broker_core::testkit::{backend_selected, unique};
use broker_core::{
    BrokerError, Delivery, DeliveryStream, Message, Publisher, Subscriber, Subscription,
};
use broker_kafka::TopicSpec;

/// Group joins on tansu take seconds.
const RECEIVE: Duration = Duration::from_secs(45);

async fn next(stream: &mut Box<dyn DeliveryStream>, what: &str) -> Delivery {
    tokio::time::timeout(RECEIVE, stream.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {RECEIVE:?}"))
        .expect("stream open")
        .expect("delivery")
}

async fn assert_quiet(stream: &mut Box<dyn DeliveryStream>, what: &str) {
    let more = tokio::time::timeout(Duration::from_secs(3), stream.next()).await;
    assert!(
        more.is_err(),
        "{what}: got {:?}",
        more.ok().map(|d| d.map(|d| d.map(|d| d.received)))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_message_reaches_each_group_once_and_a_retry_only_its_group() {
    if !backend_selected("kafka") {
        return;
    }
    let broker = common::broker().await;
    let topic = unique("kafka-test.delay-groups");
    let spec = TopicSpec::default().partitions(2).replication_factor(1);
    broker
        .create_topic_with_dlq(&topic, &spec)
        .await
        .expect("create topic");
    let subscribe = |group: String| {
        let topic = topic.clone();
        async move {
            common::broker()
                .await
                .subscribe(Subscription::new(&topic, &group))
                .await
                .expect("subscribe")
        }
    };
    let (mut a, mut b) = tokio::join!(subscribe(unique("a")), subscribe(unique("b")));

    let sent = Message::new("later").with_key("k").with_header("h", "v");
    let started = Instant::now();
    broker
        .publish_after(&topic, sent.clone(), Duration::from_millis(800))
        .await
        .expect("publish_after");
    let (got_a, got_b) = tokio::join!(next(&mut a, "group a"), next(&mut b, "group b"));
    assert!(started.elapsed() >= Duration::from_millis(800), "not early");
    assert_eq!(got_a.message(), &sent, "group a gets it as published");
    assert_eq!(got_b.message(), &sent, "group b gets it as published");
    got_b.ack().await.expect("ack b");

    // Group a fails it: the copy comes back to a only.
    let (received, acker) = got_a.into_parts();
    let mut copy = received.message.clone();
    copy.headers_mut().insert(header::RETRY_ATTEMPT, "2");
    let retried_at = Instant::now();
    acker
        .retry_after(copy, Duration::from_millis(500))
        .await
        .expect("retry_after");
    let again = next(&mut a, "the retry of group a").await;
    assert!(
        retried_at.elapsed() >= Duration::from_secs(1),
        "the retry waits its 1 s tier"
    );
    assert_eq!(again.message().id(), sent.id());
    assert_eq!(again.message().key(), sent.key());
    assert_eq!(again.message().headers().get_str("h"), Some("v"));
    assert_eq!(
        again.message().headers().get_str(header::RETRY_ATTEMPT),
        Some("2")
    );
    assert!(
        again.message().headers().get(header::RETRY_GROUP).is_none(),
        "the backend's routing header is removed"
    );
    again.ack().await.expect("ack the retry");
    assert_quiet(&mut b, "group b must not get group a's retry").await;
    assert_quiet(&mut a, "group a gets its retry once").await;
    a.close().await.expect("close a");
    b.close().await.expect("close b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_topic_that_does_not_fit_is_refused_clearly() {
    if !backend_selected("kafka") {
        return;
    }
    let broker = common::broker().await;
    let topic = unique("kafka-test.delay-misfit");
    let two = TopicSpec::default().partitions(2).replication_factor(1);
    broker.create_topic(&topic, &two).await.expect("topic");
    let three = TopicSpec::default().partitions(3).replication_factor(1);
    broker
        .create_topic(&format!("{topic}.retry"), &three)
        .await
        .expect("misfit delay topic");
    match broker
        .publish_after(&topic, Message::new("x"), Duration::from_secs(1))
        .await
    {
        Err(BrokerError::Refused { reason, .. }) => {
            assert!(
                reason.contains(&format!("{topic}.retry has 3 partitions; it needs 16")),
                "unclear reason: {reason}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Delays without delay: published at once.
    broker
        .publish_after(&topic, Message::new("now"), Duration::ZERO)
        .await
        .expect("a zero delay needs no delay topic");
}
