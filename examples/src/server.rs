//! The example app server on axum, using only the facade: `POST /usage` and
//! `POST /credits/ends` publish typed events, the credits consumer debits a
//! ledger (`GET /credits/{account}`), `GET /health` is the runtime's view
//! (200 when ready, 503 when not), `GET /metrics` its counters as
//! Prometheus text, and SIGTERM/ctrl-c drains in-flight messages before the
//! process ends. `examples/app.rs` runs it; `examples/tests/server.rs` tests
//! it over HTTP on every backend.
//!
//! With a [`CreditsLedger`] (the app opens one when `DATABASE_URL` is set)
//! the credits module runs on PostgreSQL: `POST /credits/ends` records the
//! end and its event in one transaction (the transactional outbox; 409 for
//! an end already recorded), the outbox relay publishes it on the module's
//! route from inside the app (stopped after the HTTP server drained, before
//! the publishers close: what it did not publish stays in the outbox for
//! the next start), and the credits consumer debits each end once through
//! the inbox; `GET /credits/{account}` reads the database.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use broker::app::HealthReport;
use broker::serde::Serialize;
use broker::{App, AppStatus, BrokerError, Publisher, Received};
use tokio::net::TcpListener;

use crate::credits_ledger::CreditsLedger;
use crate::credits_process::{self, CreditsProcess, CreditsProcessEnd};
use crate::feature_usage::{self, FeatureUsage, FeatureUsageLog};

/// The modules the server declares (`BROKER_ROUTE_FEATURE_USAGE`,
/// `BROKER_ROUTE_CREDITS_PROCESS`; any other `BROKER_ROUTE_*` is refused).
pub const MODULES: [&str; 2] = [feature_usage::MODULE, credits_process::MODULE];

/// The business state: credits used per account, from the consumer.
#[derive(Debug, Default)]
pub struct Ledger {
    used: Mutex<HashMap<String, Account>>,
    debits: Mutex<HashMap<String, u32>>,
    in_flight: AtomicU64,
    units: AtomicU64,
    work: Duration,
}

/// One account in the ledger (`GET /credits/{account}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, broker::serde::Deserialize)]
#[serde(crate = "broker::serde")]
pub struct Account {
    /// Credits debited.
    pub used: u64,
    /// Process ends debited.
    pub ends: u64,
}

impl Ledger {
    /// A ledger whose every debit takes `work` (a call to a billing system,
    /// say; tests use it to have a handler in flight at shutdown).
    pub fn with_work(work: Duration) -> Self {
        Ledger {
            work,
            ..Ledger::default()
        }
    }

    /// Debits the credits of one process end.
    pub async fn debit(&self, end: &CreditsProcessEnd) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.work).await;
        {
            let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
            let account = used.entry(end.account_id.clone()).or_default();
            account.used += end.credits_used;
            account.ends += 1;
        }
        *self
            .debits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(end.process_id.clone())
            .or_default() += 1;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    /// How many times the end of `process_id` was debited (1: exactly once).
    pub fn debits_of(&self, process_id: &str) -> u32 {
        let debits = self.debits.lock().unwrap_or_else(|e| e.into_inner());
        debits.get(process_id).copied().unwrap_or(0)
    }

    /// Debits running now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Feature usage units logged.
    pub fn units(&self) -> u64 {
        self.units.load(Ordering::SeqCst)
    }

    /// One account.
    pub fn account(&self, account: &str) -> Account {
        let used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        used.get(account).cloned().unwrap_or_default()
    }
}

// ---- the server: handlers and routes ---------------------------------------
// (README, "An app server": everything from here to the end of `serve`.)

#[derive(Clone)]
struct Ctx {
    usage: Arc<dyn Publisher>,
    credits: Arc<dyn Publisher>,
    names: (FeatureUsage, CreditsProcess),
    ledger: Arc<Ledger>,
    db: Option<CreditsLedger>,
    status: AppStatus,
}

type Reply = Result<StatusCode, (StatusCode, String)>;

