//! The application runtime: declared modules and the routes that name them,
//! consumers started together, the health view, and shutdown on the signal
//! draining in-flight handlers, on memory and on the test brokers
//! (`KAFKA_BROKERS`, `RABBITMQ_URL`; skipped when `BROKER_TEST_BACKENDS`
//! leaves them out).

#![cfg(feature = "app")]
// Some imports serve only the Kafka and RabbitMQ tests.
#![cfg_attr(
    not(all(feature = "kafka", feature = "rabbitmq")),
    allow(unused_imports)
)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use broker::app::Phase;
use broker::config::{BrokerConfig, BrokerKind, Route};
use broker::serde::{Deserialize, Serialize};
use broker::{
    App, BrokerError, Brokers, Endpoints, Event, HandlerError, Health, MemoryBroker, Message,
    Publisher, PublisherExt, Received, Subscriber, Subscription,
};
use broker_core::delivery::DeliveryStream;
use broker_core::testkit::{backend_selected, fast_retry, unique};
use tokio::sync::{oneshot, watch, Notify};

/// Deliveries on the test brokers (tansu's group joins take seconds).
const WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(crate = "broker::serde")]
struct Job {
    id: String,
    account: String,
    slow: bool,
}
broker::no_validation!(Job);
impl Event for Job {
    const TOPIC: &'static str = "apptest.jobs.done";
    fn partition_key(&self) -> Option<String> {
        Some(self.account.clone())
    }
}

/// Reads a job's id as a number: every `Job` fails to decode, and serde's
/// error would quote the id.
#[derive(Debug, Deserialize, Serialize)]
#[serde(crate = "broker::serde")]
struct Strict {
    id: u64,
}
broker::no_validation!(Strict);
impl Event for Strict {
    const TOPIC: &'static str = "apptest.jobs.strict";
}

fn job(id: &str, slow: bool) -> Job {
    Job {
        id: id.to_owned(),
        account: "acct-1".to_owned(),
        slow,
    }
}

fn var_of(err: &BrokerError) -> &str {
    match err {
        BrokerError::Config(e) => e.var(),
        other => panic!("expected a configuration error, got {other}"),
    }
}

