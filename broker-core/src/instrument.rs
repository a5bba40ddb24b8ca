//! A [`Publisher`] layer that traces and counts publishes.

use std::sync::Arc;

use async_trait::async_trait;
use tracing::Instrument;

use crate::error::Result;
use crate::message::Message;
use crate::metrics::Metrics;
use crate::{Health, Publisher};

/// Wraps any publisher: starts a W3C trace on messages that carry none (so
/// the consumer's span joins the publisher's), opens a `publish` span with
/// topic, message id and correlation id, and counts accepted messages.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> broker_core::Result<()> {
/// use broker_core::{instrument::Instrumented, MemoryBroker, Message, Publisher};
/// let publisher = Instrumented::new(MemoryBroker::new());
/// publisher.publish("demo.things.happened", Message::new("x")).await?;
/// assert_eq!(publisher.metrics().snapshot().published, 1);
/// # Ok(()) }
/// ```
pub struct Instrumented<P> {
    inner: P,
    metrics: Arc<Metrics>,
}

impl<P: Publisher> Instrumented<P> {
    /// Wraps `inner` with fresh counters.
    pub fn new(inner: P) -> Self {
        Self::with_metrics(inner, Arc::default())
    }
    /// Wraps `inner`, counting into `metrics`.
    pub fn with_metrics(inner: P, metrics: Arc<Metrics>) -> Self {
        Instrumented { inner, metrics }
    }
    /// The counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
    /// The wrapped publisher.
    pub fn inner(&self) -> &P {
        &self.inner
    }
}

#[async_trait]
impl<P: Publisher> Publisher for Instrumented<P> {
    async fn publish(&self, topic: &str, mut message: Message) -> Result<()> {
        message.ensure_traceparent();
        let span = tracing::info_span!(
            "publish",
            topic,
            message_id = %message.id(),
            correlation_id = message.correlation_id().unwrap_or_default(),
            traceparent = message.traceparent().unwrap_or_default(),
        );
        let result = self.inner.publish(topic, message).instrument(span).await;
        match &result {
            Ok(()) => self.metrics.add_published(1),
            Err(e) => tracing::warn!(topic, error = %e, "publish failed"),
        }
        result
    }

    async fn publish_batch(&self, topic: &str, mut messages: Vec<Message>) -> Result<()> {
        messages.iter_mut().for_each(Message::ensure_traceparent);
        let total = messages.len() as u64;
        let span = tracing::info_span!("publish_batch", topic, size = total);
        let result = self
            .inner
            .publish_batch(topic, messages)
            .instrument(span)
            .await;
        match &result {
            Ok(()) => self.metrics.add_published(total),
            Err(crate::BrokerError::Batch { failed, .. }) => {
                self.metrics.add_published(total - failed.len() as u64)
            }
            Err(_) => {}
        }
        if let Err(e) = &result {
            tracing::warn!(topic, error = %e, "batch publish failed");
        }
        result
    }

    fn max_message_bytes(&self) -> usize {
        self.inner.max_message_bytes()
    }

    async fn health(&self) -> Health {
        self.inner.health().await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}
