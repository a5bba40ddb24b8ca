//! Settling deliveries: acks of one channel coalesced into `basic.ack`
//! with `multiple`.
//!
//! Every ack is a command to the queue (for a quorum queue, one Raft
//! entry): acking one delivery at a time halves what a consumer can take.
//! A [`Settler`] tracks its channel's deliveries in delivery-tag order and
//! acks the settled prefix in one frame when it holds half the prefetch,
//! when nothing else on the channel is in flight, or [`ACK_FLUSH_AFTER`] after
//! the first ack it holds back; closing the subscription sends what is
//! held. A held-back ack is not lost to the broker if the channel goes
//! first: the delivery comes again (at least once, as after any loss).
//!
//! Order on the wire is what keeps this correct: `ack(tag, multiple)`
//! acknowledges every unacknowledged delivery up to `tag`, so a nack must
//! reach the broker before any multiple ack that covers its tag, and a
//! delivery still being handled must never be covered. Frames are sent
//! under one lock ([`Settler::sending`]), a nack removes its tag from the
//! open ones only while it holds that lock, and only tags of the settled
//! prefix are acked. A delivery dropped unsettled (its handling abandoned)
//! is nacked back to the queue, since leaving it unacknowledged would let
//! a later multiple ack cover it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::Channel;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Longest an ack is held back while other deliveries of its channel are
/// in flight, before it goes out with them as one multiple ack.
pub const ACK_FLUSH_AFTER: Duration = Duration::from_millis(2);

/// The deliveries of one channel and the acks held back for them.
pub(crate) struct Settler {
    channel: Channel,
    /// Held-back acks that are sent at once.
    flush_at: usize,
    state: Mutex<Tags>,
    /// Frames go out one at a time, in the order decided (see the module docs).
    sending: tokio::sync::Mutex<()>,
    /// Wakes the flush timer: acks are held back.
    held: Arc<Notify>,
}

/// Delivery tags of one channel, in order.
#[derive(Default)]
struct Tags {
    /// Delivered and not settled, oldest first, with whether acked since.
    open: VecDeque<(u64, bool)>,
    /// The highest acked tag of the settled prefix whose ack is not sent.
    unsent: Option<u64>,
    /// How many acks `unsent` stands for.
    unsent_count: usize,
}

impl Tags {
    /// Moves the settled head of `open` into `unsent`.
    fn advance(&mut self) {
        while let Some(&(tag, true)) = self.open.front() {
            self.open.pop_front();
            self.unsent = Some(tag);
            self.unsent_count += 1;
        }
    }

    fn position(&self, tag: u64) -> Option<usize> {
        self.open.binary_search_by_key(&tag, |&(t, _)| t).ok()
    }
}

/// Whether an ack went out with this call or is held back.
pub(crate) enum Acked {
    /// Held back: it goes out with a later multiple ack.
    Held,
    /// This call sends the held-back acks (its own included).
    Flush,
}

impl Settler {
    /// A settler of `channel`, sending acks in runs of about half the
    /// channel's `prefetch`, and its flush timer (stopped when dropped).
    pub(crate) fn new(channel: Channel, prefetch: usize) -> (Arc<Self>, FlushTimer) {
        let settler = Arc::new(Settler {
            channel,
            flush_at: (prefetch / 2).max(1),
            state: Mutex::default(),
            sending: tokio::sync::Mutex::new(()),
            held: Arc::new(Notify::new()),
        });
        let timer = tokio::spawn(flush_when_due(
            Arc::downgrade(&settler),
            settler.held.clone(),
        ));
        (settler, FlushTimer(timer))
    }

    fn tags(&self) -> MutexGuard<'_, Tags> {
        // A panic elsewhere cannot leave `Tags` half-updated.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the channel can still carry frames.
    pub(crate) fn usable(&self) -> bool {
        self.channel.status().connected()
    }

    /// Records a delivery (tags grow on a channel).
    pub(crate) fn delivered(&self, tag: u64) {
        self.tags().open.push_back((tag, false));
    }

    /// Marks `tag` acked; says whether the caller must now [`Settler::flush`].
    pub(crate) fn ack(&self, tag: u64) -> Acked {
        let mut tags = self.tags();
        let Some(i) = tags.position(tag) else {
            // Not of this channel's open deliveries: settled already.
            return Acked::Held;
        };
        tags.open[i].1 = true;
        let was_held = tags.unsent.is_some();
        tags.advance();
        if tags.unsent.is_none() {
            return Acked::Held;
        }
        // Armed even when this call flushes: if its caller gives up before
        // sending, the timer still does within ACK_FLUSH_AFTER.
        if !was_held {
            self.held.notify_one();
        }
        // Nothing else in flight: nobody would ack soon, and the broker
        // may be waiting for room to deliver more.
        if tags.unsent_count >= self.flush_at || tags.open.is_empty() {
            return Acked::Flush;
        }
        Acked::Held
    }

    /// Sends the held-back acks as one multiple ack.
    pub(crate) async fn flush(&self) -> lapin::Result<()> {
        let _sending = self.sending.lock().await;
        self.send_held().await
    }

    /// Sends the held-back acks; the caller holds `sending`.
    async fn send_held(&self) -> lapin::Result<()> {
        let upto = {
            let mut tags = self.tags();
            tags.unsent_count = 0;
            tags.unsent.take()
        };
        match upto {
            Some(tag) => {
                self.channel
                    .basic_ack(tag, BasicAckOptions { multiple: true })
                    .await
            }
            None => Ok(()),
        }
    }

    /// Nacks `tag` (requeued or dead-lettered by the queue).
    pub(crate) async fn nack(&self, tag: u64, requeue: bool) -> lapin::Result<()> {
        let _sending = self.sending.lock().await;
        {
            let mut tags = self.tags();
            let Some(i) = tags.position(tag) else {
                return Ok(()); // settled already
            };
            tags.open.remove(i);
            tags.advance();
        }
        let nacked = self
            .channel
            .basic_nack(
                tag,
                BasicNackOptions {
                    requeue,
                    multiple: false,
                },
            )
            .await;
        // What the nack unblocked goes out now rather than at the timer.
        let held = self.send_held().await;
        nacked.and(held)
    }

    /// A delivery dropped unsettled: it goes back to the queue.
    pub(crate) fn abandon(self: &Arc<Self>, tag: u64) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // no runtime left: the channel closes with it, requeueing
        };
        let settler = self.clone();
        runtime.spawn(async move {
            if let Err(e) = settler.nack(tag, true).await {
                tracing::debug!(error = %e, "returning an abandoned delivery");
            }
        });
    }
}

/// Stops the flush timer of a settler when the channel's subscription goes.
pub(crate) struct FlushTimer(JoinHandle<()>);

impl Drop for FlushTimer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn flush_when_due(settler: Weak<Settler>, held: Arc<Notify>) {
    loop {
        held.notified().await;
        tokio::time::sleep(ACK_FLUSH_AFTER).await;
        let Some(settler) = settler.upgrade() else {
            return;
        };
        if let Err(e) = settler.flush().await {
            // The channel went: its deliveries come again.
            tracing::debug!(error = %e, "sending held-back acks");
        }
    }
}
