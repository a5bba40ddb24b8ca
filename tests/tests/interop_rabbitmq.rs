//! Interop with an independent AMQP client: messages published by pika
//! (Python) pass through our handler, the dead-letter topic, replay and a
//! bridge byte for byte, and what we publish reads right in that client.
//! Runs against the RabbitMQ at `RABBITMQ_URL` (the local node the test
//! command starts), on the `broker.test` exchange; the Python readers bind
//! exclusive queues of their own before anything is published.
//!
//! The foreign message carries every AMQP field type RabbitMQ reads (with a
//! non-UTF-8 long string, a byte array, a nested table, a list with a void
//! and a byte array in it, a float and a double, a decimal, a timestamp), the
//! key `ff fe 00 41` in `x-message-key`, and the properties content_type,
//! content_encoding, type, app_id, reply_to, priority and delivery_mode 2,
//! no message_id and no timestamp.
//!
//! What the library may add when it sends a foreign message again (and
//! nothing else may change: body, every property, every header with its
//! AMQP type and bytes):
//! - property `message_id` (the id it derived from the content) and
//!   `timestamp` (the foreign message had none, so the time it was read),
//!   with header `timestamp-ms` when that time is not a whole second;
//!   header `traceparent` (trace context);
//! - on a dead letter, the `x-dlq-*` headers, and `x-header-order` (the
//!   codec's list of header names, written because `x-dlq-*` follow the
//!   others out of name order).
//!
//! Header tables are in name order, nested tables too: lapin (our AMQP
//! client) reads a table into a sorted map, so a table sent in another order
//! comes back sorted (AMQP tables are maps; RabbitMQ gives the order no
//! meaning), and a table cannot hold a name twice. Duplicate headers are
//! Kafka's (see interop_kafka.rs); here, what our codec sends for them is
//! checked in the last test.
//!
//! `cargo nextest run -p integration-tests --all-features interop`
//! (INTEROP_PYTHON from `scripts/ensure-interop-venv.sh`).

#[path = "../interop/common.rs"]
mod common;

use std::time::Duration;

use async_trait::async_trait;
use broker_core::testkit::{backend_selected, unique};
use broker_core::{AmqpProperties, AmqpValue, Backoff, HeaderValue, Message, Publisher};
use broker_rabbitmq::{RabbitMqBroker, RabbitMqBuilder};
use bytes::Bytes;
use common::{hex, Expected, Foreign, Side, Wire};
use serde_json::{json, Value};

const EXCHANGE: &str = "broker.test";

