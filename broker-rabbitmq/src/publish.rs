//! Publishing with confirms: one confirm channel per broker, pipelined.
//!
//! Sends are serialised (lapin numbers a publish and queues its frames in two
//! steps, so two tasks publishing at once could otherwise get each other's
//! confirms); each publishing future then awaits its own confirm, so many
//! are awaited at once without a task in between. A publish not confirmed
//! because the channel or connection went away is sent again on a new one.
//!
//! Before sending to a topic, [`prepare`] makes sure the topic's required
//! groups have their queues, or finds out (without `mandatory`: see the
//! crate documentation) whether any queue is bound for it, to count and
//! report what RabbitMQ drops.
//!
//! A delayed publish goes the same way, through the default exchange to
//! the topic's delay queue for its tier (declared before the first send on
//! each confirm channel), whose time-to-live and dead-letter settings send
//! it on to the topic when due (see `topology::declare_delay_queue`).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use broker_core::delay::Tier;
use broker_core::message::check_outgoing;
use broker_core::{batch_result, BrokerError, Message, Result};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use tokio::sync::{Mutex, RwLock};
use tracing::Instrument;

use crate::codec::{self, short};
use crate::{topology, Failure, Inner, BACKEND};

/// How long a topic seen with a bound queue is taken to still have one.
const BOUND_FOR: Duration = Duration::from_secs(30);
/// How long a topic seen without one is taken to still have none (bounds
/// the checks while publishing to it; a subscription of this broker ends it).
const UNBOUND_FOR: Duration = Duration::from_secs(1);
/// At most one warning per topic this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The publishing half of a broker.
#[derive(Default)]
pub(crate) struct PublisherState {
    /// True once closed. Publishes hold it shared, so `close` waits for them.
    closed: RwLock<bool>,
    channel: Mutex<Option<ConfirmChannel>>,
    /// Held while a message is numbered and queued for the wire.
    send: Mutex<()>,
    /// Confirm channels opened so far: required groups are declared again
    /// on each (the broker may have restarted or lost them).
    generation: AtomicU64,
    /// What is known of each topic's queues.
    routes: std::sync::Mutex<HashMap<String, TopicRoutes>>,
    /// Delay queues declared: on which confirm channel, when.
    delay_queues: std::sync::Mutex<HashMap<String, (u64, Instant)>>,
    /// The channel passive declarations use (RabbitMQ closes it on a miss).
    probe: Mutex<Option<Channel>>,
    unroutable: AtomicU64,
    /// The broker's largest message body (`max_message_size`), learned
    /// from its first refusal; 0 while unknown. Larger publishes then fail
    /// before anything is sent.
    broker_max: AtomicUsize,
}

#[derive(Default)]
struct TopicRoutes {
    /// Required groups' queues declared: on which confirm channel, when.
    declared: Option<(u64, Instant)>,
    /// Last check of the topic's marker queue: found or not, when.
    checked: Option<(bool, Instant)>,
    unroutable: u64,
    /// Unroutable messages not reported yet, and the last report.
    unreported: u64,
    warned: Option<Instant>,
}

#[derive(Clone)]
struct ConfirmChannel {
    channel: Channel,
    generation: u64,
    /// The connection it is on ([`Inner::epoch`]).
    epoch: u64,
}

/// A confirm awaited by the publishing future. If that future is dropped
/// first (the caller gave up), a task awaits it instead: lapin keeps a
/// dropped, unresolved confirm until `wait_for_confirms`, which nothing here
/// calls.
struct Awaited(Option<PublisherConfirm>);

impl Awaited {
    async fn confirmation(&mut self) -> lapin::Result<Confirmation> {
        let Some(confirm) = self.0.as_mut() else {
            return Err(lapin::ErrorKind::FutureCompleted.into());
        };
        let confirmation = confirm.await;
        self.0 = None;
        confirmation
    }
}

impl Drop for Awaited {
    fn drop(&mut self) {
        if let (Some(confirm), Ok(runtime)) = (self.0.take(), tokio::runtime::Handle::try_current())
        {
            runtime.spawn(async move {
                let _ = confirm.await;
            });
        }
    }
}

impl PublisherState {
    fn routes(&self) -> std::sync::MutexGuard<'_, HashMap<String, TopicRoutes>> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn delay_queues(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, Instant)>> {
        self.delay_queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn unroutable_total(&self) -> u64 {
        self.unroutable.load(Ordering::Relaxed)
    }

