//! Fault injection against librdkafka's in-process mock cluster
//! (`rdkafka::mocking::MockCluster`): no external broker, so these always run.
//!
//! The mock cluster does not implement the CreateTopics admin call: topics
//! are made with `MockCluster::create_topic` and auto-creation is off.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker_core::config::KafkaSettings;
use broker_core::testkit::{unique, Recorder};
use broker_core::{Backoff, BrokerError, Consumer, Message, Publisher};
use broker_kafka::KafkaBroker;
use rdkafka::mocking::MockCluster;

include!("stderr_log.rs.inc");

const MESSAGES: usize = 2_000;
const BATCH: usize = 50;

fn mock_broker(bootstrap: String) -> broker_kafka::KafkaBrokerBuilder {
    KafkaBroker::builder(KafkaSettings::new(bootstrap).client_id("mock-fault-tests"))
        .auto_create_topics(false)
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .reconnect(
            Backoff::reconnect_default()
                .max_attempts(20)
                .initial_delay(Duration::from_millis(100))
                .max_delay(Duration::from_secs(1)),
        )
}

/// The only broker goes down for a few seconds while messages flow, then
/// comes back: every publish that was confirmed is consumed (duplicates
/// allowed: at-least-once), and publishes made during the outage either
/// wait for the broker or fail with a transient error, never vanish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_and_up_mid_stream_loses_nothing() {
    stderr_log::init();
    let mock = MockCluster::new(1).expect("mock cluster");
    let topic = unique("mock.faults");
    mock.create_topic(&topic, 3, 1).expect("create topic");
    mock.create_topic(&format!("{topic}.dlq"), 3, 1)
        .expect("create dlq");
    let broker = mock_broker(mock.bootstrap_servers())
        .connect()
        .await
        .expect("connect to the mock cluster");

    let recorder = Recorder::default();
    let consumer = Consumer::builder(broker.clone(), &topic, unique("g"))
        .concurrency(4)
        .handler(recorder.handler())
        .start()
        .await
        .expect("consumer");

    let confirmed = Arc::new(Mutex::new(BTreeSet::new()));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let producer = {
        let (broker, topic, confirmed, failed) = (
            broker.clone(),
            topic.clone(),
            confirmed.clone(),
            failed.clone(),
        );
        tokio::spawn(async move {
            for b in 0..MESSAGES / BATCH {
                let batch: Vec<Message> = (0..BATCH)
                    .map(|i| Message::new(format!("m-{b}-{i}")).with_key(format!("k{}", i % 10)))
                    .collect();
                let ids: Vec<String> = batch.iter().map(|m| m.id().to_owned()).collect();
                match broker.publish_batch(&topic, batch).await {
                    Ok(()) => confirmed.lock().unwrap().extend(ids),
                    Err(BrokerError::Batch { failed: f, .. }) => {
                        let bad: BTreeSet<usize> = f.iter().map(|x| x.index).collect();
                        for (i, id) in ids.into_iter().enumerate() {
                            if bad.contains(&i) {
                                failed.lock().unwrap().push(id);
                            } else {
                                confirmed.lock().unwrap().insert(id);
                            }
                        }
                        assert!(
                            f.iter().all(|x| x.error.is_transient()),
                            "a publish failed permanently during the outage"
                        );
                    }
                    Err(e) => panic!("batch publish failed: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // Let traffic flow, then take the broker away mid-stream, longer than
    // the session timeout: the group drops the member, which must rejoin.
    recorder
        .wait_until(Duration::from_secs(60), "first messages handled", |s| {
            s.len() >= 200
        })
        .await;
    mock.broker_down(1).expect("broker down");
    tokio::time::sleep(Duration::from_secs(8)).await;
    mock.broker_up(1).expect("broker up");

    producer.await.expect("producer task");
    let confirmed = confirmed.lock().unwrap().clone();
    assert!(
        confirmed.len() >= MESSAGES - BATCH * 2,
        "too few publishes confirmed: {} of {MESSAGES}; failed: {}",
        confirmed.len(),
        failed.lock().unwrap().len()
    );
    recorder
        .wait_until(
            Duration::from_secs(90),
            "every confirmed message handled",
            |s| {
                let seen: BTreeSet<&str> = s.iter().map(|r| r.message.id()).collect();
                confirmed.iter().all(|id| seen.contains(id.as_str()))
            },
        )
        .await;
    consumer
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");

    let mut counts: HashMap<String, usize> = HashMap::new();
    for r in recorder.seen() {
        *counts.entry(r.message.id().to_owned()).or_default() += 1;
    }
    let duplicates = counts.values().filter(|&&c| c > 1).count();
    eprintln!(
        "confirmed {}, failed {}, handled {} distinct, {duplicates} redelivered (at-least-once)",
        confirmed.len(),
        failed.lock().unwrap().len(),
        counts.len()
    );
}

/// Nothing listens: connect retries per the policy, then says the broker is
/// unavailable, quickly and without showing credentials.
#[tokio::test]
async fn broker_down_at_start_retries_then_fails_clearly() {
    let started = std::time::Instant::now();
    let result = KafkaBroker::builder(
        KafkaSettings::new("127.0.0.1:1")
            .set("security.protocol", "sasl_plaintext")
            .set("sasl.mechanism", "PLAIN")
            .set("sasl.username", "app")
            .set("sasl.password", "s3cret-pw"),
    )
    .request_timeout(Duration::from_millis(500))
    .reconnect(
        Backoff::reconnect_default()
            .max_attempts(3)
            .initial_delay(Duration::from_millis(10)),
    )
    .connect()
    .await;
    let err = result.expect_err("nothing listens on port 1");
    assert!(
        matches!(err, BrokerError::Unavailable { attempts: 3, .. }),
        "{err:?}"
    );
    assert!(err.is_transient());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(!format!("{err} {err:?}").contains("s3cret-pw"), "{err:?}");
}

/// An unknown or malformed librdkafka setting is a configuration error
/// naming its variable; a credential's value is never shown.
#[tokio::test]
async fn bad_settings_are_config_errors() {
    let err = KafkaBroker::connect(KafkaSettings::new("127.0.0.1:1").set("linger.mss", "5"))
        .await
        .expect_err("unknown setting");
    match &err {
        BrokerError::Config(e) => assert_eq!(e.var(), "KAFKA_LINGER_MSS", "{e}"),
        other => panic!("{other:?}"),
    }
    let err = KafkaBroker::connect(KafkaSettings::new("127.0.0.1:1").set("acks", "lots"))
        .await
        .expect_err("bad value");
    assert!(matches!(err, BrokerError::Config(_)), "{err:?}");
    let settings = KafkaSettings::new("h:1").set("sasl.password", "s3cret-pw");
    assert!(!format!("{settings:?}").contains("s3cret-pw"));
}

/// During an outage a publish returns within `message.timeout.ms` plus one
/// second, single and batched, with a transient `Timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_during_an_outage_returns_within_its_timeout() {
    stderr_log::init();
    let mock = MockCluster::new(1).expect("mock cluster");
    let topic = unique("mock.outage");
    mock.create_topic(&topic, 1, 1).expect("create topic");
    let broker = mock_broker(mock.bootstrap_servers())
        .set("message.timeout.ms", "2500")
        .connect()
        .await
        .expect("connect to the mock cluster");
    broker
        .publish(&topic, Message::new("before"))
        .await
        .expect("publish while up");
    mock.broker_down(1).expect("broker down");
    let bound = Duration::from_millis(2500 + 1000);
    for round in 0..3 {
        let started = std::time::Instant::now();
        let err = broker
            .publish(&topic, Message::new(format!("during {round}")))
            .await
            .expect_err("the only broker is down");
        let elapsed = started.elapsed();
        assert!(elapsed <= bound, "publish {round} took {elapsed:?}");
        assert!(matches!(err, BrokerError::Timeout { .. }), "{err:?}");
        assert!(err.is_transient());
    }
    let started = std::time::Instant::now();
    let batch = (0..10).map(|i| Message::new(format!("b{i}"))).collect();
    let err = broker
        .publish_batch(&topic, batch)
        .await
        .expect_err("the only broker is down");
    assert!(
        started.elapsed() <= bound,
        "batch took {:?}",
        started.elapsed()
    );
    assert!(err.is_transient(), "{err:?}");
    mock.broker_up(1).expect("broker up");
}
