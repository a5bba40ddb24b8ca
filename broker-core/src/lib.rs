//! Publish and consume events without caring whether Apache Kafka, RabbitMQ
//! or the in-memory backend sits underneath.
//!
//! - [`Publisher`] and [`Subscriber`] are the two object-safe traits every
//!   backend implements (use them as `Arc<dyn Publisher>`).
//! - [`Consumer`] is the one consumer runtime for every backend: handler,
//!   retries with backoff, dead letters, bounded concurrency with per-key
//!   order, graceful shutdown. Backends only map fetch, ack and publish.
//!   A [`BatchHandler`] takes messages in batches on the same runtime ([`batch`]).
//! - [`MemoryBroker`] is the embedded default when no broker is enabled.
//! - [`config::BrokerConfig`] reads the flags (`KAFKA_ENABLED`, `RABBITMQ_URL`,
//!   `BROKER_ROUTE_<MODULE>`, ...).
//! - `testkit` (feature `testkit`) is the conformance suite every backend passes.
//!
//! ```
//! use std::sync::Arc;
//! use broker_core::{Consumer, MemoryBroker, Message, Publisher, Received};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), broker_core::BrokerError> {
//! let broker = MemoryBroker::new();
//! let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
//! let consumer = Consumer::builder(broker.clone(), "demo.orders.created", "billing")
//!     .dead_letters(broker.clone())
//!     .handler(move |msg: Received| {
//!         let tx = tx.clone();
//!         async move {
//!             tx.send(msg.message.payload().clone()).unwrap();
//!             Ok(())
//!         }
//!     })
//!     .start()
//!     .await?;
//! broker.publish("demo.orders.created", Message::new("hello")).await?;
//! assert_eq!(rx.recv().await.unwrap(), "hello");
//! consumer.shutdown(std::time::Duration::from_secs(5)).await?;
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub mod backoff;
pub mod batch;
pub mod combining;
pub mod config;
pub mod consumer;
pub mod delay;
pub mod delivery;
pub mod error;
pub mod event;
mod fast_hash;
pub mod handler;
pub mod instrument;
mod lanes;
pub mod memory;
pub mod message;
pub mod metrics;
pub mod migrate;
#[cfg(feature = "otel")]
pub mod otel;
pub mod retry;
pub mod topic;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use backoff::Backoff;
pub use batch::{typed_batch, BatchError, BatchHandler, TypedBatch};
pub use consumer::{Consumer, ConsumerBuilder, ConsumerHandle};
pub use delivery::{Acker, Delivery, DeliveryStream, Received};
pub use error::{BrokerError, Result};
pub use event::{Event, PublisherExt};
pub use handler::{typed, FailureKind, Handler, HandlerError};
pub use memory::MemoryBroker;
pub use message::{AmqpProperties, AmqpValue, HeaderValue, Headers, Message};
pub use metrics::{Metrics, MetricsSnapshot};
pub use retry::RetryMode;

/// Whether a backend can currently do its work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Connected and answering.
    Healthy,
    /// Not usable right now, with the reason.
    Unhealthy(String),
}

impl Health {
    /// True when healthy.
    pub fn is_healthy(&self) -> bool {
        matches!(self, Health::Healthy)
    }
}

/// Sends messages to topics. Returns only after the broker accepted the
/// message (Kafka: delivery report with acks=all; RabbitMQ: publisher confirm).
///
/// Implementations refuse bad input before sending anything
/// ([`message::check_outgoing`]).
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Publishes one message and waits for the broker to accept it.
    async fn publish(&self, topic: &str, message: Message) -> Result<()>;

    /// Publishes several messages to one topic. Every message is checked
    /// before any is sent; backends pipeline the sends. On partial failure
    /// the error is [`BrokerError::Batch`] listing the failed positions.
    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        for m in &messages {
            message::check_outgoing(topic, m, self.max_message_bytes())?;
        }
        let results =
            futures::future::join_all(messages.into_iter().map(|m| self.publish(topic, m))).await;
        batch_result(results)
    }

    /// Publishes one message that consumers get once `delay` has passed,
    /// and waits for the broker to accept it.
    ///
    /// The delay is rounded up to the next [delay tier](delay::Tier) (1 s,
    /// 5 s, 30 s, 2 min, 10 min, 1 h, 6 h, 24 h): the message is never early
    /// and at most one tier late (plus the broker's own latency). A delay of
    /// zero publishes at once, as [`Publisher::publish`]; one above
    /// [`delay::MAX_DELAY`] fails with [`BrokerError::DelayTooLong`], nothing
    /// sent. Messages of one tier arrive in the order they were published;
    /// a shorter tier published later can overtake a longer one.
    ///
    /// While it waits, the message is kept by the broker (RabbitMQ: a delay
    /// queue per topic and tier), so it survives consumer restarts; the
    /// in-memory backend keeps it in the process only. It goes to the
    /// groups subscribed when it is due, like a message published then.
    ///
    /// The default implementation, for publishers without delayed publish,
    /// fails with [`BrokerError::Unsupported`] for any delay above zero.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> broker_core::Result<()> {
    /// use std::time::Duration;
    /// use broker_core::{MemoryBroker, Message, Publisher, Subscriber, Subscription};
    /// let broker = MemoryBroker::new();
    /// let mut stream = broker.subscribe(Subscription::new("demo.reminders.due", "mailer")).await?;
    /// let started = std::time::Instant::now();
    /// // Rounded up to the 1 s tier.
    /// broker
    ///     .publish_after("demo.reminders.due", Message::new("ping"), Duration::from_millis(300))
    ///     .await?;
    /// let delivery = stream.next().await.unwrap()?;
    /// assert!(started.elapsed() >= Duration::from_secs(1));
    /// assert_eq!(delivery.message().payload(), "ping");
    /// delivery.ack().await?;
    /// # Ok(()) }
    /// ```
    async fn publish_after(&self, topic: &str, message: Message, delay: Duration) -> Result<()> {
        if delay::Tier::for_delay(delay)?.is_none() {
            return self.publish(topic, message).await;
        }
        Err(BrokerError::Unsupported {
            backend: self.backend_name(),
            operation: "delayed publish",
        })
    }

    /// Largest message (payload, key and headers) this publisher accepts.
    fn max_message_bytes(&self) -> usize;

    /// The backend's name (`kafka`, `rabbitmq`, `memory`): the `backend`
    /// label of the metrics. Layers give their inner publisher's.
    fn backend_name(&self) -> &'static str {
        "unknown"
    }

    /// The broker node this publisher's connection is on
    /// (`host:port/vhost`, no credentials), for health reports: RabbitMQ's
    /// one connection moves between the nodes of its node list. `None`
    /// while not connected, and for backends without a single connection
    /// (Kafka talks to whichever brokers lead the partitions; memory).
    fn connected_node(&self) -> Option<String> {
        None
    }

    /// Round trip to the broker.
    async fn health(&self) -> Health;

    /// Waits for messages in flight, then refuses new ones with
    /// [`BrokerError::Closed`].
    async fn close(&self) -> Result<()>;
}

