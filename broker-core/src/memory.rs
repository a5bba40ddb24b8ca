//! The in-memory backend: the embedded default when no broker is enabled,
//! and the reference the conformance suite is written against.
//!
//! Semantics match the real backends: every consumer group gets every
//! message of a topic; members of a group share them; a delivery stays
//! unacknowledged until acked, and is redelivered after a nack with requeue
//! or when its subscription closes. Like Kafka with
//! `auto.offset.reset=earliest`, a new group starts with the messages the
//! topic retained (the last [`MemoryBrokerBuilder::retention`] ones), so
//! required groups need no set-up here. Acking or nacking a delivery after
//! its subscription closed fails with [`BrokerError::Closed`] (the message
//! was already handed back), as on the other backends. Nothing survives the
//! process.
//!
//! Delayed publish ([`Publisher::publish_after`]) keeps the message in the
//! broker's timer queue for its [delay tier](crate::delay::Tier), then
//! publishes it to the topic as if published then (so it goes to the groups
//! subscribed at that time, and into the retention). A subscriber that
//! stops and starts again meanwhile still gets it; the process ending
//! loses it, like everything else here. Messages accepted before
//! [`Publisher::close`] are still delivered when due.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::time::Instant;

use async_trait::async_trait;

use crate::combining::{Apply, Combining};
use crate::delay::Tier;
use crate::delivery::{Acker, Delivery, DeliveryStream, Received};
use crate::error::{BrokerError, Result};
use crate::fast_hash::FastMap;
use crate::message::{check_outgoing, Message};
use crate::topic::validate_topic;
use crate::{Health, Publisher, Subscriber, Subscription};

/// In-process broker. Cheap to clone: clones share the same topics.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> broker_core::Result<()> {
/// use broker_core::{MemoryBroker, Message, Publisher, Subscriber, Subscription};
/// let broker = MemoryBroker::new();
/// let mut stream = broker.subscribe(Subscription::new("demo.things.happened", "g1")).await?;
/// broker.publish("demo.things.happened", Message::new("hi")).await?;
/// let delivery = stream.next().await.unwrap()?;
/// assert_eq!(delivery.message().payload(), "hi");
/// delivery.ack().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

/// Topics by name. Keys are names the application chose (not input an
/// attacker picks), looked up on every publish: a cheap hash, not SipHash.
type Topics = FastMap<String, Topic>;

struct Inner {
    topics: Mutex<Topics>,
    closed: AtomicBool,
    max_message_bytes: usize,
    retention: usize,
    next_stream_id: AtomicU64,
    delayed: Mutex<Delayed>,
    /// Wakes the delay task: an earlier message arrived, or the broker went.
    delay_wake: Arc<tokio::sync::Notify>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Lets the delay task see the broker is gone and end.
        self.delay_wake.notify_one();
    }
}

/// Delayed messages waiting for their time.
#[derive(Default)]
struct Delayed {
    /// By due time, then arrival: one tier's messages leave in the order
    /// they came, as from a RabbitMQ delay queue.
    waiting: BTreeMap<(Instant, u64), (Destination, Message)>,
    next_seq: u64,
    /// The task that publishes them when due (started on first use, again
    /// if the runtime it ran on has gone).
    task: Option<tokio::task::JoinHandle<()>>,
}

/// Where a delayed message goes when due.
enum Destination {
    /// Every group of the topic (delayed publish).
    Topic(String),
    /// One group's queue (a delayed retry).
    Group(Arc<GroupQueue>),
}

#[derive(Default)]
struct Topic {
    retained: VecDeque<Message>,
    groups: HashMap<String, Arc<GroupQueue>>,
}

/// One queue per (group, topic), shared by the group's members.
struct GroupQueue {
    /// Acks (tags) never wait for the lock: see [`Combining`].
    state: Combining<QueueState, u64>,
    changed: Arc<tokio::sync::Notify>,
}

