//! The commands, on connected brokers.

use std::io::{Read, Write};
use std::time::Duration;

use clap::Args;

use super::{
    connect, idle, parse_header, route_builder, CliError, Command, DlqCommand, DlqListArgs,
    DlqReplayArgs, Exit, LagArgs, PublishArgs, TailArgs, TopicCommand, TopicCreateArgs, DLQ_GROUP,
    MODULE,
};
use crate::config::{BrokerKind, Route};
use crate::message::header;
use crate::topic::{dead_letter_topic, validate_topic};
use crate::{Brokers, BrokersBuilder, Endpoints, Message, Received, Subscription};
use broker_core::Delivery;

/// Where a command reads and writes.
pub struct Io<'a> {
    /// Read for `publish` without a payload argument (or with `-`).
    pub stdin: &'a mut dyn Read,
    /// Data: one JSON object per line.
    pub out: &'a mut dyn Write,
    /// Show progress of long operations on the terminal (stderr); the
    /// binary turns it on only when stderr is a terminal.
    pub progress: bool,
}

impl std::fmt::Debug for Io<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Io")
            .field("progress", &self.progress)
            .finish_non_exhaustive()
    }
}

impl Io<'_> {
    fn line(&mut self, value: impl std::fmt::Display) -> Result<(), CliError> {
        writeln!(self.out, "{value}")
            .map_err(|e| CliError::new(Exit::Other, format!("writing the output: {e}")))
    }
}

/// Which dead letters a `dlq` command takes; every given condition must
/// hold (a repeated `--kind` or `--id` matches any of its values).
#[derive(Debug, Clone, Default, PartialEq, Eq, Args)]
pub struct DlqFilter {
    /// Only letters of this failure kind (x-dlq-error-kind: handler,
    /// permanent, decode, validation, panic); repeatable
    #[arg(long = "kind", value_name = "KIND")]
    pub kinds: Vec<String>,
    /// Only the letter with this message id; repeatable
    #[arg(long = "id", value_name = "ID")]
    pub ids: Vec<String>,
    /// Only letters consumed from this topic (x-dlq-original-topic)
    #[arg(long, value_name = "TOPIC")]
    pub original_topic: Option<String>,
    /// Only letters whose reason (x-dlq-reason) contains this text
    #[arg(long, value_name = "TEXT")]
    pub reason_contains: Option<String>,
    /// Only letters with this header value; repeatable (all must match)
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
}

