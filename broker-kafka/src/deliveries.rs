//! Delivery counts that survive consumer crashes.
//!
//! Kafka keeps no per-record delivery count, so a record that kills the
//! consumer process would be read again from the committed offset forever.
//! The backend keeps the count itself, in a companion consumer group
//! [`counts_group`] (`{group}.delivery-counts`) that never has members: per
//! partition of the topic, that group's committed offset holds one integer
//! packing the *head* record's offset and how often it was handed out
//! without being settled ([`encode`]). A standalone client of that group
//! commits and reads it ([`CountStore`]); Kafka accepts such commits for a
//! group without members and does not check the values.
//!
//! What the subscription does ([`DeliveryCounts`], pure logic):
//!
//! - The first time it hands out a partition's records in an assignment
//!   (and a partition is assigned), it reads the stored head `(S, k)`.
//! - The first record handed out, at offset `o`, is stored as the head
//!   `(o, n + 1)` *before* it is handed out, where `n = k` if `o == S`
//!   and 0 otherwise; the delivery carries `attempt = n + 1`. That is one
//!   read and one synchronous commit per assignment and partition: nothing
//!   per message in normal operation.
//! - A clean revoke or close of a partition with nothing handed out and
//!   unsettled stores count 0 ("finished cleanly").
//! - A stored count of 1 or more therefore says the previous owner did not
//!   finish cleanly (it crashed, was killed, lost the partition or abandoned
//!   deliveries). The partition is then *recovering*: the whole
//!   subscription hands out one record at a time (the next only once
//!   nothing is in flight, after committing what finished), and every
//!   record at or after `S` is stored as the new head before it is handed
//!   out. A crash then lands on the record that caused it, which stays the
//!   head and counts up; records below `S` were settled by the previous
//!   owner (they were handed out one at a time before `S` was stored) and
//!   are handed out uncounted. Recovery ends after twice the prefetch of
//!   counted records, or when the partition is caught up (librdkafka's
//!   partition EOF, once the records received before it are handed out).

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

/// Bits of the stored value that hold the count; the offset is above them.
const COUNT_BITS: u32 = 10;

/// Highest count stored: counts saturate there (a delivery limit above it
/// is never reached through crashes).
pub(crate) const MAX_COUNT: u32 = (1 << COUNT_BITS) - 1;

/// The companion consumer group keeping the delivery counts of `group`.
pub(crate) fn counts_group(group: &str) -> String {
    format!("{group}.delivery-counts")
}

/// Packs a head record's offset and its count into one committable offset
/// (`offset << 10 | count`, the count capped at [`MAX_COUNT`]). Offsets
/// up to 2^53 fit.
pub(crate) fn encode(offset: i64, count: u32) -> i64 {
    (offset.max(0) << COUNT_BITS) | i64::from(count.min(MAX_COUNT))
}

/// The head stored in a committed offset of the companion group; `None`
/// when nothing was stored (librdkafka reports a negative logical offset).
pub(crate) fn decode(value: i64) -> Option<Head> {
    (value >= 0).then(|| Head {
        offset: value >> COUNT_BITS,
        count: (value & i64::from(MAX_COUNT)) as u32,
    })
}

/// A partition's head record: the last one stored before it was handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    pub offset: i64,
    /// Hand-outs of it that were not settled, this one included.
    pub count: u32,
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
}

#[derive(Debug)]
struct Partition {
    /// Tells reads of one assignment from those of a later one.
    epoch: u64,
    /// `None` until read; then the stored head, if any.
    stored: Option<Option<Head>>,
    /// A record was handed out in this assignment.
    handed_out: bool,
    /// This assignment stored a head: it may mark the partition clean.
    wrote: bool,
    /// One record at a time, each counted (see the module doc).
    recovering: bool,
    /// Counted records left before recovery ends.
    left: usize,
    /// The last offset handed out in this assignment.
    last: Option<i64>,
    /// Caught up: recovery ends once the record at this offset is handed out.
    end_at: Option<i64>,
    /// Caught up with every received record handed out.
    caught_up: bool,
}

/// Delivery counts of the partitions a subscription owns (pure logic: the
/// stream and the rebalance callbacks feed it and do what it returns).
#[derive(Debug)]
pub(crate) struct DeliveryCounts {
    partitions: BTreeMap<i32, Partition>,
    /// Counted records a recovery lasts at most: twice the prefetch.
    budget: usize,
    next_epoch: u64,
    /// Some partition recovers (kept up to date: asked per message).
    serial: bool,
    /// Counting at all: only for subscriptions that settle what they get
    /// ([`Subscription::isolate_redeliveries`](broker_core::Subscription)).
    enabled: bool,
}