/// Opens subscriptions: one per (consumer group, topic) call.
#[async_trait]
pub trait Subscriber: Send + Sync {
    /// Joins `group` on `topic`, creating what the broker needs (queue,
    /// binding, consumer group). Every group receives every message of the
    /// topic; members of one group share them. `prefetch` bounds how many
    /// unacknowledged deliveries the stream may hold.
    async fn subscribe(&self, subscription: Subscription) -> Result<Box<dyn DeliveryStream>>;

    /// Round trip to the broker.
    async fn health(&self) -> Health;

    /// The backend's name (`kafka`, `rabbitmq`, `memory`): the `backend`
    /// label of the consumer's metrics.
    fn backend_name(&self) -> &'static str {
        "unknown"
    }

    /// True when its deliveries can be retried later without holding up
    /// the next ones ([`Acker::retry_after`], used by
    /// [`RetryMode::Delayed`]); a consumer asking for delayed retries on a
    /// subscriber without them fails to start.
    fn delayed_retry(&self) -> bool {
        false
    }
}

/// What to subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// Topic name.
    pub topic: String,
    /// Consumer group name.
    pub group: String,
    /// Most unacknowledged deliveries held at once.
    pub prefetch: usize,
    /// Hand out what an earlier consumer left unsettled one at a time, each
    /// only after the one before it is settled, before the rest (RabbitMQ:
    /// prefetch 1 until the first delivery that is not a redelivery;
    /// Kafka: a partition whose last owner did not finish cleanly, record
    /// by record). A message that crashes the consumer again is then the
    /// only one whose delivery count grows, not its prefetched neighbours'.
    /// The consumer runtime asks for it when its delivery limit is on; a
    /// reader that holds deliveries without settling them (a listing)
    /// must not. Kafka keeps delivery counts only for such subscriptions
    /// (elsewhere every delivery is attempt 1); RabbitMQ's quorum queues
    /// count for every reader.
    pub isolate_redeliveries: bool,
}

impl Subscription {
    /// A subscription with a prefetch of 16.
    pub fn new(topic: impl Into<String>, group: impl Into<String>) -> Self {
        Subscription {
            topic: topic.into(),
            group: group.into(),
            prefetch: 16,
            isolate_redeliveries: false,
        }
    }
    /// Sets the prefetch (at least 1).
    pub fn with_prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }
    /// Hands out unsettled leftovers one at a time first; see
    /// [`Subscription::isolate_redeliveries`].
    pub fn isolating_redeliveries(mut self) -> Self {
        self.isolate_redeliveries = true;
        self
    }
}

#[async_trait]
impl<P: Publisher + ?Sized> Publisher for Arc<P> {
    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        (**self).publish(topic, message).await
    }
    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        (**self).publish_batch(topic, messages).await
    }
    async fn publish_after(&self, topic: &str, message: Message, delay: Duration) -> Result<()> {
        (**self).publish_after(topic, message, delay).await
    }
    fn max_message_bytes(&self) -> usize {
        (**self).max_message_bytes()
    }
    fn backend_name(&self) -> &'static str {
        (**self).backend_name()
    }
    fn connected_node(&self) -> Option<String> {
        (**self).connected_node()
    }
    async fn health(&self) -> Health {
        (**self).health().await
    }
    async fn close(&self) -> Result<()> {
        (**self).close().await
    }
}

#[async_trait]
impl<S: Subscriber + ?Sized> Subscriber for Arc<S> {
    async fn subscribe(&self, subscription: Subscription) -> Result<Box<dyn DeliveryStream>> {
        (**self).subscribe(subscription).await
    }
    async fn health(&self) -> Health {
        (**self).health().await
    }
    fn backend_name(&self) -> &'static str {
        (**self).backend_name()
    }
    fn delayed_retry(&self) -> bool {
        (**self).delayed_retry()
    }
}

/// Folds per-message results of a batch into one result.
pub fn batch_result(results: Vec<Result<()>>) -> Result<()> {
    let total = results.len();
    let failed: Vec<_> = results
        .into_iter()
        .enumerate()
        .filter_map(|(index, r)| r.err().map(|error| error::BatchFailure { index, error }))
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(BrokerError::Batch { total, failed })
    }
}
