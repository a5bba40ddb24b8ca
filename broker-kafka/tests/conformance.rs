//! The conformance suite against a Kafka-protocol broker (`KAFKA_BROKERS`;
//! tansu from `scripts/ensure-tansu.sh` in the project's test run).

mod common;

use common::kafka_backend;

broker_core::conformance_tests!(backend = "kafka", kafka_backend());
