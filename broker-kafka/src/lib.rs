//! Kafka backend of the broker library, on rdkafka (librdkafka).
//!
//! [`KafkaBroker`] implements [`Publisher`] and [`Subscriber`]; the shared
//! consumer runtime of `broker-core` does retries, dead letters and
//! concurrency on top.
//!
//! - Publishing waits for the delivery report (idempotent producer,
//!   `acks=all`); batches are enqueued at once and awaited together.
//! - Each [`Subscriber::subscribe`] is one member of the consumer group.
//!   Offsets are committed only up to the lowest unfinished offset of each
//!   partition, so concurrency never commits past a message still being
//!   handled; revoked partitions commit what finished and are re-read by
//!   their new owner (at-least-once).
//! - Delivery counts survive crashes, for the consumer runtime's delivery
//!   limit: per partition, the companion consumer group
//!   `{group}.delivery-counts` (it never has members) keeps the *head*
//!   record, the first one handed out in an assignment, and how often it
//!   was handed out unsettled, packed into its committed offset as
//!   `offset << 10 | count`. The head is stored before it is handed out and
//!   `Received::attempt` is 1 + that count. After an unclean finish (a
//!   crash, a lost partition, deliveries abandoned at close) the next owner
//!   hands out one record at a time, storing each as the new head, until
//!   twice the prefetch or the end of the partition: the record that crashes
//!   the consumer becomes the head and counts up. Cost: one extra client per
//!   subscription, one read and one synchronous commit per partition and
//!   assignment, nothing per message except while recovering. The group
//!   needs `Read` on `{group}.delivery-counts` under ACLs; lag tools show
//!   it with meaningless offsets.
//! - Delayed publish ([`Publisher::publish_after`]) and delayed, non-blocking
//!   retries ([`broker_core::RetryMode::Delayed`]) go through the delay
//!   topic `{topic}.retry`: one partition per delay tier (1 s, 5 s, 30 s,
//!   2 min, 10 min, 1 h, 6 h, 24 h; the delay is rounded up to one) and
//!   partition of the topic, partition `tier * N + p` for a topic of `N`
//!   partitions. A record carries its due time (`x-delay-due-ms`) and, for a
//!   retry copy, the one group it is for (`x-retry-group`); a retry goes to
//!   the partitions of the topic partition it was read from, a delayed
//!   publish to those of a partition chosen from its key. Each subscription
//!   has a *delay reader*, a second client that joins no group: it follows
//!   the member's assignment (the member owning topic partition `p` reads
//!   `p`'s delay partitions, one per tier) and commits to the group
//!   `{group}.retry`, which never has members. All records of a delay
//!   partition wait the same tier, so they fall due in offset order: the
//!   reader keeps what it received and pauses only a partition whose head
//!   is not due (or that has `prefetch` records unfinished), wakes when the
//!   head falls due and resumes from the record after the last one it got;
//!   other tiers and the main topic go on meanwhile. Records of another
//!   group are settled without reaching the handler; the others come
//!   through the same stream as the topic's records, exactly as published
//!   (the delay headers removed), as first deliveries. Offsets of delay
//!   records are committed only up to the lowest unhandled one, and on a
//!   revoke before the next owner reads, so a restart or a rebalance while
//!   a record waits loses nothing (at-least-once). Accuracy: never early,
//!   at most one tier late plus the reader's latency, measured from the
//!   publishing machine's clock (the due time is set when the record is
//!   sent). Cost: one delay topic of `8 * N` partitions per subscribed or
//!   delay-published topic (created with the topic spec but the cluster's
//!   retention, which must be above 24 h; an existing one with another
//!   partition count is refused with [`BrokerError::Refused`], and the topic
//!   may not gain partitions while records wait), one extra client per
//!   subscription and one commit per delay partition and commit interval
//!   with activity. Every group of a topic reads every retry copy of the
//!   other groups (and skips it). Subscriptions to `*.dlq` and `*.retry`
//!   topics have no delay reader; without auto-creation a topic whose delay
//!   topic is missing or does not fit is consumed without one.
//! - Topics (and their `{topic}.dlq`) are created when first used, with
//!   [`TopicSpec`] (disable with [`KafkaBrokerBuilder::auto_create_topics`]).
//! - Every entry of [`KafkaSettings::properties`] goes to librdkafka as is
//!   (TLS and SASL included); an invalid one is a [`BrokerError::Config`]
//!   naming it, credentials never shown.
//!
//! ```no_run
//! # async fn demo() -> broker_core::Result<()> {
//! use broker_core::config::KafkaSettings;
//! use broker_core::{Message, Publisher};
//! use broker_kafka::KafkaBroker;
//!
//! let broker = KafkaBroker::connect(KafkaSettings::new("127.0.0.1:9092")).await?;
//! broker.publish("billing.credits.granted", Message::new("hi").with_key("user-7")).await?;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::admin::AdminClient;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

