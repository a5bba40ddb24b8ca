//! Delivery counts that survive consumer crashes.
//!
//! Kafka keeps no per-record delivery count, so a record that kills the
//! consumer process would be read again from the committed offset forever.
//! The backend keeps the count itself, in a companion consumer group
//! [`counts_group`] (`{group}.delivery-counts`) that never has members: per
//! partition of the topic, that group's committed offset holds one integer
//! ([`encode`], one of [`Stored`]). A standalone client of that group
//! commits and reads it ([`CountStore`]); Kafka accepts such commits for a
//! group without members and does not check the values (tansu drops
//! commit metadata, so everything lives in the offset itself).
//!
//! The stored value says which records of the partition the last owner
//! may have handed out without settling them:
//!
//! - [`Stored::Window`] `X`: handing out in parallel (normal operation),
//!   it handed out at most every record up to `X`, each once. Before a
//!   record past the stored `X` is handed out, the stream stores a new `X`
//!   covering every record of the partition it holds (received, next in
//!   line): one synchronous commit per refill of a partition's records,
//!   nothing else per message.
//! - [`Stored::Head`] `(S, k)`: handing out one record at a time (a
//!   recovery), it handed out `S`, `k` times unsettled in all, and nothing
//!   after it; everything before `S` was settled before `S` was stored.
//! - [`Stored::Clean`]: it released the partition with nothing unsettled.
//!
//! So after a crash, every record that was in flight lies between the
//! group's committed offset and the stored position, however far from the
//! commit it sits. The next owner *recovers* such a partition: the whole
//! subscription hands out one record at a time (the next only once nothing
//! is in flight, after committing what finished), and each record the
//! last owner may have left unsettled is stored as the new head before it
//! is handed out, with `attempt` = its count: 2 for a record of a window
//! (its hand-out there was the first), `k + 1` for the head `S`. A crash
//! then lands on the record that caused it, which stays the head and
//! counts up until the delivery limit dead-letters it. The recovery ends
//! once it is past the stored position (or caught up) with nothing in
//! flight; then the partition stores windows again.
//!
//! A record of a window that had finished but whose commit had not landed
//! yet at the crash is counted too (attempt 2 once); so is one received
//! but not handed out yet. With a delivery limit of 2 or more that only
//! shows in `attempt`; with a limit of 1 such a record is dead-lettered.
//! The driver commits finished offsets promptly (see `consumer`), which
//! keeps that set small.
//!
//! While a partition recovers, the stream hands out records of the other
//! partitions first (a suspect record waits until they are caught up, for
//! at most [`HOLD`]): a record that kills the process does not starve its
//! neighbours in other partitions.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use broker_core::config::KafkaSettings;
use broker_core::Result;

use crate::client_config::{client_config, config_error, Role};
use crate::context::{error_limited, log_limited, LogLimiter};
use rdkafka::config::RDKafkaLogLevel;

/// Bits of the stored value below the offset: the count, or the window flag.
const COUNT_BITS: u32 = 10;

/// Marks a stored value as a [`Stored::Window`] (the top bit of the count
/// field: values of earlier versions, heads with counts below it, still
/// read as heads).
const WINDOW: i64 = 1 << (COUNT_BITS - 1);

/// Highest count stored: counts saturate there (a delivery limit above it
/// is never reached through crashes).
pub(crate) const MAX_COUNT: u32 = (1 << (COUNT_BITS - 1)) - 1;

/// How long a recovering partition's next record waits for the other
/// partitions to catch up before it is handed out anyway.
pub(crate) const HOLD: Duration = Duration::from_secs(3);

/// The companion consumer group keeping the delivery counts of `group`.
pub(crate) fn counts_group(group: &str) -> String {
    format!("{group}.delivery-counts")
}

/// What the last owner of a partition left, as stored (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stored {
    /// Released with nothing unsettled; `offset` is where it was.
    Clean { offset: i64 },
    /// Handed out alone, `count` times unsettled (this one included).
    Head { offset: i64, count: u32 },
    /// Every record up to `end` may have been handed out once.
    Window { end: i64 },
}

