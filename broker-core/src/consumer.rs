//! The one consumer runtime every backend shares.
//!
//! A backend supplies a [`DeliveryStream`] (fetch), an [`crate::Acker`] per
//! delivery (ack/nack) and a [`Publisher`] (dead letters). Everything else
//! lives here: the handler call, retries with exponential backoff and jitter,
//! panics caught as errors, dead-lettering with reason headers, bounded
//! concurrency that keeps per-key order, and graceful shutdown.
//!
//! Concurrency: deliveries are spread over `concurrency` lanes; a lane
//! handles one message at a time, and a message goes to the lane that holds
//! earlier messages of its key, if any (else to the least-loaded lane, see
//! `crate::lanes`), so same-key messages are handled in order (retries
//! included) while different keys run in parallel.
//!
//! With a [`crate::BatchHandler`] ([`ConsumerBuilder::batch_handler`]), a lane
//! takes its deliveries in batches instead (see [`crate::batch`]); retries,
//! dead letters and the delivery limit are the same code.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::batch::{BatchHandler, Batching, OneAtATime};
use crate::delivery::{Acker, Delivery, DeliveryStream, Received};
use crate::error::{BrokerError, Result};
use crate::handler::{FailureKind, Handler, HandlerError};
use crate::lanes::{key_of, Finished, Router};
use crate::message::{header, millis_since_epoch, now_millis, Message};
use crate::metrics::{ConsumerInstruments, Metrics, MetricsSnapshot};
use crate::retry::RetryMode;
use crate::topic::{dead_letter_topic, validate_topic};
use crate::{Publisher, Subscriber, Subscription};

/// Deadline used when a [`ConsumerHandle`] is dropped without `shutdown`.
const DROP_DEADLINE: Duration = Duration::from_secs(30);
/// Extra time `shutdown` allows for closing the subscription after the deadline.
const CLOSE_GRACE: Duration = Duration::from_secs(30);
/// Default of [`ConsumerBuilder::delivery_limit`].
pub const DEFAULT_DELIVERY_LIMIT: u32 = 5;

/// Entry point of the runtime; see [`Consumer::builder`].
pub struct Consumer;

impl Consumer {
    /// Starts building a consumer of `topic` in consumer group `group`.
    /// Dead letters go to `broker` too unless [`ConsumerBuilder::dead_letters`]
    /// names another publisher.
    pub fn builder<B>(
        broker: B,
        topic: impl Into<String>,
        group: impl Into<String>,
    ) -> ConsumerBuilder
    where
        B: Publisher + Subscriber + 'static,
    {
        let broker = Arc::new(broker);
        Self::from_parts(broker.clone(), broker, topic, group)
    }

    /// Like [`Consumer::builder`], with the subscriber and the dead-letter
    /// publisher given apart (for example two connections).
    pub fn from_parts(
        subscriber: Arc<dyn Subscriber>,
        dead_letters: Arc<dyn Publisher>,
        topic: impl Into<String>,
        group: impl Into<String>,
    ) -> ConsumerBuilder {
        let topic = topic.into();
        ConsumerBuilder {
            subscriber,
            dead_letters,
            dead_letter_topic: dead_letter_topic(&topic),
            topic,
            group: group.into(),
            handler: None,
            batch_handler: None,
            batch_limits: None,
            retry: Backoff::retry_default(),
            retry_mode: RetryMode::InPlace,
            concurrency: 1,
            prefetch: None,
            delivery_limit: Some(DEFAULT_DELIVERY_LIMIT),
            metrics: Arc::default(),
        }
    }
}

/// Configures and starts a consumer.
#[must_use = "call .start() to run the consumer"]
pub struct ConsumerBuilder {
    subscriber: Arc<dyn Subscriber>,
    dead_letters: Arc<dyn Publisher>,
    topic: String,
    group: String,
    dead_letter_topic: String,
    handler: Option<Arc<dyn Handler>>,
    batch_handler: Option<Arc<dyn BatchHandler>>,
    batch_limits: Option<(usize, Duration)>,
    retry: Backoff,
    retry_mode: RetryMode,
    concurrency: usize,
    prefetch: Option<usize>,
    delivery_limit: Option<u32>,
    metrics: Arc<Metrics>,
}

