//! The outbox and inbox against a real PostgreSQL (`OUTBOX_DATABASE_URL`,
//! set by the test command: a private cluster from scripts/ensure-postgres.sh)
//! and the real brokers: memory, Kafka (test broker), RabbitMQ. Every test
//! works in a schema of its own.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use broker_core::config::KafkaSettings;
use broker_core::testkit::{backend_selected, unique};
use broker_core::{
    Backoff, DeliveryStream, MemoryBroker, Message, Publisher, Received, Subscriber, Subscription,
};
use broker_kafka::{KafkaBroker, TopicSpec};
use broker_outbox::{migrate, Inbox, Outbox, Relay};
use broker_rabbitmq::RabbitMqBroker;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

const WAIT: Duration = Duration::from_secs(30);

fn database_url() -> String {
    std::env::var("OUTBOX_DATABASE_URL").expect(
        "OUTBOX_DATABASE_URL: the test command sets it (scripts/ensure-postgres.sh start prints one)",
    )
}

/// A pool on a fresh schema of the test database, migrated.
async fn pool() -> PgPool {
    let schema = unique("outbox").replace('-', "_");
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&database_url())
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at OUTBOX_DATABASE_URL: {e}"));
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await
        .expect("create schema");
    admin.close().await;
    let pool = pool_in(&schema).await;
    migrate(&pool).await.expect("migrations");
    pool
}

/// A pool on an existing schema.
async fn pool_in(schema: &str) -> PgPool {
    let options: PgConnectOptions = database_url().parse().expect("database URL");
    PgPoolOptions::new()
        .max_connections(8)
        .connect_with(options.options([("search_path", schema)]))
        .await
        .expect("pool")
}

async fn schema_of(pool: &PgPool) -> String {
    let (schema,): (String,) = sqlx::query_as("SELECT current_schema()")
        .fetch_one(pool)
        .await
        .unwrap();
    schema
}

/// One broker for a test: publisher, subscriber and a way to make topics.
struct Backend {
    name: &'static str,
    publisher: Arc<dyn Publisher>,
    subscriber: Arc<dyn Subscriber>,
    kafka: Option<KafkaBroker>,
}

impl Backend {
    async fn topic(&self, hint: &str) -> String {
        let topic = unique(&format!("outbox-test.{hint}"));
        if let Some(k) = &self.kafka {
            k.create_topic_with_dlq(&topic, &TopicSpec::default().partitions(3))
                .await
                .expect("create topic");
        }
        topic
    }

    async fn subscribe(&self, topic: &str, group: &str) -> Box<dyn DeliveryStream> {
        self.subscriber
            .subscribe(Subscription::new(topic, group).with_prefetch(500))
            .await
            .expect("subscribe")
    }
}

async fn backend(name: &'static str) -> Option<Backend> {
    if !backend_selected(name) {
        return None;
    }
    Some(match name {
        "memory" => {
            let m = MemoryBroker::new();
            Backend {
                name,
                publisher: Arc::new(m.clone()),
                subscriber: Arc::new(m),
                kafka: None,
            }
        }
        "kafka" => {
            let servers =
                std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
            let k = KafkaBroker::builder(KafkaSettings::new(servers).client_id("outbox-tests"))
                .set("session.timeout.ms", "6000")
                .set("heartbeat.interval.ms", "1000")
                .connect()
                .await
                .expect("Kafka test broker");
            Backend {
                name,
                publisher: Arc::new(k.clone()),
                subscriber: Arc::new(k.clone()),
                kafka: Some(k),
            }
        }
        "rabbitmq" => {
            let url = std::env::var("RABBITMQ_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
            let r = RabbitMqBroker::builder(url)
                .exchange("broker.test")
                .queue_expiry(Duration::from_secs(120))
                .connect()
                .await
                .expect("RabbitMQ");
            Backend {
                name,
                publisher: Arc::new(r.clone()),
                subscriber: Arc::new(r),
                kafka: None,
            }
        }
        _ => unreachable!(),
    })
}

/// Receives and acks until `n` messages came or `WAIT` passed.
async fn receive(stream: &mut Box<dyn DeliveryStream>, n: usize) -> Vec<Received> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while got.len() < n {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(d))) => {
                got.push(d.received.clone());
                d.ack().await.expect("ack");
            }
            Ok(other) => panic!("stream ended: {:?}", other.map(|r| r.map(|d| d.received))),
            Err(_) => break,
        }
    }
    got
}

