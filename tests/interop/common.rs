//! What the Kafka and RabbitMQ interop tests share: running the independent
//! Python clients (`tests/interop/*.py`, in the venv that
//! `scripts/ensure-interop-venv.sh` makes; `INTEROP_PYTHON` names its
//! python), comparing raw records byte for byte, and the scenarios
//! themselves, written once over [`Side`].
//!
//! A raw record ([`Wire`]) is what the Python client produced or read, in one
//! shape for both brokers: `fields` (Kafka: key, value, timestamp; RabbitMQ:
//! the body and every AMQP property that is set), `headers` in wire order
//! with duplicates (Kafka: hex or null; RabbitMQ: typed AMQP values with
//! their exact bytes), and `meta` (where it was read; never compared).
//! Comparing two `Wire`s compares every byte the broker carried.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use broker_core::migrate::{bridge, replay_dead_letters};
use broker_core::testkit::{fast_retry, unique, Recorder};
use broker_core::{
    AmqpProperties, Consumer, HandlerError, HeaderValue, Message, Publisher, Received, Subscriber,
    Subscription,
};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// The headers every dead letter gets (README, "Dead letters").
pub const DLQ_HEADERS: [&str; 6] = [
    "x-dlq-reason",
    "x-dlq-error-kind",
    "x-dlq-original-topic",
    "x-dlq-attempts",
    "x-dlq-group",
    "x-dlq-failed-at-ms",
];

/// The venv's python: set by the test command. Not a skip: a run that
/// selected this backend must run these tests.
pub fn python() -> PathBuf {
    match std::env::var_os("INTEROP_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!(
            "INTEROP_PYTHON is not set: the interop tests run independent Python clients. \
             Run `bash scripts/ensure-interop-venv.sh` and export the INTEROP_PYTHON it prints \
             (`bash scripts/test.sh` does both), or leave this backend out of \
             BROKER_TEST_BACKENDS to skip these tests"
        ),
    }
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("interop")
        .join(name)
}

/// `stderr`: piped for a run whose output is collected at the end; inherited
/// for a long-lived reader (nothing drains a pipe while it runs, and a full
/// one would stall it), so its messages appear in the test's output.
fn spawn(script_name: &str, command: &str, stderr: Stdio) -> Child {
    let python = python();
    Command::new(&python)
        .arg(script(script_name))
        .arg(command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("start {} {script_name}: {e}", python.display()))
}

async fn send_request(child: &mut Child, request: &Value) {
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin
        .write_all(request.to_string().as_bytes())
        .await
        .expect("write the request to the python client");
    drop(stdin);
}

/// Runs `script command` with `request` on stdin; its last stdout line, as JSON.
pub async fn run(script_name: &str, command: &str, request: &Value, timeout: Duration) -> Value {
    let mut child = spawn(script_name, command, Stdio::piped());
    send_request(&mut child, request).await;
    let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(out) => out.unwrap_or_else(|e| panic!("{script_name} {command}: {e}")),
        Err(_) => panic!("{script_name} {command}: no answer within {timeout:?}"),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{script_name} {command} failed ({}):\n{}\n{}",
        output.status,
        stdout,
        String::from_utf8_lossy(&output.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("{script_name} {command}: answer {last:?} is not JSON: {e}"))
}

/// A Python reader that is already listening (RabbitMQ: its queue is bound),
/// collecting up to `count` records until its timeout.
pub struct Reader {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    what: String,
    timeout: Duration,
}

impl Reader {
    /// Starts `script read` and waits for its `{"ready": true}` line.
    pub async fn start(script_name: &str, request: Value, what: &str) -> Reader {
        let timeout = Duration::from_secs_f64(request["timeout_s"].as_f64().expect("timeout_s"))
            + Duration::from_secs(20);
        let mut child = spawn(script_name, "read", Stdio::inherit());
        send_request(&mut child, &request).await;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut reader = Reader {
            child,
            lines: BufReader::new(stdout).lines(),
            what: what.to_owned(),
            timeout,
        };
        let ready = reader.line().await;
        assert_eq!(ready["ready"], true, "{what}: reader said {ready}");
        reader
    }