#[derive(Default)]
struct QueueState {
    /// Wakes the members to look at their inboxes.
    changed: Arc<tokio::sync::Notify>,
    /// In publish order (`Pending::seq`), returned messages included.
    ready: VecDeque<Pending>,
    /// Sequence number of the next message queued.
    next_seq: u64,
    /// Delivered to a member and not settled, by tag, with the member's id.
    unacked: Unacked,
    members: Vec<Member>,
    next_member: usize,
    next_tag: u64,
    /// Bumped whenever an empty inbox gains messages, or an inbox loses
    /// messages other than by its own member's `next`: only then are
    /// members woken. A member empties its whole inbox when it looks, so
    /// one wake-up per run of pushes is enough.
    changes: u64,
}

/// A subscribed member of the group. Like RabbitMQ, the queue pushes
/// messages round-robin to members with prefetch room.
struct Member {
    id: u64,
    prefetch: usize,
    /// Unacked messages this member holds, handed out or not yet.
    held: usize,
    /// Set when `held` reached `prefetch`; cleared when half of it is
    /// settled. Refilling in runs, not one message per ack, spares the
    /// member a wake-up per message.
    full: bool,
    /// Tags pushed to this member, not yet returned by `next`.
    inbox: VecDeque<u64>,
}

/// Unsettled deliveries by tag. Tags are handed out in order and mostly
/// settled in order, so they index a ring of slots: an insert and a remove
/// are a push and a pop, and a million held deliveries cost one array, not
/// a tree's nodes or a hash table's rehashes. A delivery held while many
/// later ones are settled would keep the ring from shrinking: once the ring
/// is mostly empty slots, its oldest entries move to a map on the side.
#[derive(Default)]
struct Unacked {
    /// The tag of `slots[0]`.
    first: u64,
    slots: VecDeque<Option<(Pending, u64)>>,
    /// Slots that hold a delivery.
    live: usize,
    /// Old deliveries moved out of the ring (tags below `first`).
    side: FastMap<u64, (Pending, u64)>,
}

impl Unacked {
    /// Slots a ring may hold beyond twice its live ones before it sheds.
    const SLACK: usize = 4096;

    /// Adds the delivery of `tag`, the tag after the last one added.
    fn insert(&mut self, tag: u64, entry: (Pending, u64)) {
        if self.slots.is_empty() {
            self.first = tag;
        }
        debug_assert_eq!(tag, self.first + self.slots.len() as u64);
        self.slots.push_back(Some(entry));
        self.live += 1;
        if self.slots.len() > 2 * self.live + Self::SLACK {
            self.shed();
        }
    }

    /// Moves the oldest deliveries to the side map until the ring is at
    /// most half empty slots.
    fn shed(&mut self) {
        while self.slots.len() > 2 * self.live {
            match self.slots.pop_front() {
                Some(Some(entry)) => {
                    self.side.insert(self.first, entry);
                    self.live -= 1;
                }
                Some(None) => {}
                None => break,
            }
            self.first += 1;
        }
        self.trim();
    }

    /// Drops the settled slots at the front.
    fn trim(&mut self) {
        while let Some(None) = self.slots.front() {
            self.slots.pop_front();
            self.first += 1;
        }
    }

    fn remove(&mut self, tag: &u64) -> Option<(Pending, u64)> {
        let Some(at) = tag.checked_sub(self.first) else {
            return self.side.remove(tag);
        };
        let entry = self.slots.get_mut(usize::try_from(at).ok()?)?.take()?;
        self.live -= 1;
        self.trim();
        Some(entry)
    }

    fn get(&self, tag: u64) -> Option<&(Pending, u64)> {
        match tag.checked_sub(self.first) {
            None => self.side.get(&tag),
            Some(at) => self.slots.get(usize::try_from(at).ok()?)?.as_ref(),
        }
    }

