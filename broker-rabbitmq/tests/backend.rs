//! RabbitMQ-specific behaviour beyond the conformance suite.

mod common;

use std::time::Duration;

use broker_core::testkit::unique;
use broker_core::{Backoff, BrokerError, Message, Publisher, Subscriber, Subscription};
use broker_rabbitmq::{QueueType, RabbitMqBroker};

#[tokio::test]
async fn broker_down_at_start_retries_then_fails_clearly_without_password() {
    if !broker_core::testkit::backend_selected("rabbitmq") {
        return;
    }
    let started = std::time::Instant::now();
    let result = RabbitMqBroker::builder("amqp://app:s3cret-pw@127.0.0.1:1/%2f")
        .reconnect(
            Backoff::reconnect_default()
                .max_attempts(3)
                .initial_delay(Duration::from_millis(10)),
        )
        .connect()
        .await;
    let err = result.expect_err("nothing listens on port 1");
    assert!(
        matches!(err, BrokerError::Unavailable { attempts: 3, .. }),
        "{err:?}"
    );
    assert!(err.is_transient());
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!format!("{err} {err:?}").contains("s3cret-pw"), "{err:?}");
}

#[tokio::test]
async fn debug_and_bad_urls_never_show_the_password() {
    if !broker_core::testkit::backend_selected("rabbitmq") {
        return;
    }
    let broker = RabbitMqBroker::builder("amqps://app:s3cret-pw@rabbit.example:5671/prod")
        .build()
        .expect("amqps URLs are accepted");
    assert!(!format!("{broker:?}").contains("s3cret-pw"));
    let err = RabbitMqBroker::builder("amqp://app:s3cret-pw@host:notaport/")
        .build()
        .expect_err("bad port");
    assert!(!err.to_string().contains("s3cret-pw"), "{err}");
    assert!(!format!("{err:?}").contains("s3cret-pw"), "{err:?}");
    assert!(
        matches!(&err, BrokerError::Config(c) if c.to_string().contains("RABBITMQ_URL"))
            && !err.is_transient(),
        "a malformed URL is a config error naming the variable: {err:?}"
    );
}

#[tokio::test]
async fn mismatched_queue_type_is_a_clear_error_and_the_broker_stays_usable() {
    if !broker_core::testkit::backend_selected("rabbitmq") {
        return;
    }
    let topic = unique("rmq.mismatch");
    let classic = common::builder()
        .queue_type(QueueType::Classic)
        .connect()
        .await
        .expect("connect");
    let held = classic
        .subscribe(Subscription::new(&topic, "g"))
        .await
        .expect("classic subscribe");
    let quorum = common::builder()
        .queue_type(QueueType::Quorum)
        .connect()
        .await
        .expect("connect");
    let err = quorum
        .subscribe(Subscription::new(&topic, "g"))
        .await
        .err()
        .expect("quorum over classic must fail");
    assert!(
        matches!(err, BrokerError::Refused { .. }) && !err.is_transient(),
        "a conflicting declaration is final, not worth retrying: {err:?}"
    );
    let text = err.to_string();
    assert!(text.contains(&format!("{topic}:g")), "{text}");
    assert!(text.contains("x-queue-type"), "{text}");
    // Same connection, other queue: fine.
    let fresh = unique("rmq.fresh");
    quorum
        .subscribe(Subscription::new(&fresh, "g"))
        .await
        .expect("subscribe after a refused declaration");
    assert!(Publisher::health(&quorum).await.is_healthy());
    held.close().await.expect("close");
    let [a, b] = common::queues_of(&topic, "g");
    let [c, d] = common::queues_of(&fresh, "g");
    common::delete_queues([a, b, c, d]).await;
}

#[tokio::test]
async fn quorum_queues_roundtrip_and_redeliver() {
    if !broker_core::testkit::backend_selected("rabbitmq") {
        return;
    }
    let broker = common::builder()
        .queue_type(QueueType::Quorum)
        .connect()
        .await
        .expect("connect");
    let topic = unique("rmq.quorum");
    let mut stream = broker
        .subscribe(Subscription::new(&topic, "g"))
        .await
        .expect("subscribe");
    let sent = Message::new("q").with_key("k").with_header("h", "v");
    broker.publish(&topic, sent.clone()).await.expect("publish");
    let first = stream.next().await.expect("delivery").expect("ok");
    assert_eq!(first.message(), &sent);
    first.nack(true).await.expect("nack");
    let again = stream.next().await.expect("delivery").expect("ok");
    assert!(again.received.redelivered);
    assert_eq!(again.received.attempt, 2, "the queue counted one delivery");
    // Quorum queues add x-delivery-count; the message still reads back unchanged.
    assert_eq!(again.message(), &sent);
    again.ack().await.expect("ack");
    common::delete_queues(common::queues_of(&topic, "g")).await;
}