use crate::context::ClientWatch;
pub use crate::context::LOG_INTERVAL;

use broker_core::config::{ConfigError, KafkaSettings};
use broker_core::delay::Tier;
use broker_core::message::check_outgoing;
use broker_core::topic::{dead_letter_topic, validate_topic};
use broker_core::{
    batch_result, Backoff, BrokerError, DeliveryStream, Health, Message, Publisher, Result,
    Subscriber, Subscription,
};

mod admin;
mod client_config;
mod codec;
mod consumer;
mod context;
mod delay;
mod deliveries;
mod lag;
mod refusal;
mod tracker;

pub use admin::TopicSpec;
pub use lag::{total_lag, PartitionLag};

use client_config::{client_config, config_error, effective, env_var_of, Role};
use consumer::ConsumerOptions;

const BACKEND: &str = "kafka";
/// librdkafka's default `message.max.bytes`.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;
/// Room for what Kafka adds around payload, key and headers (record and
/// batch framing, header names of the reserved headers).
const FRAMING_HEADROOM: usize = 16 * 1024;

/// A Kafka connection: one idempotent producer, an admin client, and a
/// consumer per subscription. Cheap to clone; clones share the producer.
#[derive(Clone)]
pub struct KafkaBroker {
    inner: Arc<Inner>,
}

struct Inner {
    settings: KafkaSettings,
    producer: FutureProducer<ClientWatch>,
    admin: AdminClient<ClientWatch>,
    watch: ClientWatch,
    /// True once the publisher is closed. Publishes hold a read guard while
    /// enqueueing, so `close` flushes everything that was enqueued.
    closed: tokio::sync::RwLock<bool>,
    /// Topics known to exist (created or found) by this broker.
    known_topics: Mutex<HashSet<String>>,
    /// Topics whose delay topic fits, with their partition counts.
    delay_layouts: Mutex<HashMap<String, i32>>,
    options: Options,
    max_message_bytes: usize,
    /// librdkafka's `message.max.bytes`: the producer refuses larger
    /// records before sending them.
    client_limit: usize,
    message_timeout: Duration,
}

#[derive(Debug, Clone)]
struct Options {
    topic_spec: TopicSpec,
    auto_create_topics: bool,
    reconnect: Backoff,
    request_timeout: Duration,
    consumer: ConsumerOptions,
    max_message_bytes: Option<usize>,
}

impl std::fmt::Debug for KafkaBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // KafkaSettings' Debug redacts credentials.
        f.debug_struct("KafkaBroker")
            .field("settings", &self.inner.settings)
            .field("max_message_bytes", &self.inner.max_message_bytes)
            .finish_non_exhaustive()
    }
}

/// Options of a [`KafkaBroker`]; see [`KafkaBroker::builder`].
#[derive(Debug, Clone)]
#[must_use = "call .connect() to build the broker"]
pub struct KafkaBrokerBuilder {
    settings: KafkaSettings,
    options: Options,
}

