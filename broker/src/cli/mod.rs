//! The operator's command line tool (feature `cli`): the binary
//! `broker-cli` and the functions behind it.
//!
//! ```text
//! cargo install --path broker --features cli
//! broker-cli publish orders.created '{"id":1}' --key 1 --header source=ops
//! broker-cli tail orders.created --from-start --count 10
//! broker-cli dlq list orders.created --kind decode
//! broker-cli dlq replay orders.created --kind handler --dry-run
//! broker-cli lag orders.created --group billing
//! broker-cli health
//! broker-cli topic create orders.created --group billing
//! ```
//!
//! The broker comes from the same variables as the app's
//! ([`crate::Brokers::from_env`]: `KAFKA_*`, `RABBITMQ_*`, `BROKER_*`), on
//! the route of module `cli` (`BROKER_ROUTE_CLI`, else the default route);
//! `--route`, `--kafka-brokers` and `--rabbitmq-url` override them. Only
//! the broker(s) of that route are connected (`health` connects every
//! enabled one, each on its own).
//!
//! Data goes to stdout, one JSON object per line; errors and warnings go to
//! stderr; the exit status says what happened ([`Exit`]).

mod ops;

use std::ffi::OsString;
use std::io::{Read, Write};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{BrokerKind, ConfigError, Route};
use crate::{BrokerError, Brokers, BrokersBuilder};

pub use ops::{execute, health, json_line, DlqFilter, Io};

/// Module name whose route the tool uses (`BROKER_ROUTE_CLI`).
pub const MODULE: &str = "cli";

/// The consumer group the `dlq` commands read as: listing never
/// acknowledges and replaying does, so a listing shows the letters not
/// replayed yet. On RabbitMQ this group's queue is the dead-letter archive
/// (`broker::rabbitmq::DEAD_LETTER_GROUP`), which keeps every letter from
/// the topic's first subscription on; on Kafka and in memory a new group
/// reads the dead-letter topic from its start.
#[cfg(feature = "rabbitmq")]
pub const DLQ_GROUP: &str = crate::rabbitmq::DEAD_LETTER_GROUP;
/// The consumer group the `dlq` commands read as (see the RabbitMQ build).
#[cfg(not(feature = "rabbitmq"))]
pub const DLQ_GROUP: &str = "cli-dlq";

/// The exit status, for scripts. `--help` and `--version` exit 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: done.
    Ok = 0,
    /// 1: any other error (a client library's error, output that could not be written).
    Other = 1,
    /// 2: usage: unknown command or option, bad value, invalid topic name.
    Usage = 2,
    /// 3: configuration: a broker variable or flag is wrong, or names a
    /// backend this build leaves out.
    Config = 3,
    /// 4: a broker could not be reached or did not answer in time (also:
    /// `health` found a broker unhealthy).
    Unavailable = 4,
    /// 5: the broker refused or rejected the operation (access denied,
    /// message too large, conflicting declaration).
    Refused = 5,
    /// 6: the command is not available on the route's backend (`lag`
    /// outside Kafka, `tail --from-start` on RabbitMQ).
    NotAvailable = 6,
}

impl Exit {
    /// The process exit code.
    pub fn code(self) -> u8 {
        self as u8
    }
}

impl From<Exit> for std::process::ExitCode {
    fn from(exit: Exit) -> Self {
        std::process::ExitCode::from(exit.code())
    }
}

/// The exit codes as `--help` shows them.
pub const EXIT_CODES_HELP: &str = "\
Exit status:
  0  ok
  1  other error
  2  usage error (bad command, option or value; invalid topic name)
  3  configuration error (KAFKA_*, RABBITMQ_*, BROKER_* or a flag)
  4  broker unavailable or timed out; `health`: a broker is unhealthy
  5  refused or rejected by the broker
  6  not available on this backend (`lag` outside Kafka, `tail --from-start` on RabbitMQ)

The broker is taken from the app's variables (KAFKA_ENABLED, KAFKA_BROKERS,
RABBITMQ_URL, BROKER_ROUTE_CLI, ...); flags override them. Data goes to
stdout as one JSON object per line, errors to stderr.";

/// A failed command: what to print on stderr and how to exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    /// The exit status.
    pub exit: Exit,
    /// The message (never a payload or a credential).
    pub message: String,
}

