//! Per-partition offset bookkeeping of one subscription: which delivered
//! offsets are finished, and how far the group may safely commit.
//!
//! Kafka commits a position per partition, not per message. With several
//! messages in flight (concurrency > 1, retries), acks arrive out of order,
//! so the committable position is the *lowest unfinished* offset: every
//! offset below it is finished. Committing further would lose the
//! unfinished message on a crash; committing less only re-delivers finished
//! ones (at-least-once).
//!
//! Pure logic, no broker: the consumer driver feeds it and acts on what it
//! returns.

use std::collections::{BTreeMap, VecDeque};

/// Identifies one hand-out of an offset. A redelivery of the same offset
/// gets a new token, so a late ack of a superseded hand-out is ignored.
pub(crate) type Token = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Received, not yet acked (buffered or held by the application).
    Pending(Token),
    /// Acked, but an earlier offset is still pending.
    Done,
}

#[derive(Debug, Default)]
struct Partition {
    /// Offsets received and not yet below `position`, ascending. A ring,
    /// not a map: offsets arrive in order, so receiving appends and
    /// finishing pops the front (this runs per record under the lock).
    slots: VecDeque<(i64, Slot)>,
    /// `Pending` entries of `slots`.
    pending: usize,
    /// Next offset to consume after everything finished: what to commit.
    position: Option<i64>,
    /// The position last sent to the broker (optimistically).
    committed: Option<i64>,
    /// The highest position the broker confirmed (or a synchronous commit
    /// is about to): what a revoke or close need not commit again.
    confirmed: Option<i64>,
}

impl Partition {
    /// Moves `position` over the finished prefix of `slots`.
    fn advance(&mut self) {
        while let Some(&(offset, Slot::Done)) = self.slots.front() {
            self.slots.pop_front();
            self.position = Some(self.position.map_or(offset + 1, |p| p.max(offset + 1)));
        }
    }

    /// The slot of `offset`, if received.
    fn slot_mut(&mut self, offset: i64) -> Option<&mut Slot> {
        let first = self.slots.front()?.0;
        // Offsets are usually consecutive: then the distance is the index.
        let guess = usize::try_from(offset - first).ok()?;
        let at = match self.slots.get(guess) {
            Some(&(o, _)) if o == offset => guess,
            _ => self.slots.binary_search_by_key(&offset, |&(o, _)| o).ok()?,
        };
        self.slots.get_mut(at).map(|(_, slot)| slot)
    }

    /// Makes `offset` pending with `token`; true if it was not pending.
    fn receive(&mut self, offset: i64, token: Token) -> bool {
        let pending = Slot::Pending(token);
        let at = match self.slots.back() {
            Some(&(last, _)) if last >= offset => {
                match self.slots.binary_search_by_key(&offset, |&(o, _)| o) {
                    // Received again (after a rewind).
                    Ok(at) => {
                        let was = std::mem::replace(&mut self.slots[at].1, pending);
                        let new = was == Slot::Done;
                        self.pending += usize::from(new);
                        return new;
                    }
                    Err(at) => at,
                }
            }
            _ => self.slots.len(),
        };
        self.slots.insert(at, (offset, pending));
        self.pending += 1;
        true
    }

    fn uncommitted(&self) -> Option<i64> {
        match (self.position, self.committed) {
            (Some(p), Some(c)) if p <= c => None,
            (p, _) => p,
        }
    }

    /// The position, if the broker has not confirmed it: an asynchronous
    /// commit may still be on its way, or lost when the client closes.
    fn unconfirmed(&self) -> Option<i64> {
        match (self.position, self.confirmed) {
            (Some(p), Some(c)) if p <= c => None,
            (p, _) => p,
        }
    }
}

/// Offsets of the partitions a subscription owns.
#[derive(Debug, Default)]
pub(crate) struct OffsetTracker {
    partitions: BTreeMap<i32, Partition>,
    next_token: Token,
    /// Pending slots over all partitions: the prefetch bound counts these.
    pending: usize,
    closed: bool,
}

impl OffsetTracker {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// The partition was assigned: start from a clean slate (the group
    /// resumes it from its committed offset).
    pub(crate) fn assign(&mut self, partition: i32) {
        if let Some(old) = self.partitions.insert(partition, Partition::default()) {
            self.pending -= old.pending;
        }
    }

    /// The partition was revoked: returns the position to commit for it (if
    /// it moved since the last commit) and forgets it. Later acks of its
    /// offsets are ignored; the new owner re-reads them from that position.
    pub(crate) fn revoke(&mut self, partition: i32) -> Option<i64> {
        let old = self.partitions.remove(&partition)?;
        self.pending -= old.pending;
        if self.closed {
            return None;
        }
        old.unconfirmed()
    }