impl KafkaBrokerBuilder {
    /// How topics are created (default: 3 partitions, the cluster's
    /// replication factor).
    pub fn topic_spec(mut self, spec: TopicSpec) -> Self {
        self.options.topic_spec = spec;
        self
    }
    /// Whether topics (and the `{topic}.dlq` of subscribed topics) are
    /// created on first use (default true). Turn off where the cluster's
    /// topics are managed elsewhere.
    pub fn auto_create_topics(mut self, on: bool) -> Self {
        self.options.auto_create_topics = on;
        self
    }
    /// Retry policy while the cluster cannot be reached: at connect, when
    /// creating topics and when subscribing (default
    /// [`Backoff::reconnect_default`]). When it runs out the call fails with
    /// [`BrokerError::Unavailable`].
    pub fn reconnect(mut self, policy: Backoff) -> Self {
        self.options.reconnect = policy;
        self
    }
    /// Timeout of one metadata or admin round trip (default 5 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.options.request_timeout = timeout;
        self
    }
    /// How long `subscribe` waits for the group to assign partitions
    /// (default 30 s; zero returns at once).
    pub fn join_timeout(mut self, timeout: Duration) -> Self {
        self.options.consumer.join_timeout = timeout;
        self
    }
    /// How often finished offsets are committed (default 200 ms). Close
    /// and rebalances commit at once regardless.
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.options.consumer.commit_interval = interval.max(Duration::from_millis(1));
        self
    }
    /// Producer compression: `none`, `gzip`, `snappy`, `lz4` or `zstd`.
    pub fn compression(self, codec: &str) -> Self {
        self.set("compression.type", codec)
    }
    /// Producer batch size in bytes (`batch.size`).
    pub fn batch_size(self, bytes: usize) -> Self {
        self.set("batch.size", bytes.to_string())
    }
    /// How long the producer waits to fill a batch (`linger.ms`, default 5 ms).
    pub fn linger(self, linger: Duration) -> Self {
        self.set("linger.ms", linger.as_millis().to_string())
    }
    /// Any librdkafka setting (`security.protocol`, `sasl.mechanism`, ...).
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings = self.settings.set(key, value);
        self
    }
    /// Largest message accepted by `publish` (payload, key and headers).
    /// Default: `message.max.bytes` (1,000,000) minus 16 KiB for framing.
    pub fn max_message_bytes(mut self, bytes: usize) -> Self {
        self.options.max_message_bytes = Some(bytes);
        self
    }

    /// Creates the clients and checks that the cluster answers, retrying
    /// per the reconnect policy.
    pub async fn connect(self) -> Result<KafkaBroker> {
        let settings = self.settings;
        let options = self.options;
        // Validate the consumer side now, not at the first subscribe.
        let mut consumer_config = client_config(&settings, Role::Consumer);
        consumer_config.set("group.id", "config-check");
        consumer_config
            .create_native_config()
            .map_err(config_error)?;
        let watch = ClientWatch::default();
        let producer: FutureProducer<ClientWatch> = client_config(&settings, Role::Producer)
            .create_with_context(watch.clone())
            .map_err(config_error)?;
        let admin: AdminClient<ClientWatch> = client_config(&settings, Role::Admin)
            .create_with_context(watch.clone())
            .map_err(config_error)?;

        let limit = match effective(&settings, "message.max.bytes") {
            Some(v) => v
                .parse::<usize>()
                .map_err(|_| invalid("message.max.bytes", v))?,
            None => DEFAULT_MESSAGE_MAX_BYTES,
        };
        let max_message_bytes = options
            .max_message_bytes
            .unwrap_or(limit.saturating_sub(FRAMING_HEADROOM));
        let message_timeout = effective(&settings, "message.timeout.ms")
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or(Duration::from_secs(30));

        let broker = KafkaBroker {
            inner: Arc::new(Inner {
                settings,
                producer,
                admin,
                watch,
                closed: tokio::sync::RwLock::new(false),
                known_topics: Mutex::new(HashSet::new()),
                delay_layouts: Mutex::new(HashMap::new()),
                options,
                max_message_bytes,
                client_limit: limit,
                message_timeout,
            }),
        };
        broker.wait_reachable().await?;
        Ok(broker)
    }
}

