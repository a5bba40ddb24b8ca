//! Subscriptions: a channel with a consumer on the group's queue, kept alive
//! by a task that reconnects and resumes when the channel is lost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use broker_core::topic::validate_topic;
use broker_core::{
    Acker, BrokerError, Delivery, DeliveryStream, Message, Received, Result, Subscription,
};
use futures::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Consumer};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::codec::{self, short};
use crate::settle::{Acked, FlushTimer, Settler};
use crate::{publish, topology, Failure, Inner, BACKEND};

/// How long `close` waits for the consumer to be cancelled and its channel closed.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

pub(crate) async fn subscribe(
    inner: Arc<Inner>,
    subscription: Subscription,
) -> Result<Box<dyn DeliveryStream>> {
    validate_topic(&subscription.topic)?;
    if subscription.group.is_empty() {
        return Err(BrokerError::Misconfigured("consumer group name is empty"));
    }
    let queue = topology::subscription_queue(&subscription.topic, &subscription.group);
    short("queue name (topic and group)", &queue)?;
    // Opened here, not in the task, so the caller sees setup errors and
    // messages published after `subscribe` returns reach the queue.
    let live = open_with_retry(&inner, &subscription).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = oneshot::channel();
    let closed = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(pump(
        inner,
        subscription.clone(),
        live,
        tx,
        stop_rx,
        closed.clone(),
    ));
    Ok(Box::new(RabbitStream {
        deliveries: rx,
        stop: Some(stop_tx),
        task: Some(task),
        closed,
    }))
}

/// A channel consuming the group's queue.
struct Live {
    channel: Channel,
    consumer: Consumer,
    queue: String,
    /// Still at prefetch 1 (see [`open`]).
    cautious: bool,
    /// Settles the channel's deliveries, acks coalesced.
    settler: Arc<Settler>,
    _flush_timer: FlushTimer,
}

async fn open(inner: &Inner, sub: &Subscription) -> Result<Live, Failure> {
    let channel = inner.channel().await?;
    let opened = async {
        let queue = topology::declare_subscription(inner, &channel, &sub.topic, &sub.group).await?;
        inner.publisher.bound(&sub.topic);
        // Cautious start (asked for by the consumer runtime): one message
        // at a time until the first delivery that is not a redelivery. What a crashed consumer left behind
        // comes first; handled alone, a message that crashes the process
        // again is the only one the queue counts another delivery for,
        // instead of every prefetched neighbour (see `earlier_deliveries`).
        let first_prefetch = match sub.isolate_redeliveries {
            true => 1,
            false => sub.prefetch,
        };
        let consumer = consume(inner, &channel, &queue, first_prefetch).await?;
        Ok((queue, consumer))
    };
    match opened.await {
        Ok((queue, consumer)) => {
            let (settler, flush_timer) = Settler::new(channel.clone(), sub.prefetch);
            Ok(Live {
                channel,
                consumer,
                queue,
                cautious: sub.isolate_redeliveries,
                settler,
                _flush_timer: flush_timer,
            })
        }
        Err(f) => {
            // Do not leave a half-set-up channel open.
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                channel.close(200, "setup failed".into()),
            )
            .await;
            Err(f)
        }
    }
}

/// Starts a consumer of `queue` on `channel` holding at most `prefetch`
/// unacknowledged deliveries.
async fn consume(
    inner: &Inner,
    channel: &Channel,
    queue: &str,
    prefetch: usize,
) -> Result<Consumer, Failure> {
    let prefetch = u16::try_from(prefetch.max(1)).unwrap_or(u16::MAX);
    inner
        .bounded(
            "basic qos",
            channel.basic_qos(prefetch, BasicQosOptions::default()),
        )
        .await?;
    let tag = ShortString::from(format!("broker-{}", uuid::Uuid::new_v4().simple()));
    inner
        .bounded(
            "basic consume",
            channel.basic_consume(
                short("queue name", queue).map_err(Failure::Final)?,
                tag,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await
}

/// Ends the cautious start: a consumer with the rest of the subscription's
/// prefetch replaces the one at prefetch 1 (quorum queues keep a
/// consumer's prefetch from its start, so raising it needs a new
/// consumer). The delivery the old consumer holds stays on the channel, to
/// be settled; as prefetch is per consumer, the new one gets one less, so
/// the channel never holds more than the subscription's prefetch.
async fn full_prefetch(inner: &Inner, live: &mut Live, prefetch: usize) -> Result<(), Failure> {
    if prefetch <= 1 {
        return Ok(());
    }
    let consumer = consume(inner, &live.channel, &live.queue, prefetch - 1).await?;
    let old = std::mem::replace(&mut live.consumer, consumer);
    inner
        .bounded(
            "basic cancel",
            live.channel
                .basic_cancel(old.tag(), BasicCancelOptions::default()),
        )
        .await
}

/// Opens the subscription, retrying losses with the reconnect policy.
async fn open_with_retry(inner: &Inner, sub: &Subscription) -> Result<Live> {
    crate::retry_lost(inner, "subscribe", || open(inner, sub)).await
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Lost(e) | Failure::Final(e) => e.fmt(f),
        }
    }
}

