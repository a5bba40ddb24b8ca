//! Delayed publish and delayed (non-blocking) retries: the delay topic and
//! the reader of it each subscription runs beside its main consumer.
//!
//! One delay topic per topic, `{topic}.retry`, with one partition per
//! [delay tier](broker_core::delay::Tier) and partition of the topic:
//! partition `tier * N + p` (tier 0 is 1 s, ... 7 is 24 h; `N` partitions
//! of the topic). A delayed record is produced there with the header
//! `x-delay-due-ms` (when it falls due, in milliseconds since the epoch,
//! reckoned when it is sent) and, for a retry copy, `x-retry-group` (the
//! only group it is for). Every record of a partition waits the same time,
//! so records fall due in offset order and only each partition's head needs
//! watching.
//!
//! Each subscription has a delay reader: a second client that joins no
//! group. The main consumer's rebalance callbacks drive it ([`Follower`]):
//! the member that owns topic partition `p` reads the delay partitions of
//! `p`, and commits their offsets to the group `{group}.retry` (which never
//! has members) on revoke, before the next owner reads them. So there is no
//! second group join, and each group reads each delay record once. The
//! reader's driver keeps the records it received per partition; when a
//! partition's head is not due yet it pauses that partition alone
//! (librdkafka then fetches from after the last record it returned, which
//! is kept here, when resumed) and wakes up when the head falls due. Other
//! tiers and the main topic go on meanwhile. A partition is also paused
//! while `prefetch` of its records are unfinished. Records of another group
//! (`x-retry-group`) are settled without reaching the handler. Offsets are
//! committed only up to the lowest unfinished record ([`OffsetTracker`]),
//! so a record waiting at a restart is read again.
//!
//! The stream the application sees ([`Merged`]) takes deliveries from both
//! clients. A due record reaches the handler exactly as published: the
//! delay headers are removed, the key, headers and id are kept, and it
//! comes as a first delivery (the runtime counts a retry's attempts from
//! its `x-retry-attempt`). That stream, the due records' own stream and
//! their acker are in `stream`; this file holds the reader's driver and the
//! state it shares with them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::StreamExt;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientContext, Message as _, Offset, TopicPartitionList};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

use broker_core::config::KafkaSettings;
use broker_core::delay::Tier;
use broker_core::message::header;
use broker_core::{
    Acker, BrokerError, Delivery, DeliveryStream, Message, Received, Result, Subscription,
};

use crate::client_config::{client_config, config_error, Role};
use crate::codec::decode;
use crate::consumer::{ConsumerOptions, KafkaStream};
use crate::context::{error_limited, log_limited, LogLimiter};
use crate::tracker::{OffsetTracker, Token};
use crate::KafkaBroker;

mod stream;
pub(crate) use stream::{DelayStream, Merged};

/// When a delayed record falls due (milliseconds since the epoch); the
/// backend's own header, removed before the record is handed out.
pub(crate) const DUE_HEADER: &str = "x-delay-due-ms";

/// The delay topic's suffix, and of its consumer group.
const SUFFIX: &str = ".retry";

/// The delay topic of `topic`: `{topic}.retry`.
pub(crate) fn delay_topic(topic: &str) -> String {
    format!("{topic}{SUFFIX}")
}

/// Whether a subscription to `topic` reads delayed records: not for
/// dead-letter topics, nor for a delay topic itself.
pub(crate) fn reads_delays(topic: &str) -> bool {
    !topic.ends_with(".dlq") && !topic.ends_with(SUFFIX)
}

/// How long a new assignment waits for each partition's first record (or
/// its end) before handing out due records.
const FIRST_READ: Duration = Duration::from_secs(3);

/// Number of delay tiers.
pub(crate) fn tiers() -> i32 {
    Tier::all().len() as i32
}

/// Partitions of the delay topic of a topic with `main` partitions: one
/// per tier and partition of the topic.
pub(crate) fn partitions(main: i32) -> i32 {
    tiers() * main
}

/// The delay topic's partition of `tier`, for the owner of the topic's
/// partition `main` (of `count`).
pub(crate) fn partition_of(tier: Tier, main: i32, count: i32) -> i32 {
    let tier = Tier::all().position(|t| t == tier).unwrap_or(0) as i32;
    tier * count + main.rem_euclid(count.max(1))
}

