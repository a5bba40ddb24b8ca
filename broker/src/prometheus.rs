//! Prometheus exporter for the library's metrics (feature `prometheus`).
//!
//! [`install`] makes a Prometheus recorder the process's `metrics`
//! recorder (with buckets for the handle-latency histogram and the help
//! text of every metric in [`crate::metrics::names`]); [`render`] gives the
//! text a `/metrics` handler returns, with [`CONTENT_TYPE`]. The app's own
//! `metrics` calls land in the same recorder.
//!
//! Install before starting consumers: a consumer registers its metrics
//! with the recorder installed when it starts.
//!
//! ```
//! # fn main() -> broker::Result<()> {
//! broker::prometheus::install()?;
//! // ... start consumers, publish ...
//! // in the /metrics handler:
//! let body = broker::prometheus::render();
//! # let _ = (body, broker::prometheus::CONTENT_TYPE);
//! # Ok(()) }
//! ```
//!
//! With axum: `.route("/metrics", get(|| async { ([(CONTENT_TYPE_HEADER,
//! broker::prometheus::CONTENT_TYPE)], broker::prometheus::render()) }))`.

use std::sync::Mutex;

use broker_core::metrics::{describe, names, HANDLE_DURATION_BUCKETS};
use broker_core::{BrokerError, Result};
pub use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The `Content-Type` of [`render`]'s text (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

static INSTALLED: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

/// A [`PrometheusBuilder`] with the library's settings: the
/// handle-duration histogram rendered as a Prometheus histogram with
/// [`HANDLE_DURATION_BUCKETS`]. For an app that configures more (global
/// labels, other buckets) and installs it itself; [`render`] then needs
/// the handle it gets, so use [`PrometheusHandle::render`] directly.
pub fn builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(names::HANDLE_DURATION.to_owned()),
            HANDLE_DURATION_BUCKETS,
        )
        .expect("the bucket list is not empty")
}

/// Installs [`builder`]'s recorder as the global `metrics` recorder and
/// describes the library's metrics. Calling it again returns the same
/// handle.
///
/// # Errors
///
/// [`BrokerError::Misconfigured`] when another global `metrics` recorder
/// is installed already.
pub fn install() -> Result<PrometheusHandle> {
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(handle) = &*installed {
        return Ok(handle.clone());
    }
    let handle = builder().install_recorder().map_err(|_| {
        BrokerError::Misconfigured("another global metrics recorder is installed already")
    })?;
    describe();
    *installed = Some(handle.clone());
    Ok(handle)
}

/// The Prometheus text of every metric recorded so far: the body of a
/// `/metrics` response (with [`CONTENT_TYPE`]). Installs the recorder on
/// first use if [`install`] was not called; empty when another recorder
/// is installed.
pub fn render() -> String {
    match install() {
        Ok(handle) => {
            // Histogram upkeep: without a background task, every scrape does it.
            handle.run_upkeep();
            handle.render()
        }
        Err(e) => {
            tracing::warn!(error = %e, "no Prometheus metrics to render");
            String::new()
        }
    }
}
