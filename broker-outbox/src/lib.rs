//! Transactional outbox and inbox on PostgreSQL for the broker library.
//!
//! - [`Outbox::publish`] writes a message into the `broker_outbox` table
//!   inside the caller's transaction: nothing reaches a broker unless the
//!   transaction commits, and nothing committed is lost if the process dies
//!   before it is sent.
//! - [`Relay`] publishes committed rows to any [`Publisher`] (a module's
//!   route: Kafka, RabbitMQ, memory, or a dual route while migrating), in
//!   order per key, and marks them sent only after the broker confirmed.
//!   Several relays may run at once: rows are split into lanes by key, and
//!   one relay at a time owns a lane (a PostgreSQL advisory lock held by its
//!   session, keyed by the outbox table and the lane), so a key's messages
//!   are published by one relay, in order; a relay that dies releases its
//!   lanes to the others.
//! - [`Inbox`] runs a handler inside a database transaction that also
//!   records the message id for its consumer group, so a redelivered message
//!   is skipped: an exactly-once effect on the database.
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool, route: std::sync::Arc<dyn broker_core::Publisher>)
//! # -> Result<(), Box<dyn std::error::Error>> {
//! use broker_core::Message;
//! use broker_outbox::{migrate, Outbox, Relay};
//!
//! migrate(&pool).await?;                        // creates the tables
//! let outbox = Outbox::new();
//! let mut tx = pool.begin().await?;
//! sqlx::query("UPDATE accounts SET credits = credits - 1 WHERE id = $1")
//!     .bind(7_i64)
//!     .execute(&mut *tx)
//!     .await?;
//! outbox
//!     .publish(&mut tx, "billing.credits.used", Message::new("{}").with_key("7"))
//!     .await?;
//! tx.commit().await?;                           // only now can it be sent
//!
//! let relay = Relay::new(pool.clone(), route).start();   // in the same or another process
//! # relay.stop().await?;
//! # Ok(()) }
//! ```

use std::time::Duration;

use broker_core::topic::validate_topic;
use broker_core::{BrokerError, Event, Message};
use sqlx::{PgConnection, PgPool};

mod inbox;
mod relay;
mod row;

pub use inbox::{Inbox, Tx};
pub use relay::{Relay, RelayHandle, RelayStats};
/// The `sqlx` this crate is built on: use it for the transactions you pass in.
pub use sqlx;

/// Name used in errors.
const BACKEND: &str = "postgres";

/// The channel the outbox notifies on commit, so relays wake at once.
pub const CHANNEL: &str = "broker_outbox";

/// Default number of lanes (see [`Outbox::lanes`]).
pub const DEFAULT_LANES: u32 = 16;

/// The crate's migrations: the `broker_outbox` and `broker_inbox` tables.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// Creates or updates the tables (idempotent; sqlx records what ran).
pub async fn migrate(pool: &PgPool) -> Result<(), BrokerError> {
    MIGRATOR
        .run(pool)
        .await
        .map_err(|e| BrokerError::backend(BACKEND, e))
}

pub(crate) fn db(e: sqlx::Error) -> BrokerError {
    BrokerError::backend(BACKEND, e)
}

/// Writes messages into the outbox table inside the caller's transaction.
#[derive(Debug, Clone)]
pub struct Outbox {
    lanes: u32,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox::new()
    }
}

impl Outbox {
    /// An outbox with [`DEFAULT_LANES`] lanes.
    pub fn new() -> Self {
        Outbox {
            lanes: DEFAULT_LANES,
        }
    }

    /// How many lanes rows are split into by key (at least 1): the most
    /// relays that can publish at once. Writers and relays must agree; a
    /// row's lane is fixed when it is written.
    pub fn lanes(mut self, lanes: u32) -> Self {
        self.lanes = lanes.max(1);
        self
    }

