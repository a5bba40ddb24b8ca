//! What the backend's librdkafka clients report: logs and errors routed
//! through `tracing`, rate-limited, and authentication failures kept so that
//! `connect` can report them at once as final.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// The same log line (digits ignored) is written at most once per interval;
/// the next one that passes says how many were left out. With a broker down,
/// librdkafka repeats the same errors thousands of times.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Most distinct lines remembered; past it the memory starts over.
const MAX_KEYS: usize = 1024;

/// Context of the producer and admin clients.
#[derive(Clone, Default)]
pub(crate) struct ClientWatch {
    inner: Arc<Watch>,
}

#[derive(Default)]
struct Watch {
    limiter: LogLimiter,
    auth: Mutex<Option<String>>,
    auth_changed: tokio::sync::Notify,
}

impl ClientWatch {
    /// Waits until the broker refuses authentication; returns librdkafka's
    /// reason (which never contains the password).
    pub(crate) async fn authentication_failed(&self) -> String {
        loop {
            let changed = self.inner.auth_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(reason) = self.inner.auth.lock().unwrap().clone() {
                return reason;
            }
            changed.await;
        }
    }
}

impl ClientContext for ClientWatch {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_limited(&self.inner.limiter, level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if is_authentication(&error) {
            *self.inner.auth.lock().unwrap() = Some(reason.to_owned());
            self.inner.auth_changed.notify_waiters();
        }
        error_limited(&self.inner.limiter, &error, reason);
    }
}

fn is_authentication(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::UnsupportedSASLMechanism
                | RDKafkaErrorCode::IllegalSASLState
        )
    )
}

/// A log line of librdkafka at its level, unless the limiter holds it back.
pub(crate) fn log_limited(limiter: &LogLimiter, level: RDKafkaLogLevel, fac: &str, message: &str) {
    let Some(left_out) = limiter.admit(&format!("{fac} {message}")) else {
        return;
    };
    let left_out = Suppressed(left_out);
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", "{fac} {message}{left_out}")
        }
        RDKafkaLogLevel::Warning => {
            tracing::warn!(target: "librdkafka", "{fac} {message}{left_out}")
        }
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", "{fac} {message}{left_out}")
        }
        RDKafkaLogLevel::Debug => {
            tracing::debug!(target: "librdkafka", "{fac} {message}{left_out}")
        }
    }
}

/// A client error, unless the limiter holds it back.
pub(crate) fn error_limited(limiter: &LogLimiter, error: &KafkaError, reason: &str) {
    if let Some(left_out) = limiter.admit(&format!("{error} {reason}")) {
        let left_out = Suppressed(left_out);
        tracing::error!(target: "librdkafka", "{error}: {reason}{left_out}");
    }
}

struct Suppressed(u64);

impl std::fmt::Display for Suppressed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            0 => Ok(()),
            n => write!(f, " ({n} similar lines left out)"),
        }
    }
}

/// Lets one line of a kind through per [`LOG_INTERVAL`].
#[derive(Default)]
pub(crate) struct LogLimiter {
    seen: Mutex<HashMap<String, (Instant, u64)>>,
}

impl LogLimiter {
    /// `Some(lines left out since the last one)` when `line` may be written.
    pub(crate) fn admit(&self, line: &str) -> Option<u64> {
        // Digits vary between repeats (ports, times, counts): not part of the kind.
        let kind: String = line
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .take(160)
            .collect();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= MAX_KEYS && !seen.contains_key(&kind) {
            seen.clear();
        }
        let now = Instant::now();
        match seen.get_mut(&kind) {
            Some((since, left_out)) if now.duration_since(*since) < LOG_INTERVAL => {
                *left_out += 1;
                None
            }
            Some((since, left_out)) => {
                *since = now;
                Some(std::mem::take(left_out))
            }
            None => {
                seen.insert(kind, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_held_back_and_counted() {
        let limiter = LogLimiter::default();
        assert_eq!(limiter.admit("FAIL 127.0.0.1:9092 after 5ms"), Some(0));
        assert_eq!(limiter.admit("FAIL 127.0.0.1:9092 after 7ms"), None);
        assert_eq!(limiter.admit("FAIL 127.0.0.1:9093 after 1ms"), None);
        assert_eq!(limiter.admit("another line"), Some(0));
        // Once the interval passed, the next one says how many were left out.
        for (since, _) in limiter.seen.lock().unwrap().values_mut() {
            *since -= LOG_INTERVAL;
        }
        assert_eq!(limiter.admit("FAIL 127.0.0.1:9092 after 9ms"), Some(2));
    }
}
