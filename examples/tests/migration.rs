//! Migrating a module from RabbitMQ to Kafka while messages flow, the way
//! the README's migration guide describes:
//!
//! 1. publishers and consumers on RabbitMQ;
//! 2. a bridge (its own group) copies the topic from RabbitMQ to Kafka, and
//!    the module's consumer group starts on Kafka;
//! 3. consumer cutover: once the RabbitMQ consumers have drained what was
//!    published before the bridge existed, they stop;
//! 4. publishers go dual (RabbitMQ primary, Kafka secondary required), then
//!    Kafka only (publisher cutover);
//! 5. once the bridge has copied everything left on RabbitMQ, it stops.
//!
//! Every confirmed publish must be handled at least once; duplicates (the
//! same message id handled again) are allowed, counted and printed.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use broker::config::{BrokerConfig, BrokerKind, Route};
use broker::migrate::{bridge, SecondaryPolicy};
use broker::testkit::{backend_selected, unique};
use broker::{Brokers, Endpoints};
use broker::{ConsumerHandle, Message, Publisher, Received};

/// Messages published in each phase before moving to the next.
const PER_PHASE: usize = 150;

/// Handled message ids (with how often) and bridge fidelity problems.
#[derive(Default)]
struct Handled {
    counts: Mutex<HashMap<String, u32>>,
    by_rabbitmq: AtomicUsize,
    by_kafka: AtomicUsize,
    altered: Mutex<Vec<String>>,
}

impl Handled {
    fn record(&self, r: &Received, on_kafka: bool) {
        let m = &r.message;
        // What the publisher set must arrive unchanged, also through the bridge.
        let seq = m.headers().get_str("seq").unwrap_or_default().to_owned();
        let expected_key = seq.parse::<usize>().map(|s| format!("k{}", s % 8)).ok();
        if expected_key.as_deref() != m.key_str()
            || m.payload() != format!("event {seq}").as_bytes()
        {
            self.altered.lock().unwrap().push(format!("{m:?}"));
        }
        *self
            .counts
            .lock()
            .unwrap()
            .entry(m.id().to_owned())
            .or_default() += 1;
        let by = if on_kafka {
            &self.by_kafka
        } else {
            &self.by_rabbitmq
        };
        by.fetch_add(1, Ordering::Relaxed);
    }

    fn ids(&self) -> BTreeSet<String> {
        self.counts.lock().unwrap().keys().cloned().collect()
    }

    fn duplicates(&self) -> u32 {
        self.counts.lock().unwrap().values().map(|c| c - 1).sum()
    }
}

/// Publishes continuously through whatever publisher is current, recording
/// the id of every confirmed publish.
struct Traffic {
    current: RwLock<Arc<dyn Publisher>>,
    confirmed: Mutex<Vec<String>>,
    stop: AtomicBool,
}

impl Traffic {
    fn confirmed(&self) -> usize {
        self.confirmed.lock().unwrap().len()
    }

    fn switch_to(&self, publisher: Arc<dyn Publisher>) {
        *self.current.write().unwrap() = publisher;
    }

