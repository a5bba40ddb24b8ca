//! Names and declarations: the exchange, group queues, dead-letter queues.

use broker_core::topic::{dead_letter_topic, is_dead_letter_topic};
use broker_core::BrokerError;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use crate::codec::short;
use crate::{Failure, Inner, BACKEND};

/// The queue a subscription of `group` to `topic` reads.
///
/// A topic's queue per group is `{topic}:{group}` (topic names cannot
/// contain `:`, so these never collide with other queues). A dead-letter
/// topic is different: its dead letters are kept from the start in the one
/// queue `{topic}.dlq`, declared with the topic, and every group reading it
/// takes from that queue (an operator's work queue, drained by the replay
/// tool), so letters that arrived before anyone looked are not missed.
pub(crate) fn subscription_queue(topic: &str, group: &str) -> String {
    match is_dead_letter_topic(topic) {
        true => topic.to_owned(),
        false => format!("{topic}:{group}"),
    }
}

/// Declares the exchange (durable topic exchange; idempotent).
pub(crate) async fn declare_exchange(inner: &Inner, channel: &Channel) -> Result<(), Failure> {
    let name = &inner.options.exchange;
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
                FieldTable::default(),
            ),
        )
        .await;
    declared.map_err(|f| {
        mismatch(
            f,
            &format!("exchange `{name}` (expected a durable topic exchange)"),
        )
    })
}

/// Declares what a subscription of `group` to `topic` needs and returns the
/// queue to read: the exchange, the group queue (dead-lettering to
/// `{topic}.dlq`), and the `{topic}.dlq` queue that keeps dead letters. A
/// dead-letter topic needs only its own queue (no `.dlq.dlq`).
pub(crate) async fn declare_subscription(
    inner: &Inner,
    channel: &Channel,
    topic: &str,
    group: &str,
) -> Result<String, Failure> {
    declare_exchange(inner, channel).await?;
    let queue = subscription_queue(topic, group);
    if is_dead_letter_topic(topic) {
        declare_bound_queue(inner, channel, &queue, topic, queue_args(inner)).await?;
        return Ok(queue);
    }
    let dlq = dead_letter_topic(topic);
    let mut args = queue_args(inner);
    args.insert(
        "x-dead-letter-exchange".into(),
        long(&inner.options.exchange),
    );
    args.insert("x-dead-letter-routing-key".into(), long(&dlq));
    declare_bound_queue(inner, channel, &queue, topic, args).await?;
    declare_bound_queue(inner, channel, &dlq, &dlq, queue_args(inner)).await?;
    Ok(queue)
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

async fn declare_bound_queue(
    inner: &Inner,
    channel: &Channel,
    queue: &str,
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
                short("exchange name", &inner.options.exchange).map_err(Failure::Final)?,
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
