//! Publish and consume events from an application server on Apache Kafka,
//! RabbitMQ or the in-memory broker, picked per module by configuration
//! (`KAFKA_ENABLED`, `KAFKA_BROKERS`, `RABBITMQ_URL`, `BROKER_ROUTE_<MODULE>`).
//! This is the one crate an application depends on.
//!
//! ```toml
//! [dependencies]
//! # default: both backends with TLS ("kafka-tls", "rabbitmq-rustls")
//! broker = { version = "0.1", default-features = false, features = ["rabbitmq-rustls"] }
//! ```
//!
//! | feature | what it adds |
//! |---|---|
//! | `kafka` | Kafka backend ([`kafka`], librdkafka), plaintext and SASL/PLAIN |
//! | `kafka-tls` | + TLS and SASL/SCRAM on the system OpenSSL (default) |
//! | `kafka-tls-vendored` | + TLS on OpenSSL built from source, linked statically |
//! | `rabbitmq` | RabbitMQ backend ([`rabbitmq`], lapin), `amqp://` |
//! | `rabbitmq-rustls` | + `amqps://` on rustls with aws-lc-rs (default) |
//! | `rabbitmq-rustls-ring` | + `amqps://` on rustls with ring (no aws-lc C build) |
//! | `rabbitmq-native-tls` | + `amqps://` on the platform's TLS (OpenSSL on Linux) |
//! | `testkit` | [`testkit`]: the backends' conformance suite and test helpers |
//! | `cli` | [`cli`]: the operator's tool, binary `broker-cli` (clap, indicatif) |
//! | `otel` | `otel`: W3C trace context from the current span into published messages, and into the handle span as its parent (OpenTelemetry) |
//! | `metrics` | the labelled metrics of [`metrics::names`] through the `metrics` facade |
//! | `prometheus` | + `prometheus`: a Prometheus recorder and the text for `/metrics` |
//! | `app` | [`App`]: the application runtime (default) |
//!
//! The in-memory broker is always there. A configuration that needs a
//! backend (or TLS) this build leaves out is a startup error naming the
//! variable and the feature.
//!
//! # Events
//!
//! `serde` and `validator` are re-exported, so the app's own versions of
//! them cannot clash with the library's. Their derives take the path:
//!
//! ```
//! use broker::serde::{Deserialize, Serialize};
//! use broker::validator::Validate;
//!
//! #[derive(Serialize, Deserialize, Validate)]
//! #[serde(crate = "broker::serde")]
//! #[validate(crate = "broker::validator")]
//! struct FeatureUsed {
//!     #[validate(length(min = 1))]
//!     user_id: String,
//! }
//! impl broker::Event for FeatureUsed {
//!     const TOPIC: &'static str = "app.usage.feature-used";
//!     fn partition_key(&self) -> Option<String> { Some(self.user_id.clone()) }
//! }
//!
//! // An event without rules does not derive `Validate`:
//! #[derive(Serialize, Deserialize)]
//! #[serde(crate = "broker::serde")]
//! struct Heartbeat { at_ms: i64 }
//! broker::no_validation!(Heartbeat);
//! impl broker::Event for Heartbeat {
//!     const TOPIC: &'static str = "app.health.heartbeat";
//! }
//!
//! assert!(broker::Event::to_message(&FeatureUsed { user_id: "".into() }).is_err());
//! assert!(broker::Event::to_message(&Heartbeat { at_ms: 1 }).is_ok());
//! ```
//!
//! # Wiring
//!
//! [`Brokers`] connects what the configuration enables and hands each
//! module its [`Endpoints`]; `BROKER_REQUIRE_REAL=true` refuses the
//! in-memory fallback (see [`wiring`]).
//!
//! ```no_run
//! use broker::{typed, Brokers, Event, PublisherExt, Received};
//! # #[derive(broker::serde::Serialize, broker::serde::Deserialize)]
//! # #[serde(crate = "broker::serde")]
//! # struct Heartbeat { at_ms: i64 }
//! # broker::no_validation!(Heartbeat);
//! # impl broker::Event for Heartbeat { const TOPIC: &'static str = "app.health.heartbeat"; }
//!
//! # async fn run() -> broker::Result<()> {
//! let brokers = Brokers::from_env().await?;           // KAFKA_*, RABBITMQ_*, BROKER_*
//! let health = brokers.endpoints("health")?;          // BROKER_ROUTE_HEALTH or the default
//! let consumer = health
//!     .consumer(Heartbeat::TOPIC, "monitor")
//!     .handler(typed(|beat: Heartbeat, _meta: Received| async move { Ok(()) }))
//!     .start()
//!     .await?;
//! health.publisher.publish_event(&Heartbeat { at_ms: 0 }).await?;
//! consumer.shutdown(std::time::Duration::from_secs(30)).await?;
//! brokers.close().await
//! # }
//! ```

