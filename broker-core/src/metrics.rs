//! Counters for publishing and consuming. Cheap to update from any task;
//! read them with [`Metrics::snapshot`] (for a health endpoint or exporter).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Live counters, shared by reference (`Arc<Metrics>`).
#[derive(Debug, Default)]
pub struct Metrics {
    published: AtomicU64,
    handled: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
}

/// A point-in-time copy of [`Metrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Messages the broker accepted from a publisher.
    pub published: u64,
    /// Messages whose handler succeeded.
    pub handled: u64,
    /// Handler attempts that failed (errors and panics).
    pub failed: u64,
    /// Attempts that were retries.
    pub retried: u64,
    /// Messages sent to a dead-letter topic.
    pub dead_lettered: u64,
}

impl Metrics {
    /// Counts `n` published messages.
    pub fn add_published(&self, n: u64) {
        self.published.fetch_add(n, Relaxed);
    }
    pub(crate) fn add_handled(&self) {
        self.handled.fetch_add(1, Relaxed);
    }
    pub(crate) fn add_failed(&self) {
        self.failed.fetch_add(1, Relaxed);
    }
    pub(crate) fn add_retried(&self) {
        self.retried.fetch_add(1, Relaxed);
    }
    pub(crate) fn add_dead_lettered(&self) {
        self.dead_lettered.fetch_add(1, Relaxed);
    }

    /// Reads all counters.
    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            published: self.published.load(Relaxed),
            handled: self.handled.load(Relaxed),
            failed: self.failed.load(Relaxed),
            retried: self.retried.load(Relaxed),
            dead_lettered: self.dead_lettered.load(Relaxed),
        }
    }
}
