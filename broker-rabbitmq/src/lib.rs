//! RabbitMQ backend of the broker library, on [lapin] 4.
//!
//! [`RabbitMqBroker`] implements [`Publisher`] and [`Subscriber`]; the shared
//! consumer runtime ([`broker_core::Consumer`]) does handling, retries and
//! dead letters on top of it.
//!
//! # Topology
//! - One durable **topic exchange** (default `broker.events`); the routing
//!   key of a message is its topic.
//! - One durable **queue per (consumer group, topic)**, named
//!   `{topic}:{group}` and bound with the topic as binding key, so every group
//!   gets every message and members of a group share them.
//! - Dead letters: subscribing to a topic also declares the durable queue
//!   `{topic}.dlq` (the **dead-letter archive**), bound with the key
//!   `{topic}.dlq`, so every dead letter is kept from the start, before
//!   anyone reads them. The runtime publishes dead letters to `{topic}.dlq`
//!   itself; queues also name the exchange as their `x-dead-letter-exchange`
//!   (routing key `{topic}.dlq`), so a message rejected without requeue
//!   lands there too.
//! - A dead-letter topic is a topic like any other: every group reading
//!   `{topic}.dlq` gets its own queue `{topic}.dlq:{group}` and its own copy
//!   of each letter published after the queue was first declared (or
//!   earlier, for [required groups](RabbitMqBuilder::required_groups)). The
//!   archive is the queue of one well-known group, [`DEAD_LETTER_GROUP`]
//!   (`cli-dlq`, the group of the CLI's `dlq list` / `dlq replay`), so the
//!   tooling sees every letter since the topic's first subscription, as it
//!   did when every reader shared the archive.
//! - Queue type: quorum (default: they count deliveries, which the
//!   consumer's delivery limit needs) or classic ([`QueueType`],
//!   `RABBITMQ_QUEUE_TYPE`); queue expiry
//!   ([`RabbitMqBuilder::queue_expiry`], `RABBITMQ_QUEUE_EXPIRY_MS`).
//!
//! Declarations are idempotent. A queue that exists with other arguments
//! (say classic where quorum is asked for) fails the subscription with an
//! error naming the queue.
//!
//! # Publishing
//! Messages are persistent and confirmed by the broker before `publish`
//! returns. Confirms are pipelined: concurrent publishes and batches share
//! one confirm channel and do not wait for each other's round trips.
//!
//! Publishing to a topic no group has subscribed to succeeds, as on Kafka
//! and in memory; what happens to the message is the application's choice:
//! - **Required groups** ([`RabbitMqBuilder::required_groups`],
//!   `RABBITMQ_REQUIRED_GROUPS`): before its first publish to a topic (on
//!   each connection), the publisher declares the queues of the topic's
//!   required groups, so they keep every message until their consumers
//!   start (Spring Cloud Stream's `requiredGroups`).
//! - **Alternate exchange** ([`RabbitMqBuilder::alternate_exchange`],
//!   `RABBITMQ_ALTERNATE_EXCHANGE`): messages no queue is bound for go there,
//!   and a queue of the same name keeps them.
//! - Otherwise RabbitMQ drops a message no queue is bound for. The publisher
//!   notices it (the topic's dead-letter archive, which every subscription
//!   declares, does not exist), counts it
//!   ([`RabbitMqBroker::unroutable_count`]) and logs a warning with the
//!   topic and the count, at most once a minute per topic, never the
//!   payload.
//!
//! Messages are not published with `mandatory`: lapin 4.12 logs every
//! message RabbitMQ returns at WARN with its payload and headers
//! (`returned_messages.rs`, `warn!(?message, "Server returned us a message")`,
//! on its I/O thread, whatever the application's log settings), and
//! payloads must never reach logs.
//!
//! # Delayed publish
//! [`Publisher::publish_after`] rounds the delay up to its
//! [tier](broker_core::delay::Tier) and publishes, with a confirm, through
//! the default exchange to the topic's **delay queue** for that tier,
//! `{topic}.delay.{tier}` (say `billing.invoices.created.delay.5s`),
//! declared on first use: a durable queue without consumers whose
//! `x-message-ttl` is the tier and whose dead-letter exchange and routing
//! key are the topic exchange and the topic. When the time-to-live runs
//! out, RabbitMQ dead-letters the message to the topic, as if published
//! then: every group's queue bound at that moment gets it. No plugin is
//! needed (Debian's RabbitMQ has no delayed-message exchange).
//!
//! - Every message of a delay queue has the same time-to-live, so the head
//!   is always the next due: RabbitMQ, which expires messages at the head,
//!   releases each on time and in publish order. A message is never early
//!   and at most one tier late.
//! - The message waits in the broker (persistent, in a durable queue), so
//!   publisher and consumer restarts do not lose it.
//! - Delay queues have the configured [`QueueType`]. Quorum ones (3.10+)
//!   dead-letter **at least once** (`x-dead-letter-strategy`, with
//!   `x-overflow = reject-publish`): a due message stays in the delay queue
//!   until the topic's queues confirm it, so a broker failure in between
//!   does not drop it, and a message due while no queue is bound for the
//!   topic waits there until one is (RabbitMQ retries it after 3 minutes,
//!   then every 3 minutes, and logs a warning once per queue): a group that
//!   subscribes late still gets it, minutes late. Classic ones dead-letter at most once and
//!   drop such a message, as a plain publish would be.
//! - The message reads back as published: RabbitMQ's dead-lettering
//!   headers (`x-death`, `x-first-death-*`, `x-last-death-*`) are dropped on
//!   read and the delivery is a first one (`attempt` 1, not redelivered).
//!   RabbitMQ removes the `expiration` property of a dead-lettered message
//!   and would let it cut the wait short, so a message's AMQP expiration
//!   travels in a header through the delay and is restored on read (it is
//!   then no longer enforced by RabbitMQ).
//! - Cost: one queue per topic and tier used (at most eight per topic); a
//!   quorum queue is a Raft group of its own (about 90 KB of memory on an
//!   idle 3.10 node, replicated on each member in a cluster). The queues
//!   stay, like group queues; with [`RabbitMqBuilder::queue_expiry`] they
//!   expire after the expiry plus the tier without publishes, and with them
//!   any message still waiting for a queue to be bound.
//! - [`RabbitMqBroker::publish_after_to_group`] delays a message for one
//!   group's queue only, through the delay queue
//!   `{topic}.delay.{tier}@{group}`, which dead-letters through the default
//!   exchange straight into `{topic}:{group}` (for retries of one group).
//!
//! ```no_run
//! # async fn demo() -> broker_core::Result<()> {
//! use std::time::Duration;
//! use broker_core::{Message, Publisher};
//! let broker = broker_rabbitmq::RabbitMqBroker::builder("amqp://guest:guest@127.0.0.1:5672/%2f")
//!     .connect()
//!     .await?;
//! // Waits 30 s (the 30 s tier) in `billing.invoices.created.delay.30s`.
//! broker
//!     .publish_after("billing.invoices.created", Message::new("{}"), Duration::from_secs(20))
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! # Reconnection
//! lapin's own recovery is not used (it can wait forever once its retries run
//! out). The broker keeps one connection; when it or a channel is lost,
//! publishes and subscriptions reconnect with the [`Backoff`] given to
//! [`RabbitMqBuilder::reconnect`], redeclare what they need, and carry on:
//! a publish not yet confirmed is sent again (so a consumer may see a
//! duplicate, never a loss), a subscription resumes consuming (deliveries not
//! yet acked are redelivered by RabbitMQ). When the policy runs out, a
//! publish fails with [`BrokerError::Unavailable`]; a subscription waits and
//! tries again, forever by default ([`RabbitMqBuilder::resubscribe`]), so an
//! outage of any length pauses consumption and never ends it. Every wait on
//! the broker is bounded.
//!
//! # Clusters
//! The URL may list the nodes of a cluster, comma-separated, with one set
//! of credentials and vhost:
//! `amqp://app:pw@rabbit-1,amqp://app:pw@rabbit-2,amqp://app:pw@rabbit-3`.
//! The connection is on one node at a time ([`Publisher::connected_node`]
//! says which). A connection attempt tries the nodes in turn, each once,
//! starting after the node whose connection was lost, so a client whose
//! node dies is on the next live node after one refused connect, with no
//! backoff; the reconnect policy's backoff runs only between rounds in
//! which every node failed. [`NodeOrder::Shuffle`] draws the order once per
//! client, so that clients spread over the nodes. A publish is `Ok` only
//! with a confirm, whichever node confirms it: publishes lost with a
//! connection are sent again on the new one, and a nacked publish (a
//! quorum queue nacks while it elects a leader) is sent again on a new
//! channel, within the publish's bound. Quorum queues (the default) keep
//! the messages on the other nodes. The README's "Running on a cluster"
//! has the measured figures.
//!
//! ```no_run
//! # async fn demo() -> broker_core::Result<()> {
//! use broker_core::Publisher;
//! use broker_rabbitmq::{NodeOrder, RabbitMqBroker};
//! let broker = RabbitMqBroker::builder(
//!     "amqp://app:pw@rabbit-1:5672/prod,amqp://app:pw@rabbit-2:5672/prod,amqp://app:pw@rabbit-3:5672/prod",
//! )
//! .node_order(NodeOrder::Shuffle)
//! .connect()
//! .await?;
//! println!("on {:?}", broker.connected_node()); // Some("rabbit-2:5672/prod")
//! # Ok(()) }
//! ```
//!
//! ```no_run
//! # async fn demo() -> broker_core::Result<()> {
//! use broker_core::{Message, Publisher};
//! use broker_rabbitmq::{QueueType, RabbitMqBroker};
//! let broker = RabbitMqBroker::builder("amqp://guest:guest@127.0.0.1:5672/%2f")
//!     .queue_type(QueueType::Quorum)
//!     .connect()
//!     .await?;
//! broker.publish("billing.invoices.created", Message::new("{}")).await?;
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use broker_core::config::{RabbitMqSettings, SecretUrl};
use broker_core::{
    Backoff, BrokerError, DeliveryStream, Health, Message, Publisher, Result, Subscriber,
    Subscription,
};
mod codec;
mod connect;
mod logs;
mod publish;
mod settle;
mod subscribe;
mod topology;
mod url;

