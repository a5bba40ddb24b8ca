//! A real three-node RabbitMQ cluster of private nodes
//! (`scripts/rabbitmq-cluster.sh`; the test command starts it and sets
//! `RABBITMQ_CLUSTER_URLS` to its three node URLs). Without that variable
//! the tests say "skipped". They run one at a time (`.config/nextest.toml`,
//! group `rabbitmq-cluster`): each kills or stops nodes of that cluster, and
//! never touches any other RabbitMQ node.
//!
//! Each test publishes at least [`MESSAGES`] messages with confirms through
//! a quorum queue, [`IN_FLIGHT`] at a time, while one subscription handles
//! them, and injects a failure mid-stream. Each asserts:
//! - every publish that was confirmed is handled (0 lost);
//! - duplicates (a handler call for a message already handled) at most the
//!   in-flight window: the subscription's prefetch plus the publishes in
//!   flight, which may be sent again;
//! - the longest pause between two handled messages below the bound the
//!   README documents ("Running on a cluster"). The figures are printed.

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broker_core::testkit::{backend_selected, unique};
use broker_core::{Backoff, BrokerError, Message, Publisher, Subscriber, Subscription};
use broker_rabbitmq::RabbitMqBroker;
use futures::stream::{FuturesUnordered, StreamExt};

/// Messages each test publishes at least (it goes on publishing until its
/// failure is over).
const MESSAGES: usize = 10_000;
/// Publishes awaiting their confirm at once.
const IN_FLIGHT: usize = 16;
/// The subscription's prefetch.
const PREFETCH: usize = 50;
/// How long a test waits, once publishing ended, for every confirmed
/// message to be handled.
const DRAIN: Duration = Duration::from_secs(60);

/// The cluster's node URLs (in node order 1, 2, 3), when the test command started it.
fn cluster() -> Option<Vec<String>> {
    // The library's logs, with RUST_LOG (e.g. `broker_rabbitmq=debug`).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    if !backend_selected("rabbitmq") {
        return None;
    }
    match std::env::var("RABBITMQ_CLUSTER_URLS") {
        Ok(urls) => Some(urls.split(',').map(str::to_owned).collect()),
        Err(_) => {
            eprintln!(
                "skipped: RABBITMQ_CLUSTER_URLS not set (bash scripts/rabbitmq-cluster.sh up)"
            );
            None
        }
    }
}

