//! The RabbitMQ test backend shared by this crate's integration tests.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use broker_core::testkit::{unique, Capabilities, TestBackend};
use broker_core::topic::dead_letter_topic;
use broker_core::{Backoff, DeliveryStream, Health, Publisher, Result, Subscriber, Subscription};
use broker_rabbitmq::{RabbitMqBroker, RabbitMqBuilder, DEAD_LETTER_GROUP};

/// The broker the tests use (`RABBITMQ_URL`, default the local guest account).
pub fn url() -> String {
    std::env::var("RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// How long test queues live without consumers: `RABBITMQ_QUEUE_EXPIRY_MS`
/// (the test command sets it), else two minutes. Tests delete the queues
/// they know of; the expiry catches the rest (a test that failed midway).
pub fn queue_expiry() -> Duration {
    std::env::var("RABBITMQ_QUEUE_EXPIRY_MS")
        .ok()
        .and_then(|ms| ms.trim().parse().ok())
        .map_or(Duration::from_secs(120), Duration::from_millis)
}

/// Options every test broker shares: a test exchange, queues that expire
/// when unused (so runs do not pile up queues), quick reconnects.
pub fn builder() -> RabbitMqBuilder {
    RabbitMqBroker::builder(url())
        .exchange("broker.test")
        .queue_expiry(queue_expiry())
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

/// The queues a subscription of `group` to `topic` declares: the group's
/// queue and the topic's dead-letter archive.
pub fn queues_of(topic: &str, group: &str) -> [String; 2] {
    [
        RabbitMqBroker::queue_name(topic, group),
        dead_letter_topic(topic),
    ]
}

/// Deletes `queues` (those that exist) on a connection of its own; every
/// wait bounded. Returns how many it could not delete.
pub async fn delete_queues(queues: impl IntoIterator<Item = String>) -> usize {
    let queues: Vec<String> = queues.into_iter().collect();
    let work = async {
        let conn =
            lapin::Connection::connect(&url(), lapin::ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        let mut failed = 0;
        for queue in &queues {
            let deleted = channel
                .queue_delete(
                    queue.as_str().into(),
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await;
            if deleted.is_err() {
                failed += 1;
            }
        }
        let _ = conn.close(200, "cleaned up".into()).await;
        Ok::<_, lapin::Error>(failed)
    };
    match tokio::time::timeout(Duration::from_secs(20), work).await {
        Ok(Ok(failed)) => failed,
        _ => queues.len(),
    }
}

/// Whether `queue` exists (a passive declaration on a connection of its own).
pub async fn queue_exists(queue: &str) -> bool {
    let conn = lapin::Connection::connect(&url(), lapin::ConnectionProperties::default())
        .await
        .expect("raw connection");
    let channel = conn.create_channel().await.expect("channel");
    let passive = tokio::time::timeout(
        Duration::from_secs(10),
        channel.queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        ),
    )
    .await
    .expect("passive declare answered");
    let _ = conn.close(200, "done".into()).await;
    passive.is_ok()
}

/// Queues created through a [`Rabbit`] backend, deleted when it goes.
#[derive(Clone, Default)]
pub struct Created(Arc<Mutex<BTreeSet<String>>>);

impl Created {
    fn add(&self, topic: &str, group: &str) {
        self.0.lock().unwrap().extend(queues_of(topic, group));
    }
}

/// Every delay queue `topic` can have, one per tier.
pub fn delay_queues_of(topic: &str) -> Vec<String> {
    broker_core::delay::Tier::all()
        .map(|tier| RabbitMqBroker::delay_queue_name(topic, tier))
        .collect()
}

/// A subscriber that notes the queues it declares.
struct Noting {
    broker: RabbitMqBroker,
    created: Created,
    /// The group's delay queues of every tier (delayed retries may declare them).
    possible: Created,
}

#[async_trait]
impl Subscriber for Noting {
    async fn subscribe(&self, subscription: Subscription) -> Result<Box<dyn DeliveryStream>> {
        self.created.add(&subscription.topic, &subscription.group);
        self.possible
            .0
            .lock()
            .unwrap()
            .extend(broker_core::delay::Tier::all().map(|tier| {
                RabbitMqBroker::group_delay_queue_name(
                    &subscription.topic,
                    &subscription.group,
                    tier,
                )
            }));
        self.broker.subscribe(subscription).await
    }
    async fn health(&self) -> Health {
        Subscriber::health(&self.broker).await
    }
    fn backend_name(&self) -> &'static str {
        Subscriber::backend_name(&self.broker)
    }
    fn delayed_retry(&self) -> bool {
        self.broker.delayed_retry()
    }
}

/// The conformance suite's view of RabbitMQ: every publisher and subscriber
/// gets its own connection, as separate processes would. The queues its
/// subscribers and required groups declare are deleted when it is dropped
/// (at the end of each check, also a failed one).
#[derive(Default)]
pub struct Rabbit {
    created: Created,
    /// Queues that may have been declared: the delay queues of every topic
    /// handed out, whichever tiers its checks used (deleting one that does
    /// not exist succeeds). Deleted with the rest; not in [`Rabbit::queues`].
    possible: Created,
}

impl Rabbit {
    /// The queues noted so far (deleted when the backend is dropped).
    pub fn queues(&self) -> Vec<String> {
        self.created.0.lock().unwrap().iter().cloned().collect()
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        let mut queues =
            std::mem::take(&mut *self.created.0.lock().unwrap_or_else(|e| e.into_inner()));
        queues.append(&mut self.possible.0.lock().unwrap_or_else(|e| e.into_inner()));
        if queues.is_empty() {
            return;
        }
        // Its own runtime on its own thread: drop may run inside or outside one.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            runtime.block_on(delete_queues(queues))
        });
        if let Ok(failed) = cleanup.join() {
            if failed > 0 {
                eprintln!("{failed} test queues not deleted (they expire)");
            }
        }
    }
}

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
        Arc::new(Noting {
            broker: broker().await,
            created: self.created.clone(),
            possible: self.possible.clone(),
        })
    }
    async fn topic(&self, hint: &str) -> String {
        let topic = unique(&format!("rmq.{hint}"));
        self.possible
            .0
            .lock()
            .unwrap()
            .extend(delay_queues_of(&topic));
        topic
    }
    async fn publisher_with_required_groups(
        &self,
        topic: &str,
        groups: &[String],
    ) -> Arc<dyn Publisher> {
        for group in groups {
            self.created.add(topic, group);
        }
        let broker = builder()
            .required_groups(topic, groups.iter().cloned())
            .connect()
            .await
            .expect("connect with required groups");
        Arc::new(broker)
    }
    fn new_groups_read_earlier_messages(&self) -> bool {
        false
    }
    fn dead_letter_archive_group(&self) -> Option<String> {
        Some(DEAD_LETTER_GROUP.to_owned())
    }
    fn delayed_publish(&self) -> bool {
        true
    }
}

pub async fn rabbitmq_backend() -> Rabbit {
    Rabbit::default()
}