pub use broker_core::config::{NodeOrder, RequiredGroups};
pub use codec::KEY_HEADER;
pub use logs::{LAPIN_LOG_DIRECTIVE, LOG_INTERVAL};
pub use settle::ACK_FLUSH_AFTER;

const BACKEND: &str = "rabbitmq";

/// The consumer group whose queue on a dead-letter topic `{topic}.dlq` is
/// the dead-letter archive: the queue `{topic}.dlq` that every subscription
/// of `{topic}` declares, so it holds every dead letter from the start.
/// The CLI's `dlq list` and `dlq replay` read as this group; read as it to
/// see letters written before your own group first subscribed.
pub const DEAD_LETTER_GROUP: &str = "cli-dlq";

/// RabbitMQ's queue types this backend declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    /// Classic queues. They keep no delivery count (only a `redelivered`
    /// flag), so the consumer's delivery limit sees at most one earlier
    /// delivery: a message that crashes the consumer loops.
    Classic,
    /// Quorum queues (the default): durable, replicated in a cluster, and
    /// they count deliveries (`x-delivery-count`), which the consumer's
    /// delivery limit uses to dead-letter a message that keeps crashing it.
    #[default]
    Quorum,
}

impl QueueType {
    fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

/// Options of a [`RabbitMqBroker`]; see [`RabbitMqBroker::builder`].
#[derive(Debug, Clone)]
#[must_use = "call .connect() to get a broker"]
pub struct RabbitMqBuilder {
    url: SecretUrl,
    exchange: String,
    queue_type: QueueType,
    reconnect: Backoff,
    resubscribe: Backoff,
    max_message_bytes: usize,
    confirm_timeout: Duration,
    operation_timeout: Duration,
    queue_expiry: Option<Duration>,
    required_groups: RequiredGroups,
    alternate_exchange: Option<String>,
    connection_name: Option<String>,
    tls_ca_pem: Option<String>,
    node_order: NodeOrder,
}

impl RabbitMqBuilder {
    /// The topic exchange all topics share (default `broker.events`).
    pub fn exchange(mut self, name: impl Into<String>) -> Self {
        self.exchange = name.into();
        self
    }
    /// Type of the queues declared (default [`QueueType::Quorum`];
    /// `RABBITMQ_QUEUE_TYPE`). Existing queues keep their type: declaring
    /// another is an error naming the queue, so a deployment whose queues
    /// were declared classic (the default before 0.2) sets
    /// [`QueueType::Classic`] or moves its queues.
    pub fn queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = queue_type;
        self
    }
    /// Reconnect policy (default [`Backoff::reconnect_default`]: at most
    /// 30 s from the call). Each connection attempt is cut to the policy's
    /// time left ([`Backoff::time_left`]) as well as to the operation
    /// timeout, so `connect` fails within the policy's limit whether the
    /// port refuses connections or accepts and never answers.
    pub fn reconnect(mut self, policy: Backoff) -> Self {
        self.reconnect = policy;
        self
    }
    /// How long a subscription that lost its connection keeps trying to
    /// resubscribe. Default: forever (an outage of any length pauses
    /// consumption and never ends it): rounds of connection attempts under
    /// the [reconnect policy](RabbitMqBuilder::reconnect), with waits of
    /// 100 ms doubling up to 5 s between them. A bounded policy (say
    /// `Backoff::reconnect_default().within(Duration::from_secs(300))`) is
    /// an explicit choice: once it runs out, the subscription's stream ends
    /// with [`BrokerError::Unavailable`], its consumer stops, and the app's
    /// health shows the consumer stopped with that error. A refusal (access
    /// refused, a queue declared with other arguments) ends a subscription
    /// at once, whatever the policy.
    pub fn resubscribe(mut self, policy: Backoff) -> Self {
        self.resubscribe = policy;
        self
    }
    /// Largest message accepted (payload, key and headers; default 16 MiB,
    /// below RabbitMQ 3.10's own limit of 128 MiB).
    pub fn max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }
    /// How long a publish waits for the broker's confirm (default 30 s).
    pub fn confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }
    /// How long any other exchange with the broker may take: connecting,
    /// opening a channel, declaring, acking (default 15 s).
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }
    /// Declares queues with `x-expires`: RabbitMQ deletes a queue, with its
    /// messages, once it has had no consumer for this long (publishing to
    /// it does not count; publishers redeclare required groups' queues
    /// every half expiry, which does). Off by default; meant for tests and
    /// development brokers, so that per-run queues do not pile up. From the
    /// environment: `RABBITMQ_QUEUE_EXPIRY_MS`. Every client of a queue must
    /// use the same value: a queue declared with another one is refused.
    pub fn queue_expiry(mut self, after: Duration) -> Self {
        self.queue_expiry = Some(after);
        self
    }
    /// Groups that must receive every message of `topic`, including those
    /// published before the group first subscribed: publishers declare
    /// their queues `{topic}:{group}` (with the dead-letter archive) before
    /// their first publish to `topic` on each connection, so the queues
    /// keep the messages until the consumers start (Spring Cloud Stream's
    /// `requiredGroups`). Call once per topic (groups add up). From the
    /// environment: `RABBITMQ_REQUIRED_GROUPS=topic=group,group;topic=group`.
    ///
    /// Kafka and the memory backend need nothing of the kind: a new group
    /// reads the topic from its start (or the memory backend's retention).
    ///
    /// ```no_run
    /// # async fn demo() -> broker_core::Result<()> {
    /// use broker_core::{Message, Publisher};
    /// let broker = broker_rabbitmq::RabbitMqBroker::builder("amqp://guest:guest@127.0.0.1:5672/%2f")
    ///     .required_groups("billing.invoices.created", ["billing-ledger", "audit"])
    ///     .connect()
    ///     .await?;
    /// // Kept for both groups, whether or not their consumers ever ran.
    /// broker.publish("billing.invoices.created", Message::new("{}")).await?;
    /// # Ok(()) }
    /// ```
    pub fn required_groups<I, G>(mut self, topic: impl Into<String>, groups: I) -> Self
    where
        I: IntoIterator<Item = G>,
        G: Into<String>,
    {
        self.required_groups.add(topic, groups);
        self
    }
    /// Sends messages that no queue is bound for to the exchange `name`
    /// (RabbitMQ's alternate exchange) instead of dropping them: `name` is
    /// declared as a durable fanout exchange with a durable queue `name`
    /// that keeps them, and the topic exchange is declared with
    /// `alternate-exchange = name`. Off by default. From the environment:
    /// `RABBITMQ_ALTERNATE_EXCHANGE`.
    ///
    /// An exchange's arguments never change once declared, so this only
    /// works with a new exchange (or one first declared with it). For an
    /// existing exchange declared without it, the declaration is refused
    /// ([`BrokerError::Refused`] naming the exchange); set the alternate
    /// exchange there with a policy instead (`rabbitmqctl set_policy AE
    /// '^broker\.events$' '{"alternate-exchange":"broker.unroutable"}'
    /// --apply-to exchanges`) and leave this option unset.
    pub fn alternate_exchange(mut self, name: impl Into<String>) -> Self {
        self.alternate_exchange = Some(name.into());
        self
    }
    /// Trusts the certificate authority in `pem` (PEM text) for `amqps://`
    /// connections, besides the system's roots: for brokers whose
    /// certificate a private CA signed.
    ///
    /// ```no_run
    /// # async fn demo() -> broker_core::Result<()> {
    /// let pem = std::fs::read_to_string("/etc/ssl/private-ca.pem").expect("CA file");
    /// let broker = broker_rabbitmq::RabbitMqBroker::builder("amqps://app:secret@rabbit.internal:5671/%2f")
    ///     .tls_ca_pem(pem)
    ///     .connect()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn tls_ca_pem(mut self, pem: impl Into<String>) -> Self {
        self.tls_ca_pem = Some(pem.into());
        self
    }
    /// The order in which the nodes of a node list are tried (default
    /// [`NodeOrder::InOrder`]; `RABBITMQ_NODE_ORDER`). See the crate
    /// documentation, "Clusters".
    pub fn node_order(mut self, order: NodeOrder) -> Self {
        self.node_order = order;
        self
    }
    /// Connection name shown in the management UI.
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = Some(name.into());
        self
    }

    /// Connects (retrying with the reconnect policy) and returns the broker.
    /// Fails with [`BrokerError::Unavailable`] when the broker cannot be
    /// reached within the policy, at once for a malformed URL or refused
    /// credentials.
    pub async fn connect(self) -> Result<RabbitMqBroker> {
        let broker = self.build()?;
        broker.inner.connection().await?;
        Ok(broker)
    }

    /// Builds the broker without connecting: the first operation connects.
    pub fn build(self) -> Result<RabbitMqBroker> {
        let nodes = connect::nodes(&self.url, self.node_order)?;
        codec::short("exchange name", &self.exchange)?;
        if let Some(ae) = &self.alternate_exchange {
            codec::short("alternate exchange name", ae)?;
        }
        self.required_groups.check().map_err(|e| {
            BrokerError::Config(broker_core::config::ConfigError::Invalid {
                var: "RABBITMQ_REQUIRED_GROUPS".into(),
                reason: e.to_string(),
            })
        })?;
        for (topic, groups) in self.required_groups.iter() {
            for group in groups {
                codec::short(
                    "queue name (topic and required group)",
                    &topology::subscription_queue(topic, group),
                )?;
            }
        }
        if self.queue_expiry.is_some_and(|d| d.is_zero()) {
            return Err(BrokerError::Misconfigured(
                "queue expiry must be above zero",
            ));
        }
        Ok(RabbitMqBroker {
            inner: Arc::new(Inner {
                nodes,
                link: tokio::sync::Mutex::new(None),
                next_node: Default::default(),
                connected: Default::default(),
                epoch: Default::default(),
                shut_down: Default::default(),
                publisher: publish::PublisherState::default(),
                options: self,
            }),
        })
    }
}