/// The topic partition whose owner reads a delayed message for every
/// group: from its key (or id), spread like keys are.
pub(crate) fn spread(message: &Message, count: i32) -> i32 {
    let bytes = message.key().unwrap_or(message.id().as_bytes());
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % count.max(1) as u64) as i32
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Adds the delay headers: due after `tier` from now, for `group` only
/// when given.
pub(crate) fn mark(message: &mut Message, tier: Tier, group: Option<&str>) {
    let due = now_ms().saturating_add(tier.duration().as_millis() as i64);
    let headers = message.headers_mut();
    headers.insert(DUE_HEADER, due.to_string());
    if let Some(group) = group {
        headers.insert(header::RETRY_GROUP, group);
    }
}

/// Removes the delay headers; returns when the record falls due (0 when it
/// has no due time: at once) and the group it is for, if only one.
fn unmark(message: &mut Message) -> (i64, Option<String>) {
    let due = message
        .headers()
        .get_str(DUE_HEADER)
        .and_then(|v| v.trim().parse::<i64>().ok())
        .unwrap_or(0);
    let group = message
        .headers()
        .get_str(header::RETRY_GROUP)
        .map(str::to_owned);
    let headers = message.headers_mut();
    headers.remove(DUE_HEADER);
    headers.remove(header::RETRY_GROUP);
    (due, group)
}

/// Where a subscription's failed messages go for a delayed retry: its
/// topic's delay topic, marked for its group.
#[derive(Clone)]
pub(crate) struct Retry {
    broker: KafkaBroker,
    topic: Arc<str>,
    group: Arc<str>,
}

impl Retry {
    pub(crate) fn new(broker: KafkaBroker, topic: &str, group: &str) -> Self {
        Retry {
            broker,
            topic: topic.into(),
            group: group.into(),
        }
    }

    /// Produces `message` to the tier of `delay` (at least the shortest),
    /// for this group only, read by the owner of the topic's partition
    /// `partition`; returns once the broker accepted it.
    pub(crate) async fn send(
        &self,
        message: Message,
        delay: Duration,
        partition: i32,
    ) -> Result<()> {
        let tier = Tier::for_delay(delay.max(Duration::from_nanos(1)))?
            .ok_or(BrokerError::Misconfigured("no delay tier"))?;
        self.broker
            .send_delayed(
                &self.topic,
                message,
                tier,
                Some(&self.group),
                Some(partition),
            )
            .await
    }
}

/// A delayed record received, not settled yet.
struct Held {
    message: Message,
    partition: i32,
    offset: i64,
    token: Token,
    /// Milliseconds since the epoch.
    due: i64,
    redelivered: bool,
    attempt: u32,
}

struct State {
    tracker: OffsetTracker,
    /// Owned partitions.
    assigned: BTreeSet<i32>,
    /// Received and not due yet (or not checked yet), per partition, in
    /// offset order.
    waiting: BTreeMap<i32, VecDeque<Held>>,
    /// Due, for the stream to hand out.
    ready: VecDeque<Held>,
    /// Partitions this reader paused.
    paused: BTreeSet<i32>,
    /// Newly assigned partitions that returned neither a record nor their
    /// end yet: until they do (or [`FIRST_READ`] passes), nothing is handed
    /// out, so that records that fell due while no one read them come out
    /// in due order across tiers.
    unread: BTreeSet<i32>,
    /// When the wait for `unread` ends (milliseconds since the epoch).
    unread_until: i64,
    failure: Option<BrokerError>,
    finished: bool,
}

/// What the driver does after looking at the held records.
struct Plan {
    /// Records became due.
    moved: bool,
    pause: Vec<i32>,
    resume: Vec<i32>,
    /// The earliest due time of a waiting head.
    next_due: Option<i64>,
}

