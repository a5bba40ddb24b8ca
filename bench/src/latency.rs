//! End-to-end latency: from the publish call to the start of the handler,
//! at a moderate fixed rate ([`RATE`]), ours against the raw clients.
//!
//! Publisher and consumer run in one process, so one clock serves both:
//! each payload carries the nanoseconds since the run's start at which its
//! publish was called. Publishes are paced (message `i` is started at
//! `i / RATE` seconds, without waiting for earlier confirms, as a server's
//! request handlers publish), and the consumer, one lane, takes the time
//! when its handler (or the raw loop) gets the message. A warm-up message
//! goes through first, so group joins and metadata fetches are not timed.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broker_core::{Consumer, Message, Publisher, Received, Subscriber};

use crate::measure::{peak_rss_kib, Arrivals, Latencies, Outcome};
use crate::Params;

/// Messages per second the publisher sends.
pub const RATE: u64 = 1_000;

/// Messages of a latency run of `n`: a twentieth, 200 to 5,000 (5 s at
/// [`RATE`]).
pub fn latency_n(n: usize) -> usize {
    (n / 20).clamp(200, 5_000).min(n.max(1))
}

/// Stamps payloads at publish, reads the stamp at the handler.
pub struct Probe {
    start: Instant,
    size: usize,
    latencies: Mutex<Latencies>,
    arrivals: Arrivals,
    warmed: AtomicBool,
    warm: tokio::sync::Notify,
}

/// The warm-up message's payload (shorter than a stamp).
const WARM_UP: &[u8] = b"warm";

impl Probe {
    /// A probe of `p.n` ([`latency_n`]) messages of `p.size` bytes.
    pub fn new(p: &Params) -> Arc<Self> {
        Arc::new(Probe {
            start: Instant::now(),
            size: p.size.max(8),
            latencies: Mutex::default(),
            arrivals: Arrivals::new(p.n),
            warmed: AtomicBool::new(false),
            warm: tokio::sync::Notify::new(),
        })
    }

    /// A payload stamped now.
    pub fn stamped(&self) -> bytes::Bytes {
        let mut payload = vec![b'x'; self.size];
        let nanos = self.start.elapsed().as_nanos() as u64;
        payload[..8].copy_from_slice(&nanos.to_be_bytes());
        payload.into()
    }

    /// The warm-up message's payload.
    pub fn warm_up() -> bytes::Bytes {
        bytes::Bytes::from_static(WARM_UP)
    }

    /// A handler got `payload`.
    pub fn saw(&self, payload: &[u8]) {
        let Some(stamp) = payload.get(..8).filter(|_| payload != WARM_UP) else {
            self.warmed.store(true, Ordering::Release);
            self.warm.notify_one();
            return;
        };
        let sent = Duration::from_nanos(u64::from_be_bytes(stamp.try_into().expect("8 bytes")));
        let latency = self.start.elapsed().saturating_sub(sent);
        self.latencies.lock().unwrap().push(latency);
        self.arrivals.arrived();
    }

    /// Waits (at most 60 s) until the warm-up message was handled.
    pub async fn warmed_up(&self) {
        tokio::time::timeout(Duration::from_secs(60), async {
            while !self.warmed.load(Ordering::Acquire) {
                self.warm.notified().await;
            }
        })
        .await
        .expect("the warm-up message reaches the consumer within 60 s");
    }

    /// Publishes the run at [`RATE`]: `publish(payload)` starts one publish.
    pub async fn paced<F, Fut>(&self, n: usize, mut publish: F)
    where
        F: FnMut(bytes::Bytes) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut sent = Vec::with_capacity(n);
        for _ in 0..n {
            tick.tick().await;
            sent.push(tokio::spawn(publish(self.stamped())));
        }
        for s in sent {
            s.await.expect("publish task");
        }
    }

    /// Waits for every message; the latencies' p50 and p99 as the outcome's.
    pub async fn outcome(&self) -> Outcome {
        let mut outcome = self.arrivals.wait(Duration::from_secs(120)).await;
        let mut latencies = std::mem::take(&mut *self.latencies.lock().unwrap());
        outcome.p50_us = latencies.quantile(0.5);
        outcome.p99_us = latencies.quantile(0.99);
        outcome.peak_rss_kib = peak_rss_kib();
        outcome
    }
}

/// Ours: `publish` at the fixed rate, the consumer runtime with one lane.
pub async fn lib<B>(p: &Params, broker: B, topic: &str, group: &str) -> Outcome
where
    B: Publisher + Subscriber + Clone + 'static,
{
    let probe = Probe::new(p);
    let seen = probe.clone();
    let consumer = Consumer::builder(broker.clone(), topic, group)
        .prefetch(p.prefetch)
        .handler(move |r: Received| {
            seen.saw(r.message.payload());
            async { Ok(()) }
        })
        .start()
        .await
        .expect("consumer");
    broker
        .publish(topic, Message::new(Probe::warm_up()))
        .await
        .expect("warm-up");
    probe.warmed_up().await;
    let topic: Arc<str> = topic.into();
    probe
        .paced(p.n, |payload| {
            let (broker, topic) = (broker.clone(), topic.clone());
            async move {
                broker
                    .publish(&topic, Message::new(payload))
                    .await
                    .expect("publish");
            }
        })
        .await;
    let outcome = probe.outcome().await;
    consumer
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
    outcome
}