/// Polls `cond` every 20 ms for at most `within`.
async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    while !cond() {
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

fn signal() -> (
    oneshot::Sender<()>,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (tx, rx) = oneshot::channel::<()>();
    (tx, async move {
        let _ = rx.await;
    })
}

#[tokio::test]
async fn a_route_for_an_undeclared_module_is_a_startup_error_naming_it() {
    let err = App::from_vars(
        ["billing", "usage"],
        [
            ("BROKER_ROUTE_BILING", "memory"),
            ("BROKER_ROUTE_USAGE", "memory"),
        ],
    )
    .await
    .unwrap_err();
    assert_eq!(var_of(&err), "BROKER_ROUTE_BILING");
    let text = err.to_string();
    assert!(text.contains("billing, usage"), "{text}");

    // Declared ones pass, in any case.
    let app = App::from_vars(["Billing"], [("BROKER_ROUTE_BILLING", "memory")])
        .await
        .expect("declared");
    assert_eq!(app.modules(), ["billing"]);
    assert_eq!(
        app.endpoints("BILLING").unwrap().route.to_string(),
        "memory"
    );

    // Also for brokers connected already.
    let brokers = Brokers::connect(
        BrokerConfig::builder()
            .route("ledger", Route::Single(BrokerKind::Memory))
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let err = App::with_brokers(brokers, ["billing"]).unwrap_err();
    assert_eq!(var_of(&err), "BROKER_ROUTE_LEDGER");
}

#[tokio::test]
async fn an_undeclared_module_in_code_is_refused() {
    let mut app = App::from_vars(["billing"], Vec::<(String, String)>::new())
        .await
        .unwrap();
    let err = app.publisher("biling").err().expect("refused").to_string();
    assert!(err.contains("`biling` is not declared"), "{err}");
    app.consume("biling", "g", |_: Job, _: Received| async { Ok(()) });
    let err = app.start().await.unwrap_err().to_string();
    assert!(err.contains("`biling` is not declared"), "{err}");
}

/// Health on memory: ready with counters and the last error, serialised;
/// 503 once shutdown began; phases in order.
#[tokio::test]
async fn health_view_counts_and_serialises() {
    let (stop, signal) = signal();
    let mut app = App::from_vars(["jobs"], Vec::<(String, String)>::new())
        .await
        .unwrap()
        .shutdown_signal(signal)
        .shutdown_deadline(Duration::from_secs(5));
    let topic = unique("apptest.health");
    let publisher = app.publisher("jobs").unwrap();
    app.consume("jobs", "workers", |job: Job, _: Received| async move {
        if job.id.starts_with("fail") {
            return Err(HandlerError::permanent(format!("job {} refused", job.id)));
        }
        Ok(())
    })
    .topic(&topic)
    .concurrency(2)
    .retry(fast_retry(2));
    // A second consumer of the same topic that cannot decode anything.
    app.consume("jobs", "strict", |_: Strict, _: Received| async { Ok(()) })
        .topic(&topic)
        .retry(fast_retry(1));
    let running = app.start().await.unwrap();
    let status = running.status();

    let report = status.health().await;
    assert!(report.ready, "{report:?}");
    assert_eq!(report.http_status(), 200);
    assert_eq!(report.phase, Phase::Running);
    assert_eq!(report.brokers.len(), 1);
    assert_eq!(report.brokers[0].broker, "memory");
    assert!(report.brokers[0].healthy);

    for id in ["a", "b", "fail-1"] {
        publisher
            .publish_event_to(&topic, &job(id, false), None)
            .await
            .unwrap();
    }
    assert!(
        eventually(Duration::from_secs(10), || {
            let c = status.consumers();
            c[0].handled == 2 && c[0].dead_lettered == 1 && c[1].dead_lettered == 3
        })
        .await,
        "{:?}",
        status.consumers()
    );
    let report = status.health().await;
    let workers = &report.consumers[0];
    assert_eq!(
        (workers.module.as_str(), workers.group.as_str()),
        ("jobs", "workers")
    );
    assert_eq!(workers.topic, topic);
    assert_eq!(workers.route, "memory");
    assert!(workers.running);
    assert_eq!(workers.failed, 1);
    assert_eq!(
        workers.last_error.as_deref(),
        Some("permanent: job fail-1 refused")
    );
    assert!(workers.last_error_at_ms.unwrap() > 1_700_000_000_000);
    // Undecodable: the kind only, never the payload's values.
    let strict = &report.consumers[1];
    assert_eq!(strict.failed, 3);
    let last = strict.last_error.clone().unwrap();
    assert!(last.starts_with("decode"), "{last}");
    assert!(
        !last.contains("acct-1") && !last.contains("fail-1"),
        "{last}"
    );

    let json = broker::serde_json::to_value(&report).unwrap();
    assert_eq!(json["ready"], true);
    assert_eq!(json["phase"], "running");
    assert_eq!(json["brokers"][0]["broker"], "memory");
    assert_eq!(json["brokers"][0]["node"], broker::serde_json::Value::Null);
    assert_eq!(
        json["consumers"][0]["stopped_by"],
        broker::serde_json::Value::Null
    );
    assert_eq!(json["consumers"][0]["handled"], 2);
    assert_eq!(json["consumers"][0]["dead_lettered"], 1);
    assert_eq!(json["consumers"][1]["failed"], 3);
    let back: broker::HealthReport = broker::serde_json::from_value(json).unwrap();
    assert_eq!(back, report);

    let text = status.prometheus_text();
    assert!(
        text.contains(&format!(
            "broker_consumer_handled_total{{module=\"jobs\",topic=\"{topic}\",group=\"workers\"}} 2"
        )),
        "{text}"
    );
    assert!(text.contains("broker_app_running 1"), "{text}");

    let mut stopping = Box::pin(status.stopping());
    assert!(
        futures::poll!(&mut stopping).is_pending(),
        "stopping resolved while running"
    );
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(20), running.run())
        .await
        .expect("shutdown within its deadline")
        .expect("clean shutdown");
    tokio::time::timeout(Duration::from_secs(1), stopping)
        .await
        .expect("stopping resolved");
    let report = status.health().await;
    assert_eq!(report.phase, Phase::Stopped);
    assert!(!report.ready);
    assert_eq!(report.http_status(), 503);
    assert!(report.consumers.iter().all(|c| !c.running));
    // Counters survive the shutdown; the publishers are closed.
    assert_eq!(report.consumers[0].handled, 2);
    assert!(publisher
        .publish_event_to(&topic, &job("late", false), None)
        .await
        .is_err());
    assert!(status.prometheus_text().contains("broker_app_running 0"));
}

/// A subscriber that takes `delay` to subscribe, like a Kafka consumer
/// waiting for its partition assignment.
struct SlowSubscriber {
    inner: MemoryBroker,
    delay: Duration,
}

#[async_trait]
impl Subscriber for SlowSubscriber {
    async fn subscribe(
        &self,
        subscription: Subscription,
    ) -> broker::Result<Box<dyn DeliveryStream>> {
        tokio::time::sleep(self.delay).await;
        self.inner.subscribe(subscription).await
    }
    async fn health(&self) -> Health {
        Health::Healthy
    }
}

#[tokio::test]
async fn consumers_start_concurrently() {
    const DELAY: Duration = Duration::from_millis(1500);
    let app = App::from_vars(["jobs"], Vec::<(String, String)>::new())
        .await
        .unwrap();
    let memory = app.brokers().memory().clone();
    let endpoints = Endpoints {
        route: Route::Single(BrokerKind::Memory),
        publisher: Arc::new(memory.clone()),
        subscriber: Arc::new(SlowSubscriber {
            inner: memory,
            delay: DELAY,
        }),
        dead_letters: Arc::new(app.brokers().memory().clone()),
    };
    let mut app = app.override_endpoints("jobs", endpoints).unwrap();
    let topic = unique("apptest.concurrent");
    for i in 0..4 {
        app.consume("jobs", &format!("group-{i}"), |_: Job, _: Received| async {
            Ok(())
        })
        .topic(&topic);
    }
    let started = Instant::now();
    let running = app.start().await.unwrap();
    let took = started.elapsed();
    // One after another would take 4 x 1.5 s.
    assert!(took >= DELAY, "{took:?}");
    assert!(
        took < DELAY * 2,
        "consumers started one after another: {took:?}"
    );
    assert_eq!(running.status().consumers().len(), 4);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_consumer_that_cannot_start_stops_the_others() {
    let mut app = App::from_vars(["jobs"], Vec::<(String, String)>::new())
        .await
        .unwrap();
    let topic = unique("apptest.fails");
    app.consume("jobs", "ok", |_: Job, _: Received| async { Ok(()) })
        .topic(&topic);
    app.consume("jobs", "bad", |_: Job, _: Received| async { Ok(()) })
        .topic("not a topic!");
    let brokers = app.brokers().clone();
    let err = app.start().await.unwrap_err();
    assert!(matches!(err, BrokerError::InvalidTopic(_)), "{err}");
    // The consumer that did start was shut down and its publisher closed.
    assert!(brokers
        .memory()
        .publish_event_to(&topic, &job("x", false), None)
        .await
        .is_err());
}

/// What the drain test's handler saw.
#[derive(Default)]
struct Seen {
    calls: Mutex<HashMap<String, u32>>,
    done: Mutex<HashMap<String, u32>>,
}

impl Seen {
    fn calls(&self, id: &str) -> u32 {
        self.calls.lock().unwrap().get(id).copied().unwrap_or(0)
    }
    fn done(&self, id: &str) -> u32 {
        self.done.lock().unwrap().get(id).copied().unwrap_or(0)
    }
}

/// Shutdown on the signal while a handler is in flight: health says 503 at
/// once, the handler finishes, its message is acknowledged (handled once,
/// not redelivered to the group afterwards), and the publishers close.
async fn shutdown_drains_in_flight(brokers: Brokers, reconnect: Option<Brokers>) {
    let kind = brokers.config().default_route().primary();
    let topic = unique("apptest.drain");
    let group = unique("drainers");
    let (stop, signal) = signal();
    let mut app = App::with_brokers(brokers.clone(), ["jobs"])
        .unwrap()
        .shutdown_signal(signal)
        .shutdown_deadline(Duration::from_secs(20));
    let publisher = app.publisher("jobs").unwrap();
    let seen = Arc::new(Seen::default());
    let started = Arc::new(Notify::new());
    let (release, released) = watch::channel(false);
    {
        let (seen, started) = (seen.clone(), started.clone());
        app.consume("jobs", &group, move |job: Job, _: Received| {
            let (seen, started, mut released) = (seen.clone(), started.clone(), released.clone());
            async move {
                *seen
                    .calls
                    .lock()
                    .unwrap()
                    .entry(job.id.clone())
                    .or_default() += 1;
                if job.slow {
                    started.notify_one();
                    // Bounded: the test releases it well before.
                    let _ = tokio::time::timeout(WAIT, released.wait_for(|r| *r)).await;
                }
                *seen.done.lock().unwrap().entry(job.id).or_default() += 1;
                Ok(())
            }
        })
        .topic(&topic);
    }
    let running = app.start().await.expect("start");
    let status = running.status();
    assert!(status.health().await.ready, "{:?}", status.health().await);
    let run = tokio::spawn(running.run());

    publisher
        .publish_event_to(&topic, &job("fast", false), None)
        .await
        .unwrap();
    assert!(
        eventually(WAIT, || seen.done("fast") == 1).await,
        "{kind}: first message not handled"
    );
    publisher
        .publish_event_to(&topic, &job("slow", true), None)
        .await
        .unwrap();
    tokio::time::timeout(WAIT, started.notified())
        .await
        .unwrap_or_else(|_| panic!("{kind}: slow handler never started"));

    stop.send(()).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || status.phase() == Phase::Stopping).await,
        "{kind}: phase {:?}",
        status.phase()
    );
    let report = status.health().await;
    assert_eq!(report.http_status(), 503, "{kind}: {report:?}");
    // Still draining: the handler waits for us.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !run.is_finished(),
        "{kind}: shutdown did not wait for the handler"
    );
    assert_eq!(seen.done("slow"), 0);
    release.send(true).unwrap();

    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("shutdown within its deadline")
        .unwrap()
        .expect("clean shutdown");
    assert_eq!(status.phase(), Phase::Stopped);
    assert_eq!((seen.calls("slow"), seen.done("slow")), (1, 1), "{kind}");
    assert_eq!(status.consumers()[0].handled, 2, "{kind}");
    assert!(
        publisher
            .publish_event_to(&topic, &job("late", false), None)
            .await
            .is_err(),
        "{kind}: publisher not closed"
    );

    // The group goes on without the slow message: it was acknowledged.
    let again = reconnect.unwrap_or(brokers);
    let endpoints = again.endpoints("jobs").unwrap();
    let after = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = after.clone();
    let consumer = endpoints
        .consumer(&topic, &group)
        .handler(broker::typed(move |job: Job, _: Received| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(job.id);
                Ok(())
            }
        }))
        .start()
        .await
        .unwrap();
    if kind == BrokerKind::Memory {
        // The memory publisher is closed for good; a message handed back
        // would come at once.
        tokio::time::sleep(Duration::from_secs(1)).await;
    } else {
        // Same key, so after "slow" in the partition or queue: once it
        // arrives, "slow" would have come first.
        endpoints
            .publisher
            .publish_event_to(&topic, &job("marker", false), None)
            .await
            .unwrap();
        assert!(
            eventually(WAIT, || after
                .lock()
                .unwrap()
                .contains(&"marker".to_owned()))
            .await,
            "{kind}: marker not delivered"
        );
    }
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    let after = after.lock().unwrap().clone();
    assert!(
        !after.contains(&"slow".to_owned()) && !after.contains(&"fast".to_owned()),
        "{kind}: redelivered after shutdown: {after:?}"
    );
    again.close().await.unwrap();
}

