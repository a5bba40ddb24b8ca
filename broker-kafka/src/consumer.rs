//! One subscription = one group member (`StreamConsumer`).
//!
//! A background *driver* task polls the consumer all the time, so group
//! joins, rebalances and commit reports are served even while the
//! application is busy. It buffers received records (counted as unfinished
//! in the [`OffsetTracker`]) and pauses the assigned partitions while the
//! buffered plus handed-out deliveries reach the prefetch bound. Pausing
//! bumps librdkafka's fetch version, so records fetched but not yet returned
//! are dropped and re-fetched after resume: nothing is skipped.
//!
//! Commits: the lowest unfinished offset of each owned partition, async,
//! as soon as an ack moves it (at most one commit per 5 ms) and
//! periodically; also before each store of delivery counts; on revoke and
//! on close (sync) what finished and the broker has not confirmed. Acks of
//! revoked partitions are ignored: the new owner re-reads from the
//! committed position (at-least-once).
//!
//! Delivery counts ([`crate::deliveries`]): the stream reads a partition's
//! stored state before handing out its first record, stores a window or a
//! head before handing out a record it does not cover, and hands out one
//! record at a time while a partition recovers from an unclean finish
//! (committing what finished synchronously before each suspect record, and
//! handing out the other partitions' records first; the driver then pauses
//! the held partitions and leaves their records out of the prefetch bound).
//! `attempt` of each delivery comes from there.
//!
//! `nack(requeue)`: Kafka has no per-message nack. The record's offset stays
//! unfinished (nothing at or after it is committed) and the stream hands the
//! same record out again, in offset order among the buffered records of its
//! partition.
//!
//! This file holds the driver and the state it shares; the application's
//! side (the stream of deliveries and each delivery's acker) is in `stream`.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::{ClientContext, Message as _, Offset, TopicPartitionList};
use tokio::sync::{oneshot, watch, Notify};
use tokio::task::JoinHandle;

use broker_core::combining::{Apply, Combining, Guard};
use broker_core::config::KafkaSettings;
use broker_core::{
    Acker, BrokerError, Delivery, DeliveryStream, Message, Received, Result, Subscription,
};

use crate::client_config::{client_config, config_error, Role};
use crate::codec::decode;
use crate::context::{error_limited, log_limited, LogLimiter};
use crate::delay::{Follower, Retry};
use crate::deliveries::{CountStore, DeliveryCounts, STORE_TIMEOUT};
use crate::tracker::{OffsetTracker, Token};
use rdkafka::config::RDKafkaLogLevel;

mod stream;
pub(crate) use stream::KafkaStream;

type GroupConsumer = StreamConsumer<GroupContext>;

/// How long the driver stops polling at the prefetch bound before it
/// pauses the partitions (pausing drops what librdkafka prefetched).
const PAUSE_AFTER: Duration = Duration::from_millis(500);

/// Shortest time between two prompt commits (after acks): at most 200
/// commit requests a second per subscription however fast acks come, and
/// a crash replays at most what finished in the last few milliseconds.
const PROMPT_COMMIT_GAP: Duration = Duration::from_millis(5);

/// Records handed to the stream under one lock.
const CHUNK: usize = 32;

/// Tuning of subscriptions, from the broker's builder.
#[derive(Debug, Clone)]
pub(crate) struct ConsumerOptions {
    /// How long `subscribe` waits for the first partition assignment.
    pub join_timeout: Duration,
    /// How often finished offsets are committed.
    pub commit_interval: Duration,
    /// Bound on the final commit and leaving the group at close.
    pub close_timeout: Duration,
}