    /// The broker's message size limit, once a refusal told it.
    pub(crate) fn broker_max(&self) -> Option<usize> {
        Some(self.broker_max.load(Ordering::Relaxed)).filter(|&max| max > 0)
    }

    /// Fails a message whose body is above the broker's known limit.
    fn check_size(&self, message: &Message) -> Result<()> {
        match self.broker_max() {
            Some(max) if message.payload().len() > max => Err(BrokerError::MessageTooLarge {
                size: message.payload().len(),
                max,
            }),
            _ => Ok(()),
        }
    }

    pub(crate) fn unroutable_of(&self, topic: &str) -> u64 {
        self.routes().get(topic).map_or(0, |r| r.unroutable)
    }

    /// A subscription of this broker declared `topic`'s queues: it is routable.
    pub(crate) fn bound(&self, topic: &str) {
        self.routes().entry(topic.to_owned()).or_default().checked = Some((true, Instant::now()));
    }

    /// Counts `count` messages to `topic` that no queue takes, and warns
    /// (at most every [`WARN_EVERY`] per topic; never with payloads).
    fn dropped(&self, topic: &str, count: usize, exchange: &str) {
        let count = count as u64;
        self.unroutable.fetch_add(count, Ordering::Relaxed);
        let mut routes = self.routes();
        let route = routes.entry(topic.to_owned()).or_default();
        route.unroutable += count;
        route.unreported += count;
        let now = Instant::now();
        if route
            .warned
            .is_none_or(|at| now.duration_since(at) >= WARN_EVERY)
        {
            let messages = std::mem::take(&mut route.unreported);
            route.warned = Some(now);
            tracing::warn!(
                topic,
                exchange,
                messages,
                total = route.unroutable,
                "published to a topic no queue is bound for: RabbitMQ dropped the messages \
                 (no consumer group has subscribed yet); declare the groups that must receive \
                 them as required groups (RABBITMQ_REQUIRED_GROUPS) or set an alternate exchange"
            );
        }
    }
}

/// Gets `topic` ready for `count` messages on `ch`: declares its required
/// groups' queues, or checks whether any queue is bound for it and counts
/// the messages RabbitMQ will drop. A failed check is only logged.
async fn prepare(
    inner: &Inner,
    ch: &ConfirmChannel,
    topic: &str,
    count: usize,
) -> Result<(), Failure> {
    let state = &inner.publisher;
    let now = Instant::now();
    if !inner.options.required_groups.of(topic).is_empty() {
        return Box::pin(declare_required_groups(inner, ch, topic)).await;
    }
    if inner.options.alternate_exchange.is_some() {
        return Ok(());
    }
    let checked = state.routes().get(topic).and_then(|r| r.checked);
    let bound = match checked {
        Some((true, at)) if now.duration_since(at) < BOUND_FOR => true,
        Some((false, at)) if now.duration_since(at) < UNBOUND_FOR => false,
        _ => match Box::pin(probe(inner, topic)).await {
            Ok(bound) => {
                state.routes().entry(topic.to_owned()).or_default().checked =
                    Some((bound, Instant::now()));
                bound
            }
            Err(f) => {
                tracing::debug!(topic, error = %f, "could not check whether a queue is bound for the topic");
                true
            }
        },
    };
    if !bound {
        state.dropped(topic, count, &inner.options.exchange);
    }
    Ok(())
}

/// How long a declaration is taken to still hold: with a queue expiry,
/// redeclaring renews the queues' lease, so half of it.
fn fresh_for(inner: &Inner) -> Duration {
    inner
        .options
        .queue_expiry
        .map_or(Duration::MAX, |expiry| expiry / 2)
}

/// Declares the queues of `topic`'s required groups, unless done on this
/// confirm channel recently.
async fn declare_required_groups(
    inner: &Inner,
    ch: &ConfirmChannel,
    topic: &str,
) -> Result<(), Failure> {
    let state = &inner.publisher;
    let now = Instant::now();
    let declared = state.routes().get(topic).and_then(|r| r.declared);
    if declared.is_some_and(|(generation, at)| {
        generation == ch.generation && now.duration_since(at) < fresh_for(inner)
    }) {
        return Ok(());
    }
    // On a channel of their own: a refused declaration closes it.
    let channel = inner.channel().await?;
    let declared = topology::declare_required_groups(inner, &channel, topic).await;
    let _ = inner
        .bounded("channel close", channel.close(200, "declared".into()))
        .await;
    declared?;
    state.routes().entry(topic.to_owned()).or_default().declared = Some((ch.generation, now));
    Ok(())
}