async fn quiet(stream: &mut Box<dyn DeliveryStream>) -> Option<Received> {
    match tokio::time::timeout(Duration::from_secs(2), stream.next()).await {
        Ok(Some(Ok(d))) => Some(d.received.clone()),
        _ => None,
    }
}

fn fast(relay: Relay) -> Relay {
    relay
        .poll_interval(Duration::from_millis(200))
        .retry(Backoff::reconnect_default().max_delay(Duration::from_millis(500)))
}

/// A rolled-back transaction publishes nothing; a committed one publishes
/// its message exactly as written.
async fn rollback_publishes_nothing(b: Backend) {
    let pool = pool().await;
    let topic = b.topic("rollback").await;
    let mut stream = b.subscribe(&topic, &unique("g")).await;
    let outbox = Outbox::new();

    let mut tx = pool.begin().await.unwrap();
    let dropped = Message::new("rolled back").with_key("k");
    outbox.publish(&mut tx, &topic, dropped).await.unwrap();
    tx.rollback().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let kept = Message::new(&[0xff, 0x00][..])
        .with_key(&[0xfe][..])
        .with_header("h", "1")
        .with_header("h", &[0xff][..])
        .with_content_type("application/octet-stream");
    outbox.publish(&mut tx, &topic, kept.clone()).await.unwrap();
    tx.commit().await.unwrap();

    let relay = fast(Relay::new(pool.clone(), b.publisher.clone())).start();
    let got = receive(&mut stream, 1).await;
    assert_eq!(got.len(), 1, "{}: the committed message", b.name);
    assert_eq!(got[0].message, kept, "{}: published as written", b.name);
    assert_eq!(
        quiet(&mut stream).await.map(|r| r.message),
        None,
        "{}",
        b.name
    );
    relay.stop().await.unwrap();
    assert_eq!(Outbox::backlog(&pool).await.unwrap().unsent, 0);
    // Bad input is refused at once and writes nothing.
    let mut tx = pool.begin().await.unwrap();
    assert!(outbox
        .publish(&mut tx, "bad topic", Message::new("x"))
        .await
        .is_err());
}