    async fn line(&mut self) -> Value {
        let what = &self.what;
        let line = match tokio::time::timeout(self.timeout, self.lines.next_line()).await {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => {
                panic!("{what}: the python reader ended without answering (its stderr is above)")
            }
            Ok(Err(e)) => panic!("{what}: reading the python reader: {e}"),
            Err(_) => panic!(
                "{what}: the python reader said nothing within {:?}",
                self.timeout
            ),
        };
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{what}: reader line {line:?} is not JSON: {e}"))
    }

    /// Every record it read (at most the `count` asked for).
    pub async fn records(mut self) -> Vec<Wire> {
        let answer = self.line().await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        answer["records"]
            .as_array()
            .unwrap_or_else(|| panic!("{}: no records in {answer}", self.what))
            .iter()
            .map(Wire::from_json)
            .collect()
    }

    /// Exactly one record, or a panic naming what was expected.
    pub async fn one(self) -> Wire {
        let what = self.what.clone();
        let mut records = self.records().await;
        assert_eq!(
            records.len(),
            1,
            "{what}: expected exactly one record, read {}",
            records.len()
        );
        records.remove(0)
    }
}

/// One raw record or message as the Python clients write and read it.
#[derive(Clone, Debug, PartialEq)]
pub struct Wire {
    /// Compared: Kafka key/value/timestamp, RabbitMQ body and properties.
    pub fields: BTreeMap<String, Value>,
    /// In wire order, duplicates kept; `None`: no header table at all.
    pub headers: Option<Vec<(String, Value)>>,
    /// Where it was read (partition, offset, routing key...); not compared.
    pub meta: Value,
}

impl Wire {
    pub fn from_json(v: &Value) -> Wire {
        let fields = v["fields"]
            .as_object()
            .unwrap_or_else(|| panic!("no fields in {v}"))
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let headers = v["headers"].as_array().map(|hs| {
            hs.iter()
                .map(|h| (h[0].as_str().expect("header name").to_owned(), h[1].clone()))
                .collect()
        });
        Wire {
            fields,
            headers,
            meta: v["meta"].clone(),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "fields": self.fields,
            "headers": self.headers.as_ref().map(|hs| {
                hs.iter().map(|(n, v)| json!([n, v])).collect::<Vec<_>>()
            }),
        })
    }

    /// Every value of header `name`, in order.
    pub fn header_all(&self, name: &str) -> Vec<&Value> {
        self.headers
            .iter()
            .flatten()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v)
            .collect()
    }
}

/// Hex of bytes, as the Python clients write them.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the library added to a record (see [`assert_same_except`]).
#[derive(Debug, Default)]
pub struct Added {
    pub fields: BTreeMap<String, Value>,
    pub headers: Vec<(String, Value)>,
}

impl Added {
    pub fn header(&self, name: &str) -> Option<&Value> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
}

/// Asserts that `got` carries every byte of `original`: every field of
/// `original` unchanged, and its headers, once the headers named in
/// `may_add_headers` that `original` does not have are taken out, equal to
/// `original`'s (same names, values, types, order and duplicates). `got` may
/// have more fields only when named in `may_add_fields`. Returns what was
/// added.
pub fn assert_same_except(
    what: &str,
    original: &Wire,
    got: &Wire,
    may_add_fields: &[&str],
    may_add_headers: &[&str],
) -> Added {
    let mut added = Added::default();
    for (name, value) in &original.fields {
        assert_eq!(
            got.fields.get(name),
            Some(value),
            "{what}: field `{name}` changed\n original: {original:?}\n      got: {got:?}"
        );
    }
    for (name, value) in &got.fields {
        if !original.fields.contains_key(name) {
            assert!(
                may_add_fields.contains(&name.as_str()),
                "{what}: field `{name}` = {value} was added (only {may_add_fields:?} may be)\n \
                 original: {original:?}\n      got: {got:?}"
            );
            added.fields.insert(name.clone(), value.clone());
        }
    }
    let original_names: Vec<&str> = original
        .headers
        .iter()
        .flatten()
        .map(|(n, _)| n.as_str())
        .collect();
    let mut kept = Vec::new();
    for (name, value) in got.headers.iter().flatten() {
        if may_add_headers.contains(&name.as_str()) && !original_names.contains(&name.as_str()) {
            added.headers.push((name.clone(), value.clone()));
        } else {
            kept.push((name.clone(), value.clone()));
        }
    }
    let original_headers = original.headers.clone().unwrap_or_default();
    assert_eq!(
        kept, original_headers,
        "{what}: headers differ (after taking out the added {:?}; allowed to add: {may_add_headers:?})",
        added.headers
    );
    added
}