impl DeliveryCounts {
    /// Recovery lasts at most `2 × prefetch` counted records. Disabled
    /// (`enabled` false), nothing is counted, read or stored: every
    /// delivery is attempt 1 and nothing is handed out one at a time (a
    /// reader that holds deliveries unsettled, such as a listing, would
    /// otherwise get one record).
    pub(crate) fn new(prefetch: usize, enabled: bool) -> Self {
        DeliveryCounts {
            partitions: BTreeMap::new(),
            budget: prefetch.max(1) * 2,
            next_epoch: 0,
            serial: false,
            enabled,
        }
    }

    /// The partition was assigned: its stored head is to be read.
    pub(crate) fn assign(&mut self, partition: i32) {
        if !self.enabled {
            return;
        }
        self.next_epoch += 1;
        self.partitions.insert(
            partition,
            Partition {
                epoch: self.next_epoch,
                stored: None,
                handed_out: false,
                wrote: false,
                recovering: false,
                left: self.budget,
                last: None,
                end_at: None,
                caught_up: false,
            },
        );
        self.update();
    }

    /// Recomputes [`Self::serial`] after a partition's recovery may have
    /// changed.
    fn update(&mut self) {
        self.serial = self.partitions.values().any(|p| p.recovering);
    }

    /// True when records of `partition` may be handed out without reading
    /// first (read already, or not owned: then nothing is counted).
    pub(crate) fn is_read(&self, partition: i32) -> bool {
        self.partitions
            .get(&partition)
            .is_none_or(|p| p.stored.is_some())
    }

    /// The owned partitions not read yet, with their assignment epoch.
    pub(crate) fn unread(&self) -> Vec<(i32, u64)> {
        self.partitions
            .iter()
            .filter(|(_, p)| p.stored.is_none())
            .map(|(&partition, p)| (partition, p.epoch))
            .collect()
    }

    /// The stored value of `partition` as read for assignment `epoch`
    /// (ignored if the partition was assigned again since). A failed read
    /// (`Err`) counts as an unclean finish: the partition recovers, with
    /// counts starting over.
    pub(crate) fn read(&mut self, partition: i32, epoch: u64, value: Result<Option<i64>, ()>) {
        let Some(p) = self.partitions.get_mut(&partition) else {
            return;
        };
        if p.epoch != epoch || p.stored.is_some() {
            return;
        }
        let (stored, unclean) = match value {
            Ok(value) => {
                let head = value.and_then(decode);
                (head, head.is_some_and(|h| h.count > 0))
            }
            Err(()) => (None, true),
        };
        p.stored = Some(stored);
        p.recovering = unclean && !p.caught_up;
        self.update();
    }

    /// True while a partition recovers: hand out one record at a time.
    pub(crate) fn serial(&self) -> bool {
        self.serial
    }

    /// The record at `offset` of `partition` is about to be handed out for
    /// the first time in this assignment (records are decided in offset
    /// order per partition; the partition must be read, see [`Self::is_read`]).
    pub(crate) fn hand_out(&mut self, partition: i32, offset: i64) -> HandOut {
        let Some(p) = self.partitions.get_mut(&partition) else {
            return HandOut::PLAIN;
        };
        let was_recovering = p.recovering;
        let stored = p.stored.flatten();
        let counted = match (p.recovering, stored) {
            // Settled by the previous owner before it stored `S`.
            (true, Some(head)) => offset >= head.offset,
            (true, None) => true,
            (false, _) => !p.handed_out,
        };
        p.handed_out = true;
        p.last = Some(offset);
        let decision = match counted {
            false => HandOut::PLAIN,
            true => {
                let earlier = stored.filter(|h| h.offset == offset).map_or(0, |h| h.count);
                let count = earlier.saturating_add(1).min(MAX_COUNT);
                p.stored = Some(Some(Head { offset, count }));
                p.wrote = true;
                if p.recovering {
                    p.left = p.left.saturating_sub(1);
                    p.recovering = p.left > 0;
                }
                HandOut {
                    attempt: earlier.saturating_add(1),
                    store: Some(encode(offset, count)),
                }
            }
        };
        if p.end_at.is_some_and(|end| offset >= end) {
            p.recovering = false;
            p.caught_up = true;
        }
        if was_recovering {
            self.update();
        }
        decision
    }

