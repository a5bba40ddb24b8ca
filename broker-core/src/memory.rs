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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use crate::combining::{Apply, Combining};
use crate::delivery::{Acker, Delivery, DeliveryStream, Received};
use crate::error::{BrokerError, Result};
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

struct Inner {
    topics: Mutex<HashMap<String, Topic>>,
    closed: AtomicBool,
    max_message_bytes: usize,
    retention: usize,
    next_stream_id: AtomicU64,
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
    ready: VecDeque<Pending>,
    /// Delivered to a member and not settled, by tag, with the member's id.
    unacked: BTreeMap<u64, (Pending, u64)>,
    members: Vec<Member>,
    next_member: usize,
    next_tag: u64,
    /// Bumped whenever an inbox gains or loses messages other than by its
    /// own member's `next`: only then are members woken.
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
            self.ready.push_front(pending);
        }
        Ok(())
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
            member.inbox.push_back(tag);
            self.unacked.insert(tag, (pending, member.id));
            self.changes += 1;
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
            .map(|(tag, _)| *tag)
            .collect();
        for tag in held.into_iter().rev() {
            if let Some((mut pending, _)) = self.unacked.remove(&tag) {
                pending.returned += 1;
                self.ready.push_front(pending);
            }
        }
        self.dispatch();
    }
}

impl Apply<u64> for QueueState {
    /// Acks: the holders get room again.
    fn apply(&mut self, tags: Vec<u64>) {
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

    fn topics(&self) -> MutexGuard<'_, HashMap<String, Topic>> {
        lock(&self.inner.topics)
    }

    fn check_open(&self) -> Result<()> {
        match self.inner.closed.load(Ordering::Acquire) {
            true => Err(BrokerError::Closed("memory publisher")),
            false => Ok(()),
        }
    }

    fn append(&self, topics: &mut HashMap<String, Topic>, topic: &str, message: Message) {
        // Looked up first: a new String per publish only for a new topic.
        if !topics.contains_key(topic) {
            topics.insert(topic.to_owned(), Topic::default());
        }
        let t = topics.get_mut(topic).expect("just ensured");
        for queue in t.groups.values() {
            queue.update(|q| {
                q.ready.push_back(Pending {
                    message: message.clone(),
                    returned: 0,
                });
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

// A poisoned lock only means another task panicked mid-update of plain
// collections; the data is still consistent enough to keep serving.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[async_trait]
impl Publisher for MemoryBroker {
    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        self.check_open()?;
        check_outgoing(topic, &message, self.inner.max_message_bytes)?;
        self.append(&mut self.topics(), topic, message);
        Ok(())
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        self.check_open()?;
        for m in &messages {
            check_outgoing(topic, m, self.inner.max_message_bytes)?;
        }
        let mut topics = self.topics();
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
                    queue.state.lock().ready = retained
                        .iter()
                        .map(|m| Pending {
                            message: m.clone(),
                            returned: 0,
                        })
                        .collect();
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
            queue,
            topic: subscription.topic.into(),
            id,
            taken: VecDeque::new(),
            closed: Arc::default(),
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
    queue: Arc<GroupQueue>,
    topic: Arc<str>,
    id: u64,
    /// Messages taken from this member's inbox, not yet returned by `next`
    /// (still held by the member: its removal requeues them).
    taken: VecDeque<(u64, Pending)>,
    /// Set when the stream goes: its deliveries can no longer be settled.
    closed: Arc<AtomicBool>,
}

impl MemoryStream {
    /// Takes the next message pushed to this member: the whole inbox at
    /// once, so the queue's lock is taken once per run, not per message.
    fn try_take(&mut self) -> Option<Delivery> {
        if self.taken.is_empty() {
            let (id, taken) = (self.id, &mut self.taken);
            self.queue.update(|state| {
                let Some(member) = state.members.iter_mut().find(|m| m.id == id) else {
                    return;
                };
                let unacked = &state.unacked;
                taken.extend(
                    member
                        .inbox
                        .drain(..)
                        .map(|tag| (tag, unacked[&tag].0.clone())),
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
                queue: self.queue.clone(),
                tag,
                closed: self.closed.clone(),
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
            let queue = self.queue.clone();
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
        self.closed.store(true, Ordering::Release);
        self.queue.update(|q| q.remove_member(self.id));
    }
}

struct MemoryAcker {
    queue: Arc<GroupQueue>,
    tag: u64,
    closed: Arc<AtomicBool>,
}

impl MemoryAcker {
    fn check_open(&self) -> Result<()> {
        match self.closed.load(Ordering::Acquire) {
            true => Err(BrokerError::Closed("memory subscription")),
            false => Ok(()),
        }
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.check_open()?;
        self.queue.state.update(self.tag);
        Ok(())
    }
    async fn nack(self: Box<Self>, requeue: bool) -> Result<()> {
        self.check_open()?;
        self.queue.update(|q| {
            q.release(self.tag, requeue)?;
            q.dispatch();
            Ok(())
        })
    }
}