    async fn run(self: Arc<Self>, topic: String) {
        let mut seq = 0usize;
        while !self.stop.load(Ordering::Relaxed) {
            let publisher = self.current.read().unwrap().clone();
            let message = Message::new(format!("event {seq}"))
                .with_key(format!("k{}", seq % 8))
                .with_header("seq", seq.to_string());
            let id = message.id().to_owned();
            match publisher.publish(&topic, message).await {
                Ok(()) => self.confirmed.lock().unwrap().push(id),
                // Not confirmed: the publisher would retry; a loss is only a
                // confirmed message never handled.
                Err(e) => eprintln!("publish {seq} failed: {e}"),
            }
            seq += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn consumer(
    endpoints: &Endpoints,
    topic: &str,
    group: &str,
    handled: &Arc<Handled>,
    on_kafka: bool,
) -> ConsumerHandle {
    let handled = handled.clone();
    endpoints
        .consumer(topic, group)
        .concurrency(4)
        .handler(move |r: Received| {
            handled.record(&r, on_kafka);
            async { Ok(()) }
        })
        .start()
        .await
        .expect("consumer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_moves_from_rabbitmq_to_kafka_mid_stream_losing_nothing() {
    if !backend_selected("kafka") || !backend_selected("rabbitmq") {
        return;
    }
    let config = BrokerConfig::builder()
        .kafka(common::kafka_settings())
        .rabbitmq(common::rabbitmq_settings())
        .build()
        .expect("config");
    let brokers = Brokers::connect(config)
        .await
        .expect("connect")
        .with_dual_policy(SecondaryPolicy::Required);
    let on_rabbitmq = brokers
        .endpoints_for(Route::Single(BrokerKind::RabbitMq))
        .unwrap();
    let dual = brokers
        .endpoints_for(Route::Dual {
            primary: BrokerKind::RabbitMq,
            secondary: BrokerKind::Kafka,
        })
        .unwrap();
    let on_kafka = brokers
        .endpoints_for(Route::Single(BrokerKind::Kafka))
        .unwrap();
    let topic = unique("migration.usage");
    let group = unique("app-feature-usage-group");
    let handled = Arc::new(Handled::default());

    // 1. Everything on RabbitMQ.
    let rabbitmq_consumer = consumer(&on_rabbitmq, &topic, &group, &handled, false).await;
    let traffic = Arc::new(Traffic {
        current: RwLock::new(on_rabbitmq.publisher.clone()),
        confirmed: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
    });
    let publishing = tokio::spawn(traffic.clone().run(topic.clone()));
    wait_for("phase 1 traffic", || traffic.confirmed() >= PER_PHASE).await;

    // 2. Bridge RabbitMQ → Kafka in its own group; the group starts on Kafka.
    let rabbit = brokers.rabbitmq().unwrap().clone();
    let kafka = brokers.kafka().unwrap().clone();
    let bridging = bridge(rabbit, kafka, &topic, format!("{group}-bridge"))
        .concurrency(4)
        .start()
        .await
        .expect("bridge");
    let before_bridge: BTreeSet<String> =
        traffic.confirmed.lock().unwrap().iter().cloned().collect();
    let kafka_consumer = consumer(&on_kafka, &topic, &group, &handled, true).await;
    let mark = traffic.confirmed();
    wait_for("bridged traffic on Kafka", || {
        handled.by_kafka.load(Ordering::Relaxed) > 0 && traffic.confirmed() >= mark + PER_PHASE
    })
    .await;

    // 3. Consumer cutover: the RabbitMQ consumers finish what only they can
    // see (published before the bridge's queue existed), then stop.
    wait_for("RabbitMQ consumer drained the pre-bridge messages", || {
        handled.ids().is_superset(&before_bridge)
    })
    .await;
    rabbitmq_consumer
        .shutdown(Duration::from_secs(10))
        .await
        .expect("stop the RabbitMQ consumer");

    // 4. Publishers: dual, then Kafka only.
    traffic.switch_to(dual.publisher.clone());
    let mark = traffic.confirmed();
    wait_for("dual traffic", || traffic.confirmed() >= mark + PER_PHASE).await;
    traffic.switch_to(on_kafka.publisher.clone());
    let mark = traffic.confirmed();
    wait_for("Kafka-only traffic", || {
        traffic.confirmed() >= mark + PER_PHASE
    })
    .await;
    traffic.stop.store(true, Ordering::Relaxed);
    publishing.await.expect("publisher task");

    // 5. Everything confirmed gets handled (some of it via the bridge), then
    // the bridge stops.
    let confirmed: BTreeSet<String> = traffic.confirmed.lock().unwrap().iter().cloned().collect();
    let deadline = tokio::time::Instant::now() + common::WAIT * 2;
    while !handled.ids().is_superset(&confirmed) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let missing: Vec<String> = confirmed.difference(&handled.ids()).cloned().collect();
    bridging
        .shutdown(Duration::from_secs(10))
        .await
        .expect("stop the bridge");
    kafka_consumer
        .shutdown(Duration::from_secs(10))
        .await
        .expect("stop the Kafka consumer");

    let duplicates = handled.duplicates();
    eprintln!(
        "migration: {} confirmed, {} handled on RabbitMQ, {} on Kafka, {} duplicates",
        confirmed.len(),
        handled.by_rabbitmq.load(Ordering::Relaxed),
        handled.by_kafka.load(Ordering::Relaxed),
        duplicates
    );
    assert!(
        missing.is_empty(),
        "{} confirmed messages never handled: {missing:?}",
        missing.len()
    );
    let altered = handled.altered.lock().unwrap();
    assert!(
        altered.is_empty(),
        "messages changed on the way: {altered:?}"
    );
    assert!(confirmed.len() >= 4 * PER_PHASE);
    assert!(handled.by_rabbitmq.load(Ordering::Relaxed) >= PER_PHASE);
    assert!(handled.by_kafka.load(Ordering::Relaxed) >= 2 * PER_PHASE);
}