/// State shared by the stream, its driver, its ackers and the rebalance
/// callbacks (which run inside the driver's poll).
struct Shared {
    topic: Arc<str>,
    /// Acks never wait for the lock: see [`Combining`].
    state: Combining<State, Acked>,
    /// Driver → stream: a delivery is buffered (or the driver stopped);
    /// while a partition recovers, also acks and rebalances.
    ready: Arc<Notify>,
    /// Ackers and rebalances → driver: unfinished deliveries went down.
    room: Arc<Notify>,
    /// Ackers → driver: something finished, commit it (at most once per
    /// [`PROMPT_COMMIT_GAP`]).
    commit: Arc<Notify>,
    /// True once the first assignment (possibly empty) arrived.
    assigned: watch::Sender<bool>,
    /// Assignments so far: the driver re-pauses after one.
    assignments: AtomicU64,
    /// Set when the stream closes or goes: acks and nacks then fail with
    /// `Closed`, as on every backend (the records are read again by the group).
    closed: AtomicBool,
    /// Where delayed retries of this subscription go, when it has a delay topic.
    retry: Option<Retry>,
    /// The delay reader, which follows this member's assignment.
    follower: Option<Arc<Follower>>,
}

struct State {
    tracker: OffsetTracker,
    /// Delivery counts of the owned partitions.
    counts: DeliveryCounts,
    /// The driver's [`Shared::room`].
    room: Arc<Notify>,
    /// The stream's [`Shared::ready`].
    ready: Arc<Notify>,
    /// The driver's [`Shared::commit`].
    commit: Arc<Notify>,
    /// Acks wake the driver stopped at the prefetch bound only once the
    /// unfinished deliveries fall to this many (half the bound): it then
    /// refills in one burst instead of trading one wake-up per ack.
    resume_at: usize,
    buffer: VecDeque<Buffered>,
    /// Until when a recovering partition's records wait for the others
    /// (set at the first wait of a recovery).
    hold_until: Option<tokio::time::Instant>,
    /// The stream holds records back now (see [`State::held`]).
    holding: bool,
    failure: Option<BrokerError>,
    finished: bool,
}

/// A decoded record, where it came from.
struct Record {
    message: Message,
    partition: i32,
    offset: i64,
    attempt: u32,
}

/// A record waiting in the buffer, decoded by the driver when it was
/// polled: owned data only, so nothing borrows the client.
struct Buffered {
    message: Message,
    partition: i32,
    offset: i64,
    /// Handed out before, and given back with `nack(requeue)`.
    redelivered: bool,
    token: Token,
    /// Decided just before the first hand-out (see [`State::next_step`]).
    attempt: Option<u32>,
    /// Delivery count to store before the hand-out.
    store: Option<i64>,
}

/// The consumer's client, shared by the driver and the stream.
type ClientHandle = Arc<GroupConsumer>;

/// A record polled and decoded, not yet in the buffer.
struct Polled {
    message: Message,
    partition: i32,
    offset: i64,
}

impl Buffered {
    fn polled(record: Polled, token: Token) -> Self {
        Buffered {
            message: record.message,
            partition: record.partition,
            offset: record.offset,
            redelivered: false,
            token,
            attempt: None,
            store: None,
        }
    }

    fn into_record(self) -> (Record, bool, Token) {
        let record = Record {
            message: self.message,
            partition: self.partition,
            offset: self.offset,
            attempt: self.attempt.unwrap_or(1),
        };
        (record, self.redelivered, self.token)
    }
}

/// A finished delivery: partition, offset, hand-out token.
type Acked = (i32, i64, Token);

impl Apply<Acked> for State {
    fn apply(&mut self, acks: std::vec::Drain<'_, Acked>) {
        let mut finished = false;
        for (partition, offset, token) in acks {
            if self.tracker.ack(partition, offset, token) {
                finished = true;
            } else {
                tracing::debug!(
                    partition,
                    offset,
                    "ack ignored: partition revoked or subscription closed; the message will be redelivered"
                );
            }
        }
        if self.tracker.pending() <= self.resume_at {
            self.room.notify_one();
        }
        // Committed promptly: a crash re-delivers little that finished.
        if finished {
            self.commit.notify_one();
        }
        // One at a time: the next hand-out waits for this.
        if self.counts.serial() {
            self.ready.notify_one();
        }
    }
}