impl DlqFilter {
    /// Whether `letter` passes the filter.
    pub fn matches(&self, letter: &Message) -> bool {
        let headers = letter.headers();
        let has = |name: &str, value: &str| headers.get_all(name).any(|v| v.to_text() == value);
        (self.kinds.is_empty() || self.kinds.iter().any(|k| has(header::DLQ_ERROR_KIND, k)))
            && (self.ids.is_empty() || self.ids.iter().any(|id| id == letter.id()))
            && self
                .original_topic
                .as_ref()
                .is_none_or(|t| has(header::DLQ_ORIGINAL_TOPIC, t))
            && self.reason_contains.as_ref().is_none_or(|text| {
                headers
                    .get_all(header::DLQ_REASON)
                    .any(|v| v.to_text().contains(text.as_str()))
            })
            && self.headers.iter().all(|(name, value)| has(name, value))
    }
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

/// Runs `command` on `route` of `brokers` (which must be connected for
/// it). `health` here reports the brokers of `brokers`; the binary's
/// `health` ([`health`]) connects each enabled broker on its own instead.
///
/// # Errors
///
/// The command's error, with its exit status.
pub async fn execute(
    command: &Command,
    brokers: &Brokers,
    route: Route,
    io: &mut Io<'_>,
) -> Result<(), CliError> {
    match command {
        Command::Publish(args) => publish(args, &brokers.endpoints_for(route)?, io).await,
        Command::Tail(args) => tail(args, &brokers.endpoints_for(route)?, io).await,
        Command::Dlq(DlqCommand::List(args)) => {
            dlq_list(args, &brokers.endpoints_for(route)?, io).await
        }
        Command::Dlq(DlqCommand::Replay(args)) => {
            dlq_replay(args, &brokers.endpoints_for(route)?, io).await
        }
        Command::Lag(args) => lag(args, brokers, route, io).await,
        Command::Health => {
            let mut report = Vec::new();
            for kind in enabled(brokers.config()) {
                report.push((kind, probe(brokers, kind).await));
            }
            health_report(route, report, io)
        }
        Command::Topic(TopicCommand::Create(args)) => topic_create(args, brokers, route, io).await,
    }
}

async fn publish(
    args: &PublishArgs,
    endpoints: &Endpoints,
    io: &mut Io<'_>,
) -> Result<(), CliError> {
    validate_topic(&args.topic)?;
    let payload = match args.payload.as_deref() {
        Some("-") | None => {
            let mut bytes = Vec::new();
            io.stdin.read_to_end(&mut bytes).map_err(|e| {
                CliError::new(Exit::Other, format!("reading the payload from stdin: {e}"))
            })?;
            bytes
        }
        Some(text) => text.as_bytes().to_vec(),
    };
    let mut message = Message::new(payload);
    if let Some(id) = &args.id {
        message = message.with_id(id.clone());
    }
    if let Some(key) = &args.key {
        message = message.with_key(key);
    }
    if let Some(content_type) = &args.content_type {
        message = message.with_content_type(content_type.clone());
    }
    for (name, value) in &args.headers {
        message = message.with_header(name.clone(), value.clone());
    }
    let id = message.id().to_owned();
    endpoints.publisher.publish(&args.topic, message).await?;
    io.line(serde_json::json!({
        "published": id,
        "topic": args.topic,
        "route": endpoints.route.to_string(),
    }))
}

/// A consumer group of its own for `tail --from-start`.
fn fresh_group() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("cli-tail-{}-{nanos}", std::process::id())
}

async fn tail(args: &TailArgs, endpoints: &Endpoints, io: &mut Io<'_>) -> Result<(), CliError> {
    let group = match args.from_start {
        false => args.group.clone(),
        true if endpoints.route.primary() == BrokerKind::RabbitMq => {
            return Err(CliError::new(
                Exit::NotAvailable,
                "--from-start is not available on RabbitMQ: a group's queue holds only what was \
                 published after it was first declared, and nothing else keeps history; tail an \
                 existing group with --group (or declare it beforehand with `topic create \
                 --group`)",
            ))
        }
        true => fresh_group(),
    };
    validate_topic(&args.topic)?;
    let mut stream = endpoints
        .subscriber
        .subscribe(Subscription::new(&args.topic, &group))
        .await?;
    let mut printed = 0;
    let result = async {
        while printed < args.count {
            let Ok(Some(delivery)) =
                tokio::time::timeout(idle(args.idle_secs), stream.next()).await
            else {
                break;
            };
            let delivery = delivery?;
            io.line(json_line(&delivery.received))?;
            delivery.ack().await?;
            printed += 1;
        }
        Ok::<_, CliError>(())
    }
    .await;
    let closed = stream.close().await;
    result?;
    Ok(closed?)
}

/// How many unacknowledged letters a `dlq` command may hold at once (it
/// holds every letter it leaves in place until it ends).
const MAX_HELD: usize = 10_000;