fn invalid(key: &str, value: &str) -> BrokerError {
    BrokerError::Config(ConfigError::Invalid {
        var: env_var_of(key),
        reason: format!("`{key}` must be a number of bytes, not `{value}`"),
    })
}

impl KafkaBroker {
    /// Options on top of `settings`.
    pub fn builder(settings: KafkaSettings) -> KafkaBrokerBuilder {
        KafkaBrokerBuilder {
            settings,
            options: Options {
                topic_spec: TopicSpec::default(),
                auto_create_topics: true,
                reconnect: Backoff::reconnect_default(),
                request_timeout: Duration::from_secs(5),
                consumer: ConsumerOptions {
                    join_timeout: Duration::from_secs(30),
                    commit_interval: Duration::from_millis(200),
                    close_timeout: Duration::from_secs(30),
                },
                max_message_bytes: None,
            },
        }
    }

    /// Connects with default options.
    pub async fn connect(settings: KafkaSettings) -> Result<KafkaBroker> {
        Self::builder(settings).connect().await
    }

    /// The librdkafka configuration of this broker's producer (the
    /// backend's defaults plus every override), for a raw rdkafka client
    /// that must match it: benchmarks, diagnostics. Contains credentials
    /// when the settings do; do not print it.
    pub fn producer_client_config(&self) -> rdkafka::ClientConfig {
        client_config(&self.inner.settings, Role::Producer)
    }

    /// The librdkafka configuration this broker gives a consumer of `group`
    /// (see [`KafkaBroker::producer_client_config`]).
    pub fn consumer_client_config(&self, group: &str) -> rdkafka::ClientConfig {
        let mut config = client_config(&self.inner.settings, Role::Consumer);
        config.set("group.id", group);
        config
    }

    /// How long one request to the cluster may take.
    fn request_timeout(&self) -> Duration {
        self.inner.options.request_timeout
    }

    /// The settings this broker was built from (credentials redacted in `Debug`).
    pub fn settings(&self) -> &KafkaSettings {
        &self.inner.settings
    }

    /// Creates `topic` with `spec` unless it exists (then it is left as
    /// it is), and waits until the cluster's metadata shows it.
    pub async fn create_topic(&self, topic: &str, spec: &TopicSpec) -> Result<()> {
        validate_topic(topic)?;
        self.create_with_retry(&[topic], spec).await?;
        self.known().insert(topic.to_owned());
        Ok(())
    }

