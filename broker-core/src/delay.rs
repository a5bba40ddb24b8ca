//! Delay tiers: the fixed delays every backend's delayed publish
//! ([`Publisher::publish_after`](crate::Publisher::publish_after)) and,
//! later, non-blocking retries are built on.
//!
//! A requested delay is rounded **up** to the next tier ([`Tier::for_delay`]),
//! so a delayed message is never early and at most one tier late: a delay
//! of 3 s waits 5 s, a delay of 31 s waits 2 min. Delays above the largest
//! tier ([`MAX_DELAY`], 24 h) are refused with
//! [`BrokerError::DelayTooLong`] before anything is sent.
//!
//! Tiers exist because brokers delay cheaply only in a few fixed steps:
//! RabbitMQ keeps one queue per topic and tier whose messages all share one
//! time-to-live (so first in is first due), Kafka one partition per tier
//! (and topic partition) of the delay topic `{topic}.retry`. Every backend,
//! the in-memory one included,
//! waits the tier, not the exact delay, so code behaves the same on each.
//!
//! ```
//! use std::time::Duration;
//! use broker_core::delay::Tier;
//!
//! let tier = Tier::for_delay(Duration::from_secs(3)).unwrap().unwrap();
//! assert_eq!(tier.duration(), Duration::from_secs(5));
//! assert_eq!(tier.name(), "5s");
//! // No delay: no tier, publish at once.
//! assert_eq!(Tier::for_delay(Duration::ZERO).unwrap(), None);
//! // Above the largest tier: refused.
//! assert!(Tier::for_delay(Duration::from_secs(25 * 3600)).is_err());
//! ```

use std::time::Duration;

use crate::error::{BrokerError, Result};

/// The tiers, shortest first: name and length.
const TIERS: [(&str, Duration); 8] = [
    ("1s", Duration::from_secs(1)),
    ("5s", Duration::from_secs(5)),
    ("30s", Duration::from_secs(30)),
    ("2m", Duration::from_secs(2 * 60)),
    ("10m", Duration::from_secs(10 * 60)),
    ("1h", Duration::from_secs(60 * 60)),
    ("6h", Duration::from_secs(6 * 60 * 60)),
    ("24h", Duration::from_secs(24 * 60 * 60)),
];

/// The longest delay accepted: the largest tier.
pub const MAX_DELAY: Duration = TIERS[TIERS.len() - 1].1;

/// One delay tier: 1 s, 5 s, 30 s, 2 min, 10 min, 1 h, 6 h or 24 h.
///
/// ```
/// use broker_core::delay::Tier;
/// let names: Vec<&str> = Tier::all().map(|t| t.name()).collect();
/// assert_eq!(names, ["1s", "5s", "30s", "2m", "10m", "1h", "6h", "24h"]);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tier(u8);

impl Tier {
    /// Every tier, shortest first.
    pub fn all() -> impl ExactSizeIterator<Item = Tier> {
        (0..TIERS.len() as u8).map(Tier)
    }

    /// The tier a delay waits: the shortest one at least as long as
    /// `delay`. `Ok(None)` for no delay (publish at once);
    /// [`BrokerError::DelayTooLong`] above [`MAX_DELAY`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use broker_core::delay::Tier;
    /// let exact = Tier::for_delay(Duration::from_secs(30)).unwrap().unwrap();
    /// assert_eq!(exact.duration(), Duration::from_secs(30));
    /// let up = Tier::for_delay(Duration::from_millis(1)).unwrap().unwrap();
    /// assert_eq!(up.name(), "1s");
    /// ```
    pub fn for_delay(delay: Duration) -> Result<Option<Tier>> {
        if delay.is_zero() {
            return Ok(None);
        }
        match TIERS.iter().position(|(_, d)| *d >= delay) {
            Some(i) => Ok(Some(Tier(i as u8))),
            None => Err(BrokerError::DelayTooLong {
                delay,
                max: MAX_DELAY,
            }),
        }
    }

    /// How long a message of this tier waits.
    pub fn duration(self) -> Duration {
        TIERS[usize::from(self.0)].1
    }

    /// The tier's name in broker object names (`5s`, `2m`, `24h`).
    pub fn name(self) -> &'static str {
        TIERS[usize::from(self.0)].0
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_up_to_the_next_tier_and_never_down() {
        for (delay, expected) in [
            (Duration::from_nanos(1), "1s"),
            (Duration::from_secs(1), "1s"),
            (Duration::from_millis(1001), "5s"),
            (Duration::from_secs(5), "5s"),
            (Duration::from_secs(6), "30s"),
            (Duration::from_secs(31), "2m"),
            (Duration::from_secs(121), "10m"),
            (Duration::from_secs(601), "1h"),
            (Duration::from_secs(3601), "6h"),
            (Duration::from_secs(6 * 3600 + 1), "24h"),
            (MAX_DELAY, "24h"),
        ] {
            let tier = Tier::for_delay(delay).unwrap().unwrap();
            assert_eq!(tier.name(), expected, "delay {delay:?}");
            assert!(tier.duration() >= delay, "never early: {delay:?}");
        }
    }

    #[test]
    fn at_most_one_tier_late() {
        let tiers: Vec<Tier> = Tier::all().collect();
        for pair in tiers.windows(2) {
            // Just above the shorter tier: waits the longer one, which is the
            // worst lateness, less than the step between the two.
            let delay = pair[0].duration() + Duration::from_millis(1);
            let tier = Tier::for_delay(delay).unwrap().unwrap();
            assert_eq!(tier, pair[1]);
            assert!(tier.duration() - delay < pair[1].duration() - pair[0].duration());
        }
    }

    #[test]
    fn tiers_are_sorted_and_named_uniquely() {
        let tiers: Vec<Tier> = Tier::all().collect();
        assert!(tiers.windows(2).all(|w| w[0].duration() < w[1].duration()));
        let mut names: Vec<&str> = tiers.iter().map(|t| t.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), tiers.len());
    }

    #[test]
    fn zero_is_no_delay_and_too_long_is_refused() {
        assert_eq!(Tier::for_delay(Duration::ZERO).unwrap(), None);
        let too_long = MAX_DELAY + Duration::from_millis(1);
        match Tier::for_delay(too_long) {
            Err(BrokerError::DelayTooLong { delay, max }) => {
                assert_eq!(delay, too_long);
                assert_eq!(max, MAX_DELAY);
            }
            other => panic!("expected DelayTooLong, got {other:?}"),
        }
        assert!(!BrokerError::DelayTooLong {
            delay: too_long,
            max: MAX_DELAY
        }
        .is_transient());
    }
}
