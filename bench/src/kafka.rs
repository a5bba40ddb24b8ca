//! Kafka (tansu on loopback): raw rdkafka against the abstraction, with the
//! producer and consumer configuration the backend itself uses.

use std::time::Duration;

use broker_core::config::KafkaSettings;

use broker_kafka::{KafkaBroker, TopicSpec};
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::abstraction::{self, Work, IO_WAIT};
use crate::measure::{batched, windowed, Arrivals, KeyOrder, Outcome};
use crate::Params;

pub(crate) async fn broker(p: &Params) -> KafkaBroker {
    KafkaBroker::builder(
        KafkaSettings::new(&p.kafka_brokers)
            .client_id("bench")
            // tansu's first group join waits half the session timeout.
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000"),
    )
    .topic_spec(TopicSpec::default().partitions(3))
    .connect()
    .await
    .expect("connect to Kafka")
}

pub(crate) async fn topic(b: &KafkaBroker, hint: &str) -> String {
    let topic = format!("bench.{hint}.{}", uuid::Uuid::new_v4().simple());
    b.create_topic_with_dlq(&topic, &TopicSpec::default().partitions(3))
        .await
        .expect("create topic");
    topic
}

fn raw_producer(b: &KafkaBroker) -> FutureProducer {
    b.producer_client_config().create().expect("raw producer")
}

/// One message before the clock starts, so neither side is timed fetching
/// the topic's metadata.
async fn warm_up_raw(producer: &FutureProducer, topic: &str) {
    let record = FutureRecord::<str, [u8]>::to(topic).payload(b"warm-up");
    let delivery = producer
        .send_result(record)
        .map_err(|(e, _)| e)
        .expect("enqueue");
    delivery.await.expect("delivered").expect("warm-up");
}

/// Raw rdkafka: enqueue and await the delivery report, `window` in flight.
pub async fn publish_raw(p: &Params) -> Outcome {
    publish_raw_with(p, false).await
}

/// As [`publish_raw`], each record also carrying a fresh message id in
/// the header ours writes (`message-id`, a UUID): the bytes ours sends.
pub async fn publish_raw_with_id(p: &Params) -> Outcome {
    publish_raw_with(p, true).await
}

async fn publish_raw_with(p: &Params, with_id: bool) -> Outcome {
    use rdkafka::message::{Header, OwnedHeaders};
    let b = broker(p).await;
    let topic = topic(&b, "publish-raw").await;
    let producer = raw_producer(&b);
    let payload = p.payload();
    warm_up_raw(&producer, &topic).await;
    windowed(p.n, p.window, |i| {
        let (producer, topic, payload) = (&producer, &topic, &payload);
        async move {
            let key = p.key(i);
            let mut record = FutureRecord::to(topic).payload(&payload[..]).key(&key);
            if with_id {
                let id = uuid::Uuid::now_v7().to_string();
                record = record.headers(OwnedHeaders::new_with_capacity(1).insert(Header {
                    key: broker_core::message::header::MESSAGE_ID,
                    value: Some(id.as_bytes()),
                }));
            }
            let delivery = producer
                .send_result(record)
                .map_err(|(e, _)| e)
                .expect("enqueue");
            delivery.await.expect("delivered").expect("delivery report");
        }
    })
    .await
}

/// The abstraction's `publish`, `window` in flight.
pub async fn publish_lib(p: &Params) -> Outcome {
    let b = broker(p).await;
    let topic = topic(&b, "publish-lib").await;
    abstraction::publish(p, &b, &topic).await
}

/// Raw rdkafka batches: enqueue a chunk, then await its reports.
pub async fn batch_raw(p: &Params) -> Outcome {
    let b = broker(p).await;
    let topic = topic(&b, "batch-raw").await;
    let producer = raw_producer(&b);
    let payload = p.payload();
    warm_up_raw(&producer, &topic).await;
    batched(p.n, p.chunk, |range| {
        let reports: Vec<_> = range
            .map(|i| {
                let key = p.key(i);
                let record = FutureRecord::to(&topic).payload(&payload[..]).key(&key);
                producer
                    .send_result(record)
                    .map_err(|(e, _)| e)
                    .expect("enqueue")
            })
            .collect();
        async move {
            for r in futures::future::join_all(reports).await {
                r.expect("delivered").expect("delivery report");
            }
        }
    })
    .await
}