#[tokio::test]
async fn shutdown_drains_in_flight_memory() {
    let brokers = Brokers::connect(BrokerConfig::memory()).await.unwrap();
    shutdown_drains_in_flight(brokers, None).await;
}

#[cfg(feature = "kafka")]
fn kafka_config() -> BrokerConfig {
    use broker::config::KafkaSettings;
    let servers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    BrokerConfig::builder()
        .kafka(
            KafkaSettings::new(servers)
                .client_id("broker-app-tests")
                // tansu's first group join waits half the session timeout.
                .set("session.timeout.ms", "6000")
                .set("heartbeat.interval.ms", "1000"),
        )
        .build()
        .unwrap()
}

#[cfg(feature = "rabbitmq")]
fn rabbitmq_config() -> BrokerConfig {
    use broker::config::RabbitMqSettings;
    let url = std::env::var("RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    BrokerConfig::builder()
        .rabbitmq(RabbitMqSettings::new(url))
        .build()
        .unwrap()
}

#[cfg(feature = "kafka")]
#[tokio::test]
async fn shutdown_drains_in_flight_kafka() {
    if !backend_selected("kafka") {
        return;
    }
    let brokers = Brokers::connect(kafka_config()).await.unwrap();
    let again = Brokers::connect(kafka_config()).await.unwrap();
    shutdown_drains_in_flight(brokers, Some(again)).await;
}

#[cfg(feature = "rabbitmq")]
#[tokio::test]
async fn shutdown_drains_in_flight_rabbitmq() {
    if !backend_selected("rabbitmq") {
        return;
    }
    let brokers = Brokers::connect(rabbitmq_config()).await.unwrap();
    let again = Brokers::connect(rabbitmq_config()).await.unwrap();
    shutdown_drains_in_flight(brokers, Some(again)).await;
}

/// Health names the RabbitMQ node the connection is on.
#[cfg(feature = "rabbitmq")]
#[tokio::test]
async fn rabbitmq_health_names_the_connected_node() {
    if !backend_selected("rabbitmq") {
        return;
    }
    let config = rabbitmq_config();
    let expected = config
        .rabbitmq
        .as_ref()
        .unwrap()
        .url()
        .amqp_nodes()
        .unwrap()[0]
        .address();
    let brokers = Brokers::connect(config).await.unwrap();
    let mut app = App::with_brokers(brokers, ["jobs"]).unwrap();
    app.consume("jobs", "workers", |_: Job, _: Received| async { Ok(()) })
        .topic(unique("apptest.node"));
    let running = tokio::time::timeout(WAIT, app.start())
        .await
        .expect("start within a minute")
        .unwrap();
    let report = running.status().health().await;
    assert!(report.ready, "{report:?}");
    assert_eq!(report.brokers[0].broker, "rabbitmq");
    assert_eq!(report.brokers[0].node.as_deref(), Some(expected.as_str()));
    assert_eq!(report.consumers[0].stopped_by, None);
    running.shutdown().await.unwrap();
}

/// Three Kafka consumers (three groups) start together; prints how long.
#[cfg(feature = "kafka")]
#[tokio::test]
async fn kafka_consumers_start_together() {
    if !backend_selected("kafka") {
        return;
    }
    let brokers = Brokers::connect(kafka_config()).await.unwrap();
    let mut app = App::with_brokers(brokers, ["jobs"]).unwrap();
    let publisher = app.publisher("jobs").unwrap();
    let topic = unique("apptest.kafka-start");
    let seen = Arc::new(Mutex::new(0u32));
    for i in 0..3 {
        let seen = seen.clone();
        app.consume(
            "jobs",
            &unique(&format!("starter-{i}")),
            move |_: Job, _: Received| {
                let seen = seen.clone();
                async move {
                    *seen.lock().unwrap() += 1;
                    Ok(())
                }
            },
        )
        .topic(&topic);
    }
    let started = Instant::now();
    let running = tokio::time::timeout(WAIT, app.start())
        .await
        .expect("start within a minute")
        .unwrap();
    eprintln!("3 Kafka consumers started in {:?}", started.elapsed());
    let report = running.status().health().await;
    assert!(report.ready, "{report:?}");
    assert_eq!(report.brokers[0].broker, "kafka");
    publisher
        .publish(
            &topic,
            Message::new("{\"id\":\"k\",\"account\":\"a\",\"slow\":false}"),
        )
        .await
        .unwrap();
    assert!(eventually(WAIT, || *seen.lock().unwrap() == 3).await);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn consumer_options_reach_the_runtime_delayed_retry_and_delivery_limit() {
    let (stop, signal) = signal();
    let mut app = App::from_vars(["jobs"], Vec::<(String, String)>::new())
        .await
        .unwrap()
        .shutdown_signal(signal)
        .shutdown_deadline(Duration::from_secs(5));
    let topic = unique("apptest.delayed");
    let publisher = app.publisher("jobs").unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    app.consume("jobs", "workers", move |job: Job, r: Received| {
        record.lock().unwrap().push((job.id.clone(), r.attempt));
        async move {
            match (job.id.as_str(), r.attempt) {
                ("flaky", 1) => Err(HandlerError::retryable("first attempt fails")),
                _ => Ok(()),
            }
        }
    })
    .topic(&topic)
    .retry(
        broker::Backoff::retry_default()
            .max_attempts(2)
            .initial_delay(Duration::from_secs(1))
            .without_jitter(),
    )
    .retry_mode(broker::RetryMode::Delayed)
    .delivery_limit(Some(2));
    let running = app.start().await.unwrap();
    for id in ["flaky", "next"] {
        publisher
            .publish_event_to(&topic, &job(id, false), None)
            .await
            .unwrap();
    }
    assert!(
        eventually(Duration::from_secs(10), || seen.lock().unwrap().len() == 3).await,
        "{:?}",
        seen.lock().unwrap()
    );
    // Same key: in place, `next` would wait for `flaky`'s retry.
    assert_eq!(
        *seen.lock().unwrap(),
        [
            ("flaky".to_owned(), 1),
            ("next".to_owned(), 1),
            ("flaky".to_owned(), 2)
        ]
    );
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(20), running.run())
        .await
        .expect("shutdown within its deadline")
        .expect("clean shutdown");
}

#[tokio::test]
async fn batch_consumers_get_batches_and_report_failures() {
    let (stop, signal) = signal();
    let mut app = App::from_vars(["jobs"], Vec::<(String, String)>::new())
        .await
        .unwrap()
        .shutdown_signal(signal)
        .shutdown_deadline(Duration::from_secs(5));
    let topic = unique("apptest.batch");
    let publisher = app.publisher("jobs").unwrap();
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let record = sizes.clone();
    app.consume_batch("jobs", "bulk", move |jobs: Vec<(Job, Received)>| {
        record.lock().unwrap().push(jobs.len());
        let bad = jobs.iter().position(|(j, _)| j.id == "bad");
        async move {
            match bad {
                Some(i) => Err(broker::BatchError::failed(
                    i,
                    HandlerError::permanent("job bad refused"),
                )),
                None => Ok(()),
            }
        }
    })
    .topic(&topic)
    .batch(10, Duration::from_millis(300));
    let running = app.start().await.unwrap();
    let status = running.status();
    let jobs: Vec<Job> = (0..9)
        .map(|i| job(&format!("j{i}"), false))
        .chain([job("bad", false)])
        .collect();
    for j in &jobs {
        publisher.publish_event_to(&topic, j, None).await.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(10), || {
            let c = &status.consumers()[0];
            c.handled == 9 && c.dead_lettered == 1
        })
        .await,
        "{:?}",
        status.consumers()
    );
    // One batch of ten; the refused one (permanent) is dead-lettered at
    // once, not called again.
    assert_eq!(*sizes.lock().unwrap(), [10]);
    let report = status.health().await;
    let error = report.consumers[0]
        .last_error
        .as_ref()
        .expect("a last error");
    assert!(error.contains("job bad refused"), "{error:?}");
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(20), running.run())
        .await
        .expect("shutdown within its deadline")
        .expect("clean shutdown");
}