    /// Every delivery with its tag, in no particular order.
    fn iter(&self) -> impl Iterator<Item = (u64, &(Pending, u64))> {
        let ring = (self.first..)
            .zip(&self.slots)
            .filter_map(|(tag, slot)| Some((tag, slot.as_ref()?)));
        self.side
            .iter()
            .map(|(tag, entry)| (*tag, entry))
            .chain(ring)
    }
}

impl QueueState {
    /// Settles one delivery: its holder gets room again; with `requeue`
    /// the message goes back to the front of the queue.
    fn release(&mut self, tag: u64, requeue: bool) -> Result<()> {
        let (mut pending, holder) = self
            .unacked
            .remove(&tag)
            // Already returned to the queue because its stream closed.
            .ok_or(BrokerError::Closed("memory subscription"))?;
        if let Some(member) = self.members.iter_mut().find(|m| m.id == holder) {
            member.held -= 1;
            if member.held <= member.prefetch / 2 {
                member.full = false;
            }
        }
        if requeue {
            pending.returned += 1;
            self.requeue(pending);
        }
        Ok(())
    }

    /// Queues a new message at the end.
    fn push(&mut self, message: Message) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.ready.push_back(Pending {
            message,
            returned: 0,
            seq,
        });
    }

    /// Puts a returned message back in its publish-order place, so that
    /// messages returned together (a nack per queued delivery at shutdown,
    /// a closed stream) come back in their order, as a queue's do.
    fn requeue(&mut self, pending: Pending) {
        let at = self.ready.partition_point(|p| p.seq < pending.seq);
        self.ready.insert(at, pending);
    }

    /// Pushes ready messages to members with room, round-robin.
    fn dispatch(&mut self) {
        while !self.ready.is_empty() {
            let n = self.members.len();
            let Some(i) = (0..n)
                .map(|k| (self.next_member + k) % n)
                .find(|&i| !self.members[i].full)
            else {
                return;
            };
            self.next_member = (i + 1) % n;
            let pending = self.ready.pop_front().expect("not empty");
            let tag = self.next_tag;
            self.next_tag += 1;
            let member = &mut self.members[i];
            member.held += 1;
            member.full = member.held >= member.prefetch;
            if member.inbox.is_empty() {
                self.changes += 1;
            }
            member.inbox.push_back(tag);
            self.unacked.insert(tag, (pending, member.id));
        }
    }

    /// Returns a member's unacked messages to the front of the queue, in
    /// their original order, marked redelivered.
    fn remove_member(&mut self, id: u64) {
        self.members.retain(|m| m.id != id);
        self.changes += 1;
        let held: Vec<u64> = self
            .unacked
            .iter()
            .filter(|(_, (_, holder))| *holder == id)
            .map(|(tag, _)| tag)
            .collect();
        let mut returned: Vec<Pending> = held
            .into_iter()
            .filter_map(|tag| self.unacked.remove(&tag))
            .map(|(mut pending, _)| {
                pending.returned += 1;
                pending
            })
            .collect();
        // One merge of two runs in publish order, not an insert each.
        returned.sort_unstable_by_key(|p| p.seq);
        let queued = std::mem::take(&mut self.ready);
        let mut queued = queued.into_iter().peekable();
        let mut returned = returned.into_iter().peekable();
        let mut merged = VecDeque::with_capacity(queued.len() + returned.len());
        loop {
            let next = match (queued.peek(), returned.peek()) {
                (Some(q), Some(r)) if q.seq < r.seq => queued.next(),
                (_, Some(_)) => returned.next(),
                (Some(_), None) => queued.next(),
                (None, None) => break,
            };
            merged.extend(next);
        }
        self.ready = merged;
        self.dispatch();
    }
}

impl Apply<u64> for QueueState {
    /// Acks: the holders get room again.
    fn apply(&mut self, tags: std::vec::Drain<'_, u64>) {
        let before = self.changes;
        for tag in tags {
            // An ack of a message its closed stream gave back is ignored.
            let _ = self.release(tag, false);
        }
        self.dispatch();
        if self.changes != before {
            self.changed.notify_waiters();
        }
    }
}