    /// Creates `topic` and its dead-letter topic `{topic}.dlq` with `spec`.
    pub async fn create_topic_with_dlq(&self, topic: &str, spec: &TopicSpec) -> Result<()> {
        validate_topic(topic)?;
        let dlq = dead_letter_topic(topic);
        self.create_with_retry(&[topic, &dlq], spec).await?;
        self.known().extend([topic.to_owned(), dlq]);
        Ok(())
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.inner
            .known_topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Creates the topics not known yet, when auto-creation is on.
    async fn ensure_topics(&self, topics: &[&str]) -> Result<()> {
        if !self.inner.options.auto_create_topics {
            return Ok(());
        }
        let missing: Vec<&str> = {
            let known = self.known();
            topics
                .iter()
                .copied()
                .filter(|t| !known.contains(*t))
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        // Boxed: every publish's future would hold this rare path's state.
        Box::pin(self.create_with_retry(&missing, &self.inner.options.topic_spec)).await?;
        self.known().extend(missing.into_iter().map(str::to_owned));
        Ok(())
    }

    async fn create_with_retry(&self, topics: &[&str], spec: &TopicSpec) -> Result<()> {
        let policy = &self.inner.options.reconnect;
        let started = tokio::time::Instant::now();
        let request_timeout = self.inner.options.request_timeout;
        policy
            .retry(
                || {
                    let timeout = policy
                        .time_left(started)
                        .map_or(request_timeout, |left| left.min(request_timeout));
                    admin::create_topics(
                        &self.inner.admin,
                        &self.inner.producer,
                        topics,
                        spec,
                        timeout.max(Duration::from_millis(1)),
                    )
                },
                BrokerError::is_transient,
            )
            .await
            .map_err(|(e, attempts)| unavailable(e, attempts, &self.inner.settings.brokers))
    }

    /// One metadata round trip.
    async fn metadata_round_trip(&self) -> Result<usize> {
        self.metadata_round_trip_within(self.inner.options.request_timeout)
            .await
    }

    /// One metadata round trip that waits at most `timeout`.
    async fn metadata_round_trip_within(&self, timeout: Duration) -> Result<usize> {
        let producer = self.inner.producer.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, timeout)
                .map(|m| m.brokers().len())
        })
        .await
        .map_err(|e| BrokerError::backend(BACKEND, e))?
        .map_err(|e| BrokerError::backend(BACKEND, e))
    }

    /// Retries a metadata round trip with the reconnect policy. Each attempt
    /// is cut to the policy's time left, so the whole wait stays within the
    /// policy's limit (30 s by default) however the broker fails to answer;
    /// the error names the bootstrap servers. A refused authentication ends
    /// the wait at once with a final [`BrokerError::Refused`].
    async fn wait_reachable(&self) -> Result<()> {
        let policy = &self.inner.options.reconnect;
        let started = tokio::time::Instant::now();
        let request_timeout = self.inner.options.request_timeout;
        let watch = &self.inner.watch;
        policy
            .retry(
                || {
                    let timeout = policy
                        .time_left(started)
                        .map_or(request_timeout, |left| left.min(request_timeout));
                    let attempt =
                        self.metadata_round_trip_within(timeout.max(Duration::from_millis(1)));
                    async move {
                        tokio::select! {
                            r = attempt => r,
                            reason = watch.authentication_failed() => {
                                Err(BrokerError::Refused {
                                    backend: BACKEND,
                                    operation: "authenticate",
                                    reason,
                                })
                            }
                        }
                    }
                },
                BrokerError::is_transient,
            )
            .await
            .map(|_| ())
            .map_err(|(e, attempts)| {
                let servers = self.inner.settings.brokers.clone();
                unavailable(e, attempts, &servers)
            })
    }

    /// Enqueues one record, waiting while librdkafka's queue is full.
    async fn enqueue(
        &self,
        topic: &str,
        message: &Message,
        deadline: tokio::time::Instant,
        partition: Option<i32>,
    ) -> Result<DeliveryFuture> {
        let mut record = FutureRecord::<[u8], [u8]>::to(topic)
            .headers(codec::encode_headers(message))
            .timestamp(message.timestamp_millis());
        if let Some(partition) = partition {
            record = record.partition(partition);
        }
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if !message.payload_is_null() {
            record = record.payload(&message.payload()[..]);
        }
        loop {
            match self.inner.producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if tokio::time::Instant::now() < deadline =>
                {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => {
                    return Err(match e.rdkafka_error_code() {
                        // librdkafka's own `message.max.bytes`, checked before sending.
                        Some(code) if refusal::is_size_refusal(code) => {
                            BrokerError::MessageTooLarge {
                                size: message.encoded_len(),
                                max: self.inner.client_limit,
                            }
                        }
                        _ => refusal::produce_error(e, self.inner.message_timeout),
                    });
                }
            }
        }
    }

    /// `work`, or [`BrokerError::Timeout`] once `deadline` passes: librdkafka
    /// can hold a record past `message.timeout.ms` while a request to a
    /// broker that went away is in flight (7.5 to 11.4 s seen for 2.5 s).
    async fn by<T>(
        &self,
        deadline: tokio::time::Instant,
        work: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        tokio::time::timeout_at(deadline, work)
            .await
            .unwrap_or(Err(BrokerError::Timeout {
                operation: "kafka publish",
                after: self.inner.message_timeout,
            }))
    }

    /// The delivery report of `message`, sent to `topic`. `limit` holds
    /// the topic's limit once a size refusal of the same publish read it.
    async fn delivered(
        &self,
        topic: &str,
        message: &Message,
        delivery: DeliveryFuture,
        limit: &TopicLimit,
    ) -> Result<()> {
        match delivery.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(match e.rdkafka_error_code() {
                // Boxed, as rare: see `ensure_topics`.
                Some(code) if refusal::is_size_refusal(code) => {
                    Box::pin(self.size_refusal(code, topic, message, limit)).await
                }
                _ => refusal::produce_error(e, self.inner.message_timeout),
            }),
            Err(_canceled) => Err(BrokerError::backend(
                BACKEND,
                "the producer stopped before reporting the delivery",
            )),
        }
    }

    /// The broker refused `message` (or the record batch it was in) as
    /// over `max.message.bytes`: [`BrokerError::MessageTooLarge`] with the
    /// topic's limit, read from the cluster (one request per publish or
    /// batch, only on this path); see [`refusal::size_refusal`].
    async fn size_refusal(
        &self,
        code: RDKafkaErrorCode,
        topic: &str,
        message: &Message,
        limit: &TopicLimit,
    ) -> BrokerError {
        let limit = *limit
            .get_or_init(|| {
                admin::topic_max_message_bytes(&self.inner.admin, topic, self.request_timeout())
            })
            .await;
        refusal::size_refusal(code, topic, message.encoded_len(), limit)
    }

    /// Makes sure `{topic}.retry`, the delay topic of `topic`, exists with
    /// one partition per delay tier and partition of `topic` (created with
    /// the topic spec's replication and settings but the cluster's
    /// retention, which must outlast the longest tier); returns its name
    /// and the partitions of `topic`. Checked once per broker and topic.
    async fn ensure_delay_topic(&self, topic: &str) -> Result<(String, i32)> {
        let name = delay::delay_topic(topic);
        validate_topic(&name)?;
        if let Some(&count) = self.delay_layouts().get(topic) {
            return Ok((name, count));
        }
        self.ensure_topics(&[topic]).await?;
        let main = self.partition_count(topic).await? as i32;
        if main == 0 {
            return Err(BrokerError::Refused {
                backend: BACKEND,
                operation: "delayed publish and delayed retry",
                reason: format!("topic {topic} does not exist"),
            });
        }
        let wanted = delay::partitions(main);
        if self.inner.options.auto_create_topics {
            let mut spec = self.inner.options.topic_spec.clone();
            spec.partitions = wanted;
            spec.config.retain(|k, _| !k.starts_with("retention."));
            self.create_with_retry(&[&name], &spec).await?;
        }
        let found = self.partition_count(&name).await?;
        if found != wanted as usize {
            return Err(BrokerError::Refused {
                backend: BACKEND,
                operation: "delayed publish and delayed retry",
                reason: match found {
                    0 => format!(
                        "the delay topic {name} does not exist: create it with {wanted} partitions ({} delay tiers x {main} partitions of {topic}) or turn on auto_create_topics",
                        delay::tiers()
                    ),
                    n => format!(
                        "the delay topic {name} has {n} partitions; it needs {wanted} ({} delay tiers x {main} partitions of {topic}): recreate it once it is empty",
                        delay::tiers()
                    ),
                },
            });
        }
        self.delay_layouts().insert(topic.to_owned(), main);
        Ok((name, main))
    }

    fn delay_layouts(&self) -> std::sync::MutexGuard<'_, HashMap<String, i32>> {
        self.inner
            .delay_layouts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Partitions of `topic` in the cluster's metadata (0 when unknown).
    /// Without auto-creation, reads the metadata of every topic: asking for
    /// one by name would let a cluster that creates topics on first use
    /// create it with its default partitions.
    async fn partition_count(&self, topic: &str) -> Result<usize> {
        let producer = self.inner.producer.clone();
        let topic = topic.to_owned();
        let timeout = self.request_timeout();
        let by_name = self.inner.options.auto_create_topics;
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(by_name.then_some(topic.as_str()), timeout)
                .map(|m| {
                    m.topics()
                        .iter()
                        .find(|t| t.name() == topic && t.error().is_none())
                        .map_or(0, |t| t.partitions().len())
                })
        })
        .await
        .map_err(|e| BrokerError::backend(BACKEND, e))?
        .map_err(|e| BrokerError::backend(BACKEND, e))
    }

    /// Produces `message` to the delay topic of `topic`, due after `tier`,
    /// for every group of the topic or only `group`, in the partition of
    /// `tier` read by the owner of the topic's partition `main` (by default
    /// one chosen from the key); returns once the broker accepted it.
    pub(crate) async fn send_delayed(
        &self,
        topic: &str,
        mut message: Message,
        tier: Tier,
        group: Option<&str>,
        main: Option<i32>,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.inner.message_timeout;
        self.by(deadline, async {
            let (delay_topic, count) = self.ensure_delay_topic(topic).await?;
            let main = main.unwrap_or_else(|| delay::spread(&message, count));
            delay::mark(&mut message, tier, group);
            let delivery = {
                let closed = self.inner.closed.read().await;
                if *closed {
                    return Err(BrokerError::Closed("kafka publisher"));
                }
                let partition = Some(delay::partition_of(tier, main, count));
                self.enqueue(&delay_topic, &message, deadline, partition)
                    .await?
            };
            self.delivered(&delay_topic, &message, delivery, &TopicLimit::new())
                .await
        })
        .await
    }

    async fn health_check(&self) -> Health {
        match self.metadata_round_trip().await {
            Ok(0) => Health::Unhealthy("kafka: metadata lists no brokers".into()),
            Ok(_) => Health::Healthy,
            Err(e) => Health::Unhealthy(e.to_string()),
        }
    }
}