/// RabbitMQ publisher and subscriber. Cheap to clone: clones share one
/// connection (each subscription and the publisher use their own channel).
#[derive(Clone)]
pub struct RabbitMqBroker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RabbitMqBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let o = &self.inner.options;
        f.debug_struct("RabbitMqBroker")
            .field("url", &o.url)
            .field("exchange", &o.exchange)
            .field("queue_type", &o.queue_type)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    options: RabbitMqBuilder,
    /// The nodes of the URL's node list, in the order they are tried.
    nodes: Vec<connect::Node>,
    /// The shared connection and its node; replaced when lost.
    link: tokio::sync::Mutex<Option<connect::Link>>,
    next_node: connect::NextNode,
    connected: connect::Connected,
    epoch: connect::Epoch,
    /// Set by [`RabbitMqBroker::close`]: no more (re)connecting.
    shut_down: std::sync::atomic::AtomicBool,
    publisher: publish::PublisherState,
}

impl RabbitMqBroker {
    /// Options for a broker at `url` (`amqp://user:password@host:5672/vhost`
    /// or `amqps://...` for TLS).
    pub fn builder(url: impl Into<String>) -> RabbitMqBuilder {
        Self::builder_from(&RabbitMqSettings::new(url))
    }

    /// Options from the library's configuration ([`broker_core::config::BrokerConfig`]):
    /// URL, required groups, queue expiry, alternate exchange and queue type.
    pub fn builder_from(settings: &RabbitMqSettings) -> RabbitMqBuilder {
        RabbitMqBuilder {
            url: settings.url().clone(),
            exchange: "broker.events".into(),
            reconnect: Backoff::reconnect_default(),
            resubscribe: Backoff::reconnect_default().unlimited().without_limit(),
            max_message_bytes: 16 * 1024 * 1024,
            confirm_timeout: Duration::from_secs(30),
            operation_timeout: Duration::from_secs(15),
            queue_expiry: settings.queue_expiry(),
            queue_type: match settings.classic_queues() {
                true => QueueType::Classic,
                false => QueueType::Quorum,
            },
            required_groups: settings.required_groups().clone(),
            alternate_exchange: settings.alternate_exchange().map(str::to_owned),
            connection_name: None,
            tls_ca_pem: None,
            node_order: settings.node_order(),
        }
    }

