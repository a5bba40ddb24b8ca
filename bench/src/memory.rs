//! The in-memory backend: publish alone, and publish plus consume through
//! the consumer runtime.

use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_core::{Consumer, MemoryBroker, Message, Publisher, Received, Subscriber, Subscription};

use crate::measure::{finish, Arrivals, Latencies, Outcome};
use crate::Params;

/// Publishes `n` messages one after another (each awaited).
pub async fn publish(p: &Params) -> Outcome {
    let broker = MemoryBroker::new();
    // A group, so messages are delivered somewhere, as in production.
    let _stream = broker
        .subscribe(Subscription::new("bench.memory", "g").with_prefetch(p.n))
        .await
        .expect("subscribe");
    let payload = p.payload();
    let mut latencies = Latencies::default();
    let start = Instant::now();
    for i in 0..p.n {
        let t = Instant::now();
        broker
            .publish(
                "bench.memory",
                Message::new(payload.clone()).with_key(p.key(i)),
            )
            .await
            .expect("publish");
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
    let consumer = Consumer::builder(broker.clone(), "bench.memory", "g")
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
    for i in 0..p.n {
        broker
            .publish(
                "bench.memory",
                Message::new(payload.clone()).with_key(p.key(i)),
            )
            .await
            .expect("publish");
    }
    let mut outcome = arrivals.wait(Duration::from_secs(120)).await;
    outcome.seconds = start.elapsed().as_secs_f64();
    consumer
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
    outcome
}
