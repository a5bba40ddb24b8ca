//! Names and declarations: the exchange, group queues, dead-letter queues,
//! delay queues.

use broker_core::delay::Tier;
use broker_core::topic::{dead_letter_topic, is_dead_letter_topic};
use broker_core::BrokerError;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use crate::codec::short;
use crate::{Failure, Inner, BACKEND, DEAD_LETTER_GROUP};

/// The queue a subscription of `group` to `topic` reads.
///
/// A topic's queue per group is `{topic}:{group}` (topic names cannot
/// contain `:`, so these never collide with other queues); dead-letter
/// topics too, so every group reading `{topic}.dlq` gets its own copy. One
/// exception: the dead-letter archive `{topic}.dlq`, declared with every
/// subscription of `{topic}` so it keeps every dead letter from the start,
/// is the queue of group [`DEAD_LETTER_GROUP`] on `{topic}.dlq` (the
/// tooling's group; before per-group queues every reader shared it).
pub(crate) fn subscription_queue(topic: &str, group: &str) -> String {
    match is_dead_letter_topic(topic) && group == DEAD_LETTER_GROUP {
        true => topic.to_owned(),
        false => format!("{topic}:{group}"),
    }
}

/// The queue whose existence shows that some group subscribed to `topic`
/// (see `publish::routable`): the dead-letter archive every subscription
/// declares. For a dead-letter topic, its archive is bound to the topic
/// itself, so it is the topic's own name.
pub(crate) fn marker_queue(topic: &str) -> String {
    match is_dead_letter_topic(topic) {
        true => topic.to_owned(),
        false => dead_letter_topic(topic),
    }
}

/// The delay queue of `topic` for `tier`: `{topic}.delay.{tier}`. Its
/// messages go to the whole topic (every group) when due. No other queue
/// has such a name: group queues contain `:`, dead-letter archives end in
/// `.dlq`.
pub(crate) fn delay_queue(topic: &str, tier: Tier) -> String {
    format!("{topic}.delay.{tier}")
}

/// The delay queue of one group's queue on `topic` for `tier`:
/// `{topic}.delay.{tier}@{group}`. Its messages go to that group's queue
/// alone when due (for a retry of one group's message). The `@`, which no
/// topic name has, keeps it apart from every group queue `{topic}:{group}`
/// (whatever the group's name) and every topic's delay queue.
pub(crate) fn group_delay_queue(topic: &str, group: &str, tier: Tier) -> String {
    format!("{topic}.delay.{tier}@{group}")
}

/// Declares the delay queue of `topic` for `tier` ([`delay_queue`]) and
/// returns its name: messages published to it wait `tier`, then RabbitMQ
/// dead-letters them to the topic exchange with the topic as routing key,
/// as if published to the topic then. The exchange must exist.
pub(crate) async fn declare_delay_queue(
    inner: &Inner,
    channel: &Channel,
    topic: &str,
    tier: Tier,
) -> Result<String, Failure> {
    let queue = delay_queue(topic, tier);
    let args = delay_args(inner, tier, &inner.options.exchange, topic);
    declare_unbound_queue(inner, channel, &queue, args).await?;
    Ok(queue)
}

/// Declares the delay queue of `group`'s queue on `topic` for `tier`
/// ([`group_delay_queue`]) and returns its name: messages published to it
/// wait `tier`, then RabbitMQ dead-letters them through the default
/// exchange straight into the group's queue (which must exist by then),
/// so no other group sees them.
pub(crate) async fn declare_group_delay_queue(
    inner: &Inner,
    channel: &Channel,
    topic: &str,
    group: &str,
    tier: Tier,
) -> Result<String, Failure> {
    let queue = group_delay_queue(topic, group, tier);
    let target = subscription_queue(topic, group);
    let args = delay_args(inner, tier, "", &target);
    declare_unbound_queue(inner, channel, &queue, args).await?;
    Ok(queue)
}