/// Moves deliveries from the consumer to the stream; on loss, reopens.
async fn pump(
    inner: Arc<Inner>,
    sub: Subscription,
    mut live: Live,
    tx: mpsc::UnboundedSender<Result<Delivery>>,
    mut stop: oneshot::Receiver<()>,
    closed: Arc<AtomicBool>,
) {
    let origin = Origin {
        inner: inner.clone(),
        topic: sub.topic.as_str().into(),
        group: sub.group.as_str().into(),
    };
    loop {
        let lost = loop {
            tokio::select! {
                _ = &mut stop => return cancel(&inner, live).await,
                _ = tx.closed() => return cancel(&inner, live).await,
                next = live.consumer.next() => match next {
                    Some(Ok(d)) => {
                        if live.cautious && codec::earlier_deliveries(&d.properties, d.redelivered) == 0 {
                            live.cautious = false;
                            if let Err(f) = full_prefetch(&inner, &mut live, sub.prefetch).await {
                                break f.to_string();
                            }
                        }
                        let delivery = to_delivery(&origin, d, &live.settler, &closed);
                        if tx.send(Ok(delivery)).is_err() {
                            return cancel(&inner, live).await;
                        }
                    }
                    Some(Err(e)) => break e.to_string(),
                    None => break "consumer cancelled".to_owned(),
                },
            }
        };
        tracing::warn!(topic = %sub.topic, group = %sub.group, reason = %lost, "RabbitMQ subscription lost; resubscribing");
        // The stream's owner may stop us while we reconnect.
        let reopened = tokio::select! {
            _ = &mut stop => return,
            _ = tx.closed() => return,
            r = resubscribe(&inner, &sub) => r,
        };
        match reopened {
            Ok(l) => {
                tracing::info!(topic = %sub.topic, group = %sub.group, node = inner.connected_node().unwrap_or_default(), "RabbitMQ subscription resumed");
                live = l;
            }
            Err(BrokerError::Closed(_)) => return, // shut down on purpose: the stream just ends
            Err(e) => {
                tracing::error!(topic = %sub.topic, group = %sub.group, error = %e, "RabbitMQ subscription gave up: its consumer stops");
                let _ = tx.send(Err(e));
                return;
            }
        }
    }
}

/// Opens the subscription again after a loss: rounds of
/// [`open_with_retry`] (each under the reconnect policy), with the
/// resubscribe policy's waits between them, for as long as the broker is
/// unreachable (by default forever: an outage pauses a subscription, never
/// ends it). An error that is not an outage (a refusal, a shutdown) ends
/// it at once, as does a bounded resubscribe policy that runs out.
async fn resubscribe(inner: &Inner, sub: &Subscription) -> Result<Live> {
    let policy = &inner.options.resubscribe;
    let started = tokio::time::Instant::now();
    let mut delays = policy.delays();
    loop {
        let e = match open_with_retry(inner, sub).await {
            Ok(live) => return Ok(live),
            Err(e) if !e.is_transient() => return Err(e),
            Err(e) => e,
        };
        let next = delays
            .next()
            .filter(|d| policy.time_left(started).is_none_or(|left| *d < left));
        let Some(delay) = next else {
            return Err(e);
        };
        if let Some(suppressed) = crate::logs::allow("resubscribe") {
            tracing::warn!(topic = %sub.topic, group = %sub.group, error = %e, ?delay, suppressed, "RabbitMQ unreachable; the subscription waits and tries again");
        }
        tokio::time::sleep(delay).await;
    }
}

/// Cancels the consumer and closes its channel: RabbitMQ requeues what was
/// delivered and not acked.
async fn cancel(inner: &Inner, live: Live) {
    // Held-back acks first: what was handled must not come again.
    if let Err(f) = inner.bounded("basic ack", live.settler.flush()).await {
        tracing::debug!(error = %f, "sending held-back acks");
    }
    let tag = live.consumer.tag();
    if let Err(f) = inner
        .bounded(
            "basic cancel",
            live.channel
                .basic_cancel(tag, BasicCancelOptions::default()),
        )
        .await
    {
        tracing::debug!(error = %f, "cancelling consumer");
    }
    if let Err(f) = inner
        .bounded("channel close", live.channel.close(200, "closed".into()))
        .await
    {
        tracing::debug!(error = %f, "closing consumer channel");
    }
}

