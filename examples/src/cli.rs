//! A small command line tool on any backend: publish, tail a topic, list
//! and replay dead letters. The backend is the route of module `cli`
//! (`BROKER_ROUTE_CLI`, else the default route from `KAFKA_ENABLED` /
//! `RABBITMQ_URL`).
//!
//! ```text
//! cli publish <topic> <payload> [--key K] [--header name=value]...
//! cli tail <topic> [--group G] [--count N] [--idle-secs S]
//! cli dlq list <topic> [--count N] [--idle-secs S]
//! cli dlq replay <topic> [--max N] [--idle-secs S]
//! ```
//!
//! Messages are printed one JSON object per line.

use std::io::Write;
use std::time::Duration;

use broker::migrate::replay_dead_letters;
use broker::topic::dead_letter_topic;
use broker::{BrokerError, Message, Received, Subscription};

use broker::{Brokers, Endpoints};

/// Module name for `BROKER_ROUTE_CLI`.
pub const MODULE: &str = "cli";

/// The consumer group the `dlq` commands read as: listing never
/// acknowledges and replaying does, so a listing shows the letters not
/// replayed yet, on every backend. On RabbitMQ this group's queue is the
/// dead-letter archive ([`broker::rabbitmq::DEAD_LETTER_GROUP`]), which
/// keeps every letter from the topic's first subscription on; on Kafka and
/// in memory a new group reads the dead-letter topic from its start anyway.
pub const DLQ_GROUP: &str = broker::rabbitmq::DEAD_LETTER_GROUP;

/// Usage text.
pub const USAGE: &str = "usage:
  cli publish <topic> <payload> [--key K] [--header name=value]...
  cli tail <topic> [--group G] [--count N] [--idle-secs S]
  cli dlq list <topic> [--count N] [--idle-secs S]
  cli dlq replay <topic> [--max N] [--idle-secs S]";

/// A parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Publish one message.
    Publish {
        /// Topic.
        topic: String,
        /// Payload (UTF-8 text).
        payload: String,
        /// Partition key.
        key: Option<String>,
        /// Extra headers.
        headers: Vec<(String, String)>,
    },
    /// Consume and print messages as group `group` (acknowledging them).
    Tail {
        /// Topic.
        topic: String,
        /// Consumer group.
        group: String,
        /// Stop after this many messages.
        count: usize,
        /// Stop after this long without a message.
        idle: Duration,
    },
    /// Print the dead letters of a topic not replayed yet, removing nothing.
    DlqList {
        /// The original topic (its `{topic}.dlq` is read).
        topic: String,
        /// Print at most this many.
        count: usize,
        /// Stop after this long without a letter.
        idle: Duration,
    },
    /// Move dead letters back to their original topic.
    DlqReplay {
        /// The original topic (its `{topic}.dlq` is read).
        topic: String,
        /// Replay at most this many.
        max: usize,
        /// Stop after this long without a letter.
        idle: Duration,
    },
}

/// Parses the arguments after the program name.
pub fn parse<I, S>(args: I) -> Result<Command, String>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let args: Vec<String> = args.into_iter().map(Into::into).collect();
    let mut positional = Vec::new();
    let mut options: Vec<(String, String)> = Vec::new();
    let mut rest = args.into_iter();
    while let Some(arg) = rest.next() {
        match arg.strip_prefix("--") {
            Some(name) => {
                let value = rest
                    .next()
                    .ok_or_else(|| format!("--{name} needs a value"))?;
                options.push((name.to_owned(), value));
            }
            None => positional.push(arg),
        }
    }
    let known: &[&str] = match positional.first().map(String::as_str) {
        Some("publish") => &["key", "header"],
        Some("tail") => &["group", "count", "idle-secs"],
        Some("dlq") => &["count", "max", "idle-secs"],
        _ => &[],
    };
    if let Some((name, _)) = options.iter().find(|(n, _)| !known.contains(&n.as_str())) {
        return Err(format!("unknown option --{name}"));
    }
    let one = |name: &str| {
        options
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let number = |name: &str, default: usize| -> Result<usize, String> {
        one(name).map_or(Ok(default), |v| {
            v.parse()
                .map_err(|_| format!("--{name} must be a number, not `{v}`"))
        })
    };
    let idle = || number("idle-secs", 5).map(|s| Duration::from_secs(s as u64));
    let words: Vec<&str> = positional.iter().map(String::as_str).collect();
    Ok(match words.as_slice() {
        ["publish", topic, payload] => Command::Publish {
            topic: topic.to_string(),
            payload: payload.to_string(),
            key: one("key"),
            headers: options
                .iter()
                .filter(|(n, _)| n == "header")
                .map(|(_, v)| {
                    v.split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .ok_or_else(|| format!("--header wants name=value, not `{v}`"))
                })
                .collect::<Result<_, _>>()?,
        },
        ["tail", topic] => Command::Tail {
            topic: topic.to_string(),
            group: one("group").unwrap_or_else(|| "cli-tail".into()),
            count: number("count", usize::MAX)?,
            idle: idle()?,
        },
        ["dlq", "list", topic] => Command::DlqList {
            topic: topic.to_string(),
            count: number("count", 100)?,
            idle: idle()?,
        },
        ["dlq", "replay", topic] => Command::DlqReplay {
            topic: topic.to_string(),
            max: number("max", 10_000)?,
            idle: idle()?,
        },
        _ => return Err(USAGE.to_owned()),
    })
}

