//! The conformance suite: plain `pub async fn` checks that every backend's
//! tests call, gated by the backend's [`Capabilities`].
//!
//! A backend implements [`TestBackend`] and runs the whole suite with
//! [`conformance_tests!`](crate::conformance_tests):
//!
//! ```ignore
//! broker_core::conformance_tests!(my_backend());   // async fn my_backend() -> impl TestBackend
//! ```
//!
//! Each check panics with a message saying what was expected and what
//! happened. Topics and groups are unique per run, so checks can run in
//! parallel against one broker.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::consumer::{Consumer, ConsumerBuilder, ConsumerHandle};
mod batch;
mod checks;
mod delay;
mod model;
mod retry;
mod scale;
mod semantics;

pub use batch::*;
pub use checks::*;
pub use delay::*;
pub use model::*;
pub use retry::*;
pub use scale::*;
pub use semantics::*;

use crate::{
    Backoff, Delivery, DeliveryStream, Message, Publisher, Received, Subscriber, Subscription,
};

/// What a backend can do; checks that need more are skipped (with a line
/// on stderr saying so), never weakened.
#[derive(Debug, Clone)]
pub struct Capabilities {
    /// Backend name for messages.
    pub name: &'static str,
    /// Members of one group split the messages between them.
    pub competing_consumers: bool,
    /// The broker flags redeliveries ([`Received::redelivered`]).
    pub reports_redelivery: bool,
    /// The largest message the backend accepts.
    pub max_message_bytes: usize,
    /// How long to wait for a delivery (Kafka group joins take seconds).
    pub receive_timeout: Duration,
    /// How long to watch for a message that must not come.
    pub quiet_period: Duration,
    /// The backend carries typed AMQP header values and AMQP properties
    /// (RabbitMQ; memory keeps messages as they are). Without, typed values
    /// arrive as their text and AMQP properties are not carried.
    pub keeps_amqp: bool,
}

/// A backend under test.
#[async_trait]
pub trait TestBackend: Send + Sync {
    /// What the backend can do.
    fn capabilities(&self) -> Capabilities;
    /// A new publisher (its own connection where the backend has them).
    async fn publisher(&self) -> Arc<dyn Publisher>;
    /// A new subscriber (its own connection where the backend has them).
    async fn subscriber(&self) -> Arc<dyn Subscriber>;
    /// A topic name no other check uses, created, with its dead-letter
    /// topic, where the broker needs topics created.
    async fn topic(&self, hint: &str) -> String;
    /// A new publisher that names `groups` as required groups of `topic`:
    /// they must receive its messages even if they subscribe later. The
    /// default, [`TestBackend::publisher`], fits backends where a new group
    /// reads a topic from its start.
    async fn publisher_with_required_groups(
        &self,
        topic: &str,
        groups: &[String],
    ) -> Arc<dyn Publisher> {
        let _ = (topic, groups);
        self.publisher().await
    }
    /// Whether a group subscribing for the first time receives messages
    /// published before (Kafka's `earliest`, the memory backend's
    /// retention); not RabbitMQ, without required groups.
    fn new_groups_read_earlier_messages(&self) -> bool {
        true
    }
    /// A group that reads a dead-letter topic from its start where other new
    /// groups cannot (RabbitMQ's dead-letter archive); `None` when any group can.
    fn dead_letter_archive_group(&self) -> Option<String> {
        None
    }
    /// Whether the backend implements delayed publish
    /// ([`Publisher::publish_after`]); the delay checks skip it otherwise.
    /// A method rather than a [`Capabilities`] field so that backends
    /// without it need no change.
    fn delayed_publish(&self) -> bool {
        false
    }
}

