//! Message handlers and the errors they return.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;

use async_trait::async_trait;

use crate::delivery::Received;
use crate::error::BoxError;
use crate::event::Event;

/// Handles messages of a subscription. Closures
/// `Fn(Received) -> impl Future<Output = Result<(), HandlerError>>` are
/// handlers; use [`typed`] for decoded, validated events.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handles one message. An error is retried per the consumer's policy
    /// unless it is permanent; a panic counts as a retryable error.
    async fn handle(&self, message: Received) -> Result<(), HandlerError>;
}

#[async_trait]
impl<F, Fut> Handler for F
where
    F: Fn(Received) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    async fn handle(&self, message: Received) -> Result<(), HandlerError> {
        self(message).await
    }
}

/// Why a handler attempt failed; decides retry and the dead-letter headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// An ordinary error: retried.
    Handler,
    /// The handler said retrying cannot help: dead-lettered at once.
    Permanent,
    /// The payload could not be decoded: dead-lettered at once.
    Decode,
    /// The decoded event failed validation: dead-lettered at once.
    Validation,
    /// The handler panicked: retried like an ordinary error.
    Panic,
    /// The broker delivered the message more often than the consumer's
    /// delivery limit without it being settled (the consumer kept crashing
    /// on it): dead-lettered without calling the handler.
    DeliveryLimit,
}

impl FailureKind {
    /// Whether retrying may help.
    pub fn is_retryable(self) -> bool {
        matches!(self, FailureKind::Handler | FailureKind::Panic)
    }
    /// Short name, used in the `x-dlq-error-kind` header.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Handler => "handler",
            FailureKind::Permanent => "permanent",
            FailureKind::Decode => "decode",
            FailureKind::Validation => "validation",
            FailureKind::Panic => "panic",
            FailureKind::DeliveryLimit => "delivery-limit",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed handler attempt. Any error converts into a retryable one with
/// `?`; use [`HandlerError::permanent`] when retrying cannot help.
///
/// ```
/// use broker_core::{FailureKind, HandlerError};
/// fn parse(s: &str) -> Result<u32, HandlerError> {
///     Ok(s.parse::<u32>()?) // retryable by default
/// }
/// assert_eq!(parse("x").unwrap_err().kind(), FailureKind::Handler);
/// let e = HandlerError::permanent("account closed");
/// assert!(!e.kind().is_retryable());
/// ```
// Not `std::error::Error`, so that the blanket `From` below can exist
// (the same trick as `anyhow::Error`).
pub struct HandlerError {
    kind: FailureKind,
    source: BoxError,
}

impl HandlerError {
    /// An error of the given kind.
    pub fn new(kind: FailureKind, source: impl Into<BoxError>) -> Self {
        HandlerError {
            kind,
            source: source.into(),
        }
    }
    /// An error worth retrying.
    pub fn retryable(source: impl Into<BoxError>) -> Self {
        Self::new(FailureKind::Handler, source)
    }
    /// An error retrying cannot fix: dead-letter at once.
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        Self::new(FailureKind::Permanent, source)
    }
    /// The kind.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }
    /// The underlying error.
    pub fn source(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }
}

impl<E: Into<BoxError>> From<E> for HandlerError {
    fn from(e: E) -> Self {
        HandlerError::retryable(e)
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.source)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("kind", &self.kind)
            .field("source", &self.source)
            .finish()
    }
}

/// A handler of typed events: decodes and validates each message as `E`
/// (failures are permanent, so they are dead-lettered without retries), then
/// calls `f` with the event and the message metadata.
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// # use validator::Validate;
/// # #[derive(Serialize, Deserialize, Validate)] struct Ping { n: u32 }
/// # impl broker_core::Event for Ping { const TOPIC: &'static str = "demo.ping.sent"; }
/// use broker_core::{typed, Received};
/// let handler = typed(|ping: Ping, _meta: Received| async move {
///     println!("ping {}", ping.n);
///     Ok(())
/// });
/// # let _: &dyn broker_core::Handler = &handler;
/// ```
pub fn typed<E, F, Fut>(f: F) -> Typed<E, F>
where
    E: Event,
    F: Fn(E, Received) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    Typed {
        f,
        _event: PhantomData,
    }
}

/// See [`typed`].
pub struct Typed<E, F> {
    f: F,
    _event: PhantomData<fn() -> E>,
}

#[async_trait]
impl<E, F, Fut> Handler for Typed<E, F>
where
    E: Event,
    F: Fn(E, Received) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    async fn handle(&self, message: Received) -> Result<(), HandlerError> {
        let event = E::from_message(&message.message)?;
        (self.f)(event, message).await
    }
}
