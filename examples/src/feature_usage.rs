//! The feature-usage-log module: every use of a product feature is logged
//! as an event on `feature_usage_topic` and consumed by the app's
//! `<app>-feature-usage-group`, which writes the usage records in bulk (for
//! example to store them for billing reports): one write per batch of up
//! to [`BULK_MAX_RECORDS`] logs, or of what arrived within [`BULK_MAX_WAIT`].

use std::future::Future;
use std::time::Duration;

use broker::serde::{Deserialize, Serialize};
use broker::validator::Validate;
use broker::{
    typed_batch, BatchError, ConsumerHandle, Event, Message, Publisher, PublisherExt, Received,
    Result,
};

use broker::Endpoints;

/// Module name for `BROKER_ROUTE_FEATURE_USAGE`.
pub const MODULE: &str = "feature_usage";
/// The topic of feature usage logs.
pub const TOPIC: &str = "feature_usage_topic";
/// Most usage records in one bulk write.
pub const BULK_MAX_RECORDS: usize = 500;
/// Longest a usage log waits for others to join its bulk write.
pub const BULK_MAX_WAIT: Duration = Duration::from_millis(200);

/// One use of a feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Validate)]
#[serde(crate = "broker::serde")]
#[validate(crate = "broker::validator")]
pub struct FeatureUsageLog {
    /// Who used it.
    #[validate(length(min = 1, max = 128))]
    pub user_id: String,
    /// The user's organization, when there is one.
    #[validate(length(min = 1, max = 128))]
    pub organization_id: Option<String>,
    /// Which feature (`export`, `chat`, ...).
    #[validate(length(min = 1, max = 64))]
    pub feature: String,
    /// How much of it (requests, tokens, pages): at least 1.
    #[validate(range(min = 1))]
    pub units: u64,
    /// When, in milliseconds since the Unix epoch.
    #[validate(range(min = 0))]
    pub used_at_ms: i64,
}

impl Event for FeatureUsageLog {
    const TOPIC: &'static str = TOPIC;
    // One user's logs in order.
    fn partition_key(&self) -> Option<String> {
        Some(self.user_id.clone())
    }
}

/// The module's names: the real ones by default; tests use their own topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureUsage {
    /// Topic the logs go to.
    pub topic: String,
    /// Consumer group of this app.
    pub group: String,
}

impl FeatureUsage {
    /// The module of application `app`: topic `feature_usage_topic`, group
    /// `<app>-feature-usage-group`.
    pub fn new(app: &str) -> Self {
        FeatureUsage {
            topic: TOPIC.to_owned(),
            group: format!("{app}-feature-usage-group"),
        }
    }

    /// The same module on another topic (tests, staging prefixes).
    pub fn on_topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = topic.into();
        self
    }

    /// Publishes one log: validated first (an invalid log is
    /// [`broker::BrokerError::Validation`] and nothing is sent), keyed
    /// by user.
    pub async fn send_feature_usage_log(
        &self,
        publisher: &dyn Publisher,
        log: &FeatureUsageLog,
    ) -> Result<()> {
        publisher.publish_event_to(&self.topic, log, None).await
    }

    /// Publishes several logs at once (a client flushing its buffer): all
    /// are validated before any is sent, then sent pipelined.
    pub async fn send_feature_usage_logs(
        &self,
        publisher: &dyn Publisher,
        logs: &[FeatureUsageLog],
    ) -> Result<()> {
        let messages = logs
            .iter()
            .map(Event::to_message)
            .collect::<Result<Vec<Message>>>()?;
        publisher.publish_batch(&self.topic, messages).await
    }

    /// Starts the module's consumer, which writes usage records in bulk:
    /// `write` gets up to [`BULK_MAX_RECORDS`] decoded, validated logs (or
    /// what arrived within [`BULK_MAX_WAIT`] of the first), each user's in
    /// order, with their message metadata. `Ok` acknowledges them all; a
    /// failed write (any error) retries each log on its own, and
    /// [`BatchError::failed`] fails single logs (retried alone, then
    /// dead-lettered). Undecodable or invalid payloads go to
    /// `feature_usage_topic.dlq` without reaching `write`.
    ///
    /// ```no_run
    /// # async fn run(endpoints: broker::Endpoints) -> broker::Result<()> {
    /// use examples::feature_usage::{FeatureUsage, FeatureUsageLog};
    /// use broker::{BatchError, Received};
    /// let consumer = FeatureUsage::new("billing")
    ///     .start_bulk_consumer(&endpoints, 4, |logs: Vec<(FeatureUsageLog, Received)>| async move {
    ///         // e.g. one INSERT ... VALUES (..), (..) for the whole batch
    ///         println!("writing {} usage records", logs.len());
    ///         Ok::<(), BatchError>(())
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn start_bulk_consumer<F, Fut>(
        &self,
        endpoints: &Endpoints,
        concurrency: usize,
        write: F,
    ) -> Result<ConsumerHandle>
    where
        F: Fn(Vec<(FeatureUsageLog, Received)>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BatchError>> + Send + 'static,
    {
        endpoints
            .consumer(&self.topic, &self.group)
            .concurrency(concurrency)
            .batch(BULK_MAX_RECORDS, BULK_MAX_WAIT)
            .batch_handler(typed_batch(write))
            .start()
            .await
    }
}