async fn dlq_list(
    args: &DlqListArgs,
    endpoints: &Endpoints,
    io: &mut Io<'_>,
) -> Result<(), CliError> {
    validate_topic(&args.topic)?;
    let dlq = dead_letter_topic(&args.topic);
    // Everything is held unacknowledged until the end, then handed back by
    // closing: listing removes nothing.
    let mut stream = endpoints
        .subscriber
        .subscribe(Subscription::new(&dlq, DLQ_GROUP).with_prefetch(MAX_HELD))
        .await?;
    let mut held: Vec<Delivery> = Vec::new();
    let mut listed = 0;
    let result = async {
        while listed < args.count && held.len() < MAX_HELD {
            let Ok(Some(delivery)) =
                tokio::time::timeout(idle(args.idle_secs), stream.next()).await
            else {
                break;
            };
            let delivery = delivery?;
            if args.filter.matches(delivery.message()) {
                io.line(json_line(&delivery.received))?;
                listed += 1;
            }
            held.push(delivery);
        }
        Ok::<_, CliError>(())
    }
    .await;
    let closed = stream.close().await;
    drop(held);
    result?;
    Ok(closed?)
}

fn progress_bar(on: bool, what: &str) -> indicatif::ProgressBar {
    if !on {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{spinner} {prefix} {msg} [{elapsed}]")
    {
        bar.set_style(style);
    }
    bar.set_prefix(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// Counts of a `dlq replay`.
#[derive(Debug, Default)]
struct Replay {
    seen: usize,
    replayed: usize,
    skipped: usize,
    left: usize,
}

async fn dlq_replay(
    args: &DlqReplayArgs,
    endpoints: &Endpoints,
    io: &mut Io<'_>,
) -> Result<(), CliError> {
    validate_topic(&args.topic)?;
    let dlq = dead_letter_topic(&args.topic);
    let mut stream = endpoints
        .subscriber
        .subscribe(Subscription::new(&dlq, DLQ_GROUP).with_prefetch(args.max.clamp(1, MAX_HELD)))
        .await?;
    let bar = progress_bar(
        io.progress,
        if args.dry_run { "dry run:" } else { "replay:" },
    );
    let mut counts = Replay::default();
    // Letters left in place stay unacknowledged until the end, so the
    // stream does not hand them out again.
    let mut held: Vec<Delivery> = Vec::new();
    let mut failure: Option<CliError> = None;
    let result = async {
        while counts.seen < args.max && held.len() < MAX_HELD {
            let Ok(Some(delivery)) = tokio::time::timeout(idle(args.idle_secs), stream.next()).await
            else {
                break;
            };
            let delivery = delivery?;
            counts.seen += 1;
            let target = delivery
                .message()
                .headers()
                .get_str(header::DLQ_ORIGINAL_TOPIC)
                .filter(|t| validate_topic(t).is_ok())
                .map(str::to_owned);
            match target {
                _ if !args.filter.matches(delivery.message()) => {
                    counts.skipped += 1;
                    held.push(delivery);
                }
                None => {
                    // Nowhere to send it back to: reported, left in place.
                    counts.left += 1;
                    held.push(delivery);
                }
                Some(_) if args.dry_run => {
                    io.line(json_line(&delivery.received))?;
                    counts.replayed += 1;
                    held.push(delivery);
                }
                Some(target) => {
                    let mut message = delivery.message().clone();
                    message
                        .headers_mut()
                        .retain(|name, _| !name.starts_with("x-dlq-"));
                    match endpoints.publisher.publish(&target, message).await {
                        Ok(()) => {
                            delivery.ack().await?;
                            counts.replayed += 1;
                        }
                        Err(e) => {
                            // The broker is in trouble: stop, keep the rest.
                            counts.left += 1;
                            held.push(delivery);
                            failure = Some(CliError::new(
                                super::exit_for(&e),
                                format!("replaying to `{target}` failed, the letter and the rest are left in place: {e}"),
                            ));
                            break;
                        }
                    }
                }
            }
            bar.set_message(format!(
                "{} {}, skipped {}, left {}",
                if args.dry_run { "would replay" } else { "replayed" },
                counts.replayed,
                counts.skipped,
                counts.left
            ));
            bar.tick();
        }
        Ok::<_, CliError>(())
    }
    .await;
    bar.finish_and_clear();
    let closed = stream.close().await;
    drop(held);
    result?;
    closed?;
    let verb = if args.dry_run {
        "would_replay"
    } else {
        "replayed"
    };
    io.line(serde_json::json!({
        verb: counts.replayed,
        "skipped": counts.skipped,
        "left": counts.left,
        "dry_run": args.dry_run,
    }))?;
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

async fn lag(
    args: &LagArgs,
    brokers: &Brokers,
    route: Route,
    io: &mut Io<'_>,
) -> Result<(), CliError> {
    validate_topic(&args.topic)?;
    if route.primary() == BrokerKind::Kafka {
        #[cfg(feature = "kafka")]
        {
            let kafka = brokers.kafka().ok_or_else(|| {
                CliError::new(
                    Exit::Config,
                    "the route is Kafka, but Kafka is not connected",
                )
            })?;
            let partitions = kafka.consumer_lag(&args.group, &args.topic).await?;
            let rows: Vec<_> = partitions
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "partition": p.partition,
                        "committed": p.committed,
                        "low_watermark": p.low_watermark,
                        "high_watermark": p.high_watermark,
                        "lag": p.lag(),
                    })
                })
                .collect();
            return io.line(serde_json::json!({
                "topic": args.topic,
                "group": args.group,
                "lag": crate::kafka::total_lag(&partitions),
                "partitions": rows,
            }));
        }
    }
    let _ = (brokers, io);
    let hint = match route.primary() {
        BrokerKind::RabbitMq => format!(
            "; on RabbitMQ a group's backlog is the message count of its queue `{}:{}` \
             (rabbitmqctl list_queues name messages, or the management UI)",
            args.topic, args.group
        ),
        _ => String::new(),
    };
    Err(CliError::new(
        Exit::NotAvailable,
        format!(
            "consumer lag is available on Kafka only; the route of module `{MODULE}` is {route}{hint}"
        ),
    ))
}