/// Where a subscription's deliveries come from: what their ackers need to
/// send a delayed retry back to the group.
#[derive(Clone)]
struct Origin {
    inner: Arc<Inner>,
    topic: Arc<str>,
    group: Arc<str>,
}

fn to_delivery(
    origin: &Origin,
    d: lapin::message::Delivery,
    settler: &Arc<Settler>,
    closed: &Arc<AtomicBool>,
) -> Delivery {
    let earlier = codec::earlier_deliveries(&d.properties, d.redelivered);
    settler.delivered(d.delivery_tag);
    let message = codec::decode(&d.properties, d.data);
    Delivery::new(
        Received {
            message,
            topic: origin.topic.clone(),
            redelivered: d.redelivered,
            partition: None,
            offset: None,
            attempt: earlier.saturating_add(1),
        },
        Box::new(RabbitAcker {
            tag: d.delivery_tag,
            settler: settler.clone(),
            settled: false,
            timeout: origin.inner.options.operation_timeout,
            closed: closed.clone(),
            origin: origin.clone(),
        }),
    )
}

struct RabbitStream {
    deliveries: mpsc::UnboundedReceiver<Result<Delivery>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    /// Set when the stream closes or goes: its deliveries can no longer be
    /// settled (RabbitMQ requeues them with the channel).
    closed: Arc<AtomicBool>,
}

impl Drop for RabbitStream {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
    }
}

#[async_trait]
impl DeliveryStream for RabbitStream {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        // Cancel-safe: a message is only taken out of the queue when returned.
        self.deliveries.recv().await
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Deliveries queued here but not taken are requeued with the channel.
        self.deliveries.close();
        if let Some(task) = self.task.take() {
            if tokio::time::timeout(CLOSE_WAIT, task).await.is_err() {
                return Err(BrokerError::Timeout {
                    operation: "subscription close",
                    after: CLOSE_WAIT,
                });
            }
        }
        Ok(())
    }
}

struct RabbitAcker {
    tag: u64,
    settler: Arc<Settler>,
    /// Set once acked or nacked: dropping it unsettled returns it to the queue.
    settled: bool,
    timeout: Duration,
    closed: Arc<AtomicBool>,
    origin: Origin,
}

impl Drop for RabbitAcker {
    fn drop(&mut self) {
        if !self.settled && !self.closed.load(Ordering::Acquire) {
            self.settler.abandon(self.tag);
        }
    }
}

impl RabbitAcker {
    /// Fails when the delivery can no longer be settled; marks it settled.
    fn settling(&mut self) -> Result<()> {
        self.settled = true;
        if self.closed.load(Ordering::Acquire) {
            // Its channel is closed or closing: RabbitMQ requeues it.
            return Err(BrokerError::Closed("rabbitmq subscription"));
        }
        if !self.settler.usable() {
            // The channel it came on is gone; RabbitMQ redelivers it.
            return Err(BrokerError::Closed("rabbitmq channel of this delivery"));
        }
        Ok(())
    }

    async fn send(
        &self,
        operation: &'static str,
        done: impl std::future::Future<Output = lapin::Result<()>>,
    ) -> Result<()> {
        match tokio::time::timeout(self.timeout, done).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(BrokerError::backend(BACKEND, e.to_string())),
            Err(_) => Err(BrokerError::Timeout {
                operation,
                after: self.timeout,
            }),
        }
    }
}

#[async_trait]
impl Acker for RabbitAcker {
    /// Held back and sent with a multiple ack (see [`crate::settle`]).
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.settling()?;
        match self.settler.ack(self.tag) {
            Acked::Held => Ok(()),
            Acked::Flush => self.send("ack", self.settler.flush()).await,
        }
    }

    async fn nack(mut self: Box<Self>, requeue: bool) -> Result<()> {
        self.settling()?;
        self.send("nack", self.settler.nack(self.tag, requeue))
            .await
    }

    /// Publishes the copy, with a confirm, to the group's delay queue of
    /// the tier (`{topic}.delay.{tier}@{group}`, dead-lettered into the
    /// group's queue when due), then acks the delivery.
    async fn retry_after(self: Box<Self>, message: Message, delay: Duration) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(BrokerError::Closed("rabbitmq subscription"));
        }
        let origin = self.origin.clone();
        match publish::publish_after(
            &origin.inner,
            &origin.topic,
            Some(&origin.group),
            message,
            delay,
        )
        .await
        {
            Ok(()) => self.ack().await,
            Err(e) => {
                self.nack(true).await?;
                Err(e)
            }
        }
    }
}