    /// Writes `message` for `topic` into the outbox on `conn` (pass your
    /// transaction: `&mut tx`). It is published by a [`Relay`] after the
    /// transaction commits, never if it rolls back. A bad topic name is
    /// refused at once.
    pub async fn publish(
        &self,
        conn: &mut PgConnection,
        topic: &str,
        message: Message,
    ) -> Result<(), BrokerError> {
        validate_topic(topic)?;
        let lane = lane_of(&message, self.lanes);
        let r = row::Row::of(&message);
        sqlx::query(
            "INSERT INTO broker_outbox (lane, topic, message_id, msg_key, payload, null_payload, \
             headers, content_type, correlation_id, traceparent, timestamp_ms, amqp) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(lane)
        .bind(topic)
        .bind(&r.message_id)
        .bind(&r.key)
        .bind(&r.payload)
        .bind(r.null_payload)
        .bind(&r.headers)
        .bind(&r.content_type)
        .bind(&r.correlation_id)
        .bind(&r.traceparent)
        .bind(r.timestamp_ms)
        .bind(&r.amqp)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
        // The table's trigger notifies relays on commit.
        Ok(())
    }

    /// Writes several messages for `topic` in one statement (one round trip);
    /// see [`Outbox::publish`]. Every topic and message is checked first.
    pub async fn publish_batch(
        &self,
        conn: &mut PgConnection,
        topic: &str,
        messages: Vec<Message>,
    ) -> Result<(), BrokerError> {
        validate_topic(topic)?;
        if messages.is_empty() {
            return Ok(());
        }
        let rows: Vec<row::Row> = messages.iter().map(row::Row::of).collect();
        let lanes: Vec<i32> = messages.iter().map(|m| lane_of(m, self.lanes)).collect();
        let column = |f: fn(&row::Row) -> Option<String>| rows.iter().map(f).collect::<Vec<_>>();
        sqlx::query(
            "INSERT INTO broker_outbox (lane, topic, message_id, msg_key, payload, null_payload,              headers, content_type, correlation_id, traceparent, timestamp_ms, amqp)              SELECT lane, $2, message_id, msg_key, payload, null_payload, headers, content_type,              correlation_id, traceparent, timestamp_ms, amqp FROM UNNEST($1::int4[], $3::text[],              $4::bytea[], $5::bytea[], $6::bool[], $7::jsonb[], $8::text[], $9::text[],              $10::text[], $11::int8[], $12::jsonb[]) WITH ORDINALITY AS t(lane, message_id,              msg_key, payload, null_payload, headers, content_type, correlation_id, traceparent,              timestamp_ms, amqp, n) ORDER BY n",
        )
        .bind(&lanes)
        .bind(topic)
        .bind(rows.iter().map(|r| r.message_id.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.key.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.payload.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.null_payload).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.headers.clone()).collect::<Vec<_>>())
        .bind(column(|r| r.content_type.clone()))
        .bind(column(|r| r.correlation_id.clone()))
        .bind(column(|r| r.traceparent.clone()))
        .bind(rows.iter().map(|r| r.timestamp_ms).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.amqp.clone()).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Validates and encodes `event` (see [`Event::to_message`]) and writes
    /// it for [`Event::TOPIC`]. An invalid event is refused and nothing is
    /// written.
    pub async fn publish_event<E: Event>(
        &self,
        conn: &mut PgConnection,
        event: &E,
    ) -> Result<(), BrokerError> {
        self.publish(conn, E::TOPIC, event.to_message()?).await
    }

    /// Rows not sent yet and the age of the oldest: what a dashboard or an
    /// alert watches.
    pub async fn backlog(pool: &PgPool) -> Result<Backlog, BrokerError> {
        let (unsent, oldest_ms): (i64, Option<f64>) = sqlx::query_as(
            "SELECT count(*), (extract(epoch FROM now() - min(created_at)) * 1000)::float8 \
             FROM broker_outbox WHERE sent_at IS NULL",
        )
        .fetch_one(pool)
        .await
        .map_err(db)?;
        Ok(Backlog {
            unsent: unsent.max(0) as u64,
            oldest_age: oldest_ms.map(|ms| Duration::from_millis(ms.max(0.0) as u64)),
        })
    }
}

/// What the outbox still has to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    /// Rows not sent yet.
    pub unsent: u64,
    /// Age of the oldest unsent row.
    pub oldest_age: Option<Duration>,
}

/// The lane of a message: by key, so a key's messages stay in one lane
/// (FNV-1a, stable across processes and versions); unkeyed messages by id.
fn lane_of(message: &Message, lanes: u32) -> i32 {
    let bytes = message.key().unwrap_or(message.id().as_bytes());
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % u64::from(lanes.max(1))) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_has_one_lane() {
        let a = Message::new("1").with_key("k");
        let b = Message::new("2").with_key("k");
        assert_eq!(lane_of(&a, 16), lane_of(&b, 16));
        assert!((0..16).contains(&lane_of(&Message::new("x"), 16)));
        assert_eq!(lane_of(&a, 1), 0);
    }
}