/// What the stream does next.
enum Step {
    Deliver(Buffered),
    Failed(BrokerError),
    Finished,
    Wait,
    /// Commit these positions (asynchronously) first.
    Commit(Vec<(i32, i64)>),
    /// Commit synchronously what the broker has not confirmed first (taken
    /// by the stream when it does so), before a suspect record: what
    /// finished stays finished if the suspect kills the process.
    SyncCommit,
    /// A recovering partition's record waits for the other partitions
    /// until then (or a wake-up).
    Hold(tokio::time::Instant),
    /// Read the stored delivery counts of these partitions (and epochs).
    Read(Vec<(i32, u64)>),
    /// Store the delivery count of the record with hand-out `token` first.
    Store {
        partition: i32,
        token: Token,
        value: i64,
    },
}

impl State {
    /// Deliveries handed out and not settled yet.
    /// Counted exactly, from the hand-out tokens (pending minus buffered
    /// is not: a buffered copy can outlive its slot): asked only while a
    /// partition recovers, before each hand-out.
    fn in_flight(&self) -> usize {
        let buffered: std::collections::HashSet<Token> =
            self.buffer.iter().map(|b| b.token).collect();
        self.tracker
            .pending_tokens()
            .filter(|token| !buffered.contains(token))
            .count()
    }

    /// True when no delivery of `partition` is handed out and unsettled.
    fn settled(&self, partition: i32) -> bool {
        let buffered = self
            .buffer
            .iter()
            .filter(|b| b.partition == partition)
            .count();
        self.tracker.pending_in(partition) <= buffered
    }

    /// Forgets the delivery counts of `partitions` (revoked, or all at
    /// close); returns the values marking them finished cleanly.
    fn release_counts(&mut self, partitions: impl IntoIterator<Item = i32>) -> Vec<(i32, i64)> {
        partitions
            .into_iter()
            .filter_map(|p| {
                let settled = self.settled(p);
                self.counts.release(p, settled).map(|value| (p, value))
            })
            .collect()
    }

    /// Partitions whose buffered records are held back for the other
    /// partitions (see [`crate::deliveries::HOLD`]): the driver does not
    /// count them against the prefetch bound, and pauses them.
    fn held(&self) -> Vec<i32> {
        if !self.holding {
            return Vec::new();
        }
        let mut held: Vec<i32> = self
            .buffer
            .iter()
            .map(|b| b.partition)
            .filter(|&p| self.counts.recovering(p))
            .collect();
        held.sort_unstable();
        held.dedup();
        held
    }

    /// While serial: the buffered record to hand out next (the first of
    /// its partition, the least suspect of those, the earliest of equals),
    /// and its suspicion. A record decided already goes first.
    fn choose(&self) -> (usize, u32) {
        let mut best = (0, u32::MAX);
        let mut seen: Vec<i32> = Vec::new();
        for (i, b) in self.buffer.iter().enumerate() {
            if seen.contains(&b.partition) {
                continue;
            }
            seen.push(b.partition);
            let suspicion = match b.attempt {
                Some(_) => return (i, 0),
                None => self.counts.suspicion(b.partition, b.offset),
            };
            if suspicion < best.1 {
                best = (i, suspicion);
            }
        }
        best
    }

