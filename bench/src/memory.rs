//! The in-memory backend: publish alone, and publish plus consume through
//! the consumer runtime.

use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_core::{Consumer, MemoryBroker, Publisher, Received, Subscriber, Subscription};

use crate::abstraction;
use crate::measure::{finish, Arrivals, Latencies, Outcome};
use crate::Params;

const TOPIC: &str = "bench.memory";

/// Publishes message `i` of the run.
async fn publish(broker: &MemoryBroker, p: &Params, payload: &bytes::Bytes, i: usize) {
    broker
        .publish(TOPIC, abstraction::message(p, payload, i))
        .await
        .expect("publish");
}

/// Publishes `n` messages one after another (each awaited).
pub async fn publish_alone(p: &Params) -> Outcome {
    let broker = MemoryBroker::new();
    // A group, so messages are delivered somewhere, as in production.
    let _stream = broker
        .subscribe(Subscription::new(TOPIC, "g").with_prefetch(p.n))
        .await
        .expect("subscribe");
    let payload = p.payload();
    let mut latencies = Latencies::default();
    let start = Instant::now();
    for i in 0..p.n {
        let t = Instant::now();
        publish(&broker, p, &payload, i).await;
        if i % 64 == 0 {
            // Sampled: timing every call would cost as much as the call.
            latencies.push(t.elapsed());
        }
    }
    finish(p.n, start.elapsed(), latencies)
}

/// Publishes `n` messages while the consumer runtime (`lanes` lanes) handles
/// them; the time runs until the last is handled.
pub async fn end_to_end(p: &Params, lanes: usize) -> Outcome {
    let broker = MemoryBroker::new();
    let arrivals = Arc::new(Arrivals::new(p.n));
    let counted = arrivals.clone();
    let consumer = Consumer::builder(broker.clone(), TOPIC, "g")
        .concurrency(lanes)
        .prefetch(p.prefetch)
        .handler(move |_r: Received| {
            counted.arrived();
            async { Ok(()) }
        })
        .start()
        .await
        .expect("consumer");
    let payload = p.payload();
    let start = Instant::now();
    // Published from a task, as a server's request handlers publish (a
    // wake-up of the consumer then stays on the runtime's workers), at most
    // LEAD messages ahead of the handler: the rate both sustain, not how
    // fast the heap grows under an ever longer queue.
    const LEAD: usize = 10_000;
    let publisher = tokio::spawn({
        let (broker, p, handled) = (broker.clone(), p.clone(), arrivals.clone());
        async move {
            for i in 0..p.n {
                if i >= LEAD {
                    handled.reached(i + 1 - LEAD).await;
                }
                publish(&broker, &p, &payload, i).await;
            }
        }
    });
    publisher.await.expect("publisher task");
    let mut outcome = arrivals.wait(Duration::from_secs(120)).await;
    outcome.seconds = start.elapsed().as_secs_f64();
    consumer
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
    outcome
}

/// Ours at the fixed rate of [`crate::latency`].
pub async fn latency(p: &Params) -> Outcome {
    crate::latency::lib(p, MemoryBroker::new(), "bench.memory.latency", "g").await
}
