//! The relay: publishes committed outbox rows, in order per lane, and marks
//! them sent after the broker confirmed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use broker_core::{Backoff, BrokerError, Message, Publisher};
use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgPool};
use tokio::sync::watch;

use crate::row::Row;
use crate::{db, CHANNEL, DEFAULT_LANES};

/// The first key of a lane's advisory lock: the OID of the outbox table the
/// session sees (its `search_path`). Advisory locks are database-wide, so a
/// fixed key would let the relays of another schema's outbox (another
/// application in the same database) hold this one's lanes. In `pg_locks` a
/// lane lock shows as `classid` = the table's OID, `objid` = the lane.
const TABLE_KEY: &str = "SELECT 'broker_outbox'::regclass::oid::int4";

/// Publishes committed outbox rows to one route; see the crate docs.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool, route: std::sync::Arc<dyn broker_core::Publisher>)
/// # -> broker_core::Result<()> {
/// use std::time::Duration;
/// let relay = broker_outbox::Relay::new(pool, route)
///     .batch_size(500)
///     .retention(Duration::from_secs(7 * 24 * 3600))
///     .start();
/// // ... on shutdown:
/// relay.stop().await?;
/// # Ok(()) }
/// ```
pub struct Relay {
    pool: PgPool,
    publisher: Arc<dyn Publisher>,
    lanes: u32,
    batch_size: i64,
    poll_interval: Duration,
    retry: Backoff,
    retention: Duration,
    cleanup_interval: Duration,
}

impl Relay {
    /// A relay from `pool`'s outbox to `publisher`, with defaults: 16 lanes,
    /// batches of 500, a poll every second besides notifications, retries
    /// forever (100 ms doubling to 5 s), sent rows kept 7 days.
    pub fn new(pool: PgPool, publisher: Arc<dyn Publisher>) -> Self {
        Relay {
            pool,
            publisher,
            lanes: DEFAULT_LANES,
            batch_size: 500,
            poll_interval: Duration::from_secs(1),
            retry: Backoff::reconnect_default().unlimited().without_limit(),
            retention: Duration::from_secs(7 * 24 * 3600),
            cleanup_interval: Duration::from_secs(60),
        }
    }
    /// Lanes, as the writers' [`crate::Outbox::lanes`].
    pub fn lanes(mut self, lanes: u32) -> Self {
        self.lanes = lanes.max(1);
        self
    }
    /// Most rows read and published at once (at least 1).
    pub fn batch_size(mut self, rows: u32) -> Self {
        self.batch_size = i64::from(rows.max(1));
        self
    }
    /// How often to look for rows when no notification came (notifications
    /// are lost while the relay's listening connection is down).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }
    /// Waits between failed publishes or database errors (its attempt limit
    /// is ignored: the relay keeps trying).
    pub fn retry(mut self, policy: Backoff) -> Self {
        self.retry = policy.unlimited().without_limit();
        self
    }
    /// How long sent rows are kept before cleanup deletes them.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }
    /// How often cleanup runs.
    pub fn cleanup_interval(mut self, interval: Duration) -> Self {
        self.cleanup_interval = interval;
        self
    }

    /// Starts the relay on the current Tokio runtime.
    pub fn start(self) -> RelayHandle {
        let (stop, stopped) = watch::channel(false);
        let stats = Arc::new(RelayStats::default());
        let task = tokio::spawn(run(self, stopped, stats.clone()));
        RelayHandle { stop, task, stats }
    }
}

/// Counters of a running relay.
#[derive(Debug, Default)]
pub struct RelayStats {
    published: AtomicU64,
    failures: AtomicU64,
    lanes: AtomicU64,
}

impl RelayStats {
    /// Rows published and marked sent.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }
    /// Failed publish or database attempts (each retried).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
    /// Lanes this relay owns now.
    pub fn lanes(&self) -> u64 {
        self.lanes.load(Ordering::Relaxed)
    }
}

/// A running relay.
pub struct RelayHandle {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    stats: Arc<RelayStats>,
}

impl RelayHandle {
    /// Its counters.
    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }
    /// Stops after the batch in progress (published rows are marked sent
    /// first) and releases its lanes.
    pub async fn stop(self) -> Result<(), BrokerError> {
        let _ = self.stop.send(true);
        self.task
            .await
            .map_err(|e| BrokerError::backend("outbox relay", e))
    }
}

/// The session that holds this relay's lane locks, and reads and marks its
/// rows. Its own connection, not the pool's: dropped, it closes, and the
/// server releases the locks (a pooled connection would keep them).
struct Session {
    conn: PgConnection,
    /// The outbox table's lock key ([`TABLE_KEY`]).
    table: i32,
    owned: Vec<i32>,
}

