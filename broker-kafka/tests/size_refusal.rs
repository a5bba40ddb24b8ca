//! A message the broker refuses as over `max.message.bytes` (the topic's
//! limit, below the library's own) is a final `MessageTooLarge`, so the
//! consumer runtime keeps a dead letter refused that way as a truncated
//! copy, as on RabbitMQ.
//!
//! On librdkafka's mock cluster (always runs) the refusal is injected into
//! the next produce request; the mock cannot describe topic configs, so the
//! limit is unknown there. Against a real Kafka (`KAFKA_REAL=1`) a topic is
//! created with a small `max.message.bytes`; tansu does not enforce it.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use broker_core::config::KafkaSettings;
use broker_core::consumer::{
    DLQ_ORIGINAL_SIZE, DLQ_PUBLISH_ERROR, DLQ_TRUNCATED, TRUNCATED_LETTER_BYTES,
};
use broker_core::testkit::unique;
use broker_core::topic::dead_letter_topic;
use broker_core::{
    Backoff, BrokerError, Consumer, HandlerError, Message, Publisher, Received, Subscriber,
    Subscription,
};
use broker_kafka::{KafkaBroker, TopicSpec};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

include!("stderr_log.rs.inc");

/// The refusals librdkafka reports for a record (batch) over the limit.
const SIZE_REFUSALS: [RDKafkaRespErr; 2] = [
    RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
    RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_MSG_SIZE,
];

async fn mock_broker(
    mock: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
) -> KafkaBroker {
    KafkaBroker::builder(
        KafkaSettings::new(mock.bootstrap_servers()).client_id("size-refusal-tests"),
    )
    .auto_create_topics(false)
    .set("session.timeout.ms", "6000")
    .set("heartbeat.interval.ms", "1000")
    .reconnect(Backoff::reconnect_default().max_attempts(5))
    .connect()
    .await
    .expect("connect to the mock cluster")
}

