//! Publishing where no group is bound yet, required groups, the alternate
//! exchange, queue expiry from the environment, and tests that clean up
//! their queues.

mod common;

use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use broker_core::config::{BrokerConfig, ConfigError, RabbitMqSettings};
use broker_core::testkit::unique;
use broker_core::{BrokerError, DeliveryStream, Message, Publisher, Subscriber, Subscription};
use broker_rabbitmq::RabbitMqBroker;

/// Every event logged in this process (all targets, all levels, lapin's I/O
/// thread included), as `LEVEL target field=value...` lines.
fn captured() -> Arc<Mutex<Vec<String>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<String>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = Arc::new(Mutex::new(Vec::new()));
        tracing::subscriber::set_global_default(Capture(log.clone()))
            .expect("no other global subscriber in this test binary");
        log
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<String>>>);

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={value:?}", field.name());
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut fields = Fields(format!("SPAN {}", span.metadata().name()));
        span.record(&mut fields);
        self.0.lock().unwrap().push(fields.0);
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        let mut fields = Fields("SPAN-RECORD".into());
        values.record(&mut fields);
        self.0.lock().unwrap().push(fields.0);
    }
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let meta = event.metadata();
        let mut fields = Fields(format!("{} {}", meta.level(), meta.target()));
        event.record(&mut fields);
        self.0.lock().unwrap().push(fields.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

async fn receive(stream: &mut Box<dyn DeliveryStream>, what: &str) -> Message {
    let d = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within 10 s"))
        .expect("stream open")
        .expect("delivery");
    let m = d.message().clone();
    d.ack().await.expect("ack");
    m
}

async fn assert_quiet(stream: &mut Box<dyn DeliveryStream>, what: &str) {
    if let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(500), stream.next()).await {
        panic!(
            "{what}: unexpected delivery {:?}",
            d.map(|d| d.received.message.id().to_owned())
        );
    }
}

fn settings(vars: &[(&str, String)]) -> RabbitMqSettings {
    let mut all = vec![("RABBITMQ_URL", common::url())];
    all.extend(vars.iter().cloned());
    BrokerConfig::from_vars(all)
        .expect("valid configuration")
        .rabbitmq
        .expect("RabbitMQ enabled")
}

/// A publish no queue takes succeeds, is counted, and is reported once per
/// topic (rate-limited) by topic and count: neither our warning nor
/// anything lapin logs carries the payload or header values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_publish_succeeds_and_is_counted_without_logging_the_payload() {
    if !broker_core::testkit::backend_selected("rabbitmq") {
        return;
    }
    let log = captured();
    let broker = common::broker().await;
    let topic = unique("rmq.nobody");
    let secret = "payload-secret-7f3a";
    let sent = Message::new(secret).with_header("x-note", "header-secret-9b1c");
    broker
        .publish(&topic, sent)
        .await
        .expect("publishing to a topic no group subscribed to succeeds");
    broker
        .publish_batch(&topic, vec![Message::new(secret), Message::new(secret)])
        .await
        .expect("so does a batch");
    assert_eq!(broker.unroutable_count_of(&topic), 3);
    assert!(broker.unroutable_count() >= 3);

    // A subscription makes the topic routable at once for this broker.
    let mut stream = broker
        .subscribe(Subscription::new(&topic, "g"))
        .await
        .expect("subscribe");
    let routed = Message::new("routed");
    broker
        .publish(&topic, routed.clone())
        .await
        .expect("publish");
    assert_eq!(
        receive(&mut stream, "routed message").await.id(),
        routed.id()
    );
    assert_eq!(
        broker.unroutable_count_of(&topic),
        3,
        "a routed message was counted"
    );
    assert_quiet(&mut stream, "nothing from before the subscription").await;
    stream.close().await.expect("close");

    // Give lapin's I/O thread time to log anything it would.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = log.lock().unwrap().clone();
    let warnings: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("WARN") && l.contains(&topic))
        .collect();
    assert_eq!(warnings.len(), 1, "one rate-limited warning: {warnings:#?}");
    assert!(warnings[0].contains("messages=1"), "{}", warnings[0]);
    // The payload as text, and as the byte list a derived Debug prints.
    let bytes = format!("{:?}", &secret.as_bytes()[..8]);
    let bytes = bytes.trim_matches(|c| c == '[' || c == ']');
    for line in &lines {
        assert!(
            !line.contains(secret) && !line.contains("header-secret") && !line.contains(bytes),
            "a log line carries the message: {line}"
        );
    }
    common::delete_queues(common::queues_of(&topic, "g")).await;
}