async fn run(relay: Relay, mut stop: watch::Receiver<bool>, stats: Arc<RelayStats>) {
    let mut delays = relay.retry.delays();
    let mut session: Option<Session> = None;
    let mut listener: Option<PgListener> = None;
    let mut last_cleanup = tokio::time::Instant::now();
    while !*stop.borrow() {
        let step = async {
            if session.is_none() {
                let mut conn = relay.pool.acquire().await.map_err(db)?.detach();
                let (table,): (i32,) = sqlx::query_as(TABLE_KEY)
                    .fetch_one(&mut conn)
                    .await
                    .map_err(db)?;
                session = Some(Session {
                    conn,
                    table,
                    owned: Vec::new(),
                });
            }
            if listener.is_none() {
                let mut l = PgListener::connect_with(&relay.pool).await.map_err(db)?;
                l.listen(CHANNEL).await.map_err(db)?;
                listener = Some(l);
            }
            let s = session.as_mut().expect("set above");
            claim_lanes(s, relay.lanes).await?;
            stats.lanes.store(s.owned.len() as u64, Ordering::Relaxed);
            let sent = relay_batch(&relay, s).await?;
            stats.published.fetch_add(sent as u64, Ordering::Relaxed);
            if last_cleanup.elapsed() >= relay.cleanup_interval {
                last_cleanup = tokio::time::Instant::now();
                cleanup(&relay.pool, relay.retention).await?;
            }
            Ok::<usize, BrokerError>(sent)
        };
        match step.await {
            Ok(sent) => {
                delays = relay.retry.delays();
                if sent == 0 {
                    wait_for_rows(&mut listener, relay.poll_interval, &mut stop).await;
                }
            }
            Err(e) => {
                stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "outbox relay: will retry");
                // Start over with a new session: the old one may be gone, and
                // its locks with it. Closing it releases them for the others.
                session = None;
                listener = None;
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
    if let Some(mut s) = session {
        // Closing the session releases its advisory locks.
        let _ = sqlx::query("SELECT pg_advisory_unlock_all()")
            .execute(&mut s.conn)
            .await;
    }
}

/// Takes the lanes no other relay holds.
async fn claim_lanes(s: &mut Session, lanes: u32) -> Result<(), BrokerError> {
    for lane in 0..lanes as i32 {
        if s.owned.contains(&lane) {
            continue;
        }
        let (got,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock($1, $2)")
            .bind(s.table)
            .bind(lane)
            .fetch_one(&mut s.conn)
            .await
            .map_err(db)?;
        if got {
            s.owned.push(lane);
        }
    }
    Ok(())
}

type RowTuple = (
    i64,
    String,
    String,
    Option<Vec<u8>>,
    Vec<u8>,
    bool,
    serde_json::Value,
    Option<String>,
    Option<String>,
    Option<String>,
    i64,
    Option<serde_json::Value>,
);

/// Publishes up to one batch of unsent rows of the owned lanes, oldest
/// first, and marks what the broker confirmed. Returns how many were sent.
async fn relay_batch(relay: &Relay, s: &mut Session) -> Result<usize, BrokerError> {
    if s.owned.is_empty() {
        return Ok(0);
    }
    let rows: Vec<RowTuple> = sqlx::query_as(
        "SELECT id, topic, message_id, msg_key, payload, null_payload, headers, content_type, \
         correlation_id, traceparent, timestamp_ms, amqp FROM broker_outbox \
         WHERE sent_at IS NULL AND lane = ANY($1) ORDER BY id LIMIT $2",
    )
    .bind(&s.owned)
    .bind(relay.batch_size)
    .fetch_all(&mut s.conn)
    .await
    .map_err(db)?;
    if rows.is_empty() {
        return Ok(0);
    }
    // Topics in the order they first appear, each topic's rows in id order:
    // a key's messages keep their order.
    let mut by_topic: Vec<(String, Vec<i64>, Vec<Message>)> = Vec::new();
    let mut unreadable = Vec::new();
    for (id, topic, message_id, key, payload, null_payload, headers, ct, cid, tp, ts, amqp) in rows
    {
        let row = Row {
            message_id,
            key,
            payload,
            null_payload,
            headers,
            content_type: ct,
            correlation_id: cid,
            traceparent: tp,
            timestamp_ms: ts,
            amqp,
        };
        match row.message() {
            Ok(m) => match by_topic.iter_mut().find(|(t, _, _)| *t == topic) {
                Some((_, ids, ms)) => {
                    ids.push(id);
                    ms.push(m);
                }
                None => by_topic.push((topic, vec![id], vec![m])),
            },
            Err(e) => {
                tracing::error!(id, error = %e, "outbox row cannot be read; left unsent");
                unreadable.push(id);
            }
        }
    }
    let mut sent = 0;
    for (topic, ids, messages) in by_topic {
        relay.publisher.publish_batch(&topic, messages).await?;
        mark_sent(&mut s.conn, &ids).await?;
        sent += ids.len();
    }
    if sent == 0 && !unreadable.is_empty() {
        return Err(BrokerError::backend(
            crate::BACKEND,
            format!(
                "{} outbox rows cannot be read (ids {unreadable:?})",
                unreadable.len()
            ),
        ));
    }
    Ok(sent)
}

async fn mark_sent(conn: &mut PgConnection, ids: &[i64]) -> Result<(), BrokerError> {
    sqlx::query("UPDATE broker_outbox SET sent_at = now() WHERE id = ANY($1)")
        .bind(ids)
        .execute(conn)
        .await
        .map_err(db)?;
    Ok(())
}

/// Deletes sent rows older than `retention`, a bounded number at a time.
async fn cleanup(pool: &PgPool, retention: Duration) -> Result<(), BrokerError> {
    let deleted = sqlx::query(
        "DELETE FROM broker_outbox WHERE id IN (SELECT id FROM broker_outbox \
         WHERE sent_at < now() - make_interval(secs => $1) LIMIT 10000)",
    )
    .bind(retention.as_secs_f64())
    .execute(pool)
    .await
    .map_err(db)?
    .rows_affected();
    if deleted > 0 {
        tracing::debug!(deleted, "outbox cleanup");
    }
    Ok(())
}

/// Waits for a commit notification, the poll interval, or stop.
async fn wait_for_rows(
    listener: &mut Option<PgListener>,
    poll: Duration,
    stop: &mut watch::Receiver<bool>,
) {
    let notified = async {
        match listener.as_mut() {
            Some(l) => {
                if l.recv().await.is_err() {
                    // Lost: listen again on the next round; the poll covers the gap.
                    *listener = None;
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = notified => {}
        _ = tokio::time::sleep(poll) => {}
        _ = stop.changed() => {}
    }
}