/// Two relays at once (one stopped halfway) publish every row, each once
/// but for the at-least-once window (counted), with every key's messages
/// in the order they were written.
async fn two_relays_keep_order_and_lose_nothing(b: Backend) {
    const ROWS: usize = 600;
    const KEYS: usize = 12;
    let pool = pool().await;
    let topic = b.topic("two-relays").await;
    let mut stream = b.subscribe(&topic, &unique("g")).await;
    let outbox = Outbox::new();
    let mut first =
        Some(fast(Relay::new(pool.clone(), b.publisher.clone()).batch_size(50)).start());
    let second = fast(Relay::new(pool.clone(), b.publisher.clone()).batch_size(50)).start();
    for chunk in 0..ROWS / 50 {
        let mut tx = pool.begin().await.unwrap();
        let messages: Vec<Message> = (chunk * 50..(chunk + 1) * 50)
            .map(|i| {
                Message::new(format!("{i}"))
                    .with_key(format!("k{}", i % KEYS))
                    .with_header("seq", i.to_string())
            })
            .collect();
        // One message at a time, and whole batches in one statement.
        if chunk % 2 == 0 {
            for m in messages {
                outbox.publish(&mut tx, &topic, m).await.unwrap();
            }
        } else {
            outbox
                .publish_batch(&mut tx, &topic, messages)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
        if chunk == ROWS / 100 {
            // Lanes of a relay that stops go to the other.
            first.take().unwrap().stop().await.unwrap();
        }
    }
    let got = receive(&mut stream, ROWS).await;
    let extra = receive_more(&mut stream).await;
    assert!(
        second.stats().published() > 0,
        "{}: the second relay took over the stopped one's lanes",
        b.name
    );
    second.stop().await.unwrap();
    let all: Vec<&Received> = got.iter().chain(&extra).collect();
    let mut seen = BTreeSet::new();
    let mut last: BTreeMap<String, usize> = BTreeMap::new();
    let mut duplicates = 0;
    for r in &all {
        let seq: usize = r.message.headers().get_str("seq").unwrap().parse().unwrap();
        if !seen.insert(seq) {
            duplicates += 1;
            continue;
        }
        let key = r.message.key_str().unwrap().to_owned();
        if let Some(prev) = last.insert(key.clone(), seq) {
            assert!(prev < seq, "{}: key {key}: {seq} after {prev}", b.name);
        }
    }
    assert_eq!(seen.len(), ROWS, "{}: rows published", b.name);
    eprintln!("{}: {duplicates} duplicates of {ROWS} rows", b.name);
    assert_eq!(
        Outbox::backlog(&pool).await.unwrap().unsent,
        0,
        "{}",
        b.name
    );
}

async fn receive_more(stream: &mut Box<dyn DeliveryStream>) -> Vec<Received> {
    let mut more = Vec::new();
    while let Some(r) = quiet(stream).await {
        more.push(r);
    }
    more
}

/// The inbox runs a handler's database work once per message id: a
/// redelivered message (here: published twice with one id) is skipped.
async fn inbox_skips_redelivered(b: Backend) {
    let pool = pool().await;
    sqlx::query("CREATE TABLE credits (message_id TEXT, amount INT)")
        .execute(&pool)
        .await
        .unwrap();
    let topic = b.topic("inbox").await;
    let group = unique("g");
    let inbox = Inbox::new(pool.clone(), group.clone());
    let (tx, mut handled) = tokio::sync::mpsc::unbounded_channel();
    let consumer = broker_core::Consumer::from_parts(
        b.subscriber.clone(),
        b.publisher.clone(),
        &topic,
        &group,
    )
    .handler(inbox.handler(move |r: Received, mut db| {
        let tx = tx.clone();
        async move {
            sqlx::query("INSERT INTO credits VALUES ($1, 5)")
                .bind(r.message.id())
                .execute(&mut *db)
                .await?;
            let _ = tx.send(r.message.id().to_owned());
            Ok(db)
        }
    }))
    .start()
    .await
    .unwrap();
    let m = Message::new("credit").with_key("acct-1");
    b.publisher.publish(&topic, m.clone()).await.unwrap();
    b.publisher.publish(&topic, m.clone()).await.unwrap();
    let other = Message::new("credit").with_key("acct-1");
    b.publisher.publish(&topic, other.clone()).await.unwrap();
    let mut ids = Vec::new();
    while ids.len() < 2 {
        let id = tokio::time::timeout(WAIT, handled.recv())
            .await
            .expect("handled in time")
            .unwrap();
        ids.push(id);
    }
    // The duplicate is skipped, not handled: nothing more comes.
    assert!(
        tokio::time::timeout(Duration::from_secs(2), handled.recv())
            .await
            .is_err(),
        "{}: a duplicate was handled",
        b.name
    );
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    let rows: Vec<(String,)> = sqlx::query_as("SELECT message_id FROM credits ORDER BY 1")
        .fetch_all(&pool)
        .await
        .unwrap();
    let mut expected = vec![m.id().to_owned(), other.id().to_owned()];
    expected.sort();
    assert_eq!(rows.into_iter().map(|r| r.0).collect::<Vec<_>>(), expected);
}

/// The application process dies (SIGKILL) right after committing: nothing
/// was sent yet, and a relay started afterwards publishes every row.
async fn committed_rows_survive_kill_9(b: Backend) {
    const ROWS: usize = 50;
    let pool = pool().await;
    let topic = b.topic("kill9").await;
    let mut stream = b.subscribe(&topic, &unique("g")).await;
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_commits_then_hangs",
            "--ignored",
            "--nocapture",
        ])
        .env("OUTBOX_CHILD_SCHEMA", schema_of(&pool).await)
        .env("OUTBOX_CHILD_TOPIC", &topic)
        .env("OUTBOX_CHILD_ROWS", ROWS.to_string())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("child process");
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
    let committed = tokio::time::timeout(WAIT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("OUTBOX-CHILD-COMMITTED") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(committed, Ok(true), "the child committed its rows");
    child.kill().await.expect("SIGKILL the child");
    assert_eq!(Outbox::backlog(&pool).await.unwrap().unsent, ROWS as u64);

    let relay = fast(Relay::new(pool.clone(), b.publisher.clone())).start();
    let got = receive(&mut stream, ROWS).await;
    relay.stop().await.unwrap();
    let seqs: BTreeSet<String> = got
        .iter()
        .map(|r| r.message.headers().get_str("seq").unwrap().to_owned())
        .collect();
    assert_eq!(
        seqs.len(),
        ROWS,
        "{}: rows published after the crash",
        b.name
    );
}

