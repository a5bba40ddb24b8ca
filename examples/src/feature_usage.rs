//! The feature-usage-log module: every use of a product feature is logged
//! as an event on `feature_usage_topic` and consumed by the app's
//! `<app>-feature-usage-group` (for example to store it for billing reports).

use std::future::Future;

use broker::serde::{Deserialize, Serialize};
use broker::validator::Validate;
use broker::{ConsumerHandle, Event, HandlerError, Publisher, PublisherExt, Received, Result};

use broker::Endpoints;

/// Module name for `BROKER_ROUTE_FEATURE_USAGE`.
pub const MODULE: &str = "feature_usage";
/// The topic of feature usage logs.
pub const TOPIC: &str = "feature_usage_topic";

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

    /// Starts the module's consumer: `handle` gets each decoded, validated
    /// log; undecodable or invalid payloads go to `feature_usage_topic.dlq`
    /// without reaching it.
    pub async fn start_consumer<F, Fut>(
        &self,
        endpoints: &Endpoints,
        concurrency: usize,
        handle: F,
    ) -> Result<ConsumerHandle>
    where
        F: Fn(FeatureUsageLog, Received) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        endpoints
            .start_typed(&self.topic, &self.group, concurrency, handle)
            .await
    }
}
