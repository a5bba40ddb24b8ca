//! The credits-process module: when a credits-consuming process ends (a
//! single-model run or a multi-model run), an event says how many credits
//! it used, on `credits_process_end_topic` or
//! `credits_process_end_multimodel_topic`; the app's groups consume them
//! (for example to debit the account).

use std::future::Future;

use broker::serde::{Deserialize, Serialize};
use broker::validator::Validate;
use broker::{ConsumerHandle, Event, HandlerError, Publisher, PublisherExt, Received, Result};

use broker::Endpoints;

/// Module name for `BROKER_ROUTE_CREDITS_PROCESS`.
pub const MODULE: &str = "credits_process";
/// Topic of single-model process ends.
pub const END_TOPIC: &str = "credits_process_end_topic";
/// Topic of multi-model process ends.
pub const END_MULTIMODEL_TOPIC: &str = "credits_process_end_multimodel_topic";

/// A process that used credits on one model ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Validate)]
#[serde(crate = "broker::serde")]
#[validate(crate = "broker::validator")]
pub struct CreditsProcessEnd {
    /// The process (unique per run).
    #[validate(length(min = 1, max = 128))]
    pub process_id: String,
    /// The account debited.
    #[validate(length(min = 1, max = 128))]
    pub account_id: String,
    /// The model used.
    #[validate(length(min = 1, max = 128))]
    pub model: String,
    /// Credits used (may be zero for a run that failed early).
    pub credits_used: u64,
    /// `completed`, `failed` or `cancelled`.
    #[validate(custom(function = "valid_status"))]
    pub status: String,
    /// When it ended, in milliseconds since the Unix epoch.
    #[validate(range(min = 0))]
    pub ended_at_ms: i64,
}

impl Event for CreditsProcessEnd {
    const TOPIC: &'static str = END_TOPIC;
    // One account's debits in order.
    fn partition_key(&self) -> Option<String> {
        Some(self.account_id.clone())
    }
}

/// The credits one model used within a multi-model process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Validate)]
#[serde(crate = "broker::serde")]
#[validate(crate = "broker::validator")]
pub struct ModelCredits {
    /// The model.
    #[validate(length(min = 1, max = 128))]
    pub model: String,
    /// Credits it used.
    pub credits_used: u64,
}

/// A process that used credits on several models ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Validate)]
#[serde(crate = "broker::serde")]
#[validate(crate = "broker::validator")]
pub struct CreditsProcessEndMultimodel {
    /// The process (unique per run).
    #[validate(length(min = 1, max = 128))]
    pub process_id: String,
    /// The account debited.
    #[validate(length(min = 1, max = 128))]
    pub account_id: String,
    /// Per model: at least one.
    #[validate(length(min = 1), nested)]
    pub models: Vec<ModelCredits>,
    /// `completed`, `failed` or `cancelled`.
    #[validate(custom(function = "valid_status"))]
    pub status: String,
    /// When it ended, in milliseconds since the Unix epoch.
    #[validate(range(min = 0))]
    pub ended_at_ms: i64,
}

impl CreditsProcessEndMultimodel {
    /// Credits over every model.
    pub fn total_credits(&self) -> u64 {
        self.models.iter().map(|m| m.credits_used).sum()
    }
}

impl Event for CreditsProcessEndMultimodel {
    const TOPIC: &'static str = END_MULTIMODEL_TOPIC;
    fn partition_key(&self) -> Option<String> {
        Some(self.account_id.clone())
    }
}

fn valid_status(status: &str) -> Result<(), broker::validator::ValidationError> {
    match status {
        "completed" | "failed" | "cancelled" => Ok(()),
        _ => Err(broker::validator::ValidationError::new("unknown_status")),
    }
}

/// The module's names: the real ones by default; tests use their own topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditsProcess {
    /// Topic of single-model ends.
    pub end_topic: String,
    /// Topic of multi-model ends.
    pub multimodel_topic: String,
    /// This app's group on the single-model topic.
    pub end_group: String,
    /// This app's group on the multi-model topic.
    pub multimodel_group: String,
}

impl CreditsProcess {
    /// The module of application `app`: groups
    /// `<app>-credits-process-end-group` and
    /// `<app>-credits-process-end-multimodel-group`.
    pub fn new(app: &str) -> Self {
        CreditsProcess {
            end_topic: END_TOPIC.to_owned(),
            multimodel_topic: END_MULTIMODEL_TOPIC.to_owned(),
            end_group: format!("{app}-credits-process-end-group"),
            multimodel_group: format!("{app}-credits-process-end-multimodel-group"),
        }
    }

    /// The same module with both topics prefixed by `prefix.` (tests).
    pub fn with_topic_prefix(mut self, prefix: &str) -> Self {
        self.end_topic = format!("{prefix}.{END_TOPIC}");
        self.multimodel_topic = format!("{prefix}.{END_MULTIMODEL_TOPIC}");
        self
    }

    /// Publishes a single-model end (validated first, keyed by account).
    pub async fn send_process_end(
        &self,
        publisher: &dyn Publisher,
        event: &CreditsProcessEnd,
    ) -> Result<()> {
        publisher
            .publish_event_to(&self.end_topic, event, None)
            .await
    }

    /// Publishes a multi-model end (validated first, keyed by account).
    pub async fn send_process_end_multimodel(
        &self,
        publisher: &dyn Publisher,
        event: &CreditsProcessEndMultimodel,
    ) -> Result<()> {
        publisher
            .publish_event_to(&self.multimodel_topic, event, None)
            .await
    }

    /// Starts the consumer of single-model ends.
    pub async fn start_end_consumer<F, Fut>(
        &self,
        endpoints: &Endpoints,
        concurrency: usize,
        handle: F,
    ) -> Result<ConsumerHandle>
    where
        F: Fn(CreditsProcessEnd, Received) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        endpoints
            .start_typed(&self.end_topic, &self.end_group, concurrency, handle)
            .await
    }

    /// Starts the consumer of multi-model ends.
    pub async fn start_multimodel_consumer<F, Fut>(
        &self,
        endpoints: &Endpoints,
        concurrency: usize,
        handle: F,
    ) -> Result<ConsumerHandle>
    where
        F: Fn(CreditsProcessEndMultimodel, Received) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        endpoints
            .start_typed(
                &self.multimodel_topic,
                &self.multimodel_group,
                concurrency,
                handle,
            )
            .await
    }
}