/// `RABBITMQ_REQUIRED_GROUPS` makes publishers declare the groups' queues:
/// messages published before the groups ever subscribed wait for them;
/// a group not named gets only what follows its first subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_groups_from_the_environment_keep_earlier_messages() {
    if !broker_core::testkit::backend_selected("rabbitmq") {
        return;
    }
    let topic = unique("rmq.required-env");
    let expiry = common::queue_expiry().as_millis().to_string();
    let settings = settings(&[
        ("RABBITMQ_REQUIRED_GROUPS", format!("{topic}=ledger, audit")),
        ("RABBITMQ_QUEUE_EXPIRY_MS", expiry),
    ]);
    assert_eq!(settings.required_groups().of(&topic), ["ledger", "audit"]);
    let publisher = RabbitMqBroker::builder_from(&settings)
        .exchange("broker.test")
        .connect()
        .await
        .expect("connect");
    let sent: Vec<Message> = (0..3).map(|i| Message::new(format!("m{i}"))).collect();
    for m in &sent {
        publisher.publish(&topic, m.clone()).await.expect("publish");
    }
    assert_eq!(publisher.unroutable_count_of(&topic), 0);

    let subscriber = common::broker().await;
    for group in ["ledger", "audit"] {
        let mut stream = subscriber
            .subscribe(Subscription::new(&topic, group))
            .await
            .expect("subscribe");
        for m in &sent {
            assert_eq!(receive(&mut stream, group).await.id(), m.id(), "{group}");
        }
        stream.close().await.expect("close");
    }
    let mut other = subscriber
        .subscribe(Subscription::new(&topic, "not-required"))
        .await
        .expect("subscribe");
    assert_quiet(&mut other, "a group not required").await;
    other.close().await.expect("close");
    let mut queues = Vec::new();
    for group in ["ledger", "audit", "not-required"] {
        queues.extend(common::queues_of(&topic, group));
    }
    assert_eq!(common::delete_queues(queues).await, 0);
}

/// Malformed required groups are typed errors naming the variable, from
/// the environment and from code.
#[test]
fn malformed_required_groups_name_the_variable() {
    let err = BrokerConfig::from_vars([
        ("RABBITMQ_URL", "amqp://h"),
        ("RABBITMQ_REQUIRED_GROUPS", "billing.invoices=ledger;audit"),
    ])
    .expect_err("an entry without `=`");
    assert!(matches!(err, ConfigError::Invalid { .. }), "{err:?}");
    assert_eq!(err.var(), "RABBITMQ_REQUIRED_GROUPS");
    let err = RabbitMqBroker::builder("amqp://h")
        .required_groups("bad topic", ["g"])
        .build()
        .expect_err("invalid topic");
    assert!(
        matches!(&err, BrokerError::Config(c) if c.var() == "RABBITMQ_REQUIRED_GROUPS"),
        "{err:?}"
    );
}

/// `RABBITMQ_QUEUE_EXPIRY_MS` reaches the queues: RabbitMQ deletes them
/// once they have had no consumer for that long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_expiry_from_the_environment_removes_unused_queues() {
    if !broker_core::testkit::backend_selected("rabbitmq") {
        return;
    }
    let settings = settings(&[("RABBITMQ_QUEUE_EXPIRY_MS", "1000".into())]);
    let broker = RabbitMqBroker::builder_from(&settings)
        .exchange("broker.test")
        .connect()
        .await
        .expect("connect");
    let topic = unique("rmq.expiry");
    let stream = broker
        .subscribe(Subscription::new(&topic, "g"))
        .await
        .expect("subscribe");
    stream.close().await.expect("close");
    let queues = common::queues_of(&topic, "g");
    // Looking (a passive declaration) renews a queue's lease: look rarely.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    for queue in &queues {
        loop {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            if !common::queue_exists(queue).await {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{queue} still there 20 s after a 1 s expiry"
            );
        }
    }
}