impl GroupQueue {
    fn new() -> Self {
        let changed = Arc::new(tokio::sync::Notify::new());
        GroupQueue {
            state: Combining::new(QueueState {
                changed: changed.clone(),
                ..QueueState::default()
            }),
            changed,
        }
    }

    /// Runs `f` on the state, then, if an inbox changed, wakes every
    /// member to look at its own.
    fn update<T>(&self, f: impl FnOnce(&mut QueueState) -> T) -> T {
        let (out, changed) = {
            let mut state = self.state.lock();
            let before = state.changes;
            let out = f(&mut state);
            (out, state.changes != before)
        };
        if changed {
            self.changed.notify_waiters();
        }
        out
    }
}

#[derive(Clone)]
struct Pending {
    message: Message,
    /// Times it went back to the queue unsettled (nack with requeue, or
    /// its holder's stream closed): the delivery count of quorum queues.
    returned: u32,
    /// Publish order within the group's queue.
    seq: u64,
}

/// Options for [`MemoryBroker`].
#[derive(Debug, Clone)]
pub struct MemoryBrokerBuilder {
    max_message_bytes: usize,
    retention: usize,
}

impl MemoryBrokerBuilder {
    /// Largest accepted message (default 1 MiB, Kafka's default limit, so
    /// code that works here does not fail on Kafka for size).
    pub fn max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }
    /// Messages kept per topic for groups that join later (default 100,000).
    pub fn retention(mut self, messages: usize) -> Self {
        self.retention = messages;
        self
    }
    /// Builds the broker.
    pub fn build(self) -> MemoryBroker {
        MemoryBroker {
            inner: Arc::new(Inner {
                topics: Mutex::default(),
                closed: AtomicBool::new(false),
                max_message_bytes: self.max_message_bytes,
                retention: self.retention,
                next_stream_id: AtomicU64::new(1),
                delayed: Mutex::default(),
                delay_wake: Arc::default(),
            }),
        }
    }
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("max_message_bytes", &self.inner.max_message_bytes)
            .field("retention", &self.inner.retention)
            .finish_non_exhaustive()
    }
}

impl MemoryBroker {
    /// A broker with default options.
    pub fn new() -> Self {
        Self::builder().build()
    }
    /// Options: message size limit, retention.
    pub fn builder() -> MemoryBrokerBuilder {
        MemoryBrokerBuilder {
            max_message_bytes: 1024 * 1024,
            retention: 100_000,
        }
    }

    fn topics(&self) -> MutexGuard<'_, Topics> {
        lock(&self.inner.topics)
    }

    fn check_open(&self) -> Result<()> {
        match self.inner.closed.load(Ordering::Acquire) {
            true => Err(BrokerError::Closed("memory publisher")),
            false => Ok(()),
        }
    }

    /// [`check_outgoing`], minus the name check for a topic already known
    /// (every name in `topics` was validated when it was added).
    fn check(&self, topics: &Topics, topic: &str, message: &Message) -> Result<()> {
        let max = self.inner.max_message_bytes;
        if !topics.contains_key(topic) {
            return check_outgoing(topic, message, max);
        }
        self.check_size(message)
    }

    /// The size part of [`check_outgoing`].
    fn check_size(&self, message: &Message) -> Result<()> {
        let max = self.inner.max_message_bytes;
        match message.encoded_len() {
            size if size > max => Err(BrokerError::MessageTooLarge { size, max }),
            _ => Ok(()),
        }
    }

    fn append(&self, topics: &mut Topics, topic: &str, message: Message) {
        // Looked up first: a new String per publish only for a new topic.
        if !topics.contains_key(topic) {
            topics.insert(topic.to_owned(), Topic::default());
        }
        let t = topics.get_mut(topic).expect("just ensured");
        self.append_to(t, message);
    }

    fn append_to(&self, t: &mut Topic, message: Message) {
        for queue in t.groups.values() {
            queue.update(|q| {
                q.push(message.clone());
                q.dispatch();
            });
        }
        if self.inner.retention > 0 {
            if t.retained.len() == self.inner.retention {
                t.retained.pop_front();
            }
            t.retained.push_back(message);
        }
    }
}