    /// An offset was received (or received again after a rewind); it stays
    /// pending until acked.
    pub(crate) fn received(&mut self, partition: i32, offset: i64) -> Token {
        let token = self.new_token();
        let p = self.partitions.entry(partition).or_default();
        if p.receive(offset, token) {
            self.pending += 1;
        }
        token
    }

    /// As [`Self::received`], but `None` (and nothing changes) when the
    /// offset is known already in this assignment: pending (buffered, or
    /// handed out and unsettled) or finished. librdkafka can return a
    /// record again after a pause and resume; a second copy must not be
    /// handed out beside the first, replace its hand-out, or (finished)
    /// hold back the committed position until it is handled once more.
    pub(crate) fn received_new(&mut self, partition: i32, offset: i64) -> Option<Token> {
        let known = self.partitions.get_mut(&partition).is_some_and(|p| {
            p.position.is_some_and(|next| offset < next) || p.slot_mut(offset).is_some()
        });
        (!known).then(|| self.received(partition, offset))
    }

    /// The hand-out `token` of `offset` is finished. False when it no
    /// longer counts (partition revoked, offset redelivered, tracker closed).
    pub(crate) fn ack(&mut self, partition: i32, offset: i64, token: Token) -> bool {
        if self.closed {
            return false;
        }
        let Some(p) = self.partitions.get_mut(&partition) else {
            return false;
        };
        match p.slot_mut(offset) {
            Some(slot) if *slot == Slot::Pending(token) => {
                *slot = Slot::Done;
                p.pending -= 1;
                self.pending -= 1;
                p.advance();
                true
            }
            _ => false,
        }
    }

    /// The hand-out `token` of `offset` is to be delivered again: returns
    /// the token of the new hand-out, or `None` when it no longer counts.
    /// The offset stays pending, so nothing at or after it gets committed.
    pub(crate) fn requeue(&mut self, partition: i32, offset: i64, token: Token) -> Option<Token> {
        if self.closed {
            return None;
        }
        let new = self.next_token;
        let slot = self.partitions.get_mut(&partition)?.slot_mut(offset)?;
        if *slot != Slot::Pending(token) {
            return None;
        }
        *slot = Slot::Pending(new);
        self.next_token += 1;
        Some(new)
    }

    /// Offsets received and not yet acked.
    pub(crate) fn pending(&self) -> usize {
        self.pending
    }

