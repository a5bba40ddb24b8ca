//! The conformance suite against the in-memory backend.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use broker_core::testkit::{unique, Capabilities, TestBackend};
use broker_core::{MemoryBroker, Publisher, Subscriber};

struct Memory(MemoryBroker);

#[async_trait]
impl TestBackend for Memory {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "memory",
            competing_consumers: true,
            reports_redelivery: true,
            max_message_bytes: 1024 * 1024,
            receive_timeout: Duration::from_secs(5),
            quiet_period: Duration::from_millis(200),
            keeps_amqp: true,
        }
    }
    async fn publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(self.0.clone())
    }
    async fn subscriber(&self) -> Arc<dyn Subscriber> {
        Arc::new(self.0.clone())
    }
    async fn topic(&self, hint: &str) -> String {
        unique(hint)
    }
    fn delayed_publish(&self) -> bool {
        true
    }
}

async fn memory() -> Memory {
    Memory(MemoryBroker::new())
}

broker_core::conformance_tests!(memory());
