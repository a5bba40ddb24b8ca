//! Typed events: JSON with `serde`, checked with `validator` on both sides.

use std::time::Duration;

use async_trait::async_trait;
use serde::{de::DeserializeOwned, Serialize};
use validator::Validate;

use crate::error::{BrokerError, Result};
use crate::handler::{FailureKind, HandlerError};
use crate::message::Message;
use crate::Publisher;

/// A typed event: serialised as JSON, validated before it is published and
/// after it is decoded.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use validator::Validate;
/// use broker_core::Event;
///
/// #[derive(Debug, Serialize, Deserialize, Validate)]
/// struct FeatureUsed {
///     #[validate(length(min = 1))]
///     user_id: String,
///     #[validate(range(min = 1))]
///     count: u32,
/// }
///
/// impl Event for FeatureUsed {
///     const TOPIC: &'static str = "app.usage.feature-used";
///     fn partition_key(&self) -> Option<String> {
///         Some(self.user_id.clone())
///     }
/// }
///
/// let msg = FeatureUsed { user_id: "u1".into(), count: 2 }.to_message().unwrap();
/// assert_eq!(msg.key_str(), Some("u1"));
/// assert_eq!(msg.content_type(), Some("application/json"));
/// let back = FeatureUsed::from_message(&msg).unwrap();
/// assert_eq!(back.count, 2);
/// assert!(FeatureUsed { user_id: "".into(), count: 2 }.to_message().is_err());
/// ```
pub trait Event: Serialize + DeserializeOwned + Validate + Send + Sync + 'static {
    /// The topic this event is published to by default.
    const TOPIC: &'static str;

    /// Key that keeps related events in order (Kafka partition key).
    fn partition_key(&self) -> Option<String> {
        None
    }

    /// Validates and encodes into a message (key set from
    /// [`Event::partition_key`], content type `application/json`).
    fn to_message(&self) -> Result<Message> {
        self.validate()?;
        let payload = serde_json::to_vec(self).map_err(BrokerError::Encode)?;
        let mut msg = Message::new(payload).with_content_type("application/json");
        if let Some(key) = self.partition_key() {
            msg = msg.with_key(key);
        }
        Ok(msg)
    }

    /// Decodes and validates. Both failures are permanent: retrying cannot
    /// fix the payload, so the consumer runtime dead-letters at once.
    fn from_message(message: &Message) -> Result<Self, HandlerError> {
        let event: Self = serde_json::from_slice(message.payload())
            .map_err(|e| HandlerError::new(FailureKind::Decode, e))?;
        event
            .validate()
            .map_err(|e| HandlerError::new(FailureKind::Validation, e))?;
        Ok(event)
    }
}

/// Typed publishing on any [`Publisher`].
#[async_trait]
pub trait PublisherExt: Publisher {
    /// Validates, encodes and publishes `event` to [`Event::TOPIC`].
    async fn publish_event<E: Event>(&self, event: &E) -> Result<()> {
        self.publish(E::TOPIC, event.to_message()?).await
    }

    /// Like [`PublisherExt::publish_event`], to another topic, continuing the
    /// causal context of `cause` (see [`Message::caused_by`]) when given.
    async fn publish_event_to<E: Event>(
        &self,
        topic: &str,
        event: &E,
        cause: Option<&Message>,
    ) -> Result<()> {
        let mut msg = event.to_message()?;
        if let Some(cause) = cause {
            msg = msg.caused_by(cause);
        }
        self.publish(topic, msg).await
    }

    /// Validates and encodes `event` now, and publishes it to
    /// [`Event::TOPIC`] for delivery after `delay`
    /// ([`Publisher::publish_after`]: rounded up to the next delay tier).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> broker_core::Result<()> {
    /// use std::time::Duration;
    /// use serde::{Deserialize, Serialize};
    /// use broker_core::{Event, MemoryBroker, PublisherExt};
    ///
    /// #[derive(Serialize, Deserialize, validator::Validate)]
    /// struct TrialEnding {
    ///     #[validate(length(min = 1))]
    ///     account: String,
    /// }
    /// impl Event for TrialEnding {
    ///     const TOPIC: &'static str = "billing.trials.ending";
    /// }
    ///
    /// let broker = MemoryBroker::new();
    /// let event = TrialEnding { account: "a-1".into() };
    /// broker.publish_event_after(&event, Duration::from_secs(5)).await?;
    /// // Invalid events fail at once; nothing is scheduled.
    /// let invalid = TrialEnding { account: "".into() };
    /// assert!(broker.publish_event_after(&invalid, Duration::from_secs(5)).await.is_err());
    /// # Ok(()) }
    /// ```
    async fn publish_event_after<E: Event>(&self, event: &E, delay: Duration) -> Result<()> {
        self.publish_after(E::TOPIC, event.to_message()?, delay)
            .await
    }
}

impl<P: Publisher + ?Sized> PublisherExt for P {}