impl CliError {
    /// An error with exit status `exit`.
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        CliError {
            exit,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

impl From<BrokerError> for CliError {
    fn from(e: BrokerError) -> Self {
        CliError::new(exit_for(&e), e.to_string())
    }
}

impl From<crate::topic::TopicError> for CliError {
    fn from(e: crate::topic::TopicError) -> Self {
        CliError::new(Exit::Usage, e.to_string())
    }
}

impl From<ConfigError> for CliError {
    fn from(e: ConfigError) -> Self {
        CliError::new(Exit::Config, e.to_string())
    }
}

/// The exit status for a broker error.
pub fn exit_for(e: &BrokerError) -> Exit {
    match e {
        BrokerError::InvalidTopic(_) => Exit::Usage,
        BrokerError::Config(_) | BrokerError::Misconfigured(_) => Exit::Config,
        BrokerError::Unavailable { .. } | BrokerError::Timeout { .. } | BrokerError::Closed(_) => {
            Exit::Unavailable
        }
        BrokerError::Refused { .. }
        | BrokerError::Rejected { .. }
        | BrokerError::MessageTooLarge { .. }
        | BrokerError::Validation(_) => Exit::Refused,
        BrokerError::Batch { failed, .. } => {
            failed.first().map_or(Exit::Other, |f| exit_for(&f.error))
        }
        _ => Exit::Other,
    }
}

/// `broker-cli`: publish, tail, dead letters, lag, health and topics on the
/// broker the app's configuration names.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "broker-cli",
    version,
    about = "Publish, tail, inspect dead letters, lag and health on the app's broker (Kafka, RabbitMQ or memory)",
    after_help = EXIT_CODES_HELP,
    propagate_version = true
)]
pub struct Cli {
    /// Which broker to use.
    #[command(flatten)]
    pub connection: ConnectionArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses a command line, the program name first (as
    /// [`Parser::try_parse_from`], without needing clap in scope).
    ///
    /// # Errors
    ///
    /// [`Exit::Usage`] with clap's message (also for `--help`, whose text
    /// is the message).
    pub fn parse_args<I, T>(args: I) -> Result<Cli, CliError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        Cli::try_parse_from(args).map_err(|e| CliError::new(Exit::Usage, e.render().to_string()))
    }
}

/// Which broker to use: the app's variables, overridden by these flags.
#[derive(Debug, Clone, Default, Args)]
#[command(
    next_help_heading = "Broker (default: the app's KAFKA_*, RABBITMQ_*, BROKER_* variables)"
)]
pub struct ConnectionArgs {
    /// Route to use instead of BROKER_ROUTE_CLI (kafka, rabbitmq, memory,
    /// or a dual route such as rabbitmq+kafka)
    #[arg(long, global = true, value_name = "ROUTE")]
    pub route: Option<Route>,
    /// Enable Kafka at these bootstrap servers (as KAFKA_ENABLED=true KAFKA_BROKERS=...)
    #[arg(long, global = true, value_name = "HOST:PORT,...")]
    pub kafka_brokers: Option<String>,
    /// Enable RabbitMQ at this URL (as RABBITMQ_URL; prefer the variable:
    /// arguments are visible to other users of the machine)
    #[arg(long, global = true, value_name = "URL")]
    pub rabbitmq_url: Option<String>,
    /// Give up connecting after this many seconds (exit status 4)
    #[arg(long, global = true, value_name = "SECS", default_value_t = 30)]
    pub connect_timeout: u64,
}

/// The commands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Publish one message (payload from the argument, or stdin)
    Publish(PublishArgs),
    /// Print a topic's messages, one JSON object per line
    Tail(TailArgs),
    /// List or replay dead letters
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Consumer lag of a group on a topic (Kafka only; exit 6 elsewhere)
    Lag(LagArgs),
    /// Health of every enabled broker, as one JSON object (exit 4 if any is unhealthy)
    Health,
    /// Create topics and queues
    #[command(subcommand)]
    Topic(TopicCommand),
}

/// `publish`.
#[derive(Debug, Clone, Args)]
pub struct PublishArgs {
    /// Topic to publish to
    pub topic: String,
    /// Payload (UTF-8 text); `-` or absent: read stdin to its end
    pub payload: Option<String>,
    /// Partition key (Kafka: decides the partition; order is kept per key)
    #[arg(long)]
    pub key: Option<String>,
    /// Header, repeatable
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// Content type of the payload (e.g. application/json)
    #[arg(long)]
    pub content_type: Option<String>,
    /// Message id (default: a new one)
    #[arg(long)]
    pub id: Option<String>,
}