/// Where a message goes: a topic now, or a delay queue that releases it
/// to the topic (or to one group's queue) when due.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Target<'a> {
    /// The topic, at once.
    Topic(&'a str),
    /// The topic's delay queue for `tier`; with a group, that group's
    /// delay queue, which releases into its queue alone (with no tier:
    /// straight into the group's queue). Never without both.
    Delayed {
        topic: &'a str,
        tier: Option<Tier>,
        group: Option<&'a str>,
    },
}

impl Target<'_> {
    fn topic(&self) -> &str {
        match self {
            Target::Topic(topic) | Target::Delayed { topic, .. } => topic,
        }
    }
}

/// Gets a delay queue ready: the topic's required groups' queues (so they
/// exist when the message falls due) and the delay queue itself, unless
/// declared on this confirm channel recently. Returns the queue's name.
/// Without a tier, the group's own queue, which its subscription declares.
async fn prepare_delayed(
    inner: &Inner,
    ch: &ConfirmChannel,
    topic: &str,
    tier: Option<Tier>,
    group: Option<&str>,
) -> Result<String, Failure> {
    let Some(tier) = tier else {
        let group = group.expect("a target without delay names a group");
        return Ok(topology::subscription_queue(topic, group));
    };
    let queue = match group {
        None => {
            if !inner.options.required_groups.of(topic).is_empty() {
                declare_required_groups(inner, ch, topic).await?;
            }
            topology::delay_queue(topic, tier)
        }
        Some(group) => topology::group_delay_queue(topic, group, tier),
    };
    let now = Instant::now();
    let declared = inner.publisher.delay_queues().get(&queue).copied();
    if declared.is_some_and(|(generation, at)| {
        generation == ch.generation && now.duration_since(at) < fresh_for(inner)
    }) {
        return Ok(queue);
    }
    // On a channel of its own: a refused declaration closes it.
    let channel = inner.channel().await?;
    let declared = match group {
        None => topology::declare_delay_queue(inner, &channel, topic, tier).await,
        Some(group) => {
            topology::declare_group_delay_queue(inner, &channel, topic, group, tier).await
        }
    };
    let _ = inner
        .bounded("channel close", channel.close(200, "declared".into()))
        .await;
    declared?;
    inner
        .publisher
        .delay_queues()
        .insert(queue.clone(), (ch.generation, now));
    Ok(queue)
}

/// Whether some group subscribed to `topic`: its dead-letter archive, which
/// every subscription declares (also older versions of this library),
/// exists. Queues bound by other means are not seen.
async fn probe(inner: &Inner, topic: &str) -> Result<bool, Failure> {
    let mut slot = inner.publisher.probe.lock().await;
    let channel = match slot.take() {
        Some(ch) if ch.status().connected() => ch,
        _ => inner.channel().await?,
    };
    let exists = topology::queue_exists(inner, &channel, &topology::marker_queue(topic)).await;
    if matches!(exists, Ok(true)) {
        *slot = Some(channel);
    }
    exists
}

/// One try of a publish: channel, preparation, send, confirm.
async fn attempt(
    inner: &Inner,
    target: Target<'_>,
    message: &Message,
    props: BasicProperties,
) -> Result<(), Failure> {
    let ch = confirm_channel(inner).await?;
    let result = attempt_on(inner, &ch, target, message, props).await;
    if let Err(why) = &result {
        forget_failed_channel(inner, ch.generation, why).await;
    }
    result
}

async fn attempt_on(
    inner: &Inner,
    ch: &ConfirmChannel,
    target: Target<'_>,
    message: &Message,
    props: BasicProperties,
) -> Result<(), Failure> {
    let confirmed = match target {
        Target::Topic(topic) => {
            prepare(inner, ch, topic, 1).await?;
            send(inner, ch, &inner.options.exchange, topic, message, props).await?
        }
        Target::Delayed { topic, tier, group } => {
            // Boxed: delayed publishes are the rarer kind, and the future of
            // every attempt would otherwise be as large as this one's.
            let queue = Box::pin(prepare_delayed(inner, ch, topic, tier, group)).await?;
            // The default exchange routes to the queue of that name.
            send(inner, ch, "", &queue, message, props).await?
        }
    };
    confirmed.await
}