#[tokio::test]
async fn custom_exchange_and_health() {
    if !broker_core::testkit::backend_selected("rabbitmq") {
        return;
    }
    let broker = common::builder()
        .exchange("broker.test-custom")
        .connect()
        .await
        .expect("connect");
    assert_eq!(broker.exchange(), "broker.test-custom");
    let topic = unique("rmq.exchange");
    let mut stream = broker
        .subscribe(Subscription::new(&topic, "g"))
        .await
        .expect("subscribe");
    broker
        .publish(&topic, Message::new("e"))
        .await
        .expect("publish");
    stream
        .next()
        .await
        .expect("delivery")
        .expect("ok")
        .ack()
        .await
        .expect("ack");
    assert!(Subscriber::health(&broker).await.is_healthy());
    broker.close().await.expect("close");
    let after = broker.publish(&topic, Message::new("late")).await;
    assert!(matches!(after, Err(BrokerError::Closed(_))), "{after:?}");
    // The subscription ends instead of reconnecting.
    let end = tokio::time::timeout(Duration::from_secs(5), stream.next()).await;
    assert!(
        matches!(end, Ok(None)),
        "{:?}",
        end.map(|d| d.map(|d| d.map(|d| d.received)))
    );
    common::delete_queues(common::queues_of(&topic, "g")).await;
}

/// Dead letters are kept in the archive `{topic}.dlq` before anyone reads
/// them: group [`DEAD_LETTER_GROUP`] (the tooling's) reads the archive and
/// finds them; a new group of its own gets its own queue, which holds only
/// later letters. A dead-letter topic is a topic like any other: reading it
/// declares `{topic}.dlq.dlq`. The replay tool, as the archive's group,
/// moves the letters back to the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_wait_in_the_archive_and_replay() {
    if !broker_core::testkit::backend_selected("rabbitmq") {
        return;
    }
    use broker_core::migrate::replay_dead_letters;
    use broker_core::topic::dead_letter_topic;
    use broker_core::{Consumer, HandlerError, Received};
    use broker_rabbitmq::DEAD_LETTER_GROUP;

    let topic = unique("rmq.kept");
    let dlq = dead_letter_topic(&topic);
    let viewer = unique("viewer");
    let mut queues = vec![format!("{dlq}.dlq")];
    for group in ["g", DEAD_LETTER_GROUP, viewer.as_str()] {
        queues.extend(common::queues_of(&topic, group));
        queues.extend(common::queues_of(&dlq, group));
    }
    let broker = common::broker().await;
    let failing = Consumer::builder(broker.clone(), &topic, "g")
        .handler(|_r: Received| async { Err::<(), _>(HandlerError::permanent("refused")) })
        .start()
        .await
        .expect("consumer");
    let sent = Message::new("to the dlq").with_key("k");
    broker.publish(&topic, sent.clone()).await.expect("publish");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while failing.metrics().dead_lettered == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    failing
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");

    // A group that did not exist when the letter arrived: its own queue, empty.
    let mut late = broker
        .subscribe(Subscription::new(&dlq, &viewer))
        .await
        .expect("subscribe to the dlq");
    let nothing = tokio::time::timeout(Duration::from_millis(500), late.next()).await;
    assert!(
        nothing.is_err(),
        "a new group read a letter from before it existed"
    );
    late.close().await.expect("close");
    // The archive's group finds it.
    let mut archive = broker
        .subscribe(Subscription::new(&dlq, DEAD_LETTER_GROUP))
        .await
        .expect("subscribe to the archive");
    let letter = tokio::time::timeout(Duration::from_secs(10), archive.next())
        .await
        .expect("the kept dead letter")
        .expect("stream open")
        .expect("delivery");
    assert_eq!(letter.message().id(), sent.id());
    letter.nack(true).await.expect("hand it back");
    archive.close().await.expect("close archive reader");
    // Reading the dead-letter topic declared its own archive.
    assert!(common::queue_exists(&format!("{dlq}.dlq")).await);

    // Replay: back to the topic, x-dlq-* headers gone, id kept.
    let mut again = broker
        .subscribe(Subscription::new(&topic, "g"))
        .await
        .expect("resubscribe");
    let report = replay_dead_letters(
        &broker,
        &broker,
        &dlq,
        DEAD_LETTER_GROUP,
        10,
        Duration::from_secs(1),
    )
    .await
    .expect("replay");
    assert_eq!((report.replayed, report.left), (1, 0), "{report:?}");
    let back = tokio::time::timeout(Duration::from_secs(10), again.next())
        .await
        .expect("replayed message")
        .expect("stream open")
        .expect("delivery");
    assert_eq!(back.message().id(), sent.id());
    assert!(
        back.message()
            .headers()
            .iter()
            .all(|(h, _)| !h.starts_with("x-dlq-")),
        "{:?}",
        back.message().headers()
    );
    back.ack().await.expect("ack");
    again.close().await.expect("close");
    common::delete_queues(queues).await;
}
