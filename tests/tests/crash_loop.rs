//! A message that kills the consumer process reaches the dead-letter topic
//! after the delivery limit, on every broker, and the consumer goes on.
//!
//! Each test runs `crash-consumer` (src/bin/crash-consumer.rs) as a child
//! process with delivery limit [`LIMIT`], publishes the poison message
//! followed by [`NEIGHBOURS`] ordinary ones, and starts the child again
//! every time the poison message aborts it. Expected: exactly `LIMIT`
//! crashes, one dead letter with `x-dlq-attempts` = `LIMIT` and
//! `x-dlq-error-kind` = `delivery-limit`, every ordinary message handled,
//! none of them dead-lettered.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use broker_core::testkit::{backend_selected, unique};
use broker_core::topic::dead_letter_topic;
use broker_core::{Message, Publisher, Subscriber, Subscription};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// The consumer's delivery limit, and so the crashes expected.
const LIMIT: u32 = 3;
/// Ordinary messages published after the poison one.
const NEIGHBOURS: usize = 20;
/// The whole test's bound: Kafka needs a group join per restart.
const TEST_BOUND: Duration = Duration::from_secs(240);

/// Starts the consumer process; its stdout lines go to `lines`. Returns
/// once it printed `ready` (subscribed).
async fn start(
    backend: &str,
    topic: &str,
    group: &str,
    lines: mpsc::UnboundedSender<String>,
) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_crash-consumer"))
        .args([backend, topic, group, &LIMIT.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start crash-consumer");
    let mut out = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        while let Ok(Some(line)) = out.next_line().await {
            if line == "ready" {
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
            } else {
                let _ = lines.send(line);
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(90), ready_rx)
        .await
        .expect("crash-consumer ready within 90 s")
        .expect("crash-consumer exited before it was ready");
    child
}

async fn crash_loop(
    backend: &str,
    topic: &str,
    publisher: Arc<dyn Publisher>,
    subscriber: Arc<dyn Subscriber>,
    dlq_group: &str,
) {
    let group = "crash-loop";
    // Subscribed first, so it sees the letter on every broker.
    let mut letters = subscriber
        .subscribe(Subscription::new(dead_letter_topic(topic), dlq_group))
        .await
        .expect("subscribe to the dead-letter topic");
    let (lines_tx, mut lines) = mpsc::unbounded_channel();
    let mut child = start(backend, topic, group, lines_tx.clone()).await;
    publisher
        .publish(topic, Message::new("poison").with_key("p"))
        .await
        .expect("publish poison");
    let expected: BTreeSet<String> = (0..NEIGHBOURS).map(|i| format!("m{i}")).collect();
    for m in &expected {
        publisher
            .publish(topic, Message::new(m.clone()).with_key(m.clone()))
            .await
            .expect("publish");
    }

    let mut crashes = 0u32;
    let mut handled = BTreeSet::new();
    let mut letter = None;
    let deadline = tokio::time::Instant::now() + TEST_BOUND;
    while letter.is_none() || handled != expected {
        tokio::select! {
            status = child.wait() => {
                let status = status.expect("wait");
                assert!(!status.success(), "the consumer only ends by aborting: {status}");
                crashes += 1;
                assert!(crashes <= LIMIT, "more crashes than the delivery limit {LIMIT}");
                child = start(backend, topic, group, lines_tx.clone()).await;
            }
            Some(line) = lines.recv() => {
                let payload = line
                    .strip_prefix("handled ")
                    .and_then(|l| l.split(' ').next())
                    .unwrap_or_else(|| panic!("unexpected line {line:?}"));
                handled.insert(payload.to_owned());
            }
            d = letters.next(), if letter.is_none() => {
                let d = d.expect("letters stream open").expect("letter");
                letter = Some(d.message().clone());
                d.ack().await.expect("ack letter");
            }
            _ = tokio::time::sleep_until(deadline) => panic!(
                "after {TEST_BOUND:?}: {crashes} crashes, letter {}, handled {handled:?}",
                letter.is_some()
            ),
        }
    }
    let letter = letter.expect("letter");
    assert_eq!(letter.payload().as_ref(), b"poison");
    assert_eq!(
        crashes, LIMIT,
        "the poison message crashed the consumer LIMIT times"
    );
    let headers = letter.headers();
    assert_eq!(
        headers.get_str("x-dlq-attempts"),
        Some(LIMIT.to_string().as_str())
    );
    assert_eq!(headers.get_str("x-dlq-error-kind"), Some("delivery-limit"));
    assert!(
        headers
            .get_str("x-dlq-reason")
            .is_some_and(|r| r.contains("crashed")),
        "{:?}",
        headers.get_str("x-dlq-reason")
    );
    // No ordinary message became a dead letter, though some were in flight
    // at every crash.
    let more = tokio::time::timeout(Duration::from_secs(3), letters.next()).await;
    assert!(more.is_err(), "only the poison message is a dead letter");
    letters.close().await.expect("close");
    child.start_kill().expect("stop the consumer");
    let _ = child.wait().await;
}

#[tokio::test]
async fn rabbitmq_poison_message_that_kills_the_consumer_reaches_the_dlq() {
    if !backend_selected("rabbitmq") {
        return;
    }
    let url = std::env::var("RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let broker = Arc::new(
        broker_rabbitmq::RabbitMqBroker::builder(url)
            .exchange("broker.test")
            .queue_expiry(Duration::from_secs(120))
            .connect()
            .await
            .expect("connect"),
    );
    let topic = unique("crash.rabbitmq");
    crash_loop(
        "rabbitmq",
        &topic,
        broker.clone(),
        broker.clone(),
        "crash-dlq",
    )
    .await;
}

#[tokio::test]
async fn kafka_poison_message_that_kills_the_consumer_reaches_the_dlq() {
    if !backend_selected("kafka") {
        return;
    }
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned());
    let spec = broker_kafka::TopicSpec::default()
        .partitions(3)
        .replication_factor(1);
    let broker = Arc::new(
        broker_kafka::KafkaBroker::builder(
            broker_core::config::KafkaSettings::new(brokers).client_id("crash-loop-test"),
        )
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .topic_spec(spec.clone())
        .connect()
        .await
        .expect("connect"),
    );
    let topic = unique("crash.kafka");
    // Created before the consumer subscribes, with 3 partitions: the poison
    // message shares the consumer with records of other partitions, whose
    // delivery counts must not grow with its crashes.
    broker
        .create_topic_with_dlq(&topic, &spec)
        .await
        .expect("create the topic");
    crash_loop("kafka", &topic, broker.clone(), broker.clone(), "crash-dlq").await;
}