impl ConsumerBuilder {
    /// The handler (required, or a [`ConsumerBuilder::batch_handler`]): a
    /// [`Handler`], a closure, or [`crate::typed`]. Replaces a batch handler.
    pub fn handler(mut self, handler: impl Handler) -> Self {
        self.handler = Some(Arc::new(handler));
        self.batch_handler = None;
        self
    }
    /// Handles messages in batches instead of one at a time: `handler` (a
    /// [`BatchHandler`], a closure, or [`crate::typed_batch`]) gets up to
    /// [`ConsumerBuilder::batch`]'s `max_messages` (default
    /// [`crate::batch::DEFAULT_BATCH_MESSAGES`]), or what arrived within its
    /// `max_wait` (default [`crate::batch::DEFAULT_BATCH_WAIT`]). The ones
    /// that succeeded are acknowledged together; each failed one is retried
    /// and dead-lettered on its own, before the lane's next batch, so
    /// same-key order holds from batch to batch (see [`crate::batch`]).
    /// Replaces a [`ConsumerBuilder::handler`].
    ///
    /// ```
    /// # use std::time::Duration;
    /// use broker_core::{BatchError, Consumer, MemoryBroker, Received};
    /// let builder = Consumer::builder(MemoryBroker::new(), "demo.usage.recorded", "billing")
    ///     .batch(500, Duration::from_millis(200))
    ///     .batch_handler(|batch: Vec<Received>| async move {
    ///         // One bulk write for the whole batch.
    ///         println!("writing {} records", batch.len());
    ///         Ok::<(), BatchError>(())
    ///     });
    /// ```
    pub fn batch_handler(mut self, handler: impl BatchHandler) -> Self {
        self.batch_handler = Some(Arc::new(handler));
        self.handler = None;
        self
    }
    /// Batch limits of a [`ConsumerBuilder::batch_handler`]: at most
    /// `max_messages` (at least 1) per call, and at most `max_wait` from
    /// the first message of a batch to the call. Unless set with
    /// [`ConsumerBuilder::prefetch`], the prefetch grows to hold two
    /// batches per lane, so full batches can form.
    pub fn batch(mut self, max_messages: usize, max_wait: Duration) -> Self {
        self.batch_limits = Some((max_messages.max(1), max_wait));
        self
    }
    /// Retry policy for handler errors (default [`Backoff::retry_default`]).
    pub fn retry(mut self, policy: Backoff) -> Self {
        self.retry = policy;
        self
    }
    /// Where a failed message waits for its retry (default
    /// [`RetryMode::InPlace`]; see [`RetryMode`] for the order trade-off).
    ///
    /// ```
    /// use std::time::Duration;
    /// # use broker_core::{Backoff, Consumer, MemoryBroker, Received, RetryMode};
    /// let builder = Consumer::builder(MemoryBroker::new(), "demo.credits.granted", "ledger")
    ///     .retry(Backoff::retry_default().max_attempts(4).initial_delay(Duration::from_secs(1)))
    ///     .retry_mode(RetryMode::Delayed)
    ///     .handler(|_m: Received| async { Ok(()) });
    /// ```
    pub fn retry_mode(mut self, mode: RetryMode) -> Self {
        self.retry_mode = mode;
        self
    }
    /// Publisher for dead letters (default: the broker passed to the builder).
    pub fn dead_letters(mut self, publisher: impl Publisher + 'static) -> Self {
        self.dead_letters = Arc::new(publisher);
        self
    }
    /// Dead-letter topic (default `{topic}.dlq`).
    pub fn dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter_topic = topic.into();
        self
    }
    /// How many messages are handled at once (default 1). Same-key messages
    /// are still handled one after another, in order.
    pub fn concurrency(mut self, lanes: usize) -> Self {
        self.concurrency = lanes.max(1);
        self
    }
    /// Most unacknowledged messages held (default twice the concurrency).
    pub fn prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = Some(prefetch.max(1));
        self
    }
    /// Most deliveries of one message that may end unsettled (default
    /// [`DEFAULT_DELIVERY_LIMIT`], at least 1). A message the broker has
    /// already delivered `limit` times without it being acknowledged (the
    /// consumer process crashed, was killed or stopped while it was in
    /// flight) goes to the dead-letter topic on its next delivery without
    /// calling the handler, with `x-dlq-error-kind: delivery-limit` and
    /// `x-dlq-attempts` = `limit`: a message that kills the process cannot
    /// loop forever. The count survives restarts: each backend keeps it
    /// with the broker (see the README, "Delivery limit").
    ///
    /// ```
    /// # use broker_core::{Consumer, MemoryBroker, Received};
    /// let builder = Consumer::builder(MemoryBroker::new(), "demo.credits.granted", "ledger")
    ///     .delivery_limit(3)
    ///     .handler(|_m: Received| async { Ok(()) });
    /// ```
    pub fn delivery_limit(mut self, limit: u32) -> Self {
        self.delivery_limit = Some(limit.max(1));
        self
    }
    /// No delivery limit: a message that keeps crashing the consumer is
    /// delivered again forever.
    pub fn without_delivery_limit(mut self) -> Self {
        self.delivery_limit = None;
        self
    }
    /// Counters to update (default: a fresh set, see [`ConsumerHandle::metrics`]).
    pub fn metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Subscribes and starts consuming in the background. Returns once the
    /// subscription exists, so messages published afterwards reach it.
    pub async fn start(self) -> Result<ConsumerHandle> {
        validate_topic(&self.topic)?;
        validate_topic(&self.dead_letter_topic)?;
        let (handler, batch) = match (self.handler, self.batch_handler) {
            (Some(_), _) if self.batch_limits.is_some() => return Err(BrokerError::Misconfigured(
                "batch limits set for a single-message handler: use ConsumerBuilder::batch_handler",
            )),
            (Some(handler), _) => (handler, None),
            (None, Some(batch)) => {
                let batching = Batching::new(batch, self.batch_limits);
                (
                    Arc::new(OneAtATime(batching.handler.clone())) as _,
                    Some(batching),
                )
            }
            (None, None) => {
                return Err(BrokerError::Misconfigured(
                    "no handler: call ConsumerBuilder::handler",
                ))
            }
        };
        if self.retry_mode == RetryMode::Delayed && !self.subscriber.delayed_retry() {
            return Err(BrokerError::Unsupported {
                backend: self.subscriber.backend_name(),
                operation: "delayed retry (RetryMode::Delayed)",
            });
        }
        let per_lane = batch.as_ref().map_or(1, |b| b.max_messages);
        let prefetch = self
            .prefetch
            .unwrap_or(self.concurrency.saturating_mul(per_lane).saturating_mul(2));
        let stream = self
            .subscriber
            .subscribe({
                let subscription =
                    Subscription::new(&self.topic, &self.group).with_prefetch(prefetch);
                // With a delivery limit, a crash must count against the
                // message that caused it only.
                match self.delivery_limit {
                    Some(_) => subscription.isolating_redeliveries(),
                    None => subscription,
                }
            })
            .await?;
        let (stop_tx, stop_rx) = watch::channel(None);
        let instruments =
            ConsumerInstruments::new(self.subscriber.backend_name(), &self.topic, &self.group);
        let runtime = Arc::new(Runtime {
            handler,
            batch,
            dead_letters: self.dead_letters,
            dead_letter_topic: self.dead_letter_topic,
            group: self.group,
            retry: self.retry,
            retry_mode: self.retry_mode,
            delivery_limit: self.delivery_limit,
            metrics: self.metrics.clone(),
            instruments,
        });
        tracing::info!(topic = %self.topic, group = %runtime.group, concurrency = self.concurrency, "consumer started");
        let stopped_by = Arc::new(std::sync::Mutex::new(None));
        let run = runtime.run(stream, self.concurrency, prefetch, stop_rx);
        let task = tokio::spawn({
            let stopped_by = stopped_by.clone();
            async move {
                let result = run.await;
                if let Err(e) = &result {
                    *stopped_by.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                }
                result
            }
        });
        Ok(ConsumerHandle {
            stop: stop_tx,
            task,
            metrics: self.metrics,
            stopped_by,
        })
    }
}