/// One message as a JSON line. Keys, header values and payloads are shown as
/// text (bytes that are not UTF-8 replaced); a header name that repeats maps
/// to the list of its values.
pub fn json_line(received: &Received) -> String {
    let m = &received.message;
    let mut headers = serde_json::Map::new();
    for (name, value) in m.headers().iter() {
        let text = serde_json::Value::from(value.to_text());
        match headers.get_mut(name) {
            None => {
                headers.insert(name.to_owned(), text);
            }
            Some(serde_json::Value::Array(values)) => values.push(text),
            Some(first) => *first = serde_json::Value::Array(vec![first.take(), text]),
        }
    }
    serde_json::json!({
        "topic": &*received.topic,
        "id": m.id(),
        "key": m.key().map(String::from_utf8_lossy),
        "content_type": m.content_type(),
        "headers": headers,
        "payload": String::from_utf8_lossy(m.payload()),
        "timestamp_ms": m.timestamp_millis(),
        "redelivered": received.redelivered,
    })
    .to_string()
}

/// Runs `command` on the `cli` module's route, writing output to `out`.
/// Returns how many messages it published, printed or replayed.
pub async fn run(
    command: Command,
    brokers: &Brokers,
    out: &mut dyn Write,
) -> Result<usize, BrokerError> {
    let endpoints = brokers.endpoints(MODULE)?;
    run_on(command, &endpoints, out).await
}

/// Runs `command` on explicit endpoints.
pub async fn run_on(
    command: Command,
    endpoints: &Endpoints,
    out: &mut dyn Write,
) -> Result<usize, BrokerError> {
    let write = |out: &mut dyn Write, line: String| {
        writeln!(out, "{line}").map_err(|e| BrokerError::backend("cli", e))
    };
    match command {
        Command::Publish {
            topic,
            payload,
            key,
            headers,
        } => {
            let mut message = Message::new(payload);
            if let Some(key) = key {
                message = message.with_key(key);
            }
            for (name, value) in headers {
                message = message.with_header(name, value);
            }
            let id = message.id().to_owned();
            endpoints.publisher.publish(&topic, message).await?;
            write(
                out,
                serde_json::json!({ "published": id, "topic": topic }).to_string(),
            )?;
            Ok(1)
        }
        Command::Tail {
            topic,
            group,
            count,
            idle,
        } => {
            let mut stream = endpoints
                .subscriber
                .subscribe(Subscription::new(&topic, group))
                .await?;
            let mut printed = 0;
            while printed < count {
                let Ok(Some(delivery)) = tokio::time::timeout(idle, stream.next()).await else {
                    break;
                };
                let delivery = delivery?;
                write(out, json_line(&delivery.received))?;
                delivery.ack().await?;
                printed += 1;
            }
            stream.close().await?;
            Ok(printed)
        }
        Command::DlqList { topic, count, idle } => {
            let dlq = dead_letter_topic(&topic);
            // Held unacknowledged until the end, then handed back by closing:
            // listing removes nothing.
            let mut stream = endpoints
                .subscriber
                .subscribe(Subscription::new(&dlq, DLQ_GROUP).with_prefetch(count.max(1)))
                .await?;
            let mut held = Vec::new();
            while held.len() < count {
                let Ok(Some(delivery)) = tokio::time::timeout(idle, stream.next()).await else {
                    break;
                };
                let delivery = delivery?;
                write(out, json_line(&delivery.received))?;
                held.push(delivery);
            }
            let listed = held.len();
            stream.close().await?;
            drop(held);
            Ok(listed)
        }
        Command::DlqReplay { topic, max, idle } => {
            let dlq = dead_letter_topic(&topic);
            let report = replay_dead_letters(
                &*endpoints.subscriber,
                &*endpoints.publisher,
                &dlq,
                DLQ_GROUP,
                max,
                idle,
            )
            .await?;
            write(
                out,
                serde_json::json!({ "replayed": report.replayed, "left": report.left }).to_string(),
            )?;
            Ok(report.replayed)
        }
    }
}