async fn topic_create(
    args: &TopicCreateArgs,
    brokers: &Brokers,
    route: Route,
    io: &mut Io<'_>,
) -> Result<(), CliError> {
    validate_topic(&args.topic)?;
    let _ = brokers; // unused when both backends are compiled out
    for kind in route.brokers() {
        let line = match kind {
            #[cfg(feature = "kafka")]
            BrokerKind::Kafka => {
                let kafka = brokers.kafka().ok_or_else(|| {
                    CliError::new(
                        Exit::Config,
                        "the route uses Kafka, but Kafka is not connected",
                    )
                })?;
                let spec = crate::kafka::TopicSpec::default()
                    .partitions(args.partitions)
                    .replication_factor(args.replication_factor);
                kafka.create_topic_with_dlq(&args.topic, &spec).await?;
                serde_json::json!({
                    "backend": "kafka",
                    "topics": [args.topic.clone(), dead_letter_topic(&args.topic)],
                    "partitions": args.partitions,
                })
            }
            #[cfg(feature = "rabbitmq")]
            BrokerKind::RabbitMq => {
                let rabbitmq = brokers.rabbitmq().ok_or_else(|| {
                    CliError::new(
                        Exit::Config,
                        "the route uses RabbitMQ, but RabbitMQ is not connected",
                    )
                })?;
                let mut groups: Vec<&str> = args.groups.iter().map(String::as_str).collect();
                if let Some(settings) = &brokers.config().rabbitmq {
                    for group in settings.required_groups().of(&args.topic) {
                        if !groups.contains(&group.as_str()) {
                            groups.push(group);
                        }
                    }
                }
                let queues = rabbitmq.declare_topic(&args.topic, &groups).await?;
                serde_json::json!({
                    "backend": "rabbitmq",
                    "exchange": rabbitmq.exchange(),
                    "queues": queues,
                })
            }
            BrokerKind::Memory => serde_json::json!({
                "backend": "memory",
                "topics": [],
                "note": "nothing to do: the in-memory broker creates topics when they are used",
            }),
            #[allow(unreachable_patterns)] // reachable when a backend is compiled out
            other => {
                return Err(CliError::new(
                    Exit::Config,
                    format!("this build of broker-cli has no {other} backend"),
                ))
            }
        };
        io.line(line)?;
    }
    Ok(())
}

