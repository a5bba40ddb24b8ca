//! Publishing with confirms: one confirm channel per broker, pipelined.
//!
//! Sends are serialised (lapin numbers a publish and queues its frames in two
//! steps, so two tasks publishing at once could otherwise get each other's
//! confirms); confirms are awaited concurrently. A publish not confirmed
//! because the channel or connection went away is sent again on a new one.

use std::future::Future;
use std::task::Poll;

use broker_core::message::check_outgoing;
use broker_core::{batch_result, BrokerError, Message, Result};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use tokio::sync::{mpsc, oneshot, Mutex, RwLock};
use tracing::Instrument;

use crate::codec::{self, short};
use crate::{topology, Failure, Inner, BACKEND};

/// The publishing half of a broker.
#[derive(Default)]
pub(crate) struct PublisherState {
    /// True once closed. Publishes hold it shared, so `close` waits for them.
    closed: RwLock<bool>,
    channel: Mutex<Option<ConfirmChannel>>,
    /// Held while a message is numbered and queued for the wire.
    send: Mutex<()>,
}

#[derive(Clone)]
struct ConfirmChannel {
    channel: Channel,
    confirms: mpsc::UnboundedSender<Pending>,
}

/// A sent message waiting for its confirm, for the collector task.
struct Pending {
    confirm: PublisherConfirm,
    message_id: Option<String>,
    topic: String,
    reply: oneshot::Sender<lapin::Result<Outcome>>,
}

enum Outcome {
    Ack,
    Nack,
    Unroutable(String),
}

pub(crate) async fn publish(inner: &Inner, topic: &str, message: Message) -> Result<()> {
    let closed = inner.publisher.closed.read().await;
    if *closed {
        return Err(BrokerError::Closed("rabbitmq publisher"));
    }
    check_outgoing(topic, &message, inner.options.max_message_bytes)?;
    let props = codec::encode(&message)?;
    let span = tracing::debug_span!("publish", topic, message_id = message.id());
    async {
        let first = match confirm_channel(inner).await {
            Ok(ch) => match send(inner, &ch, topic, &message, props.clone()).await {
                Ok(confirmed) => confirmed.await,
                Err(f) => Err(f),
            },
            Err(f) => Err(f),
        };
        finish(inner, topic, &message, &props, first).await
    }
    .instrument(span)
    .await
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
        encoded.push(codec::encode(m)?);
    }
    // Everything goes on the wire in order first; then the confirms are awaited together.
    let channel = confirm_channel(inner).await;
    let mut confirms = Vec::with_capacity(messages.len());
    for (m, props) in messages.iter().zip(&encoded) {
        let sent = match &channel {
            Ok(ch) => send(inner, ch, topic, m, props.clone()).await,
            Err(Failure::Final(e)) => return Err(clone_error(e)),
            Err(Failure::Lost(e)) => Err(Failure::Lost(clone_error(e))),
        };
        confirms.push(sent);
    }
    let results = futures::future::join_all(confirms.into_iter().zip(&messages).zip(&encoded).map(
        |((sent, m), props)| async move {
            let first = match sent {
                Ok(confirmed) => confirmed.await,
                Err(f) => Err(f),
            };
            finish(inner, topic, m, props, first).await
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
/// again on a fresh channel under the reconnect policy.
async fn finish(
    inner: &Inner,
    topic: &str,
    message: &Message,
    props: &BasicProperties,
    first: Result<(), Failure>,
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
        let Some(delay) = delays.next() else {
            return Err(BrokerError::Unavailable {
                backend: BACKEND,
                attempts,
                source: Box::new(lost),
            });
        };
        tracing::warn!(topic, message_id = message.id(), error = %lost, ?delay, "publish not confirmed; sending again");
        tokio::time::sleep(delay).await;
        attempts += 1;
        outcome = match confirm_channel(inner).await {
            Ok(ch) => match send(inner, &ch, topic, message, props.clone()).await {
                Ok(confirmed) => confirmed.await,
                Err(f) => Err(f),
            },
            Err(f) => Err(f),
        };
    }
}

/// The confirm channel, opened (with `confirm.select` and the exchange
/// declared) when there is none or the last one was lost.
async fn confirm_channel(inner: &Inner) -> Result<ConfirmChannel, Failure> {
    let mut slot = inner.publisher.channel.lock().await;
    if let Some(ch) = slot.as_ref() {
        if ch.channel.status().connected() {
            return Ok(ch.clone());
        }
    }
    *slot = None;
    let channel = inner.channel().await?;
    inner
        .bounded(
            "confirm select",
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
    topology::declare_exchange(inner, &channel).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(collect(rx));
    let ch = ConfirmChannel {
        channel,
        confirms: tx,
    };
    *slot = Some(ch.clone());
    Ok(ch)
}

/// Puts one message on the wire (in call order) and returns the future of
/// its confirm.
async fn send<'a>(
    inner: &'a Inner,
    ch: &'a ConfirmChannel,
    topic: &'a str,
    message: &'a Message,
    props: BasicProperties,
) -> Result<impl Future<Output = Result<(), Failure>> + 'a, Failure> {
    let routing_key = short("topic", topic).map_err(Failure::Final)?;
    let exchange = ShortString::from(inner.options.exchange.as_str());
    let options = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
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
        let (reply, confirmed) = oneshot::channel();
        let pending = Pending {
            confirm,
            message_id: Some(message.id().to_owned()),
            topic: topic.to_owned(),
            reply,
        };
        if ch.confirms.send(pending).is_err() {
            return Err(Failure::Lost(BrokerError::backend(
                BACKEND,
                "confirm channel closed",
            )));
        }
        let after = inner.options.confirm_timeout;
        match tokio::time::timeout(after, confirmed).await {
            Err(_) => Err(Failure::Final(BrokerError::Timeout {
                operation: "publisher confirm",
                after,
            })),
            Ok(Err(_)) => Err(Failure::Lost(BrokerError::backend(
                BACKEND,
                "confirm channel closed",
            ))),
            // Any error of a sent message means its channel is gone: send again.
            Ok(Ok(Err(e))) => Err(Failure::Lost(
                crate::classify("publisher confirm", e).into_error(),
            )),
            Ok(Ok(Ok(Outcome::Ack))) => Ok(()),
            Ok(Ok(Ok(Outcome::Nack))) => Err(Failure::Final(BrokerError::Rejected {
                backend: BACKEND,
                reason: "the broker nacked the publish".into(),
            })),
            Ok(Ok(Ok(Outcome::Unroutable(text)))) => Err(Failure::Final(BrokerError::Rejected {
                backend: BACKEND,
                reason: format!(
                    "no queue is bound for topic `{topic}` ({text}); subscribe a consumer group first"
                ),
            })),
        }
    })
}

