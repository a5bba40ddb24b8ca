//! Reconnection under fire: the broker drops every connection, or restarts,
//! twice while 10,000 messages flow. Every confirmed message must be
//! consumed; duplicates are allowed (at-least-once) and reported.
//!
//! These tests disturb every client of the broker, so their names contain
//! `rabbitmq_chaos`: `scripts/test.sh` runs them alone, after the others.
//! They need `rabbitmqctl` on this machine, talking to the broker under test.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker_core::testkit::unique;
use broker_core::{Message, Publisher, Subscriber, Subscription};

const MESSAGES: usize = 10_000;
const BATCH: usize = 50;
const PACE: Duration = Duration::from_millis(40);

/// Chaos tests in this binary run one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn rabbitmqctl(args: &[&str]) {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .await
        .expect("run rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[derive(Default)]
struct Tally {
    confirmed: BTreeSet<String>,
    failed_publishes: usize,
    received: HashMap<String, usize>,
}

/// Publishes `MESSAGES` in batches while a subscriber consumes and acks;
/// calls `disrupt` once after a third and once after two thirds were
/// published; then checks every confirmed message arrived.
async fn flow_through<F, Fut>(disrupt: F)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let _alone = ONE_AT_A_TIME.lock().await;
    let topic = unique("rmq.chaos");
    let group = unique("g");
    let tally = Arc::new(Mutex::new(Tally::default()));

    let subscriber = common::broker().await;
    let mut stream = subscriber
        .subscribe(Subscription::new(&topic, &group).with_prefetch(200))
        .await
        .expect("subscribe");
    let consuming = {
        let tally = tally.clone();
        tokio::spawn(async move {
            while let Some(d) = stream.next().await {
                let d = d.expect("subscription gave up");
                *tally
                    .lock()
                    .unwrap()
                    .received
                    .entry(d.message().id().to_owned())
                    .or_default() += 1;
                // An ack on a channel lost meanwhile fails; RabbitMQ redelivers.
                let _ = d.ack().await;
            }
        })
    };

    let publisher = common::broker().await;
    let disrupt = Arc::new(disrupt);
    let mut disruptions = Vec::new();
    for (n, i) in (0..MESSAGES).step_by(BATCH).enumerate() {
        let batches = MESSAGES / BATCH;
        if n == batches / 3 || n == 2 * batches / 3 {
            let disrupt = disrupt.clone();
            disruptions.push(tokio::spawn(async move { disrupt().await }));
        }
        let batch: Vec<Message> = (i..(i + BATCH).min(MESSAGES))
            .map(|k| Message::new(format!("chaos-{k}")).with_key(format!("k{}", k % 10)))
            .collect();
        let ids: Vec<String> = batch.iter().map(|m| m.id().to_owned()).collect();
        let failed: BTreeSet<usize> = match publisher.publish_batch(&topic, batch).await {
            Ok(()) => BTreeSet::new(),
            Err(broker_core::BrokerError::Batch { failed, .. }) => {
                failed.iter().map(|f| f.index).collect()
            }
            Err(e) => panic!("batch refused as a whole: {e}"),
        };
        {
            let mut t = tally.lock().unwrap();
            t.failed_publishes += failed.len();
            for (k, id) in ids.into_iter().enumerate() {
                if !failed.contains(&k) {
                    t.confirmed.insert(id);
                }
            }
        }
        // Paced, so that the disruptions hit a flow that is still going.
        tokio::time::sleep(PACE).await;
    }
    for d in disruptions {
        d.await.expect("disruption");
    }

    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (missing, duplicates, failed) = {
            let t = tally.lock().unwrap();
            let missing = t
                .confirmed
                .iter()
                .filter(|id| !t.received.contains_key(*id))
                .count();
            let duplicates: usize = t.received.values().map(|c| c - 1).sum();
            (missing, duplicates, t.failed_publishes)
        };
        if missing == 0 {
            eprintln!(
                "chaos: {} confirmed, {failed} publishes failed, all confirmed consumed, {duplicates} duplicate deliveries",
                tally.lock().unwrap().confirmed.len()
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{missing} confirmed messages never consumed ({duplicates} duplicates so far)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let confirmed = tally.lock().unwrap().confirmed.len();
    assert!(
        confirmed >= MESSAGES * 9 / 10,
        "only {confirmed} of {MESSAGES} publishes confirmed"
    );
    consuming.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_chaos_close_all_connections() {
    if !broker_core::testkit::backend_selected("rabbitmq") {
        return;
    }
    flow_through(|| async {
        rabbitmqctl(&["close_all_connections", "chaos test"]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_chaos_restart_broker() {
    if !broker_core::testkit::backend_selected("rabbitmq") {
        return;
    }
    flow_through(|| async {
        rabbitmqctl(&["stop_app"]).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        rabbitmqctl(&["start_app"]).await;
    })
    .await;
}
