//! A [`Publisher`] layer that traces and counts publishes.

use std::sync::Arc;

use async_trait::async_trait;
use tracing::Instrument;

use crate::error::Result;
use crate::message::Message;
use crate::metrics::{record_published, Metrics};
use crate::{Health, Publisher};

/// Wraps any publisher: opens a `publish` span with topic, message id,
/// correlation id and `traceparent`, gives messages that carry no
/// `traceparent` one (so the consumer's span joins the publisher's trace:
/// with the `otel` feature, the `publish` span's OpenTelemetry context, see
/// [`crate::otel`]; otherwise a new W3C trace), and counts accepted
/// messages ([`Metrics`], and with the `metrics` feature
/// [`crate::metrics::names::PUBLISHED`] labelled by topic and backend).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> broker_core::Result<()> {
/// use broker_core::{instrument::Instrumented, MemoryBroker, Message, Publisher};
/// let publisher = Instrumented::new(MemoryBroker::new());
/// publisher.publish("demo.things.happened", Message::new("x")).await?;
/// assert_eq!(publisher.metrics().snapshot().published, 1);
/// // Delayed publishes go through the same layer.
/// let delay = std::time::Duration::from_millis(10);
/// publisher.publish_after("demo.things.happened", Message::new("y"), delay).await?;
/// assert_eq!(publisher.metrics().snapshot().published, 2);
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

    fn count_published(&self, topic: &str, n: u64) {
        self.metrics.add_published(n);
        record_published(self.inner.backend_name(), topic, n);
    }
}

/// Gives `message` a `traceparent` if it has none: the OpenTelemetry
/// context of `span` (feature `otel`, when the span has one), else a new
/// trace.
fn trace_context(span: &tracing::Span, message: &mut Message) {
    #[cfg(feature = "otel")]
    crate::otel::inject_span(span, message);
    #[cfg(not(feature = "otel"))]
    let _ = span;
    message.ensure_traceparent();
}

#[async_trait]
impl<P: Publisher> Publisher for Instrumented<P> {
    async fn publish(&self, topic: &str, mut message: Message) -> Result<()> {
        let span = tracing::info_span!(
            "publish",
            topic,
            message_id = %message.id(),
            correlation_id = message.correlation_id().unwrap_or_default(),
            traceparent = tracing::field::Empty,
        );
        trace_context(&span, &mut message);
        span.record("traceparent", message.traceparent().unwrap_or_default());
        let result = self.inner.publish(topic, message).instrument(span).await;
        match &result {
            Ok(()) => self.count_published(topic, 1),
            Err(e) => tracing::warn!(topic, error = %e, "publish failed"),
        }
        result
    }

    async fn publish_batch(&self, topic: &str, mut messages: Vec<Message>) -> Result<()> {
        let total = messages.len() as u64;
        let span = tracing::info_span!("publish_batch", topic, size = total);
        for message in &mut messages {
            trace_context(&span, message);
        }
        let result = self
            .inner
            .publish_batch(topic, messages)
            .instrument(span)
            .await;
        match &result {
            Ok(()) => self.count_published(topic, total),
            Err(crate::BrokerError::Batch { failed, .. }) => {
                self.count_published(topic, total - failed.len() as u64)
            }
            Err(_) => {}
        }
        if let Err(e) = &result {
            tracing::warn!(topic, error = %e, "batch publish failed");
        }
        result
    }

    /// Like `publish`, in a `publish` span that also records the delay;
    /// counted as published once the broker accepted it (not when due).
    async fn publish_after(
        &self,
        topic: &str,
        mut message: Message,
        delay: std::time::Duration,
    ) -> Result<()> {
        let span = tracing::info_span!(
            "publish",
            topic,
            message_id = %message.id(),
            correlation_id = message.correlation_id().unwrap_or_default(),
            traceparent = tracing::field::Empty,
            delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
        );
        trace_context(&span, &mut message);
        span.record("traceparent", message.traceparent().unwrap_or_default());
        let result = self
            .inner
            .publish_after(topic, message, delay)
            .instrument(span)
            .await;
        match &result {
            Ok(()) => self.count_published(topic, 1),
            Err(e) => tracing::warn!(topic, error = %e, "delayed publish failed"),
        }
        result
    }

    fn max_message_bytes(&self) -> usize {
        self.inner.max_message_bytes()
    }

    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }

    fn connected_node(&self) -> Option<String> {
        self.inner.connected_node()
    }

    async fn health(&self) -> Health {
        self.inner.health().await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}