/// Runs every check of the suite as its own `#[tokio::test]`.
///
/// `$backend` is an expression evaluating to a future of a [`TestBackend`].
/// With `backend = "name"` first, each check passes at once, printing
/// "skipped", when `BROKER_TEST_BACKENDS` is set and does not name the
/// backend (see [`backend_selected`]); the backend is then never built, so
/// no broker is needed.
///
/// ```ignore
/// broker_core::conformance_tests!(backend = "kafka", kafka_backend());
/// ```
#[macro_export]
macro_rules! conformance_tests {
    (backend = $name:literal, $backend:expr) => {
        $crate::conformance_tests!(@all ::core::option::Option::Some($name), $backend);
    };
    ($backend:expr) => {
        $crate::conformance_tests!(@all ::core::option::Option::None, $backend);
    };
    (@all $name:expr, $backend:expr) => {
        $crate::conformance_tests!(@each $name, $backend;
            roundtrip_keeps_payload_key_and_headers,
            topics_are_isolated,
            every_group_gets_every_message,
            members_of_a_group_share_messages,
            per_key_order_holds_under_concurrency,
            nack_redelivers,
            retries_then_dead_letters_with_headers,
            permanent_error_dead_letters_at_once,
            panic_counts_as_error,
            invalid_payload_dead_letters,
            unacked_redelivered_after_close,
            publisher_close_loses_nothing,
            concurrent_subscribe_and_close,
            shutdown_with_in_flight_messages,
            large_message_roundtrip,
            oversized_message_rejected,
            invalid_topic_rejected,
            health_is_reported,
            publish_before_any_subscription_succeeds,
            required_group_receives_earlier_messages,
            every_dead_letter_group_gets_every_letter,
            settling_after_close_is_closed,
            bytes_and_repeated_headers_arrive_exactly,
            typed_headers_and_properties_arrive_as_mapped,
            dead_letter_and_replay_keep_the_message,
            fifty_members_share_five_thousand,
            twenty_topics_with_the_same_ids,
            prefetch_bounds_unacked_deliveries,
            delayed_publish_arrives_after_its_delay_exactly,
            delayed_messages_arrive_in_due_order,
            delayed_message_waits_through_a_consumer_restart,
            batch_handler_gets_bounded_batches,
            batch_partial_failure_settles_each_message,
            batch_keeps_per_key_order,
            typed_batch_dead_letters_invalid_events,
            batch_shutdown_hands_back_unstarted,
            delayed_retry_lets_later_messages_pass,
            delayed_retry_dead_letters_after_the_last_attempt,
            delayed_retry_survives_a_consumer_restart,
        );
    };
    (@each $name:expr, $backend:expr; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let name: ::core::option::Option<&str> = $name;
                if let ::core::option::Option::Some(name) = name {
                    if !$crate::testkit::backend_selected(name) {
                        return;
                    }
                }
                let backend = $backend.await;
                $crate::testkit::$check(&backend).await;
            }
        )*
    };
}

/// Whether the tests of `backend` run: true unless `BROKER_TEST_BACKENDS`
/// (a comma-separated list such as `memory,rabbitmq`) is set and leaves it
/// out, in which case a "skipped" line is printed. Backend test helpers call
/// it before connecting, so a machine without a broker can still run the rest.
pub fn backend_selected(backend: &str) -> bool {
    let Ok(list) = std::env::var("BROKER_TEST_BACKENDS") else {
        return true;
    };
    let selected = list
        .split(',')
        .any(|b| b.trim().eq_ignore_ascii_case(backend));
    if !selected {
        eprintln!("skipped: BROKER_TEST_BACKENDS={list} does not include {backend}");
    }
    selected
}

/// A name unique to this run, for topics and groups.
pub fn unique(hint: &str) -> String {
    format!("{hint}-{}", uuid::Uuid::new_v4().simple())
}

/// Fast retries so checks run quickly.
pub fn fast_retry(attempts: u32) -> Backoff {
    Backoff::retry_default()
        .max_attempts(attempts)
        .initial_delay(Duration::from_millis(10))
        .max_delay(Duration::from_millis(50))
}

/// Subscribes `group` to `topic`.
pub async fn subscribe(b: &dyn TestBackend, topic: &str, group: &str) -> Box<dyn DeliveryStream> {
    b.subscriber()
        .await
        .subscribe(Subscription::new(topic, group))
        .await
        .unwrap_or_else(|e| panic!("subscribe {group} to {topic}: {e}"))
}

