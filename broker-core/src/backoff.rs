//! Exponential backoff with jitter: the handler retry policy and the
//! reconnect policy of backends. Delays come from `backon`.

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Exponential backoff: `initial_delay`, multiplied by `multiplier` after each
/// attempt, capped at `max_delay` (jitter included), for at most
/// `max_attempts` attempts in total (the first one included) and, with
/// [`Backoff::within`], for at most a total time measured from the first
/// attempt.
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
    limit: Option<Duration>,
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
            limit: None,
        }
    }

    /// Reconnects: 10 attempts, 100 ms doubling up to 5 s, with jitter, and
    /// 30 s in all from the first attempt: a backend reports the broker
    /// unavailable after at most 30 s, whether its port refuses connections
    /// or stays silent (backends cut each attempt at the time left).
    pub fn reconnect_default() -> Self {
        Backoff {
            max_attempts: Some(10),
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            multiplier: 2.0,
            jitter: true,
            limit: Some(Duration::from_secs(30)),
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
    /// Gives up once `limit` has passed since the first attempt began: no
    /// wait that would end past it is started, and [`Backoff::time_left`]
    /// tells an attempt how long it may take.
    pub fn within(mut self, limit: Duration) -> Self {
        self.limit = Some(limit);
        self
    }
    /// No total time limit (attempts and delays alone bound the retries).
    pub fn without_limit(mut self) -> Self {
        self.limit = None;
        self
    }
    /// The total time limit, if any.
    pub fn limit(&self) -> Option<Duration> {
        self.limit
    }
    /// Time left of the limit for retries that began at `started`; `None`
    /// without a limit. Backends cut each attempt's own timeout to it.
    pub fn time_left(&self, started: tokio::time::Instant) -> Option<Duration> {
        self.limit.map(|l| l.saturating_sub(started.elapsed()))
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
        // backon's jitter adds up to one more delay: the cap holds anyway.
        let cap = self.max_delay;
        builder.build().map(move |d| d.min(cap))
    }

    /// Runs `op` until it succeeds, `retryable` says an error is final, or
    /// the attempts or the time limit run out; returns the last error with
    /// the attempt count.
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
        let started = tokio::time::Instant::now();
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) => match delays.next() {
                    Some(delay)
                        if retryable(&e)
                            && self.time_left(started).is_none_or(|left| delay < left) =>
                    {
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
    fn jitter_never_passes_the_cap() {
        let policy = Backoff::reconnect_default().max_attempts(200);
        assert!(policy.delays().all(|d| d <= Duration::from_secs(5)));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_at_the_time_limit() {
        let started = tokio::time::Instant::now();
        let policy = Backoff::reconnect_default()
            .max_attempts(1000)
            .within(Duration::from_secs(3))
            .without_jitter();
        let r: Result<(), (&str, u32)> = policy.retry(|| async { Err("down") }, |_| true).await;
        let (_, attempts) = r.unwrap_err();
        // 100 + 200 + 400 + 800 ms = 1.5 s; the next wait (1.6 s) would pass 3 s.
        assert_eq!(attempts, 5);
        assert!(started.elapsed() <= Duration::from_secs(3));
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
