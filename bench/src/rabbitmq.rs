//! RabbitMQ: raw lapin (persistent, pipelined confirms, not mandatory; prefetch
//! and per-message acks) against the abstraction, on the same exchange.

use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_core::{Subscriber, Subscription};
use broker_rabbitmq::{QueueType, RabbitMqBroker};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::{mpsc, Semaphore};

use crate::abstraction::{self, Work, IO_WAIT};
use crate::measure::{batched, finish, Arrivals, KeyOrder, Latencies, Outcome};
use crate::Params;

pub(crate) const EXCHANGE: &str = "bench.events";
/// Queues of a run disappear a minute after their last use.
const QUEUE_EXPIRY: Duration = Duration::from_secs(60);
/// The reference consume loop acks with `multiple` every this many deliveries.
const ACK_EVERY: usize = 100;

pub(crate) async fn broker(p: &Params) -> RabbitMqBroker {
    let queue_type = if p.quorum() {
        QueueType::Quorum
    } else {
        QueueType::Classic
    };
    RabbitMqBroker::builder(p.rabbitmq_url.clone())
        .exchange(EXCHANGE)
        .queue_type(queue_type)
        .queue_expiry(QUEUE_EXPIRY)
        .connection_name("bench")
        .connect()
        .await
        .expect("connect to RabbitMQ")
}

/// A new topic with one group queue bound.
pub(crate) async fn topic(b: &RabbitMqBroker, hint: &str) -> String {
    let topic = format!("bench.{hint}.{}", uuid::Uuid::new_v4().simple());
    b.subscribe(Subscription::new(&topic, "bench"))
        .await
        .expect("declare the group queue")
        .close()
        .await
        .expect("close");
    topic
}

/// A raw channel in confirm mode, with the exchange declared as the backend declares it.
async fn raw_channel(p: &Params) -> (Connection, Channel) {
    let conn = Connection::connect(&p.rabbitmq_url, ConnectionProperties::default())
        .await
        .expect("raw connection");
    let channel = conn.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm select");
    channel
        .exchange_declare(
            EXCHANGE.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("exchange");
    (conn, channel)
}

/// One message before the clock starts, on each side.
async fn warm_up_raw(channel: &Channel, topic: &str) {
    let confirm = channel
        .basic_publish(
            EXCHANGE.into(),
            topic.into(),
            PUBLISH,
            b"warm-up",
            persistent(),
        )
        .await
        .expect("publish");
    assert!(confirm.await.expect("confirm").is_ack());
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

// Like the backend: not `mandatory` (lapin logs returned messages with
// their payload).
const PUBLISH: BasicPublishOptions = BasicPublishOptions {
    mandatory: false,
    immediate: false,
};

/// Raw lapin: publish, hand the confirm to a collector task, `window`
/// unconfirmed at most.
pub async fn publish_raw(p: &Params) -> Outcome {
    let b = broker(p).await;
    let topic = topic(&b, "publish-raw").await;
    let (_conn, channel) = raw_channel(p).await;
    let payload = p.payload();
    warm_up_raw(&channel, &topic).await;
    let window = Arc::new(Semaphore::new(p.window));
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, lapin::PublisherConfirm, _)>();
    let collector = tokio::spawn(async move {
        let mut latencies = Latencies::default();
        let mut waiting = futures::stream::FuturesUnordered::new();
        let mut open = true;
        while open || !waiting.is_empty() {
            tokio::select! {
                next = rx.recv(), if open => match next {
                    Some((t, confirm, permit)) => waiting.push(async move {
                        let confirmation = confirm.await.expect("confirm");
                        assert!(confirmation.is_ack(), "nacked");
                        drop(permit);
                        t.elapsed()
                    }),
                    None => open = false,
                },
                Some(d) = waiting.next(), if !waiting.is_empty() => latencies.push(d),
            }
        }
        latencies
    });
    let start = Instant::now();
    for i in 0..p.n {
        let permit = window.clone().acquire_owned().await.expect("window");
        let t = Instant::now();
        let confirm = channel
            .basic_publish(
                EXCHANGE.into(),
                topic.as_str().into(),
                PUBLISH,
                &payload,
                persistent().with_headers(key_header(p, i)),
            )
            .await
            .expect("publish");
        tx.send((t, confirm, permit)).expect("collector");
    }
    drop(tx);
    let latencies = collector.await.expect("collector");
    finish(p.n, start.elapsed(), latencies)
}

/// The key travels as a header, as the backend sends it.
fn key_header(p: &Params, i: usize) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(
        broker_rabbitmq::KEY_HEADER.into(),
        AMQPValue::LongString(p.key(i).into()),
    );
    headers
}