    /// Hands out the next record, once its partition's count is read and
    /// its own stored; while a partition recovers, only when nothing is in
    /// flight, after committing what finished (`commit`: not done yet in
    /// this call of `next`), and records of other partitions first.
    fn next_step(&mut self, commit: bool) -> Step {
        // Settled: nothing in flight, and nothing decided but not handed
        // out yet (a decided record counts as handed out for its recovery).
        if self.counts.serial()
            && self.in_flight() == 0
            && self.buffer.iter().all(|b| b.attempt.is_none())
        {
            self.counts.settle();
        }
        if !self.counts.serial() {
            self.hold_until = None;
        }
        if self.buffer.is_empty() {
            return match (self.failure.take(), self.finished) {
                (Some(e), _) => Step::Failed(e),
                (None, true) => Step::Finished,
                (None, false) => Step::Wait,
            };
        }
        let mut at = 0;
        self.holding = false;
        if self.counts.serial() {
            if self.in_flight() > 0 {
                return Step::Wait;
            }
            let (chosen, suspicion) = self.choose();
            at = chosen;
            let suspect = suspicion > 0;
            let partition = self.buffer.get(at).map_or(-1, |b| b.partition);
            let buffer = &self.buffer;
            if suspect
                && self
                    .counts
                    .others_behind(partition, |q| buffer.iter().any(|b| b.partition == q))
            {
                let now = tokio::time::Instant::now();
                let until = *self.hold_until.get_or_insert(now + crate::deliveries::HOLD);
                if now < until {
                    self.holding = true;
                    return Step::Hold(until);
                }
            }
            // Before a suspect, everything the broker has not confirmed:
            // an asynchronous commit may be lost with the process.
            if commit && suspect && self.tracker.has_unconfirmed() {
                return Step::SyncCommit;
            }
            let commits = match commit && !suspect {
                true => self.tracker.take_commits(),
                false => Vec::new(),
            };
            if !commits.is_empty() {
                return Step::Commit(commits);
            }
        }
        let Some(chosen) = self.buffer.get(at) else {
            return Step::Wait;
        };
        let (partition, offset) = (chosen.partition, chosen.offset);
        if chosen.attempt.is_none() {
            if !self.counts.is_read(partition) {
                return Step::Read(self.counts.unread());
            }
            let ahead = self
                .buffer
                .iter()
                .filter(|b| b.partition == partition)
                .map(|b| b.offset)
                .max()
                .unwrap_or(offset);
            let decision = self.counts.hand_out(partition, offset, ahead);
            if let Some(chosen) = self.buffer.get_mut(at) {
                chosen.attempt = Some(decision.attempt);
                chosen.store = decision.store;
            }
        }
        if let Some(chosen) = self.buffer.get(at) {
            if let Some(value) = chosen.store {
                return Step::Store {
                    partition,
                    token: chosen.token,
                    value,
                };
            }
        }
        match self.buffer.remove(at) {
            Some(b) => Step::Deliver(b),
            None => Step::Wait,
        }
    }
}

impl Shared {
    fn lock(&self) -> Guard<'_, State, Acked> {
        self.state.lock()
    }

    fn partitions_of(&self, tpl: &TopicPartitionList) -> BTreeSet<i32> {
        tpl.elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect()
    }
}

/// Rebalance and commit callbacks, run by librdkafka inside `recv`.
struct GroupContext {
    shared: Arc<Shared>,
    counts: Arc<CountStore>,
    /// librdkafka's logs, rate-limited like the producer's.
    limiter: LogLimiter,
}