    /// librdkafka reached the end of `partition`; `last_received` is the
    /// last offset received from it in this assignment. Recovery ends once
    /// that record is handed out (at once if it was).
    pub(crate) fn caught_up(&mut self, partition: i32, last_received: Option<i64>) {
        let Some(p) = self.partitions.get_mut(&partition) else {
            return;
        };
        match last_received {
            Some(end) if p.last.is_none_or(|last| last < end) => p.end_at = Some(end),
            _ => {
                p.recovering = false;
                p.caught_up = true;
            }
        }
        self.update();
    }

    /// The partition is revoked or the subscription closes. `settled`: no
    /// delivery of it is handed out and unsettled. Returns the value that
    /// marks it as finished cleanly (count 0), to store, when this
    /// assignment stored a head; otherwise the stored head stays as it is,
    /// so that the next owner counts on.
    pub(crate) fn release(&mut self, partition: i32, settled: bool) -> Option<i64> {
        let p = self.partitions.remove(&partition)?;
        self.update();
        let head = p.stored.flatten()?;
        (p.wrote && settled).then(|| encode(head.offset, 0))
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
        assert_eq!(c.hand_out(0, 7), HandOut::PLAIN);
        assert_eq!(c.hand_out(0, 8), HandOut::PLAIN);
        assert!(!c.serial());
        assert_eq!(c.release(0, false), None);
    }

    /// Reads `stored` (raw) for partition 0 of a fresh assignment.
    fn assigned(stored: Option<i64>) -> DeliveryCounts {
        let mut c = DeliveryCounts::new(2, true);
        c.assign(0);
        let epoch = c.unread()[0].1;
        c.read(0, epoch, Ok(stored));
        c
    }

    fn counted(attempt: u32, offset: i64, count: u32) -> HandOut {
        HandOut {
            attempt,
            store: Some(encode(offset, count)),
        }
    }

    #[test]
    fn encoding_round_trips_and_caps_the_count() {
        for (offset, count) in [(0, 0), (0, 1), (7, 3), (1 << 40, 1023)] {
            assert_eq!(decode(encode(offset, count)), Some(Head { offset, count }));
        }
        assert_eq!(
            decode(encode(5, 5000)),
            Some(Head {
                offset: 5,
                count: MAX_COUNT
            })
        );
        assert_eq!(decode(-1001), None);
        assert_eq!(counts_group("billing"), "billing.delivery-counts");
    }

    #[test]
    fn a_clean_start_counts_only_the_first_record() {
        let mut c = assigned(None);
        assert!(!c.serial());
        assert_eq!(c.hand_out(0, 10), counted(1, 10, 1));
        assert_eq!(c.hand_out(0, 11), HandOut::PLAIN);
        assert_eq!(c.hand_out(0, 12), HandOut::PLAIN);
        // After a clean finish (count 0) the same holds.
        let mut c = assigned(Some(encode(10, 0)));
        assert!(!c.serial());
        assert_eq!(c.hand_out(0, 10), counted(1, 10, 1));
        assert_eq!(c.hand_out(0, 11), HandOut::PLAIN);
    }

    #[test]
    fn a_record_that_crashes_every_owner_counts_up() {
        let mut stored = None;
        for attempt in 1..=4 {
            let mut c = assigned(stored);
            assert_eq!(c.serial(), attempt > 1, "recovering after a crash");
            let h = c.hand_out(0, 3);
            assert_eq!(h, counted(attempt, 3, attempt));
            // The process dies here: the next owner reads what was stored.
            stored = h.store;
        }
    }

    #[test]
    fn recovery_counts_each_record_and_lands_on_the_one_that_crashed() {
        // The previous owner stored head 10 and crashed; 10..=12 finished
        // there but were not committed; 13 crashed it.
        let mut c = assigned(Some(encode(10, 1)));
        assert!(c.serial());
        assert_eq!(c.hand_out(0, 10), counted(2, 10, 2));
        assert_eq!(c.hand_out(0, 11), counted(1, 11, 1));
        assert_eq!(c.hand_out(0, 12), counted(1, 12, 1));
        let h = c.hand_out(0, 13);
        assert_eq!(h, counted(1, 13, 1));
        // Crash: the next owner resumes from a committed offset at or below
        // 13 (the commits of 11..=13 may not have landed).
        let mut c = assigned(h.store);
        assert!(c.serial());
        assert_eq!(
            c.hand_out(0, 12),
            HandOut::PLAIN,
            "settled before 13 was stored"
        );
        assert_eq!(c.hand_out(0, 13), counted(2, 13, 2));
    }

