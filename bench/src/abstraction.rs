//! The abstraction's side of each pair, the same for every backend: it only
//! sees `Publisher` and the consumer runtime.

use std::sync::Arc;
use std::time::Duration;

use broker_core::{Consumer, Message, Publisher, Received, Subscriber};

use crate::measure::{batched, windowed, Arrivals, KeyOrder, Outcome};
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

/// Puts `n` messages on `topic` (untimed), for the consumers; numbered
/// ones ([`Params::numbered_payload`]) for the handlers that check order.
pub async fn fill(p: &Params, publisher: &dyn Publisher, topic: &str, work: Work) {
    let payload = p.payload();
    let mut from = 0;
    while from < p.n {
        let to = (from + 1000).min(p.n);
        let batch = (from..to)
            .map(|i| match work {
                Work::Count => message(p, &payload, i),
                Work::Io => message(p, &p.numbered_payload(i), i),
            })
            .collect();
        publisher.publish_batch(topic, batch).await.expect("fill");
        from = to;
    }
}

/// What a consumer's handler does with each message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Counts it.
    Count,
    /// Checks its key's order, awaits 1 ms (simulated I/O), counts it.
    Io,
}

/// The simulated I/O of [`Work::Io`].
pub const IO_WAIT: Duration = Duration::from_millis(1);

/// The consumer runtime with `lanes` lanes and a handler doing `work`,
/// until `n` messages were handled; timed from the first to the last.
pub async fn consume<B>(
    p: &Params,
    broker: B,
    topic: &str,
    group: &str,
    lanes: usize,
    work: Work,
) -> Outcome
where
    B: Publisher + Subscriber + 'static,
{
    let arrivals = Arc::new(Arrivals::new(p.n));
    let order = Arc::new(KeyOrder::new(p.keys));
    let builder = Consumer::builder(broker, topic, group)
        .concurrency(lanes)
        .prefetch(p.prefetch);
    let builder = match work {
        Work::Count => {
            let counted = arrivals.clone();
            builder.handler(move |_r: Received| {
                counted.arrived();
                async { Ok(()) }
            })
        }
        Work::Io => {
            let (counted, order) = (arrivals.clone(), order.clone());
            builder.handler(move |r: Received| {
                order.saw(r.message.payload());
                let counted = counted.clone();
                async move {
                    tokio::time::sleep(IO_WAIT).await;
                    counted.arrived();
                    Ok(())
                }
            })
        }
    };
    let consumer = builder.start().await.expect("consumer");
    let mut outcome = arrivals.wait(Duration::from_secs(300)).await;
    consumer
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
    if work == Work::Io {
        outcome.out_of_order = Some(order.violations());
    }
    outcome
}