impl MemoryBroker {
    /// Keeps `message` until `due`, then delivers it to `destination`.
    fn schedule(&self, destination: Destination, message: Message, due: Instant) {
        let mut delayed = lock(&self.inner.delayed);
        let seq = delayed.next_seq;
        delayed.next_seq += 1;
        let earliest = delayed
            .waiting
            .keys()
            .next()
            .is_none_or(|(at, _)| due < *at);
        delayed.waiting.insert((due, seq), (destination, message));
        if delayed.task.as_ref().is_none_or(|t| t.is_finished()) {
            let (inner, wake) = (Arc::downgrade(&self.inner), self.inner.delay_wake.clone());
            delayed.task = Some(tokio::spawn(deliver_delayed(inner, wake)));
        } else if earliest {
            self.inner.delay_wake.notify_one();
        }
    }

    /// Publishes the delayed messages that are due, in due order; returns
    /// when the next one is.
    fn publish_due(&self) -> Option<Instant> {
        let now = Instant::now();
        let due = {
            let mut delayed = lock(&self.inner.delayed);
            let later = delayed.waiting.split_off(&(now, u64::MAX));
            std::mem::replace(&mut delayed.waiting, later)
        };
        if !due.is_empty() {
            let mut topics = self.topics();
            for (destination, message) in due.into_values() {
                match destination {
                    Destination::Topic(topic) => self.append(&mut topics, &topic, message),
                    Destination::Group(queue) => queue.update(|q| {
                        q.push(message);
                        q.dispatch();
                    }),
                }
            }
        }
        lock(&self.inner.delayed)
            .waiting
            .keys()
            .next()
            .map(|(at, _)| *at)
    }
}

/// The delay task: publishes delayed messages when due; ends with the broker.
async fn deliver_delayed(inner: Weak<Inner>, wake: Arc<tokio::sync::Notify>) {
    loop {
        let next = match inner.upgrade() {
            Some(inner) => MemoryBroker { inner }.publish_due(),
            None => return,
        };
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

// A poisoned lock only means another task panicked mid-update of plain
// collections; the data is still consistent enough to keep serving.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[async_trait]
impl Publisher for MemoryBroker {
    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        self.check_open()?;
        let mut topics = self.topics();
        // One look-up of a known topic per publish.
        if let Some(t) = topics.get_mut(topic) {
            self.check_size(&message)?;
            self.append_to(t, message);
            return Ok(());
        }
        check_outgoing(topic, &message, self.inner.max_message_bytes)?;
        self.append(&mut topics, topic, message);
        Ok(())
    }

    /// Keeps the message in this process for its delay tier, then publishes
    /// it (see the module documentation).
    async fn publish_after(&self, topic: &str, message: Message, delay: Duration) -> Result<()> {
        self.check_open()?;
        check_outgoing(topic, &message, self.inner.max_message_bytes)?;
        match Tier::for_delay(delay)? {
            None => self.append(&mut self.topics(), topic, message),
            Some(tier) => self.schedule(
                Destination::Topic(topic.to_owned()),
                message,
                Instant::now() + tier.duration(),
            ),
        }
        Ok(())
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        self.check_open()?;
        let mut topics = self.topics();
        for m in &messages {
            self.check(&topics, topic, m)?;
        }
        for m in messages {
            self.append(&mut topics, topic, m);
        }
        Ok(())
    }

    fn max_message_bytes(&self) -> usize {
        self.inner.max_message_bytes
    }

    fn backend_name(&self) -> &'static str {
        "memory"
    }

    async fn health(&self) -> Health {
        match self.check_open() {
            Ok(()) => Health::Healthy,
            Err(e) => Health::Unhealthy(e.to_string()),
        }
    }

    async fn close(&self) -> Result<()> {
        // Publishing is synchronous here: nothing can be in flight.
        self.inner.closed.store(true, Ordering::Release);
        Ok(())
    }
}