impl State {
    /// Moves due heads to `ready`; pauses the partitions whose head waits or
    /// that have `prefetch` unfinished records, resumes the others.
    fn plan(&mut self, now: i64, prefetch: usize) -> Plan {
        let mut plan = Plan {
            moved: false,
            pause: Vec::new(),
            resume: Vec::new(),
            next_due: None,
        };
        let reading = !self.unread.is_empty() && now < self.unread_until;
        if reading {
            plan.next_due = Some(self.unread_until);
        }
        for queue in self.waiting.values_mut() {
            while !reading && queue.front().is_some_and(|h| h.due <= now) {
                if let Some(h) = queue.pop_front() {
                    // In due order across tiers too (records that fell due
                    // while no one read them come out together).
                    let at = self.ready.partition_point(|r| r.due <= h.due);
                    self.ready.insert(at, h);
                    plan.moved = true;
                }
            }
            if let Some(head) = queue.front().filter(|_| !reading) {
                plan.next_due = Some(plan.next_due.map_or(head.due, |d: i64| d.min(head.due)));
            }
        }
        for &p in &self.assigned {
            let waits = self.waiting.get(&p).is_some_and(|q| !q.is_empty());
            let full = self.tracker.pending_in(p) >= prefetch;
            let paused = self.paused.contains(&p);
            if (waits || full) && !paused {
                plan.pause.push(p);
            } else if !(waits || full) && paused {
                plan.resume.push(p);
            }
        }
        for p in &plan.pause {
            self.paused.insert(*p);
        }
        for p in &plan.resume {
            self.paused.remove(p);
        }
        plan
    }
}

struct Shared {
    /// The subscribed topic: what deliveries say they came from.
    topic: Arc<str>,
    delay_topic: String,
    /// Partitions of the topic.
    main_partitions: i32,
    group: String,
    state: Mutex<State>,
    /// Driver → stream: records are due (or the driver stopped).
    ready: Notify,
    /// Ackers and rebalances → driver: look again.
    wake: Notify,
    closed: AtomicBool,
}

impl Shared {
    // A poisoned lock only means a panic mid-update of plain collections.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a received record: settles it at once when it is for another
    /// group, keeps it otherwise.
    fn receive(&self, record: &BorrowedMessage<'_>) {
        if record.topic() != self.delay_topic {
            return;
        }
        let (partition, offset) = (record.partition(), record.offset());
        let mut message = decode(record);
        let (due, group) = unmark(&mut message);
        let mut state = self.lock();
        if !state.assigned.contains(&partition) {
            return;
        }
        state.unread.remove(&partition);
        let token = state.tracker.received(partition, offset);
        if group.is_some_and(|g| g != self.group) {
            state.tracker.ack(partition, offset, token);
            return;
        }
        state.waiting.entry(partition).or_default().push_back(Held {
            message,
            partition,
            offset,
            token,
            due,
            redelivered: false,
            attempt: 1,
        });
    }
}

/// Commit callbacks of the delay reader.
struct DelayContext {
    shared: Arc<Shared>,
    limiter: LogLimiter,
}

impl ClientContext for DelayContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_limited(&self.limiter, level, fac, log_message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        error_limited(&self.limiter, &error, reason);
    }
}

impl ConsumerContext for DelayContext {
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::warn!(error = %e, "delay topic commit failed; will retry");
            let mut state = self.shared.lock();
            for elem in offsets.elements_for_topic(&self.shared.delay_topic) {
                if let Offset::Offset(o) = elem.offset() {
                    state.tracker.commit_failed(elem.partition(), o);
                }
            }
        }
    }
}

/// Makes the delay reader follow the main consumer's assignment: called
/// from its rebalance callbacks, it assigns and revokes the delay
/// partitions of the topic partitions the member owns.
pub(crate) struct Follower {
    shared: Arc<Shared>,
    /// Taken by the driver when it closes the client.
    consumer: Mutex<Option<Arc<DelayConsumer>>>,
}