/// Packs a stored state into one committable offset (`offset << 10 |
/// count`, a window's flag in bit 9, the count capped at [`MAX_COUNT`]).
/// Offsets up to 2^53 fit.
pub(crate) fn encode(stored: Stored) -> i64 {
    match stored {
        Stored::Clean { offset } => offset.max(0) << COUNT_BITS,
        Stored::Head { offset, count } => {
            (offset.max(0) << COUNT_BITS) | i64::from(count.clamp(1, MAX_COUNT))
        }
        Stored::Window { end } => (end.max(0) << COUNT_BITS) | WINDOW,
    }
}

/// The state stored in a committed offset of the companion group; `None`
/// when nothing was stored (librdkafka reports a negative logical offset).
pub(crate) fn decode(value: i64) -> Option<Stored> {
    if value < 0 {
        return None;
    }
    let offset = value >> COUNT_BITS;
    let low = value & ((1 << COUNT_BITS) - 1);
    Some(match low {
        0 => Stored::Clean { offset },
        _ if low & WINDOW != 0 => Stored::Window { end: offset },
        count => Stored::Head {
            offset,
            count: count as u32,
        },
    })
}

/// What to do with a record before handing it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HandOut {
    /// The delivery's `attempt`: 1 + the earlier unsettled hand-outs.
    pub attempt: u32,
    /// Store this value in the companion group (synchronously) first.
    pub store: Option<i64>,
}

impl HandOut {
    const PLAIN: HandOut = HandOut {
        attempt: 1,
        store: None,
    };

    fn storing(attempt: u32, stored: Stored) -> Self {
        HandOut {
            attempt,
            store: Some(encode(stored)),
        }
    }
}

/// A partition's recovery from an unclean finish: what the last owner may
/// have left unsettled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recovery {
    /// Its head `offset`, handed out `count` times.
    Head { offset: i64, count: u32 },
    /// Every record up to `end`, once.
    Window { end: i64 },
    /// Not known (the read failed): count from scratch, `left` records.
    Unknown { left: usize },
}

#[derive(Debug)]
struct Partition {
    /// Tells reads of one assignment from those of a later one.
    epoch: u64,
    /// False until the stored state is read.
    read: bool,
    /// Recovering (see the module doc): one record at a time, each counted.
    recovery: Option<Recovery>,
    /// End of the window this assignment stored, if it stored one since
    /// its recovery (if any) ended.
    window: Option<i64>,
    /// This assignment stored something: it may mark the partition clean.
    wrote: Option<i64>,
    /// The last offset handed out in this assignment.
    last: Option<i64>,
    /// Caught up: recovery may end once the record at this offset is out.
    end_at: Option<i64>,
    /// Caught up with every received record handed out.
    caught_up: bool,
    /// librdkafka reported the partition's end at least once.
    eof_seen: bool,
}

impl Partition {
    /// The recovery has nothing left to count.
    fn recovered(&self) -> bool {
        let past = |end: i64| self.last.is_some_and(|last| last >= end);
        match self.recovery {
            None => true,
            _ if self.caught_up => true,
            Some(Recovery::Head { offset, .. }) => past(offset),
            Some(Recovery::Window { end }) => past(end),
            Some(Recovery::Unknown { left }) => left == 0,
        }
    }
}

/// Delivery counts of the partitions a subscription owns (pure logic: the
/// stream and the rebalance callbacks feed it and do what it returns).
#[derive(Debug)]
pub(crate) struct DeliveryCounts {
    partitions: BTreeMap<i32, Partition>,
    /// Counted records a recovery of unknown extent lasts: twice the prefetch.
    budget: usize,
    next_epoch: u64,
    /// Some partition recovers (kept up to date: asked per message).
    serial: bool,
    /// Counting at all: only for subscriptions that settle what they get
    /// ([`Subscription::isolate_redeliveries`](broker_core::Subscription)).
    enabled: bool,
}

impl DeliveryCounts {
    /// A recovery whose extent is unknown (failed read) lasts `2 ×
    /// prefetch` counted records. Disabled (`enabled` false), nothing is
    /// counted, read or stored: every delivery is attempt 1 and nothing is
    /// handed out one at a time (a reader that holds deliveries unsettled,
    /// such as a listing, would otherwise get one record).
    pub(crate) fn new(prefetch: usize, enabled: bool) -> Self {
        DeliveryCounts {
            partitions: BTreeMap::new(),
            budget: prefetch.max(1) * 2,
            next_epoch: 0,
            serial: false,
            enabled,
        }
    }