fn mock_topic(
    mock: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
    hint: &str,
) -> String {
    let topic = unique(hint);
    mock.create_topic(&topic, 1, 1).expect("topic");
    mock.create_topic(&dead_letter_topic(&topic), 1, 1)
        .expect("dead-letter topic");
    topic
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_size_refusal_is_message_too_large_and_final() {
    stderr_log::init();
    let mock = MockCluster::new(1).expect("mock cluster");
    let topic = mock_topic(&mock, "mock.size");
    let broker = mock_broker(&mock).await;
    broker
        .publish(&topic, Message::new("warm-up"))
        .await
        .expect("a publish before the refusal");
    for code in SIZE_REFUSALS {
        mock.request_errors(RDKafkaApiKey::Produce, &[code]);
        let message = Message::new(vec![3u8; 20_000]).with_key("k");
        let size = message.encoded_len();
        let err = broker.publish(&topic, message).await.unwrap_err();
        // The mock does not describe topic configs: the limit is unknown,
        // reported as the most the broker can have allowed.
        assert!(
            matches!(err, BrokerError::MessageTooLarge { size: s, max } if s == size && max == size - 1),
            "{code:?}: {err:?}"
        );
        assert!(!err.is_transient(), "{code:?}: {err:?}");
    }
    broker
        .publish(&topic, Message::new("after"))
        .await
        .expect("later publishes are not affected");
    broker.close().await.expect("close");
}

/// Publishes a large message to `topic`, lets a handler refuse it for good,
/// and checks that the dead letter, refused as too large by the broker (how
/// is up to `refuse`), arrives on the dead-letter topic as a truncated copy,
/// once, and that the original is not handled again.
async fn dead_letter_refused_for_size_is_kept_truncated(
    broker: &KafkaBroker,
    topic: &str,
    payload_bytes: usize,
    refuse: impl FnOnce(),
) {
    let dlq = dead_letter_topic(topic);
    let original = Message::new(vec![7u8; payload_bytes]).with_key("k1");
    broker
        .publish(topic, original.clone())
        .await
        .expect("the original fits its topic");
    refuse();
    let mut letters = broker
        .subscribe(Subscription::new(&dlq, unique("audit")))
        .await
        .expect("subscribe to the dead-letter topic");
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let group = unique("g");
    let consumer = Consumer::builder(broker.clone(), topic, &group)
        .handler(move |_: Received| {
            counted.fetch_add(1, Ordering::Relaxed);
            async { Err(HandlerError::permanent("rejected by the handler")) }
        })
        .start()
        .await
        .expect("consumer");
    let letter = tokio::time::timeout(Duration::from_secs(60), letters.next())
        .await
        .expect("a letter within 60 s")
        .expect("stream open")
        .expect("delivery");
    let m = letter.message();
    assert_eq!(m.id(), original.id());
    assert_eq!(m.key(), Some(&b"k1"[..]));
    assert_eq!(m.payload().len(), TRUNCATED_LETTER_BYTES);
    let h = m.headers();
    assert_eq!(h.get_str(DLQ_TRUNCATED), Some("true"));
    let size = payload_bytes.to_string();
    assert_eq!(h.get_str(DLQ_ORIGINAL_SIZE), Some(size.as_str()));
    let why = h.get_str(DLQ_PUBLISH_ERROR).unwrap_or_default();
    assert!(why.contains("exceeds the limit"), "{why}");
    assert!(h.get_str("x-dlq-reason").is_some());
    letter.ack().await.expect("ack");
    // Acked, not redelivered: the handler ran once, and one letter came.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(calls.load(Ordering::Relaxed), 1);
    let more = tokio::time::timeout(Duration::from_secs(2), letters.next()).await;
    assert!(more.is_err(), "a second letter: {more:?}");
    consumer
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
    letters.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_refused_for_size_on_the_mock_cluster_is_kept_truncated() {
    stderr_log::init();
    let mock = MockCluster::new(1).expect("mock cluster");
    let topic = mock_topic(&mock, "mock.size-dlq");
    let broker = mock_broker(&mock).await;
    // The next produce request after the original is the dead letter's.
    dead_letter_refused_for_size_is_kept_truncated(&broker, &topic, 20_000, || {
        mock.request_errors(RDKafkaApiKey::Produce, &SIZE_REFUSALS[..1]);
    })
    .await;
    broker.close().await.expect("close");
}

/// Bytes of `max.message.bytes` on the real-Kafka topics: room for a
/// truncated dead letter (4 KiB of payload and its headers), not for the
/// 20 KB messages.
const TOPIC_LIMIT: usize = 8_192;

fn real_kafka() -> bool {
    if !broker_core::testkit::backend_selected("kafka") {
        return false;
    }
    if !common::real_kafka() {
        eprintln!(
            "skipped: needs KAFKA_REAL=1 and a real Kafka (tansu does not enforce a topic's max.message.bytes)"
        );
        return false;
    }
    true
}

/// Real Kafka only: the topic's `max.message.bytes` refuses a message the
/// library's own limit (about 1 MB) lets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_limit_refusal_on_real_kafka_is_message_too_large() {
    if !real_kafka() {
        return;
    }
    let broker = common::broker().await;
    let topic = unique("kafka-test.size");
    let small = common::spec().config("max.message.bytes", TOPIC_LIMIT.to_string());
    broker
        .create_topic_with_dlq(&topic, &small)
        .await
        .expect("create topic");
    let message = Message::new(vec![3u8; 20_000]).with_key("k");
    let size = message.encoded_len();
    assert!(size < broker.max_message_bytes());
    let err = broker.publish(&topic, message).await.unwrap_err();
    assert!(
        matches!(err, BrokerError::MessageTooLarge { size: s, max } if s == size && max == TOPIC_LIMIT),
        "{err:?}"
    );
    assert!(!err.is_transient(), "{err:?}");
    broker
        .publish(&topic, Message::new("small").with_key("k"))
        .await
        .expect("a message under the limit");
    broker.close().await.expect("close");
}

/// Real Kafka only: a dead-letter topic with a small `max.message.bytes`
/// gets the truncated copy of a letter it refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_refused_by_real_kafka_is_kept_truncated() {
    if !real_kafka() {
        return;
    }
    let broker = common::broker().await;
    let topic = unique("kafka-test.size-dlq");
    broker
        .create_topic(&topic, &common::spec())
        .await
        .expect("create topic");
    let small: TopicSpec = common::spec().config("max.message.bytes", TOPIC_LIMIT.to_string());
    broker
        .create_topic(&dead_letter_topic(&topic), &small)
        .await
        .expect("create the dead-letter topic");
    dead_letter_refused_for_size_is_kept_truncated(&broker, &topic, 20_000, || {}).await;
    broker.close().await.expect("close");
}