fn url() -> String {
    std::env::var("RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// As broker-rabbitmq's tests connect; queues left behind by a test that
/// died before its clean-up expire after 10 minutes unused.
fn builder(exchange: &str) -> RabbitMqBuilder {
    RabbitMqBroker::builder(url())
        .exchange(exchange)
        .queue_expiry(Duration::from_secs(600))
        .connection_name("interop tests")
        .reconnect(
            Backoff::reconnect_default()
                .max_attempts(20)
                .initial_delay(Duration::from_millis(100))
                .max_delay(Duration::from_secs(2)),
        )
}

async fn connect(exchange: &str) -> RabbitMqBroker {
    builder(exchange).connect().await.unwrap_or_else(|e| {
        panic!(
            "RabbitMQ at {}: {e}",
            broker_core::config::SecretUrl::new(url())
        )
    })
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn long_string(bytes: &[u8]) -> Value {
    json!({"type": "S", "hex": hex(bytes)})
}

struct Rabbit;

#[async_trait(?Send)]
impl Side for Rabbit {
    type Broker = RabbitMqBroker;
    const NAME: &'static str = "rabbitmq";
    const SCRIPT: &'static str = "rabbitmq_client.py";
    const READ_TIMEOUT: Duration = Duration::from_secs(30);
    const RECEIVE_TIMEOUT: Duration = Duration::from_secs(30);
    const KEEPS_HISTORY: bool = false;
    const REPORTS_REDELIVERY: bool = true;
    const MAY_ADD_FIELDS: &'static [&'static str] = &["message_id", "timestamp"];
    const MAY_ADD_HEADERS: &'static [&'static str] = &["timestamp-ms", "traceparent"];
    const DLQ_MAY_ADD_HEADERS: &'static [&'static str] = &["x-header-order"];

    async fn connect(&self) -> RabbitMqBroker {
        connect(EXCHANGE).await
    }

    fn endpoint(&self) -> String {
        EXCHANGE.to_owned()
    }

    async fn topic(&self, hint: &str) -> String {
        unique(hint)
    }

    fn foreign(&self) -> Foreign {
        let key = [0xff, 0xfe, 0x00, 0x41];
        let payload = [0xff, 0x00, 0xfe, 0x41, 0xc3, 0x28];
        let s = |b: &[u8]| AmqpValue::LongString(Bytes::copy_from_slice(b));
        let x = |b: &[u8]| AmqpValue::ByteArray(Bytes::copy_from_slice(b));
        // (name, as sent, what the handler must see)
        let mut typed: Vec<(&str, Value, AmqpValue)> = vec![
            (
                "a-bool",
                json!({"type": "t", "value": true}),
                AmqpValue::Bool(true),
            ),
            (
                "a-byte",
                json!({"type": "b", "value": -5}),
                AmqpValue::I8(-5),
            ),
            (
                "a-ubyte",
                json!({"type": "B", "value": 200}),
                AmqpValue::U8(200),
            ),
            (
                "a-short",
                json!({"type": "s", "value": -300}),
                AmqpValue::I16(-300),
            ),
            (
                "a-ushort",
                json!({"type": "u", "value": 60000}),
                AmqpValue::U16(60000),
            ),
            (
                "a-int",
                json!({"type": "I", "value": -42}),
                AmqpValue::I32(-42),
            ),
            (
                "a-uint",
                json!({"type": "i", "value": 4_000_000_000_u32}),
                AmqpValue::U32(4_000_000_000),
            ),
            (
                // Beyond a double's precision: only an exact path keeps it.
                "a-long",
                json!({"type": "l", "value": -9_007_199_254_740_993_i64}),
                AmqpValue::I64(-9_007_199_254_740_993),
            ),
            (
                "a-float",
                json!({"type": "f", "hex": hex(&(-0.25_f32).to_be_bytes())}),
                AmqpValue::F32(-0.25),
            ),
            (
                "a-double",
                json!({"type": "d", "hex": hex(&1.1_f64.to_be_bytes())}),
                AmqpValue::F64(1.1),
            ),
            (
                "a-decimal",
                json!({"type": "D", "scale": 2, "value": 12345}),
                AmqpValue::Decimal {
                    scale: 2,
                    value: 12345,
                },
            ),
            (
                "a-timestamp",
                json!({"type": "T", "value": 1_700_000_000_u64}),
                AmqpValue::Timestamp(1_700_000_000),
            ),
            (
                "a-byte-array",
                json!({"type": "x", "hex": "fffe00"}),
                x(&[0xff, 0xfe, 0x00]),
            ),
            (
                "a-list",
                json!({"type": "A", "items": [
                    {"type": "I", "value": 1},
                    long_string(b"two"),
                    {"type": "V"},
                    {"type": "x", "hex": "ff"},
                ]}),
                AmqpValue::Array(vec![
                    AmqpValue::I32(1),
                    s(b"two"),
                    AmqpValue::Void,
                    x(&[0xff]),
                ]),
            ),
            (
                "a-table",
                json!({"type": "F", "fields": [
                    ["k1", {"type": "I", "value": 1}],
                    ["k2", long_string(b"v")],
                    ["k3", {"type": "F", "fields": [["deep", {"type": "t", "value": false}]]}],
                ]}),
                AmqpValue::Table(vec![
                    ("k1".into(), AmqpValue::I32(1)),
                    ("k2".into(), s(b"v")),
                    (
                        "k3".into(),
                        AmqpValue::Table(vec![("deep".into(), AmqpValue::Bool(false))]),
                    ),
                ]),
            ),
            ("a-void", json!({"type": "V"}), AmqpValue::Void),
            ("empty", long_string(b""), s(b"")),
            (
                "raw",
                long_string(&[0xff, 0xfe, 0x80]),
                s(&[0xff, 0xfe, 0x80]),
            ),
            (
                "text",
                long_string("h\u{e9}llo".as_bytes()),
                s("h\u{e9}llo".as_bytes()),
            ),
        ];
        typed.sort_by(|a, b| a.0.cmp(b.0));
        let mut wire_headers: Vec<(String, Value)> = typed
            .iter()
            .map(|(n, v, _)| ((*n).to_owned(), v.clone()))
            .collect();
        wire_headers.push(("x-message-key".to_owned(), long_string(&key)));
        let wire = Wire {
            fields: [
                ("body", json!(hex(&payload))),
                ("content_type", json!("application/x-interop")),
                ("content_encoding", json!("x-interop-encoding")),
                ("type", json!("interop.thing.happened")),
                ("app_id", json!("interop-python")),
                ("reply_to", json!("interop.replies")),
                ("priority", json!(7)),
                ("delivery_mode", json!(2)),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
            headers: Some(wire_headers),
            meta: Value::Null,
        };
        let expected = Expected {
            payload: payload.to_vec(),
            key: Some(key.to_vec()),
            headers: typed
                .into_iter()
                .map(|(n, _, v)| (n.to_owned(), HeaderValue::from(v)))
                .collect(),
            content_type: Some("application/x-interop".to_owned()),
            traceparent: None,
            amqp: Some(AmqpProperties {
                content_encoding: Some("x-interop-encoding".to_owned()),
                kind: Some("interop.thing.happened".to_owned()),
                app_id: Some("interop-python".to_owned()),
                reply_to: Some("interop.replies".to_owned()),
                priority: Some(7),
                // Persistent (2) is what the library always sends: not kept.
                ..Default::default()
            }),
            timestamp_ms: None,
        };
        Foreign { wire, expected }
    }

    fn produce_request(&self, endpoint: &str, topic: &str, records: &[Wire]) -> Value {
        json!({
            "url": url(),
            "exchange": endpoint,
            "routing_key": topic,
            "messages": records.iter().map(Wire::to_json).collect::<Vec<_>>(),
        })
    }

    fn read_request(&self, endpoint: &str, topic: &str, count: usize) -> Value {
        json!({
            "url": url(),
            "exchange": endpoint,
            "routing_key": topic,
            "count": count,
            "timeout_s": Self::READ_TIMEOUT.as_secs(),
        })
    }

    fn wire_id(&self, wire: &Wire) -> Option<String> {
        wire.fields
            .get("message_id")
            .and_then(Value::as_str)
            .map(str::to_owned)
    }

    fn wire_content_type(&self, wire: &Wire) -> Option<String> {
        wire.fields
            .get("content_type")
            .and_then(Value::as_str)
            .map(str::to_owned)
    }

    fn wire_key(&self, wire: &Wire) -> Option<Vec<u8>> {
        let v = wire
            .header_all(broker_rabbitmq::KEY_HEADER)
            .into_iter()
            .next()?;
        assert_eq!(v["type"], "S", "the key travels as a long string: {v}");
        Some(unhex(v["hex"].as_str()?))
    }

    fn wire_payload(&self, wire: &Wire) -> Vec<u8> {
        unhex(wire.fields["body"].as_str().expect("body"))
    }

    fn text_header(&self, value: &str) -> Value {
        long_string(value.as_bytes())
    }

    fn cleanup(&self, subscriptions: &[(String, String)], topics: &[String], exchanges: &[String]) {
        // The queues our library declared for these groups (its naming,
        // `{topic}:{group}`) and the dead-letter queue of each topic
        // (missing ones are fine), and the bridge's exchange. Blocking: this
        // runs from Drop.
        let queues: Vec<String> = subscriptions
            .iter()
            .map(|(t, g)| format!("{t}:{g}"))
            .chain(topics.iter().map(|t| format!("{t}.dlq")))
            .collect();
        let request = json!({"url": url(), "queues": queues, "exchanges": exchanges});
        let run = || -> std::io::Result<std::process::Output> {
            use std::io::Write;
            let mut child = std::process::Command::new(common::python())
                .arg(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/interop/rabbitmq_client.py"
                ))
                .arg("cleanup")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()?;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(request.to_string().as_bytes())?;
            child.wait_with_output()
        };
        match run() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "rabbitmq clean-up failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("rabbitmq clean-up failed: {e}"),
        }
    }
}