/// A running consumer. Dropping it stops the consumer (30 s deadline).
pub struct ConsumerHandle {
    stop: watch::Sender<Option<Duration>>,
    task: JoinHandle<Result<()>>,
    metrics: Arc<Metrics>,
    /// Why the consumer stopped on its own, once it did.
    stopped_by: Arc<std::sync::Mutex<Option<String>>>,
}

impl ConsumerHandle {
    /// Stops taking messages, lets in-flight ones finish for up to
    /// `deadline` (then abandons them: they are redelivered), settles what
    /// finished and closes the subscription.
    pub async fn shutdown(self, deadline: Duration) -> Result<()> {
        let _ = self.stop.send(Some(deadline));
        match tokio::time::timeout(deadline + CLOSE_GRACE, self.task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(BrokerError::backend("consumer", join)),
            Err(_) => Err(BrokerError::Timeout {
                operation: "consumer shutdown",
                after: deadline + CLOSE_GRACE,
            }),
        }
    }

    /// True while the consumer runs (it stops on shutdown, or when the
    /// backend gives up; [`ConsumerHandle::shutdown`] then returns the error).
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    /// The consumer's counters now.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }

    /// Why the consumer stopped on its own (its subscription failed for
    /// good, say a bounded resubscribe policy ran out during an outage):
    /// the error's text. `None` while it runs and after a shutdown.
    pub fn stopped_by(&self) -> Option<String> {
        self.stopped_by
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// What lanes share.
pub(crate) struct Runtime {
    /// The handler of one message (of a batch handler: a batch of one).
    handler: Arc<dyn Handler>,
    /// Set for a batch handler: lanes take their deliveries in batches.
    pub(crate) batch: Option<Batching>,
    dead_letters: Arc<dyn Publisher>,
    dead_letter_topic: String,
    pub(crate) group: String,
    pub(crate) retry: Backoff,
    pub(crate) retry_mode: RetryMode,
    delivery_limit: Option<u32>,
    pub(crate) metrics: Arc<Metrics>,
    /// The labelled metrics (feature `metrics`).
    pub(crate) instruments: ConsumerInstruments,
}

pub(crate) type StopSignal = watch::Receiver<Option<Duration>>;

/// True once shutdown was asked for (or the handle was dropped).
pub(crate) fn stopping(stop: &StopSignal) -> bool {
    stop.borrow().is_some() || stop.has_changed().is_err()
}

/// Resolves once shutdown is asked for (or the handle was dropped).
pub(crate) async fn stop_requested(stop: &mut StopSignal) {
    let _ = stop.wait_for(Option::is_some).await;
}

impl Runtime {
    async fn run(
        self: Arc<Self>,
        mut stream: Box<dyn DeliveryStream>,
        lanes: usize,
        prefetch: usize,
        stop: StopSignal,
    ) -> Result<()> {
        let mut workers = JoinSet::new();
        // The dispatcher hands over what the stream holds and lanes take it
        // in runs, instead of the two trading a wake-up per message. The
        // backend's prefetch bounds what is held in all, so a lane may queue
        // all of it: a message never waits for room behind a busy lane
        // while others idle. With more than one lane, the router ties a key
        // to a lane only while that lane holds messages of it (see
        // `crate::lanes`).
        let (mut router, finished) = match lanes {
            1 => (None, vec![None]),
            _ => {
                let (router, finished) = Router::new(lanes);
                (Some(router), finished.into_iter().map(Some).collect())
            }
        };
        let senders: Vec<mpsc::Sender<Delivery>> = finished
            .into_iter()
            .map(|finished| {
                let (tx, rx) = mpsc::channel(prefetch.max(1));
                workers.spawn(self.clone().lane(rx, stop.clone(), finished));
                tx
            })
            .collect();

        // One future for the whole loop: making a new one per message cost
        // more than taking the message.
        let mut stop_watch = stop.clone();
        let stopped = stop_requested(&mut stop_watch);
        tokio::pin!(stopped);
        let outcome = loop {
            // `next` is cancel-safe by the DeliveryStream contract.
            let delivery = tokio::select! {
                biased;
                _ = &mut stopped => break Ok(()),
                d = stream.next() => d,
            };
            let delivery = match delivery {
                None => break Ok(()),
                Some(Err(e)) => {
                    tracing::error!(error = %e, "subscription failed; consumer stops");
                    break Err(e);
                }
                Some(Ok(d)) => d,
            };
            let lane = match &mut router {
                Some(router) => &senders[router.route(key_of(delivery.message()))],
                None => &senders[0],
            };
            if let Ok(permit) = lane.try_reserve() {
                permit.send(delivery);
                continue;
            }
            tokio::select! {
                biased;
                _ = &mut stopped => {
                    settle(delivery.nack(true), "nack").await;
                    break Ok(());
                }
                permit = lane.reserve() => match permit {
                    Ok(permit) => permit.send(delivery),
                    Err(_) => break Err(BrokerError::Closed("consumer lane")),
                },
            }
        };

        drop(senders);
        let deadline = (*stop.borrow()).unwrap_or(DROP_DEADLINE);
        let drained = tokio::time::timeout(deadline, async {
            while workers.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                ?deadline,
                "in-flight messages did not finish before the deadline; abandoning them for redelivery"
            );
            workers.shutdown().await;
        }
        let closed = stream.close().await;
        tracing::info!(group = %self.group, "consumer stopped");
        outcome.and(closed)
    }

    async fn lane(
        self: Arc<Self>,
        mut deliveries: mpsc::Receiver<Delivery>,
        stop: StopSignal,
        finished: Option<Finished>,
    ) {
        if self.batch.is_some() {
            return self.batch_lane(deliveries, stop, finished).await;
        }
        while let Some(delivery) = deliveries.recv().await {
            let key = finished.as_ref().and_then(|_| key_of(delivery.message()));
            if stopping(&stop) {
                // Queued but not started: hand it back untouched.
                settle(delivery.nack(true), "nack").await;
            } else {
                let (received, acker) = delivery.into_parts();
                let span = self.handle_span(&received);
                self.handle(received, acker, stop.clone())
                    .instrument(span)
                    .await;
            }
            if let Some(finished) = &finished {
                finished.done(key);
            }
        }
    }

    /// The span of handling one message: it continues the publisher's trace.
    pub(crate) fn handle_span(&self, received: &Received) -> tracing::Span {
        let message = &received.message;
        let span = tracing::info_span!(
            "handle",
            topic = %received.topic,
            group = %self.group,
            // Read when the field is written, not when the span is made
            // (a span nothing records then costs no id check).
            message_id = %MessageId(message),
            correlation_id = message.correlation_id().unwrap_or_default(),
            traceparent = message.traceparent().unwrap_or_default(),
        );
        #[cfg(feature = "otel")]
        crate::otel::set_parent(&span, message);
        span
    }

    /// Runs the handler with retries, then acks, dead-letters or abandons.
    async fn handle(&self, mut received: Received, acker: Box<dyn Acker>, stop: StopSignal) {
        if let Some(error) = self.over_delivery_limit(&mut received) {
            return self.dead_letter(received, error, acker, stop).await;
        }
        self.attempts(received, acker, stop, None).await
    }

    /// Sets `received.attempt`: at least 1, plus the attempts a delayed
    /// retry's copy carries (whose `x-retry-*` headers it removes). When
    /// the backend counted `delivery_limit` earlier deliveries, returns the
    /// error to dead-letter it with (counted as a failure), and the handler
    /// must not run.
    pub(crate) fn over_delivery_limit(&self, received: &mut Received) -> Option<HandlerError> {
        // The backend counts the earlier deliveries it knows of.
        received.attempt = received.attempt.max(1);
        let earlier = received.attempt - 1;
        let retried = crate::retry::take_retry_headers(&mut received.message);
        received.attempt = received.attempt.saturating_add(retried);
        if self.delivery_limit.is_none_or(|limit| earlier < limit) {
            return None;
        }
        received.attempt = earlier.saturating_add(retried);
        let error = HandlerError::new(
            FailureKind::DeliveryLimit,
            format!(
                "delivered {earlier} times without being settled: the consumer crashed, \
                 was killed or stopped while handling it"
            ),
        );
        self.metrics.add_failed();
        self.instruments.failed(error.kind());
        Some(error)
    }

    /// Calls the handler until it succeeds, the error is permanent or the
    /// retry policy runs out, then acks or dead-letters. `failed` is the
    /// error of an attempt already made (by a batch handler), which counts
    /// as the first.
    pub(crate) async fn attempts(
        &self,
        mut received: Received,
        acker: Box<dyn Acker>,
        mut stop: StopSignal,
        mut failed: Option<HandlerError>,
    ) {
        // Made at the first failure: most messages never need it.
        let mut delays = None;
        loop {
            let error = match failed.take() {
                Some(e) => e,
                None => {
                    let started = self.instruments.clock();
                    let outcome = call_handler(&*self.handler, received.clone()).await;
                    self.instruments.attempt_since(started, outcome.is_ok());
                    match outcome {
                        Ok(()) => {
                            self.metrics.add_handled();
                            self.instruments.handled();
                            settle(acker.ack(), "ack").await;
                            return;
                        }
                        Err(e) => e,
                    }
                }
            };
            self.metrics.add_failed();
            self.instruments.failed(error.kind());
            if self.retry_mode == RetryMode::Delayed {
                return self.retry_later(received, error, acker, stop).await;
            }
            let delay = match error.kind().is_retryable() {
                true => delays.get_or_insert_with(|| self.retry.delays()).next(),
                false => None,
            };
            let Some(delay) = delay else {
                return self.dead_letter(received, error, acker, stop).await;
            };
            tracing::warn!(attempt = received.attempt, ?delay, error = %error, "handler failed; will retry");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop_requested(&mut stop) => {
                    // Shutting down mid-backoff: give the message back rather than wait.
                    settle(acker.nack(true), "nack").await;
                    return;
                }
            }
            self.metrics.add_retried();
            self.instruments.retried();
            received.attempt += 1;
        }
    }

    /// Publishes the unchanged message plus reason headers to the dead-letter
    /// topic, then acks. If that publish keeps failing, the message is handed
    /// back for redelivery instead: never lost.
    pub(crate) async fn dead_letter(
        &self,
        received: Received,
        error: HandlerError,
        acker: Box<dyn Acker>,
        mut stop: StopSignal,
    ) {
        tracing::error!(attempts = received.attempt, error = %error, dlq = %self.dead_letter_topic, "dead-lettering message");
        let letter = dead_letter_message(&received, &error, &self.group);
        // A publish already under way finishes even when shutdown begins (the
        // shutdown deadline still bounds it): abandoning it could leave a dead
        // letter the broker has accepted while the original is redelivered.
        // Shutdown only stops further attempts.
        let mut delays = Backoff::reconnect_default().delays();
        let published = loop {
            let error = match self
                .dead_letters
                .publish(&self.dead_letter_topic, letter.clone())
                .await
            {
                Ok(()) => break Ok(()),
                Err(e) => e,
            };
            let delay = match error.is_transient() {
                true => delays.next(),
                false => None,
            };
            let Some(delay) = delay else { break Err(error) };
            tracing::warn!(?delay, error = %error, "dead-letter publish failed; will retry");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop_requested(&mut stop) => break Err(error),
            }
        };
        // Too large for the dead-letter publisher, which no retry changes:
        // a copy with the payload cut to its first bytes, the reason and
        // the original size, so the letter is kept where people look, not
        // redelivered and refused again forever.
        let published = match published {
            Err(e @ BrokerError::MessageTooLarge { .. }) => {
                let copy = truncated_letter(&letter, &e);
                tracing::error!(error = %e, dlq = %self.dead_letter_topic, original_bytes = letter.payload().len(), "dead letter refused for good; publishing a truncated copy");
                self.dead_letters
                    .publish(&self.dead_letter_topic, copy)
                    .await
                    .map_err(|copy_error| {
                        tracing::error!(error = %copy_error, "the truncated dead letter was refused too");
                        e
                    })
            }
            other => other,
        };
        match published {
            Ok(()) => {
                self.metrics.add_dead_lettered();
                self.instruments.dead_lettered();
                settle(acker.ack(), "ack").await;
            }
            Err(e) => {
                tracing::error!(error = %e, "dead-letter publish failed; message returned for redelivery");
                settle(acker.nack(true), "nack").await;
            }
        }
    }
}