/// `tail`.
#[derive(Debug, Clone, Args)]
pub struct TailArgs {
    /// Topic to read
    pub topic: String,
    /// Consumer group to read as; messages are acknowledged, so the group
    /// moves on (RabbitMQ: the group's queue keeps only messages published
    /// after it was first declared)
    #[arg(long, default_value = "cli-tail", conflicts_with = "from_start")]
    pub group: String,
    /// Read from the start as a new group of its own, acknowledging nothing
    /// (Kafka and memory; RabbitMQ keeps no history: exit 6)
    #[arg(long)]
    pub from_start: bool,
    /// Stop after this many messages
    #[arg(long, default_value_t = usize::MAX, hide_default_value = true)]
    pub count: usize,
    /// Stop after this many seconds without a message
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    pub idle_secs: u64,
}

/// `dlq list` and `dlq replay`.
#[derive(Debug, Clone, Subcommand)]
pub enum DlqCommand {
    /// Print the dead letters of a topic not replayed yet (removes nothing)
    List(DlqListArgs),
    /// Publish dead letters back to their original topic (x-dlq-* headers removed)
    Replay(DlqReplayArgs),
}

/// `dlq list`.
#[derive(Debug, Clone, Args)]
pub struct DlqListArgs {
    /// The original topic (its dead-letter topic `<topic>.dlq` is read)
    pub topic: String,
    /// Which letters
    #[command(flatten)]
    pub filter: DlqFilter,
    /// Print at most this many
    #[arg(long, default_value_t = 100)]
    pub count: usize,
    /// Stop after this many seconds without a letter
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    pub idle_secs: u64,
}

/// `dlq replay`.
#[derive(Debug, Clone, Args)]
pub struct DlqReplayArgs {
    /// The original topic (its dead-letter topic `<topic>.dlq` is read)
    pub topic: String,
    /// Which letters
    #[command(flatten)]
    pub filter: DlqFilter,
    /// Look at most at this many letters
    #[arg(long, default_value_t = 10_000)]
    pub max: usize,
    /// Stop after this many seconds without a letter
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    pub idle_secs: u64,
    /// Print the letters that would be replayed; publish and remove nothing
    #[arg(long)]
    pub dry_run: bool,
}

/// `lag`.
#[derive(Debug, Clone, Args)]
pub struct LagArgs {
    /// Topic
    pub topic: String,
    /// Consumer group
    #[arg(long)]
    pub group: String,
}

/// `topic create`.
#[derive(Debug, Clone, Subcommand)]
pub enum TopicCommand {
    /// Create a topic and its dead-letter topic on the route's broker(s):
    /// Kafka creates both topics; RabbitMQ declares the exchange and the
    /// queues of the given groups (and of RABBITMQ_REQUIRED_GROUPS); memory
    /// has nothing to do
    Create(TopicCreateArgs),
}

/// `topic create`.
#[derive(Debug, Clone, Args)]
pub struct TopicCreateArgs {
    /// Topic to create
    pub topic: String,
    /// Consumer group whose queue to declare (RabbitMQ), repeatable
    #[arg(long = "group", value_name = "GROUP")]
    pub groups: Vec<String>,
    /// Partitions (Kafka)
    #[arg(long, default_value_t = 3)]
    pub partitions: i32,
    /// Replication factor (Kafka; -1: the cluster's default)
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub replication_factor: i32,
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("a header is NAME=VALUE, not `{s}`")),
    }
}

fn idle(secs: u64) -> Duration {
    Duration::from_secs(secs)
}

/// The library's variables from the process environment (`KAFKA_*`,
/// `RABBITMQ_*`, `BROKER_*`; others ignored).
///
/// # Errors
///
/// [`ConfigError::Invalid`] for one of them that is not UTF-8.
pub fn env_vars() -> Result<Vec<(String, String)>, ConfigError> {
    let mut vars = Vec::new();
    for (key, value) in std::env::vars_os() {
        let Some(key) = key.to_str().filter(|k| is_ours(k)) else {
            continue;
        };
        let value = value.into_string().map_err(|_| ConfigError::Invalid {
            var: key.to_owned(),
            reason: "not valid UTF-8".to_owned(),
        })?;
        vars.push((key.to_owned(), value));
    }
    Ok(vars)
}

fn is_ours(var: &str) -> bool {
    ["KAFKA_", "RABBITMQ_", "BROKER_"]
        .iter()
        .any(|prefix| var.starts_with(prefix))
}