/// What the handler must see of a foreign message.
#[derive(Clone, Debug)]
pub struct Expected {
    pub payload: Vec<u8>,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, HeaderValue)>,
    pub content_type: Option<String>,
    pub traceparent: Option<String>,
    pub amqp: Option<AmqpProperties>,
    pub timestamp_ms: Option<i64>,
}

/// Asserts `message` is exactly `expected` (bytes, header order, duplicates,
/// types, properties) and has a UUID id.
pub fn assert_message(what: &str, message: &Message, expected: &Expected) {
    assert_eq!(
        message.payload().as_ref(),
        &expected.payload[..],
        "{what}: payload"
    );
    assert_eq!(message.key(), expected.key.as_deref(), "{what}: key()");
    let headers: Vec<(String, HeaderValue)> = message
        .headers()
        .iter()
        .map(|(n, v)| (n.to_owned(), v.clone()))
        .collect();
    assert_eq!(
        headers, expected.headers,
        "{what}: headers() (order, duplicates, bytes, types)"
    );
    assert_eq!(
        message.content_type(),
        expected.content_type.as_deref(),
        "{what}: content_type()"
    );
    assert_eq!(message.amqp(), expected.amqp.as_ref(), "{what}: amqp()");
    if let Some(ms) = expected.timestamp_ms {
        assert_eq!(message.timestamp_millis(), ms, "{what}: timestamp");
    }
    assert_eq!(message.correlation_id(), None, "{what}: correlation_id()");
    assert_eq!(
        message.traceparent(),
        expected.traceparent.as_deref(),
        "{what}: traceparent()"
    );
    assert!(
        message.id().len() == 36 && message.id().chars().filter(|c| *c == '-').count() == 4,
        "{what}: id {:?} is not a UUID",
        message.id()
    );
}

/// A foreign message: what the Python client produces, and what our
/// handler must see of it.
pub struct Foreign {
    pub wire: Wire,
    pub expected: Expected,
}

/// One broker kind as the scenarios need it.
#[async_trait(?Send)]
pub trait Side {
    /// The library's backend.
    type Broker: Publisher + Subscriber + Clone + 'static;
    /// `kafka` or `rabbitmq` (as in `BROKER_TEST_BACKENDS`).
    const NAME: &'static str;
    /// The Python client under tests/interop/.
    const SCRIPT: &'static str;
    /// How long a Python reader waits for its records.
    const READ_TIMEOUT: Duration;
    /// How long our consumers may take to see a message (Kafka group joins
    /// take seconds on the test broker).
    const RECEIVE_TIMEOUT: Duration;
    /// Kafka keeps a topic's records (a reader from the beginning sees the
    /// old ones too); RabbitMQ hands a bound queue only what comes after.
    const KEEPS_HISTORY: bool;
    /// Whether a delivery after a closed subscription is flagged redelivered.
    const REPORTS_REDELIVERY: bool;
    /// Fields the library may add when it sends a foreign message again.
    const MAY_ADD_FIELDS: &'static [&'static str];
    /// Headers the library may add when it sends a foreign message again.
    const MAY_ADD_HEADERS: &'static [&'static str];
    /// Headers besides `x-dlq-*` that a dead letter may add.
    const DLQ_MAY_ADD_HEADERS: &'static [&'static str];

    /// The library's backend on the test broker.
    async fn connect(&self) -> Self::Broker;
    /// The test broker's address for the Python client (Kafka bootstrap
    /// servers; RabbitMQ exchange).
    fn endpoint(&self) -> String;
    /// A fresh topic, created with its dead-letter topic where needed.
    async fn topic(&self, hint: &str) -> String;
    /// The foreign message of the scenarios.
    fn foreign(&self) -> Foreign;
    /// The produce request for `topic` at `endpoint`.
    fn produce_request(&self, endpoint: &str, topic: &str, records: &[Wire]) -> Value;
    /// The read request for `count` records of `topic` at `endpoint`.
    fn read_request(&self, endpoint: &str, topic: &str, count: usize) -> Value;
    /// The message id a record carries on the wire.
    fn wire_id(&self, wire: &Wire) -> Option<String>;
    /// The content type a record carries on the wire.
    fn wire_content_type(&self, wire: &Wire) -> Option<String>;
    /// The key a record carries on the wire.
    fn wire_key(&self, wire: &Wire) -> Option<Vec<u8>>;
    /// The payload a record carries.
    fn wire_payload(&self, wire: &Wire) -> Vec<u8>;
    /// The value of a text header as the library writes it (Kafka: bytes;
    /// RabbitMQ: a long string).
    fn text_header(&self, value: &str) -> Value;
    /// Deletes what a test made on the broker: the queues of
    /// `subscriptions` (topic, group), the dead-letter queues of `topics`,
    /// `exchanges`. Nothing to do on Kafka.
    fn cleanup(&self, subscriptions: &[(String, String)], topics: &[String], exchanges: &[String]);
}