impl ClientContext for GroupContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_limited(&self.limiter, level, fac, log_message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        error_limited(&self.limiter, &error, reason);
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let partitions = self.shared.partitions_of(tpl);
                let (commits, clean) = {
                    let mut state = self.shared.lock();
                    let clean = state.release_counts(partitions.iter().copied());
                    // Buffered but not handed out: the new owner gets them.
                    state.buffer.retain(|b| !partitions.contains(&b.partition));
                    let commits: Vec<(i32, i64)> = partitions
                        .iter()
                        .filter_map(|&p| state.tracker.revoke(p).map(|o| (p, o)))
                        .collect();
                    (commits, clean)
                };
                tracing::info!(topic = %self.shared.topic, ?partitions, "partitions revoked");
                // A lost assignment belongs to someone else already: committing would fail.
                let lost = consumer.assignment_lost();
                let mut committed = true;
                if !commits.is_empty() && !lost {
                    let tpl = offsets_list(&self.shared.topic, &commits);
                    if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                        committed = false;
                        tracing::warn!(error = %e, "commit on revoke failed; finished messages may be redelivered");
                    }
                }
                // Finished cleanly: the next owner need not recover. If this
                // is lost, it only recovers for nothing. Not when the commit
                // failed: the next owner reads settled records again, and
                // must count them (a dead-lettered poison, say).
                if !clean.is_empty() && !lost && committed {
                    if let Err(e) = self.counts.store(&clean, CommitMode::Async) {
                        tracing::warn!(error = %e, "storing delivery counts on revoke failed");
                    }
                }
                if let Some(follower) = &self.shared.follower {
                    follower.revoke(&partitions, lost);
                }
                self.shared.room.notify_one();
                self.shared.ready.notify_one();
            }
            Rebalance::Assign(tpl) => {
                let partitions = self.shared.partitions_of(tpl);
                tracing::info!(topic = %self.shared.topic, ?partitions, "partitions assigned");
                {
                    let mut state = self.shared.lock();
                    for &p in &partitions {
                        state.tracker.assign(p);
                        state.counts.assign(p);
                    }
                }
                if let Some(follower) = &self.shared.follower {
                    follower.assign(&partitions);
                }
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // librdkafka keeps a partition's pause flag across revoke and
            // re-assign: clear it, the driver pauses again if it must.
            if tpl.count() > 0 {
                if let Err(e) = consumer.resume(tpl) {
                    tracing::warn!(error = %e, "resume of assigned partitions failed");
                }
            }
            self.shared.assignments.fetch_add(1, Ordering::AcqRel);
            self.shared.assigned.send_replace(true);
            self.shared.room.notify_one();
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if result.is_ok() {
            let mut state = self.shared.lock();
            for elem in offsets.elements_for_topic(&self.shared.topic) {
                if let Offset::Offset(o) = elem.offset() {
                    state.tracker.commit_confirmed(elem.partition(), o);
                }
            }
        }
        if let Err(e) = result {
            tracing::warn!(error = %e, "offset commit failed; will retry");
            let mut state = self.shared.lock();
            for elem in offsets.elements_for_topic(&self.shared.topic) {
                if let Offset::Offset(o) = elem.offset() {
                    state.tracker.commit_failed(elem.partition(), o);
                }
            }
        }
    }
}

fn offsets_list(topic: &str, offsets: &[(i32, i64)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for &(partition, offset) in offsets {
        // Only fails for an unrepresentable offset; ours are plain positions.
        let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(offset));
    }
    tpl
}

/// Joins `subscription.group` on its topic and starts the driver; waits (up
/// to the join timeout) for the first assignment so that the subscription
/// is live when this returns.
pub(crate) async fn open(
    settings: &KafkaSettings,
    subscription: Subscription,
    options: &ConsumerOptions,
    retry: Option<Retry>,
    follower: Option<Arc<Follower>>,
) -> Result<KafkaStream> {
    let (assigned, mut assigned_rx) = watch::channel(false);
    let prefetch = subscription.prefetch.max(1);
    let room = Arc::new(Notify::new());
    let ready = Arc::new(Notify::new());
    let commit = Arc::new(Notify::new());
    let shared = Arc::new(Shared {
        topic: subscription.topic.as_str().into(),
        state: Combining::new(State {
            tracker: OffsetTracker::new(),
            counts: DeliveryCounts::new(prefetch, subscription.isolate_redeliveries),
            room: room.clone(),
            ready: ready.clone(),
            commit: commit.clone(),
            resume_at: prefetch / 2,
            buffer: VecDeque::new(),
            hold_until: None,
            holding: false,
            failure: None,
            finished: false,
        }),
        ready,
        room,
        commit,
        assigned,
        closed: AtomicBool::new(false),
        assignments: AtomicU64::new(0),
        retry,
        follower,
    });
    let counts = Arc::new(CountStore::new(
        settings,
        &subscription.group,
        &subscription.topic,
        subscription.isolate_redeliveries,
    )?);
    let mut config = client_config(settings, Role::Consumer);
    config.set("group.id", &subscription.group);
    // Ends a partition's recovery once it is caught up (see `deliveries`).
    config.set("enable.partition.eof", "true");
    let consumer: GroupConsumer = config
        .create_with_context(GroupContext {
            shared: shared.clone(),
            counts: counts.clone(),
            limiter: LogLimiter::default(),
        })
        .map_err(config_error)?;
    consumer
        .subscribe(&[&subscription.topic])
        .map_err(|e| BrokerError::backend("kafka", e))?;
    let consumer = Arc::new(consumer);
    let (stop_tx, stop_rx) = oneshot::channel();
    let driver = tokio::spawn(drive(
        consumer.clone(),
        shared.clone(),
        counts.clone(),
        prefetch,
        options.clone(),
        stop_rx,
    ));
    let stream = KafkaStream {
        shared,
        consumer: Some(consumer),
        counts: Some(counts),
        stop: Some(stop_tx),
        driver: Some(driver),
        close_timeout: options.close_timeout,
    };
    if !options.join_timeout.is_zero() {
        let joined = tokio::time::timeout(options.join_timeout, assigned_rx.wait_for(|a| *a)).await;
        if joined.is_err() {
            tracing::warn!(
                topic = %subscription.topic,
                group = %subscription.group,
                timeout = ?options.join_timeout,
                "no partition assignment yet; the subscription starts receiving once the group settles"
            );
        }
    }
    Ok(stream)
}