/// A topic's `max.message.bytes`, read at most once per publish call.
type TopicLimit = tokio::sync::OnceCell<Option<usize>>;

fn unavailable(e: BrokerError, attempts: u32, servers: &str) -> BrokerError {
    match e {
        e if e.is_transient() => BrokerError::Unavailable {
            backend: BACKEND,
            attempts: attempts as usize,
            source: Box::new(AtServers {
                servers: servers.to_owned(),
                source: e,
            }),
        },
        e => e,
    }
}

/// The last error of a failed connect, with the servers it was for
/// (bootstrap servers carry no credentials).
#[derive(Debug, thiserror::Error)]
#[error("bootstrap servers {servers}: {source}")]
struct AtServers {
    servers: String,
    #[source]
    source: BrokerError,
}

#[async_trait]
impl Publisher for KafkaBroker {
    /// Returns within `message.timeout.ms` (30 s by default) from the call,
    /// topic creation included; past it the error is
    /// [`BrokerError::Timeout`] and the message may still arrive (as with
    /// librdkafka's own timeout: at-least-once).
    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        check_outgoing(topic, &message, self.inner.max_message_bytes)?;
        let deadline = tokio::time::Instant::now() + self.inner.message_timeout;
        self.by(deadline, async {
            self.ensure_topics(&[topic]).await?;
            let delivery = {
                let closed = self.inner.closed.read().await;
                if *closed {
                    return Err(BrokerError::Closed("kafka publisher"));
                }
                self.enqueue(topic, &message, deadline, None).await?
            };
            self.delivered(topic, &message, delivery, &TopicLimit::new())
                .await
        })
        .await
    }

    /// Produces the message to its tier's partition of `{topic}.retry`;
    /// every subscription of the topic hands it out once it falls due (see
    /// the crate documentation). Returns once the broker accepted it.
    async fn publish_after(&self, topic: &str, message: Message, delay: Duration) -> Result<()> {
        check_outgoing(topic, &message, self.inner.max_message_bytes)?;
        match Tier::for_delay(delay)? {
            None => self.publish(topic, message).await,
            Some(tier) => self.send_delayed(topic, message, tier, None, None).await,
        }
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        for m in &messages {
            check_outgoing(topic, m, self.inner.max_message_bytes)?;
        }
        let deadline = tokio::time::Instant::now() + self.inner.message_timeout;
        self.by(deadline, self.ensure_topics(&[topic])).await?;
        // Enqueue everything, then wait for all reports: librdkafka batches
        // the records instead of one round trip per message.
        let mut pending = Vec::with_capacity(messages.len());
        {
            let closed = self.inner.closed.read().await;
            if *closed {
                return Err(BrokerError::Closed("kafka publisher"));
            }
            for m in &messages {
                pending.push(self.enqueue(topic, m, deadline, None).await);
            }
        }
        let limit = &TopicLimit::new();
        let results = futures::future::join_all(pending.into_iter().zip(&messages).map(
            |(p, m)| async move {
                match p {
                    Ok(delivery) => {
                        self.by(deadline, self.delivered(topic, m, delivery, limit))
                            .await
                    }
                    Err(e) => Err(e),
                }
            },
        ))
        .await;
        batch_result(results)
    }

    fn max_message_bytes(&self) -> usize {
        self.inner.max_message_bytes
    }

    fn backend_name(&self) -> &'static str {
        BACKEND
    }

    async fn health(&self) -> Health {
        self.health_check().await
    }

    async fn close(&self) -> Result<()> {
        *self.inner.closed.write().await = true;
        let producer = self.inner.producer.clone();
        let timeout = self.inner.message_timeout;
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|e| BrokerError::backend(BACKEND, e))?
            .map_err(|_| BrokerError::Timeout {
                operation: "kafka producer flush",
                after: timeout,
            })
    }
}