pub(crate) async fn publish(inner: &Inner, topic: &str, message: Message) -> Result<()> {
    let closed = inner.publisher.closed.read().await;
    if *closed {
        return Err(BrokerError::Closed("rabbitmq publisher"));
    }
    check_outgoing(topic, &message, inner.options.max_message_bytes)?;
    inner.publisher.check_size(&message)?;
    let props = codec::encode(&message)?;
    let span = tracing::debug_span!("publish", topic, message_id = message.id());
    let deadline = tokio::time::Instant::now() + inner.options.confirm_timeout;
    let target = Target::Topic(topic);
    bounded_publish(inner, async {
        let first = attempt(inner, target, &message, props).await;
        finish(inner, target, &message, codec::encode, first, deadline).await
    })
    .instrument(span)
    .await
}

/// Publishes `message` to `topic`, or with `group` to that group's queue
/// alone, once `delay` (rounded up to its tier) has passed: into the delay
/// queue of the tier, confirmed like any publish. No delay: at once, to
/// the topic, or straight into the group's queue.
pub(crate) async fn publish_after(
    inner: &Inner,
    topic: &str,
    group: Option<&str>,
    message: Message,
    delay: Duration,
) -> Result<()> {
    let tier = Tier::for_delay(delay)?;
    if tier.is_none() && group.is_none() {
        return publish(inner, topic, message).await;
    }
    let closed = inner.publisher.closed.read().await;
    if *closed {
        return Err(BrokerError::Closed("rabbitmq publisher"));
    }
    check_outgoing(topic, &message, inner.options.max_message_bytes)?;
    if let Some(group) = group {
        if group.is_empty() {
            return Err(BrokerError::Misconfigured("consumer group name is empty"));
        }
    }
    inner.publisher.check_size(&message)?;
    let props = codec::encode_delayed(&message)?;
    let span = tracing::debug_span!(
        "publish",
        topic,
        message_id = message.id(),
        delay = tier.map_or("0", Tier::name),
        group = group.unwrap_or_default(),
    );
    let deadline = tokio::time::Instant::now() + inner.options.confirm_timeout;
    let target = Target::Delayed { topic, tier, group };
    bounded_publish(inner, async {
        let first = attempt(inner, target, &message, props).await;
        finish(
            inner,
            target,
            &message,
            codec::encode_delayed,
            first,
            deadline,
        )
        .await
    })
    .instrument(span)
    .await
}

/// A publish (or batch) returns within the confirm timeout from the call,
/// reconnects and re-sends included.
async fn bounded_publish(inner: &Inner, publish: impl Future<Output = Result<()>>) -> Result<()> {
    let after = inner.options.confirm_timeout;
    tokio::time::timeout(after, publish)
        .await
        .unwrap_or(Err(BrokerError::Timeout {
            operation: "publish",
            after,
        }))
}

pub(crate) async fn publish_batch(
    inner: &Inner,
    topic: &str,
    messages: Vec<Message>,
) -> Result<()> {
    let closed = inner.publisher.closed.read().await;
    if *closed {
        return Err(BrokerError::Closed("rabbitmq publisher"));
    }
    let mut encoded = Vec::with_capacity(messages.len());
    for m in &messages {
        check_outgoing(topic, m, inner.options.max_message_bytes)?;
        inner.publisher.check_size(m)?;
        encoded.push(codec::encode(m)?);
    }
    let deadline = tokio::time::Instant::now() + inner.options.confirm_timeout;
    bounded_publish(
        inner,
        send_batch(inner, topic, &messages, encoded, deadline),
    )
    .await
}

async fn send_batch(
    inner: &Inner,
    topic: &str,
    messages: &[Message],
    encoded: Vec<BasicProperties>,
    deadline: tokio::time::Instant,
) -> Result<()> {
    // Everything goes on the wire in order first; then the confirms are awaited together.
    let channel = match confirm_channel(inner).await {
        Ok(ch) => match prepare(inner, &ch, topic, messages.len()).await {
            Ok(()) => Ok(ch),
            Err(f) => Err(f),
        },
        Err(f) => Err(f),
    };
    let mut confirms = Vec::with_capacity(messages.len());
    for (m, props) in messages.iter().zip(encoded) {
        let sent = match &channel {
            Ok(ch) => send(inner, ch, &inner.options.exchange, topic, m, props).await,
            Err(Failure::Final(e)) => return Err(clone_error(e)),
            Err(Failure::Lost(e)) => Err(Failure::Lost(clone_error(e))),
        };
        confirms.push(sent);
    }
    let results = futures::future::join_all(confirms.into_iter().zip(messages).map(
        |(sent, m)| async move {
            let first = match sent {
                Ok(confirmed) => confirmed.await,
                Err(f) => Err(f),
            };
            finish(
                inner,
                Target::Topic(topic),
                m,
                codec::encode,
                first,
                deadline,
            )
            .await
        },
    ))
    .await;
    batch_result(results)
}