/// `vars` with the flags applied on top (later pairs win).
pub fn with_flags(
    mut vars: Vec<(String, String)>,
    flags: &ConnectionArgs,
) -> Vec<(String, String)> {
    let mut set = |k: &str, v: &str| vars.push((k.to_owned(), v.to_owned()));
    if let Some(brokers) = &flags.kafka_brokers {
        set("KAFKA_ENABLED", "true");
        set("KAFKA_BROKERS", brokers);
    }
    if let Some(url) = &flags.rabbitmq_url {
        set("RABBITMQ_ENABLED", "true");
        set("RABBITMQ_URL", url);
    }
    if let Some(route) = flags.route {
        set("BROKER_ROUTE_CLI", &route.to_string());
    }
    vars
}

/// The settings to connect with for the route of module `cli`, keeping
/// only the broker(s) of that route enabled (so a broker the command does
/// not use cannot make it fail), and the warnings about the variables as
/// given (names only).
///
/// # Errors
///
/// [`Exit::Config`] for a configuration mistake, naming the variable.
pub fn route_builder(
    vars: &[(String, String)],
) -> Result<(BrokersBuilder, Route, Vec<String>), CliError> {
    let full = BrokersBuilder::from_vars(vars.iter().cloned())?;
    let route = full.config().route(MODULE);
    let used = route.brokers();
    let mut narrowed: Vec<(String, String)> = vars
        .iter()
        .filter(|(k, _)| !k.starts_with("BROKER_ROUTE_") || k == "BROKER_ROUTE_CLI")
        .cloned()
        .collect();
    if !used.contains(&BrokerKind::Kafka) {
        narrowed.push(("KAFKA_ENABLED".into(), "false".into()));
    }
    if !used.contains(&BrokerKind::RabbitMq) {
        narrowed.push(("RABBITMQ_ENABLED".into(), "false".into()));
    }
    let builder = BrokersBuilder::from_vars(narrowed)?;
    // Narrowing must not change the route (a route naming memory when the
    // default was a real broker, say): pin it.
    if builder.config().route(MODULE) != route {
        return Err(CliError::new(
            Exit::Config,
            format!("the route of module `cli` ({route}) could not be kept; set BROKER_ROUTE_CLI"),
        ));
    }
    Ok((builder, route, full.warnings().to_vec()))
}

/// Connects `builder` within `timeout`.
///
/// # Errors
///
/// [`Exit::Unavailable`] when it takes longer; otherwise as
/// [`BrokersBuilder::connect`].
pub async fn connect(builder: BrokersBuilder, timeout: Duration) -> Result<Brokers, CliError> {
    match tokio::time::timeout(timeout, builder.connect()).await {
        Ok(connected) => Ok(connected?),
        Err(_) => Err(CliError::new(
            Exit::Unavailable,
            format!(
                "could not connect within {}s (--connect-timeout)",
                timeout.as_secs()
            ),
        )),
    }
}

/// Parses `args` (the program name first) and runs the command with the
/// given variables (usually [`env_vars`]), reading stdin for a payload
/// when asked, writing data to `out` and errors to `err`. Returns the exit
/// status.
pub async fn main_with<I, T>(
    args: I,
    vars: Vec<(String, String)>,
    stdin: &mut dyn Read,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Exit
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let exit = match e.use_stderr() {
                true => Exit::Usage,
                false => Exit::Ok, // --help, --version
            };
            let text = e.render().to_string();
            let _ = match exit {
                Exit::Ok => write!(out, "{text}"),
                _ => write!(err, "{text}"),
            };
            return exit;
        }
    };
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    match run(cli, vars, stdin, out, err, progress).await {
        Ok(()) => Exit::Ok,
        Err(e) => {
            let _ = writeln!(err, "broker-cli: error: {e}");
            e.exit
        }
    }
}

/// Runs a parsed command line: connects the route's broker(s) (every
/// enabled one for `health`), runs the command, closes.
///
/// # Errors
///
/// The command's error, with its exit status.
pub async fn run(
    cli: Cli,
    vars: Vec<(String, String)>,
    stdin: &mut dyn Read,
    out: &mut dyn Write,
    err: &mut dyn Write,
    progress: bool,
) -> Result<(), CliError> {
    let vars = with_flags(vars, &cli.connection);
    let timeout = Duration::from_secs(cli.connection.connect_timeout);
    if let Command::Health = cli.command {
        return health(&vars, timeout, out).await;
    }
    let (builder, route, warnings) = route_builder(&vars)?;
    for warning in warnings {
        let _ = writeln!(err, "broker-cli: warning: {warning}");
    }
    let brokers = connect(builder, timeout).await?;
    let mut io = Io {
        stdin,
        out,
        progress,
    };
    let done = execute(&cli.command, &brokers, route, &mut io).await;
    let closed = brokers.close().await;
    done?;
    Ok(closed?)
}
