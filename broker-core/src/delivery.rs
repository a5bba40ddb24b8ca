//! What a backend hands to the consumer runtime: deliveries and their acks.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{BrokerError, Result};
use crate::message::Message;

/// A message as received, with where it came from. This is what handlers see.
#[derive(Debug, Clone)]
pub struct Received {
    /// The message, as published.
    pub message: Message,
    /// The topic it was consumed from (shared by the subscription's
    /// deliveries: cloning a `Received` copies no strings).
    pub topic: Arc<str>,
    /// True when the broker says this is not the first delivery.
    pub redelivered: bool,
    /// Kafka partition, where the backend has partitions.
    pub partition: Option<i32>,
    /// Kafka offset, where the backend has offsets.
    pub offset: Option<i64>,
    /// Which attempt this is (1 for the first): 1 + the earlier deliveries
    /// the broker counted (a consumer that crashed or stopped with the
    /// message in flight), + the runtime's in-place retries. Backends set
    /// it from their delivery count; see
    /// [`crate::ConsumerBuilder::delivery_limit`].
    pub attempt: u32,
}

/// Settles one delivery with the broker. Implemented by each backend.
///
/// Dropping an acker without calling either method abandons the delivery: the
/// backend redelivers it at the latest when the stream it came from closes.
#[async_trait]
pub trait Acker: Send + Sync {
    /// The message is done: handled, or dead-lettered.
    async fn ack(self: Box<Self>) -> Result<()>;
    /// The message is not done. With `requeue`, deliver it again (to this
    /// group); without, drop it from this group.
    async fn nack(self: Box<Self>, requeue: bool) -> Result<()>;

    /// Settles the delivery by handing `message` (the delivery's message
    /// with the runtime's `x-retry-*` headers) to this group's retry
    /// destination, to be delivered to this group again after `delay`
    /// (rounded up to its [delay tier](crate::delay::Tier)): the non-blocking
    /// retry of [`crate::RetryMode::Delayed`]. Only after the destination
    /// accepted the copy is the delivery acknowledged. When it cannot be
    /// scheduled, the delivery is returned for redelivery (as by
    /// `nack(true)`) and the error says why.
    ///
    /// Backends that have a retry destination say so with
    /// [`crate::Subscriber::delayed_retry`]; the default returns the
    /// delivery and [`BrokerError::Unsupported`].
    async fn retry_after(self: Box<Self>, message: Message, delay: Duration) -> Result<()> {
        let _ = (message, delay);
        self.nack(true).await?;
        Err(BrokerError::Unsupported {
            backend: "this backend",
            operation: "delayed retry",
        })
    }
}

/// One message taken from a subscription, not yet settled.
pub struct Delivery {
    /// The message and its origin.
    pub received: Received,
    acker: Box<dyn Acker>,
}

impl Delivery {
    /// Pairs a received message with the backend's acker.
    pub fn new(received: Received, acker: Box<dyn Acker>) -> Self {
        Delivery { received, acker }
    }
    /// The message.
    pub fn message(&self) -> &Message {
        &self.received.message
    }
    /// Acknowledges: the message will not be delivered to this group again.
    pub async fn ack(self) -> Result<()> {
        self.acker.ack().await
    }
    /// Negatively acknowledges; see [`Acker::nack`].
    pub async fn nack(self, requeue: bool) -> Result<()> {
        self.acker.nack(requeue).await
    }
    /// Splits into the message and its acker.
    pub fn into_parts(self) -> (Received, Box<dyn Acker>) {
        (self.received, self.acker)
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

/// A live subscription: a stream of deliveries for one (group, topic).
#[async_trait]
pub trait DeliveryStream: Send {
    /// The next delivery. `None` once the subscription is closed; an error
    /// only when the backend gave up (its own reconnect policy ran out).
    async fn next(&mut self) -> Option<Result<Delivery>>;

    /// Stops the subscription. Deliveries not yet acked are returned to the
    /// broker for redelivery; acks already made stay made.
    async fn close(self: Box<Self>) -> Result<()>;
}