/// Keeps the gist of an error for messages that did not get their own try.
fn clone_error(e: &BrokerError) -> BrokerError {
    BrokerError::backend(BACKEND, e.to_string())
}

/// Settles a publish after its first attempt: done, failed for good, or sent
/// again on a fresh channel under the reconnect policy, with properties
/// from `encode` (as the first attempt's: made again only when needed, since
/// nearly every publish is confirmed at the first attempt).
async fn finish(
    inner: &Inner,
    target: Target<'_>,
    message: &Message,
    encode: fn(&Message) -> Result<BasicProperties>,
    first: Result<(), Failure>,
    deadline: tokio::time::Instant,
) -> Result<()> {
    let mut delays = inner.options.reconnect.delays();
    let mut attempts = 1usize;
    let mut outcome = first;
    loop {
        let lost = match outcome {
            Ok(()) => return Ok(()),
            Err(Failure::Final(e)) => return Err(e),
            Err(Failure::Lost(e)) => e,
        };
        // No wait that would end past the publish's bound.
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(delay) = delays.next().filter(|d| *d < left) else {
            return Err(BrokerError::Unavailable {
                backend: BACKEND,
                attempts,
                source: Box::new(lost),
            });
        };
        if let Some(suppressed) = crate::logs::allow(&format!("publish not confirmed: {lost}")) {
            let topic = target.topic();
            tracing::warn!(topic, message_id = message.id(), error = %lost, ?delay, suppressed, "publish not confirmed; sending again");
        }
        tokio::time::sleep(delay).await;
        attempts += 1;
        // Boxed, as the other rare paths: the future of every publish holds
        // what it does not box, and is moved at least once.
        outcome = Box::pin(attempt(inner, target, message, encode(message)?)).await;
    }
}

/// Drops the confirm channel `failed` after a publish on it was lost or
/// nacked, unless it was replaced already: lapin can leave a channel of a
/// dead connection looking connected, and RabbitMQ 3.10 can go on nacking
/// every publish of a channel that opened while its quorum queue was
/// electing a leader (seen in the cluster tests; a new channel's publishes
/// are confirmed). Re-sends then go to a new channel.
async fn forget_failed_channel(inner: &Inner, failed: u64, why: &Failure) {
    if matches!(why, Failure::Final(_)) {
        return;
    }
    let mut slot = inner.publisher.channel.lock().await;
    if slot.as_ref().is_some_and(|ch| ch.generation == failed) {
        if let Some(ch) = slot.take() {
            // Closed once the publishes still in flight on it had their
            // bound (closing it now would fail their confirms and have them
            // sent again); best effort: it may be dead already.
            let after = inner.options.confirm_timeout;
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let closing = ch.channel.close(200, "publish lost".into());
                let _ = tokio::time::timeout(Duration::from_secs(1), closing).await;
            });
        }
    }
}

/// The confirm channel, opened (with `confirm.select` and the exchange
/// declared) when there is none or the last one was lost.
async fn confirm_channel(inner: &Inner) -> Result<ConfirmChannel, Failure> {
    let mut slot = inner.publisher.channel.lock().await;
    if let Some(ch) = slot.as_ref() {
        // A channel of an earlier connection can still look connected.
        if ch.channel.status().connected() && ch.epoch == inner.epoch() {
            return Ok(ch.clone());
        }
    }
    Box::pin(open_confirm_channel(inner, &mut slot)).await
}

