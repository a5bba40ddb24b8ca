//! The example app server (axum): the feature-usage-log and credits-process
//! modules, each on the broker its route names, behind HTTP.
//!
//! ```text
//! cargo run --example app                                  # memory: no broker
//! RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/%2f cargo run --example app
//! KAFKA_ENABLED=true KAFKA_BROKERS=127.0.0.1:9092 \
//!   RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/%2f \
//!   BROKER_ROUTE_CREDITS_PROCESS=rabbitmq cargo run --example app
//!
//! curl -si localhost:8080/credits/ends -H content-type:application/json -d \
//!   '{"process_id":"run-1","account_id":"a1","model":"small","credits_used":10,"status":"completed","ended_at_ms":0}'
//! curl -s localhost:8080/credits/a1; curl -s localhost:8080/health; curl -s localhost:8080/metrics
//! ```
//!
//! `APP_ADDR` is where it listens (default `127.0.0.1:8080`), `APP_NAME`
//! names the consumer groups (default `example-app`). SIGTERM or ctrl-c
//! stops it: in-flight messages are drained within 30 s. Logs follow
//! `RUST_LOG`, with lapin's frame log always off.
//!
//! With `DATABASE_URL` (PostgreSQL) the credits module keeps its ledger in
//! that database through the transactional outbox and inbox
//! (`examples::credits_ledger`; tables created at startup): `POST
//! /credits/ends` records the end and its event in one transaction, the
//! relay publishes it, the consumer debits it once.
//!
//! ```text
//! DATABASE_URL=postgres://app:secret@127.0.0.1:5432/app cargo run --example app
//! ```

use std::sync::Arc;

use broker::outbox::sqlx::postgres::PgPoolOptions;
use broker::App;
use examples::credits_ledger::CreditsLedger;
use examples::credits_process::CreditsProcess;
use examples::feature_usage::FeatureUsage;
use examples::server::{self, Ledger, MODULES};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `RUST_LOG` as usual (default `info`), never lapin's frame log: at TRACE
    // it prints the login (broker::rabbitmq::LAPIN_LOG_DIRECTIVE).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        .add_directive(broker::rabbitmq::LAPIN_LOG_DIRECTIVE.parse()?);
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let addr = std::env::var("APP_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let name = std::env::var("APP_NAME").unwrap_or_else(|_| "example-app".into());
    let names = (FeatureUsage::new(&name), CreditsProcess::new(&name));
    // The URL carries the password: never printed.
    let db = match std::env::var("DATABASE_URL") {
        Ok(url) => {
            let pool = PgPoolOptions::new()
                .max_connections(8)
                .connect(&url)
                .await?;
            println!("credits ledger: PostgreSQL (outbox and inbox)");
            Some(CreditsLedger::open(pool, names.1.clone()).await?)
        }
        Err(_) => None,
    };
    // Before any consumer starts: they register their metrics when they do.
    broker::prometheus::install()?;
    let app = App::from_env(MODULES).await?;
    for module in MODULES {
        println!("{module}: {}", app.brokers().config().route(module));
    }
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    let ledger = Arc::new(Ledger::default());
    server::serve(app, listener, names, ledger, db).await?;
    Ok(())
}
