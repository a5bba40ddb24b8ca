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
//!
//! The Kafka placement tests put the poison message 1, 40 and 500 records
//! past the group's committed offset (a fresh group: offset 0) in one of
//! three partitions, with records after it and in the other partitions,
//! and run the consumer with 1 and with 4 lanes. Expected besides: every
//! record of the other partitions handled before the poison message is
//! dead-lettered (it does not starve them), and a bounded number of
//! duplicate handler calls.

use std::collections::{BTreeMap, BTreeSet};
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

/// Which broker the consumer process uses: `backend` as crash-consumer
/// takes it, and the Kafka bootstrap servers when not the test command's.
#[derive(Clone, Copy)]
struct Target<'a> {
    backend: &'a str,
    kafka_brokers: Option<&'a str>,
}

impl<'a> Target<'a> {
    fn the(backend: &'a str) -> Self {
        Target {
            backend,
            kafka_brokers: None,
        }
    }
}

/// Starts the consumer process (delivery limit `limit`, `lanes` handlers);
/// its stdout lines go to `lines`. Returns once it printed `ready`
/// (subscribed; it handles nothing before).
async fn start(
    target: Target<'_>,
    topic: &str,
    group: &str,
    (limit, lanes): (u32, usize),
    lines: mpsc::UnboundedSender<String>,
) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_crash-consumer"));
    if let Some(brokers) = target.kafka_brokers {
        command.env("KAFKA_BROKERS", brokers);
    }
    let mut child = command
        .args([
            target.backend,
            topic,
            group,
            &limit.to_string(),
            &lanes.to_string(),
        ])
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

/// One `handled` line of the consumer process.
struct Handled {
    payload: String,
    attempt: u32,
    partition: i32,
}

/// Parses `handled <payload> attempt <n> partition <p>`.
fn parse(line: &str) -> Handled {
    let fields: Vec<&str> = line.split(' ').collect();
    match fields[..] {
        ["handled", payload, "attempt", attempt, "partition", partition] => Handled {
            payload: payload.to_owned(),
            attempt: attempt.parse().expect("attempt"),
            partition: partition.parse().expect("partition"),
        },
        _ => panic!("unexpected line {line:?}"),
    }
}

/// The letter is the poison message, dead-lettered for the delivery limit
/// `limit` after exactly `limit` crashes (`at` says which run).
fn assert_limit_letter(letter: &Message, crashes: u32, limit: u32, at: &str) {
    assert_eq!(letter.payload().as_ref(), b"poison", "{at}");
    assert_eq!(
        crashes, limit,
        "{at}: the poison message crashed the consumer LIMIT times"
    );
    let headers = letter.headers();
    assert_eq!(
        headers.get_str("x-dlq-attempts"),
        Some(limit.to_string().as_str()),
        "{at}"
    );
    assert_eq!(
        headers.get_str("x-dlq-error-kind"),
        Some("delivery-limit"),
        "{at}"
    );
    assert!(
        headers
            .get_str("x-dlq-reason")
            .is_some_and(|r| r.contains("crashed")),
        "{at}: {:?}",
        headers.get_str("x-dlq-reason")
    );
}

async fn crash_loop(
    target: Target<'_>,
    topic: &str,
    publisher: Arc<dyn Publisher>,
    subscriber: Arc<dyn Subscriber>,
    dlq_group: &str,
) {
    // Unique per run: runs that share a broker do not share a group.
    let group = &unique("crash-loop");
    // Subscribed first, so it sees the letter on every broker.
    let mut letters = subscriber
        .subscribe(Subscription::new(dead_letter_topic(topic), dlq_group))
        .await
        .expect("subscribe to the dead-letter topic");
    let (lines_tx, mut lines) = mpsc::unbounded_channel();
    let mut child = start(target, topic, group, (LIMIT, 4), lines_tx.clone()).await;
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
                child = start(target, topic, group, (LIMIT, 4), lines_tx.clone()).await;
            }
            Some(line) = lines.recv() => {
                handled.insert(parse(&line).payload);
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
    assert_limit_letter(&letter, crashes, LIMIT, target.backend);
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
        Target::the("rabbitmq"),
        &topic,
        broker.clone(),
        broker.clone(),
        &unique("crash-dlq"),
    )
    .await;
}

#[tokio::test]
async fn kafka_poison_message_that_kills_the_consumer_reaches_the_dlq() {
    if !backend_selected("kafka") {
        return;
    }
    let (broker, spec) = kafka("crash-loop-test").await;
    let topic = unique("crash.kafka");
    // Created before the consumer subscribes, with 3 partitions: the poison
    // message shares the consumer with records of other partitions, whose
    // delivery counts must not grow with its crashes.
    broker
        .create_topic_with_dlq(&topic, &spec)
        .await
        .expect("create the topic");
    crash_loop(
        Target::the("kafka"),
        &topic,
        broker.clone(),
        broker.clone(),
        &unique("crash-dlq"),
    )
    .await;
}

