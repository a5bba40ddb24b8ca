//! Batch consume: a handler that gets several messages at once.
//!
//! A consumer started with [`ConsumerBuilder::batch_handler`] runs on the
//! same runtime as one with a single-message handler (lanes by key,
//! retries, dead letters, the delivery limit, shutdown); only what a lane
//! does with its deliveries differs:
//!
//! 1. it takes up to `max_messages` of them, or what arrived within
//!    `max_wait` of the first ([`ConsumerBuilder::batch`]);
//! 2. a delivery already over the delivery limit is dead-lettered, not
//!    batched;
//! 3. the [`BatchHandler`] is called once with the rest, in delivery order;
//! 4. the messages that succeeded are acknowledged together, in one pass;
//! 5. each message that failed goes through the usual retry and
//!    dead-letter path on its own (the batch handler gets it again as a
//!    batch of one), before the lane takes its next batch.
//!
//! A message goes to the lane that holds earlier messages of its key, if
//! any (see [`crate::consumer`]), so same-key messages reach
//! the handler in order, and a failed message is retried or dead-lettered
//! before the lane's next batch. (The messages after it in its own batch
//! were decided in the same call: the handler chose to let them succeed.)
//!
//! A handler fails messages with a [`BatchError`]: all of them
//! ([`BatchError::all`], or any error with `?`), or single ones by their
//! position ([`BatchError::failed`], [`BatchError::partial`]), as Spring
//! Kafka's `BatchListenerFailedException` does.
//!
//! ```
//! use std::time::Duration;
//! use broker_core::{BatchError, Consumer, HandlerError, MemoryBroker, Message, Publisher, Received};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), broker_core::BrokerError> {
//! let broker = MemoryBroker::new();
//! let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
//! let consumer = Consumer::builder(broker.clone(), "demo.usage.recorded", "billing")
//!     .batch(100, Duration::from_millis(50))
//!     .batch_handler(move |batch: Vec<Received>| {
//!         let tx = tx.clone();
//!         async move {
//!             let mut failed = Vec::new();
//!             for (i, r) in batch.iter().enumerate() {
//!                 match r.message.payload().is_empty() {
//!                     true => failed.push((i, HandlerError::permanent("empty record"))),
//!                     false => tx.send(r.message.payload().clone()).unwrap(),
//!                 }
//!             }
//!             // Ok when nothing failed; the rest are acknowledged either way.
//!             BatchError::check(failed)
//!         }
//!     })
//!     .start()
//!     .await?;
//! broker.publish_batch("demo.usage.recorded", vec![Message::new("a"), Message::new("b")]).await?;
//! assert_eq!(rx.recv().await.unwrap(), "a");
//! assert_eq!(rx.recv().await.unwrap(), "b");
//! consumer.shutdown(Duration::from_secs(5)).await?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::consumer::{panic_error, settle, stop_requested, stopping, Runtime, StopSignal};
use crate::delivery::{Delivery, Received};
use crate::error::BoxError;
use crate::event::Event;
use crate::handler::{Handler, HandlerError};
use crate::lanes::{key_of, Finished};
#[cfg(doc)]
use crate::ConsumerBuilder;

/// Default most messages per batch ([`ConsumerBuilder::batch`]).
pub const DEFAULT_BATCH_MESSAGES: usize = 100;
/// Default longest wait from a batch's first message to the handler call
/// ([`ConsumerBuilder::batch`]).
pub const DEFAULT_BATCH_WAIT: Duration = Duration::from_millis(100);

/// Handles messages in batches (see [`ConsumerBuilder::batch_handler`]).
/// Closures `Fn(Vec<Received>) -> impl Future<Output = Result<(), BatchError>>`
/// are batch handlers; use [`typed_batch`] for decoded, validated events.
///
/// ```
/// use broker_core::{BatchError, BatchHandler, Received};
/// use async_trait::async_trait;
///
/// struct BulkWriter;
///
/// #[async_trait]
/// impl BatchHandler for BulkWriter {
///     async fn handle_batch(&self, batch: Vec<Received>) -> Result<(), BatchError> {
///         // One INSERT of batch.len() rows; on error, every message is retried.
///         let _rows = batch.len();
///         Ok(())
///     }
/// }
/// # let _: &dyn BatchHandler = &BulkWriter;
/// ```
#[async_trait]
pub trait BatchHandler: Send + Sync + 'static {
    /// Handles a non-empty batch, in delivery order. `Ok` acknowledges
    /// every message; an error says which failed (see [`BatchError`]): those
    /// are retried one at a time (each as a batch of one) and dead-lettered
    /// per the consumer's policy, the others are acknowledged. A panic fails
    /// every message with a retryable error.
    async fn handle_batch(&self, batch: Vec<Received>) -> Result<(), BatchError>;
}