/// Opens the confirm channel into `slot` (held locked by the caller).
async fn open_confirm_channel(
    inner: &Inner,
    slot: &mut Option<ConfirmChannel>,
) -> Result<ConfirmChannel, Failure> {
    *slot = None;
    let channel = inner.channel().await?;
    let epoch = inner.epoch();
    inner
        .bounded(
            "confirm select",
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
    topology::declare_exchange(inner, &channel).await?;
    let ch = ConfirmChannel {
        channel,
        generation: inner.publisher.generation.fetch_add(1, Ordering::Relaxed) + 1,
        epoch,
    };
    *slot = Some(ch.clone());
    Ok(ch)
}

/// Puts one message on the wire (in call order), to `exchange` with
/// `routing_key` (a topic on the topic exchange, or a delay queue's name on
/// the default exchange `""`), and returns the future of its confirm.
async fn send<'a>(
    inner: &'a Inner,
    ch: &'a ConfirmChannel,
    exchange: &str,
    routing_key: &str,
    message: &'a Message,
    props: BasicProperties,
) -> Result<impl Future<Output = Result<(), Failure>> + 'a, Failure> {
    let what = match exchange {
        "" => "queue name",
        _ => "topic",
    };
    let routing_key = short(what, routing_key).map_err(Failure::Final)?;
    let exchange = ShortString::from(exchange);
    // Not `mandatory`: lapin would log a returned message with its payload.
    let options = BasicPublishOptions::default();
    let guard = inner.publisher.send.lock().await;
    let mut publishing = Box::pin(ch.channel.basic_publish(
        exchange,
        routing_key,
        options,
        message.payload(),
        props,
    ));
    // The first poll numbers the message and queues its frames; the rest
    // (waiting for the write) need not hold up the next sender.
    let first = futures::poll!(publishing.as_mut());
    drop(guard);
    Ok(async move {
        let confirm = match first {
            Poll::Ready(r) => r.map_err(|e| crate::classify("publish", e))?,
            Poll::Pending => inner.bounded("publish", publishing).await?,
        };
        // No timer of its own: every caller runs inside `bounded_publish`,
        // whose bound (the confirm timeout from the call) ends first.
        let mut confirm = Awaited(Some(confirm));
        match confirm.confirmation().await {
            // Any error of a sent message means its channel is gone: send
            // again, unless the broker refused this message for good.
            Err(e) => Err(refusal(inner, message, e)),
            // Nothing is published with `mandatory`, so nothing comes back.
            Ok(Confirmation::Ack(_) | Confirmation::NotRequested) => Ok(()),
            // A nack says the broker did not take the message (a quorum
            // queue does so while it has no leader, say during a node's
            // failure), so sending it again cannot duplicate it: sent again
            // within the publish's bound, as a loss is.
            Ok(Confirmation::Nack(_)) => Err(Failure::Lost(BrokerError::Rejected {
                backend: BACKEND,
                reason: "the broker nacked the publish".into(),
            })),
        }
    })
}

/// Sorts the error that ended a sent message's channel. RabbitMQ closes
/// the channel for one message it refuses, and every message in flight on
/// it gets the same error: a size refusal (`PRECONDITION_FAILED - message
/// size N is larger than configured max size M`) is final only for messages
/// above the limit, which is remembered so later ones fail before sending;
/// the others are sent again. Other refusals (access refused, another
/// precondition) cannot succeed on retry and are final.
fn refusal(inner: &Inner, message: &Message, e: lapin::Error) -> Failure {
    if let Some(max) = size_limit(&e) {
        inner.publisher.broker_max.store(max, Ordering::Relaxed);
        let size = message.payload().len();
        return if size > max {
            Failure::Final(BrokerError::MessageTooLarge { size, max })
        } else {
            Failure::Lost(BrokerError::backend(
                BACKEND,
                format!("publish: channel closed for another message: {e}"),
            ))
        };
    }
    crate::classify("publish", e)
}

/// The broker's limit from a size refusal.
fn size_limit(e: &lapin::Error) -> Option<usize> {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    let lapin::ErrorKind::ProtocolError(amqp) = e.kind() else {
        return None;
    };
    if !matches!(
        amqp.kind(),
        AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
    ) {
        return None;
    }
    let text = amqp.get_message().as_str();
    let (_, max) = text.split_once("larger than configured max size ")?;
    max.trim_end_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .ok()
}

/// Waits for publishes in flight, then refuses new ones and closes the channel.
pub(crate) async fn close(inner: &Inner) -> Result<()> {
    let mut closed = inner.publisher.closed.write().await;
    *closed = true;
    if let Some(ch) = inner.publisher.channel.lock().await.take() {
        if let Err(f) = inner
            .bounded("channel close", ch.channel.close(200, "closed".into()))
            .await
        {
            tracing::debug!(error = %f.into_error(), "closing the confirm channel");
        }
    }
    Ok(())
}
