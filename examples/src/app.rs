//! The application that wires both modules: each module's consumers run on
//! the broker of its route, and the totals they keep show what was handled.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker::{ConsumerHandle, Result};

use crate::credits_process::{self, CreditsProcess};
use crate::feature_usage::{self, FeatureUsage};
use broker::{Brokers, Endpoints};

/// What the app's consumers have handled so far.
#[derive(Debug, Default)]
pub struct Totals {
    /// Feature usage logs handled (duplicates, by message id, not counted).
    pub usage_logs: AtomicU64,
    /// Units over those logs.
    pub usage_units: AtomicU64,
    /// Bulk writes of usage records (each one batch of logs).
    pub usage_writes: AtomicU64,
    /// Single-model process ends handled.
    pub process_ends: AtomicU64,
    /// Multi-model process ends handled.
    pub multimodel_ends: AtomicU64,
    /// Credits over both kinds of ends.
    pub credits: AtomicU64,
    /// Redeliveries seen (same message id again): at-least-once at work.
    pub duplicates: AtomicU64,
    seen: Mutex<HashSet<String>>,
}

impl Totals {
    /// True the first time a message id is seen; counts the repeats.
    fn first_time(&self, message_id: &str) -> bool {
        let fresh = self
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(message_id.to_owned());
        if !fresh {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
        }
        fresh
    }

    /// A one-line summary.
    pub fn summary(&self) -> String {
        format!(
            "{} usage logs ({} units, {} bulk writes), {} process ends, {} multi-model ends, {} credits, {} duplicates",
            self.usage_logs.load(Ordering::Relaxed),
            self.usage_units.load(Ordering::Relaxed),
            self.usage_writes.load(Ordering::Relaxed),
            self.process_ends.load(Ordering::Relaxed),
            self.multimodel_ends.load(Ordering::Relaxed),
            self.credits.load(Ordering::Relaxed),
            self.duplicates.load(Ordering::Relaxed),
        )
    }
}

/// The app: both modules on their routes.
#[derive(Debug, Clone)]
pub struct App {
    /// The connected brokers.
    pub brokers: Brokers,
    /// The feature-usage-log module.
    pub feature_usage: FeatureUsage,
    /// The credits-process module.
    pub credits_process: CreditsProcess,
}

/// The running consumers of an [`App`].
pub struct RunningApp {
    handles: Vec<ConsumerHandle>,
    /// What they handled.
    pub totals: Arc<Totals>,
}

impl App {
    /// App `name` (its groups are `<name>-...-group`) on `brokers`.
    pub fn new(brokers: Brokers, name: &str) -> Self {
        App {
            brokers,
            feature_usage: FeatureUsage::new(name),
            credits_process: CreditsProcess::new(name),
        }
    }

    /// Prefixes every topic with `prefix.` (tests run on shared brokers).
    pub fn with_topic_prefix(mut self, prefix: &str) -> Self {
        self.feature_usage = self
            .feature_usage
            .on_topic(format!("{prefix}.{}", feature_usage::TOPIC));
        self.credits_process = self.credits_process.with_topic_prefix(prefix);
        self
    }

    /// The feature-usage-log module's endpoints (`BROKER_ROUTE_FEATURE_USAGE`).
    pub fn feature_usage_endpoints(&self) -> Result<Endpoints> {
        self.brokers.endpoints(feature_usage::MODULE)
    }

    /// The credits-process module's endpoints (`BROKER_ROUTE_CREDITS_PROCESS`).
    pub fn credits_endpoints(&self) -> Result<Endpoints> {
        self.brokers.endpoints(credits_process::MODULE)
    }

    /// Starts the three consumers (with `concurrency` lanes each).
    pub async fn start(&self, concurrency: usize) -> Result<RunningApp> {
        let totals = Arc::new(Totals::default());
        let usage = self.feature_usage_endpoints()?;
        let credits = self.credits_endpoints()?;
        let t = totals.clone();
        let usage_consumer = self
            .feature_usage
            .start_bulk_consumer(&usage, concurrency, move |logs| {
                let t = t.clone();
                async move {
                    // One write for the batch (an app's: one multi-row INSERT).
                    let fresh = logs
                        .iter()
                        .filter(|(_, meta)| t.first_time(meta.message.id()));
                    let (count, units) =
                        fresh.fold((0, 0), |(n, u), (log, _)| (n + 1, u + log.units));
                    t.usage_writes.fetch_add(1, Ordering::Relaxed);
                    t.usage_logs.fetch_add(count, Ordering::Relaxed);
                    t.usage_units.fetch_add(units, Ordering::Relaxed);
                    Ok(())
                }
            })
            .await?;
        let t = totals.clone();
        let end_consumer = self
            .credits_process
            .start_end_consumer(&credits, concurrency, move |end, meta| {
                let t = t.clone();
                async move {
                    if t.first_time(meta.message.id()) {
                        t.process_ends.fetch_add(1, Ordering::Relaxed);
                        t.credits.fetch_add(end.credits_used, Ordering::Relaxed);
                    }
                    Ok(())
                }
            })
            .await?;
        let t = totals.clone();
        let multimodel_consumer = self
            .credits_process
            .start_multimodel_consumer(&credits, concurrency, move |end, meta| {
                let t = t.clone();
                async move {
                    if t.first_time(meta.message.id()) {
                        t.multimodel_ends.fetch_add(1, Ordering::Relaxed);
                        t.credits.fetch_add(end.total_credits(), Ordering::Relaxed);
                    }
                    Ok(())
                }
            })
            .await?;
        Ok(RunningApp {
            handles: vec![usage_consumer, end_consumer, multimodel_consumer],
            totals,
        })
    }
}

impl RunningApp {
    /// Waits until `done(totals)` holds, checking every 20 ms, for at most
    /// `timeout`; returns whether it held.
    pub async fn wait_until(&self, timeout: Duration, done: impl Fn(&Totals) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !done(&self.totals) {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Stops every consumer within `deadline`.
    pub async fn shutdown(self, deadline: Duration) -> Result<()> {
        let results =
            futures::future::join_all(self.handles.into_iter().map(|h| h.shutdown(deadline))).await;
        results.into_iter().collect()
    }
}