    /// The partition was assigned: its stored state is to be read.
    pub(crate) fn assign(&mut self, partition: i32) {
        if !self.enabled {
            return;
        }
        self.next_epoch += 1;
        self.partitions.insert(
            partition,
            Partition {
                epoch: self.next_epoch,
                read: false,
                recovery: None,
                window: None,
                wrote: None,
                last: None,
                end_at: None,
                caught_up: false,
                eof_seen: false,
            },
        );
        self.update();
    }

    /// Recomputes [`Self::serial`] after a partition's recovery may have
    /// changed.
    fn update(&mut self) {
        self.serial = self.partitions.values().any(|p| p.recovery.is_some());
    }

    /// True when records of `partition` may be handed out without reading
    /// first (read already, or not owned: then nothing is counted).
    pub(crate) fn is_read(&self, partition: i32) -> bool {
        self.partitions.get(&partition).is_none_or(|p| p.read)
    }

    /// The owned partitions not read yet, with their assignment epoch.
    pub(crate) fn unread(&self) -> Vec<(i32, u64)> {
        self.partitions
            .iter()
            .filter(|(_, p)| !p.read)
            .map(|(&partition, p)| (partition, p.epoch))
            .collect()
    }

    /// The stored value of `partition` as read for assignment `epoch`
    /// (ignored if the partition was assigned again since). A failed read
    /// (`Err`) counts as an unclean finish: the partition recovers, with
    /// counts starting over.
    pub(crate) fn read(&mut self, partition: i32, epoch: u64, value: Result<Option<i64>, ()>) {
        let budget = self.budget;
        let Some(p) = self.partitions.get_mut(&partition) else {
            return;
        };
        if p.epoch != epoch || p.read {
            return;
        }
        p.read = true;
        let recovery = match value {
            Ok(value) => match value.and_then(decode) {
                None | Some(Stored::Clean { .. }) => None,
                Some(Stored::Head { offset, count }) => Some(Recovery::Head { offset, count }),
                Some(Stored::Window { end }) => Some(Recovery::Window { end }),
            },
            Err(()) => Some(Recovery::Unknown { left: budget }),
        };
        // Caught up before anything was read (nothing to replay): no recovery.
        p.recovery = recovery.filter(|_| !p.caught_up);
        self.update();
    }

    /// True while a partition recovers: hand out one record at a time.
    pub(crate) fn serial(&self) -> bool {
        self.serial
    }

    /// True while `partition` recovers.
    pub(crate) fn recovering(&self, partition: i32) -> bool {
        self.partitions
            .get(&partition)
            .is_some_and(|p| p.recovery.is_some())
    }

    /// How suspect the record at `offset` of `partition` is, as the next
    /// of its partition to hand out: 0 when the last owner settled it or
    /// never handed it out, else the hand-outs it may have had unsettled.
    /// While serial, the least suspect record goes first.
    pub(crate) fn suspicion(&self, partition: i32, offset: i64) -> u32 {
        let Some(p) = self.partitions.get(&partition) else {
            return 0;
        };
        match p.recovery {
            Some(Recovery::Head {
                offset: head,
                count,
            }) if offset == head => count,
            Some(Recovery::Window { end }) if offset <= end => 1,
            Some(Recovery::Unknown { .. }) => 1,
            _ => 0,
        }
    }

    /// True while an owned partition other than `partition`, for which
    /// `has_records` is false, has not reached its end yet: a suspect
    /// record of `partition` waits for that one's records (see [`HOLD`]).
    pub(crate) fn others_behind(&self, partition: i32, has_records: impl Fn(i32) -> bool) -> bool {
        self.partitions
            .iter()
            .any(|(&q, p)| q != partition && !p.eof_seen && !has_records(q))
    }

    /// Nothing is in flight, nor decided and not handed out yet: ends the
    /// recoveries that have nothing left to count (past the stored
    /// position, out of budget, or caught up).
    pub(crate) fn settle(&mut self) {
        let mut changed = false;
        for p in self.partitions.values_mut() {
            if p.recovery.is_some() && p.recovered() {
                p.recovery = None;
                p.window = None;
                changed = true;
            }
        }
        if changed {
            self.update();
        }
    }