/// The same on librdkafka's mock cluster (in this process; the consumer
/// process connects to its listener): a second Kafka implementation, with
/// correct watermarks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_mock_cluster_poison_message_that_kills_the_consumer_reaches_the_dlq() {
    if !backend_selected("kafka") {
        return;
    }
    let mock = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    let topic = unique("crash.mock");
    for name in [topic.clone(), dead_letter_topic(&topic)] {
        mock.create_topic(&name, 3, 1).expect("create topic");
    }
    let bootstrap = mock.bootstrap_servers();
    let broker = Arc::new(
        broker_kafka::KafkaBroker::builder(
            broker_core::config::KafkaSettings::new(bootstrap.clone()).client_id("crash-mock-test"),
        )
        // The mock cluster does not implement CreateTopics.
        .auto_create_topics(false)
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .connect()
        .await
        .expect("connect to the mock cluster"),
    );
    let target = Target {
        backend: "kafka-mock",
        kafka_brokers: Some(&bootstrap),
    };
    crash_loop(
        target,
        &topic,
        broker.clone(),
        broker.clone(),
        &unique("crash-dlq"),
    )
    .await;
}

/// Delivery limit of the Kafka placement tests (crashes expected per test:
/// each costs a consumer restart and a group join).
const PLACED_LIMIT: u32 = 2;
/// Records after the poison message in its partition.
const AFTER: usize = 20;
/// Records with keys of their own (spread over the partitions).
const OTHERS: usize = 60;
/// Bound of one placement run.
const PLACED_BOUND: Duration = Duration::from_secs(200);

/// What a placement run measured.
struct Placed {
    before: usize,
    crashes: u32,
    /// Handler calls beyond the first per message.
    duplicates: usize,
    took: Duration,
}

/// A Kafka client of the test broker (3 partitions per topic).
async fn kafka(client: &str) -> (Arc<broker_kafka::KafkaBroker>, broker_kafka::TopicSpec) {
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned());
    let spec = broker_kafka::TopicSpec::default()
        .partitions(3)
        .replication_factor(1);
    let broker = broker_kafka::KafkaBroker::builder(
        broker_core::config::KafkaSettings::new(brokers).client_id(client),
    )
    .set("session.timeout.ms", "6000")
    .set("heartbeat.interval.ms", "1000")
    .topic_spec(spec.clone())
    .connect()
    .await
    .expect("connect");
    (Arc::new(broker), spec)
}

