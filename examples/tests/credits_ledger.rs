//! The credits-process module with the outbox and inbox, against a real
//! PostgreSQL (`OUTBOX_DATABASE_URL`, started by the test command) on every
//! backend: recorded ends are published (rolled-back ones are not), and each
//! is debited once although every message is delivered twice.

mod common;

use std::time::Duration;

use broker::config::BrokerKind;
use broker::outbox::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use broker::outbox::sqlx::{self, PgPool};
use broker::testkit::unique;
use broker::{Event, Publisher};
use common::{brokers_for, WAIT};
use examples::credits_ledger::CreditsLedger;
use examples::credits_process::{CreditsProcess, CreditsProcessEnd, MODULE};

/// A pool on a fresh schema of the test database.
async fn pool() -> PgPool {
    let url = std::env::var("OUTBOX_DATABASE_URL")
        .expect("OUTBOX_DATABASE_URL: the test command sets it (scripts/ensure-postgres.sh)");
    let schema = unique("credits").replace('-', "_");
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

fn end(i: u64, account: &str) -> CreditsProcessEnd {
    CreditsProcessEnd {
        process_id: format!("p-{i}"),
        account_id: account.to_owned(),
        model: "m".into(),
        credits_used: i,
        status: "completed".into(),
        ended_at_ms: 1_700_000_000_000,
    }
}

async fn debits_once(kind: BrokerKind) {
    let Some(brokers) = brokers_for(kind).await else {
        return;
    };
    let endpoints = brokers.endpoints(MODULE).expect("endpoints");
    let module = CreditsProcess::new(&unique("app")).with_topic_prefix(&unique("ledger"));
    let ledger = CreditsLedger::open(pool().await, module.clone())
        .await
        .expect("open the ledger");
    let account = unique("acct");
    // The consumer first: RabbitMQ keeps messages for queues that exist.
    let debits = ledger.start_debits(&endpoints).await.expect("debits");
    let relay = ledger.start_relay(&endpoints);

    let mut expected = 0;
    for i in 1..=10 {
        let commit = i != 5;
        ledger.record_end(&end(i, &account), commit).await.unwrap();
        if commit {
            expected += i as i64;
        }
    }
    // Every committed end delivered a second time, with its id: as a
    // redelivery after a crash between the debit's commit and its ack would.
    let deadline = tokio::time::Instant::now() + WAIT;
    while relay.stats().published() < 9 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "relay published {}",
            relay.stats().published()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in (1..=10).filter(|i| *i != 5) {
        let again = end(i, &account).to_message().unwrap();
        // Same content, and the id the outbox gave the original: read it back.
        let (id,): (String,) = sqlx::query_as(
            "SELECT message_id FROM broker_outbox WHERE convert_from(payload, 'UTF8') LIKE $1",
        )
        .bind(format!("%\"process_id\":\"p-{i}\"%"))
        .fetch_one(ledger.pool())
        .await
        .unwrap();
        endpoints
            .publisher
            .publish(&module.end_topic, again.with_id(id))
            .await
            .unwrap();
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let debited = ledger.debited(&account).await.unwrap();
        assert!(
            debited <= expected,
            "{kind:?}: debited {debited} > {expected}"
        );
        if debited == expected {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{kind:?}: debited {debited} of {expected}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every delivery handled (18: originals and duplicates), the duplicates
    // by skipping them.
    let deadline = tokio::time::Instant::now() + WAIT;
    while debits.metrics().handled < 18 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{kind:?}: handled {:?}",
            debits.metrics()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        ledger.debited(&account).await.unwrap(),
        expected,
        "{kind:?}: debited once"
    );
    relay.stop().await.unwrap();
    debits.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_debits_once_on_memory() {
    debits_once(BrokerKind::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_debits_once_on_kafka() {
    debits_once(BrokerKind::Kafka).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_debits_once_on_rabbitmq() {
    debits_once(BrokerKind::RabbitMq).await;
}