/// Deletes a test's broker objects when it ends, also when it fails.
pub struct Cleanup<'a, S: Side> {
    pub side: &'a S,
    pub subscriptions: Vec<(String, String)>,
    pub topics: Vec<String>,
    pub exchanges: Vec<String>,
}

impl<'a, S: Side> Cleanup<'a, S> {
    /// Clean-up of `groups` on `topic` (and the topic's dead letters).
    pub fn new(side: &'a S, topic: &str, groups: &[&str]) -> Self {
        Cleanup {
            side,
            subscriptions: groups
                .iter()
                .map(|g| (topic.to_owned(), (*g).to_owned()))
                .collect(),
            topics: vec![topic.to_owned()],
            exchanges: vec![],
        }
    }
}

impl<S: Side> Drop for Cleanup<'_, S> {
    fn drop(&mut self) {
        self.side
            .cleanup(&self.subscriptions, &self.topics, &self.exchanges);
    }
}

/// Produces `records` to `topic` at `endpoint` with the Python client.
pub async fn produce<S: Side>(side: &S, endpoint: &str, topic: &str, records: &[Wire]) -> Value {
    run(
        S::SCRIPT,
        "produce",
        &side.produce_request(endpoint, topic, records),
        Duration::from_secs(60),
    )
    .await
}

/// A Python reader of `count` records of `topic` at `endpoint`, listening.
pub async fn reader<S: Side>(
    side: &S,
    endpoint: &str,
    topic: &str,
    count: usize,
    what: &str,
) -> Reader {
    Reader::start(
        S::SCRIPT,
        side.read_request(endpoint, topic, count),
        &format!("{} {what}", S::NAME),
    )
    .await
}

/// The records of `reader` that are not among `before` (records read
/// earlier from a Kafka topic, told apart by partition and offset):
/// exactly one.
async fn the_new_one(reader: Reader, before: &[Wire], what: &str) -> Wire {
    let mut fresh: Vec<Wire> = reader
        .records()
        .await
        .into_iter()
        .filter(|r| !before.iter().any(|b| b.meta == r.meta))
        .collect();
    assert_eq!(fresh.len(), 1, "{what}: expected one new record: {fresh:?}");
    fresh.remove(0)
}

/// A consumer of `topic` in `group` whose handler records what it sees and
/// answers with `outcome(attempt)`.
async fn recording_consumer<S: Side>(
    broker: &S::Broker,
    topic: &str,
    group: &str,
    outcome: impl Fn(u32) -> Result<(), HandlerError> + Send + Sync + 'static,
) -> (broker_core::ConsumerHandle, Recorder) {
    let recorder = Recorder::default();
    let rec = recorder.clone();
    let outcome = Arc::new(outcome);
    let consumer = Consumer::builder(broker.clone(), topic, group)
        .retry(fast_retry(3))
        .handler(move |r: Received| {
            let attempt = r.attempt;
            rec.record(r);
            let result = outcome(attempt);
            async move { result }
        })
        .start()
        .await
        .unwrap_or_else(|e| panic!("{}: consumer of {topic}: {e}", S::NAME));
    (consumer, recorder)
}

