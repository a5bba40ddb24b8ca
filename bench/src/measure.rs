//! What one scenario measured, and the helpers that measure it.

use std::future::Future;
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

/// The outcome of one scenario run (printed by the child process as JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    /// Messages moved.
    pub messages: usize,
    /// Time they took (first to last for consumers, so group joins are left out).
    pub seconds: f64,
    /// Median publish latency (publish call to confirmation), microseconds.
    pub p50_us: Option<u64>,
    /// 99th percentile publish latency, microseconds.
    pub p99_us: Option<u64>,
    /// Peak resident memory of the process, KiB.
    pub peak_rss_kib: u64,
    /// Messages a handler saw before an earlier one of the same key, where
    /// the scenario checks per-key order.
    #[serde(default)]
    pub out_of_order: Option<u64>,
}

impl Outcome {
    /// Messages per second.
    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.seconds.max(1e-9)
    }
}

/// Publish latencies, in microseconds.
#[derive(Debug, Default)]
pub struct Latencies(Vec<u64>);

impl Latencies {
    /// Records one.
    pub fn push(&mut self, d: Duration) {
        self.0.push(d.as_micros() as u64);
    }

    /// The `q` quantile (0..=1), if anything was recorded.
    pub fn quantile(&mut self, q: f64) -> Option<u64> {
        if self.0.is_empty() {
            return None;
        }
        self.0.sort_unstable();
        let i = ((self.0.len() - 1) as f64 * q).round() as usize;
        Some(self.0[i])
    }
}

/// The process's peak resident set (VmHWM), KiB.
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Runs `n` publishes with at most `window` in flight (as concurrent
/// request handlers of a server would), recording each one's latency.
/// `publish(i)` starts publish number `i`.
pub async fn windowed<F, Fut>(n: usize, window: usize, mut publish: F) -> Outcome
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut latencies = Latencies::default();
    let mut in_flight = FuturesUnordered::new();
    let start = Instant::now();
    for i in 0..n {
        if in_flight.len() >= window {
            latencies.push(in_flight.next().await.expect("in flight"));
        }
        let sent = publish(i);
        in_flight.push(async move {
            let t = Instant::now();
            sent.await;
            t.elapsed()
        });
    }
    while let Some(d) = in_flight.next().await {
        latencies.push(d);
    }
    finish(n, start.elapsed(), latencies)
}

/// Runs `n / chunk` batches one after another; each message's latency is
/// its batch's.
pub async fn batched<F, Fut>(n: usize, chunk: usize, mut publish: F) -> Outcome
where
    F: FnMut(std::ops::Range<usize>) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut latencies = Latencies::default();
    let start = Instant::now();
    let mut from = 0;
    while from < n {
        let to = (from + chunk).min(n);
        let t = Instant::now();
        publish(from..to).await;
        let d = t.elapsed();
        for _ in from..to {
            latencies.push(d);
        }
        from = to;
    }
    finish(n, start.elapsed(), latencies)
}

/// An outcome from a run's size, time and latencies.
pub fn finish(messages: usize, took: Duration, mut latencies: Latencies) -> Outcome {
    Outcome {
        messages,
        seconds: took.as_secs_f64(),
        p50_us: latencies.quantile(0.5),
        p99_us: latencies.quantile(0.99),
        peak_rss_kib: peak_rss_kib(),
        out_of_order: None,
    }
}

/// Counts deliveries and remembers when the first and the last came.
#[derive(Debug)]
pub struct Arrivals {
    expected: usize,
    seen: std::sync::atomic::AtomicUsize,
    first: std::sync::OnceLock<Instant>,
    last: std::sync::Mutex<Option<Instant>>,
    done: tokio::sync::Notify,
    /// Signalled every [`Arrivals::STEP`] deliveries.
    progress: tokio::sync::Notify,
}

impl Arrivals {
    /// Waits for `expected` deliveries.
    pub fn new(expected: usize) -> Self {
        Arrivals {
            expected,
            seen: Default::default(),
            first: Default::default(),
            last: Default::default(),
            done: Default::default(),
            progress: Default::default(),
        }
    }

    /// One delivery arrived.
    pub fn arrived(&self) {
        // The clock is read for the first and the last only: reading it per
        // message would add its cost to every scenario.
        let seen = self.seen.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
        if seen.is_multiple_of(Self::STEP) {
            self.progress.notify_one();
        }
        if seen == 1 {
            let _ = self.first.set(Instant::now());
        }
        if seen == self.expected {
            let now = Instant::now();
            let _ = self.first.set(now); // only if the first one's thread is still on its way
            *self.last.lock().unwrap() = Some(now);
            self.done.notify_one();
        }
    }

    /// How many deliveries make one step of progress.
    pub const STEP: usize = 1024;

    /// Deliveries so far.
    pub fn count(&self) -> usize {
        self.seen.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits until at least `n` deliveries arrived (checked every step).
    pub async fn reached(&self, n: usize) {
        while self.count() < n {
            self.progress.notified().await;
        }
    }

    /// Waits (at most `timeout`) for every delivery; the outcome of the
    /// span from the first to the last.
    pub async fn wait(&self, timeout: Duration) -> Outcome {
        let waited = tokio::time::timeout(timeout, async {
            while self.seen.load(std::sync::atomic::Ordering::Acquire) < self.expected {
                self.done.notified().await;
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "only {} of {} messages arrived within {timeout:?}",
            self.seen.load(std::sync::atomic::Ordering::Acquire),
            self.expected
        );
        let first = *self.first.get().expect("first");
        let last = self.last.lock().unwrap().expect("last");
        finish(self.expected, last - first, Latencies::default())
    }
}

/// Checks per-key order from numbered payloads (see
/// [`crate::Params::numbered_payload`]): each message carries its number
/// and its key's index, and a key's numbers must arrive increasing.
#[derive(Debug)]
pub struct KeyOrder {
    last: std::sync::Mutex<Vec<Option<u64>>>,
    violations: std::sync::atomic::AtomicU64,
}

impl KeyOrder {
    /// For `keys` distinct keys.
    pub fn new(keys: usize) -> Self {
        KeyOrder {
            last: std::sync::Mutex::new(vec![None; keys]),
            violations: Default::default(),
        }
    }

    /// A handler saw `payload`.
    pub fn saw(&self, payload: &[u8]) {
        let Some((number, key)) = crate::Params::numbering(payload) else {
            return;
        };
        let mut last = self.last.lock().unwrap();
        if let Some(slot) = last.get_mut(key) {
            if slot.is_some_and(|l| l > number) {
                self.violations
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            *slot = Some(number);
        }
    }

    /// Messages seen after a later one of their key.
    pub fn violations(&self) -> u64 {
        self.violations.load(std::sync::atomic::Ordering::Relaxed)
    }
}