/// Publishes `before` records, the poison message and [`AFTER`] records
/// with one key (one partition, the poison `before` records past offset
/// 0), then [`OTHERS`] with keys of their own, and runs the crashing
/// consumer with `lanes` lanes until the poison message is a dead letter
/// and everything else was handled.
async fn poison_placed(lanes: usize, before: usize) -> Placed {
    let (broker, spec) = kafka("crash-placed-test").await;
    let topic = unique(&format!("crash.kafka.at{before}"));
    broker
        .create_topic_with_dlq(&topic, &spec)
        .await
        .expect("create the topic");
    let group = unique("crash-placed");
    let mut letters = broker
        .subscribe(Subscription::new(
            dead_letter_topic(&topic),
            unique("crash-placed-dlq"),
        ))
        .await
        .expect("subscribe to the dead-letter topic");
    let label = |prefix: &str, i: usize| format!("{prefix}{i}");
    let mut same: Vec<Message> = (0..before)
        .map(|i| Message::new(label("b", i)).with_key("p"))
        .collect();
    same.push(Message::new("poison").with_key("p"));
    same.extend((0..AFTER).map(|i| Message::new(label("a", i)).with_key("p")));
    broker
        .publish_batch(&topic, same)
        .await
        .expect("publish the poison's partition");
    let others = (0..OTHERS)
        .map(|i| Message::new(label("o", i)).with_key(label("k", i)))
        .collect();
    broker
        .publish_batch(&topic, others)
        .await
        .expect("publish the others");
    let expected: BTreeSet<String> = (0..before)
        .map(|i| label("b", i))
        .chain((0..AFTER).map(|i| label("a", i)))
        .chain((0..OTHERS).map(|i| label("o", i)))
        .collect();

    let started = tokio::time::Instant::now();
    let config = (PLACED_LIMIT, lanes);
    let (lines_tx, mut lines) = mpsc::unbounded_channel();
    let mut child = start(
        Target::the("kafka"),
        &topic,
        &group,
        config,
        lines_tx.clone(),
    )
    .await;
    let mut crashes = 0u32;
    // Payloads (the test's labels) handled again, in order.
    let mut again: Vec<String> = Vec::new();
    // Payload → partition, of every message handled so far.
    let mut handled: BTreeMap<String, i32> = BTreeMap::new();
    let mut before_letter = None;
    let mut letter = None;
    let deadline = started + PLACED_BOUND;
    let mut take = |h: Handled, handled: &mut BTreeMap<String, i32>| {
        assert!(
            h.attempt <= PLACED_LIMIT,
            "attempt {} of {}",
            h.attempt,
            h.payload
        );
        if handled.insert(h.payload.clone(), h.partition).is_some() {
            again.push(h.payload);
        }
    };
    while letter.is_none() || handled.len() < expected.len() {
        tokio::select! {
            status = child.wait() => {
                let status = status.expect("wait");
                assert!(!status.success(), "the consumer only ends by aborting: {status}");
                crashes += 1;
                assert!(
                    crashes <= PLACED_LIMIT,
                    "{before} records before the poison, {lanes} lanes: more crashes than the delivery limit"
                );
                child = start(Target::the("kafka"), &topic, &group, config, lines_tx.clone()).await;
            }
            Some(line) = lines.recv() => take(parse(&line), &mut handled),
            d = letters.next(), if letter.is_none() => {
                let d = d.expect("letters stream open").expect("letter");
                // Lines printed before the letter was published are in the
                // channel by now (the letter took a broker round trip more).
                while let Ok(line) = lines.try_recv() {
                    take(parse(&line), &mut handled);
                }
                before_letter = Some(handled.clone());
                letter = Some(d.message().clone());
                d.ack().await.expect("ack letter");
            }
            _ = tokio::time::sleep_until(deadline) => panic!(
                "{before} records before the poison, {lanes} lanes, after {PLACED_BOUND:?}: \
                 {crashes} crashes, letter {}, {} of {} handled",
                letter.is_some(),
                handled.len(),
                expected.len()
            ),
        }
    }
    let took = started.elapsed();
    let letter = letter.expect("letter");
    let at = format!("{before} records before the poison, {lanes} lanes");
    assert_limit_letter(&letter, crashes, PLACED_LIMIT, &at);
    assert_eq!(
        handled.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "{at}"
    );
    // The poison's partition is that of its neighbours with the same key.
    let poisoned = handled["a0"];
    assert!(
        (0..before).all(|i| handled[&label("b", i)] == poisoned),
        "{at}: one key, one partition"
    );
    let before_letter = before_letter.expect("handled before the letter");
    let starved: Vec<&String> = handled
        .iter()
        .filter(|&(payload, &partition)| {
            partition != poisoned && !before_letter.contains_key(payload)
        })
        .map(|(payload, _)| payload)
        .collect();
    assert!(
        starved.is_empty(),
        "{at}: records of other partitions waited for the poison's dead letter: {starved:?}"
    );
    // At every crash at most the in-flight window (prefetch: twice the
    // lanes) and what finished in the last few milliseconds (the prompt
    // commits' gap and round trip, on a loaded machine) come again.
    let duplicates = again.len();
    let bound = crashes as usize * (2 * (2 * lanes) + 10);
    assert!(
        duplicates <= bound,
        "{at}: {duplicates} duplicate handler calls, more than {bound}: {again:?}"
    );
    let more = tokio::time::timeout(Duration::from_secs(3), letters.next()).await;
    assert!(
        more.is_err(),
        "{at}: only the poison message is a dead letter"
    );
    letters.close().await.expect("close");
    child.start_kill().expect("stop the consumer");
    let _ = child.wait().await;
    Placed {
        before,
        crashes,
        duplicates,
        took,
    }
}

/// The poison 1, 40 and 500 records past the commit, at the same time
/// (each its own topic and group).
async fn poison_anywhere(lanes: usize) {
    let runs = futures::future::join_all([1, 40, 500].map(|before| poison_placed(lanes, before)));
    for p in runs.await {
        eprintln!(
            "crash loop, {lanes} lanes, poison {} records past the commit: {} crashes, {} duplicates, {:.1} s",
            p.before,
            p.crashes,
            p.duplicates,
            p.took.as_secs_f64()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_poison_anywhere_past_the_commit_reaches_the_dlq_one_lane() {
    if !backend_selected("kafka") {
        return;
    }
    poison_anywhere(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_poison_anywhere_past_the_commit_reaches_the_dlq_four_lanes() {
    if !backend_selected("kafka") {
        return;
    }
    poison_anywhere(4).await;
}
