//! The example app server over real HTTP (127.0.0.1, a free port) on
//! memory, Kafka (tansu) and RabbitMQ: POST publishes, the credits consumer
//! debits, /health answers 200, /metrics counts, and a shutdown while a debit
//! is in flight drains it: debited once, not lost, not redelivered.
//!
//! With the credits ledger on PostgreSQL (`OUTBOX_DATABASE_URL`, set by the
//! test command), on the same backends: POST records the end and its event
//! in one transaction, the relay inside the app publishes it, the consumer
//! debits it once through the inbox (a second delivery with the same id is
//! skipped), and shutdown leaves nothing committed unpublished.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broker::config::BrokerKind;
use broker::outbox::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use broker::outbox::sqlx::{self, PgPool};
use broker::testkit::unique;
use broker::{App, Brokers, Event, Publisher, PublisherExt, Received};
use examples::credits_ledger::CreditsLedger;
use examples::credits_process::{CreditsProcess, CreditsProcessEnd};
use examples::feature_usage::FeatureUsage;
use examples::server::{self, Account, Ledger, MODULES};
use serde_json::{json, Value};

/// Each debit takes this long: long enough to shut down during one.
const WORK: Duration = Duration::from_millis(1500);

fn end(process_id: &str, account: &str) -> Value {
    json!({
        "process_id": process_id,
        "account_id": account,
        "model": "small",
        "credits_used": 10,
        "status": "completed",
        "ended_at_ms": 1_700_000_000_000i64,
    })
}