/// Calls the handler, turning a panic into a retryable error.
pub(crate) async fn call_handler(
    handler: &dyn Handler,
    received: Received,
) -> Result<(), HandlerError> {
    match AssertUnwindSafe(handler.handle(received))
        .catch_unwind()
        .await
    {
        Ok(result) => result,
        Err(panic) => Err(panic_error(&*panic)),
    }
}

/// The retryable error a handler's panic counts as, with its message.
pub(crate) fn panic_error(panic: &(dyn std::any::Any + Send)) -> HandlerError {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "handler panicked".to_owned());
    HandlerError::new(FailureKind::Panic, text)
}

/// The dead letter: the message unchanged (id, key, payload, headers), with
/// headers saying why, from where, after how many attempts and when.
pub fn dead_letter_message(received: &Received, error: &HandlerError, group: &str) -> Message {
    let mut letter = received.message.clone();
    let headers = letter.headers_mut();
    let reason: String = error.to_string().chars().take(1024).collect();
    headers.insert(header::DLQ_REASON, reason);
    headers.insert(header::DLQ_ERROR_KIND, error.kind().as_str());
    headers.insert(header::DLQ_ORIGINAL_TOPIC, &*received.topic);
    headers.insert(header::DLQ_ATTEMPTS, received.attempt.to_string());
    headers.insert(header::DLQ_GROUP, group);
    headers.insert(
        header::DLQ_FAILED_AT,
        millis_since_epoch(now_millis()).to_string(),
    );
    if let Some(p) = received.partition {
        headers.insert(header::DLQ_PARTITION, p.to_string());
    }
    if let Some(o) = received.offset {
        headers.insert(header::DLQ_OFFSET, o.to_string());
    }
    // As RabbitMQ's own dead-lettering does: a letter must not expire in
    // the dead-letter queue.
    if letter.amqp().is_some_and(|p| p.expiration.is_some()) {
        letter.amqp_mut().expiration = None;
    }
    letter
}

