//! Brokers for the examples' tests: memory, the tansu Kafka at
//! `KAFKA_BROKERS`, the RabbitMQ at `RABBITMQ_URL` (the test script starts both).

#![allow(dead_code)]

use std::time::Duration;

use broker::config::{BrokerConfig, BrokerKind, KafkaSettings, RabbitMqSettings, Route};
use broker::testkit::backend_selected;
use broker::Brokers;

/// Kafka settings for the test broker. The short session timeout is for
/// tansu, whose first group join waits half of it.
pub fn kafka_settings() -> KafkaSettings {
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned());
    KafkaSettings::new(brokers)
        .client_id("examples-tests")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
}

/// RabbitMQ settings for the test broker.
pub fn rabbitmq_settings() -> RabbitMqSettings {
    RabbitMqSettings::new(
        std::env::var("RABBITMQ_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()),
    )
}

/// Connected brokers where every module takes `kind`, or `None` (the test
/// then returns: skipped) when `BROKER_TEST_BACKENDS` leaves that backend out.
pub async fn brokers_for(kind: BrokerKind) -> Option<Brokers> {
    let mut config = BrokerConfig::builder();
    match kind {
        BrokerKind::Memory => {}
        BrokerKind::Kafka => {
            if !backend_selected("kafka") {
                return None;
            }
            config = config.kafka(kafka_settings());
        }
        BrokerKind::RabbitMq => {
            if !backend_selected("rabbitmq") {
                return None;
            }
            config = config.rabbitmq(rabbitmq_settings());
        }
    }
    let config = config.build().expect("config");
    assert_eq!(config.default_route(), Route::Single(kind));
    Some(Brokers::connect(config).await.expect("connect"))
}

/// How long to wait for deliveries (Kafka group joins take seconds on tansu).
pub const WAIT: Duration = Duration::from_secs(60);
