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
async fn unroutable_publish_is_rejected() {
    if !broker_core::testkit::backend_selected("rabbitmq") {
        return;
    }
    let broker = common::broker().await;
    let err = broker
        .publish(&unique("rmq.nobody"), Message::new("x"))
        .await
        .expect_err("no queue is bound");
    assert!(matches!(err, BrokerError::Rejected { .. }), "{err:?}");
    assert!(!err.is_transient());
    // The channel survives: a routable publish right after works.
    let topic = unique("rmq.somebody");
    let _s = broker
        .subscribe(Subscription::new(&topic, "g"))
        .await
        .expect("subscribe");
    broker
        .publish(&topic, Message::new("y"))
        .await
        .expect("publish");
}

#[tokio::test]
async fn mismatched_queue_type_is_a_clear_error_and_the_broker_stays_usable() {
    if !broker_core::testkit::backend_selected("rabbitmq") {
        return;
    }
    let topic = unique("rmq.mismatch");
    let classic = common::broker().await;
    let _s = classic
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
    quorum
        .subscribe(Subscription::new(unique("rmq.fresh"), "g"))
        .await
        .expect("subscribe after a refused declaration");
    assert!(Publisher::health(&quorum).await.is_healthy());
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
    // Quorum queues add x-delivery-count; the message still reads back unchanged.
    assert_eq!(again.message(), &sent);
    again.ack().await.expect("ack");
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
    broker.shutdown().await.expect("shutdown");
    let after = broker.publish(&topic, Message::new("late")).await;
    assert!(matches!(after, Err(BrokerError::Closed(_))), "{after:?}");
    // The subscription ends instead of reconnecting.
    let end = tokio::time::timeout(Duration::from_secs(5), stream.next()).await;
    assert!(
        matches!(end, Ok(None)),
        "{:?}",
        end.map(|d| d.map(|d| d.map(|d| d.received)))
    );
}

/// Dead letters kept before anyone reads `{topic}.dlq` are there for the
/// first reader, whatever its group; reading them declares no
/// `{topic}.dlq.dlq`; and the replay tool moves them back to the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_wait_for_their_first_reader_and_replay() {
    if !broker_core::testkit::backend_selected("rabbitmq") {
        return;
    }
    use broker_core::migrate::replay_dead_letters;
    use broker_core::topic::dead_letter_topic;
    use broker_core::{Consumer, HandlerError, Received};

    let topic = unique("rmq.kept");
    let dlq = dead_letter_topic(&topic);
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

    // A group that did not exist when the letter arrived still gets it.
    let mut viewer = broker
        .subscribe(Subscription::new(&dlq, unique("viewer")))
        .await
        .expect("subscribe to the dlq");
    let letter = tokio::time::timeout(Duration::from_secs(10), viewer.next())
        .await
        .expect("the kept dead letter")
        .expect("stream open")
        .expect("delivery");
    assert_eq!(letter.message().id(), sent.id());
    letter.nack(true).await.expect("hand it back");
    viewer.close().await.expect("close viewer");

    // No dead-letter queue of the dead-letter queue.
    let conn = lapin::Connection::connect(&common::url(), lapin::ConnectionProperties::default())
        .await
        .expect("raw connection");
    let channel = conn.create_channel().await.expect("channel");
    let passive = channel
        .queue_declare(
            format!("{dlq}.dlq").as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await;
    assert!(passive.is_err(), "{dlq}.dlq was declared");
    let _ = conn.close(200, "done".into()).await;

    // Replay: back to the topic, x-dlq-* headers gone, id kept.
    let mut again = broker
        .subscribe(Subscription::new(&topic, "g"))
        .await
        .expect("resubscribe");
    let report = replay_dead_letters(
        &broker,
        &broker,
        &dlq,
        "replayer",
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
}