/// Skips when the run leaves RabbitMQ out; fails when the Python client is missing.
fn selected() -> bool {
    if !backend_selected("rabbitmq") {
        return false;
    }
    common::python();
    true
}

/// (a) exact bytes, AMQP types and properties reach the handler; (b) the
/// derived id is stable across retries, groups and a broker redelivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_rabbitmq_foreign_message_through_handler() {
    if !selected() {
        return;
    }
    common::foreign_message_through_handler(&Rabbit).await;
}

/// (c) dead letter and (d) replay, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_rabbitmq_dead_letter_and_replay() {
    if !selected() {
        return;
    }
    common::dead_letter_and_replay(&Rabbit).await;
}

/// (e) bridge to another exchange on the same node (another namespace: the
/// bridge republishes to the same topic name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_rabbitmq_bridge_to_another_exchange() {
    if !selected() {
        return;
    }
    let topic = Rabbit.topic("interop.bridge").await;
    let exchange = unique("interop.bridge-target");
    let target = connect(&exchange).await;
    common::bridge_to_same_kind(&Rabbit, &topic, target, &exchange, vec![exchange.clone()]).await;
}

/// (f) our messages as another client reads them: the content type is the
/// AMQP `content_type` property; and what our codec sends for headers that
/// AMQP tables cannot hold as they are (a repeated name, another order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_rabbitmq_our_messages_read_by_another_client() {
    if !selected() {
        return;
    }
    let (message, plain, typed) = common::our_publisher_to_independent_reader(&Rabbit).await;
    assert_eq!(plain.fields["delivery_mode"], json!(2), "persistent");
    assert_eq!(plain.fields["correlation_id"], json!("interop-corr"));
    assert_eq!(
        plain.fields["timestamp"],
        json!(message.timestamp_millis() / 1000),
        "AMQP timestamp in seconds"
    );
    assert_eq!(plain.header_all("h"), [&long_string(b"v")]);
    assert_eq!(typed.fields["delivery_mode"], json!(2));

    // Duplicates and order: the values of a repeated name as an array, the
    // order in `x-header-order`.
    let broker = Rabbit.connect().await;
    let topic = Rabbit.topic("interop.publish-dup").await;
    let reader = common::reader(&Rabbit, EXCHANGE, &topic, 1, "duplicates").await;
    let m = Message::new("d")
        .with_header("dup", "1")
        .with_header("a", &[0xff][..])
        .with_header("dup", "2");
    broker
        .publish(&topic, m)
        .await
        .unwrap_or_else(|e| panic!("publish: {e}"));
    let got = reader.one().await;
    assert_eq!(
        got.header_all("dup"),
        [&json!({"type": "A", "items": [long_string(b"1"), long_string(b"2")]})]
    );
    assert_eq!(got.header_all("a"), [&long_string(&[0xff])]);
    assert_eq!(
        got.header_all("x-header-order"),
        [
            &json!({"type": "A", "items": [long_string(b"dup"), long_string(b"a"), long_string(b"dup")]})
        ]
    );
}