/// Runs the server on `listener` until `app`'s shutdown signal, then drains
/// HTTP requests and in-flight messages and closes the publishers. With
/// `db`, credits go through its outbox, relay and inbox (module docs); it
/// must use `names.1`'s topic and group.
pub async fn serve(
    mut app: App,
    listener: TcpListener,
    names: (FeatureUsage, CreditsProcess),
    ledger: Arc<Ledger>,
    db: Option<CreditsLedger>,
) -> broker::Result<()> {
    let l = ledger.clone();
    let credits_consumer = match &db {
        Some(db) => app.consume_raw(
            credits_process::MODULE,
            &names.1.end_topic,
            &names.1.end_group,
            db.debit_handler(),
        ),
        None => app
            .consume(
                credits_process::MODULE,
                &names.1.end_group,
                move |end: CreditsProcessEnd, _: Received| {
                    let l = l.clone();
                    async move {
                        l.debit(&end).await;
                        Ok(())
                    }
                },
            )
            .topic(&names.1.end_topic),
    };
    credits_consumer.concurrency(4);
    // Usage logs are written in bulk: up to 500 per call, or what came
    // within 200 ms.
    let l = ledger.clone();
    app.consume_batch(
        feature_usage::MODULE,
        &names.0.group,
        move |logs: Vec<(FeatureUsageLog, Received)>| {
            let units: u64 = logs.iter().map(|(log, _)| log.units).sum();
            l.units.fetch_add(units, Ordering::SeqCst);
            async { Ok(()) }
        },
    )
    .topic(&names.0.topic)
    .batch(500, Duration::from_millis(200));
    let (usage, credits) = (app.publisher(MODULES[0])?, app.publisher(MODULES[1])?);
    let credits_route = app.endpoints(MODULES[1])?;
    let running = app.start().await?;
    let relay = db.as_ref().map(|db| db.start_relay(&credits_route));
    let status = running.status();
    let routes = Router::new()
        .route("/usage", post(post_usage))
        .route("/credits/ends", post(post_end))
        .route("/credits/{account}", get(get_account))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(Ctx {
            usage,
            credits,
            names,
            ledger,
            db,
            status,
        });
    running
        .serve(|stopping| async move {
            let served = axum::serve(listener, routes)
                .with_graceful_shutdown(stopping)
                .into_future()
                .await;
            // After the last request, before the publishers close.
            if let Some(relay) = relay {
                relay.stop().await?;
            }
            served.map_err(Into::<Box<dyn std::error::Error + Send + Sync>>::into)
        })
        .await
}

async fn post_usage(State(c): State<Ctx>, Json(log): Json<FeatureUsageLog>) -> Reply {
    c.names
        .0
        .send_feature_usage_log(&*c.usage, &log)
        .await
        .map_err(refused)?;
    Ok(StatusCode::ACCEPTED)
}

async fn post_end(State(c): State<Ctx>, Json(end): Json<CreditsProcessEnd>) -> Reply {
    match &c.db {
        // The end's row and its event in one transaction; the relay publishes.
        Some(db) => db.record_end(&end, true).await,
        None => c.names.1.send_process_end(&*c.credits, &end).await,
    }
    .map_err(refused)?;
    Ok(StatusCode::ACCEPTED)
}

async fn get_account(
    State(c): State<Ctx>,
    Path(account): Path<String>,
) -> Result<Json<Account>, (StatusCode, String)> {
    let Some(db) = &c.db else {
        return Ok(Json(c.ledger.account(&account)));
    };
    let debits = db.account(&account).await.map_err(refused)?;
    Ok(Json(Account {
        used: debits.credits.unsigned_abs(),
        ends: debits.ends.unsigned_abs(),
    }))
}

async fn health(State(c): State<Ctx>) -> (StatusCode, Json<HealthReport>) {
    let report = c.status.health().await;
    (
        StatusCode::from_u16(report.http_status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
        Json(report),
    )
}

/// The library's metrics (`broker::prometheus`: per topic, group and
/// backend, with the handle latency histogram; recorded once the app called
/// `broker::prometheus::install()`), then the runtime's per-consumer view.
async fn metrics(State(c): State<Ctx>) -> impl IntoResponse {
    let body = format!(
        "{}{}",
        broker::prometheus::render(),
        c.status.prometheus_text()
    );
    (
        [(header::CONTENT_TYPE, broker::prometheus::CONTENT_TYPE)],
        body,
    )
}

/// 422 for an event that fails validation, 409 for an end already recorded
/// (database), 503 when the broker or the database did not take it.
fn refused(e: BrokerError) -> (StatusCode, String) {
    match e {
        BrokerError::Validation(_) => (StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
        BrokerError::Refused {
            backend: "postgres",
            ..
        } => (StatusCode::CONFLICT, e.to_string()),
        _ => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}