/// The abstraction's `publish_batch`, chunk by chunk.
pub async fn batch_lib(p: &Params) -> Outcome {
    let b = broker(p).await;
    let topic = topic(&b, "batch-lib").await;
    abstraction::publish_batches(p, &b, &topic).await
}

/// Outbox writes published by a relay (bench/src/outbox.rs).
pub async fn outbox_lib(p: &Params) -> Outcome {
    let b = broker(p).await;
    let topic = topic(&b, "outbox").await;
    crate::outbox::write_and_relay(p, std::sync::Arc::new(b), &topic).await
}

/// A topic holding `n` messages, for the consumers.
async fn filled(p: &Params, b: &KafkaBroker, hint: &str, work: Work) -> String {
    let topic = topic(b, hint).await;
    abstraction::fill(p, b, &topic, work).await;
    topic
}

/// What a raw consumer does with each record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawWork {
    /// Nothing: the record is only counted (the bare client's speed).
    Nothing,
    /// Reads key, payload and headers into owned values, as a handler
    /// that uses them (ids, trace context) must: the abstraction's decode.
    /// The reference loop of the consume rows.
    Read,
    /// Reads as [`RawWork::Read`], checks the key's order, awaits 1 ms:
    /// the sequential loop of the simulated-I/O rows ([`sequential_n`]
    /// messages, about a millisecond each).
    Io,
}

/// Messages of a sequential loop whose handler awaits 1 ms, for a run of
/// `n`: a quarter, 100 to 2,000 (a second or more at about a millisecond
/// each; the rate is what matters).
pub fn sequential_n(n: usize) -> usize {
    (n / 4).clamp(100, 2_000).min(n)
}

/// Raw `StreamConsumer`: store each offset, commit asynchronously every
/// 200 ms (the backend's commit interval), and synchronously at the end.
pub async fn consume_raw(p: &Params, work: RawWork) -> Outcome {
    let mut p = p.clone();
    if work == RawWork::Io {
        p.n = sequential_n(p.n);
    }
    let p = &p;
    let b = broker(p).await;
    let fill = match work {
        RawWork::Io => Work::Io,
        _ => Work::Count,
    };
    let topic = filled(p, &b, "consume-raw", fill).await;
    let group = format!("bench-raw-{}", uuid::Uuid::new_v4().simple());
    let consumer: StreamConsumer = b.consumer_client_config(&group).create().expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    let arrivals = Arrivals::new(p.n);
    let order = KeyOrder::new(p.keys);
    let mut last_commit = std::time::Instant::now();
    for _ in 0..p.n {
        let m = consumer.recv().await.expect("message");
        match work {
            RawWork::Nothing => {}
            RawWork::Read => {
                std::hint::black_box(read(&m));
            }
            RawWork::Io => {
                let (_, payload, _) = std::hint::black_box(read(&m));
                order.saw(&payload);
                tokio::time::sleep(IO_WAIT).await;
            }
        }
        arrivals.arrived();
        stored(&consumer, &m, &mut last_commit);
    }
    consumer
        .commit_consumer_state(CommitMode::Sync)
        .expect("final commit");
    let mut outcome = arrivals.wait(Duration::from_secs(10)).await;
    if work == RawWork::Io {
        outcome.out_of_order = Some(order.violations());
    }
    outcome
}

/// Stores `m`'s offset after handling, and commits asynchronously every
/// 200 ms (the backend's commit interval), as the raw loops do.
fn stored(
    consumer: &StreamConsumer,
    m: &rdkafka::message::BorrowedMessage<'_>,
    last_commit: &mut std::time::Instant,
) {
    consumer.store_offset_from_message(m).expect("store offset");
    if last_commit.elapsed() >= Duration::from_millis(200) {
        consumer
            .commit_consumer_state(CommitMode::Async)
            .expect("commit");
        *last_commit = std::time::Instant::now();
    }
}

