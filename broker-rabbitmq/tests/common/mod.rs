//! The RabbitMQ test backend shared by this crate's integration tests.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use broker_core::testkit::{unique, Capabilities, TestBackend};
use broker_core::{Backoff, Publisher, Subscriber};
use broker_rabbitmq::{RabbitMqBroker, RabbitMqBuilder};

/// The broker the tests use (`RABBITMQ_URL`, default the local guest account).
pub fn url() -> String {
    std::env::var("RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// Options every test broker shares: a test exchange, queues that expire
/// when unused (so runs do not pile up queues), quick reconnects.
pub fn builder() -> RabbitMqBuilder {
    RabbitMqBroker::builder(url())
        .exchange("broker.test")
        .queue_expiry(Duration::from_secs(600))
        .connection_name("broker-rabbitmq tests")
        .reconnect(
            Backoff::reconnect_default()
                .max_attempts(20)
                .initial_delay(Duration::from_millis(100))
                .max_delay(Duration::from_secs(2)),
        )
}

/// A connected broker with the test options.
pub async fn broker() -> RabbitMqBroker {
    builder().connect().await.unwrap_or_else(|e| {
        panic!(
            "RabbitMQ at {}: {e}",
            broker_core::config::SecretUrl::new(url())
        )
    })
}

pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The conformance suite's view of RabbitMQ: every publisher and subscriber
/// gets its own connection, as separate processes would.
pub struct Rabbit;

#[async_trait]
impl TestBackend for Rabbit {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "rabbitmq",
            competing_consumers: true,
            reports_redelivery: true,
            max_message_bytes: MAX_MESSAGE_BYTES,
            receive_timeout: Duration::from_secs(10),
            quiet_period: Duration::from_millis(500),
            keeps_amqp: true,
        }
    }
    async fn publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(broker().await)
    }
    async fn subscriber(&self) -> Arc<dyn Subscriber> {
        Arc::new(broker().await)
    }
    async fn topic(&self, hint: &str) -> String {
        unique(&format!("rmq.{hint}"))
    }
}

pub async fn rabbitmq_backend() -> Rabbit {
    Rabbit
}
