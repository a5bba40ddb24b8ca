//! The inbox: a handler's database work and the record that the message was
//! handled commit together, so a redelivered message is skipped.

use std::future::Future;

use broker_core::{HandlerError, Message, Received};
use sqlx::{PgPool, Postgres, Transaction};

/// Runs handlers inside a transaction that also records the message id for
/// one consumer group (table `broker_inbox`). A message whose id the group
/// already recorded is skipped: redeliveries (after a crash between commit
/// and ack, a rebalance, a duplicate from an at-least-once publisher) have
/// no second effect on the database. Ids are the library's message ids,
/// stable across redeliveries (also for other producers' messages).
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool, subscriber: broker_core::MemoryBroker) -> broker_core::Result<()> {
/// use broker_core::{Consumer, Received};
/// use broker_outbox::Inbox;
///
/// let inbox = Inbox::new(pool, "credits");
/// let consumer = Consumer::builder(subscriber, "billing.credits.used", "credits")
///     .handler(inbox.handler(|received: Received, mut tx| async move {
///         sqlx::query("INSERT INTO usage (message) VALUES ($1)")
///             .bind(received.message.id())
///             .execute(&mut *tx)
///             .await?;
///         Ok(tx)
///     }))
///     .start()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Inbox {
    pool: PgPool,
    group: String,
}

/// The transaction a handler works in.
pub type Tx = Transaction<'static, Postgres>;

impl Inbox {
    /// The inbox of `group` in `pool`'s database.
    pub fn new(pool: PgPool, group: impl Into<String>) -> Self {
        Inbox {
            pool,
            group: group.into(),
        }
    }

    /// Runs `work` once for `message`: in a transaction that records the
    /// message id, committed after `work` returns it. Returns `Ok(None)`
    /// without running `work` when the id was already recorded; an error
    /// rolls everything back (the message can then be retried).
    pub async fn handle<T, F, Fut>(
        &self,
        message: &Message,
        work: F,
    ) -> Result<Option<T>, HandlerError>
    where
        F: FnOnce(Tx) -> Fut,
        Fut: Future<Output = Result<(Tx, T), HandlerError>>,
    {
        let mut tx = self.pool.begin().await?;
        let first = sqlx::query(
            "INSERT INTO broker_inbox (consumer_group, message_id) VALUES ($1, $2) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&self.group)
        .bind(message.id())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !first {
            tracing::debug!(id = message.id(), group = %self.group, "inbox: already handled; skipped");
            tx.rollback().await?;
            return Ok(None);
        }
        let (tx, value) = work(tx).await?;
        tx.commit().await?;
        Ok(Some(value))
    }

    /// A consumer handler that runs `work` through [`Inbox::handle`]. A
    /// database error is retryable; `work`'s own errors keep their kind.
    pub fn handler<F, Fut>(self, work: F) -> impl broker_core::Handler
    where
        F: Fn(Received, Tx) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<Tx, HandlerError>> + Send + 'static,
    {
        move |received: Received| {
            let inbox = self.clone();
            let work = work.clone();
            async move {
                let message = received.message.clone();
                inbox
                    .handle(&message, move |tx| async move {
                        work(received, tx).await.map(|tx| (tx, ()))
                    })
                    .await
                    .map(|_| ())
            }
        }
    }

    /// Deletes records older than `age` (keep them longer than any
    /// redelivery can come: the broker's retention, the dead-letter replay
    /// window). Returns how many were deleted.
    pub async fn forget_older_than(&self, age: std::time::Duration) -> Result<u64, HandlerError> {
        let done = sqlx::query(
            "DELETE FROM broker_inbox WHERE consumer_group = $1 \
             AND handled_at < now() - make_interval(secs => $2)",
        )
        .bind(&self.group)
        .bind(age.as_secs_f64())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}