/// How much of the payload a truncated dead letter keeps.
pub const TRUNCATED_LETTER_BYTES: usize = 4096;

/// The copy of a dead letter the broker refused for good: the first
/// [`TRUNCATED_LETTER_BYTES`] of the payload, the same headers, plus
/// `x-dlq-truncated` (`true`), `x-dlq-original-size` (payload bytes) and
/// `x-dlq-publish-error` (why the whole letter was refused).
pub fn truncated_letter(letter: &Message, refusal: &BrokerError) -> Message {
    let payload = letter.payload();
    let kept = payload.slice(..payload.len().min(TRUNCATED_LETTER_BYTES));
    let mut copy = Message::restore(letter.id(), kept, letter.timestamp())
        .with_headers(letter.headers().clone());
    if let Some(key) = letter.key() {
        copy = copy.with_key(key);
    }
    if let Some(id) = letter.correlation_id() {
        copy = copy.with_correlation_id(id);
    }
    if let Some(tp) = letter.traceparent() {
        copy = copy.with_traceparent(tp);
    }
    if let Some(ct) = letter.content_type() {
        copy = copy.with_content_type(ct);
    }
    if let Some(amqp) = letter.amqp() {
        copy = copy.with_amqp(amqp.clone());
    }
    let headers = copy.headers_mut();
    headers.insert(DLQ_TRUNCATED, "true");
    headers.insert(DLQ_ORIGINAL_SIZE, payload.len().to_string());
    let reason: String = refusal.to_string().chars().take(1024).collect();
    headers.insert(DLQ_PUBLISH_ERROR, reason);
    copy
}