    /// The record at `offset` of `partition` is about to be handed out for
    /// the first time in this assignment (records are decided in offset
    /// order per partition; the partition must be read, see
    /// [`Self::is_read`]; while [`Self::serial`], only with nothing in
    /// flight). `ahead`: the highest offset of the partition held for
    /// handing out (at least `offset`), which a window stored now covers.
    pub(crate) fn hand_out(&mut self, partition: i32, offset: i64, ahead: i64) -> HandOut {
        let Some(p) = self.partitions.get_mut(&partition) else {
            return HandOut::PLAIN;
        };
        p.last = Some(offset);
        let counted = match p.recovery {
            // Settled by the last owner before it stored its head.
            Some(Recovery::Head { offset: head, .. }) if offset < head => Some(HandOut::PLAIN),
            Some(Recovery::Head {
                offset: head,
                count,
            }) if offset == head => {
                let count = count.saturating_add(1).min(MAX_COUNT);
                Some(HandOut::storing(count, Stored::Head { offset, count }))
            }
            Some(Recovery::Window { end }) if offset <= end => {
                Some(HandOut::storing(2, Stored::Head { offset, count: 2 }))
            }
            Some(Recovery::Unknown { left }) => {
                p.recovery = Some(Recovery::Unknown {
                    left: left.saturating_sub(1),
                });
                Some(HandOut::storing(1, Stored::Head { offset, count: 1 }))
            }
            // Past what the last owner handed out: nothing to count.
            Some(_) => {
                p.recovery = None;
                p.window = None;
                None
            }
            None => None,
        };
        let decision = match counted {
            Some(decision) => decision,
            None if p.window.is_some_and(|end| offset <= end) => HandOut::PLAIN,
            None => {
                let end = ahead.max(offset);
                p.window = Some(end);
                HandOut::storing(1, Stored::Window { end })
            }
        };
        if decision.store.is_some() {
            p.wrote = Some(offset);
        }
        if p.end_at.is_some_and(|end| offset >= end) {
            p.caught_up = true;
        }
        self.update();
        decision
    }

    /// librdkafka reached the end of `partition`; `last_received` is the
    /// last offset received from it in this assignment. Its recovery may
    /// end once that record is handed out (at once if it was).
    pub(crate) fn caught_up(&mut self, partition: i32, last_received: Option<i64>) {
        let Some(p) = self.partitions.get_mut(&partition) else {
            return;
        };
        p.eof_seen = true;
        match last_received {
            Some(end) if p.last.is_none_or(|last| last < end) => p.end_at = Some(end),
            _ => p.caught_up = true,
        }
    }

    /// The partition is revoked or the subscription closes. `settled`: no
    /// delivery of it is handed out and unsettled. Returns the value that
    /// marks it as finished cleanly, to store, when this assignment stored
    /// something; otherwise the stored state stays as it is, so that the
    /// next owner counts on.
    pub(crate) fn release(&mut self, partition: i32, settled: bool) -> Option<i64> {
        let p = self.partitions.remove(&partition)?;
        self.update();
        let offset = p.window.or(p.wrote)?;
        settled.then(|| encode(Stored::Clean { offset }))
    }

    /// The owned partitions.
    pub(crate) fn owned(&self) -> Vec<i32> {
        self.partitions.keys().copied().collect()
    }
}

/// How long the stream waits for a read or a store of the counts.
pub(crate) const STORE_TIMEOUT: Duration = Duration::from_secs(10);

/// A client of the companion group that never joins it: it reads and
/// commits the stored heads of one topic's partitions.
pub(crate) struct CountStore {
    /// `None` for a subscription that counts nothing.
    consumer: Option<BaseConsumer<CountsContext>>,
    topic: String,
}

/// Routes the client's logs like the others'.
struct CountsContext {
    limiter: LogLimiter,
}

impl ClientContext for CountsContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_limited(&self.limiter, level, fac, log_message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        error_limited(&self.limiter, &error, reason);
    }
}

impl ConsumerContext for CountsContext {}

impl CountStore {
    /// A client of [`counts_group`]`(group)` for `topic`; no client when
    /// not `enabled` (reads and stores then do nothing).
    pub(crate) fn new(
        settings: &KafkaSettings,
        group: &str,
        topic: &str,
        enabled: bool,
    ) -> Result<Self> {
        if !enabled {
            return Ok(CountStore {
                consumer: None,
                topic: topic.to_owned(),
            });
        }
        let mut config = client_config(settings, Role::Consumer);
        config.set("group.id", counts_group(group));
        let consumer = config
            .create_with_context(CountsContext {
                limiter: LogLimiter::default(),
            })
            .map_err(config_error)?;
        Ok(CountStore {
            consumer: Some(consumer),
            topic: topic.to_owned(),
        })
    }

