//! Interop with an independent Kafka client: records produced by
//! confluent-kafka (Python, its own librdkafka) pass through our handler,
//! the dead-letter topic, replay and a bridge byte for byte, and what we
//! publish reads right in that client. Runs against the test broker at
//! `KAFKA_BROKERS` (tansu from `scripts/ensure-tansu.sh`); the bridge's
//! second Kafka is librdkafka's in-process mock cluster, which the Python
//! client reaches over TCP like any broker.
//!
//! What the library may add when it sends a foreign record again (and
//! nothing else may change: key, value, timestamp, every header in order
//! with duplicates, empty and null values):
//! - header `message-id` (the id it derived from topic/partition/offset),
//!   written first, and `traceparent` (trace context);
//! - on a dead letter, the `x-dlq-*` headers after the record's own.
//!
//! The foreign record's `content-type` header comes first and its
//! `traceparent` last: the codec lifts reserved headers (`message-id`,
//! `correlation-id`, `traceparent`, `content-type`) into the message's
//! fields; one that comes after the application's headers also stays among
//! them in its place, so both go out again where they were.
//!
//! `cargo nextest run -p integration-tests --all-features interop`
//! (INTEROP_PYTHON from `scripts/ensure-interop-venv.sh`).

#[path = "../interop/common.rs"]
mod common;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

use std::time::Duration;

use async_trait::async_trait;
use broker_core::config::KafkaSettings;
use broker_core::testkit::{backend_selected, unique};
use broker_core::{Backoff, HeaderValue};
use broker_kafka::{KafkaBroker, KafkaBrokerBuilder, TopicSpec};
use common::{hex, Expected, Foreign, Side, Wire};
use rdkafka::mocking::MockCluster;
use serde_json::{json, Value};

fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

fn spec() -> TopicSpec {
    TopicSpec::default().partitions(3).replication_factor(1)
}

/// As broker-kafka's tests connect: a short session timeout for tansu's
/// slow first group join.
fn builder(bootstrap: &str) -> KafkaBrokerBuilder {
    KafkaBroker::builder(KafkaSettings::new(bootstrap).client_id("interop-tests"))
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .topic_spec(spec())
        .reconnect(
            Backoff::reconnect_default()
                .max_attempts(5)
                .initial_delay(Duration::from_millis(100))
                .max_delay(Duration::from_secs(1)),
        )
}

fn unhex(v: &Value) -> Option<Vec<u8>> {
    let s = v.as_str()?;
    Some(
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect(),
    )
}

struct Kafka;

