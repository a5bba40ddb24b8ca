//! The Kafka test backend shared by this crate's integration tests.
//!
//! Tests talk to the broker at `KAFKA_BROKERS` (default `127.0.0.1:9092`,
//! where `scripts/ensure-tansu.sh start` runs tansu). When no broker
//! answers they fail with a message saying so. Tests check
//! `broker_core::testkit::backend_selected("kafka")` first, so with
//! `BROKER_TEST_BACKENDS` set without `kafka` they print "skipped" and pass.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use broker_core::config::KafkaSettings;
use broker_core::testkit::{unique, Capabilities, TestBackend};
use broker_core::{Backoff, Publisher, Subscriber};
use broker_kafka::{KafkaBroker, KafkaBrokerBuilder, TopicSpec};

/// Bootstrap servers under test.
pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// True when `KAFKA_REAL=1`: the broker is a real Apache Kafka, so checks
/// that tansu cannot pass (transactions, watermark lag) run too.
pub fn real_kafka() -> bool {
    std::env::var("KAFKA_REAL").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// Topics the tests create: 3 partitions, so groups really split work.
pub fn spec() -> TopicSpec {
    TopicSpec::default().partitions(3).replication_factor(1)
}

/// Options every test broker shares.
///
/// The short session timeout is for tansu, whose group join waits half of
/// it (15 s with the 30 s default; real Kafka waits
/// `group.initial.rebalance.delay.ms`, 3 s). It is a legal client setting
/// (Kafka's minimum is 6 s) with heartbeats well inside it.
pub fn builder() -> KafkaBrokerBuilder {
    KafkaBroker::builder(KafkaSettings::new(brokers()).client_id("broker-kafka-tests"))
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .topic_spec(spec())
        .reconnect(
            Backoff::reconnect_default()
                .max_attempts(5)
                .initial_delay(Duration::from_millis(100))
                .max_delay(Duration::from_secs(1)),
        )
}

/// A connected broker, or a failing test saying how to get one.
pub async fn broker() -> KafkaBroker {
    builder().connect().await.unwrap_or_else(|e| {
        panic!(
            "no Kafka broker at {} ({e}); start one with `bash scripts/ensure-tansu.sh start`, \
             or set BROKER_TEST_BACKENDS without `kafka` to skip the Kafka tests",
            brokers()
        )
    })
}

/// Largest message of the test brokers: the default limit.
pub const MAX_MESSAGE_BYTES: usize = 1_000_000 - 16 * 1024;

/// The conformance suite's view of Kafka: every publisher and subscriber is
/// its own client, as separate processes would be.
pub struct Kafka {
    admin: KafkaBroker,
}

#[async_trait]
impl TestBackend for Kafka {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "kafka",
            competing_consumers: true,
            // Kafka has no redelivery flag.
            reports_redelivery: false,
            max_message_bytes: MAX_MESSAGE_BYTES,
            // Group joins take seconds (about 5 s on tansu).
            receive_timeout: Duration::from_secs(45),
            quiet_period: Duration::from_secs(3),
            keeps_amqp: false,
        }
    }
    async fn publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(broker().await)
    }
    async fn subscriber(&self) -> Arc<dyn Subscriber> {
        Arc::new(broker().await)
    }
    async fn topic(&self, hint: &str) -> String {
        let topic = unique(&format!("kafka-test.{hint}"));
        self.admin
            .create_topic_with_dlq(&topic, &spec())
            .await
            .unwrap_or_else(|e| panic!("create topic {topic}: {e}"));
        topic
    }
    fn delayed_publish(&self) -> bool {
        true
    }
}

/// The backend of the conformance suite.
pub async fn kafka_backend() -> Kafka {
    Kafka {
        admin: broker().await,
    }
}
