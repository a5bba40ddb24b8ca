//! The transactional outbox: messages written into PostgreSQL in
//! transactions of 100 and published by a relay, against publishing the
//! same messages directly (batch publish) on the same broker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_core::Publisher;
use broker_outbox::{migrate, Outbox, Relay};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::abstraction::message;
use crate::measure::{peak_rss_kib, Outcome};
use crate::Params;

/// Rows per application transaction.
const PER_TRANSACTION: usize = 100;

/// The database: `OUTBOX_DATABASE_URL`, else the test cluster of
/// `scripts/ensure-postgres.sh`.
fn database_url() -> String {
    std::env::var("OUTBOX_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:55432/postgres".into())
}

/// A pool on a schema of its own, migrated; the schema's name.
async fn fresh_pool() -> (PgPool, String) {
    let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
    let url = database_url();
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .expect("PostgreSQL (OUTBOX_DATABASE_URL; scripts/ensure-postgres.sh start)");
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await
        .expect("schema");
    let options: PgConnectOptions = url.parse().expect("database URL");
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options.options([("search_path", schema.as_str())]))
        .await
        .expect("pool");
    migrate(&pool).await.expect("migrations");
    (pool, schema)
}

async fn drop_schema(schema: &str) {
    if let Ok(admin) = PgPoolOptions::new()
        .max_connections(1)
        .connect(&database_url())
        .await
    {
        let _ = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&admin)
            .await;
    }
}

/// Writes `n` messages in transactions of [`PER_TRANSACTION`] while a relay
/// publishes them to `publisher`; the time until the relay published all.
pub async fn write_and_relay(p: &Params, publisher: Arc<dyn Publisher>, topic: &str) -> Outcome {
    let (pool, schema) = fresh_pool().await;
    let outbox = Outbox::new();
    let relay = Relay::new(pool.clone(), publisher)
        .batch_size(1000)
        .poll_interval(Duration::from_millis(50))
        .start();
    let payload = p.payload();
    let start = Instant::now();
    let mut i = 0;
    while i < p.n {
        let mut tx = pool.begin().await.expect("begin");
        for _ in 0..PER_TRANSACTION.min(p.n - i) {
            outbox
                .publish(&mut tx, topic, message(p, &payload, i))
                .await
                .expect("outbox write");
            i += 1;
        }
        tx.commit().await.expect("commit");
    }
    while relay.stats().published() < p.n as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seconds = start.elapsed().as_secs_f64();
    relay.stop().await.expect("relay stop");
    pool.close().await;
    drop_schema(&schema).await;
    Outcome {
        messages: p.n,
        seconds,
        p50_us: None,
        p99_us: None,
        peak_rss_kib: peak_rss_kib(),
        out_of_order: None,
    }
}