impl Follower {
    fn consumer(&self) -> Option<Arc<DelayConsumer>> {
        self.consumer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The delay partitions of the topic partitions `main`.
    fn partitions_of(&self, main: &BTreeSet<i32>) -> Vec<i32> {
        let count = self.shared.main_partitions;
        main.iter()
            .filter(|&&p| p < count)
            .flat_map(|&p| (0..tiers()).map(move |t| t * count + p))
            .collect()
    }

    /// The member now owns the topic partitions `main`: read their delay
    /// partitions from the committed positions.
    pub(crate) fn assign(&self, main: &BTreeSet<i32>) {
        let partitions = self.partitions_of(main);
        let Some(consumer) = self.consumer() else {
            return;
        };
        if partitions.is_empty() {
            return;
        }
        {
            let mut state = self.shared.lock();
            for &p in &partitions {
                state.tracker.assign(p);
                state.assigned.insert(p);
                state.paused.remove(&p);
                state.unread.insert(p);
            }
            state.unread_until = now_ms().saturating_add(FIRST_READ.as_millis() as i64);
        }
        let mut tpl = TopicPartitionList::new();
        for &p in &partitions {
            tpl.add_partition(&self.shared.delay_topic, p);
        }
        if let Err(e) = consumer.incremental_assign(&tpl) {
            tracing::warn!(error = %e, "assigning delay partitions failed; delayed messages wait for the next assignment");
        }
        // librdkafka keeps a pause flag across unassign and assign.
        if let Err(e) = consumer.resume(&tpl) {
            tracing::warn!(error = %e, "resume of assigned delay partitions failed");
        }
        self.shared.wake.notify_one();
    }

    /// The member loses the topic partitions `main`: commits what finished
    /// of their delay partitions (unless `lost`) and stops reading them.
    pub(crate) fn revoke(&self, main: &BTreeSet<i32>, lost: bool) {
        let partitions: BTreeSet<i32> = self.partitions_of(main).into_iter().collect();
        let Some(consumer) = self.consumer() else {
            return;
        };
        if partitions.is_empty() {
            return;
        }
        let commits: Vec<(i32, i64)> = {
            let mut state = self.shared.lock();
            state.ready.retain(|h| !partitions.contains(&h.partition));
            partitions
                .iter()
                .filter_map(|&p| {
                    state.assigned.remove(&p);
                    state.waiting.remove(&p);
                    state.paused.remove(&p);
                    state.unread.remove(&p);
                    state.tracker.revoke(p).map(|o| (p, o))
                })
                .collect()
        };
        if !commits.is_empty() && !lost {
            let tpl = offsets_list(&self.shared.delay_topic, &commits);
            if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                tracing::warn!(error = %e, "delay topic commit on revoke failed; finished delayed messages may be redelivered");
            }
        }
        let mut tpl = TopicPartitionList::new();
        for &p in &partitions {
            tpl.add_partition(&self.shared.delay_topic, p);
        }
        if let Err(e) = consumer.incremental_unassign(&tpl) {
            tracing::warn!(error = %e, "unassigning delay partitions failed");
        }
        self.shared.wake.notify_one();
    }
}

type DelayConsumer = StreamConsumer<DelayContext>;

fn offsets_list(topic: &str, offsets: &[(i32, i64)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for &(partition, offset) in offsets {
        let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(offset));
    }
    tpl
}

fn set_paused(consumer: &DelayConsumer, topic: &str, partitions: &[i32], pause: bool) {
    if partitions.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for &p in partitions {
        tpl.add_partition(topic, p);
    }
    let result = match pause {
        true => consumer.pause(&tpl),
        false => consumer.resume(&tpl),
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, pause, "pause/resume of delay partitions failed");
    }
}

/// Opens the delay reader of `subscription` on `delay_topic` (of a topic
/// with `main_partitions` partitions). It joins no group: it reads what
/// the returned [`Follower`] assigns and commits to `{group}.retry`.
pub(crate) fn open(
    settings: &KafkaSettings,
    delay_topic: String,
    main_partitions: i32,
    subscription: &Subscription,
    retry: Retry,
    options: &ConsumerOptions,
) -> Result<(DelayStream, Arc<Follower>)> {
    let prefetch = subscription.prefetch.max(1);
    let shared = Arc::new(Shared {
        topic: subscription.topic.as_str().into(),
        delay_topic,
        main_partitions,
        group: subscription.group.clone(),
        state: Mutex::new(State {
            tracker: OffsetTracker::new(),
            assigned: BTreeSet::new(),
            waiting: BTreeMap::new(),
            ready: VecDeque::new(),
            paused: BTreeSet::new(),
            unread: BTreeSet::new(),
            unread_until: 0,
            failure: None,
            finished: false,
        }),
        ready: Notify::new(),
        wake: Notify::new(),
        closed: AtomicBool::new(false),
    });
    let mut config = client_config(settings, Role::Consumer);
    config.set("group.id", format!("{}{SUFFIX}", subscription.group));
    // Ends the wait for a new assignment's first records (see `unread`).
    config.set("enable.partition.eof", "true");
    let consumer: Arc<DelayConsumer> = Arc::new(
        config
            .create_with_context(DelayContext {
                shared: shared.clone(),
                limiter: LogLimiter::default(),
            })
            .map_err(config_error)?,
    );
    let follower = Arc::new(Follower {
        shared: shared.clone(),
        consumer: Mutex::new(Some(consumer.clone())),
    });
    let (stop_tx, stop_rx) = oneshot::channel();
    let driver = tokio::spawn(drive(
        consumer,
        follower.clone(),
        shared.clone(),
        prefetch,
        options.clone(),
        stop_rx,
    ));
    let stream = DelayStream {
        shared,
        retry,
        stop: Some(stop_tx),
        driver: Some(driver),
        close_timeout: options.close_timeout,
    };
    Ok((stream, follower))
}