async fn delete_exchanges(names: &[&str]) {
    let conn = lapin::Connection::connect(&common::url(), lapin::ConnectionProperties::default())
        .await
        .expect("raw connection");
    let channel = conn.create_channel().await.expect("channel");
    for name in names {
        let _ = channel
            .exchange_delete((*name).into(), Default::default())
            .await;
    }
    let _ = conn.close(200, "done".into()).await;
}

/// With an alternate exchange, a message no queue is bound for is kept in
/// the alternate exchange's queue (and not counted as dropped). An existing
/// exchange declared without one refuses the option with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alternate_exchange_keeps_unroutable_messages() {
    if !broker_core::testkit::backend_selected("rabbitmq") {
        return;
    }
    let exchange = unique("broker.test-ae");
    let ae = format!("{exchange}.unroutable");
    let broker = common::builder()
        .exchange(&exchange)
        .alternate_exchange(&ae)
        .connect()
        .await
        .expect("connect");
    let topic = unique("rmq.ae");
    let sent = Message::new("kept aside");
    broker.publish(&topic, sent.clone()).await.expect("publish");
    assert_eq!(broker.unroutable_count(), 0);

    let conn = lapin::Connection::connect(&common::url(), lapin::ConnectionProperties::default())
        .await
        .expect("raw connection");
    let channel = conn.create_channel().await.expect("channel");
    let got = tokio::time::timeout(
        Duration::from_secs(10),
        channel.basic_get(
            ae.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        ),
    )
    .await
    .expect("basic.get answered")
    .expect("basic.get")
    .expect("the unroutable message is in the alternate exchange's queue");
    assert_eq!(got.delivery.routing_key.as_str(), topic);
    assert_eq!(got.delivery.data, sent.payload().to_vec());
    let _ = conn.close(200, "done".into()).await;
    broker.close().await.expect("close");

    // An exchange that exists without an alternate exchange keeps working
    // without the option and refuses it with a clear error.
    let old = unique("broker.test-old");
    let old_ae = format!("{old}.unroutable");
    let plain = common::builder()
        .exchange(&old)
        .connect()
        .await
        .expect("connect");
    plain
        .publish(&topic, Message::new("x"))
        .await
        .expect("publish");
    let refused = common::builder()
        .exchange(&old)
        .alternate_exchange(&old_ae)
        .connect()
        .await
        .expect("connect")
        .publish(&topic, Message::new("y"))
        .await
        .expect_err("an exchange's arguments never change");
    let text = refused.to_string();
    assert!(
        matches!(refused, BrokerError::Refused { .. })
            && text.contains(&old)
            && text.contains("policy"),
        "{refused:?}"
    );
    plain
        .publish(&topic, Message::new("z"))
        .await
        .expect("the old exchange still works");
    common::delete_queues([ae.clone(), old_ae.clone()]).await;
    delete_exchanges(&[&exchange, &ae, &old, &old_ae]).await;
}

/// The conformance backend deletes the queues its checks declared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_backend_leaves_no_queues() {
    if !broker_core::testkit::backend_selected("rabbitmq") {
        return;
    }
    let backend = common::rabbitmq_backend().await;
    broker_core::testkit::every_group_gets_every_message(&backend).await;
    broker_core::testkit::required_group_receives_earlier_messages(&backend).await;
    let queues = backend.queues();
    assert!(queues.len() >= 6, "{queues:?}");
    for queue in &queues {
        assert!(
            common::queue_exists(queue).await,
            "{queue} was never declared"
        );
    }
    drop(backend);
    for queue in &queues {
        assert!(!common::queue_exists(queue).await, "{queue} left behind");
    }
}