    #[test]
    fn recovery_ends_after_twice_the_prefetch() {
        let mut c = assigned(Some(encode(0, 1)));
        // Prefetch 2: four counted records.
        for offset in 0..4 {
            assert!(c.serial());
            assert!(c.hand_out(0, offset).store.is_some());
        }
        assert!(!c.serial());
        assert_eq!(c.hand_out(0, 4), HandOut::PLAIN);
    }

    #[test]
    fn recovery_ends_when_caught_up() {
        let mut c = assigned(Some(encode(0, 1)));
        assert_eq!(c.hand_out(0, 0), counted(2, 0, 2));
        // End of the partition after record 1, not handed out yet.
        c.caught_up(0, Some(1));
        assert!(c.serial());
        assert_eq!(c.hand_out(0, 1), counted(1, 1, 1));
        assert!(!c.serial());
        assert_eq!(c.hand_out(0, 2), HandOut::PLAIN);
        // Caught up with everything handed out: at once.
        let mut c = assigned(Some(encode(0, 1)));
        assert_eq!(c.hand_out(0, 0), counted(2, 0, 2));
        c.caught_up(0, Some(0));
        assert!(!c.serial());
        // Caught up before anything was read (an empty partition): no
        // recovery, nothing of the old crash is left to replay.
        let mut c = DeliveryCounts::new(2, true);
        c.assign(0);
        c.caught_up(0, None);
        let epoch = c.unread()[0].1;
        c.read(0, epoch, Ok(Some(encode(5, 2))));
        assert!(!c.serial());
        assert_eq!(c.hand_out(0, 9), counted(1, 9, 1));
    }

    #[test]
    fn a_failed_read_recovers_with_fresh_counts() {
        let mut c = DeliveryCounts::new(2, true);
        c.assign(0);
        assert!(!c.is_read(0));
        c.read(0, c.unread()[0].1, Err(()));
        assert!(c.is_read(0));
        assert!(c.serial());
        assert_eq!(c.hand_out(0, 4), counted(1, 4, 1));
    }

    #[test]
    fn a_read_of_an_earlier_assignment_is_ignored() {
        let mut c = DeliveryCounts::new(2, true);
        c.assign(0);
        let old = c.unread()[0].1;
        c.assign(0);
        c.read(0, old, Ok(Some(encode(3, 2))));
        assert!(!c.is_read(0));
        let new = c.unread()[0].1;
        c.read(0, new, Ok(None));
        assert!(!c.serial());
        // Unowned partitions are handed out uncounted.
        assert!(c.is_read(7));
        assert_eq!(c.hand_out(7, 1), HandOut::PLAIN);
    }

    #[test]
    fn serial_while_any_partition_recovers() {
        let mut c = assigned(Some(encode(0, 1)));
        c.assign(1);
        c.read(1, c.unread()[0].1, Ok(Some(encode(4, 1))));
        c.assign(2);
        c.read(2, c.unread()[0].1, Ok(None));
        assert!(c.serial());
        c.caught_up(0, None);
        assert!(c.serial(), "1 still recovers");
        // A partition assigned again starts unread, not recovering.
        c.assign(1);
        assert!(!c.serial());
        c.read(1, c.unread()[0].1, Ok(Some(encode(4, 2))));
        assert!(c.serial());
        assert_eq!(c.release(1, false), None);
        assert!(!c.serial());
    }

    #[test]
    fn only_a_settled_partition_that_stored_a_head_is_marked_clean() {
        let mut c = assigned(Some(encode(2, 1)));
        c.assign(1);
        c.read(1, c.unread()[0].1, Ok(Some(encode(8, 3))));
        c.assign(2);
        c.read(2, c.unread()[0].1, Ok(None));
        assert_eq!(c.owned(), vec![0, 1, 2]);
        c.hand_out(0, 2);
        c.hand_out(2, 0);
        // 0 finished what it was handed: clean.
        assert_eq!(c.release(0, true), Some(encode(2, 0)));
        // 1 handed nothing out: the old count stays for the next owner.
        assert_eq!(c.release(1, true), None);
        // 2 has a delivery in flight: its count stays.
        assert_eq!(c.release(2, false), None);
        assert!(c.owned().is_empty());
        assert_eq!(c.release(0, true), None);
    }
}
