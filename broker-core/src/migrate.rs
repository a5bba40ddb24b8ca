//! Moving a module from one broker to another without losing messages:
//! dual publishing, a bridge between brokers, and dead-letter replay.
//!
//! A migration usually goes: publish to both ([`DualPublisher`], route
//! `kafka+rabbitmq`), move consumers to the new broker, or [`bridge`] the
//! old broker's topic into the new one while old publishers drain; cut over;
//! roll back by flipping the route. All three keep id, key, headers and
//! payload, so consumers de-duplicate by message id if they need to.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::consumer::{Consumer, ConsumerBuilder};
use crate::delivery::Received;
use crate::error::Result;
use crate::handler::HandlerError;
use crate::message::{header, Message};
use crate::topic::validate_topic;
use crate::{Health, Publisher, Subscriber, Subscription};

/// What a failure on the secondary broker of a [`DualPublisher`] means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecondaryPolicy {
    /// Logged and counted; the publish succeeds if the primary accepted it.
    BestEffort,
    /// The publish fails unless both brokers accepted the message.
    Required,
}

/// Publishes every message to two brokers at once (route `kafka+rabbitmq`).
/// The primary must accept it; the secondary per [`SecondaryPolicy`].
///
/// Both sends run concurrently, so a publish that reports failure may still
/// have reached one broker: a retry can duplicate it there (at-least-once).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> broker_core::Result<()> {
/// use broker_core::migrate::{DualPublisher, SecondaryPolicy};
/// use broker_core::{MemoryBroker, Message, Publisher};
/// let (old, new) = (MemoryBroker::new(), MemoryBroker::new());
/// let dual = DualPublisher::new(old, new, SecondaryPolicy::BestEffort);
/// dual.publish("app.usage.feature-used", Message::new("x")).await?;
/// assert_eq!(dual.secondary_failures(), 0);
/// # Ok(()) }
/// ```
pub struct DualPublisher<P, S> {
    primary: P,
    secondary: S,
    policy: SecondaryPolicy,
    secondary_failures: AtomicU64,
}

impl<P: Publisher, S: Publisher> DualPublisher<P, S> {
    /// Publishes to `primary` and `secondary`.
    pub fn new(primary: P, secondary: S, policy: SecondaryPolicy) -> Self {
        DualPublisher {
            primary,
            secondary,
            policy,
            secondary_failures: AtomicU64::new(0),
        }
    }

    /// How many messages the secondary failed to take (best effort only).
    pub fn secondary_failures(&self) -> u64 {
        self.secondary_failures.load(Ordering::Relaxed)
    }

    fn combine(&self, topic: &str, primary: Result<()>, secondary: Result<()>) -> Result<()> {
        primary?;
        match (secondary, self.policy) {
            (Ok(()), _) => Ok(()),
            (Err(e), SecondaryPolicy::Required) => Err(e),
            (Err(e), SecondaryPolicy::BestEffort) => {
                self.secondary_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(topic, error = %e, "secondary broker did not take the message (best effort)");
                Ok(())
            }
        }
    }
}

#[async_trait]
impl<P: Publisher, S: Publisher> Publisher for DualPublisher<P, S> {
    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        let (p, s) = futures::join!(
            self.primary.publish(topic, message.clone()),
            self.secondary.publish(topic, message)
        );
        self.combine(topic, p, s)
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        let (p, s) = futures::join!(
            self.primary.publish_batch(topic, messages.clone()),
            self.secondary.publish_batch(topic, messages)
        );
        self.combine(topic, p, s)
    }

    /// Delays on both brokers at once; each rounds the delay to the same
    /// tier, so the copies fall due together.
    async fn publish_after(&self, topic: &str, message: Message, delay: Duration) -> Result<()> {
        let (p, s) = futures::join!(
            self.primary.publish_after(topic, message.clone(), delay),
            self.secondary.publish_after(topic, message, delay)
        );
        self.combine(topic, p, s)
    }

    /// The primary's: the broker every publish reaches.
    fn backend_name(&self) -> &'static str {
        self.primary.backend_name()
    }

    /// The primary's.
    fn connected_node(&self) -> Option<String> {
        self.primary.connected_node()
    }

    /// The smaller of the two limits: a message must fit both.
    fn max_message_bytes(&self) -> usize {
        self.primary
            .max_message_bytes()
            .min(self.secondary.max_message_bytes())
    }

    async fn health(&self) -> Health {
        let (p, s) = futures::join!(self.primary.health(), self.secondary.health());
        match (p, s, self.policy) {
            (Health::Unhealthy(r), _, _) => Health::Unhealthy(format!("primary: {r}")),
            (_, Health::Unhealthy(r), SecondaryPolicy::Required) => {
                Health::Unhealthy(format!("secondary: {r}"))
            }
            _ => Health::Healthy,
        }
    }

    async fn close(&self) -> Result<()> {
        let (p, s) = futures::join!(self.primary.close(), self.secondary.close());
        p.and(s)
    }
}

