//! ruststream 0.7 (`ruststream` 0.7.7, `ruststream-rdkafka` 0.7.1,
//! `ruststream-lapin` 0.7.2), the other Rust framework over both brokers,
//! on the same brokers, sizes, prefetch and concurrency as ours: publish
//! through its publishers, consume through its app runtime.
//!
//! Its handlers are `#[subscriber]` functions, so what a run needs (topic,
//! group, the counter) sits in a static set before the app starts; each
//! scenario runs in a process of its own. The handler takes the payload
//! as borrowed bytes (its raw lane, no codec) and only counts, as ours
//! does; in the simulated-I/O rows it checks the key's order and awaits
//! 1 ms, as ours does. Each side consumes what its own publisher wrote:
//! ruststream's lanes key on its own partition-key header (RabbitMQ) or
//! on the record key (Kafka, `LaneKey::RecordKey`, like ours).

use std::num::NonZeroUsize;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ruststream::runtime::HandlerOutcome;

use crate::abstraction::{Work, IO_WAIT};
use crate::measure::{Arrivals, KeyOrder, Outcome};
use crate::Params;

/// What the handlers of a run need.
struct Setup {
    /// Kafka topic, or RabbitMQ queue.
    source: String,
    /// Kafka consumer group.
    group: String,
    arrivals: Arc<Arrivals>,
    order: KeyOrder,
    work: Work,
}

static SETUP: OnceLock<Setup> = OnceLock::new();

fn setup() -> &'static Setup {
    SETUP.get().expect("set before the app starts")
}

/// Sets the run's setup; the counter of its deliveries.
fn install(p: &Params, source: String, group: String, work: Work) -> Arc<Arrivals> {
    let arrivals = Arc::new(Arrivals::new(p.n));
    let installed = SETUP.set(Setup {
        source,
        group,
        arrivals: arrivals.clone(),
        order: KeyOrder::new(p.keys),
        work,
    });
    assert!(installed.is_ok(), "one consumer per process");
    arrivals
}

/// A delivery's payload, borrowed from the client's buffer.
#[derive(ruststream::Deserialized)]
struct Frame<'a>(&'a [u8]);

/// What both handlers do with a delivery.
async fn handle(frame: &Frame<'_>) -> HandlerOutcome {
    let s = setup();
    if s.work == Work::Io {
        s.order.saw(frame.0);
        tokio::time::sleep(IO_WAIT).await;
    }
    s.arrivals.arrived();
    HandlerOutcome::ack()
}

/// `lanes` as the keyed-workers count, `None` for one lane (ruststream's
/// sequential loop, its fastest single-lane form).
fn keyed_lanes(lanes: usize) -> Option<NonZeroUsize> {
    NonZeroUsize::new(lanes).filter(|n| n.get() > 1)
}

/// Waits for the run's deliveries, then the order check's verdict.
async fn outcome(arrivals: &Arrivals, work: Work) -> Outcome {
    let mut outcome = arrivals.wait(Duration::from_secs(300)).await;
    if work == Work::Io {
        outcome.out_of_order = Some(setup().order.violations());
    }
    outcome
}

/// Publishes the `n` messages of a consume scenario (untimed): `window`
/// in flight for [`Work::Count`]; for [`Work::Io`], whose handler checks
/// per-key order, in chunks of `keys` (one message per key) awaited one
/// after another, as concurrent publishes may reach the broker in any
/// order.
async fn fill<F, Fut>(p: &Params, work: Work, mut publish: F)
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    match work {
        Work::Count => {
            crate::measure::windowed(p.n, p.window, publish).await;
        }
        Work::Io => {
            let mut from = 0;
            while from < p.n {
                let to = (from + p.keys).min(p.n);
                futures::future::join_all((from..to).map(&mut publish)).await;
                from = to;
            }
        }
    }
}

/// The payload of message `i` of a fill.
fn fill_payload(p: &Params, payload: &bytes::Bytes, work: Work, i: usize) -> bytes::Bytes {
    match work {
        Work::Count => payload.clone(),
        Work::Io => p.numbered_payload(i),
    }
}

pub mod kafka {
    //! ruststream-rdkafka with our backend's librdkafka settings.