/// Polls the consumer until stopped: buffers records, pauses at the
/// prefetch bound, commits periodically; at the end commits what finished
/// and leaves the group.
async fn drive(
    consumer: ClientHandle,
    shared: Arc<Shared>,
    counts: Arc<CountStore>,
    prefetch: usize,
    options: ConsumerOptions,
    mut stop: oneshot::Receiver<()>,
) -> Result<()> {
    let mut tick = tokio::time::interval(options.commit_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut paused = false;
    // Recovering partitions paused while their records are held back.
    let mut held_paused: Vec<i32> = Vec::new();
    let mut last_commit = tokio::time::Instant::now();
    // An ack finished something since the last commit.
    let mut commit_due = false;
    let mut full_since: Option<tokio::time::Instant> = None;
    let mut seen_assignments = 0u64;
    let mut last_error: Option<String> = None;
    let mut records = consumer.stream();
    let outcome = 'drive: loop {
        let (pending, held) = {
            let state = shared.lock();
            let held = state.held();
            let held_records = match held.is_empty() {
                true => 0,
                false => state
                    .buffer
                    .iter()
                    .filter(|b| held.binary_search(&b.partition).is_ok())
                    .count(),
            };
            (state.tracker.pending().saturating_sub(held_records), held)
        };
        let full = pending >= prefetch;
        match (full, full_since) {
            (true, None) => full_since = Some(tokio::time::Instant::now()),
            (false, Some(_)) => {
                full_since = None;
                if paused {
                    set_paused(&consumer, false);
                    paused = false;
                    held_paused.clear();
                }
            }
            _ => {}
        }
        // A new assignment starts unpaused (see `post_rebalance`).
        let assignments = shared.assignments.load(Ordering::Acquire);
        if assignments != seen_assignments {
            seen_assignments = assignments;
            held_paused.clear();
            if paused {
                set_paused(&consumer, true);
            }
        }
        // Held records of a recovering partition stay out of the bound, so
        // that the other partitions' records come in; its partition is
        // paused meanwhile, so that no more of it come.
        if !paused && held != held_paused {
            pause_partitions(&consumer, &shared.topic, &held, &held_paused);
            held_paused = held;
        }
        let commit_at = commit_due.then(|| last_commit + PROMPT_COMMIT_GAP);
        // At the bound, stop taking records. Briefly just stop polling (the
        // application usually frees room within milliseconds, and librdkafka
        // keeps what it fetched); after PAUSE_AFTER pause the partitions and
        // poll again, so that rebalances and group joins are still served.
        let pause_at = full_since.map(|t| t + PAUSE_AFTER);
        tokio::select! {
            biased;
            // Resolves on `send` (close) and on drop of the stream alike.
            _ = &mut stop => break Ok(()),
            _ = tick.tick() => {
                last_commit = tokio::time::Instant::now();
                commit_finished(&consumer, &shared);
            }
            _ = shared.commit.notified(), if !commit_due => commit_due = true,
            _ = sleep_until_opt(commit_at) => {
                commit_due = false;
                last_commit = tokio::time::Instant::now();
                commit_finished(&consumer, &shared);
            }
            _ = shared.room.notified(), if full => {}
            _ = sleep_until_opt(pause_at), if full && !paused => {
                set_paused(&consumer, true);
                paused = true;
            }
            record = records.next(), if !full || paused => {
                // Take what librdkafka already holds, up to the bound (one
                // record when paused: it comes from a partition assigned
                // since), decoding each at once (owned copies: the record
                // borrows the client) and handing them over a chunk at a time.
                let mut room = if full { 1 } else { prefetch - pending };
                let mut chunk = Vec::with_capacity(CHUNK.min(room));
                let mut next = Some(record);
                while let Some(record) = next.take() {
                    match record.expect("kafka message streams never end") {
                        Ok(record) => {
                            last_error = None;
                            // The group subscribes to this one topic only, so
                            // every record is ours (`topic()` would cost a
                            // strlen and a UTF-8 check per record).
                            chunk.push(Polled {
                                message: decode(&record),
                                partition: record.partition(),
                                offset: record.offset(),
                            });
                            room -= 1;
                            if chunk.len() == CHUNK {
                                hand_over(&shared, &mut chunk);
                            }
                            if room > 0 {
                                // Cancel-safe: a record is taken only when Ready.
                                next = records.next().now_or_never();
                            } else if paused {
                                set_paused(&consumer, true);
                            }
                        }
                        Err(KafkaError::PartitionEOF(partition)) => {
                            hand_over(&shared, &mut chunk);
                            caught_up(&shared, partition);
                        }
                        Err(e) => {
                            hand_over(&shared, &mut chunk);
                            if is_fatal(&e) {
                                tracing::error!(error = %e, topic = %shared.topic, "consumer failed");
                                break 'drive Err(BrokerError::backend("kafka", e));
                            }
                            // librdkafka reconnects by itself; say so once per kind of error.
                            let text = e.to_string();
                            if last_error.as_deref() != Some(&text) {
                                tracing::warn!(error = %text, topic = %shared.topic, "consumer error; librdkafka keeps retrying");
                                last_error = Some(text);
                            }
                        }
                    }
                }
                hand_over(&shared, &mut chunk);
            }
        }
    };
    drop(records);

    let (commits, clean) = {
        let mut state = shared.lock();
        let owned = state.counts.owned();
        let clean = state.release_counts(owned);
        state.buffer.clear();
        (state.tracker.close(), clean)
    };
    let topic = shared.topic.clone();
    let leave = tokio::task::spawn_blocking(move || {
        let result = match commits.is_empty() {
            true => Ok(()),
            false => consumer
                .commit(&offsets_list(&topic, &commits), CommitMode::Sync)
                .map_err(|e| BrokerError::backend("kafka", e)),
        };
        // Partitions with nothing abandoned finished cleanly (if what
        // finished is committed: see the revoke).
        if result.is_ok() {
            if let Err(e) = counts.store(&clean, CommitMode::Sync) {
                tracing::warn!(error = %e, "storing delivery counts at close failed");
            }
        }
        drop(counts);
        // Leaves the group: its partitions go to the other members at once.
        // The client closes when the stream lets its handle go too.
        consumer.unsubscribe();
        drop(consumer);
        result
    });
    let committed = close_within(leave, options.close_timeout, "kafka consumer close").await;
    {
        let mut state = shared.lock();
        state.finished = true;
        if let Err(e) = &outcome {
            state.failure = Some(BrokerError::backend("kafka", e.to_string()));
        }
    }
    shared.ready.notify_one();
    outcome.and(committed)
}

