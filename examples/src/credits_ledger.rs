//! The credits-process module on PostgreSQL, with the outbox and the inbox:
//! the service that runs a process records its end and publishes the event
//! in one transaction (nothing is published for a rolled-back record, and
//! nothing recorded is lost if the service dies before publishing); the
//! debiting service applies each event once, however often it is delivered.

use broker::outbox::sqlx::{self, PgPool};
use broker::outbox::{Inbox, Outbox, Relay, RelayHandle};
use broker::{BrokerError, ConsumerHandle, Event, Handler, HandlerError, Received, Result};

use crate::credits_process::{CreditsProcess, CreditsProcessEnd};
use broker::Endpoints;

/// The module's tables next to the outbox's: the producing service's record
/// of ended processes, and the debiting service's debits.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS credits_process_ends (
    process_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    credits    BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS credits_debits (
    message_id TEXT NOT NULL,
    account_id TEXT NOT NULL,
    credits    BIGINT NOT NULL
);";

/// The credits-process module with its database.
#[derive(Debug, Clone)]
pub struct CreditsLedger {
    pool: PgPool,
    outbox: Outbox,
    module: CreditsProcess,
}

impl CreditsLedger {
    /// The module's names (`module`) on `pool`'s database; creates the
    /// outbox, inbox and module tables if absent.
    pub async fn open(pool: PgPool, module: CreditsProcess) -> Result<Self> {
        broker::outbox::migrate(&pool).await?;
        sqlx::raw_sql(SCHEMA)
            .execute(&pool)
            .await
            .map_err(|e| BrokerError::backend("postgres", e))?;
        Ok(CreditsLedger {
            pool,
            outbox: Outbox::new(),
            module,
        })
    }

    /// Records that a process ended and publishes its event, atomically:
    /// both or neither. With `commit = false` the transaction is rolled back
    /// (as when a later step of the request fails): nothing is published.
    ///
    /// # Errors
    ///
    /// [`BrokerError::Validation`] for an invalid event and
    /// [`BrokerError::Refused`] (backend `postgres`) for a process whose end
    /// is already recorded: in both cases nothing is recorded or published.
    /// A database error is [`BrokerError::Backend`].
    pub async fn record_end(&self, event: &CreditsProcessEnd, commit: bool) -> Result<()> {
        let db = |e| BrokerError::backend("postgres", e);
        let mut tx = self.pool.begin().await.map_err(db)?;
        sqlx::query(
            "INSERT INTO credits_process_ends (process_id, account_id, credits) VALUES ($1, $2, $3)",
        )
        .bind(&event.process_id)
        .bind(&event.account_id)
        .bind(event.credits_used as i64)
        .execute(&mut *tx)
        .await
        .map_err(|e| match e.as_database_error() {
            Some(d) if d.is_unique_violation() => BrokerError::Refused {
                backend: "postgres",
                operation: "record a process end",
                reason: "the process's end is already recorded".into(),
            },
            _ => db(e),
        })?;
        self.outbox
            .publish(&mut tx, &self.module.end_topic, event.to_message()?)
            .await?;
        match commit {
            true => tx.commit().await.map_err(db),
            false => tx.rollback().await.map_err(db),
        }
    }

    /// Starts the relay that publishes recorded ends on the module's route.
    pub fn start_relay(&self, endpoints: &Endpoints) -> RelayHandle {
        Relay::new(self.pool.clone(), endpoints.publisher.clone()).start()
    }

    /// Starts the debiting consumer (group `end_group` on `end_topic`) with
    /// [`CreditsLedger::debit_handler`].
    pub async fn start_debits(&self, endpoints: &Endpoints) -> Result<ConsumerHandle> {
        endpoints
            .consumer(&self.module.end_topic, &self.module.end_group)
            .concurrency(4)
            .handler(self.debit_handler())
            .start()
            .await
    }

    /// The debiting handler: each end debits its account once (the inbox
    /// records the message id in the debit's transaction and skips a
    /// redelivered message). For a consumer of `end_topic` in `end_group`,
    /// however it is started (`start_debits`, or an app's `consume_raw`).
    pub fn debit_handler(&self) -> impl Handler {
        let inbox = Inbox::new(self.pool.clone(), self.module.end_group.clone());
        inbox.handler(|received: Received, mut tx| async move {
            let end = CreditsProcessEnd::from_message(&received.message)?;
            sqlx::query(
                "INSERT INTO credits_debits (message_id, account_id, credits) \
                 VALUES ($1, $2, $3)",
            )
            .bind(received.message.id())
            .bind(&end.account_id)
            .bind(end.credits_used as i64)
            .execute(&mut *tx)
            .await?;
            Ok::<_, HandlerError>(tx)
        })
    }

    /// The module's topic and group names this ledger uses.
    pub fn module(&self) -> &CreditsProcess {
        &self.module
    }

    /// The database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Credits debited from `account` so far.
    pub async fn debited(&self, account: &str) -> Result<i64> {
        let (sum,): (Option<i64>,) =
            sqlx::query_as("SELECT sum(credits)::int8 FROM credits_debits WHERE account_id = $1")
                .bind(account)
                .fetch_one(&self.pool)
                .await
                .map_err(|e| BrokerError::backend("postgres", e))?;
        Ok(sum.unwrap_or(0))
    }

    /// Credits debited from `account` and how many ends were debited.
    pub async fn account(&self, account: &str) -> Result<AccountDebits> {
        let (credits, ends): (i64, i64) = sqlx::query_as(
            "SELECT coalesce(sum(credits), 0)::int8, count(*) FROM credits_debits \
             WHERE account_id = $1",
        )
        .bind(account)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| BrokerError::backend("postgres", e))?;
        Ok(AccountDebits { credits, ends })
    }

    /// Ends recorded whose event the relay has not published yet.
    pub async fn unpublished(&self) -> Result<i64> {
        let (n,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM broker_outbox WHERE sent_at IS NULL")
                .fetch_one(&self.pool)
                .await
                .map_err(|e| BrokerError::backend("postgres", e))?;
        Ok(n)
    }
}

/// One account's debits in the ledger ([`CreditsLedger::account`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccountDebits {
    /// Credits debited.
    pub credits: i64,
    /// Process ends debited.
    pub ends: i64,
}