#[async_trait]
impl Subscriber for MemoryBroker {
    /// Delayed retries wait in the broker's timer queue (in this process).
    fn delayed_retry(&self) -> bool {
        true
    }

    async fn subscribe(&self, subscription: Subscription) -> Result<Box<dyn DeliveryStream>> {
        validate_topic(&subscription.topic)?;
        if subscription.group.is_empty() {
            return Err(BrokerError::Misconfigured("consumer group name is empty"));
        }
        let id = self.inner.next_stream_id.fetch_add(1, Ordering::Relaxed);
        let queue = {
            let mut topics = self.topics();
            let topic = topics.entry(subscription.topic.clone()).or_default();
            let retained = &topic.retained;
            topic
                .groups
                .entry(subscription.group.clone())
                .or_insert_with(|| {
                    let queue = GroupQueue::new();
                    {
                        let mut state = queue.state.lock();
                        for m in retained {
                            state.push(m.clone());
                        }
                    }
                    Arc::new(queue)
                })
                .clone()
        };
        queue.update(|q| {
            q.members.push(Member {
                id,
                prefetch: subscription.prefetch.max(1),
                held: 0,
                full: false,
                inbox: VecDeque::new(),
            });
            q.dispatch();
        });
        Ok(Box::new(MemoryStream {
            shared: Arc::new(StreamShared {
                broker: Arc::downgrade(&self.inner),
                queue,
                closed: AtomicBool::new(false),
            }),
            topic: subscription.topic.into(),
            id,
            taken: VecDeque::new(),
        }))
    }

    async fn health(&self) -> Health {
        Health::Healthy
    }

    fn backend_name(&self) -> &'static str {
        "memory"
    }
}

struct MemoryStream {
    shared: Arc<StreamShared>,
    topic: Arc<str>,
    id: u64,
    /// Messages taken from this member's inbox, not yet returned by `next`
    /// (still held by the member: its removal requeues them).
    taken: VecDeque<(u64, Pending)>,
}

/// What a stream's ackers need, behind one reference count (one clone per
/// delivery instead of three).
struct StreamShared {
    /// For delayed retries: the broker's timer queue.
    broker: Weak<Inner>,
    queue: Arc<GroupQueue>,
    /// Set when the stream goes: its deliveries can no longer be settled.
    closed: AtomicBool,
}

impl MemoryStream {
    /// Takes the next message pushed to this member: the whole inbox at
    /// once, so the queue's lock is taken once per run, not per message.
    fn try_take(&mut self) -> Option<Delivery> {
        if self.taken.is_empty() {
            let (id, taken) = (self.id, &mut self.taken);
            self.shared.queue.update(|state| {
                let Some(member) = state.members.iter_mut().find(|m| m.id == id) else {
                    return;
                };
                let unacked = &state.unacked;
                taken.extend(
                    member
                        .inbox
                        .drain(..)
                        .map(|tag| (tag, unacked.get(tag).expect("pushed, unsettled").0.clone())),
                );
            });
        }
        let (tag, pending) = self.taken.pop_front()?;
        Some(Delivery::new(
            Received {
                message: pending.message,
                topic: self.topic.clone(),
                redelivered: pending.returned > 0,
                partition: None,
                offset: None,
                attempt: pending.returned.saturating_add(1),
            },
            Box::new(MemoryAcker {
                shared: self.shared.clone(),
                tag,
            }),
        ))
    }
}

