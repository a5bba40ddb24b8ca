//! Consumer lag: on librdkafka's mock cluster (correct watermarks, always
//! runs) and on a real Kafka under `KAFKA_REAL=1`. tansu reports a wrong
//! high watermark, so the lag check does not run against it.

mod common;

use std::time::Duration;

use broker_core::config::KafkaSettings;
use broker_core::testkit::{unique, Recorder};
use broker_core::{Backoff, Consumer, Message, Publisher};
use broker_kafka::{total_lag, KafkaBroker};
use rdkafka::mocking::MockCluster;

const PARTITIONS: i32 = 3;

/// Publishes `sent` messages, lets a group handle them, publishes `later`
/// more with nobody consuming, and checks the lag figures of that group and
/// of a group that never consumed.
async fn lag_follows_commits(broker: &KafkaBroker, topic: &str, sent: usize, later: usize) {
    let batch = |n: usize, tag: &str| -> Vec<Message> {
        (0..n)
            .map(|i| Message::new(format!("{tag}-{i}")).with_key(format!("k{i}")))
            .collect()
    };
    broker
        .publish_batch(topic, batch(sent, "first"))
        .await
        .expect("publish");
    let group = unique("lag-group");
    let recorder = Recorder::default();
    let consumer = Consumer::builder(broker.clone(), topic, &group)
        .concurrency(4)
        .handler(recorder.handler())
        .start()
        .await
        .expect("consumer");
    recorder
        .wait_until(Duration::from_secs(60), "every message handled", |s| {
            s.len() >= sent
        })
        .await;
    // Shutdown commits what finished.
    consumer
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");

    let caught_up = broker.consumer_lag(&group, topic).await.expect("lag");
    assert_eq!(caught_up.len(), PARTITIONS as usize, "{caught_up:?}");
    assert_eq!(total_lag(&caught_up), 0, "{caught_up:?}");
    let end: i64 = caught_up.iter().map(|p| p.high_watermark).sum();
    assert_eq!(end, sent as i64, "{caught_up:?}");

    broker
        .publish_batch(topic, batch(later, "later"))
        .await
        .expect("publish more");
    let behind = broker.consumer_lag(&group, topic).await.expect("lag");
    assert_eq!(total_lag(&behind), later as i64, "{behind:?}");

    let idle = broker
        .consumer_lag(&unique("never-consumed"), topic)
        .await
        .expect("lag of a new group");
    assert!(idle.iter().all(|p| p.committed.is_none()), "{idle:?}");
    assert_eq!(total_lag(&idle), (sent + later) as i64, "{idle:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_lag_on_the_mock_cluster() {
    let mock = MockCluster::new(1).expect("mock cluster");
    let topic = unique("mock.lag");
    mock.create_topic(&topic, PARTITIONS, 1).expect("topic");
    mock.create_topic(&format!("{topic}.dlq"), PARTITIONS, 1)
        .expect("dlq topic");
    let broker = KafkaBroker::builder(KafkaSettings::new(mock.bootstrap_servers()))
        .auto_create_topics(false)
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .reconnect(Backoff::reconnect_default().max_attempts(5))
        .connect()
        .await
        .expect("connect");
    lag_follows_commits(&broker, &topic, 30, 5).await;
}

/// Real Kafka only: tansu's high watermark is wrong, so its lag figures are
/// meaningless (see the README's notes on the test broker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_lag_on_real_kafka() {
    if !broker_core::testkit::backend_selected("kafka") {
        return;
    }
    if !common::real_kafka() {
        eprintln!("skipped: needs KAFKA_REAL=1 and a real Kafka (tansu reports wrong watermarks)");
        return;
    }
    let broker = common::broker().await;
    let topic = unique("kafka-test.lag");
    broker
        .create_topic_with_dlq(&topic, &common::spec())
        .await
        .expect("create topic");
    lag_follows_commits(&broker, &topic, 30, 5).await;
}

#[tokio::test]
async fn lag_of_a_missing_topic_or_bad_name_is_an_error() {
    let mock = MockCluster::new(1).expect("mock cluster");
    let broker = KafkaBroker::builder(KafkaSettings::new(mock.bootstrap_servers()))
        .auto_create_topics(false)
        .reconnect(Backoff::reconnect_default().max_attempts(2))
        .connect()
        .await
        .expect("connect");
    let bad = broker.consumer_lag("g", "bad topic!").await.unwrap_err();
    assert!(
        matches!(bad, broker_core::BrokerError::InvalidTopic(_)),
        "{bad:?}"
    );
    let missing = broker
        .consumer_lag("g", &unique("missing"))
        .await
        .unwrap_err();
    assert!(missing.to_string().contains("does not exist"), "{missing}");
}
