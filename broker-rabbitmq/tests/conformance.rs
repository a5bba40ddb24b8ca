//! The conformance suite against a real RabbitMQ (`RABBITMQ_URL`).

mod common;

use common::rabbitmq_backend;

broker_core::conformance_tests!(backend = "rabbitmq", rabbitmq_backend());