/// Resolves confirms for one channel.
///
/// lapin hands a returned (unroutable) message to whichever confirm of the
/// same acknowledgement batch it resolves first, not necessarily the
/// returned message's own. So confirms are settled in batches: everything
/// resolved together is looked at together, and returns are matched to
/// publishes by message id and topic.
async fn collect(mut incoming: mpsc::UnboundedReceiver<Pending>) {
    type Resolved = (Pending, lapin::Result<Confirmation>);
    let mut waiting = FuturesUnordered::new();
    let mut open = true;
    while open || !waiting.is_empty() {
        tokio::select! {
            p = incoming.recv(), if open => match p {
                Some(mut p) => waiting.push(async move {
                    let r = (&mut p.confirm).await;
                    (p, r)
                }),
                None => open = false,
            },
            Some(first) = waiting.next(), if !waiting.is_empty() => {
                let mut batch: Vec<Resolved> = vec![first];
                // lapin resolves one batch in a tight loop: let it finish.
                for _ in 0..2 {
                    while let Some(Some(r)) = waiting.next().now_or_never() {
                        batch.push(r);
                    }
                    tokio::task::yield_now().await;
                }
                settle(batch);
            }
        }
    }
}

fn settle(batch: Vec<(Pending, lapin::Result<Confirmation>)>) {
    let mut returned: Vec<(Option<String>, String, String)> = Vec::new();
    let mut outcomes = Vec::with_capacity(batch.len());
    for (pending, result) in batch {
        let result = result.map(|confirmation| {
            let (acked, message) = match confirmation {
                Confirmation::Ack(m) => (true, m),
                Confirmation::Nack(m) => (false, m),
                Confirmation::NotRequested => (true, None),
            };
            if let Some(m) = message {
                returned.push((
                    m.delivery
                        .properties
                        .message_id()
                        .as_ref()
                        .map(|s| s.to_string()),
                    m.delivery.routing_key.to_string(),
                    format!("{} {}", m.reply_code, m.reply_text),
                ));
            }
            acked
        });
        outcomes.push((pending, result));
    }
    for (pending, result) in outcomes {
        let outcome = result.map(|acked| {
            let mine = returned
                .iter()
                .position(|(id, topic, _)| *id == pending.message_id && *topic == pending.topic);
            match mine {
                Some(i) => Outcome::Unroutable(returned.swap_remove(i).2),
                None if acked => Outcome::Ack,
                None => Outcome::Nack,
            }
        });
        let _ = pending.reply.send(outcome);
    }
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