#[async_trait]
impl<F, Fut> BatchHandler for F
where
    F: Fn(Vec<Received>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BatchError>> + Send + 'static,
{
    async fn handle_batch(&self, batch: Vec<Received>) -> Result<(), BatchError> {
        self(batch).await
    }
}

/// Which messages of a batch failed, and why: all of them with one error,
/// or single ones by their position in the batch. The messages not named
/// succeeded and are acknowledged.
///
/// Any error converts into "all failed, retryable" with `?`; a
/// [`HandlerError`] keeps its kind (a permanent one dead-letters at once).
///
/// ```
/// use broker_core::{BatchError, FailureKind, HandlerError};
///
/// fn store(rows: &[&str]) -> Result<(), BatchError> {
///     let n: u32 = "7".parse()?; // on error: the whole batch is retried
///     let _ = n;
///     // Position 1 can never be stored; the rest were.
///     Err(BatchError::failed(1, HandlerError::permanent("unknown account")))
/// }
/// let e = store(&["a", "b", "c"]).unwrap_err();
/// assert_eq!(e.failures().unwrap()[0].0, 1);
///
/// // Several positions, or none (then it is a success).
/// let e = BatchError::failed(0, "timeout").and(2, HandlerError::permanent("bad row"));
/// assert_eq!(e.failures().unwrap().len(), 2);
/// assert!(BatchError::check(Vec::new()).is_ok());
/// assert!(BatchError::all("database down").failures().is_none());
/// ```
// Not `std::error::Error`, so that the blanket `From` below can exist
// (as for `HandlerError`).
pub struct BatchError {
    failures: Failures,
}

enum Failures {
    All(HandlerError),
    Some(Vec<(usize, HandlerError)>),
}

impl BatchError {
    /// Every message of the batch failed with `error`.
    pub fn all(error: impl Into<HandlerError>) -> Self {
        BatchError {
            failures: Failures::All(error.into()),
        }
    }
    /// The message at `index` (its position in the batch) failed.
    pub fn failed(index: usize, error: impl Into<HandlerError>) -> Self {
        Self::partial([(index, error.into())])
    }
    /// The message at `index` failed too. On an [`BatchError::all`] this
    /// changes nothing: every message failed already.
    pub fn and(mut self, index: usize, error: impl Into<HandlerError>) -> Self {
        if let Failures::Some(failures) = &mut self.failures {
            failures.push((index, error.into()));
        }
        self
    }
    /// The messages at these positions failed; the others succeeded. An
    /// empty list means none failed. A position named twice keeps its first
    /// error; one outside the batch is ignored (with a warning).
    pub fn partial(failures: impl IntoIterator<Item = (usize, HandlerError)>) -> Self {
        BatchError {
            failures: Failures::Some(failures.into_iter().collect()),
        }
    }
    /// `Ok` when `failures` is empty, else [`BatchError::partial`]: the
    /// handler's result after collecting its failures.
    pub fn check(failures: impl IntoIterator<Item = (usize, HandlerError)>) -> Result<(), Self> {
        let failures: Vec<_> = failures.into_iter().collect();
        match failures.is_empty() {
            true => Ok(()),
            false => Err(Self::partial(failures)),
        }
    }
    /// The failed positions with their errors; `None` when every message failed.
    pub fn failures(&self) -> Option<&[(usize, HandlerError)]> {
        match &self.failures {
            Failures::All(_) => None,
            Failures::Some(failures) => Some(failures),
        }
    }

    /// One entry per message of a batch of `len`: its error, if it failed.
    fn per_message(self, len: usize) -> Vec<Option<HandlerError>> {
        let mut out: Vec<Option<HandlerError>> = (0..len).map(|_| None).collect();
        match self.failures {
            Failures::All(error) => {
                // The first keeps the error itself; the others a copy of its
                // kind and text (a source error cannot be cloned).
                for slot in out.iter_mut().skip(1) {
                    *slot = Some(HandlerError::new(error.kind(), error.source().to_string()));
                }
                if let Some(first) = out.first_mut() {
                    *first = Some(error);
                }
            }
            Failures::Some(failures) => {
                for (index, error) in failures {
                    match out.get_mut(index) {
                        Some(slot @ None) => *slot = Some(error),
                        Some(Some(_)) => {}
                        None => tracing::warn!(
                            index,
                            batch = len,
                            error = %error,
                            "batch handler failed a position outside the batch; ignored"
                        ),
                    }
                }
            }
        }
        out
    }
}

impl From<HandlerError> for BatchError {
    fn from(error: HandlerError) -> Self {
        BatchError::all(error)
    }
}

impl<E: Into<BoxError>> From<E> for BatchError {
    fn from(e: E) -> Self {
        BatchError::all(HandlerError::retryable(e))
    }
}

impl fmt::Display for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.failures {
            Failures::All(error) => write!(f, "every message failed: {error}"),
            Failures::Some(failures) => {
                write!(f, "{} messages failed", failures.len())?;
                for (index, error) in failures {
                    write!(f, "; #{index}: {error}")?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Debug for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.failures {
            Failures::All(error) => f.debug_tuple("BatchError::All").field(error).finish(),
            Failures::Some(failures) => f
                .debug_tuple("BatchError::Partial")
                .field(failures)
                .finish(),
        }
    }
}

/// A batch handler of typed events: decodes and validates each message as
/// `E`, then calls `f` with the events that passed, each with its message
/// metadata, in delivery order. Messages that fail to decode or validate
/// are dead-lettered without retries and never reach `f`, which is not
/// called when none passed. Positions in `f`'s [`BatchError`] are
/// positions in the list `f` got.
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// # use validator::Validate;
/// # #[derive(Serialize, Deserialize, Validate)] struct Usage { units: u64 }
/// # impl broker_core::Event for Usage { const TOPIC: &'static str = "demo.usage.recorded"; }
/// use broker_core::{typed_batch, BatchError, Received};
/// let handler = typed_batch(|usages: Vec<(Usage, Received)>| async move {
///     let units: u64 = usages.iter().map(|(u, _)| u.units).sum();
///     println!("{} records, {units} units", usages.len());
///     Ok::<(), BatchError>(())
/// });
/// # let _: &dyn broker_core::BatchHandler = &handler;
/// ```
pub fn typed_batch<E, F, Fut>(f: F) -> TypedBatch<E, F>
where
    E: Event,
    F: Fn(Vec<(E, Received)>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BatchError>> + Send + 'static,
{
    TypedBatch {
        f,
        _event: PhantomData,
    }
}

/// See [`typed_batch`].
pub struct TypedBatch<E, F> {
    f: F,
    _event: PhantomData<fn() -> E>,
}

#[async_trait]
impl<E, F, Fut> BatchHandler for TypedBatch<E, F>
where
    E: Event,
    F: Fn(Vec<(E, Received)>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BatchError>> + Send + 'static,
{
    async fn handle_batch(&self, batch: Vec<Received>) -> Result<(), BatchError> {
        let mut failures = Vec::new();
        // Where each event the handler gets sits in the batch.
        let mut positions = Vec::with_capacity(batch.len());
        let mut events = Vec::with_capacity(batch.len());
        for (index, received) in batch.into_iter().enumerate() {
            match E::from_message(&received.message) {
                Ok(event) => {
                    positions.push(index);
                    events.push((event, received));
                }
                Err(error) => failures.push((index, error)),
            }
        }
        if !events.is_empty() {
            if let Err(error) = (self.f)(events).await {
                let failed = error.per_message(positions.len());
                failures.extend(
                    positions
                        .iter()
                        .zip(failed)
                        .filter_map(|(&index, failure)| Some((index, failure?))),
                );
                failures.sort_by_key(|(index, _)| *index);
            }
        }
        BatchError::check(failures)
    }
}

/// A batch handler as a single-message handler: a batch of one. The runtime
/// retries a failed message of a batch with it.
pub(crate) struct OneAtATime(pub(crate) Arc<dyn BatchHandler>);

#[async_trait]
impl Handler for OneAtATime {
    async fn handle(&self, message: Received) -> Result<(), HandlerError> {
        match self.0.handle_batch(vec![message]).await {
            Ok(()) => Ok(()),
            Err(error) => match error.per_message(1).pop().flatten() {
                Some(error) => Err(error),
                // Only positions outside the batch of one: it succeeded.
                None => Ok(()),
            },
        }
    }
}

/// A consumer's batch handler and limits.
pub(crate) struct Batching {
    pub(crate) handler: Arc<dyn BatchHandler>,
    pub(crate) max_messages: usize,
    pub(crate) max_wait: Duration,
}

impl Batching {
    pub(crate) fn new(handler: Arc<dyn BatchHandler>, limits: Option<(usize, Duration)>) -> Self {
        let (max_messages, max_wait) =
            limits.unwrap_or((DEFAULT_BATCH_MESSAGES, DEFAULT_BATCH_WAIT));
        Batching {
            handler,
            max_messages: max_messages.max(1),
            max_wait,
        }
    }
}

impl Runtime {
    /// A lane of a batch consumer: takes a batch, handles it, settles it
    /// (failed messages one by one), then takes the next.
    pub(crate) async fn batch_lane(
        self: Arc<Self>,
        mut deliveries: mpsc::Receiver<Delivery>,
        mut stop: StopSignal,
        finished: Option<Finished>,
    ) {
        let Some(batching) = &self.batch else {
            return;
        };
        while let Some(first) = deliveries.recv().await {
            let mut batch = vec![first];
            let deadline = tokio::time::Instant::now() + batching.max_wait;
            while batch.len() < batching.max_messages && !stopping(&stop) {
                // What is queued already joins without a timer.
                if let Ok(d) = deliveries.try_recv() {
                    batch.push(d);
                    continue;
                }
                let more = tokio::select! {
                    biased;
                    _ = stop_requested(&mut stop) => break,
                    more = tokio::time::timeout_at(deadline, deliveries.recv()) => more,
                };
                match more {
                    Ok(Some(d)) => batch.push(d),
                    // Closed (shutting down) or waited long enough.
                    Ok(None) | Err(_) => break,
                }
            }
            let keys: Vec<Option<u64>> = match finished {
                Some(_) => batch.iter().map(|d| key_of(d.message())).collect(),
                None => Vec::new(),
            };
            if stopping(&stop) {
                // Taken but not started: hand them back untouched, in order.
                for d in batch {
                    settle(d.nack(true), "nack").await;
                }
            } else {
                self.handle_batch(&batching.handler, batch, stop.clone())
                    .await;
            }
            if let Some(finished) = &finished {
                keys.into_iter().for_each(|key| finished.done(key));
            }
        }
    }

    /// Calls the batch handler once, acks the messages that succeeded in one
    /// pass, then retries or dead-letters each failed one in order.
    async fn handle_batch(
        &self,
        handler: &Arc<dyn BatchHandler>,
        batch: Vec<Delivery>,
        stop: StopSignal,
    ) {
        let mut received = Vec::with_capacity(batch.len());
        let mut ackers = Vec::with_capacity(batch.len());
        for delivery in batch {
            let (mut r, acker) = delivery.into_parts();
            if let Some(error) = self.over_delivery_limit(&mut r) {
                let span = self.handle_span(&r);
                self.dead_letter(r, error, acker, stop.clone())
                    .instrument(span)
                    .await;
                continue;
            }
            received.push(r);
            ackers.push(acker);
        }
        let Some(first) = received.first() else {
            return;
        };
        let span = tracing::info_span!(
            "handle_batch",
            topic = %first.topic,
            group = %self.group,
            messages = received.len(),
            first_message_id = %first.message.id(),
        );
        // The batch span links to every publisher's trace it continues.
        #[cfg(feature = "otel")]
        for r in &received {
            use opentelemetry::trace::TraceContextExt;
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            let cx = crate::otel::extract_context(&r.message);
            let context = cx.span().span_context().clone();
            if context.is_valid() {
                span.add_link(context);
            }
        }
        let started = std::time::Instant::now();
        let outcome = AssertUnwindSafe(handler.handle_batch(received.clone()))
            .catch_unwind()
            .instrument(span.clone())
            .await;
        let failures = match outcome {
            Ok(Ok(())) => (0..received.len()).map(|_| None).collect(),
            Ok(Err(error)) => error.per_message(received.len()),
            Err(panic) => BatchError::all(panic_error(&*panic)).per_message(received.len()),
        };
        let failed = failures.iter().filter(|f| f.is_some()).count();
        self.instruments.attempt(started.elapsed(), failed == 0);
        if failed > 0 {
            span.in_scope(|| {
                tracing::warn!(
                    failed,
                    of = received.len(),
                    "batch handler failed messages; retrying them one by one"
                )
            });
        }

        // One settle pass for what succeeded.
        let mut acks = Vec::with_capacity(received.len() - failed);
        let mut retries = Vec::with_capacity(failed);
        for ((r, acker), failure) in received.into_iter().zip(ackers).zip(failures) {
            match failure {
                None => {
                    self.metrics.add_handled();
                    self.instruments.handled();
                    acks.push(settle(acker.ack(), "ack"));
                }
                Some(error) => retries.push((r, acker, error)),
            }
        }
        futures::future::join_all(acks).await;

        // The failed ones on their own, in order, through the usual path.
        for (r, acker, error) in retries {
            let span = self.handle_span(&r);
            self.attempts(r, acker, stop.clone(), Some(error))
                .instrument(span)
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FailureKind;

    #[test]
    fn all_gives_every_message_the_error() {
        let failed = BatchError::all(HandlerError::permanent("db refused")).per_message(3);
        assert_eq!(failed.len(), 3);
        for f in &failed {
            let f = f.as_ref().expect("every message failed");
            assert_eq!(f.kind(), FailureKind::Permanent);
            assert_eq!(f.to_string(), "permanent: db refused");
        }
    }

    #[test]
    fn partial_names_positions_first_error_wins_outside_ignored() {
        let failed = BatchError::failed(2, "first")
            .and(0, HandlerError::permanent("zero"))
            .and(2, "second")
            .and(9, "outside")
            .per_message(3);
        let text: Vec<Option<String>> = failed
            .iter()
            .map(|f| f.as_ref().map(|e| e.to_string()))
            .collect();
        assert_eq!(
            text,
            [
                Some("permanent: zero".to_owned()),
                None,
                Some("handler: first".to_owned())
            ]
        );
    }

    #[test]
    fn check_is_ok_without_failures_and_question_mark_fails_all() {
        assert!(BatchError::check(Vec::new()).is_ok());
        let e = BatchError::check([(1, HandlerError::retryable("x"))]).unwrap_err();
        assert_eq!(e.failures().map(|f| f[0].0), Some(1));
        fn io() -> Result<(), BatchError> {
            Err(std::io::Error::other("disk full"))?
        }
        let e = io().unwrap_err();
        assert!(e.failures().is_none());
        assert_eq!(e.to_string(), "every message failed: handler: disk full");
    }

    #[tokio::test]
    async fn one_at_a_time_maps_the_batch_of_one() {
        let ok = OneAtATime(Arc::new(|_b: Vec<Received>| async {
            Err(BatchError::failed(3, "not in a batch of one"))
        }));
        let received = Received {
            message: crate::Message::new("x"),
            topic: Arc::from("t"),
            redelivered: false,
            partition: None,
            offset: None,
            attempt: 1,
        };
        assert!(ok.handle(received.clone()).await.is_ok());
        let fails = OneAtATime(Arc::new(|_b: Vec<Received>| async {
            Err(BatchError::failed(0, HandlerError::permanent("no")))
        }));
        let e = fails.handle(received).await.unwrap_err();
        assert_eq!(e.kind(), FailureKind::Permanent);
    }
}