    use ruststream::{Broker as _, ConnectedBroker as _, HeaderMap, OutgoingMessage, Publisher};
    use ruststream_rdkafka::prelude::{
        Commit, KafkaBroker, KafkaTopic, LaneKey, RustStream, StartOffset,
    };
    use ruststream_rdkafka::{KafkaPublish, KafkaPublisher, PARTITION_KEY_HEADER};

    use super::*;
    use crate::measure::windowed;

    /// Settings the framework owns under `Commit::Tracked` (it commits
    /// stored offsets in the background), or that it takes elsewhere.
    const OWNED: &[&str] = &[
        "bootstrap.servers",
        "group.id",
        "enable.auto.commit",
        "enable.auto.offset.store",
    ];

    /// A ruststream broker with our backend's consumer and producer
    /// settings (idempotent acks=all producer, linger, fetch settings,
    /// the bench's session timeout).
    fn rs_broker(p: &Params, ours: &broker_kafka::KafkaBroker) -> KafkaBroker {
        let mut b = KafkaBroker::new([p.kafka_brokers.clone()]);
        for (k, v) in ours.consumer_client_config("unused").config_map() {
            if !OWNED.contains(&k) {
                b = b.config(k, v);
            }
        }
        for (k, v) in ours.producer_client_config().config_map() {
            if !OWNED.contains(&k) {
                b = b.producer_config(k, v);
            }
        }
        b
    }

    /// Publishes message `i` with its key (the partition-key header
    /// becomes the record key).
    async fn publish_one(publisher: &KafkaPublisher, topic: &str, payload: &[u8], key: String) {
        let mut headers = HeaderMap::new();
        headers.insert(PARTITION_KEY_HEADER, key);
        publisher
            .publish(
                OutgoingMessage::new(topic, payload).with_headers(headers),
                None,
            )
            .await
            .expect("publish");
    }

    /// `publish`, `window` in flight, after one warm-up message.
    pub async fn publish(p: &Params) -> Outcome {
        let ours = crate::kafka::broker(p).await;
        let topic = crate::kafka::topic(&ours, "publish-rs").await;
        let connected = rs_broker(p, &ours).connect().await.expect("connect");
        let publisher = connected.publisher(KafkaPublish::default());
        publish_one(&publisher, &topic, b"warm-up", p.key(0)).await;
        let payload = p.payload();
        let outcome = windowed(p.n, p.window, |i| {
            publish_one(&publisher, &topic, &payload, p.key(i))
        })
        .await;
        drop(publisher);
        connected.shutdown().await.expect("shutdown");
        outcome
    }

    #[ruststream::subscriber(
        KafkaTopic::new(setup().source.clone())
            .group(setup().group.clone())
            .commit(Commit::Tracked)
            .start(StartOffset::Earliest)
            .lane_key(LaneKey::RecordKey)
    )]
    async fn count(frame: &Frame<'_>) -> HandlerOutcome {
        handle(frame).await
    }

    /// The app runtime, `lanes` lanes keyed by record key, per-message
    /// tracked commits; the topic filled through ruststream's publisher.
    pub async fn consume(p: &Params, lanes: usize, work: Work) -> Outcome {
        use ruststream::runtime::{AppInfo, SubscriberSettings as _};
        let ours = crate::kafka::broker(p).await;
        let topic = crate::kafka::topic(&ours, "consume-rs").await;
        {
            let connected = rs_broker(p, &ours).connect().await.expect("connect");
            let publisher = connected.publisher(KafkaPublish::default());
            let payload = p.payload();
            fill(p, work, |i| {
                let payload = fill_payload(p, &payload, work, i);
                let (publisher, topic) = (&publisher, &topic);
                async move { publish_one(publisher, topic, &payload, p.key(i)).await }
            })
            .await;
            drop(publisher);
            connected.shutdown().await.expect("shutdown");
        }
        let group = format!("bench-rs-{}", uuid::Uuid::new_v4().simple());
        let arrivals = install(p, topic, group, work);
        let app = RustStream::new(AppInfo::new("bench", "0.1.0")).with_broker(
            rs_broker(p, &ours),
            move |b| match keyed_lanes(lanes) {
                None => {
                    b.include(count);
                }
                Some(n) => {
                    b.include(count.workers_by_key(n));
                }
            },
        );
        let running = app.start().await.expect("start the app");
        let outcome = outcome(&arrivals, work).await;
        running.shutdown().await.expect("shutdown");
        outcome
    }
}