/// Header of a truncated dead letter: `true`.
pub const DLQ_TRUNCATED: &str = "x-dlq-truncated";
/// Header of a truncated dead letter: the original payload's size in bytes.
pub const DLQ_ORIGINAL_SIZE: &str = "x-dlq-original-size";
/// Header of a truncated dead letter: why the whole letter was refused.
pub const DLQ_PUBLISH_ERROR: &str = "x-dlq-publish-error";

/// Acks and nacks that fail are logged, not fatal: the broker redelivers
/// what was not acked, which at-least-once allows. A delivery whose
/// subscription or channel already closed ([`BrokerError::Closed`]) was
/// handed back by the broker already: expected around shutdown and
/// reconnects, so only a debug line.
pub(crate) async fn settle(op: impl std::future::Future<Output = Result<()>>, what: &str) {
    match op.await {
        Ok(()) => {}
        Err(e @ BrokerError::Closed(_)) => {
            tracing::debug!(error = %e, "{what} after the subscription closed; the message will be redelivered");
        }
        Err(e) => tracing::warn!(error = %e, "{what} failed; the message may be redelivered"),
    }
}

/// Displays a message's id when formatted.
struct MessageId<'a>(&'a Message);

impl std::fmt::Display for MessageId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self.0.id(), f)
    }
}