/// The brokers a configuration enables (memory always, last).
fn enabled(config: &crate::config::BrokerConfig) -> Vec<BrokerKind> {
    let mut kinds = Vec::new();
    if config.kafka.is_some() {
        kinds.push(BrokerKind::Kafka);
    }
    if config.rabbitmq.is_some() {
        kinds.push(BrokerKind::RabbitMq);
    }
    kinds.push(BrokerKind::Memory);
    kinds
}

/// One broker's health: `Ok` or why not.
async fn probe(brokers: &Brokers, kind: BrokerKind) -> Result<(), String> {
    let probed = match kind {
        // The in-memory broker is in this process; the production guard
        // does not apply to a probe.
        BrokerKind::Memory => crate::Publisher::health(brokers.memory()).await,
        _ => match brokers.broker(kind) {
            Ok((publisher, _)) => publisher.health().await,
            Err(e) => return Err(e.to_string()),
        },
    };
    match probed {
        crate::Health::Healthy => Ok(()),
        crate::Health::Unhealthy(why) => Err(why),
    }
}

fn health_report(
    route: Route,
    report: Vec<(BrokerKind, Result<(), String>)>,
    io: &mut Io<'_>,
) -> Result<(), CliError> {
    let mut per_broker = serde_json::Map::new();
    let mut unhealthy = Vec::new();
    for (kind, health) in report {
        let entry = match health {
            Ok(()) => serde_json::json!({ "healthy": true }),
            Err(error) => {
                unhealthy.push(kind.to_string());
                serde_json::json!({ "healthy": false, "error": error })
            }
        };
        per_broker.insert(kind.to_string(), entry);
    }
    io.line(serde_json::json!({
        "healthy": unhealthy.is_empty(),
        "route": route.to_string(),
        "brokers": per_broker,
    }))?;
    match unhealthy.is_empty() {
        true => Ok(()),
        false => Err(CliError::new(
            Exit::Unavailable,
            format!("unhealthy: {}", unhealthy.join(", ")),
        )),
    }
}

/// `health`: connects every broker the variables enable, each on its own
/// (so one that is down does not hide the others), probes it, and prints
/// one JSON object: `{"healthy": bool, "route": "...", "brokers": {"kafka":
/// {"healthy": true}, "rabbitmq": {"healthy": false, "error": "..."},
/// "memory": {"healthy": true}}}`.
///
/// # Errors
///
/// [`Exit::Config`] for a configuration mistake (nothing printed);
/// [`Exit::Unavailable`] when a broker is unhealthy (after printing).
pub async fn health(
    vars: &[(String, String)],
    timeout: Duration,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let full = BrokersBuilder::from_vars(vars.iter().cloned())?;
    full.check()?;
    let (_, route, _) = route_builder(vars)?;
    let mut report = Vec::new();
    for kind in enabled(full.config()) {
        let mut only: Vec<(String, String)> = vars
            .iter()
            .filter(|(k, _)| {
                !k.starts_with("BROKER_ROUTE_") && k != crate::wiring::REQUIRE_REAL_VAR
            })
            .cloned()
            .collect();
        if kind != BrokerKind::Kafka {
            only.push(("KAFKA_ENABLED".into(), "false".into()));
        }
        if kind != BrokerKind::RabbitMq {
            only.push(("RABBITMQ_ENABLED".into(), "false".into()));
        }
        let health = match BrokersBuilder::from_vars(only) {
            Err(e) => Err(e.to_string()),
            Ok(builder) => match connect(builder, timeout).await {
                Err(e) => Err(e.message),
                Ok(brokers) => {
                    let probed = probe(&brokers, kind).await;
                    let _ = brokers.close().await;
                    probed
                }
            },
        };
        report.push((kind, health));
    }
    let mut stdin = std::io::empty();
    let mut io = Io {
        stdin: &mut stdin,
        out,
        progress: false,
    };
    health_report(route, report, &mut io)
}