/// A delay queue's arguments: every message lives `tier` (one time-to-live
/// for the whole queue, so the first in is the first due and RabbitMQ,
/// which expires messages at the head, releases each on time), then is
/// dead-lettered to `exchange` with `routing_key`. Quorum delay queues
/// dead-letter at least once (RabbitMQ 3.10+: the message stays in the
/// delay queue until the target queues confirm it; one no queue is bound
/// for yet waits there, retried every few minutes, instead of being
/// dropped), which needs
/// `x-overflow = reject-publish`. Classic ones, for brokers that keep
/// classic queues, dead-letter at most once. With a queue expiry, the
/// queue outlives its last message: expiry plus the tier.
fn delay_args(inner: &Inner, tier: Tier, exchange: &str, routing_key: &str) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        long(inner.options.queue_type.as_str()),
    );
    let ttl = millis(tier.duration());
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
    args.insert("x-dead-letter-exchange".into(), long(exchange));
    args.insert("x-dead-letter-routing-key".into(), long(routing_key));
    if inner.options.queue_type == crate::QueueType::Quorum {
        args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
        args.insert("x-overflow".into(), long("reject-publish"));
    }
    if let Some(expiry) = inner.options.queue_expiry {
        let ms = millis(expiry).saturating_add(ttl);
        args.insert("x-expires".into(), AMQPValue::LongLongInt(ms));
    }
    args
}

fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

/// Declares the exchange (durable topic exchange; idempotent).
///
/// With an alternate exchange configured, that exchange (a durable fanout
/// exchange) and a durable queue of the same name bound to it are declared
/// first, and the topic exchange names it as its `alternate-exchange`. An
/// existing topic exchange declared without it refuses the declaration:
/// arguments of an exchange never change, so such a deployment sets the
/// alternate exchange with a policy instead (and leaves the option unset).
pub(crate) async fn declare_exchange(inner: &Inner, channel: &Channel) -> Result<(), Failure> {
    let name = &inner.options.exchange;
    let mut args = FieldTable::default();
    if let Some(ae) = &inner.options.alternate_exchange {
        declare_alternate_exchange(inner, channel, ae).await?;
        args.insert("alternate-exchange".into(), long(ae));
    }
    let declared = inner
        .bounded(
            "exchange declare",
            channel.exchange_declare(
                short("exchange name", name).map_err(Failure::Final)?,
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            ),
        )
        .await;
    declared.map_err(|f| {
        let expected = match &inner.options.alternate_exchange {
            Some(ae) => format!(
                "a durable topic exchange with alternate exchange `{ae}`; an exchange \
                 declared without one keeps it: set `{ae}` with a policy and drop the option, \
                 or use a new exchange name"
            ),
            None => "a durable topic exchange".to_owned(),
        };
        mismatch(f, &format!("exchange `{name}` (expected {expected})"))
    })
}

/// The alternate exchange (durable fanout) and its queue, which keeps what
/// no group's queue is bound for.
async fn declare_alternate_exchange(
    inner: &Inner,
    channel: &Channel,
    name: &str,
) -> Result<(), Failure> {
    inner
        .bounded(
            "exchange declare",
            channel.exchange_declare(
                short("alternate exchange name", name).map_err(Failure::Final)?,
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await
        .map_err(|f| {
            mismatch(
                f,
                &format!("alternate exchange `{name}` (expected a durable fanout exchange)"),
            )
        })?;
    // Kept until someone looks: no expiry.
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        long(inner.options.queue_type.as_str()),
    );
    declare_queue_bound_to(inner, channel, name, name, "", args).await
}

/// Declares what a subscription of `group` to `topic` needs and returns the
/// queue to read: the exchange and [`declare_queues`].
pub(crate) async fn declare_subscription(
    inner: &Inner,
    channel: &Channel,
    topic: &str,
    group: &str,
) -> Result<String, Failure> {
    declare_exchange(inner, channel).await?;
    declare_queues(inner, channel, topic, group).await
}

/// Declares the queues of `group` on `topic` (the exchange must exist) and
/// returns the group's queue: the dead-letter archive `{topic}.dlq` (bound
/// to `{topic}.dlq`, so dead letters are kept even before anyone reads
/// them), and the group queue `{topic}:{group}` bound to the topic, whose
/// dead-letter exchange routes rejected messages to `{topic}.dlq`. A
/// dead-letter topic is a topic like any other (its own dead letters go to
/// `{topic}.dlq.dlq`), except that group [`DEAD_LETTER_GROUP`] reads the
/// archive itself.
pub(crate) async fn declare_queues(
    inner: &Inner,
    channel: &Channel,
    topic: &str,
    group: &str,
) -> Result<String, Failure> {
    let queue = subscription_queue(topic, group);
    let dlq = dead_letter_topic(topic);
    if queue == topic {
        // The archive itself, as its source's subscriptions declare it.
        declare_bound_queue(inner, channel, &queue, topic, queue_args(inner)).await?;
    } else {
        let mut args = queue_args(inner);
        args.insert(
            "x-dead-letter-exchange".into(),
            long(&inner.options.exchange),
        );
        args.insert("x-dead-letter-routing-key".into(), long(&dlq));
        declare_bound_queue(inner, channel, &queue, topic, args).await?;
    }
    declare_bound_queue(inner, channel, &dlq, &dlq, queue_args(inner)).await?;
    Ok(queue)
}

/// Declares the queues of the required groups of `topic` (none: nothing).
pub(crate) async fn declare_required_groups(
    inner: &Inner,
    channel: &Channel,
    topic: &str,
) -> Result<(), Failure> {
    for group in inner.options.required_groups.of(topic) {
        declare_queues(inner, channel, topic, group).await?;
    }
    Ok(())
}

/// Whether `queue` exists: a passive declaration. `Ok(false)` when it does
/// not (RabbitMQ then closes `channel`).
pub(crate) async fn queue_exists(
    inner: &Inner,
    channel: &Channel,
    queue: &str,
) -> Result<bool, Failure> {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    let name = short("queue name", queue).map_err(Failure::Final)?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let after = inner.options.operation_timeout;
    let declared = tokio::time::timeout(
        after,
        channel.queue_declare(name, passive, FieldTable::default()),
    )
    .await
    .map_err(|_| {
        Failure::Lost(BrokerError::Timeout {
            operation: "queue declare (passive)",
            after,
        })
    })?;
    match declared {
        Ok(_) => Ok(true),
        Err(e) => match e.kind() {
            lapin::ErrorKind::ProtocolError(amqp)
                if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)) =>
            {
                Ok(false)
            }
            _ => Err(crate::classify("queue declare (passive)", e)),
        },
    }
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes()))
}