#[async_trait(?Send)]
impl Side for Kafka {
    type Broker = KafkaBroker;
    const NAME: &'static str = "kafka";
    const SCRIPT: &'static str = "kafka_client.py";
    const READ_TIMEOUT: Duration = Duration::from_secs(60);
    const RECEIVE_TIMEOUT: Duration = Duration::from_secs(60);
    const KEEPS_HISTORY: bool = true;
    // Kafka has no redelivery flag (README).
    const REPORTS_REDELIVERY: bool = false;
    const MAY_ADD_FIELDS: &'static [&'static str] = &[];
    const MAY_ADD_HEADERS: &'static [&'static str] = &["message-id", "traceparent"];
    const DLQ_MAY_ADD_HEADERS: &'static [&'static str] = &["x-dlq-partition", "x-dlq-offset"];

    async fn connect(&self) -> KafkaBroker {
        builder(&brokers()).connect().await.unwrap_or_else(|e| {
            panic!(
                "no Kafka broker at {} ({e}); start one with `bash scripts/ensure-tansu.sh start`",
                brokers()
            )
        })
    }

    fn endpoint(&self) -> String {
        brokers()
    }

    async fn topic(&self, hint: &str) -> String {
        let topic = unique(hint);
        self.connect()
            .await
            .create_topic_with_dlq(&topic, &spec())
            .await
            .unwrap_or_else(|e| panic!("create topic {topic}: {e}"));
        topic
    }

    fn foreign(&self) -> Foreign {
        let key = [0xff, 0xfe, 0x00, 0x41];
        let payload = [0xff, 0x00, 0xfe, 0x41, 0xc3, 0x28];
        let timestamp = 1_700_000_000_123_i64;
        let content_type = "application/x-interop";
        let headers: [(&str, Option<&[u8]>); 8] = [
            ("content-type", Some(content_type.as_bytes())),
            ("raw", Some(&[0xff, 0xfe, 0x80])),
            ("dup", Some(b"1")),
            ("empty", Some(b"")),
            ("null", None),
            ("dup", Some(b"2")),
            ("z-last", Some(&[0xc3, 0x28])),
            // Appended last, as OpenTelemetry's clients do.
            ("traceparent", Some(TRACEPARENT.as_bytes())),
        ];
        let wire = Wire {
            fields: [
                ("key".to_owned(), json!(hex(&key))),
                ("value".to_owned(), json!(hex(&payload))),
                ("timestamp".to_owned(), json!(timestamp)),
            ]
            .into(),
            headers: Some(
                headers
                    .iter()
                    .map(|(n, v)| ((*n).to_owned(), json!(v.map(hex))))
                    .collect(),
            ),
            meta: Value::Null,
        };
        let expected = Expected {
            payload: payload.to_vec(),
            key: Some(key.to_vec()),
            headers: headers[1..]
                .iter()
                .map(|(n, v)| {
                    (
                        (*n).to_owned(),
                        v.map_or(HeaderValue::Null, HeaderValue::from),
                    )
                })
                .collect(),
            content_type: Some(content_type.to_owned()),
            traceparent: Some(TRACEPARENT.to_owned()),
            amqp: None,
            timestamp_ms: Some(timestamp),
        };
        Foreign { wire, expected }
    }

    fn produce_request(&self, endpoint: &str, topic: &str, records: &[Wire]) -> Value {
        json!({
            "brokers": endpoint,
            "topic": topic,
            "records": records.iter().map(Wire::to_json).collect::<Vec<_>>(),
        })
    }

    fn read_request(&self, endpoint: &str, topic: &str, count: usize) -> Value {
        json!({
            "brokers": endpoint,
            "topic": topic,
            "count": count,
            "timeout_s": Self::READ_TIMEOUT.as_secs(),
        })
    }

    fn wire_id(&self, wire: &Wire) -> Option<String> {
        let v = wire.header_all("message-id").into_iter().next()?;
        String::from_utf8(unhex(v)?).ok()
    }

    fn wire_content_type(&self, wire: &Wire) -> Option<String> {
        let v = wire.header_all("content-type").into_iter().next()?;
        String::from_utf8(unhex(v)?).ok()
    }

    fn wire_key(&self, wire: &Wire) -> Option<Vec<u8>> {
        unhex(&wire.fields["key"])
    }

    fn wire_payload(&self, wire: &Wire) -> Vec<u8> {
        unhex(&wire.fields["value"]).unwrap_or_default()
    }

    fn text_header(&self, value: &str) -> Value {
        json!(hex(value.as_bytes()))
    }

    fn cleanup(&self, _: &[(String, String)], _: &[String], _: &[String]) {
        // tansu keeps topics in memory only; group offsets go with them.
    }
}

/// Skips when the run leaves Kafka out; fails when the Python client is missing.
fn selected() -> bool {
    if !backend_selected("kafka") {
        return false;
    }
    common::python();
    true
}

/// (a) exact bytes, order, duplicates, empty and null header values reach
/// the handler; (b) the derived id is stable across retries, groups and a
/// redelivery after an unacked close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_kafka_foreign_record_through_handler() {
    if !selected() {
        return;
    }
    common::foreign_message_through_handler(&Kafka).await;
}

/// (c) dead letter and (d) replay, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_kafka_dead_letter_and_replay() {
    if !selected() {
        return;
    }
    common::dead_letter_and_replay(&Kafka).await;
}

/// (e) bridge from the test broker to a second Kafka (the mock cluster).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_kafka_bridge_to_another_kafka() {
    if !selected() {
        return;
    }
    let topic = Kafka.topic("interop.bridge").await;
    let mock = MockCluster::new(1).expect("librdkafka mock cluster");
    mock.create_topic(&topic, 3, 1)
        .expect("create the topic on the mock cluster");
    let bootstrap = mock.bootstrap_servers();
    // The mock cluster does not implement CreateTopics: topics made above.
    let target = builder(&bootstrap)
        .auto_create_topics(false)
        .connect()
        .await
        .expect("connect to the mock cluster");
    common::bridge_to_same_kind(&Kafka, &topic, target, &bootstrap, vec![]).await;
    drop(mock);
}

/// (f) our records as another client reads them: the content type is the
/// `content-type` header, the reserved headers come first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_kafka_our_records_read_by_another_client() {
    if !selected() {
        return;
    }
    let (message, plain, typed) = common::our_publisher_to_independent_reader(&Kafka).await;
    let names =
        |w: &Wire| -> Vec<String> { w.headers.iter().flatten().map(|(n, _)| n.clone()).collect() };
    assert_eq!(
        names(&plain),
        ["message-id", "correlation-id", "content-type", "h"],
        "headers of {plain:?}"
    );
    assert_eq!(plain.header_all("h"), [&json!(hex(b"v"))]);
    assert_eq!(
        plain.header_all("correlation-id"),
        [&json!(hex(b"interop-corr"))]
    );
    assert_eq!(
        plain.fields["timestamp"],
        json!(message.timestamp_millis()),
        "record timestamp = message timestamp"
    );
    assert_eq!(names(&typed), ["message-id", "content-type"]);
}