/// The next delivery, or a panic naming `what` after the receive timeout.
pub async fn next(
    b: &dyn TestBackend,
    stream: &mut Box<dyn DeliveryStream>,
    what: &str,
) -> Delivery {
    let timeout = b.capabilities().receive_timeout;
    match tokio::time::timeout(timeout, stream.next()).await {
        Ok(Some(Ok(d))) => d,
        Ok(Some(Err(e))) => panic!("{what}: subscription failed: {e}"),
        Ok(None) => panic!("{what}: subscription ended"),
        Err(_) => panic!("{what}: nothing delivered within {timeout:?}"),
    }
}

/// Receives and acks `n` deliveries; returns their messages in order.
pub async fn take_acked(
    b: &dyn TestBackend,
    stream: &mut Box<dyn DeliveryStream>,
    n: usize,
    what: &str,
) -> Vec<Received> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let d = next(b, stream, &format!("{what} ({i} of {n} received)")).await;
        out.push(d.received.clone());
        d.ack().await.unwrap_or_else(|e| panic!("{what}: ack: {e}"));
    }
    out
}

/// Panics if anything arrives within the quiet period.
pub async fn assert_quiet(b: &dyn TestBackend, stream: &mut Box<dyn DeliveryStream>, what: &str) {
    if let Ok(Some(d)) = tokio::time::timeout(b.capabilities().quiet_period, stream.next()).await {
        panic!("{what}: unexpected delivery {:?}", d.map(|d| d.received));
    }
}

pub(crate) fn ids(messages: &[Message]) -> BTreeSet<String> {
    messages.iter().map(|m| m.id().to_owned()).collect()
}

pub(crate) fn received_ids(received: &[Received]) -> BTreeSet<String> {
    received.iter().map(|r| r.message.id().to_owned()).collect()
}

pub(crate) fn numbered(n: usize, prefix: &str) -> Vec<Message> {
    (0..n)
        .map(|i| Message::new(format!("{prefix}-{i}")).with_key(format!("key-{}", i % 7)))
        .collect()
}

pub(crate) async fn publish_all(p: &dyn Publisher, topic: &str, messages: &[Message]) {
    p.publish_batch(topic, messages.to_vec())
        .await
        .unwrap_or_else(|e| panic!("publish_batch to {topic}: {e}"));
}

/// Records what a handler saw, and lets a check wait for it.
#[derive(Clone, Default)]
pub struct Recorder {
    seen: Arc<Mutex<Vec<Received>>>,
    changed: Arc<tokio::sync::Notify>,
}

impl Recorder {
    /// Records one message.
    pub fn record(&self, r: Received) {
        self.seen.lock().unwrap().push(r);
        self.changed.notify_waiters();
    }
    /// A handler that records every message and succeeds.
    pub fn handler(&self) -> impl crate::Handler {
        let recorder = self.clone();
        move |r: Received| {
            recorder.record(r);
            async { Ok(()) }
        }
    }
    /// Everything recorded so far.
    pub fn seen(&self) -> Vec<Received> {
        self.seen.lock().unwrap().clone()
    }
    /// Waits until `done` holds for what was recorded, or panics after `timeout`.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&[Received]) -> bool,
    ) {
        let result = tokio::time::timeout(timeout, async {
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if done(&self.seen.lock().unwrap()) {
                    return;
                }
                changed.await;
            }
        })
        .await;
        if result.is_err() {
            panic!(
                "{what}: not reached within {timeout:?}; recorded {} messages",
                self.seen().len()
            );
        }
    }
}

/// A consumer of `topic` in `group` on fresh connections, with fast retries.
pub(crate) async fn consumer(b: &dyn TestBackend, topic: &str, group: &str) -> ConsumerBuilder {
    Consumer::from_parts(b.subscriber().await, b.publisher().await, topic, group)
        .retry(fast_retry(3))
}

pub(crate) async fn start(builder: ConsumerBuilder) -> ConsumerHandle {
    builder
        .start()
        .await
        .unwrap_or_else(|e| panic!("consumer start: {e}"))
}

pub(crate) async fn stop(handle: ConsumerHandle) {
    handle
        .shutdown(Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("consumer shutdown: {e}"));
}