pub mod rabbitmq {
    //! ruststream-lapin on the exchange and queue type ours uses.

    use std::num::NonZeroU16;

    use ruststream::{Broker as _, ConnectedBroker as _, HeaderMap, OutgoingMessage, Publisher};
    use ruststream_lapin::prelude::{LapinBroker, RabbitQuorumQueue, RustStream};
    use ruststream_lapin::{ConfirmsPublisher, LapinPublish, PARTITION_KEY_HEADER};

    use super::*;
    use crate::measure::windowed;
    use crate::rabbitmq::EXCHANGE;

    fn rs_broker(p: &Params) -> LapinBroker {
        let prefetch = NonZeroU16::new(p.prefetch.clamp(1, u16::MAX as usize) as u16)
            .expect("prefetch at least 1");
        LapinBroker::new(p.rabbitmq_url.clone())
            .connection_name("bench-ruststream")
            .prefetch(prefetch)
    }

    /// Publishes one persistent message and awaits its confirm, the key
    /// in ruststream's partition-key header.
    async fn publish_one(publisher: &ConfirmsPublisher, topic: &str, payload: &[u8], key: String) {
        let mut headers = HeaderMap::new();
        headers.insert(PARTITION_KEY_HEADER, key);
        publisher
            .publish(
                OutgoingMessage::new(topic, payload).with_headers(headers),
                None,
            )
            .await
            .expect("publish");
    }

    /// `publish` with confirms, `window` in flight, after one warm-up
    /// message, to the exchange ours publishes to (persistent, ruststream's
    /// default).
    pub async fn publish(p: &Params) -> Outcome {
        let ours = crate::rabbitmq::broker(p).await;
        let topic = crate::rabbitmq::topic(&ours, "publish-rs").await;
        let connected = rs_broker(p).connect().await.expect("connect");
        let publisher = connected.publisher(LapinPublish::default().exchange(EXCHANGE).confirms());
        publish_one(&publisher, &topic, b"warm-up", p.key(0)).await;
        let payload = p.payload();
        let outcome = windowed(p.n, p.window, |i| {
            publish_one(&publisher, &topic, &payload, p.key(i))
        })
        .await;
        drop(publisher);
        connected.shutdown().await.expect("shutdown");
        outcome
    }

    #[ruststream::subscriber(RabbitQuorumQueue::new(setup().source.clone()))]
    async fn count(frame: &Frame<'_>) -> HandlerOutcome {
        handle(frame).await
    }

    /// The app runtime on a queue declared as the raw loop's is (same
    /// type, bound to the topic), same prefetch, `lanes` lanes keyed by
    /// its partition-key header; filled through ruststream's publisher.
    pub async fn consume(p: &Params, lanes: usize, work: Work) -> Outcome {
        use ruststream::runtime::{AppInfo, SubscriberSettings as _};
        let ours = crate::rabbitmq::broker(p).await;
        let topic = crate::rabbitmq::topic(&ours, "consume-rs").await;
        let queue = format!("{topic}:ruststream");
        let (_conn, _channel) = crate::rabbitmq::raw_queue(p, &topic, &queue).await;
        {
            let connected = rs_broker(p).connect().await.expect("connect");
            let publisher =
                connected.publisher(LapinPublish::default().exchange(EXCHANGE).confirms());
            let payload = p.payload();
            fill(p, work, |i| {
                let payload = fill_payload(p, &payload, work, i);
                let (publisher, topic) = (&publisher, &topic);
                async move { publish_one(publisher, topic, &payload, p.key(i)).await }
            })
            .await;
            drop(publisher);
            connected.shutdown().await.expect("shutdown");
        }
        let arrivals = install(p, queue, String::new(), work);
        let app =
            RustStream::new(AppInfo::new("bench", "0.1.0")).with_broker(rs_broker(p), move |b| {
                match keyed_lanes(lanes) {
                    None => {
                        b.include(count);
                    }
                    Some(n) => {
                        b.include(count.workers_by_key(n));
                    }
                }
            });
        let running = app.start().await.expect("start the app");
        let outcome = outcome(&arrivals, work).await;
        running.shutdown().await.expect("shutdown");
        outcome
    }
}