    /// The tokens of the pending hand-outs, over all partitions.
    pub(crate) fn pending_tokens(&self) -> impl Iterator<Item = Token> + '_ {
        self.partitions.values().flat_map(|p| {
            p.slots.iter().filter_map(|&(_, slot)| match slot {
                Slot::Pending(token) => Some(token),
                Slot::Done => None,
            })
        })
    }

    /// Offsets of `partition` received and not yet acked.
    pub(crate) fn pending_in(&self, partition: i32) -> usize {
        self.partitions.get(&partition).map_or(0, |p| p.pending)
    }

    /// The highest offset of `partition` received since it was assigned.
    pub(crate) fn last_received(&self, partition: i32) -> Option<i64> {
        let p = self.partitions.get(&partition)?;
        p.slots
            .back()
            .map(|&(offset, _)| offset)
            .or(p.position.map(|next| next - 1))
    }

    /// True if `partition` is currently owned.
    #[cfg(test)]
    pub(crate) fn owns(&self, partition: i32) -> bool {
        self.partitions.contains_key(&partition)
    }

    /// Positions that moved since the last call, marked as committed.
    pub(crate) fn take_commits(&mut self) -> Vec<(i32, i64)> {
        self.take(false)
    }

    /// Positions to commit, marked as committed: those that moved since
    /// the last commit, or (`sync`) all the broker has not confirmed, then
    /// marked confirmed too.
    fn take(&mut self, sync: bool) -> Vec<(i32, i64)> {
        if self.closed {
            return Vec::new();
        }
        self.partitions
            .iter_mut()
            .filter_map(|(&partition, p)| {
                let position = match sync {
                    true => p.unconfirmed()?,
                    false => p.uncommitted()?,
                };
                p.committed = Some(position);
                if sync {
                    p.confirmed = Some(position);
                }
                Some((partition, position))
            })
            .collect()
    }

    /// A commit of `offset` failed: commit it again next time.
    pub(crate) fn commit_failed(&mut self, partition: i32, offset: i64) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            if p.committed == Some(offset) {
                p.committed = None;
            }
            if p.confirmed == Some(offset) {
                p.confirmed = None;
            }
        }
    }

    /// The broker confirmed a commit of `offset`.
    pub(crate) fn commit_confirmed(&mut self, partition: i32, offset: i64) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            p.confirmed = Some(p.confirmed.map_or(offset, |c| c.max(offset)));
        }
    }

    /// True when some position is not confirmed by the broker.
    pub(crate) fn has_unconfirmed(&self) -> bool {
        !self.closed && self.partitions.values().any(|p| p.unconfirmed().is_some())
    }

    /// Positions the broker has not confirmed, for a synchronous commit:
    /// marked as committed and confirmed (see [`Self::commit_failed`]).
    pub(crate) fn take_unconfirmed(&mut self) -> Vec<(i32, i64)> {
        self.take(true)
    }

    /// The final positions to commit (synchronously: all the broker has not
    /// confirmed); afterwards every ack is ignored.
    pub(crate) fn close(&mut self) -> Vec<(i32, i64)> {
        let commits = self.take_unconfirmed();
        self.closed = true;
        commits
    }

    fn new_token(&mut self) -> Token {
        self.next_token += 1;
        self.next_token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receive(
        t: &mut OffsetTracker,
        partition: i32,
        offsets: impl IntoIterator<Item = i64>,
    ) -> Vec<Token> {
        offsets
            .into_iter()
            .map(|o| t.received(partition, o))
            .collect()
    }

    #[test]
    fn commits_only_up_to_lowest_unfinished() {
        let mut t = OffsetTracker::new();
        t.assign(0);
        let tok = receive(&mut t, 0, 10..15);
        // 11, 12 and 14 finish first: 10 is unfinished, nothing is committable.
        assert!(t.ack(0, 11, tok[1]));
        assert!(t.ack(0, 12, tok[2]));
        assert!(t.ack(0, 14, tok[4]));
        assert_eq!(t.take_commits(), vec![]);
        assert_eq!(t.pending(), 2);
        // 10 finishes: 10..=12 are done, 13 is not: commit 13.
        assert!(t.ack(0, 10, tok[0]));
        assert_eq!(t.take_commits(), vec![(0, 13)]);
        // Nothing moved: nothing to commit again.
        assert_eq!(t.take_commits(), vec![]);
        assert!(t.ack(0, 13, tok[3]));
        assert_eq!(t.take_commits(), vec![(0, 15)]);
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = OffsetTracker::new();
        t.assign(0);
        t.assign(1);
        let a = receive(&mut t, 0, [0, 1]);
        let b = receive(&mut t, 1, [100, 101]);
        assert!(t.ack(1, 101, b[1]));
        assert!(t.ack(0, 0, a[0]));
        assert_eq!(t.take_commits(), vec![(0, 1)]);
        assert!(t.ack(1, 100, b[0]));
        assert_eq!(t.take_commits(), vec![(1, 102)]);
    }

    #[test]
    fn gaps_in_offsets_are_fine() {
        // Compaction and transaction markers leave holes between offsets.
        let mut t = OffsetTracker::new();
        let tok = receive(&mut t, 2, [5, 9, 20]);
        assert!(t.ack(2, 9, tok[1]));
        assert!(t.ack(2, 5, tok[0]));
        assert_eq!(t.take_commits(), vec![(2, 10)]);
        assert!(t.ack(2, 20, tok[2]));
        assert_eq!(t.take_commits(), vec![(2, 21)]);
    }

    #[test]
    fn rewound_offsets_keep_their_order() {
        // A rewind (seek, re-fetch) receives offsets again or out of order.
        let mut t = OffsetTracker::new();
        let tok = receive(&mut t, 0, [3, 6, 4]);
        assert_eq!(t.pending_in(0), 3);
        assert_eq!(t.last_received(0), Some(6));
        assert!(t.ack(0, 3, tok[0]));
        assert!(t.ack(0, 4, tok[2]));
        assert_eq!(t.take_commits(), vec![(0, 5)]);
        // 6 again while pending: still one pending slot, the new token counts.
        let again = t.received(0, 6);
        assert_eq!((t.pending(), t.pending_in(0)), (1, 1));
        assert!(!t.ack(0, 6, tok[1]));
        // 5 again below it, finished out of order.
        let five = t.received(0, 5);
        assert!(t.ack(0, 6, again));
        assert_eq!(t.take_commits(), vec![]);
        assert!(t.ack(0, 5, five));
        assert_eq!(t.take_commits(), vec![(0, 7)]);
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn requeue_keeps_the_offset_unfinished() {
        let mut t = OffsetTracker::new();
        let tok = receive(&mut t, 0, [0, 1, 2]);
        let again = t.requeue(0, 1, tok[1]).expect("current hand-out");
        assert_ne!(again, tok[1]);
        assert!(t.ack(0, 0, tok[0]));
        assert!(t.ack(0, 2, tok[2]));
        // 1 is pending again: only 0 is committable.
        assert_eq!(t.take_commits(), vec![(0, 1)]);
        assert_eq!(t.pending(), 1);
        // The old hand-out can no longer ack or requeue it.
        assert!(!t.ack(0, 1, tok[1]));
        assert_eq!(t.requeue(0, 1, tok[1]), None);
        assert!(t.ack(0, 1, again));
        assert_eq!(t.take_commits(), vec![(0, 3)]);
    }

    #[test]
    fn revoke_returns_finished_position_and_ignores_later_acks() {
        let mut t = OffsetTracker::new();
        t.assign(0);
        t.assign(1);
        let a = receive(&mut t, 0, [0, 1, 2]);
        let b = receive(&mut t, 1, [0]);
        assert!(t.ack(0, 0, a[0]));
        assert!(t.ack(0, 2, a[2]));
        assert_eq!(t.pending(), 2);
        // Partition 0 revoked with 1 unfinished: commit 1, not 3.
        assert_eq!(t.revoke(0), Some(1));
        assert!(!t.owns(0));
        assert_eq!(t.pending(), 1);
        assert!(
            !t.ack(0, 1, a[1]),
            "ack of a revoked partition must not count"
        );
        assert_eq!(t.take_commits(), vec![]);
        // Revoking with nothing finished commits nothing.
        assert_eq!(t.revoke(1), None);
        assert_eq!(t.pending(), 0);
        drop(b);
    }

    #[test]
    fn revoke_after_commit_has_nothing_new() {
        let mut t = OffsetTracker::new();
        let a = receive(&mut t, 0, [0]);
        assert!(t.ack(0, 0, a[0]));
        assert_eq!(t.take_commits(), vec![(0, 1)]);
        // Once the broker confirmed it (an unconfirmed one is sent again:
        // see `revoke_and_close_commit_what_the_broker_did_not_confirm`).
        t.commit_confirmed(0, 1);
        assert_eq!(t.revoke(0), None);
    }

    #[test]
    fn reassign_starts_fresh() {
        let mut t = OffsetTracker::new();
        let a = receive(&mut t, 0, [7]);
        t.assign(0);
        assert_eq!(t.pending(), 0);
        assert!(!t.ack(0, 7, a[0]), "hand-out from before the reassignment");
        // The group re-reads 7 from its committed offset.
        let b = receive(&mut t, 0, [7]);
        assert!(t.ack(0, 7, b[0]));
        assert_eq!(t.take_commits(), vec![(0, 8)]);
    }

    #[test]
    fn pending_and_last_received_per_partition() {
        let mut t = OffsetTracker::new();
        t.assign(0);
        assert_eq!(t.last_received(0), None);
        assert_eq!(t.last_received(1), None, "not owned");
        let a = receive(&mut t, 0, [4, 5, 6]);
        let b = receive(&mut t, 1, [9]);
        assert_eq!((t.pending_in(0), t.pending_in(1)), (3, 1));
        assert_eq!(t.last_received(0), Some(6));
        assert!(t.ack(0, 6, a[2]));
        assert_eq!(t.pending_in(0), 2);
        assert_eq!(
            t.last_received(0),
            Some(6),
            "acked, still below an unfinished one"
        );
        assert!(t.ack(0, 4, a[0]));
        assert!(t.ack(0, 5, a[1]));
        assert_eq!(t.pending_in(0), 0);
        assert_eq!(
            t.last_received(0),
            Some(6),
            "from the position once all finished"
        );
        assert!(t.ack(1, 9, b[0]));
        assert_eq!(t.last_received(1), Some(9));
        t.assign(0);
        assert_eq!(t.last_received(0), None, "a new assignment starts over");
    }

    #[test]
    fn failed_commit_is_retried() {
        let mut t = OffsetTracker::new();
        let a = receive(&mut t, 0, [0]);
        assert!(t.ack(0, 0, a[0]));
        assert_eq!(t.take_commits(), vec![(0, 1)]);
        t.commit_failed(0, 1);
        assert_eq!(t.take_commits(), vec![(0, 1)]);
        // A failure report for an older commit does not reset a newer one.
        let b = receive(&mut t, 0, [1]);
        assert!(t.ack(0, 1, b[0]));
        assert_eq!(t.take_commits(), vec![(0, 2)]);
        t.commit_failed(0, 1);
        assert_eq!(t.take_commits(), vec![]);
    }

    #[test]
    fn close_gives_final_positions_then_ignores_acks() {
        let mut t = OffsetTracker::new();
        let a = receive(&mut t, 0, [0, 1]);
        assert!(t.ack(0, 0, a[0]));
        assert_eq!(t.close(), vec![(0, 1)]);
        assert!(!t.ack(0, 1, a[1]));
        assert_eq!(t.requeue(0, 1, a[1]), None);
        assert_eq!(t.take_commits(), vec![]);
        assert_eq!(t.revoke(0), None);
    }

    #[test]
    fn position_never_moves_backwards() {
        let mut t = OffsetTracker::new();
        let a = receive(&mut t, 0, [10]);
        assert!(t.ack(0, 10, a[0]));
        assert_eq!(t.take_commits(), vec![(0, 11)]);
        // An older offset seen again (e.g. re-fetched): finishing it must
        // not move the committed position back.
        let b = receive(&mut t, 0, [3]);
        assert!(t.ack(0, 3, b[0]));
        assert_eq!(t.take_commits(), vec![]);
    }

    #[test]
    fn concurrent_out_of_order_acks_never_pass_an_unfinished_offset() {
        // Pseudo-random ack orders over 3 partitions: after every ack, every
        // committed position is at most the lowest unfinished offset.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for _round in 0..50 {
            let mut t = OffsetTracker::new();
            let mut open: Vec<(i32, i64, Token)> = Vec::new();
            for p in 0..3 {
                for o in 0..40 {
                    open.push((p, o, t.received(p, o)));
                }
            }
            let mut committed = [0i64; 3];
            while !open.is_empty() {
                let (p, o, tok) = open.swap_remove(rand(open.len()));
                assert!(t.ack(p, o, tok));
                for (cp, pos) in t.take_commits() {
                    committed[cp as usize] = pos;
                }
                for p in 0..3 {
                    let lowest_open = open
                        .iter()
                        .filter(|e| e.0 == p)
                        .map(|e| e.1)
                        .min()
                        .unwrap_or(40);
                    // Never past it, and exactly at it: no finished work held back.
                    assert_eq!(committed[p as usize], lowest_open);
                }
            }
            assert_eq!(committed, [40, 40, 40]);
        }
    }

    #[test]
    fn revoke_and_close_commit_what_the_broker_did_not_confirm() {
        let mut t = OffsetTracker::new();
        let tok = receive(&mut t, 0, [0, 1, 2]);
        assert!(t.ack(0, 0, tok[0]));
        // Sent asynchronously, not confirmed: a sync commit sends it again.
        assert_eq!(t.take_commits(), vec![(0, 1)]);
        assert_eq!(t.take_commits(), vec![]);
        assert_eq!(t.take_unconfirmed(), vec![(0, 1)]);
        assert_eq!(t.take_unconfirmed(), vec![]);
        // Confirmed by the broker: nothing again.
        assert!(t.ack(0, 1, tok[1]));
        assert_eq!(t.take_commits(), vec![(0, 2)]);
        t.commit_confirmed(0, 2);
        assert_eq!(t.close(), vec![]);
        let mut t = OffsetTracker::new();
        let tok = receive(&mut t, 3, [5]);
        assert!(t.ack(3, 5, tok[0]));
        assert_eq!(t.take_commits(), vec![(3, 6)]);
        assert_eq!(t.revoke(3), Some(6), "not confirmed yet");
    }

    #[test]
    fn an_offset_received_again_is_refused() {
        let mut t = OffsetTracker::new();
        let tok = receive(&mut t, 0, [0, 1]);
        assert_eq!(t.received_new(0, 1), None, "pending: the first copy stays");
        assert_eq!(t.pending(), 2);
        assert!(t.ack(0, 1, tok[1]), "its hand-out still counts");
        assert_eq!(t.received_new(0, 1), None, "finished, 0 is not");
        assert!(t.ack(0, 0, tok[0]));
        assert_eq!(t.received_new(0, 0), None, "below the position");
        assert_eq!(t.take_commits(), vec![(0, 2)]);
        assert_eq!(t.pending(), 0);
        assert_eq!(t.received_new(0, 2).map(|_| t.pending()), Some(1));
        // A new assignment starts over.
        t.assign(0);
        assert!(t.received_new(0, 0).is_some());
    }
}