    /// The stored values of `partitions` (`None`: nothing stored). Blocks
    /// for up to `timeout`.
    pub(crate) fn read(
        &self,
        partitions: &[i32],
        timeout: Duration,
    ) -> KafkaResult<Vec<(i32, Option<i64>)>> {
        let Some(consumer) = &self.consumer else {
            return Ok(Vec::new());
        };
        let mut tpl = TopicPartitionList::new();
        for &p in partitions {
            tpl.add_partition(&self.topic, p);
        }
        let result = consumer.committed_offsets(tpl, timeout);
        self.drain();
        let mut values = Vec::with_capacity(partitions.len());
        for e in result?.elements_for_topic(&self.topic) {
            e.error()?;
            let value = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            values.push((e.partition(), value));
        }
        Ok(values)
    }

    /// Stores `values` (partition, encoded head): `Sync` blocks until the
    /// broker accepted them.
    pub(crate) fn store(&self, values: &[(i32, i64)], mode: CommitMode) -> KafkaResult<()> {
        let Some(consumer) = self.consumer.as_ref().filter(|_| !values.is_empty()) else {
            return Ok(());
        };
        let mut tpl = TopicPartitionList::new();
        for &(p, value) in values {
            tpl.add_partition_offset(&self.topic, p, Offset::Offset(value))?;
        }
        let result = consumer.commit(&tpl, mode);
        self.drain();
        result
    }

