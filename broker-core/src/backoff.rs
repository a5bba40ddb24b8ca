//! Exponential backoff with jitter: the handler retry policy and the
//! reconnect policy of backends. Delays come from `backon`.

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Exponential backoff: `initial_delay`, multiplied by `multiplier` after each
/// attempt, capped at `max_delay`, with random jitter, for at most
/// `max_attempts` attempts in total (the first one included).
///
/// ```
/// use std::time::Duration;
/// use broker_core::Backoff;
/// let policy = Backoff::retry_default()
///     .max_attempts(5)
///     .initial_delay(Duration::from_millis(50))
///     .without_jitter();
/// let delays: Vec<u128> = policy.delays().map(|d| d.as_millis()).collect();
/// assert_eq!(delays, [50, 100, 200, 400]); // 5 attempts = 4 waits
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    max_attempts: Option<u32>,
    initial_delay: Duration,
    max_delay: Duration,
    multiplier: f32,
    jitter: bool,
}

impl Backoff {
    /// Handler retries: 3 attempts, 200 ms doubling up to 10 s, with jitter.
    pub fn retry_default() -> Self {
        Backoff {
            max_attempts: Some(3),
            initial_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
            multiplier: 2.0,
            jitter: true,
        }
    }

    /// Reconnects: 10 attempts, 100 ms doubling up to 5 s, with jitter
    /// (about 20 s before a backend reports the broker unavailable).
    pub fn reconnect_default() -> Self {
        Backoff {
            max_attempts: Some(10),
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            multiplier: 2.0,
            jitter: true,
        }
    }

    /// No retries: a single attempt.
    pub fn none() -> Self {
        Backoff::retry_default().max_attempts(1)
    }

    /// Total attempts, the first included (at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts.max(1));
        self
    }
    /// Retry forever.
    pub fn unlimited(mut self) -> Self {
        self.max_attempts = None;
        self
    }
    /// Wait before the second attempt.
    pub fn initial_delay(mut self, delay: Duration) -> Self {
        self.initial_delay = delay;
        self
    }
    /// Longest wait between attempts.
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }
    /// Growth factor of the wait (at least 1).
    pub fn multiplier(mut self, multiplier: f32) -> Self {
        self.multiplier = multiplier.max(1.0);
        self
    }
    /// Exact delays, for tests and for reasoning about timing.
    pub fn without_jitter(mut self) -> Self {
        self.jitter = false;
        self
    }

    /// Total attempts allowed, `None` when unlimited.
    pub fn attempts(&self) -> Option<u32> {
        self.max_attempts
    }

    /// The waits between attempts, in order: `max_attempts - 1` of them.
    pub fn delays(&self) -> impl Iterator<Item = Duration> + Send + 'static {
        let mut builder = ExponentialBuilder::new()
            .with_min_delay(self.initial_delay)
            .with_max_delay(self.max_delay)
            .with_factor(self.multiplier);
        builder = match self.max_attempts {
            Some(n) => builder.with_max_times(n as usize - 1),
            None => builder.without_max_times(),
        };
        if self.jitter {
            builder = builder.with_jitter();
        }
        builder.build()
    }

    /// Runs `op` until it succeeds, `retryable` says an error is final, or
    /// the attempts run out; returns the last error with the attempt count.
    ///
    /// Backends use this for connecting:
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::time::Duration;
    /// use broker_core::Backoff;
    /// let policy = Backoff::reconnect_default().max_attempts(3).initial_delay(Duration::from_millis(1));
    /// let result: Result<(), (String, u32)> =
    ///     policy.retry(|| async { Err::<(), _>("refused".to_string()) }, |_| true).await;
    /// assert_eq!(result, Err(("refused".to_string(), 3)));
    /// # }
    /// ```
    pub async fn retry<T, E, F, Fut>(
        &self,
        mut op: F,
        retryable: impl Fn(&E) -> bool,
    ) -> Result<T, (E, u32)>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        let mut delays = self.delays();
        let mut attempt = 1;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) => match delays.next() {
                    Some(delay) if retryable(&e) => {
                        tracing::warn!(attempt, ?delay, error = %e, "attempt failed; retrying");
                        tokio::time::sleep(delay).await;
                        attempt += 1;
                    }
                    _ => return Err((e, attempt)),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_cap() {
        let d: Vec<_> = Backoff::retry_default()
            .max_attempts(6)
            .initial_delay(Duration::from_millis(100))
            .max_delay(Duration::from_millis(500))
            .multiplier(3.0)
            .without_jitter()
            .delays()
            .collect();
        let ms: Vec<u128> = d.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, vec![100, 300, 500, 500, 500]);
    }

    #[test]
    fn jitter_stays_within_one_extra_delay() {
        for d in Backoff::retry_default().max_attempts(4).delays().take(1) {
            assert!(
                d >= Duration::from_millis(200) && d < Duration::from_millis(400),
                "{d:?}"
            );
        }
    }

    #[test]
    fn single_attempt_has_no_delays() {
        assert_eq!(Backoff::none().delays().count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_stops_on_final_error() {
        let mut calls = 0;
        let r: Result<(), (&str, u32)> = Backoff::reconnect_default()
            .retry(
                || {
                    calls += 1;
                    async { Err("auth failed") }
                },
                |e| *e != "auth failed",
            )
            .await;
        assert_eq!(r, Err(("auth failed", 1)));
        assert_eq!(calls, 1);
    }
}
