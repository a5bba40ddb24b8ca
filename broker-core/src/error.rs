//! The one error type of publishing, subscribing and acknowledging.

use std::time::Duration;

use crate::config::ConfigError;
use crate::topic::TopicError;

/// Boxed source error from a broker client library (rdkafka, lapin, ...).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong while talking to a broker. Every variant says whether the
/// caller may retry the same call ([`BrokerError::is_transient`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The topic name is not valid; nothing was sent.
    #[error(transparent)]
    InvalidTopic(#[from] TopicError),

    /// The message is larger than the backend accepts; nothing was sent.
    #[error("message of {size} bytes exceeds the limit of {max} bytes")]
    MessageTooLarge {
        /// Size of payload, key and headers together.
        size: usize,
        /// The backend's limit.
        max: usize,
    },

    /// A typed event could not be encoded; nothing was sent.
    #[error("could not encode event: {0}")]
    Encode(#[source] serde_json::Error),

    /// A typed event failed validation; nothing was sent.
    #[error("event failed validation: {0}")]
    Validation(#[from] validator::ValidationErrors),

    /// Invalid configuration, naming the variable.
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// The broker could not be reached within the reconnect policy.
    #[error("{backend} unavailable after {attempts} attempts: {source}")]
    Unavailable {
        /// Backend name (`kafka`, `rabbitmq`, `memory`).
        backend: &'static str,
        /// Connection attempts made.
        attempts: usize,
        /// The last error seen.
        #[source]
        source: BoxError,
    },

    /// The broker did not answer in time.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// What was being waited for.
        operation: &'static str,
        /// How long we waited.
        after: Duration,
    },

    /// The broker refused the message (for example RabbitMQ returned an
    /// unroutable mandatory message or nacked a publish).
    #[error("{backend} rejected the message: {reason}")]
    Rejected {
        /// Backend name.
        backend: &'static str,
        /// Why, as reported by the broker.
        reason: String,
    },

    /// Some messages of a batch failed; the others were accepted.
    #[error("{} of {total} messages in the batch failed; first: {}", failed.len(), failed.first().map(|f| f.error.to_string()).unwrap_or_default())]
    Batch {
        /// Size of the batch.
        total: usize,
        /// Failures by position in the batch.
        failed: Vec<BatchFailure>,
    },

    /// The broker refused an operation for a reason retrying cannot fix:
    /// access denied, or a declaration that conflicts with what exists (a
    /// queue declared earlier with other arguments, say). Never transient.
    #[error("{backend} refused {operation}: {reason}")]
    Refused {
        /// Backend name.
        backend: &'static str,
        /// What was refused (`declare queue`, `publish`, ...).
        operation: &'static str,
        /// Why, as reported by the broker.
        reason: String,
    },

    /// The delay asked of a delayed publish is above the largest delay tier
    /// ([`crate::delay::MAX_DELAY`]); nothing was sent.
    #[error("a delay of {delay:?} is above the longest delay, {max:?}")]
    DelayTooLong {
        /// The delay asked for.
        delay: Duration,
        /// The longest delay accepted.
        max: Duration,
    },

    /// The publisher cannot do what was asked (a delayed publish on a
    /// backend without delayed publish, say); nothing was sent.
    #[error("{backend} does not support {operation}")]
    Unsupported {
        /// Backend name.
        backend: &'static str,
        /// What it cannot do.
        operation: &'static str,
    },

    /// A consumer was started without something it needs.
    #[error("consumer misconfigured: {0}")]
    Misconfigured(&'static str),

    /// The publisher or subscriber was closed.
    #[error("{0} is closed")]
    Closed(&'static str),

    /// Any other error of the broker client library.
    #[error("{backend}: {source}")]
    Backend {
        /// Backend name.
        backend: &'static str,
        /// The client library's error.
        #[source]
        source: BoxError,
    },
}

/// One failed message of a batch publish.
#[derive(Debug)]
pub struct BatchFailure {
    /// Index of the message in the batch.
    pub index: usize,
    /// Why it failed.
    pub error: BrokerError,
}

impl BrokerError {
    /// Wraps a client library error.
    pub fn backend(backend: &'static str, source: impl Into<BoxError>) -> Self {
        BrokerError::Backend {
            backend,
            source: source.into(),
        }
    }

    /// True when the same call may succeed later (broker down, timeout).
    /// Bad input (topic, size, validation, config) is never transient.
    pub fn is_transient(&self) -> bool {
        match self {
            BrokerError::Unavailable { .. }
            | BrokerError::Timeout { .. }
            | BrokerError::Backend { .. } => true,
            BrokerError::Batch { failed, .. } => failed.iter().all(|f| f.error.is_transient()),
            _ => false,
        }
    }
}

/// Result alias for broker operations.
pub type Result<T, E = BrokerError> = std::result::Result<T, E>;