/// Polls `cond` every 50 ms for at most `within`.
async fn eventually<F, Fut>(within: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + within;
    while !cond().await {
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

async fn server_works_on(kind: BrokerKind) {
    let Some(brokers) = common::brokers_for(kind).await else {
        return;
    };
    let name = unique("server");
    let prefix = unique("srv");
    let names = (
        FeatureUsage::new(&name).on_topic(format!("{prefix}.usage")),
        CreditsProcess::new(&name).with_topic_prefix(&prefix),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // As the app does at startup, before its consumers register their metrics.
    broker::prometheus::install().expect("Prometheus recorder");
    let app = App::with_brokers(brokers.clone(), MODULES)
        .unwrap()
        .shutdown_signal(async move {
            let _ = stopped.await;
        })
        .shutdown_deadline(Duration::from_secs(20));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let ledger = Arc::new(Ledger::with_work(WORK));
    let server = tokio::spawn(server::serve(
        app,
        listener,
        names.clone(),
        ledger.clone(),
        None,
    ));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let account = unique("acct");

    // The server answers once its consumers are subscribed.
    assert!(
        eventually(common::WAIT, || async {
            http.get(format!("{base}/health")).send().await.is_ok()
        })
        .await,
        "{kind}: server not up"
    );
    let res = http.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(res.status(), 200, "{kind}");
    let health: Value = res.json().await.unwrap();
    assert_eq!(health["ready"], true, "{kind}: {health}");
    assert_eq!(health["brokers"][0]["broker"], kind.to_string(), "{health}");
    assert_eq!(health["consumers"].as_array().unwrap().len(), 2, "{health}");

    // POST -> the consumer handled it.
    let res = http
        .post(format!("{base}/credits/ends"))
        .json(&end("run-1", &account))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202, "{kind}");
    let account_url = format!("{base}/credits/{account}");
    assert!(
        eventually(common::WAIT, || async {
            let a: Account = http
                .get(&account_url)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            a == Account { used: 10, ends: 1 }
        })
        .await,
        "{kind}: not debited"
    );
    // Invalid events are refused, nothing sent.
    let res = http
        .post(format!("{base}/usage"))
        .json(&json!({"user_id": "", "feature": "export", "units": 1, "used_at_ms": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 422, "{kind}");
    let res = http
        .post(format!("{base}/usage"))
        .json(&json!({"user_id": "u1", "feature": "export", "units": 3, "used_at_ms": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202, "{kind}");
    assert!(
        eventually(common::WAIT, || async { ledger.units() == 3 }).await,
        "{kind}: usage not logged"
    );

    let health: Value = http
        .get(format!("{base}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let credits = &health["consumers"][0];
    assert_eq!(credits["module"], "credits_process", "{health}");
    assert_eq!(credits["handled"], 1, "{health}");
    assert_eq!(health["consumers"][1]["handled"], 1, "{health}");
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = format!(
        "broker_consumer_handled_total{{module=\"credits_process\",topic=\"{}\",group=\"{}\"}} 1",
        names.1.end_topic, names.1.end_group
    );
    assert!(metrics.contains(&line), "{kind}: {metrics}");
    // The library's own metrics, labelled by topic, group and backend.
    let topic = format!("topic=\"{}\"", names.1.end_topic);
    for name in [
        "broker_messages_handled_total{",
        "broker_handle_duration_seconds_bucket{",
    ] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(name) && l.contains(&topic)),
            "{kind}: no {name}..{topic}: {metrics}"
        );
    }

    // Shut down while a debit is in flight: it is drained.
    let res = http
        .post(format!("{base}/credits/ends"))
        .json(&end("run-2", &account))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202, "{kind}");
    assert!(
        eventually(common::WAIT, || async { ledger.in_flight() == 1 }).await,
        "{kind}: second debit never started"
    );
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(60), server)
        .await
        .expect("shutdown within its deadline")
        .unwrap()
        .expect("clean shutdown");
    assert_eq!(
        ledger.debits_of("run-2"),
        1,
        "{kind}: in-flight debit lost ({:?}, in flight {})",
        ledger.account(&account),
        ledger.in_flight()
    );
    assert_eq!(
        ledger.account(&account),
        Account { used: 20, ends: 2 },
        "{kind}"
    );
    assert!(
        http.get(format!("{base}/health")).send().await.is_err(),
        "{kind}: still serving"
    );

    // The group goes on without run-2: it was acknowledged, not handed back.
    let again = match kind {
        BrokerKind::Memory => brokers,
        _ => common::brokers_for(kind).await.unwrap(),
    };
    let endpoints = again.endpoints(MODULES[1]).unwrap();
    let after = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = after.clone();
    let consumer = endpoints
        .consumer(&names.1.end_topic, &names.1.end_group)
        .handler(broker::typed(move |end: CreditsProcessEnd, _: Received| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(end.process_id);
                Ok(())
            }
        }))
        .start()
        .await
        .unwrap();
    if kind == BrokerKind::Memory {
        // Memory's publisher closed with the app; a message handed back
        // would come at once.
        tokio::time::sleep(Duration::from_secs(1)).await;
    } else {
        // Same account, so after run-2 in its partition or queue.
        let marker: CreditsProcessEnd = serde_json::from_value(end("marker", &account)).unwrap();
        endpoints
            .publisher
            .publish_event_to(&names.1.end_topic, &marker, None)
            .await
            .unwrap();
        assert!(
            eventually(common::WAIT, || async {
                after.lock().unwrap().contains(&"marker".to_owned())
            })
            .await,
            "{kind}: marker not delivered"
        );
    }
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    let after = after.lock().unwrap().clone();
    assert!(
        !after.iter().any(|id| id.starts_with("run-")),
        "{kind}: redelivered after shutdown: {after:?}"
    );
    again.close().await.unwrap();
}

#[tokio::test]
async fn server_over_http_memory() {
    server_works_on(BrokerKind::Memory).await;
}

#[tokio::test]
async fn server_over_http_kafka() {
    server_works_on(BrokerKind::Kafka).await;
}

#[tokio::test]
async fn server_over_http_rabbitmq() {
    server_works_on(BrokerKind::RabbitMq).await;
}

/// A pool on a fresh schema of the test database (`OUTBOX_DATABASE_URL`).
async fn pool() -> PgPool {
    let url = std::env::var("OUTBOX_DATABASE_URL")
        .expect("OUTBOX_DATABASE_URL: the test command sets it (scripts/ensure-postgres.sh)");
    let schema = unique("server").replace('-', "_");
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .expect("PostgreSQL");
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await
        .expect("schema");
    let options: PgConnectOptions = url.parse().expect("URL");
    PgPoolOptions::new()
        .max_connections(8)
        .connect_with(options.options([("search_path", schema.as_str())]))
        .await
        .expect("pool")
}

async fn outbox_server_works_on(kind: BrokerKind) {
    let Some(brokers) = common::brokers_for(kind).await else {
        return;
    };
    let name = unique("outbox-server");
    let prefix = unique("osrv");
    let names = (
        FeatureUsage::new(&name).on_topic(format!("{prefix}.usage")),
        CreditsProcess::new(&name).with_topic_prefix(&prefix),
    );
    let db = CreditsLedger::open(pool().await, names.1.clone())
        .await
        .expect("open the ledger");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let app = App::with_brokers(brokers.clone(), MODULES)
        .unwrap()
        .shutdown_signal(async move {
            let _ = stopped.await;
        })
        .shutdown_deadline(Duration::from_secs(20));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(server::serve(
        app,
        listener,
        names.clone(),
        Arc::new(Ledger::default()),
        Some(db.clone()),
    ));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let account = unique("acct");
    let account_url = format!("{base}/credits/{account}");
    let account_is = |expected: Account| {
        let (http, url) = (&http, &account_url);
        async move {
            let res = http.get(url).send().await.unwrap();
            assert_eq!(res.status(), 200, "{kind}");
            res.json::<Account>().await.unwrap() == expected
        }
    };
    assert!(
        eventually(common::WAIT, || async {
            http.get(format!("{base}/health")).send().await.is_ok()
        })
        .await,
        "{kind}: server not up"
    );
    let post = |body: Value| {
        let http = &http;
        let url = format!("{base}/credits/ends");
        async move { http.post(url).json(&body).send().await.unwrap().status() }
    };

    // Recorded and published in one transaction; relayed, then debited.
    assert_eq!(post(end("run-1", &account)).await, 202, "{kind}");
    assert!(
        eventually(common::WAIT, || account_is(Account { used: 10, ends: 1 })).await,
        "{kind}: run-1 not debited"
    );
    // The same end again: refused by the database, nothing recorded or sent.
    assert_eq!(post(end("run-1", &account)).await, 409, "{kind}");
    // An invalid end: the transaction is rolled back.
    let mut invalid = end("run-bad", &account);
    invalid["status"] = json!("exploded");
    assert_eq!(post(invalid).await, 422, "{kind}");
    assert_eq!(post(end("run-2", &account)).await, 202, "{kind}");
    assert!(
        eventually(common::WAIT, || account_is(Account { used: 20, ends: 2 })).await,
        "{kind}: run-2 not debited"
    );
    let (recorded,): (i64,) = sqlx::query_as("SELECT count(*) FROM credits_process_ends")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(recorded, 2, "{kind}: only the committed ends are recorded");

    // run-2 delivered a second time with the id the outbox gave it (as a
    // redelivery would be): the inbox skips it.
    let (id,): (String,) = sqlx::query_as(
        "SELECT message_id FROM broker_outbox WHERE convert_from(payload, 'UTF8') LIKE $1",
    )
    .bind("%\"process_id\":\"run-2\"%")
    .fetch_one(db.pool())
    .await
    .unwrap();
    let again: CreditsProcessEnd = serde_json::from_value(end("run-2", &account)).unwrap();
    brokers
        .endpoints(MODULES[1])
        .unwrap()
        .publisher
        .publish(&names.1.end_topic, again.to_message().unwrap().with_id(id))
        .await
        .unwrap();
    let handled = || async {
        let health: Value = http
            .get(format!("{base}/health"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            health["consumers"][0]["module"], "credits_process",
            "{health}"
        );
        health["consumers"][0]["handled"].as_u64().unwrap_or(0)
    };
    assert!(
        eventually(common::WAIT, || async { handled().await >= 3 }).await,
        "{kind}: the second delivery was not handled"
    );
    assert!(
        account_is(Account { used: 20, ends: 2 }).await,
        "{kind}: debited twice"
    );

    // Shutdown: the HTTP server drains, the relay stops, then the publishers
    // close; everything committed was published.
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(60), server)
        .await
        .expect("shutdown within its deadline")
        .unwrap()
        .expect("clean shutdown");
    assert_eq!(db.unpublished().await.unwrap(), 0, "{kind}");
    assert!(
        http.get(format!("{base}/health")).send().await.is_err(),
        "{kind}: still serving"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_server_over_http_memory() {
    outbox_server_works_on(BrokerKind::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_server_over_http_kafka() {
    outbox_server_works_on(BrokerKind::Kafka).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_server_over_http_rabbitmq() {
    outbox_server_works_on(BrokerKind::RabbitMq).await;
}

/// A route for a module the server does not declare stops it at startup.
#[tokio::test]
async fn unknown_route_is_refused_at_startup() {
    let err = App::from_vars(MODULES, [("BROKER_ROUTE_CREDITS", "memory")])
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("BROKER_ROUTE_CREDITS"), "{text}");
    let brokers = Brokers::connect(broker::config::BrokerConfig::memory())
        .await
        .unwrap();
    assert!(App::with_brokers(brokers, MODULES).is_ok());
}
