//! Which lane a delivery goes to.
//!
//! Per-key order needs only that a message not start before the earlier
//! messages of its key have finished, so a key is tied to a lane only while
//! that lane holds some of its messages. A key with nothing in flight goes
//! to the lane with the least work, as does an unkeyed message. A fixed
//! hash of key to lane would leave lanes idle while others hold more keys
//! than their share (with 1,000 keys over 64 lanes, the busiest lane has
//! about 1.6 times the mean, and the run takes as long as that lane).
//!
//! Lanes report each message they finish ([`Finished`]); the dispatcher
//! reads the reports before routing the next delivery ([`Router::route`]).

use tokio::sync::mpsc;

use crate::fast_hash::FastMap;
use crate::message::Message;

/// A lane finished a message (settled it, or handed it back).
#[derive(Debug, Clone, Copy)]
struct Done {
    lane: usize,
    key: Option<u64>,
}

/// A lane's end of the reports.
#[derive(Clone)]
pub(crate) struct Finished {
    lane: usize,
    reports: mpsc::UnboundedSender<Done>,
}

impl Finished {
    /// The lane is done with a message of key hash `key` ([`key_of`]).
    pub(crate) fn done(&self, key: Option<u64>) {
        // The dispatcher going first means the consumer is stopping.
        let _ = self.reports.send(Done {
            lane: self.lane,
            key,
        });
    }
}

/// The dispatcher's view of the lanes' work.
pub(crate) struct Router {
    /// Messages routed to each lane and not finished.
    load: Vec<u32>,
    /// Keys with messages in flight: their lane and how many. Looked up
    /// for every message, so not SipHash: the map holds at most the
    /// prefetch's worth of keys, which bounds what colliding keys can cost.
    held: FastMap<u64, (usize, u32)>,
    reports: mpsc::UnboundedReceiver<Done>,
}

impl Router {
    /// A router of `lanes` lanes and each lane's report handle.
    pub(crate) fn new(lanes: usize) -> (Self, Vec<Finished>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let finished = (0..lanes)
            .map(|lane| Finished {
                lane,
                reports: tx.clone(),
            })
            .collect();
        let router = Router {
            load: vec![0; lanes],
            held: FastMap::default(),
            reports: rx,
        };
        (router, finished)
    }

    /// The lane for a message with key hash `key`, counted as routed there.
    pub(crate) fn route(&mut self, key: Option<u64>) -> usize {
        while let Ok(done) = self.reports.try_recv() {
            self.finish(done);
        }
        if let Some(&(lane, _)) = key.and_then(|k| self.held.get(&k)) {
            return self.routed(lane, key);
        }
        let lane = self
            .load
            .iter()
            .enumerate()
            .min_by_key(|&(_, load)| *load)
            .map_or(0, |(lane, _)| lane);
        self.routed(lane, key)
    }

    fn routed(&mut self, lane: usize, key: Option<u64>) -> usize {
        self.load[lane] += 1;
        if let Some(key) = key {
            self.held.entry(key).or_insert((lane, 0)).1 += 1;
        }
        lane
    }

    fn finish(&mut self, done: Done) {
        if let Some(load) = self.load.get_mut(done.lane) {
            *load = load.saturating_sub(1);
        }
        if let Some(key) = done.key {
            if let Some((_, count)) = self.held.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    self.held.remove(&key);
                }
            }
        }
    }
}

/// A hash of the message's key (FNV-1a), `None` for an unkeyed message.
/// Two keys with the same hash share a lane while both are in flight,
/// which only costs parallelism.
pub(crate) fn key_of(message: &Message) -> Option<u64> {
    message.key().map(|key| {
        key.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_stays_on_its_lane_while_in_flight_and_moves_when_done() {
        let (mut router, finished) = Router::new(3);
        let a = Some(1);
        let first = router.route(a);
        // Other work lands elsewhere: the least loaded lanes.
        let other = router.route(Some(2));
        assert_ne!(other, first);
        let unkeyed = router.route(None);
        assert!(unkeyed != first && unkeyed != other);
        // While a message of `a` is in flight, `a` goes to the same lane,
        // however loaded.
        assert_eq!(router.route(a), first);
        assert_eq!(router.route(a), first);
        finished[first].done(a);
        finished[first].done(a);
        assert_eq!(router.route(a), first, "one message of a still in flight");
        finished[first].done(a);
        finished[first].done(a);
        finished[unkeyed].done(None);
        // The first lane gets other work; `a`, with nothing in flight, goes
        // to the idle lane.
        assert_eq!(router.route(Some(3)), first);
        assert_eq!(router.route(a), unkeyed);
    }
}