/// The abstraction's `publish`, `window` in flight.
pub async fn publish_lib(p: &Params) -> Outcome {
    let b = broker(p).await;
    let topic = topic(&b, "publish-lib").await;
    let outcome = abstraction::publish(p, &b, &topic).await;
    b.close().await.expect("close");
    outcome
}

/// Raw lapin batches: publish a chunk, then await its confirms.
pub async fn batch_raw(p: &Params) -> Outcome {
    let b = broker(p).await;
    let topic = topic(&b, "batch-raw").await;
    let (_conn, channel) = raw_channel(p).await;
    let payload = p.payload();
    warm_up_raw(&channel, &topic).await;
    batched(p.n, p.chunk, |range| {
        let (channel, topic, payload) = (&channel, &topic, &payload);
        async move {
            let mut confirms = Vec::with_capacity(range.len());
            for i in range {
                confirms.push(
                    channel
                        .basic_publish(
                            EXCHANGE.into(),
                            topic.as_str().into(),
                            PUBLISH,
                            payload,
                            persistent().with_headers(key_header(p, i)),
                        )
                        .await
                        .expect("publish"),
                );
            }
            for c in futures::future::join_all(confirms).await {
                assert!(c.expect("confirm").is_ack(), "nacked");
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

/// How a raw lapin consumer acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawAck {
    /// Awaits each delivery's own ack before taking the next one.
    Each,
    /// Acks with `multiple` every [`ACK_EVERY`] deliveries (and the rest at
    /// the end): the reference loop of the consume rows.
    Batched,
    /// As [`RawAck::Batched`], after reading the payload, checking the
    /// key's order and awaiting 1 ms: the sequential loop of the
    /// simulated-I/O rows ([`crate::kafka::sequential_n`] messages).
    Io,
}

/// A queue of `queue_type` bound to `topic` on the exchange, declared as
/// the backend declares a group's queue, and a raw channel (confirm mode).
pub(crate) async fn raw_queue(p: &Params, topic: &str, queue: &str) -> (Connection, Channel) {
    let (conn, channel) = raw_channel(p).await;
    let mut args = FieldTable::default();
    args.insert(
        "x-expires".into(),
        AMQPValue::LongLongInt(QUEUE_EXPIRY.as_millis() as i64),
    );
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(if p.quorum() { "quorum" } else { "classic" }.into()),
    );
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .expect("queue");
    channel
        .queue_bind(
            queue.into(),
            EXCHANGE.into(),
            topic.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    (conn, channel)
}

/// A raw lapin consumer of `queue` with the run's prefetch.
async fn raw_consumer(p: &Params, channel: &Channel, queue: &str) -> lapin::Consumer {
    channel
        .basic_qos(p.prefetch as u16, BasicQosOptions::default())
        .await
        .expect("qos");
    channel
        .basic_consume(
            queue.into(),
            "bench-raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume")
}

/// Raw lapin consumer with the same prefetch, acknowledging as `ack` says.
pub async fn consume_raw(p: &Params, ack: RawAck) -> Outcome {
    let mut p = p.clone();
    if ack == RawAck::Io {
        p.n = crate::kafka::sequential_n(p.n);
    }
    let p = &p;
    let b = broker(p).await;
    let topic = topic(&b, "consume-raw").await;
    let queue = format!("{topic}:raw");
    let (_conn, channel) = raw_queue(p, &topic, &queue).await;
    let fill = match ack {
        RawAck::Io => Work::Io,
        _ => Work::Count,
    };
    abstraction::fill(p, &b, &topic, fill).await;
    let mut consumer = raw_consumer(p, &channel, &queue).await;
    let arrivals = Arrivals::new(p.n);
    let order = KeyOrder::new(p.keys);
    let multiple = BasicAckOptions { multiple: true };
    for i in 1..=p.n {
        let delivery = consumer.next().await.expect("open").expect("delivery");
        if ack == RawAck::Io {
            order.saw(&delivery.data);
            tokio::time::sleep(IO_WAIT).await;
        }
        arrivals.arrived();
        match ack {
            RawAck::Each => {
                delivery.ack(BasicAckOptions::default()).await.expect("ack");
            }
            RawAck::Batched | RawAck::Io if i.is_multiple_of(ACK_EVERY) || i == p.n => {
                delivery.ack(multiple).await.expect("ack");
            }
            RawAck::Batched | RawAck::Io => {}
        }
    }
    let mut outcome = arrivals.wait(Duration::from_secs(10)).await;
    if ack == RawAck::Io {
        outcome.out_of_order = Some(order.violations());
    }
    outcome
}

/// The abstraction's consumer runtime, same prefetch, `lanes` lanes, a
/// handler doing `work`.
pub async fn consume_lib(p: &Params, lanes: usize, work: Work) -> Outcome {
    let b = broker(p).await;
    let topic = topic(&b, "consume-lib").await;
    abstraction::fill(p, &b, &topic, work).await;
    abstraction::consume(p, b, &topic, "bench", lanes, work).await
}

/// Raw lapin at the fixed rate of [`crate::latency`]: persistent publishes
/// with confirms, a consumer with the same prefetch (acking `multiple`
/// every [`ACK_EVERY`]) takes the time on receipt.
pub async fn latency_raw(p: &Params) -> Outcome {
    let b = broker(p).await;
    let topic = topic(&b, "latency-raw").await;
    let queue = format!("{topic}:raw");
    let (_conn, channel) = raw_queue(p, &topic, &queue).await;
    let mut consumer = raw_consumer(p, &channel, &queue).await;
    let probe = crate::latency::Probe::new(p);
    let reader = tokio::spawn({
        let (probe, n) = (probe.clone(), p.n);
        async move {
            // The warm-up message, then the run.
            for i in 1..=n + 1 {
                let delivery = consumer.next().await.expect("open").expect("delivery");
                probe.saw(&delivery.data);
                if i.is_multiple_of(ACK_EVERY) || i == n + 1 {
                    delivery
                        .ack(BasicAckOptions { multiple: true })
                        .await
                        .expect("ack");
                }
            }
        }
    });
    let send = |channel: Channel, topic: String, payload: bytes::Bytes| async move {
        let confirm = channel
            .basic_publish(
                EXCHANGE.into(),
                topic.as_str().into(),
                PUBLISH,
                &payload,
                persistent(),
            )
            .await
            .expect("publish");
        assert!(confirm.await.expect("confirm").is_ack(), "nacked");
    };
    send(
        channel.clone(),
        topic.clone(),
        crate::latency::Probe::warm_up(),
    )
    .await;
    probe.warmed_up().await;
    probe
        .paced(p.n, |payload| send(channel.clone(), topic.clone(), payload))
        .await;
    let outcome = probe.outcome().await;
    reader.await.expect("reader");
    outcome
}

/// Ours at the fixed rate of [`crate::latency`].
pub async fn latency_lib(p: &Params) -> Outcome {
    let b = broker(p).await;
    let topic = topic(&b, "latency-lib").await;
    crate::latency::lib(p, b, &topic, "bench").await
}