/// Run only as the child of `committed_rows_survive_kill_9`.
#[tokio::test]
#[ignore = "the child process of committed_rows_survive_kill_9"]
async fn child_commits_then_hangs() {
    let (Ok(schema), Ok(topic), Ok(rows)) = (
        std::env::var("OUTBOX_CHILD_SCHEMA"),
        std::env::var("OUTBOX_CHILD_TOPIC"),
        std::env::var("OUTBOX_CHILD_ROWS"),
    ) else {
        return;
    };
    let pool = pool_in(&schema).await;
    let mut tx = pool.begin().await.unwrap();
    for i in 0..rows.parse::<usize>().unwrap() {
        let m = Message::new(format!("{i}"))
            .with_key(format!("k{}", i % 5))
            .with_header("seq", i.to_string());
        Outbox::new().publish(&mut tx, &topic, m).await.unwrap();
    }
    tx.commit().await.unwrap();
    println!("OUTBOX-CHILD-COMMITTED");
    // Killed here, before any relay could send.
    tokio::time::sleep(Duration::from_secs(120)).await;
}

/// The broker goes down while rows are written and comes back: the relay
/// retries and publishes every row (librdkafka's mock cluster; no external
/// broker needed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_survives_a_broker_restart() {
    use rdkafka::mocking::MockCluster;
    let mock = MockCluster::new(1).expect("mock cluster");
    let topic = unique("outbox-mock");
    mock.create_topic(&topic, 3, 1).expect("topic");
    mock.create_topic(&format!("{topic}.dlq"), 3, 1)
        .expect("dlq");
    let kafka = KafkaBroker::builder(KafkaSettings::new(mock.bootstrap_servers()))
        .auto_create_topics(false)
        .set("message.timeout.ms", "2000")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .connect()
        .await
        .expect("mock cluster");
    let pool = pool().await;
    let mut stream = kafka
        .subscribe(Subscription::new(&topic, unique("g")).with_prefetch(500))
        .await
        .unwrap();
    let outbox = Outbox::new();
    let relay = fast(Relay::new(pool.clone(), Arc::new(kafka.clone()))).start();
    let write = |from: usize| {
        let (pool, outbox, topic) = (pool.clone(), outbox.clone(), topic.clone());
        async move {
            let mut tx = pool.begin().await.unwrap();
            for i in from..from + 100 {
                let m = Message::new(format!("{i}"))
                    .with_key(format!("k{}", i % 7))
                    .with_header("seq", i.to_string());
                outbox.publish(&mut tx, &topic, m).await.unwrap();
            }
            tx.commit().await.unwrap();
        }
    };
    write(0).await;
    let before = receive(&mut stream, 100).await;
    assert_eq!(before.len(), 100, "delivered before the outage");
    mock.broker_down(1).expect("down");
    write(100).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        Outbox::backlog(&pool).await.unwrap().unsent > 0,
        "rows wait while the broker is down"
    );
    assert!(relay.stats().failures() > 0, "the relay saw the outage");
    mock.broker_up(1).expect("up");
    let mut seqs: BTreeSet<usize> = before
        .iter()
        .map(|r| r.message.headers().get_str("seq").unwrap().parse().unwrap())
        .collect();
    let deadline = tokio::time::Instant::now() + WAIT * 2;
    while seqs.len() < 200 && tokio::time::Instant::now() < deadline {
        for r in receive(&mut stream, 1).await {
            seqs.insert(r.message.headers().get_str("seq").unwrap().parse().unwrap());
        }
    }
    assert_eq!(seqs.len(), 200, "every row published after the restart");
    relay.stop().await.unwrap();
    assert_eq!(Outbox::backlog(&pool).await.unwrap().unsent, 0);
}

