//! Quickstart: publish and consume a typed event on the embedded in-memory
//! backend (no broker needed), and watch a retry and a dead letter happen.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! The same code runs on Kafka or RabbitMQ: only the broker value changes.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use broker::instrument::Instrumented;
use broker::message::header;
use broker::serde::{Deserialize, Serialize};
use broker::validator::Validate;
use broker::{
    typed, Backoff, Consumer, Event, HandlerError, MemoryBroker, Message, Publisher, PublisherExt,
    Received, Subscriber, Subscription,
};

/// A user used a feature of the product.
#[derive(Debug, Serialize, Deserialize, Validate)]
#[serde(crate = "broker::serde")]
#[validate(crate = "broker::validator")]
struct FeatureUsed {
    #[validate(length(min = 1))]
    user_id: String,
    #[validate(length(min = 1, max = 64))]
    feature: String,
}

impl Event for FeatureUsed {
    const TOPIC: &'static str = "quickstart.usage.feature-used";
    // Same user, same order: the key keeps a user's events in sequence.
    fn partition_key(&self) -> Option<String> {
        Some(self.user_id.clone())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Nothing is configured, so the in-memory backend is the default.
    let broker = MemoryBroker::new();
    let publisher = Instrumented::new(broker.clone());

    // Watch the dead-letter topic so we can show what lands there.
    let mut dead_letters = broker
        .subscribe(Subscription::new(
            format!("{}.dlq", FeatureUsed::TOPIC),
            "quickstart-dlq-viewer",
        ))
        .await?;

    let attempts = Arc::new(AtomicU32::new(0));
    let handler = {
        let attempts = attempts.clone();
        typed(move |event: FeatureUsed, meta: Received| {
            let attempts = attempts.clone();
            async move {
                match event.feature.as_str() {
                    // Fails once, then succeeds: a retry.
                    "flaky-export" if attempts.fetch_add(1, Ordering::SeqCst) == 0 => {
                        println!(
                            "handler: {} failed on attempt {} (will retry)",
                            event.feature, meta.attempt
                        );
                        Err(HandlerError::retryable("export service timed out"))
                    }
                    // Can never succeed: straight to the dead-letter topic.
                    "deleted-feature" => Err(HandlerError::permanent("feature no longer exists")),
                    _ => {
                        println!(
                            "handler: user {} used {} (attempt {}, message {})",
                            event.user_id,
                            event.feature,
                            meta.attempt,
                            meta.message.id()
                        );
                        Ok(())
                    }
                }
            }
        })
    };

    let consumer = Consumer::builder(broker.clone(), FeatureUsed::TOPIC, "quickstart-group")
        .handler(handler)
        .concurrency(4)
        .retry(Backoff::retry_default().initial_delay(Duration::from_millis(100)))
        .start()
        .await?;

    for feature in ["search", "flaky-export", "deleted-feature"] {
        let event = FeatureUsed {
            user_id: "user-42".into(),
            feature: feature.into(),
        };
        publisher.publish_event(&event).await?;
    }
    // An invalid event is refused before anything is sent.
    let invalid = FeatureUsed {
        user_id: String::new(),
        feature: "search".into(),
    };
    if let Err(e) = publisher.publish_event(&invalid).await {
        println!("publisher: refused invalid event: {e}");
    }
    // A payload that is not even JSON is dead-lettered by the consumer, without retries.
    publisher
        .publish(FeatureUsed::TOPIC, Message::new("not json"))
        .await?;

    for _ in 0..2 {
        let letter = tokio::time::timeout(Duration::from_secs(10), dead_letters.next())
            .await?
            .ok_or("dead-letter stream ended")??;
        let h = letter.message().headers();
        println!(
            "dead letter: message {} kind={} attempts={} reason={:?}",
            letter.message().id(),
            h[header::DLQ_ERROR_KIND],
            h[header::DLQ_ATTEMPTS],
            h[header::DLQ_REASON]
        );
        letter.ack().await?;
    }

    let metrics = consumer.metrics();
    consumer.shutdown(Duration::from_secs(5)).await?;
    println!(
        "published={} handled={} failed={} retried={} dead_lettered={}",
        publisher.metrics().snapshot().published,
        metrics.handled,
        metrics.failed,
        metrics.retried,
        metrics.dead_lettered
    );
    Ok(())
}