    /// Connects with default options. Takes the settings, as
    /// `KafkaBroker::connect` does (a reference is accepted too, and
    /// copied).
    pub async fn connect(settings: impl Into<RabbitMqSettings>) -> Result<Self> {
        Self::builder_from(&settings.into()).connect().await
    }

    /// The exchange messages are published to.
    pub fn exchange(&self) -> &str {
        &self.inner.options.exchange
    }

    /// How many messages this broker published that no queue was bound for
    /// (RabbitMQ dropped them: no group had subscribed to their topic and it
    /// has no required groups). Not counted with an alternate exchange,
    /// which keeps them.
    pub fn unroutable_count(&self) -> u64 {
        self.inner.publisher.unroutable_total()
    }

    /// [`RabbitMqBroker::unroutable_count`] for one topic.
    pub fn unroutable_count_of(&self, topic: &str) -> u64 {
        self.inner.publisher.unroutable_of(topic)
    }

    /// The queue that subscriptions of `group` to `topic` read:
    /// `{topic}:{group}`, or the dead-letter archive `{topic}` for group
    /// [`DEAD_LETTER_GROUP`] on a dead-letter topic.
    pub fn queue_name(topic: &str, group: &str) -> String {
        topology::subscription_queue(topic, group)
    }

    /// Publishes `message` for one consumer group only: after `delay`
    /// (rounded up to its [tier](broker_core::delay::Tier)) it lands in the
    /// queue of `group` on `topic`, and no other group sees it. Meant for
    /// retrying one group's message later without blocking its queue. The
    /// message waits in the delay queue `{topic}.delay.{tier}@{group}`,
    /// which dead-letters through the default exchange into the group's
    /// queue `{topic}:{group}`; that queue must exist when the message is
    /// due (the group subscribed once, or is a required group), else
    /// RabbitMQ keeps the message in the delay queue (quorum) or drops it
    /// (classic). A zero delay publishes into the group's queue at once
    /// (dropped by RabbitMQ if it does not exist).
    ///
    /// # Errors
    ///
    /// As [`Publisher::publish_after`]; an empty group is
    /// [`BrokerError::Misconfigured`].
    ///
    /// ```no_run
    /// # async fn demo(broker: broker_rabbitmq::RabbitMqBroker, failed: broker_core::Message) -> broker_core::Result<()> {
    /// use std::time::Duration;
    /// // Only `billing-ledger` sees it again, in 30 s.
    /// broker
    ///     .publish_after_to_group("billing.invoices.created", "billing-ledger", failed, Duration::from_secs(30))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn publish_after_to_group(
        &self,
        topic: &str,
        group: &str,
        message: Message,
        delay: Duration,
    ) -> Result<()> {
        publish::publish_after(&self.inner, topic, Some(group), message, delay).await
    }

    /// The delay queue of `topic` for `tier`: `{topic}.delay.{tier}`.
    ///
    /// ```
    /// use broker_core::delay::Tier;
    /// let tier = Tier::for_delay(std::time::Duration::from_secs(3)).unwrap().unwrap();
    /// let queue = broker_rabbitmq::RabbitMqBroker::delay_queue_name("app.orders.created", tier);
    /// assert_eq!(queue, "app.orders.created.delay.5s");
    /// ```
    pub fn delay_queue_name(topic: &str, tier: broker_core::delay::Tier) -> String {
        topology::delay_queue(topic, tier)
    }

    /// The delay queue of `group`'s queue on `topic` for `tier`:
    /// `{topic}.delay.{tier}@{group}`.
    ///
    /// ```
    /// use broker_core::delay::Tier;
    /// let tier = Tier::for_delay(std::time::Duration::from_secs(60)).unwrap().unwrap();
    /// let queue = broker_rabbitmq::RabbitMqBroker::group_delay_queue_name("app.orders.created", "billing", tier);
    /// assert_eq!(queue, "app.orders.created.delay.2m@billing");
    /// ```
    pub fn group_delay_queue_name(
        topic: &str,
        group: &str,
        tier: broker_core::delay::Tier,
    ) -> String {
        topology::group_delay_queue(topic, group, tier)
    }

    /// Declares the exchange and, for each of `groups`, what a subscription
    /// of that group to `topic` declares (the group's queue
    /// `{topic}:{group}` and the dead-letter archive `{topic}.dlq`), without
    /// consuming anything, so those groups keep every message published
    /// from now on. With no groups, only the exchange. Idempotent; returns
    /// the queues declared (the archive last, once). The operator's
    /// `topic create` runs this.
    ///
    /// # Errors
    ///
    /// An invalid topic; [`BrokerError::Refused`] for a queue that exists
    /// with other arguments; [`BrokerError::Unavailable`] when the broker
    /// cannot be reached within the reconnect policy.
    pub async fn declare_topic(&self, topic: &str, groups: &[&str]) -> Result<Vec<String>> {
        broker_core::topic::validate_topic(topic)?;
        for group in groups {
            codec::short(
                "queue name (topic and group)",
                &topology::subscription_queue(topic, group),
            )?;
        }
        let inner = &self.inner;
        let queues = retry_lost(inner, "declare", || async move {
            let channel = inner.channel().await?;
            topology::declare_exchange(inner, &channel).await?;
            let mut queues = Vec::new();
            for group in groups {
                queues.push(topology::declare_queues(inner, &channel, topic, group).await?);
            }
            if !groups.is_empty() {
                queues.push(broker_core::topic::dead_letter_topic(topic));
            }
            let _ = inner
                .bounded("channel close", channel.close(200, "declared".into()))
                .await;
            Ok(queues)
        })
        .await?;
        if !groups.is_empty() {
            inner.publisher.bound(topic);
        }
        Ok(queues)
    }

    /// Closes the broker: waits for publishes in flight, then closes the
    /// connection, so subscriptions end and publishing fails with
    /// [`BrokerError::Closed`]. Clones share the connection, so this affects
    /// them too. (Called as a method on a `RabbitMqBroker`, this is the one
    /// that runs, not [`Publisher::close`], which closes publishing only.)
    pub async fn close(&self) -> Result<()> {
        Publisher::close(self).await?;
        let mut link = self.inner.link.lock().await;
        self.inner
            .shut_down
            .store(true, std::sync::atomic::Ordering::Release);
        if let Some(live) = link.take() {
            self.inner.connected.clear();
            let closed = self
                .inner
                .bounded("connection close", live.conn.close(200, "shutdown".into()))
                .await;
            if let Err(e) = closed {
                tracing::debug!(error = %e, "closing the RabbitMQ connection");
            }
        }
        Ok(())
    }

    /// The former name of [`RabbitMqBroker::close`].
    #[deprecated(since = "0.1.0", note = "renamed to `close`, as on the other backends")]
    pub async fn shutdown(&self) -> Result<()> {
        self.close().await
    }
}