fn queue_args(inner: &Inner) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        long(inner.options.queue_type.as_str()),
    );
    if let Some(expiry) = inner.options.queue_expiry {
        let ms = i64::try_from(expiry.as_millis()).unwrap_or(i64::MAX).max(1);
        args.insert("x-expires".into(), AMQPValue::LongLongInt(ms));
    }
    args
}

/// A durable queue reached through the default exchange (by its name), not
/// bound to the topic exchange.
async fn declare_unbound_queue(
    inner: &Inner,
    channel: &Channel,
    queue: &str,
    args: FieldTable,
) -> Result<(), Failure> {
    let name = short("queue name", queue).map_err(Failure::Final)?;
    inner
        .bounded(
            "queue declare",
            channel.queue_declare(
                name,
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            ),
        )
        .await
        .map_err(|f| mismatch(f, &format!("delay queue `{queue}`")))?;
    Ok(())
}

async fn declare_bound_queue(
    inner: &Inner,
    channel: &Channel,
    queue: &str,
    binding_key: &str,
    args: FieldTable,
) -> Result<(), Failure> {
    let exchange = &inner.options.exchange;
    declare_queue_bound_to(inner, channel, queue, exchange, binding_key, args).await
}

async fn declare_queue_bound_to(
    inner: &Inner,
    channel: &Channel,
    queue: &str,
    exchange: &str,
    binding_key: &str,
    args: FieldTable,
) -> Result<(), Failure> {
    let name = short("queue name", queue).map_err(Failure::Final)?;
    inner
        .bounded(
            "queue declare",
            channel.queue_declare(
                name.clone(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            ),
        )
        .await
        .map_err(|f| mismatch(f, &format!("queue `{queue}`")))?;
    inner
        .bounded(
            "queue bind",
            channel.queue_bind(
                name,
                short("exchange name", exchange).map_err(Failure::Final)?,
                short("routing key", binding_key).map_err(Failure::Final)?,
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
    Ok(())
}

/// Turns a refused declaration into an error that says what to fix.
fn mismatch(failure: Failure, what: &str) -> Failure {
    match failure {
        Failure::Final(e) => Failure::Final(BrokerError::Refused {
            backend: BACKEND,
            operation: "declare",
            reason: format!(
                "{what} exists with other settings or cannot be declared; delete it or \
                 declare it as it exists (queue type, expiry): {e}"
            ),
        }),
        lost => lost,
    }
}