/// Key, payload and headers of `m` as owned values.
fn read(m: &impl rdkafka::Message) -> (Option<String>, bytes::Bytes, Vec<(String, String)>) {
    use rdkafka::message::Headers as _;
    let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
    let headers = m.headers().map_or_else(Vec::new, |h| {
        h.iter()
            .map(|h| (h.key.to_owned(), text(h.value.unwrap_or_default())))
            .collect()
    });
    (
        m.key().map(text),
        bytes::Bytes::copy_from_slice(m.payload().unwrap_or_default()),
        headers,
    )
}

/// The abstraction's consumer runtime (`lanes` lanes, a handler doing
/// `work`), committing as it does in production.
pub async fn consume_lib(p: &Params, lanes: usize, work: Work) -> Outcome {
    let b = broker(p).await;
    let topic = filled(p, &b, "consume-lib", work).await;
    let group = format!("bench-lib-{}", uuid::Uuid::new_v4().simple());
    abstraction::consume(p, b, &topic, &group, lanes, work).await
}

/// The backend's subscription alone, without the runtime: next + ack in a
/// loop (tells the backend's cost from the runtime's).
pub async fn consume_stream(p: &Params) -> Outcome {
    use broker_core::{Subscriber, Subscription};
    let b = broker(p).await;
    let topic = filled(p, &b, "consume-stream", Work::Count).await;
    let group = format!("bench-stream-{}", uuid::Uuid::new_v4().simple());
    let mut stream = b
        .subscribe(Subscription::new(&topic, group).with_prefetch(p.prefetch))
        .await
        .expect("subscribe");
    let arrivals = Arrivals::new(p.n);
    for _ in 0..p.n {
        let d = stream.next().await.expect("open").expect("delivery");
        arrivals.arrived();
        d.ack().await.expect("ack");
    }
    stream.close().await.expect("close");
    arrivals.wait(Duration::from_secs(10)).await
}

/// Raw rdkafka at the fixed rate of [`crate::latency`]: `FutureProducer`
/// sends, a `StreamConsumer` loop (offsets stored, committed every 200 ms)
/// takes the time on receipt.
pub async fn latency_raw(p: &Params) -> Outcome {
    let b = broker(p).await;
    let topic = topic(&b, "latency-raw").await;
    let group = format!("bench-latency-raw-{}", uuid::Uuid::new_v4().simple());
    let consumer: StreamConsumer = b.consumer_client_config(&group).create().expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    let probe = crate::latency::Probe::new(p);
    let reader = tokio::spawn({
        let (probe, n) = (probe.clone(), p.n);
        async move {
            let mut last_commit = std::time::Instant::now();
            // The warm-up message, then the run.
            for _ in 0..=n {
                let m = consumer.recv().await.expect("message");
                probe.saw(rdkafka::Message::payload(&m).unwrap_or_default());
                stored(&consumer, &m, &mut last_commit);
            }
        }
    });
    let producer = raw_producer(&b);
    let send = |producer: FutureProducer, topic: String, payload: bytes::Bytes| async move {
        let record = FutureRecord::<str, [u8]>::to(&topic).payload(&payload[..]);
        let delivery = producer
            .send_result(record)
            .map_err(|(e, _)| e)
            .expect("enqueue");
        delivery.await.expect("delivered").expect("delivery report");
    };
    send(
        producer.clone(),
        topic.clone(),
        crate::latency::Probe::warm_up(),
    )
    .await;
    probe.warmed_up().await;
    probe
        .paced(p.n, |payload| {
            send(producer.clone(), topic.clone(), payload)
        })
        .await;
    let outcome = probe.outcome().await;
    reader.await.expect("reader");
    outcome
}

/// Ours at the fixed rate of [`crate::latency`].
pub async fn latency_lib(p: &Params) -> Outcome {
    let b = broker(p).await;
    let topic = topic(&b, "latency-lib").await;
    let group = format!("bench-latency-lib-{}", uuid::Uuid::new_v4().simple());
    crate::latency::lib(p, b, &topic, &group).await
}