/// Polls the delay reader until stopped: keeps received records, hands
/// out the due ones, pauses the partitions whose head waits, commits
/// periodically; at the end commits what finished and leaves the group.
async fn drive(
    consumer: Arc<DelayConsumer>,
    follower: Arc<Follower>,
    shared: Arc<Shared>,
    prefetch: usize,
    options: ConsumerOptions,
    mut stop: oneshot::Receiver<()>,
) -> Result<()> {
    let mut tick = tokio::time::interval(options.commit_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    let mut records = consumer.stream();
    let outcome = loop {
        let plan = shared.lock().plan(now_ms(), prefetch);
        if plan.moved {
            shared.ready.notify_one();
        }
        set_paused(&consumer, &shared.delay_topic, &plan.pause, true);
        set_paused(&consumer, &shared.delay_topic, &plan.resume, false);
        let due_in = plan
            .next_due
            .map(|due| Duration::from_millis(due.saturating_sub(now_ms()).max(0) as u64 + 1));
        tokio::select! {
            _ = &mut stop => break Ok(()),
            _ = tick.tick() => {
                let commits = shared.lock().tracker.take_commits();
                if !commits.is_empty() {
                    let tpl = offsets_list(&shared.delay_topic, &commits);
                    if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
                        tracing::warn!(error = %e, "delay topic commit failed; will retry");
                        let mut state = shared.lock();
                        for (p, o) in commits {
                            state.tracker.commit_failed(p, o);
                        }
                    }
                }
            }
            _ = shared.wake.notified() => {}
            _ = sleep_opt(due_in) => {}
            record = records.next() => match record.expect("kafka message streams never end") {
                Ok(record) => {
                    last_error = None;
                    shared.receive(&record);
                }
                Err(KafkaError::PartitionEOF(partition)) => {
                    shared.lock().unread.remove(&partition);
                }
                Err(e) if is_fatal(&e) => {
                    tracing::error!(error = %e, topic = %shared.delay_topic, "delay topic consumer failed");
                    break Err(BrokerError::backend("kafka", e));
                }
                Err(e) => {
                    let text = e.to_string();
                    if last_error.as_deref() != Some(&text) {
                        tracing::warn!(error = %text, topic = %shared.delay_topic, "delay topic consumer error; librdkafka keeps retrying");
                        last_error = Some(text);
                    }
                }
            }
        }
    };
    drop(records);
    // From now on the main consumer's revokes leave this client alone.
    follower
        .consumer
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    drop(follower);
    let commits = {
        let mut state = shared.lock();
        state.waiting.clear();
        state.ready.clear();
        state.tracker.close()
    };
    let topic = shared.delay_topic.clone();
    let leave = tokio::task::spawn_blocking(move || {
        let result = match commits.is_empty() {
            true => Ok(()),
            false => consumer
                .commit(&offsets_list(&topic, &commits), CommitMode::Sync)
                .map_err(|e| BrokerError::backend("kafka", e)),
        };
        drop(consumer);
        result
    });
    let committed =
        crate::consumer::close_within(leave, options.close_timeout, "kafka delay consumer close")
            .await;
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

async fn sleep_opt(duration: Option<Duration>) {
    match duration {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn held(partition: i32, offset: i64, due: i64) -> Held {
        Held {
            message: Message::new("x"),
            partition,
            offset,
            token: 0,
            due,
            redelivered: false,
            attempt: 1,
        }
    }

    fn state(partitions: &[i32]) -> State {
        let mut tracker = OffsetTracker::new();
        for &p in partitions {
            tracker.assign(p);
        }
        State {
            tracker,
            assigned: partitions.iter().copied().collect(),
            waiting: BTreeMap::new(),
            ready: VecDeque::new(),
            paused: BTreeSet::new(),
            unread: BTreeSet::new(),
            unread_until: 0,
            failure: None,
            finished: false,
        }
    }

    #[test]
    fn one_partition_per_tier_and_topic_partition() {
        assert_eq!(partitions(3), 24);
        let mut all: Vec<i32> = Tier::all()
            .flat_map(|t| (0..3).map(move |p| partition_of(t, p, 3)))
            .collect();
        assert_eq!(all[..4], [0, 1, 2, 3], "tier by tier");
        all.sort_unstable();
        assert_eq!(all, (0..partitions(3)).collect::<Vec<_>>());
        // What a member owning partition 1 reads: 1, 4, 7, ... one per tier.
        let tier = Tier::for_delay(Duration::from_secs(30)).unwrap().unwrap();
        assert_eq!(partition_of(tier, 1, 3) % 3, 1);
        let keyed = Message::new("x").with_key("k");
        assert_eq!(spread(&keyed, 3), spread(&keyed.clone(), 3));
        assert!((0..3).contains(&spread(&Message::new("y"), 3)));
    }

    #[test]
    fn a_waiting_head_pauses_only_its_tier() {
        let mut s = state(&[0, 1, 5]);
        s.waiting
            .entry(5)
            .or_default()
            .extend([held(5, 0, 3_600_000), held(5, 1, 3_600_001)]);
        s.waiting
            .entry(0)
            .or_default()
            .extend([held(0, 0, 900), held(0, 1, 1_500)]);
        let plan = s.plan(1_000, 10);
        assert!(plan.moved);
        assert_eq!(s.ready.len(), 1, "only the due head of the 1 s tier");
        assert_eq!(plan.pause, [0, 5], "the tiers whose head waits");
        assert_eq!(plan.next_due, Some(1_500));
        let plan = s.plan(1_500, 10);
        assert_eq!(s.ready.len(), 2);
        assert_eq!(plan.resume, [0], "the 1 s tier goes on; the 1 h one waits");
        assert!(plan.pause.is_empty());
        assert_eq!(plan.next_due, Some(3_600_000));
        assert_eq!(s.paused.iter().copied().collect::<Vec<_>>(), [5]);
    }

    #[test]
    fn a_new_assignment_hands_out_in_due_order_once_every_partition_was_read() {
        let mut s = state(&[0, 1]);
        s.unread.extend([0, 1]);
        s.unread_until = 10_000;
        s.waiting.entry(1).or_default().push_back(held(1, 0, 500));
        s.unread.remove(&1);
        let plan = s.plan(1_000, 10);
        assert!(!plan.moved, "partition 0 not read yet");
        assert_eq!(plan.next_due, Some(10_000));
        s.waiting.entry(0).or_default().push_back(held(0, 0, 200));
        s.unread.remove(&0);
        assert!(s.plan(1_000, 10).moved);
        let order: Vec<i32> = s.ready.iter().map(|h| h.partition).collect();
        assert_eq!(order, [0, 1], "the earlier due first, whatever came first");
        // Past the wait, what was read goes out even if a partition is silent.
        let mut s = state(&[0, 1]);
        s.unread.extend([0]);
        s.unread_until = 2_000;
        s.waiting.entry(1).or_default().push_back(held(1, 0, 500));
        assert!(!s.plan(1_999, 10).moved);
        assert!(s.plan(2_000, 10).moved);
    }

    #[test]
    fn marks_are_removed_and_the_rest_kept() {
        let sent = Message::new("p")
            .with_key("k")
            .with_header("a", "1")
            .with_header("b", "2");
        let mut copy = sent.clone();
        let before = now_ms();
        mark(
            &mut copy,
            Tier::for_delay(Duration::from_secs(3)).unwrap().unwrap(),
            Some("g"),
        );
        let (due, group) = unmark(&mut copy);
        assert!(due >= before + 5_000 && due <= now_ms() + 5_000);
        assert_eq!(group.as_deref(), Some("g"));
        assert_eq!(copy, sent);
    }
}
