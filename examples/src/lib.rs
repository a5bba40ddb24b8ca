//! Example application modules on the broker library, each routed to its
//! broker by configuration (`BROKER_ROUTE_<MODULE>`, `KAFKA_ENABLED`,
//! `RABBITMQ_URL`) through the facade crate `broker` (its [`broker::Brokers`]
//! connects them), using nothing but the facade.
//!
//! - [`feature_usage`]: feature usage logs (`feature_usage_topic`).
//! - [`credits_process`]: ends of credit-consuming processes
//!   (`credits_process_end_topic`, `credits_process_end_multimodel_topic`);
//!   [`credits_ledger`] records and debits them on PostgreSQL through the
//!   transactional outbox and inbox.
//!
//! The `app` example runs both modules. The operator's tool (publish, tail,
//! dead letters, lag, health) is the `broker-cli` binary of the facade
//! (feature `cli`).

pub mod app;
pub mod credits_ledger;
pub mod credits_process;
pub mod feature_usage;
pub mod server;