async fn next_delivery(
    stream: &mut Box<dyn broker_core::DeliveryStream>,
    timeout: Duration,
    what: &str,
) -> broker_core::Delivery {
    match tokio::time::timeout(timeout, stream.next()).await {
        Ok(Some(Ok(d))) => d,
        Ok(Some(Err(e))) => panic!("{what}: subscription failed: {e}"),
        Ok(None) => panic!("{what}: subscription ended"),
        Err(_) => panic!("{what}: nothing delivered within {timeout:?}"),
    }
}

fn same_content(what: &str, a: &Message, b: &Message) {
    assert_eq!(a.id(), b.id(), "{what}: id");
    assert_eq!(a.payload(), b.payload(), "{what}: payload");
    assert_eq!(a.key(), b.key(), "{what}: key");
    assert_eq!(a.headers(), b.headers(), "{what}: headers");
    assert_eq!(a.content_type(), b.content_type(), "{what}: content type");
    assert_eq!(a.amqp(), b.amqp(), "{what}: AMQP properties");
}

/// Scenarios (a) and (b): a message from another client reaches our
/// handler exactly (bytes, header order and duplicates, AMQP types and
/// properties), and keeps its derived id when the handler fails once
/// (in-place retry), in a second group, and when a subscription that did not
/// ack is closed and the broker delivers it again.
pub async fn foreign_message_through_handler<S: Side>(side: &S) {
    let name = S::NAME;
    let broker = side.connect().await;
    let topic = side.topic("interop.foreign").await;
    let (g1, g2) = (unique("interop-handler"), unique("interop-raw"));
    let _cleanup = Cleanup::new(side, &topic, &[&g1, &g2]);
    let foreign = side.foreign();

    // Both groups subscribe before the message exists (RabbitMQ keeps
    // nothing for a group whose queue is not there yet).
    let mut raw = broker
        .subscribe(Subscription::new(&topic, &g2))
        .await
        .unwrap_or_else(|e| panic!("{name}: subscribe {g2}: {e}"));
    let (consumer, recorder) =
        recording_consumer::<S>(&broker, &topic, &g1, |attempt| match attempt {
            1 => Err(HandlerError::retryable("interop: fails once on purpose")),
            _ => Ok(()),
        })
        .await;
    let check = reader(side, &side.endpoint(), &topic, 1, "original as produced").await;

    produce(
        side,
        &side.endpoint(),
        &topic,
        std::slice::from_ref(&foreign.wire),
    )
    .await;

    // The independent client reads back what it produced: the tools are exact.
    let as_produced = check.one().await;
    assert_same_except(
        &format!("{name}: the python client's own round trip"),
        &foreign.wire,
        &as_produced,
        &[],
        &[],
    );

    recorder
        .wait_until(
            S::RECEIVE_TIMEOUT,
            &format!("{name}: handler attempts"),
            |s| s.len() >= 2,
        )
        .await;
    let seen = recorder.seen();
    assert_eq!(seen.len(), 2, "{name}: one failure, one success: {seen:?}");
    let first = &seen[0].message;
    assert_message(
        &format!("{name}: handler, attempt 1"),
        first,
        &foreign.expected,
    );
    assert_eq!(&*seen[0].topic, topic.as_str());
    assert_eq!(seen[1].attempt, 2, "{name}: the retry is attempt 2");
    same_content(
        &format!("{name}: retried in place"),
        first,
        &seen[1].message,
    );
    let id = first.id().to_owned();

    // (b) another group: the same id.
    let d = next_delivery(&mut raw, S::RECEIVE_TIMEOUT, &format!("{name}: group {g2}")).await;
    same_content(&format!("{name}: second group"), first, d.message());
    assert!(
        !d.received.redelivered,
        "{name}: first delivery flagged as redelivered"
    );
    // Not acked: closing the subscription gives it back to the broker, which
    // delivers it again (RabbitMQ requeues it; Kafka re-reads the
    // uncommitted offset) and it is decoded anew: still the same id.
    drop(d);
    raw.close()
        .await
        .unwrap_or_else(|e| panic!("{name}: close: {e}"));
    let mut again = broker
        .subscribe(Subscription::new(&topic, &g2))
        .await
        .unwrap_or_else(|e| panic!("{name}: resubscribe {g2}: {e}"));
    let d = next_delivery(
        &mut again,
        S::RECEIVE_TIMEOUT,
        &format!("{name}: redelivery in {g2}"),
    )
    .await;
    same_content(&format!("{name}: redelivered"), first, d.message());
    assert_eq!(
        d.received.redelivered,
        S::REPORTS_REDELIVERY,
        "{name}: redelivered flag"
    );
    assert_message(
        &format!("{name}: redelivered"),
        d.message(),
        &foreign.expected,
    );
    assert_eq!(d.message().id(), id);
    d.ack().await.unwrap_or_else(|e| panic!("{name}: ack: {e}"));
    again
        .close()
        .await
        .unwrap_or_else(|e| panic!("{name}: close: {e}"));
    consumer
        .shutdown(Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{name}: consumer shutdown: {e}"));
}

/// Scenarios (c) and (d): the handler refuses the foreign message for good;
/// the independent client finds it in `{topic}.dlq` with every original
/// byte plus our `x-dlq-*` headers; our own subscriber reads the same
/// letter; `replay_dead_letters` puts it back on the topic, where the
/// independent client finds exactly what it produced first, plus only what
/// the library reserves (`S::MAY_ADD_*`: the id, the time, trace context).
pub async fn dead_letter_and_replay<S: Side>(side: &S) {
    let name = S::NAME;
    let broker = side.connect().await;
    let topic = side.topic("interop.dlq").await;
    let dlq = format!("{topic}.dlq");
    let group = unique("interop-dlq");
    let peek_group = unique("interop-dlq-peek");
    let replay_group = unique("interop-replay");
    let mut cleanup = Cleanup::new(side, &topic, &[&group]);
    cleanup.subscriptions.extend([
        (dlq.clone(), peek_group.clone()),
        (dlq.clone(), replay_group.clone()),
    ]);
    cleanup.topics.push(dlq.clone());
    let foreign = side.foreign();

    // The groups that read the dead-letter topic later subscribe first, so
    // that they get the letter however the backend keeps dead letters (a
    // queue every reader shares, or one per group from its first
    // subscription on).
    for g in [&peek_group, &replay_group] {
        broker
            .subscribe(Subscription::new(&dlq, g))
            .await
            .unwrap_or_else(|e| panic!("{name}: subscribe {g} to {dlq}: {e}"))
            .close()
            .await
            .unwrap_or_else(|e| panic!("{name}: close: {e}"));
    }

    let (consumer, recorder) = recording_consumer::<S>(&broker, &topic, &group, |_| {
        Err(HandlerError::permanent("interop: refused on purpose"))
    })
    .await;
    let dlq_reader = reader(side, &side.endpoint(), &dlq, 1, "dead letter").await;
    let check = reader(side, &side.endpoint(), &topic, 1, "original as produced").await;

    produce(
        side,
        &side.endpoint(),
        &topic,
        std::slice::from_ref(&foreign.wire),
    )
    .await;
    let original = check.one().await;
    assert_same_except(
        &format!("{name}: the python client's own round trip"),
        &foreign.wire,
        &original,
        &[],
        &[],
    );

    recorder
        .wait_until(S::RECEIVE_TIMEOUT, &format!("{name}: handler"), |s| {
            !s.is_empty()
        })
        .await;
    let handled = recorder.seen()[0].message.clone();
    assert_message(&format!("{name}: handler"), &handled, &foreign.expected);

    // (c) the dead letter as another client sees it.
    let letter = dlq_reader.one().await;
    let may_add: Vec<&str> = S::MAY_ADD_HEADERS
        .iter()
        .chain(S::DLQ_MAY_ADD_HEADERS)
        .chain(&DLQ_HEADERS)
        .copied()
        .collect();
    let added = assert_same_except(
        &format!("{name}: dead letter"),
        &foreign.wire,
        &letter,
        S::MAY_ADD_FIELDS,
        &may_add,
    );
    let text = |name: &str| added.header(name).cloned();
    for h in DLQ_HEADERS {
        assert!(
            added.header(h).is_some(),
            "{name}: dead letter lacks {h}: {letter:?}"
        );
    }
    assert_eq!(
        text("x-dlq-error-kind"),
        Some(side.text_header("permanent"))
    );
    assert_eq!(text("x-dlq-original-topic"), Some(side.text_header(&topic)));
    assert_eq!(text("x-dlq-group"), Some(side.text_header(&group)));
    assert_eq!(text("x-dlq-attempts"), Some(side.text_header("1")));
    // Kafka: where the original was, as the reader saw it.
    for (field, header) in [("partition", "x-dlq-partition"), ("offset", "x-dlq-offset")] {
        if let Some(at) = original.meta.get(field) {
            assert_eq!(
                text(header),
                Some(side.text_header(&at.to_string())),
                "{name}: {header}"
            );
        }
    }
    assert_eq!(
        side.wire_id(&letter).as_deref(),
        Some(handled.id()),
        "{name}: the dead letter carries the id the handler saw"
    );
    consumer
        .shutdown(Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{name}: consumer shutdown: {e}"));

    // Our own subscriber reads the same letter (not acked: replay takes it).
    let mut peek = broker
        .subscribe(Subscription::new(&dlq, &peek_group))
        .await
        .unwrap_or_else(|e| panic!("{name}: subscribe {dlq}: {e}"));
    let d = next_delivery(&mut peek, S::RECEIVE_TIMEOUT, &format!("{name}: {dlq}")).await;
    let mut stripped = d.message().clone();
    assert!(
        stripped
            .headers()
            .get_str("x-dlq-reason")
            .is_some_and(|r| r.contains("interop: refused on purpose")),
        "{name}: x-dlq-reason: {:?}",
        stripped.headers().get("x-dlq-reason")
    );
    stripped
        .headers_mut()
        .retain(|n, _| !n.starts_with("x-dlq-"));
    same_content(
        &format!("{name}: dead letter read by us"),
        &handled,
        &stripped,
    );
    drop(d);
    peek.close()
        .await
        .unwrap_or_else(|e| panic!("{name}: close: {e}"));

    // (d) replay: back on the topic, as first produced.
    let count = if S::KEEPS_HISTORY { 2 } else { 1 };
    let replay_reader = reader(side, &side.endpoint(), &topic, count, "replayed").await;
    let report = replay_dead_letters(&broker, &broker, &dlq, &replay_group, 1, S::RECEIVE_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{name}: replay: {e}"));
    assert_eq!(report.replayed, 1, "{name}: replay report {report:?}");
    // A Kafka reader starts at the beginning: the original is read again.
    let before = if S::KEEPS_HISTORY {
        vec![original]
    } else {
        vec![]
    };
    let replayed = the_new_one(replay_reader, &before, &format!("{name}: replayed")).await;
    assert_same_except(
        &format!("{name}: replayed"),
        &foreign.wire,
        &replayed,
        S::MAY_ADD_FIELDS,
        S::MAY_ADD_HEADERS,
    );
    assert_eq!(
        side.wire_id(&replayed).as_deref(),
        Some(handled.id()),
        "{name}: the replayed message keeps its id"
    );
}

/// Scenario (e): `migrate::bridge` copies the foreign message to `target`
/// (another broker of the same kind, at `target_endpoint`), where the
/// independent client finds exactly what it produced on the source.
pub async fn bridge_to_same_kind<S: Side>(
    side: &S,
    topic: &str,
    target: S::Broker,
    target_endpoint: &str,
    exchanges: Vec<String>,
) {
    let name = S::NAME;
    let source = side.connect().await;
    let (bridge_group, id_group) = (unique("interop-bridge"), unique("interop-bridge-id"));
    let mut cleanup = Cleanup::new(side, topic, &[&bridge_group, &id_group]);
    cleanup.exchanges = exchanges;
    let foreign = side.foreign();

    let target_reader = reader(side, target_endpoint, topic, 1, "bridged").await;
    let running = bridge(source.clone(), target, topic, &bridge_group)
        .retry(fast_retry(3))
        .start()
        .await
        .unwrap_or_else(|e| panic!("{name}: bridge: {e}"));
    // Another group on the source tells which id the message has.
    let (consumer, recorder) = recording_consumer::<S>(&source, topic, &id_group, |_| Ok(())).await;

    produce(
        side,
        &side.endpoint(),
        topic,
        std::slice::from_ref(&foreign.wire),
    )
    .await;

    let bridged = target_reader.one().await;
    assert_same_except(
        &format!("{name}: bridged"),
        &foreign.wire,
        &bridged,
        S::MAY_ADD_FIELDS,
        S::MAY_ADD_HEADERS,
    );
    recorder
        .wait_until(S::RECEIVE_TIMEOUT, &format!("{name}: id group"), |s| {
            !s.is_empty()
        })
        .await;
    let seen = recorder.seen()[0].message.clone();
    assert_message(&format!("{name}: source group"), &seen, &foreign.expected);
    assert_eq!(
        side.wire_id(&bridged).as_deref(),
        Some(seen.id()),
        "{name}: the bridged message keeps the id"
    );
    running
        .shutdown(Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{name}: bridge shutdown: {e}"));
    consumer
        .shutdown(Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{name}: consumer shutdown: {e}"));
}

/// A typed event for scenario (f).
#[derive(Debug, serde::Serialize, serde::Deserialize, validator::Validate)]
pub struct Probe {
    #[validate(length(min = 1))]
    pub user_id: String,
    pub feature: String,
}

impl broker_core::Event for Probe {
    const TOPIC: &'static str = "interop.probe.used";
    fn partition_key(&self) -> Option<String> {
        Some(self.user_id.clone())
    }
}

/// Scenario (f): what our publisher sends, as another client reads it: a
/// message with a content type, and a typed event (`application/json`).
/// Returns the two records for broker-specific checks.
pub async fn our_publisher_to_independent_reader<S: Side>(side: &S) -> (Message, Wire, Wire) {
    use broker_core::PublisherExt;
    let name = S::NAME;
    let broker = side.connect().await;
    let topic = side.topic("interop.publish").await;
    let _cleanup = Cleanup::new(side, &topic, &[]);
    let python = reader(side, &side.endpoint(), &topic, 2, "our messages").await;

    let message = Message::new(&[0x00, 0xff, 0x7b][..])
        .with_key(&[0xfe, 0x01][..])
        .with_content_type("text/csv; charset=utf-8")
        .with_header("h", "v")
        .with_correlation_id("interop-corr");
    broker
        .publish(&topic, message.clone())
        .await
        .unwrap_or_else(|e| panic!("{name}: publish: {e}"));
    let event = Probe {
        user_id: "u-1".into(),
        feature: "export".into(),
    };
    broker
        .publish_event_to(&topic, &event, None)
        .await
        .unwrap_or_else(|e| panic!("{name}: publish_event_to: {e}"));

    let mut records = python.records().await;
    assert_eq!(records.len(), 2, "{name}: read {records:?}");
    // Partitions may reorder them (Kafka): tell them by payload.
    records.sort_by_key(|r| side.wire_payload(r) != message.payload().as_ref());
    let (plain, typed) = (records.remove(0), records.remove(0));

    assert_eq!(side.wire_payload(&plain), message.payload().as_ref());
    assert_eq!(side.wire_key(&plain).as_deref(), message.key());
    assert_eq!(side.wire_id(&plain).as_deref(), Some(message.id()));
    assert_eq!(
        side.wire_content_type(&plain).as_deref(),
        Some("text/csv; charset=utf-8"),
        "{name}: content type on the wire"
    );
    assert_eq!(
        side.wire_content_type(&typed).as_deref(),
        Some("application/json"),
        "{name}: a typed event's content type on the wire"
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&side.wire_payload(&typed)).expect("JSON payload"),
        json!({"user_id": "u-1", "feature": "export"})
    );
    assert_eq!(side.wire_key(&typed).as_deref(), Some(&b"u-1"[..]));
    assert!(side.wire_id(&typed).is_some_and(|id| id.len() == 36));
    (message, plain, typed)
}
