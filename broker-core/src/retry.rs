//! Delayed, non-blocking retries ([`RetryMode::Delayed`]): a failed message
//! is handed to its group's retry destination with its attempt count and
//! due time, and acknowledged, so the next messages keep flowing; it comes
//! back after the backoff delay, and after the last attempt goes to the
//! dead-letter topic.

use std::time::{Duration, SystemTime};

use crate::consumer::{Runtime, StopSignal};
use crate::delay::{Tier, MAX_DELAY};
use crate::delivery::{Acker, Received};
use crate::handler::HandlerError;
use crate::message::{header, millis_since_epoch, Message};

/// Where a failed message waits for its next attempt.
///
/// - `InPlace` (the default) keeps it in its lane: the lane sleeps the
///   backoff delay and calls the handler again. Every later message of the
///   same key waits meanwhile (on Kafka, of the same partition too), so
///   per-key order holds, retries included.
/// - `Delayed` hands it to the group's retry destination (its delay tier,
///   see [`crate::delay`]) and acknowledges it: later messages, of its key
///   too, go on at once, and the retry comes back after the delay, **after
///   them**. Per-key order is given up for failed messages, in exchange for
///   throughput (one poison message no longer holds up its partition) and
///   retries that survive restarts. Use it when messages of a key do not
///   depend on each other, or when the handler tolerates reordering.
///
/// The retry policy's delays are rounded up to the delay tiers (1 s, 5 s,
/// 30 s, 2 min, ...), so a delayed retry waits at least its delay and at
/// most one tier more; choose delays that match the tiers. Its attempt
/// count travels with it (header `x-retry-attempt`, removed before the
/// handler sees the message): the dead letter's `x-dlq-attempts` counts
/// every attempt, across restarts. Each backend keeps the waiting copy in
/// the broker: RabbitMQ in a per-group delay queue per tier, Kafka in the
/// topic's delay topic `{topic}.retry` (marked for the group), memory in
/// the process. A consumer asking for
/// `Delayed` on a backend without a retry destination fails to start with
/// [`crate::BrokerError::Unsupported`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RetryMode {
    /// Retry in the message's lane, keeping per-key order (default).
    #[default]
    InPlace,
    /// Retry later through the broker, without holding up later messages.
    Delayed,
}

/// Removes a delayed retry's `x-retry-*` headers from `message`; returns
/// how many attempts were made before this copy (0 for a first delivery).
pub(crate) fn take_retry_headers(message: &mut Message) -> u32 {
    let attempt = message
        .headers()
        .get_str(header::RETRY_ATTEMPT)
        .and_then(|a| a.trim().parse::<u32>().ok());
    let Some(attempt) = attempt else {
        return 0;
    };
    message.headers_mut().retain(|name, _| {
        name != header::RETRY_ATTEMPT && name != header::RETRY_DUE && name != header::RETRY_GROUP
    });
    attempt.saturating_sub(1)
}

impl Runtime {
    /// The delayed-retry step after a failed attempt: hands the message to
    /// the retry destination for the policy's next delay, or dead-letters
    /// it when retrying cannot help or the attempts ran out.
    pub(crate) async fn retry_later(
        &self,
        received: Received,
        error: HandlerError,
        acker: Box<dyn Acker>,
        stop: StopSignal,
    ) {
        let next = match error.kind().is_retryable() {
            true => self
                .retry
                .delays()
                .nth(received.attempt.saturating_sub(1) as usize),
            false => None,
        };
        let Some(delay) = next else {
            return self.dead_letter(received, error, acker, stop).await;
        };
        let delay = delay.min(MAX_DELAY);
        let waits = Tier::for_delay(delay)
            .ok()
            .flatten()
            .map_or(Duration::ZERO, Tier::duration);
        let mut copy = received.message.clone();
        let headers = copy.headers_mut();
        headers.insert(header::RETRY_ATTEMPT, (received.attempt + 1).to_string());
        let due = millis_since_epoch(SystemTime::now() + waits);
        headers.insert(header::RETRY_DUE, due.to_string());
        tracing::warn!(attempt = received.attempt, ?waits, error = %error, "handler failed; will retry later without holding up the next messages");
        match acker.retry_after(copy, delay).await {
            Ok(()) => {
                self.metrics.add_retried();
                self.instruments.retried();
            }
            Err(e) => {
                tracing::warn!(error = %e, "delayed retry could not be scheduled; the message is returned for redelivery");
            }
        }
    }
}