#[async_trait]
impl DeliveryStream for MemoryStream {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            if let Some(d) = self.try_take() {
                return Some(Ok(d));
            }
            // Register for wake-ups, then look again, so none is missed.
            let queue = self.shared.queue.clone();
            let changed = queue.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(d) = self.try_take() {
                return Some(Ok(d));
            }
            changed.await;
        }
    }

    async fn close(self: Box<Self>) -> Result<()> {
        // Drop requeues what this member still holds.
        Ok(())
    }
}

impl Drop for MemoryStream {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.queue.update(|q| q.remove_member(self.id));
    }
}

struct MemoryAcker {
    shared: Arc<StreamShared>,
    tag: u64,
}

impl MemoryAcker {
    fn check_open(&self) -> Result<()> {
        match self.shared.closed.load(Ordering::Acquire) {
            true => Err(BrokerError::Closed("memory subscription")),
            false => Ok(()),
        }
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.check_open()?;
        self.shared.queue.state.update(self.tag);
        Ok(())
    }
    async fn nack(self: Box<Self>, requeue: bool) -> Result<()> {
        self.check_open()?;
        self.shared.queue.update(|q| {
            q.release(self.tag, requeue)?;
            q.dispatch();
            Ok(())
        })
    }

    /// Keeps the copy in the broker's timer queue for its delay tier, then
    /// puts it in this group's queue; the delivery is acked.
    async fn retry_after(self: Box<Self>, message: Message, delay: Duration) -> Result<()> {
        self.check_open()?;
        let Some(inner) = self.shared.broker.upgrade() else {
            return Err(BrokerError::Closed("memory broker"));
        };
        let broker = MemoryBroker { inner };
        if let Err(e) = broker.check_open().and(Tier::for_delay(delay)) {
            self.nack(true).await?;
            return Err(e);
        }
        let due = Instant::now() + Tier::for_delay(delay)?.map_or(Duration::ZERO, Tier::duration);
        broker.schedule(Destination::Group(self.shared.queue.clone()), message, due);
        self.ack().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returned_messages_come_back_in_publish_order_with_their_count() {
        let broker = MemoryBroker::new();
        let mut stream = broker
            .subscribe(Subscription::new("t", "g").with_prefetch(10))
            .await
            .unwrap();
        for i in 0..6 {
            broker
                .publish("t", Message::new(i.to_string()))
                .await
                .unwrap();
        }
        let mut held = Vec::new();
        for _ in 0..6 {
            held.push(stream.next().await.unwrap().unwrap());
        }
        // Ack the first, return 1..=3 in order (as the runtime does with
        // queued deliveries at shutdown), leave 4 and 5 to the closing stream.
        let mut held = held.into_iter();
        held.next().unwrap().ack().await.unwrap();
        for d in held.by_ref().take(3) {
            d.nack(true).await.unwrap();
        }
        let rest: Vec<Delivery> = held.collect();
        stream.close().await.unwrap();
        drop(rest);
        let mut again = broker
            .subscribe(Subscription::new("t", "g").with_prefetch(10))
            .await
            .unwrap();
        let mut seen = Vec::new();
        for _ in 0..5 {
            let d = again.next().await.unwrap().unwrap();
            seen.push((
                String::from_utf8(d.message().payload().to_vec()).unwrap(),
                d.received.attempt,
                d.received.redelivered,
            ));
            d.ack().await.unwrap();
        }
        // 1..=3 went back twice: by the nack, then (delivered again to the
        // open stream) by its close; 4 and 5 once, by the close.
        let expected: Vec<(String, u32, bool)> = (1..6)
            .map(|i| (i.to_string(), if i <= 3 { 3 } else { 2 }, true))
            .collect();
        assert_eq!(seen, expected);
    }

    async fn payloads(stream: &mut Box<dyn DeliveryStream>, n: usize) -> Vec<(String, Duration)> {
        let started = Instant::now();
        let mut out = Vec::new();
        for _ in 0..n {
            let d = stream.next().await.unwrap().unwrap();
            let payload = String::from_utf8(d.message().payload().to_vec()).unwrap();
            out.push((payload, started.elapsed()));
            d.ack().await.unwrap();
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn delayed_messages_wait_their_tier_and_leave_in_due_order() {
        let broker = MemoryBroker::new();
        let topic = "demo.delays.ordered";
        let mut stream = broker
            .subscribe(Subscription::new(topic, "g"))
            .await
            .unwrap();
        let publish = |payload: &'static str, ms: u64| {
            let broker = broker.clone();
            async move {
                broker
                    .publish_after(topic, Message::new(payload), Duration::from_millis(ms))
                    .await
                    .unwrap()
            }
        };
        publish("late", 4_000).await; // 5 s tier
        publish("first-1s", 300).await; // 1 s tier
        publish("second-1s", 1_000).await; // 1 s tier, after first-1s
        publish("now", 0).await;
        let got = payloads(&mut stream, 4).await;
        let order: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(order, ["now", "first-1s", "second-1s", "late"]);
        assert!(got[0].1 < Duration::from_millis(10));
        assert_eq!(got[1].1, Duration::from_secs(1));
        assert_eq!(got[3].1, Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_delayed_message_goes_to_the_groups_subscribed_when_it_is_due() {
        let broker = MemoryBroker::builder().retention(0).build();
        let topic = "demo.delays.late-group";
        broker
            .publish_after(topic, Message::new("m"), Duration::from_secs(5))
            .await
            .unwrap();
        // Subscribes after publishing, before it is due: still gets it.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut stream = broker
            .subscribe(Subscription::new(topic, "g"))
            .await
            .unwrap();
        let got = payloads(&mut stream, 1).await;
        assert_eq!(got[0].0, "m");
        assert_eq!(got[0].1, Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn refused_delays_send_nothing() {
        let broker = MemoryBroker::new();
        let topic = "demo.delays.refused";
        let mut stream = broker
            .subscribe(Subscription::new(topic, "g"))
            .await
            .unwrap();
        let too_long = crate::delay::MAX_DELAY + Duration::from_secs(1);
        let refused = broker
            .publish_after(topic, Message::new("x"), too_long)
            .await;
        assert!(matches!(refused, Err(BrokerError::DelayTooLong { .. })));
        broker.close().await.unwrap();
        let closed = broker
            .publish_after(topic, Message::new("y"), Duration::from_secs(1))
            .await;
        assert!(matches!(closed, Err(BrokerError::Closed(_))));
        let nothing = tokio::time::timeout(MAX_WAIT, stream.next()).await;
        assert!(nothing.is_err(), "nothing may arrive");
    }

    #[tokio::test(start_paused = true)]
    async fn the_delay_task_ends_with_the_broker() {
        let broker = MemoryBroker::new();
        broker
            .publish_after(
                "demo.delays.dropped",
                Message::new("x"),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        let task = lock(&broker.inner.delayed).task.take().unwrap();
        drop(broker);
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("the task ends once the broker is gone")
            .unwrap();
    }

    const MAX_WAIT: Duration = Duration::from_secs(25 * 3600);

    #[test]
    fn a_delivery_held_long_does_not_keep_the_settled_ones_after_it() {
        let pending = || Pending {
            message: Message::new("m"),
            returned: 0,
            seq: 0,
        };
        let mut unacked = Unacked::default();
        for tag in 0..100_000 {
            unacked.insert(tag, (pending(), 1));
            if tag > 0 {
                assert!(unacked.remove(&tag).is_some());
            }
        }
        assert!(unacked.slots.len() <= 2 * Unacked::SLACK);
        assert_eq!(unacked.iter().map(|(tag, _)| tag).collect::<Vec<_>>(), [0]);
        assert!(unacked.get(0).is_some());
        assert!(unacked.remove(&0).is_some());
        assert!(unacked.remove(&0).is_none(), "settled once");
        assert!(unacked.remove(&7).is_none(), "already settled");
        assert_eq!(unacked.iter().count(), 0);
    }
}