#[async_trait]
impl Subscriber for KafkaBroker {
    async fn subscribe(&self, subscription: Subscription) -> Result<Box<dyn DeliveryStream>> {
        validate_topic(&subscription.topic)?;
        if subscription.group.is_empty() {
            return Err(BrokerError::Misconfigured("empty consumer group name"));
        }
        let dlq = dead_letter_topic(&subscription.topic);
        if subscription.topic.ends_with(".dlq") {
            self.ensure_topics(&[&subscription.topic]).await?;
        } else {
            self.ensure_topics(&[&subscription.topic, &dlq]).await?;
        }
        if !self.inner.options.auto_create_topics {
            self.wait_reachable().await?;
        }
        let delay_topic = match delay::reads_delays(&subscription.topic) {
            true => match self.ensure_delay_topic(&subscription.topic).await {
                Ok(layout) => Some(layout),
                // `{topic}.retry` is too long a name, or the cluster manages
                // topics and has no fitting one: no delays for this topic.
                Err(e @ BrokerError::InvalidTopic(_)) => {
                    tracing::warn!(topic = %subscription.topic, error = %e, "no delay topic: delayed publish and delayed retry are not available for this topic");
                    None
                }
                Err(e @ BrokerError::Refused { .. }) if !self.inner.options.auto_create_topics => {
                    tracing::warn!(topic = %subscription.topic, error = %e, "no delay topic: delayed publish and delayed retry are not available for this topic");
                    None
                }
                Err(e) => return Err(e),
            },
            false => None,
        };
        let options = &self.inner.options.consumer;
        let Some((delay_topic, count)) = delay_topic else {
            let stream = consumer::open(&self.inner.settings, subscription, options, None, None);
            return Ok(Box::new(stream.await?));
        };
        let retry = delay::Retry::new(self.clone(), &subscription.topic, &subscription.group);
        // The delay reader joins no group: it follows the main consumer's
        // assignment, so it exists before the main consumer joins.
        let (delays, follower) = delay::open(
            &self.inner.settings,
            delay_topic,
            count,
            &subscription,
            retry.clone(),
            options,
        )?;
        let main = consumer::open(
            &self.inner.settings,
            subscription,
            options,
            Some(retry),
            Some(follower),
        )
        .await?;
        Ok(Box::new(delay::Merged::new(main, delays)))
    }

    /// Delayed retries go to the topic's delay topic, marked for the
    /// subscription's group (see the crate documentation).
    fn delayed_retry(&self) -> bool {
        true
    }

    async fn health(&self) -> Health {
        self.health_check().await
    }

    fn backend_name(&self) -> &'static str {
        BACKEND
    }
}