    /// Serves the client's queued events (commit reports, errors): it is
    /// never polled otherwise.
    fn drain(&self) {
        if let Some(consumer) = &self.consumer {
            while consumer.poll(Duration::ZERO).is_some() {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_counts_nothing_and_never_serialises() {
        let mut c = DeliveryCounts::new(2, false);
        c.assign(0);
        assert!(c.unread().is_empty(), "nothing to read");
        assert!(c.is_read(0));
        assert_eq!(c.hand_out(0, 7, 9), HandOut::PLAIN);
        assert_eq!(c.hand_out(0, 8, 9), HandOut::PLAIN);
        assert!(!c.serial());
        assert_eq!(c.release(0, false), None);
    }

    /// Reads `stored` for partition 0 of a fresh assignment.
    fn assigned(stored: Option<Stored>) -> DeliveryCounts {
        let mut c = DeliveryCounts::new(2, true);
        c.assign(0);
        let epoch = c.unread()[0].1;
        c.read(0, epoch, Ok(stored.map(encode)));
        c
    }

    fn head(attempt: u32, offset: i64, count: u32) -> HandOut {
        HandOut {
            attempt,
            store: Some(encode(Stored::Head { offset, count })),
        }
    }

    fn window(end: i64) -> HandOut {
        HandOut {
            attempt: 1,
            store: Some(encode(Stored::Window { end })),
        }
    }

    /// The state a hand-out stored.
    fn stored(h: HandOut) -> Option<Stored> {
        h.store.and_then(decode)
    }

    #[test]
    fn encoding_round_trips_and_caps_the_count() {
        for stored in [
            Stored::Clean { offset: 0 },
            Stored::Clean { offset: 9 },
            Stored::Head {
                offset: 0,
                count: 1,
            },
            Stored::Head {
                offset: 7,
                count: 3,
            },
            Stored::Head {
                offset: 1 << 40,
                count: MAX_COUNT,
            },
            Stored::Window { end: 0 },
            Stored::Window { end: 1 << 40 },
        ] {
            assert_eq!(decode(encode(stored)), Some(stored));
        }
        assert_eq!(
            decode(encode(Stored::Head {
                offset: 5,
                count: 5000
            })),
            Some(Stored::Head {
                offset: 5,
                count: MAX_COUNT
            })
        );
        // A head stored by the earlier encoding (`offset << 10 | count`).
        assert_eq!(
            decode((12 << 10) | 3),
            Some(Stored::Head {
                offset: 12,
                count: 3
            })
        );
        assert_eq!(decode(-1001), None);
        assert_eq!(counts_group("billing"), "billing.delivery-counts");
    }

    #[test]
    fn a_clean_start_stores_a_window_per_refill() {
        for start in [None, Some(Stored::Clean { offset: 3 })] {
            let mut c = assigned(start);
            assert!(!c.serial());
            // 10..=12 are held: one store covers them.
            assert_eq!(c.hand_out(0, 10, 12), window(12));
            assert_eq!(c.hand_out(0, 11, 12), HandOut::PLAIN);
            assert_eq!(c.hand_out(0, 12, 14), HandOut::PLAIN);
            // 13 is past the window: the next store covers what is held then.
            assert_eq!(c.hand_out(0, 13, 14), window(14));
            assert!(!c.serial());
        }
    }

    #[test]
    fn a_record_that_crashes_every_owner_counts_up() {
        // It is the first record: the window of the first owner covers it.
        let mut c = assigned(None);
        let mut last = stored(c.hand_out(0, 3, 6));
        for attempt in 2..=5 {
            let mut c = assigned(last);
            assert!(c.serial(), "recovering after a crash");
            let h = c.hand_out(0, 3, 6);
            assert_eq!(h, head(attempt, 3, attempt));
            // The process dies here: the next owner reads what was stored.
            last = stored(h);
        }
    }

    #[test]
    fn a_crash_far_past_the_commit_is_counted_where_it_happened() {
        // The first owner handed out 0..=500 in parallel (windows up to
        // 540) and died on 500 with nothing committed.
        let mut c = assigned(None);
        let mut at = 0;
        while at <= 500 {
            let h = c.hand_out(0, at, at + 40);
            assert_eq!(h.attempt, 1);
            at += 1;
        }
        let crashed = Stored::Window { end: 540 };
        // The next owner re-reads from 0: each record of the window is
        // counted once (its first hand-out was unsettled), one at a time.
        let mut c = assigned(Some(crashed));
        for offset in 0..500 {
            assert!(c.serial());
            assert_eq!(c.hand_out(0, offset, 540), head(2, offset, 2));
        }
        let h = c.hand_out(0, 500, 540);
        assert_eq!(h, head(2, 500, 2));
        // It crashes again: the next owner, whose commit is at 500 or a
        // little before, counts 500 on.
        let mut c = assigned(stored(h));
        assert_eq!(c.hand_out(0, 498, 540), HandOut::PLAIN, "settled before");
        assert_eq!(c.hand_out(0, 499, 540), HandOut::PLAIN);
        assert_eq!(c.hand_out(0, 500, 540), head(3, 500, 3));
        // Dead-lettered by the runtime and settled: past the head the
        // recovery ends, with nothing in flight, and windows come back.
        c.settle();
        assert!(!c.serial());
        assert_eq!(c.hand_out(0, 501, 540), window(540));
    }

    #[test]
    fn a_window_recovery_ends_past_its_end() {
        let mut c = assigned(Some(Stored::Window { end: 4 }));
        for offset in 3..=4 {
            assert_eq!(c.hand_out(0, offset, 9), head(2, offset, 2));
            assert!(c.serial(), "until settled");
        }
        c.settle();
        assert!(!c.serial());
        assert_eq!(c.hand_out(0, 5, 9), window(9));
        // Committed past the window already: nothing to count.
        let mut c = assigned(Some(Stored::Window { end: 4 }));
        assert!(c.serial());
        assert_eq!(c.hand_out(0, 7, 9), window(9));
        assert!(!c.serial());
    }

    #[test]
    fn a_recovery_from_a_head_counts_only_the_head() {
        let mut c = assigned(Some(Stored::Head {
            offset: 10,
            count: 2,
        }));
        assert!(c.serial());
        assert_eq!(c.hand_out(0, 9, 12), HandOut::PLAIN);
        assert_eq!(c.hand_out(0, 10, 12), head(3, 10, 3));
        c.settle();
        assert!(!c.serial());
        assert_eq!(c.hand_out(0, 11, 12), window(12));
    }

    #[test]
    fn recovery_ends_when_caught_up() {
        let mut c = assigned(Some(Stored::Window { end: 9 }));
        assert_eq!(c.hand_out(0, 0, 1), head(2, 0, 2));
        // End of the partition after record 1, not handed out yet.
        c.caught_up(0, Some(1));
        c.settle();
        assert!(c.serial());
        assert_eq!(c.hand_out(0, 1, 1), head(2, 1, 2));
        assert!(c.serial(), "until settled");
        c.settle();
        assert!(!c.serial());
        assert_eq!(c.hand_out(0, 2, 2), window(2));
        // Caught up before anything was read (an empty partition): no
        // recovery, nothing of the old crash is left to replay.
        let mut c = DeliveryCounts::new(2, true);
        c.assign(0);
        c.caught_up(0, None);
        let epoch = c.unread()[0].1;
        c.read(0, epoch, Ok(Some(encode(Stored::Window { end: 5 }))));
        assert!(!c.serial());
        assert_eq!(c.hand_out(0, 9, 9), window(9));
    }

    #[test]
    fn a_failed_read_recovers_with_fresh_counts_for_twice_the_prefetch() {
        let mut c = DeliveryCounts::new(2, true);
        c.assign(0);
        assert!(!c.is_read(0));
        c.read(0, c.unread()[0].1, Err(()));
        assert!(c.is_read(0));
        for offset in 4..8 {
            assert!(c.serial());
            assert_eq!(c.hand_out(0, offset, 20), head(1, offset, 1));
        }
        c.settle();
        assert!(!c.serial());
        assert_eq!(c.hand_out(0, 8, 20), window(20));
    }

    #[test]
    fn a_read_of_an_earlier_assignment_is_ignored() {
        let mut c = DeliveryCounts::new(2, true);
        c.assign(0);
        let old = c.unread()[0].1;
        c.assign(0);
        c.read(0, old, Ok(Some(encode(Stored::Window { end: 3 }))));
        assert!(!c.is_read(0));
        let new = c.unread()[0].1;
        c.read(0, new, Ok(None));
        assert!(!c.serial());
        // Unowned partitions are handed out uncounted.
        assert!(c.is_read(7));
        assert_eq!(c.hand_out(7, 1, 1), HandOut::PLAIN);
    }

    #[test]
    fn serial_while_any_partition_recovers_and_the_others_go_first() {
        let mut c = assigned(Some(Stored::Window { end: 0 }));
        c.assign(1);
        c.read(
            1,
            c.unread()[0].1,
            Ok(Some(encode(Stored::Head {
                offset: 4,
                count: 1,
            }))),
        );
        c.assign(2);
        c.read(2, c.unread()[0].1, Ok(None));
        assert!(c.serial());
        assert!(c.recovering(0) && c.recovering(1) && !c.recovering(2));
        assert_eq!((c.suspicion(0, 0), c.suspicion(0, 1)), (1, 0));
        assert_eq!((c.suspicion(1, 3), c.suspicion(1, 4)), (0, 1));
        assert_eq!(c.suspicion(2, 0), 0);
        // 0's record waits for 2 (nothing of it held, not at its end) but
        // not for 1, which has records held.
        let held = |q| q == 1;
        assert!(c.others_behind(0, held), "2 has not reached its end");
        c.caught_up(2, None);
        assert!(!c.others_behind(0, held));
        assert!(c.others_behind(0, |_| false), "1 has not reached its end");
        c.caught_up(0, None);
        c.settle();
        assert!(c.serial(), "1 still recovers");
        // A partition assigned again starts unread, not recovering.
        c.assign(1);
        assert!(!c.serial());
        c.read(
            1,
            c.unread()[0].1,
            Ok(Some(encode(Stored::Head {
                offset: 4,
                count: 2,
            }))),
        );
        assert!(c.serial());
        assert_eq!(c.release(1, false), None);
        assert!(!c.serial());
    }

    #[test]
    fn only_a_settled_partition_that_stored_is_marked_clean() {
        let mut c = assigned(Some(Stored::Head {
            offset: 2,
            count: 1,
        }));
        c.assign(1);
        c.read(
            1,
            c.unread()[0].1,
            Ok(Some(encode(Stored::Window { end: 8 }))),
        );
        c.assign(2);
        c.read(2, c.unread()[0].1, Ok(None));
        assert_eq!(c.owned(), vec![0, 1, 2]);
        c.hand_out(0, 2, 2);
        c.hand_out(2, 0, 3);
        // 0 finished what it was handed: clean.
        assert_eq!(
            c.release(0, true),
            Some(encode(Stored::Clean { offset: 2 }))
        );
        // 1 handed nothing out: the old state stays for the next owner.
        assert_eq!(c.release(1, true), None);
        // 2 has a delivery in flight: its window stays.
        assert_eq!(c.release(2, false), None);
        assert!(c.owned().is_empty());
        assert_eq!(c.release(0, true), None);
    }
}