/// Waits at most `after` for a consumer's blocking close step (final
/// commit, leaving); a timeout or a panic of the step is the error.
pub(crate) async fn close_within(
    step: JoinHandle<Result<()>>,
    after: Duration,
    operation: &'static str,
) -> Result<()> {
    match tokio::time::timeout(after, step).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => Err(BrokerError::backend("kafka", join)),
        Err(_) => Err(BrokerError::Timeout { operation, after }),
    }
}

/// Moves fetched records into the stream's buffer (counted unfinished from
/// now on) and wakes the stream if it may be waiting: only when the buffer
/// was empty, since otherwise it has work already.
fn hand_over(shared: &Shared, chunk: &mut Vec<Polled>) {
    if chunk.is_empty() {
        return;
    }
    let was_empty = {
        let mut state = shared.lock();
        // A stream holding records back waits for these too.
        let was_empty = state.buffer.is_empty() || state.holding;
        for record in chunk.drain(..) {
            match state.tracker.received_new(record.partition, record.offset) {
                Some(token) => state.buffer.push_back(Buffered::polled(record, token)),
                None => {
                    tracing::debug!(
                        partition = record.partition,
                        offset = record.offset,
                        "record received again while pending; the first copy stays"
                    )
                }
            }
        }
        was_empty
    };
    if was_empty {
        shared.ready.notify_one();
    }
}

