//! The abstraction's side of each pair, the same for every backend: it only
//! sees `Publisher` and the consumer runtime.

use std::sync::Arc;
use std::time::Duration;

use broker_core::{Consumer, Message, Publisher, Received, Subscriber};

use crate::measure::{batched, windowed, Arrivals, Outcome};
use crate::Params;

/// Message `i` of a run.
pub fn message(p: &Params, payload: &bytes::Bytes, i: usize) -> Message {
    Message::new(payload.clone()).with_key(p.key(i))
}

/// `publish`, `window` in flight, after one warm-up message.
pub async fn publish(p: &Params, publisher: &dyn Publisher, topic: &str) -> Outcome {
    let payload = p.payload();
    publisher
        .publish(topic, Message::new("warm-up"))
        .await
        .expect("warm-up");
    windowed(p.n, p.window, |i| {
        let message = message(p, &payload, i);
        async move { publisher.publish(topic, message).await.expect("publish") }
    })
    .await
}

/// `publish_batch`, chunk by chunk, after one warm-up message.
pub async fn publish_batches(p: &Params, publisher: &dyn Publisher, topic: &str) -> Outcome {
    let payload = p.payload();
    publisher
        .publish(topic, Message::new("warm-up"))
        .await
        .expect("warm-up");
    batched(p.n, p.chunk, |range| {
        let messages: Vec<Message> = range.map(|i| message(p, &payload, i)).collect();
        async move {
            publisher
                .publish_batch(topic, messages)
                .await
                .expect("batch")
        }
    })
    .await
}

/// Puts `n` messages on `topic` (untimed), for the consumers.
pub async fn fill(p: &Params, publisher: &dyn Publisher, topic: &str) {
    let payload = p.payload();
    let mut from = 0;
    while from < p.n {
        let to = (from + 1000).min(p.n);
        let batch = (from..to).map(|i| message(p, &payload, i)).collect();
        publisher.publish_batch(topic, batch).await.expect("fill");
        from = to;
    }
}

/// The consumer runtime with `lanes` lanes and a handler that only counts,
/// until `n` messages were handled; timed from the first to the last.
pub async fn consume<B>(p: &Params, broker: B, topic: &str, group: &str, lanes: usize) -> Outcome
where
    B: Publisher + Subscriber + 'static,
{
    let arrivals = Arc::new(Arrivals::new(p.n));
    let counted = arrivals.clone();
    let consumer = Consumer::builder(broker, topic, group)
        .concurrency(lanes)
        .prefetch(p.prefetch)
        .handler(move |_r: Received| {
            counted.arrived();
            async { Ok(()) }
        })
        .start()
        .await
        .expect("consumer");
    let outcome = arrivals.wait(Duration::from_secs(300)).await;
    consumer
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
    outcome
}