/// Runs `scripts/rabbitmq-cluster.sh ARGS`, returning its output; panics on failure.
fn script(args: &[&str]) -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/rabbitmq-cluster.sh"
    );
    let out = Command::new("bash")
        .arg(path)
        .args(args)
        .output()
        .expect("run rabbitmq-cluster.sh");
    assert!(
        out.status.success(),
        "rabbitmq-cluster.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

async fn run_script(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        script(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .expect("script task")
}

/// Starts every node of ours that is down, so each test begins with three.
async fn all_up() {
    for node in 1..=3 {
        run_script(&["start", &node.to_string()]).await;
    }
    eprintln!("three nodes up");
}

/// Closes the test's clients, each close bounded.
async fn close_all(brokers: &[&RabbitMqBroker]) {
    for broker in brokers {
        tokio::time::timeout(Duration::from_secs(20), broker.close())
            .await
            .expect("close within 20 s")
            .ok();
    }
}

/// The node (1, 2 or 3) leading `queue`'s Raft group.
async fn leader(queue: &str) -> usize {
    let name = run_script(&["leader", queue]).await;
    name.strip_prefix("rmqc")
        .and_then(|rest| rest.chars().next())
        .and_then(|c| c.to_digit(10))
        .unwrap_or_else(|| panic!("leader of {queue}: `{name}`")) as usize
}

/// A node list of the cluster in the order `order` (node numbers).
fn node_list(urls: &[String], order: &[usize]) -> String {
    order
        .iter()
        .map(|n| urls[n - 1].as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// The node (1, 2 or 3) a broker is connected to, from its health report.
fn node_of(broker: &RabbitMqBroker, urls: &[String]) -> Option<usize> {
    let address = Publisher::connected_node(broker)?;
    urls.iter()
        .position(|u| u.contains(address.split('/').next().unwrap_or_default()))
        .map(|i| i + 1)
}

fn client(list: String, name: &str) -> broker_rabbitmq::RabbitMqBuilder {
    RabbitMqBroker::builder(list)
        .exchange("broker.test")
        .queue_expiry(Duration::from_secs(300))
        .connection_name(format!("cluster test {name}"))
        .confirm_timeout(Duration::from_secs(10))
        .operation_timeout(Duration::from_secs(5))
}

/// The number a test message carries (its payload).
fn number(delivery: &broker_core::Delivery) -> u64 {
    std::str::from_utf8(delivery.message().payload())
        .ok()
        .and_then(|s| s.parse().ok())
        .expect("a test payload")
}

/// What the consumer saw: handled ids with when, and duplicates.
#[derive(Default)]
struct Seen {
    first: HashMap<u64, Instant>,
    calls: usize,
    last: Option<Instant>,
    longest_gap: Duration,
}

impl Seen {
    fn handled(&mut self, n: u64) {
        let now = Instant::now();
        self.calls += 1;
        self.first.entry(n).or_insert(now);
        if let Some(last) = self.last {
            self.longest_gap = self.longest_gap.max(now - last);
        }
        self.last = Some(now);
    }
    fn duplicates(&self) -> usize {
        self.calls - self.first.len()
    }
}

/// What a run measured.
struct Outcome {
    confirmed: Vec<u64>,
    failed: usize,
    duplicates: usize,
    longest_gap: Duration,
}

/// Subscribes through `consumer`, publishes through `publisher` until at
/// least [`MESSAGES`] were published and `fault` has finished, then waits
/// for every confirmed message to be handled (at most [`DRAIN`]).
async fn run<F>(
    publisher: &RabbitMqBroker,
    consumer: &RabbitMqBroker,
    topic: &str,
    fault: F,
) -> Outcome
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let mut stream = consumer
        .subscribe(Subscription::new(topic, "cluster").with_prefetch(PREFETCH))
        .await
        .expect("subscribe");
    eprintln!("{topic}: subscribed");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let reader = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(delivery) = stream.next().await {
                let Ok(delivery) = delivery else {
                    panic!("the subscription ended with an error: {:?}", delivery.err());
                };
                seen.lock().unwrap().handled(number(&delivery));
                // A failed ack is redelivered: counted as a duplicate then.
                let _ = delivery.ack().await;
            }
        })
    };
    let fault = tokio::spawn(fault);
    let mut confirmed = Vec::new();
    let mut failed = 0;
    let mut pending = FuturesUnordered::new();
    let mut next = 0u64;
    loop {
        let more = (next as usize) < MESSAGES || !fault.is_finished();
        if more && pending.len() < IN_FLIGHT {
            let n = next;
            next += 1;
            pending.push(async move {
                (
                    n,
                    publisher.publish(topic, Message::new(n.to_string())).await,
                )
            });
            continue;
        }
        match pending.next().await {
            Some((n, Ok(()))) => {
                confirmed.push(n);
                if confirmed.len() % 5000 == 0 {
                    eprintln!("{topic}: {} confirmed", confirmed.len());
                }
            }
            Some((_, Err(e))) => {
                assert!(e.is_transient(), "a publish failed with a final error: {e}");
                failed += 1;
                // An outage: do not spin through failures.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            None if !more => break,
            None => {}
        }
    }
    fault.await.expect("fault task");
    eprintln!(
        "{topic}: publishing ended ({} confirmed, {failed} failed)",
        confirmed.len()
    );
    let deadline = Instant::now() + DRAIN;
    loop {
        let missing = {
            let seen = seen.lock().unwrap();
            confirmed
                .iter()
                .filter(|n| !seen.first.contains_key(n))
                .count()
        };
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} confirmed messages not handled within {DRAIN:?} after publishing ended",
            confirmed.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    reader.abort();
    eprintln!("{topic}: every confirmed message handled");
    let s = seen.lock().unwrap();
    Outcome {
        confirmed,
        failed,
        duplicates: s.duplicates(),
        longest_gap: s.longest_gap,
    }
}

/// The common assertions, and the figures for the README.
fn check(name: &str, outcome: &Outcome, pause_bound: Duration) {
    eprintln!(
        "{name}: {} confirmed, {} publishes failed, {} duplicates, longest pause {:?}",
        outcome.confirmed.len(),
        outcome.failed,
        outcome.duplicates,
        outcome.longest_gap
    );
    assert!(
        outcome.confirmed.len() >= MESSAGES / 2,
        "{name}: too few confirmed"
    );
    assert!(
        outcome.duplicates <= PREFETCH + IN_FLIGHT,
        "{name}: {} duplicates, above the in-flight window {}",
        outcome.duplicates,
        PREFETCH + IN_FLIGHT
    );
    assert!(
        outcome.longest_gap <= pause_bound,
        "{name}: handling paused {:?}, above the bound {pause_bound:?}",
        outcome.longest_gap
    );
}

/// The pause bound when a queue's leader dies while the clients are
/// connected elsewhere (README "Running on a cluster").
const LEADER_KILLED_BOUND: Duration = Duration::from_secs(10);
/// The pause bound when the node the clients are connected to dies.
const CONNECTED_KILLED_BOUND: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_cluster_queue_leader_killed_while_connected_elsewhere() {
    let Some(urls) = cluster() else { return };
    all_up().await;
    let topic = unique("rmq.cluster.leader");
    let queue = RabbitMqBroker::queue_name(&topic, "cluster");
    // Declared through node 1, so node 1 leads; the clients then use node 2.
    let declare = client(node_list(&urls, &[1]), "declare")
        .connect()
        .await
        .expect("node 1");
    declare
        .declare_topic(&topic, &["cluster"])
        .await
        .expect("declare");
    declare.close().await.expect("close");
    let leader = leader(&queue).await;
    let others: Vec<usize> = (1..=3).filter(|n| *n != leader).collect();
    let list = node_list(&urls, &[others[0], others[1], leader]);
    let publisher = client(list.clone(), "publisher")
        .connect()
        .await
        .expect("connect");
    let consumer = client(list, "consumer").connect().await.expect("connect");
    assert_eq!(node_of(&publisher, &urls), Some(others[0]));
    let killed = Arc::new(Mutex::new(None));
    let fault = {
        let killed = killed.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            run_script(&["kill9", &leader.to_string()]).await;
            *killed.lock().unwrap() = Some(Instant::now());
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
    };
    let outcome = run(&publisher, &consumer, &topic, fault).await;
    check("queue leader killed", &outcome, LEADER_KILLED_BOUND);
    assert_eq!(
        node_of(&consumer, &urls),
        Some(others[0]),
        "stayed on its node"
    );
    let new_leader = self::leader(&queue).await;
    assert_ne!(new_leader, leader, "the queue has a new leader");
    close_all(&[&publisher, &consumer]).await;
    all_up().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_cluster_connected_node_killed_clients_move_to_the_others() {
    let Some(urls) = cluster() else { return };
    all_up().await;
    let topic = unique("rmq.cluster.connected");
    let list = node_list(&urls, &[1, 2, 3]);
    let publisher = client(list.clone(), "publisher")
        .connect()
        .await
        .expect("connect");
    let consumer = client(list, "consumer").connect().await.expect("connect");
    assert_eq!(node_of(&consumer, &urls), Some(1));
    let fault = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        // Node 1 stays down until the end: the clients go on through 2 and 3.
        run_script(&["kill9", "1"]).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    };
    let outcome = run(&publisher, &consumer, &topic, fault).await;
    check("connected node killed", &outcome, CONNECTED_KILLED_BOUND);
    assert_eq!(node_of(&consumer, &urls), Some(2), "moved to the next node");
    assert_eq!(
        node_of(&publisher, &urls),
        Some(2),
        "moved to the next node"
    );
    close_all(&[&publisher, &consumer]).await;
    all_up().await;
}

/// Bound on the pause of a rolling restart: each node's clean stop moves
/// its clients at once; the queue's leader moves with a clean stop too.
const ROLLING_BOUND: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_cluster_rolling_restart_under_load() {
    let Some(urls) = cluster() else { return };
    all_up().await;
    let topic = unique("rmq.cluster.rolling");
    let publisher = client(node_list(&urls, &[1, 2, 3]), "publisher")
        .connect()
        .await
        .expect("connect");
    let consumer = client(node_list(&urls, &[2, 3, 1]), "consumer")
        .connect()
        .await
        .expect("connect");
    let fault = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for node in ["1", "2", "3"] {
            run_script(&["stop", node]).await;
            run_script(&["start", node]).await;
        }
    };
    let outcome = run(&publisher, &consumer, &topic, fault).await;
    check("rolling restart", &outcome, ROLLING_BOUND);
    close_all(&[&publisher, &consumer]).await;
    all_up().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_cluster_quorum_lost_publishes_fail_typed_then_resume() {
    let Some(urls) = cluster() else { return };
    all_up().await;
    let topic = unique("rmq.cluster.quorum");
    let list = node_list(&urls, &[1, 2, 3]);
    let confirm_timeout = Duration::from_secs(5);
    let publisher = client(list.clone(), "publisher")
        .confirm_timeout(confirm_timeout)
        .connect()
        .await
        .expect("connect");
    let consumer = client(list, "consumer").connect().await.expect("connect");
    let mut stream = consumer
        .subscribe(Subscription::new(&topic, "cluster").with_prefetch(PREFETCH))
        .await
        .expect("subscribe");
    let mut confirmed = Vec::new();
    for n in 0..100u64 {
        publisher
            .publish(&topic, Message::new(n.to_string()))
            .await
            .expect("publish with three nodes");
        confirmed.push(n);
    }
    // Nodes 2 and 3 down: node 1 is up, but its queues have no quorum.
    run_script(&["kill9", "2"]).await;
    run_script(&["kill9", "3"]).await;
    // Ten at once: each fails within the publish timeout, with a typed error.
    let tries = (100..110u64).map(|n| {
        let publisher = &publisher;
        let topic = &topic;
        async move {
            let started = Instant::now();
            let result = publisher.publish(topic, Message::new(n.to_string())).await;
            (n, result, started.elapsed())
        }
    });
    let mut refused = 0;
    for (n, result, took) in futures::future::join_all(tries).await {
        match result {
            Ok(()) => confirmed.push(n),
            Err(e) => {
                assert!(
                    matches!(
                        e,
                        BrokerError::Timeout { .. } | BrokerError::Unavailable { .. }
                    ),
                    "a typed outage error, not {e:?}"
                );
                assert!(
                    took <= confirm_timeout + Duration::from_secs(2),
                    "failed after {took:?}, past the publish timeout {confirm_timeout:?}"
                );
                refused += 1;
            }
        }
    }
    assert!(
        refused >= 9,
        "publishes without quorum failed: {refused} of 10"
    );
    // A node returns: quorum again, and everything resumes.
    run_script(&["start", "2"]).await;
    let started = Instant::now();
    let mut after = Vec::new();
    for n in 1000..1100u64 {
        loop {
            match publisher.publish(&topic, Message::new(n.to_string())).await {
                Ok(()) => break,
                Err(e) if e.is_transient() => {
                    assert!(
                        started.elapsed() < Duration::from_secs(60),
                        "publishing did not resume within 60 s: {e}"
                    );
                }
                Err(e) => panic!("{e}"),
            }
        }
        after.push(n);
    }
    eprintln!(
        "quorum lost: publishing resumed {:?} after the node started",
        started.elapsed()
    );
    confirmed.extend(after);
    let mut handled = std::collections::HashSet::new();
    let deadline = Instant::now() + DRAIN;
    while !confirmed.iter().all(|n| handled.contains(n)) {
        let left = deadline.saturating_duration_since(Instant::now());
        let delivery = tokio::time::timeout(left, stream.next())
            .await
            .unwrap_or_else(|_| {
                let missing = confirmed.iter().filter(|n| !handled.contains(*n)).count();
                panic!("{missing} confirmed messages not handled within {DRAIN:?}")
            })
            .expect("stream open")
            .expect("delivery");
        handled.insert(number(&delivery));
        let _ = delivery.ack().await;
    }
    stream.close().await.ok();
    close_all(&[&publisher, &consumer]).await;
    all_up().await;
}

/// The default resubscribe policy outlasts any outage: a subscription on
/// one node (no node list) whose node is down for 60 s, twice the default
/// reconnect policy's 30 s, resumes when it returns, with no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_cluster_subscription_outlives_a_60_s_outage_of_its_node() {
    let Some(urls) = cluster() else { return };
    all_up().await;
    let topic = unique("rmq.cluster.outage");
    // Only node 3: this client has nowhere else to go.
    let consumer = RabbitMqBroker::builder(urls[2].clone())
        .exchange("broker.test")
        .queue_expiry(Duration::from_secs(300))
        .connect()
        .await
        .expect("node 3");
    let publisher = client(node_list(&urls, &[1, 2]), "publisher")
        .connect()
        .await
        .expect("connect");
    let mut stream = consumer
        .subscribe(Subscription::new(&topic, "cluster"))
        .await
        .expect("subscribe");
    // In full flow first (a quorum queue killed the instant it is declared
    // has followers that may not have started yet).
    publisher
        .publish(&topic, Message::new("1000"))
        .await
        .expect("publish");
    let warm = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("first message")
        .expect("open")
        .expect("delivery");
    warm.ack().await.expect("ack");
    run_script(&["kill9", "3"]).await;
    let down = Instant::now();
    for n in 0..100u64 {
        publisher
            .publish(&topic, Message::new(n.to_string()))
            .await
            .expect("publish through nodes 1 and 2");
    }
    tokio::time::sleep(Duration::from_secs(60).saturating_sub(down.elapsed())).await;
    assert!(
        !Publisher::health(&consumer).await.is_healthy(),
        "health reports the outage"
    );
    run_script(&["start", "3"]).await;
    let back = Instant::now();
    let mut handled = std::collections::HashSet::new();
    while handled.len() < 100 {
        let delivery = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .expect("resumed within 60 s of the node's return")
            .expect("the subscription did not end")
            .expect("not an error");
        handled.insert(number(&delivery));
        delivery.ack().await.expect("ack");
    }
    eprintln!(
        "60 s outage: all 100 handled {:?} after the node returned",
        back.elapsed()
    );
    assert!(Publisher::health(&consumer).await.is_healthy());
    stream.close().await.ok();
    close_all(&[&publisher, &consumer]).await;
}

/// A bounded resubscribe policy is kept as given: once it runs out, the
/// stream ends with [`BrokerError::Unavailable`].
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_cluster_bounded_resubscribe_policy_ends_the_stream_typed() {
    let Some(urls) = cluster() else { return };
    all_up().await;
    let topic = unique("rmq.cluster.bounded");
    let quick = Backoff::reconnect_default()
        .max_attempts(2)
        .initial_delay(Duration::from_millis(100))
        .within(Duration::from_secs(2));
    let consumer = RabbitMqBroker::builder(urls[2].clone())
        .exchange("broker.test")
        .queue_expiry(Duration::from_secs(300))
        .reconnect(quick.clone())
        .resubscribe(quick)
        .connect()
        .await
        .expect("node 3");
    let mut stream = consumer
        .subscribe(Subscription::new(&topic, "cluster"))
        .await
        .expect("subscribe");
    run_script(&["kill9", "3"]).await;
    let ended = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("the bounded policy ran out within 30 s");
    match ended {
        Some(Err(BrokerError::Unavailable { .. })) => {}
        other => panic!(
            "expected Unavailable, got {:?}",
            other.map(|r| r.map(|_| ()))
        ),
    }
    all_up().await;
}