/// librdkafka reached the end of `partition`: a recovery of it may end
/// (once what was received is handed out and settled), and records held
/// back for it need not wait any more.
fn caught_up(shared: &Shared, partition: i32) {
    let mut state = shared.lock();
    let last = state.tracker.last_received(partition);
    state.counts.caught_up(partition, last);
    if state.holding {
        shared.ready.notify_one();
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Errors after which the consumer cannot recover by itself.
fn is_fatal(e: &KafkaError) -> bool {
    matches!(e, KafkaError::MessageConsumptionFatal(_))
        || matches!(
            e.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::Fatal
                    | RDKafkaErrorCode::SaslAuthenticationFailed
                    | RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::GroupAuthorizationFailed
            )
        )
}

/// Pauses the partitions of `held` not in `was`, resumes those of `was`
/// not in `held` (both sorted).
fn pause_partitions(consumer: &GroupConsumer, topic: &str, held: &[i32], was: &[i32]) {
    let list = |from: &[i32], without: &[i32]| {
        let mut tpl = TopicPartitionList::new();
        for p in from.iter().filter(|p| without.binary_search(p).is_err()) {
            tpl.add_partition(topic, *p);
        }
        tpl
    };
    pause_or_resume(consumer, &list(held, was), true);
    pause_or_resume(consumer, &list(was, held), false);
}

fn set_paused(consumer: &GroupConsumer, pause: bool) {
    if let Ok(assignment) = consumer.assignment() {
        pause_or_resume(consumer, &assignment, pause);
    }
}

/// Pauses (or resumes) the partitions of `tpl`, if any.
fn pause_or_resume(consumer: &GroupConsumer, tpl: &TopicPartitionList, pause: bool) {
    if tpl.count() == 0 {
        return;
    }
    let result = match pause {
        true => consumer.pause(tpl),
        false => consumer.resume(tpl),
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, pause, "pause/resume failed");
    }
}

/// Sends the positions that moved since the last commit (async: the result
/// comes back through `commit_callback`).
fn commit_finished(consumer: &GroupConsumer, shared: &Shared) {
    let commits = shared.lock().tracker.take_commits();
    send_commits(consumer, shared, commits);
}

/// Commits `commits` asynchronously (taken from the tracker).
fn send_commits(consumer: &GroupConsumer, shared: &Shared, commits: Vec<(i32, i64)>) {
    if commits.is_empty() {
        return;
    }
    if let Err(e) = consumer.commit(&offsets_list(&shared.topic, &commits), CommitMode::Async) {
        tracing::warn!(error = %e, "offset commit failed; will retry");
        let mut state = shared.lock();
        for (p, o) in commits {
            state.tracker.commit_failed(p, o);
        }
    }
}
