//! Delayed publish on RabbitMQ beyond the conformance suite: the delay
//! queues themselves, one group's delay queue, classic delay queues, and a
//! message that falls due before any group's queue exists.

mod common;

use std::time::{Duration, Instant};

use broker_core::delay::Tier;
use broker_core::testkit::unique;
use broker_core::{BrokerError, DeliveryStream, Message, Publisher, Subscriber, Subscription};
use broker_rabbitmq::{QueueType, RabbitMqBroker};

/// How many messages `queue` holds (a passive declaration on a connection
/// of its own); `None` when it does not exist.
async fn message_count(queue: &str) -> Option<u32> {
    let conn = lapin::Connection::connect(&common::url(), lapin::ConnectionProperties::default())
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
    passive.ok().map(|q| q.message_count())
}

fn tier(delay: Duration) -> Tier {
    Tier::for_delay(delay).unwrap().unwrap()
}

async fn next_within(
    stream: &mut Box<dyn DeliveryStream>,
    within: Duration,
    what: &str,
) -> Message {
    let d = tokio::time::timeout(within, stream.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {within:?}"))
        .unwrap_or_else(|| panic!("{what}: stream ended"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let message = d.message().clone();
    assert_eq!(d.received.attempt, 1, "{what}: a first delivery");
    d.ack().await.expect("ack");
    message
}

async fn quiet(stream: &mut Box<dyn DeliveryStream>, for_: Duration, what: &str) {
    if let Ok(Some(d)) = tokio::time::timeout(for_, stream.next()).await {
        panic!("{what}: unexpected delivery {:?}", d.map(|d| d.received));
    }
}

/// Queues to delete at the end, also when a test fails midway.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut self.0);
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime")
                .block_on(common::delete_queues(queues))
        })
        .join();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_message_waits_in_the_tier_queue_and_outlives_its_publisher() {
    if !broker_core::testkit::backend_selected("rabbitmq") {
        return;
    }
    let topic = unique("rmq.delay-queue");
    let group = unique("g");
    let delay = Duration::from_millis(1_500);
    let delay_queue = RabbitMqBroker::delay_queue_name(&topic, tier(delay));
    assert_eq!(delay_queue, format!("{topic}.delay.5s"));
    let _cleanup = Cleanup(
        common::queues_of(&topic, &group)
            .into_iter()
            .chain([delay_queue.clone()])
            .collect(),
    );
    let consumer = common::broker().await;
    let mut stream = consumer
        .subscribe(Subscription::new(&topic, &group))
        .await
        .expect("subscribe");

    let publisher = common::broker().await;
    let sent = Message::new("later").with_key("k");
    let started = Instant::now();
    publisher
        .publish_after(&topic, sent.clone(), delay)
        .await
        .expect("publish_after");
    // Confirmed means it is in the delay queue, not yet in the group's.
    assert_eq!(message_count(&delay_queue).await, Some(1));
    // The publisher going away does not matter: the broker holds it.
    publisher.close().await.expect("close the publisher");

    let got = next_within(&mut stream, Duration::from_secs(10), "delayed").await;
    let waited = started.elapsed();
    assert_eq!(got, sent);
    assert!(
        waited >= tier(delay).duration(),
        "waited its tier, 5 s: {waited:?}"
    );
    assert_eq!(message_count(&delay_queue).await, Some(0), "released");
    quiet(&mut stream, Duration::from_millis(500), "once").await;
    stream.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_for_one_group_reaches_that_group_only() {
    if !broker_core::testkit::backend_selected("rabbitmq") {
        return;
    }
    let topic = unique("rmq.delay-group");
    let (target, other) = (unique("target"), unique("other"));
    let delay = Duration::from_millis(800);
    let group_queue = RabbitMqBroker::group_delay_queue_name(&topic, &target, tier(delay));
    assert_eq!(group_queue, format!("{topic}.delay.1s@{target}"));
    let _cleanup = Cleanup(
        common::queues_of(&topic, &target)
            .into_iter()
            .chain(common::queues_of(&topic, &other))
            .chain([group_queue.clone()])
            .collect(),
    );
    let broker = common::broker().await;
    let mut to_target = broker
        .subscribe(Subscription::new(&topic, &target))
        .await
        .expect("subscribe target");
    let mut to_other = broker
        .subscribe(Subscription::new(&topic, &other))
        .await
        .expect("subscribe other");

    let retry = Message::new("retry for one group").with_header("h", "1");
    let started = Instant::now();
    broker
        .publish_after_to_group(&topic, &target, retry.clone(), delay)
        .await
        .expect("publish_after_to_group");
    let now = Message::new("at once, one group");
    broker
        .publish_after_to_group(&topic, &target, now.clone(), Duration::ZERO)
        .await
        .expect("publish_after_to_group without delay");

    assert_eq!(
        next_within(&mut to_target, Duration::from_secs(5), "at once").await,
        now
    );
    assert!(started.elapsed() < delay, "no delay: at once");
    assert_eq!(
        next_within(&mut to_target, Duration::from_secs(10), "delayed").await,
        retry
    );
    assert!(started.elapsed() >= delay);
    quiet(&mut to_other, Duration::from_secs(1), "the other group").await;

    let empty = broker
        .publish_after_to_group(&topic, "", Message::new("x"), delay)
        .await;
    assert!(
        matches!(empty, Err(BrokerError::Misconfigured(_))),
        "{empty:?}"
    );
    to_target.close().await.expect("close");
    to_other.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_delay_queues_delay_too() {
    if !broker_core::testkit::backend_selected("rabbitmq") {
        return;
    }
    let topic = unique("rmq.delay-classic");
    let group = unique("g");
    let delay = Duration::from_millis(700);
    let _cleanup = Cleanup(
        common::queues_of(&topic, &group)
            .into_iter()
            .chain([RabbitMqBroker::delay_queue_name(&topic, tier(delay))])
            .collect(),
    );
    let broker = common::builder()
        .queue_type(QueueType::Classic)
        .connect()
        .await
        .expect("connect");
    let mut stream = broker
        .subscribe(Subscription::new(&topic, &group))
        .await
        .expect("subscribe");
    let sent = Message::new("classic").with_correlation_id("c-1");
    let started = Instant::now();
    broker
        .publish_after(&topic, sent.clone(), delay)
        .await
        .expect("publish_after");
    assert_eq!(
        next_within(&mut stream, Duration::from_secs(10), "classic delay").await,
        sent
    );
    assert!(started.elapsed() >= delay);
    stream.close().await.expect("close");
}

/// Quorum delay queues dead-letter at least once: a message due while no
/// queue is bound for its topic stays in the delay queue, and RabbitMQ
/// sends it on once a group exists, at its dead-letter worker's next retry
/// (it re-sends a dead letter 3 minutes after the last try, checked every
/// 3 minutes on 3.10, so up to about 6 minutes): slow, so run on demand
/// (`cargo test -p broker-rabbitmq --test delay -- --ignored`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "waits for RabbitMQ's dead-letter retry (up to 6 minutes); run with --ignored"]
async fn a_message_due_before_any_group_exists_waits_for_one() {
    if !broker_core::testkit::backend_selected("rabbitmq") {
        return;
    }
    let topic = unique("rmq.delay-unbound");
    let group = unique("late");
    let delay = Duration::from_millis(300);
    let _cleanup = Cleanup(
        common::queues_of(&topic, &group)
            .into_iter()
            .chain([RabbitMqBroker::delay_queue_name(&topic, tier(delay))])
            .collect(),
    );
    // The delay queue must outlive the wait: an expiring queue goes, with
    // the dead letters it keeps, once unused for its expiry.
    let broker = common::builder()
        .queue_expiry(Duration::from_secs(900))
        .connect()
        .await
        .expect("connect");
    let sent = Message::new("nobody yet");
    broker
        .publish_after(&topic, sent.clone(), delay)
        .await
        .expect("publish_after");
    // Past due with no queue bound.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut stream = broker
        .subscribe(Subscription::new(&topic, &group))
        .await
        .expect("subscribe");
    assert_eq!(
        next_within(
            &mut stream,
            Duration::from_secs(420),
            "after the group appeared"
        )
        .await,
        sent
    );
    quiet(&mut stream, Duration::from_millis(500), "once").await;
    stream.close().await.expect("close");
}