/// What went wrong in one attempt: worth reconnecting for, or final.
pub(crate) enum Failure {
    /// Connection or channel lost (or never there): retry on a fresh one.
    Lost(BrokerError),
    /// Retrying will not help (bad input, refused, policy ran out).
    Final(BrokerError),
}

impl Failure {
    pub(crate) fn into_error(self) -> BrokerError {
        match self {
            Failure::Lost(e) | Failure::Final(e) => e,
        }
    }

    /// The error once the reconnect policy gave up after `attempts`: a loss
    /// becomes [`BrokerError::Unavailable`], a final error stays as it is.
    pub(crate) fn after_retries(self, attempts: usize) -> BrokerError {
        match self {
            Failure::Lost(e) => BrokerError::Unavailable {
                backend: BACKEND,
                attempts,
                source: Box::new(e),
            },
            Failure::Final(e) => e,
        }
    }
}

impl Inner {
    /// Runs `fut`, failing with [`BrokerError::Timeout`] after the operation timeout.
    pub(crate) async fn bounded<T>(
        &self,
        operation: &'static str,
        fut: impl std::future::Future<Output = lapin::Result<T>>,
    ) -> Result<T, Failure> {
        self.bounded_by(operation, self.options.operation_timeout, fut)
            .await
    }

    /// Runs `fut`, failing with [`BrokerError::Timeout`] after `after`.
    pub(crate) async fn bounded_by<T>(
        &self,
        operation: &'static str,
        after: Duration,
        fut: impl std::future::Future<Output = lapin::Result<T>>,
    ) -> Result<T, Failure> {
        match tokio::time::timeout(after, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(classify(operation, e)),
            Err(_) => Err(Failure::Lost(BrokerError::Timeout { operation, after })),
        }
    }