/// A consumer that copies `topic` from the `source` broker to the `target`
/// broker unchanged (id, key, headers, payload), in its own consumer group.
/// Messages the target refuses for good (too large, invalid) go to the
/// source's dead-letter topic; the rest is retried per the consumer's policy.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> broker_core::Result<()> {
/// use broker_core::{migrate::bridge, MemoryBroker};
/// let (rabbit, kafka) = (MemoryBroker::new(), MemoryBroker::new());
/// let running = bridge(rabbit, kafka, "app.usage.feature-used", "migration-bridge")
///     .concurrency(4)
///     .start()
///     .await?;
/// running.shutdown(std::time::Duration::from_secs(5)).await?;
/// # Ok(()) }
/// ```
pub fn bridge<B, T>(
    source: B,
    target: T,
    topic: impl Into<String>,
    group: impl Into<String>,
) -> ConsumerBuilder
where
    B: Publisher + Subscriber + 'static,
    T: Publisher + 'static,
{
    let target = Arc::new(target);
    Consumer::builder(source, topic, group).handler(move |r: Received| {
        let target = target.clone();
        async move {
            target
                .publish(&r.topic, r.message)
                .await
                .map_err(|e| match e.is_transient() {
                    true => HandlerError::retryable(e),
                    false => HandlerError::permanent(e),
                })
        }
    })
}

/// Outcome of [`replay_dead_letters`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Dead letters published back to their original topic and acked.
    pub replayed: usize,
    /// Dead letters left in place (no original-topic header, or a
    /// publish that failed); they stay in the dead-letter topic.
    pub left: usize,
}

/// Moves dead letters from `dead_letter_topic` back to the topic named in
/// their `x-dlq-original-topic` header, with the `x-dlq-*` headers removed
/// and everything else unchanged. Reads as consumer group `group` until
/// nothing arrives for `idle` or `max` letters were seen.
pub async fn replay_dead_letters(
    subscriber: &dyn Subscriber,
    publisher: &dyn Publisher,
    dead_letter_topic: &str,
    group: &str,
    max: usize,
    idle: Duration,
) -> Result<ReplayReport> {
    let mut stream = subscriber
        // Letters left in place stay unacked until the end: room for all of them.
        .subscribe(Subscription::new(dead_letter_topic, group).with_prefetch(max.min(10_000)))
        .await?;
    let mut report = ReplayReport::default();
    let mut left_behind = Vec::new();
    while report.replayed + report.left < max {
        let delivery = match tokio::time::timeout(idle, stream.next()).await {
            Ok(Some(d)) => d?,
            Ok(None) | Err(_) => break,
        };
        let mut message = delivery.message().clone();
        let target = message
            .headers_mut()
            .remove(header::DLQ_ORIGINAL_TOPIC)
            .and_then(|v| v.as_str().map(str::to_owned));
        message
            .headers_mut()
            .retain(|name, _| !name.starts_with("x-dlq-"));
        let published = match &target {
            Some(topic) if validate_topic(topic).is_ok() => publisher.publish(topic, message).await,
            _ => {
                tracing::warn!(
                    id = delivery.message().id(),
                    "dead letter has no valid original topic; left in place"
                );
                left_behind.push(delivery);
                report.left += 1;
                continue;
            }
        };
        match published {
            Ok(()) => {
                delivery.ack().await?;
                report.replayed += 1;
            }
            Err(e) => {
                tracing::warn!(error = %e, "replay publish failed; dead letter left in place");
                left_behind.push(delivery);
                report.left += 1;
            }
        }
    }
    // Unacked letters return to the dead-letter topic when the stream closes.
    stream.close().await?;
    drop(left_behind);
    Ok(report)
}
