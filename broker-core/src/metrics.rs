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

/// Names of the labelled metrics the library records through the
/// [`metrics`](https://docs.rs/metrics) facade (feature `metrics`): to
/// whatever recorder the application installed (the facade's `prometheus`
/// feature installs one). Every one has the labels `topic` and `backend`
/// (`kafka`, `rabbitmq`, `memory`); those of consumers also `group`.
pub mod names {
    /// Counter: messages the broker accepted from a publisher.
    pub const PUBLISHED: &str = "broker_messages_published_total";
    /// Counter: messages whose handler succeeded.
    pub const HANDLED: &str = "broker_messages_handled_total";
    /// Counter: handler attempts that failed, with label `kind`
    /// (`handler`, `permanent`, `decode`, `validation`, `panic`).
    pub const FAILED: &str = "broker_handler_failures_total";
    /// Counter: handler attempts that were retries.
    pub const RETRIED: &str = "broker_messages_retried_total";
    /// Counter: messages sent to a dead-letter topic.
    pub const DEAD_LETTERED: &str = "broker_messages_dead_lettered_total";
    /// Histogram: seconds one handler attempt took, with label `outcome`
    /// (`ok` or `error`).
    pub const HANDLE_DURATION: &str = "broker_handle_duration_seconds";
    /// Gauge: messages a consumer group has not finished on a topic, where
    /// the broker can tell (Kafka: set by
    /// `KafkaBroker::record_consumer_lag`).
    pub const CONSUMER_LAG: &str = "broker_consumer_lag";
}

/// Suggested histogram buckets (seconds) for [`names::HANDLE_DURATION`]:
/// 1 ms to 30 s.
pub const HANDLE_DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Registers the help text and unit of each metric in [`names`] with the
/// installed recorder (exporters show them). Without the `metrics` feature
/// it does nothing.
pub fn describe() {
    #[cfg(feature = "metrics")]
    {
        use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
        describe_counter!(
            names::PUBLISHED,
            "Messages the broker accepted from a publisher"
        );
        describe_counter!(names::HANDLED, "Messages whose handler succeeded");
        describe_counter!(names::FAILED, "Handler attempts that failed");
        describe_counter!(names::RETRIED, "Handler attempts that were retries");
        describe_counter!(names::DEAD_LETTERED, "Messages sent to a dead-letter topic");
        describe_histogram!(
            names::HANDLE_DURATION,
            Unit::Seconds,
            "Time one handler attempt took"
        );
        describe_gauge!(
            names::CONSUMER_LAG,
            "Messages a consumer group has not finished on a topic"
        );
    }
}

/// Sets the [`names::CONSUMER_LAG`] gauge of `group` on `topic`. Backends
/// that know the lag call it (Kafka: `KafkaBroker::record_consumer_lag`);
/// an application may too. Without the `metrics` feature it does nothing.
pub fn record_consumer_lag(backend: &'static str, topic: &str, group: &str, lag: u64) {
    #[cfg(feature = "metrics")]
    metrics::gauge!(
        names::CONSUMER_LAG,
        "topic" => topic.to_owned(),
        "group" => group.to_owned(),
        "backend" => backend,
    )
    .set(lag as f64);
    #[cfg(not(feature = "metrics"))]
    let _ = (backend, topic, group, lag);
}

/// Counts `n` published messages in [`names::PUBLISHED`].
pub(crate) fn record_published(backend: &'static str, topic: &str, n: u64) {
    #[cfg(feature = "metrics")]
    if n > 0 {
        metrics::counter!(names::PUBLISHED, "topic" => topic.to_owned(), "backend" => backend)
            .increment(n);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (backend, topic, n);
}

/// One consumer's labelled metrics, registered once when it starts (so the
/// recorder must be installed before consumers start).
pub(crate) struct ConsumerInstruments {
    #[cfg(feature = "metrics")]
    labels: Vec<metrics::Label>,
    #[cfg(feature = "metrics")]
    handled: metrics::Counter,
    #[cfg(feature = "metrics")]
    retried: metrics::Counter,
    #[cfg(feature = "metrics")]
    dead_lettered: metrics::Counter,
    #[cfg(feature = "metrics")]
    duration_ok: metrics::Histogram,
    #[cfg(feature = "metrics")]
    duration_error: metrics::Histogram,
}

impl ConsumerInstruments {
    pub(crate) fn new(backend: &'static str, topic: &str, group: &str) -> Self {
        #[cfg(feature = "metrics")]
        {
            let labels = vec![
                metrics::Label::new("topic", topic.to_owned()),
                metrics::Label::new("group", group.to_owned()),
                metrics::Label::new("backend", backend),
            ];
            let with = |name: &'static str, extra: Option<(&'static str, &'static str)>| {
                let mut l = labels.clone();
                l.extend(extra.map(|(k, v)| metrics::Label::new(k, v)));
                metrics::Key::from_parts(name, l)
            };
            let metadata = metrics::Metadata::new(module_path!(), metrics::Level::INFO, None);
            let (handled, retried, dead_lettered, duration_ok, duration_error) =
                metrics::with_recorder(|r| {
                    (
                        r.register_counter(&with(names::HANDLED, None), &metadata),
                        r.register_counter(&with(names::RETRIED, None), &metadata),
                        r.register_counter(&with(names::DEAD_LETTERED, None), &metadata),
                        r.register_histogram(
                            &with(names::HANDLE_DURATION, Some(("outcome", "ok"))),
                            &metadata,
                        ),
                        r.register_histogram(
                            &with(names::HANDLE_DURATION, Some(("outcome", "error"))),
                            &metadata,
                        ),
                    )
                });
            ConsumerInstruments {
                labels,
                handled,
                retried,
                dead_lettered,
                duration_ok,
                duration_error,
            }
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = (backend, topic, group);
            ConsumerInstruments {}
        }
    }

    pub(crate) fn handled(&self) {
        #[cfg(feature = "metrics")]
        self.handled.increment(1);
    }

    pub(crate) fn failed(&self, kind: crate::FailureKind) {
        #[cfg(feature = "metrics")]
        {
            let mut labels = self.labels.clone();
            labels.push(metrics::Label::new("kind", kind.as_str()));
            metrics::counter!(names::FAILED, labels).increment(1);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = kind;
    }

    pub(crate) fn retried(&self) {
        #[cfg(feature = "metrics")]
        self.retried.increment(1);
    }

    pub(crate) fn dead_lettered(&self) {
        #[cfg(feature = "metrics")]
        self.dead_lettered.increment(1);
    }

    /// The start of a handler attempt, for [`Self::attempt_since`]: the
    /// clock is read only where the duration is recorded.
    pub(crate) fn clock(&self) -> Option<std::time::Instant> {
        #[cfg(feature = "metrics")]
        return Some(std::time::Instant::now());
        #[cfg(not(feature = "metrics"))]
        None
    }

    /// Records how long one handler attempt took since `started` (from
    /// [`Self::clock`]).
    pub(crate) fn attempt_since(&self, started: Option<std::time::Instant>, ok: bool) {
        if let Some(started) = started {
            self.attempt(started.elapsed(), ok);
        }
    }

    /// Records how long one handler attempt took.
    pub(crate) fn attempt(&self, took: std::time::Duration, ok: bool) {
        #[cfg(feature = "metrics")]
        match ok {
            true => self.duration_ok.record(took.as_secs_f64()),
            false => self.duration_error.record(took.as_secs_f64()),
        }
        #[cfg(not(feature = "metrics"))]
        let _ = (took, ok);
    }
}