    async fn health(&self) -> Health {
        let probe = async {
            let channel = self.channel().await.map_err(Failure::into_error)?;
            self.bounded("health probe", channel.close(200, "health".into()))
                .await
                .map_err(Failure::into_error)
        };
        // A broker that is down should be reported promptly, not after the whole reconnect policy.
        match tokio::time::timeout(self.options.operation_timeout, probe).await {
            Ok(Ok(())) => Health::Healthy,
            Ok(Err(e)) => Health::Unhealthy(e.to_string()),
            Err(_) => Health::Unhealthy(format!(
                "no answer from RabbitMQ at {} within {:?}",
                self.options.url, self.options.operation_timeout
            )),
        }
    }
}

/// Runs `op` until it succeeds, fails for good, or the reconnect policy
/// runs out (then a loss is [`BrokerError::Unavailable`]); warns about
/// retries at most once per [`LOG_INTERVAL`] per kind of failure.
pub(crate) async fn retry_lost<T, F, Fut>(inner: &Inner, what: &'static str, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Failure>>,
{
    let policy = &inner.options.reconnect;
    let started = tokio::time::Instant::now();
    let mut delays = policy.delays();
    let mut attempts = 0usize;
    loop {
        attempts += 1;
        let lost = match op().await {
            Ok(v) => return Ok(v),
            Err(Failure::Final(e)) => return Err(e),
            Err(Failure::Lost(e)) => e,
        };
        let next = delays
            .next()
            .filter(|d| policy.time_left(started).is_none_or(|left| *d < left));
        let Some(delay) = next else {
            return Err(Failure::Lost(lost).after_retries(attempts));
        };
        if let Some(suppressed) = logs::allow(&format!("{what}: {lost}")) {
            tracing::warn!(attempt = attempts, ?delay, error = %lost, suppressed, "RabbitMQ {what} failed; retrying");
        }
        tokio::time::sleep(delay).await;
    }
}

/// Sorts a lapin error: connection and channel losses are worth a
/// reconnect; refusals (access, inequivalent declarations) are not.
pub(crate) fn classify(operation: &'static str, e: lapin::Error) -> Failure {
    use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
    use lapin::ErrorKind;
    let refused = |e: &lapin::Error| {
        Failure::Final(BrokerError::Refused {
            backend: BACKEND,
            operation,
            reason: e.to_string(),
        })
    };
    let error = BrokerError::backend(BACKEND, format!("{operation}: {e}"));
    match e.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(
                AMQPSoftError::ACCESSREFUSED
                | AMQPSoftError::PRECONDITIONFAILED
                | AMQPSoftError::RESOURCELOCKED,
            )
            | AMQPErrorKind::Hard(
                AMQPHardError::NOTALLOWED
                | AMQPHardError::INVALIDPATH
                | AMQPHardError::NOTIMPLEMENTED
                | AMQPHardError::SYNTAXERROR,
            ) => refused(&e),
            _ => Failure::Lost(error),
        },
        ErrorKind::AuthProviderError(_)
        | ErrorKind::InvalidProtocolVersion(_)
        | ErrorKind::SerialisationError(_) => refused(&e),
        // The peer sent what we reject (a TLS certificate we do not trust, a
        // server that is not AMQP): reconnecting would get the same answer.
        ErrorKind::IOError(io) if io.kind() == std::io::ErrorKind::InvalidData => refused(&e),
        _ => Failure::Lost(error),
    }
}