/// Backlog counts unsent rows and their age; cleanup deletes sent rows
/// past the retention, and keeps unsent ones.
#[tokio::test]
async fn backlog_and_cleanup() {
    let pool = pool().await;
    let outbox = Outbox::new();
    assert_eq!(
        Outbox::backlog(&pool).await.unwrap(),
        broker_outbox::Backlog {
            unsent: 0,
            oldest_age: None
        }
    );
    let mut tx = pool.begin().await.unwrap();
    for i in 0..3 {
        outbox
            .publish(&mut tx, "cleanup.topic", Message::new(format!("{i}")))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let backlog = Outbox::backlog(&pool).await.unwrap();
    assert_eq!(backlog.unsent, 3);
    assert!(
        backlog.oldest_age.unwrap() >= Duration::from_millis(250),
        "{backlog:?}"
    );
    // A relay with no retention sends and then deletes them.
    let memory = MemoryBroker::new();
    let relay = fast(Relay::new(pool.clone(), Arc::new(memory)))
        .retention(Duration::ZERO)
        .cleanup_interval(Duration::from_millis(100))
        .start();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM broker_outbox")
            .fetch_one(&pool)
            .await
            .unwrap();
        if rows == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{rows} rows left");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(relay.stats().published(), 3);
    relay.stop().await.unwrap();
}

/// Relays of two outbox tables in one database (two schemas, or two
/// applications) each own all their lanes: a lane lock names its table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_of_two_schemas_keep_their_own_lanes() {
    const ROWS: usize = 40;
    let (first, second) = (pool().await, pool().await);
    let memory = MemoryBroker::new();
    let topic = unique("outbox-test.schemas");
    let mut stream = memory
        .subscribe(Subscription::new(&topic, unique("g")).with_prefetch(500))
        .await
        .unwrap();
    let relays = [
        fast(Relay::new(first.clone(), Arc::new(memory.clone()))).start(),
        fast(Relay::new(second.clone(), Arc::new(memory.clone()))).start(),
    ];
    for (n, pool) in [&first, &second].into_iter().enumerate() {
        let mut tx = pool.begin().await.unwrap();
        for i in 0..ROWS / 2 {
            let m = Message::new(format!("{n}-{i}")).with_key(format!("k{i}"));
            Outbox::new().publish(&mut tx, &topic, m).await.unwrap();
        }
        tx.commit().await.unwrap();
    }
    let got = receive(&mut stream, ROWS).await;
    assert_eq!(got.len(), ROWS, "rows of both schemas published");
    for relay in &relays {
        assert_eq!(relay.stats().lanes(), 16, "each relay owns every lane");
    }
    for relay in relays {
        relay.stop().await.unwrap();
    }
}

macro_rules! on_every_backend {
    ($($scenario:ident),*) => {
        mod memory { use super::*; $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $scenario() { if let Some(b) = backend("memory").await { super::$scenario(b).await } })* }
        mod kafka { use super::*; $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $scenario() { if let Some(b) = backend("kafka").await { super::$scenario(b).await } })* }
        mod rabbitmq { use super::*; $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $scenario() { if let Some(b) = backend("rabbitmq").await { super::$scenario(b).await } })* }
    };
}

on_every_backend!(
    rollback_publishes_nothing,
    committed_rows_survive_kill_9,
    two_relays_keep_order_and_lose_nothing,
    inbox_skips_redelivered
);