#![forbid(unsafe_code)]

pub mod wiring;

/// The operator's command line tool (feature `cli`, binary `broker-cli`).
#[cfg(feature = "cli")]
pub mod cli;

pub use wiring::{Brokers, BrokersBuilder, Endpoints};

/// The application runtime (feature `app`, on by default): see [`App`].
#[cfg(feature = "app")]
pub mod app;
#[cfg(feature = "app")]
pub use app::{App, AppStatus, HealthReport, Running};

// The model and the two traits every backend implements.
pub use broker_core::{
    AmqpProperties, AmqpValue, HeaderValue, Headers, Health, Message, Publisher, Subscriber,
    Subscription,
};
// Typed events and handlers, and the one consumer runtime.
pub use broker_core::{
    typed, Consumer, ConsumerBuilder, ConsumerHandle, Event, FailureKind, Handler, HandlerError,
    PublisherExt, Received,
};
// Batch consume: handlers that get several messages at once.
pub use broker_core::{batch, typed_batch, BatchError, BatchHandler};
// Errors, retry policy, counters.
pub use broker_core::{Backoff, BrokerError, Metrics, MetricsSnapshot, Result, RetryMode};
// Brokers and the rest of the core, by module.
pub use broker_core::{config, delay, instrument, message, migrate, topic, MemoryBroker};

/// Counters, the names of the labelled metrics (feature `metrics`) and the
/// consumer-lag gauge.
pub use broker_core::metrics;

/// OpenTelemetry trace context on messages (feature `otel`).
#[cfg(feature = "otel")]
pub use broker_core::otel;
/// Prometheus exporter (feature `prometheus`).
#[cfg(feature = "prometheus")]
pub mod prometheus;

/// The conformance suite and test helpers (feature `testkit`).
#[cfg(feature = "testkit")]
pub use broker_core::testkit;
/// The Kafka backend (feature `kafka`).
#[cfg(feature = "kafka")]
pub use broker_kafka as kafka;
/// Transactional outbox and inbox on PostgreSQL (feature `outbox`).
#[cfg(feature = "outbox")]
pub use broker_outbox as outbox;
/// The RabbitMQ backend (feature `rabbitmq`).
#[cfg(feature = "rabbitmq")]
pub use broker_rabbitmq as rabbitmq;

/// The library's `serde`: derive with `#[serde(crate = "broker::serde")]`.
pub use serde;
/// The library's `serde_json`, which encodes typed events.
pub use serde_json;
/// The library's `validator`: derive with
/// `#[validate(crate = "broker::validator")]`.
pub use validator;

/// Declares that events of these types have no validation rules, so they
/// need not derive `Validate` (it implements `Validate` as always valid).
///
/// ```
/// #[derive(broker::serde::Serialize, broker::serde::Deserialize)]
/// #[serde(crate = "broker::serde")]
/// struct Ping { n: u32 }
/// broker::no_validation!(Ping);
///
/// impl broker::Event for Ping { const TOPIC: &'static str = "app.ops.ping"; }
/// assert!(broker::Event::to_message(&Ping { n: 1 }).is_ok());
/// ```
///
/// A type that derives `Validate` as well fails to compile (conflicting
/// implementations), so rules are never dropped by mistake.
#[macro_export]
macro_rules! no_validation {
    ($($event:ty),+ $(,)?) => {
        $(
            impl $crate::validator::Validate for $event {
                fn validate(&self) -> ::std::result::Result<(), $crate::validator::ValidationErrors> {
                    ::std::result::Result::Ok(())
                }
            }
        )+
    };
}