#[async_trait]
impl Publisher for RabbitMqBroker {
    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        publish::publish(&self.inner, topic, message).await
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        publish::publish_batch(&self.inner, topic, messages).await
    }

    /// Through the topic's delay queue for the tier (see the crate
    /// documentation, "Delayed publish").
    async fn publish_after(&self, topic: &str, message: Message, delay: Duration) -> Result<()> {
        publish::publish_after(&self.inner, topic, None, message, delay).await
    }

    fn backend_name(&self) -> &'static str {
        BACKEND
    }

    /// The node (`host:port/vhost`) of the one connection that publishes
    /// and subscriptions share.
    fn connected_node(&self) -> Option<String> {
        self.inner.connected_node().map(str::to_owned)
    }

    /// The library's limit (default 16 MiB), or the broker's
    /// `max_message_size` once a refusal told it, whichever is lower.
    fn max_message_bytes(&self) -> usize {
        let own = self.inner.options.max_message_bytes;
        self.inner
            .publisher
            .broker_max()
            .map_or(own, |max| max.min(own))
    }

    async fn health(&self) -> Health {
        self.inner.health().await
    }

    async fn close(&self) -> Result<()> {
        publish::close(&self.inner).await
    }
}

#[async_trait]
impl Subscriber for RabbitMqBroker {
    /// Delayed retries wait in the group's delay queues
    /// (`{topic}.delay.{tier}@{group}`).
    fn delayed_retry(&self) -> bool {
        true
    }

    async fn subscribe(&self, subscription: Subscription) -> Result<Box<dyn DeliveryStream>> {
        subscribe::subscribe(self.inner.clone(), subscription).await
    }

    async fn health(&self) -> Health {
        self.inner.health().await
    }

    fn backend_name(&self) -> &'static str {
        BACKEND
    }
}
