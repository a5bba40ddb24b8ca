//! Kafka behaviour beyond the conformance suite, against the test broker:
//! topic creation is idempotent, and a member leaving mid-stream hands its
//! partitions over without losing anything.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use broker_core::testkit::{backend_selected, unique, Recorder};
use broker_core::{Consumer, Message, Publisher};
use broker_kafka::TopicSpec;
use rdkafka::consumer::{BaseConsumer, Consumer as _};

fn partitions_of(broker: &broker_kafka::KafkaBroker, topic: &str) -> usize {
    let probe: BaseConsumer = broker
        .consumer_client_config("metadata-probe")
        .create()
        .expect("probe");
    let metadata = probe
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_an_existing_topic_succeeds_and_keeps_it() {
    if !backend_selected("kafka") {
        return;
    }
    let broker = common::broker().await;
    let topic = unique("kafka-test.admin");
    let spec = TopicSpec::default().partitions(5).replication_factor(1);
    broker
        .create_topic_with_dlq(&topic, &spec)
        .await
        .expect("create");
    broker
        .publish(&topic, Message::new("kept"))
        .await
        .expect("publish");
    // Again, from another client that does not know the topic, and with
    // another partition count: fine, and the topic stays as it is.
    let other = common::broker().await;
    other
        .create_topic_with_dlq(&topic, &TopicSpec::default().partitions(2))
        .await
        .expect("create again");
    assert_eq!(partitions_of(&other, &topic), 5);
    assert_eq!(partitions_of(&other, &format!("{topic}.dlq")), 5);
    let invalid = other
        .create_topic(&"x".repeat(250), &spec)
        .await
        .expect_err("name too long");
    assert!(
        matches!(invalid, broker_core::BrokerError::InvalidTopic(_)),
        "{invalid:?}"
    );
}

/// Two members share a topic; one leaves while messages keep coming. The
/// other takes its partitions over and every published message is handled
/// at least once (a message the leaver had not committed may be handled
/// twice: at-least-once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_leaving_mid_stream_hands_over_without_loss() {
    if !backend_selected("kafka") {
        return;
    }
    let backend = common::kafka_backend().await;
    let topic = broker_core::testkit::TestBackend::topic(&backend, "rebalance").await;
    let group = unique("g");
    let publisher = common::broker().await;
    let (first, second) = (Recorder::default(), Recorder::default());
    let start = |recorder: &Recorder| {
        let (topic, group) = (topic.clone(), group.clone());
        let handler = recorder.handler();
        async move {
            Consumer::builder(common::broker().await, topic, group)
                .concurrency(4)
                .handler(handler)
                .start()
                .await
                .expect("consumer")
        }
    };
    let leaving = start(&first).await;
    let staying = start(&second).await;

    let mut sent = BTreeSet::new();
    let mut publish = |from: usize, to: usize| {
        let messages: Vec<Message> = (from..to)
            .map(|i| Message::new(format!("m{i}")).with_key(format!("k{}", i % 16)))
            .collect();
        sent.extend(messages.iter().map(|m| m.id().to_owned()));
        let publisher = publisher.clone();
        let topic = topic.clone();
        async move {
            publisher
                .publish_batch(&topic, messages)
                .await
                .expect("publish")
        }
    };
    // Keep publishing until both members hold partitions (each handled some).
    let mut next = 0;
    while first.seen().is_empty() || second.seen().is_empty() {
        assert!(next < 5_000, "the group never split the partitions");
        publish(next, next + 100).await;
        next += 100;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Leave while messages of the leaver's partitions are still coming.
    publish(next, next + 200).await;
    leaving
        .shutdown(Duration::from_secs(10))
        .await
        .expect("leave");
    publish(next + 200, next + 400).await;

    let handled = |r: &Recorder| -> BTreeSet<String> {
        r.seen().iter().map(|d| d.message.id().to_owned()).collect()
    };
    // (The closure gets the second recorder's deliveries; asking the
    // recorder itself from inside would wait on its own lock.)
    second
        .wait_until(Duration::from_secs(90), "every message handled", |s| {
            let by_second: BTreeSet<String> = s.iter().map(|d| d.message.id().to_owned()).collect();
            handled(&first).union(&by_second).count() >= sent.len()
        })
        .await;
    staying
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
    let all: BTreeSet<String> = handled(&first).union(&handled(&second)).cloned().collect();
    assert_eq!(all, sent, "every published message handled");
    let duplicates = first.seen().len() + second.seen().len() - sent.len();
    eprintln!(
        "leaver handled {}, stayer {}, duplicates {duplicates}",
        first.seen().len(),
        second.seen().len()
    );
    assert!(
        !second.seen().is_empty(),
        "the remaining member took over the partitions"
    );
}

/// A dead letter from Kafka says where its original was: partition and offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_carry_partition_and_offset() {
    if !backend_selected("kafka") {
        return;
    }
    use broker_core::message::header;
    use broker_core::{HandlerError, Received, Subscriber, Subscription};

    let backend = common::kafka_backend().await;
    let topic = broker_core::testkit::TestBackend::topic(&backend, "dlq-position").await;
    let broker = common::broker().await;
    let mut letters = broker
        .subscribe(Subscription::new(
            broker_core::topic::dead_letter_topic(&topic),
            unique("viewer"),
        ))
        .await
        .expect("subscribe to the dead letters");
    let failing = Consumer::builder(broker.clone(), &topic, unique("g"))
        .handler(|_r: Received| async { Err::<(), _>(HandlerError::permanent("no")) })
        .start()
        .await
        .expect("consumer");
    broker
        .publish(&topic, Message::new("x").with_key("k"))
        .await
        .expect("publish");
    let letter = tokio::time::timeout(Duration::from_secs(60), letters.next())
        .await
        .expect("dead letter in time")
        .expect("stream open")
        .expect("delivery");
    let headers = letter.message().headers();
    let partition: i32 = headers[header::DLQ_PARTITION]
        .to_text()
        .parse()
        .expect("partition number");
    let offset: i64 = headers[header::DLQ_OFFSET]
        .to_text()
        .parse()
        .expect("offset number");
    assert!((0..3).contains(&partition), "{headers:?}");
    assert_eq!(offset, 0, "the first record of its partition: {headers:?}");
    letter.ack().await.expect("ack");
    failing
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
}
