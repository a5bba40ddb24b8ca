//! Benchmark: the abstraction against the raw clients, side by side, on the
//! same brokers in one run, printed as a Markdown table.
//!
//! ```text
//! cargo run --release -p bench -- [--preset smoke|full] [--n N] [--memory-n N]
//!     [--sizes 100,1024] [--only kafka,rabbitmq,memory] [--lanes N] [--prefetch N]
//!     [--runs N] [--queue-type quorum|classic]
//!     [--out FILE]
//! ```
//!
//! Brokers: `KAFKA_BROKERS` (default 127.0.0.1:9092, tansu from
//! `scripts/ensure-tansu.sh start`) and `RABBITMQ_URL` (default the local
//! guest account). Each scenario runs in its own child process, so its peak
//! RSS is its own.
//!
//! Progress goes to stderr: a progress bar (runs done, elapsed time, the
//! scenario running) when stderr is a terminal, otherwise one line per
//! scenario, so CI logs get no bar redraws. The table goes to stdout.

mod abstraction;
mod kafka;
mod latency;
mod measure;
mod memory;
mod outbox;
mod peer;
mod rabbitmq;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::Command;

use indicatif::{ProgressBar, ProgressStyle};
use measure::Outcome;

/// What every scenario is run with.
#[derive(Debug, Clone)]
pub struct Params {
    /// Messages per scenario.
    pub n: usize,
    /// Payload bytes.
    pub size: usize,
    /// Publishes in flight at once (single-message publish).
    pub window: usize,
    /// Messages per batch (batch publish).
    pub chunk: usize,
    /// Deliveries in flight per consumer.
    pub prefetch: usize,
    /// Kafka bootstrap servers.
    pub kafka_brokers: String,
    /// RabbitMQ URL.
    pub rabbitmq_url: String,
    /// Distinct keys the messages are spread over.
    pub keys: usize,
    /// Type of the RabbitMQ queues every side consumes from (ours, raw,
    /// ruststream): `quorum` (the backend's default) or `classic`.
    pub queue_type: String,
}

impl Params {
    /// The payload of every message.
    pub fn payload(&self) -> bytes::Bytes {
        bytes::Bytes::from(vec![b'x'; self.size])
    }

    /// Key of message `i`: `keys` distinct keys (64 by default, as many
    /// users would give).
    pub fn key(&self, i: usize) -> String {
        format!("user-{}", i % self.keys)
    }

    /// The payload of message `i` where the handler checks per-key order:
    /// its number and its key's index up front, then the usual filler.
    pub fn numbered_payload(&self, i: usize) -> bytes::Bytes {
        let mut payload = vec![b'x'; self.size.max(12)];
        payload[..8].copy_from_slice(&(i as u64).to_be_bytes());
        payload[8..12].copy_from_slice(&((i % self.keys) as u32).to_be_bytes());
        bytes::Bytes::from(payload)
    }

    /// The number and key index of a [`Params::numbered_payload`].
    pub fn numbering(payload: &[u8]) -> Option<(u64, usize)> {
        let number = u64::from_be_bytes(payload.get(..8)?.try_into().ok()?);
        let key = u32::from_be_bytes(payload.get(8..12)?.try_into().ok()?);
        Some((number, key as usize))
    }

    /// Whether this is the RabbitMQ quorum-queue set-up.
    pub fn quorum(&self) -> bool {
        self.queue_type != "classic"
    }
}

/// Distinct keys of the scenarios whose handler awaits 1 ms.
pub const IO_KEYS: usize = 1_000;
/// Concurrency of the scenarios whose handler awaits 1 ms.
pub const IO_CONCURRENCY: usize = 64;
/// What a handler that awaits 1 ms could do at most with that concurrency.
pub const IO_CEILING: f64 = 64_000.0;

/// The scenarios, by name: `backend.what.side`, side `raw*` (the raw
/// client), `lib*` (ours) or `rs*` (ruststream).
const SCENARIOS: &[&str] = &[
    "kafka.publish.raw",
    "kafka.publish.raw-id",
    "kafka.publish.lib",
    "kafka.publish.rs",
    "kafka.batch.raw",
    "kafka.batch.lib",
    "kafka.outbox.lib",
    "kafka.consume.raw",
    "kafka.consume.raw-read",
    "kafka.consume.lib-1",
    "kafka.consume.lib-n",
    "kafka.consume.rs-1",
    "kafka.consume.rs-n",
    "kafka.consume.stream",
    "kafka.io.raw",
    "kafka.io.lib",
    "kafka.io.rs",
    "kafka.latency.raw",
    "kafka.latency.lib",
    "rabbitmq.publish.raw",
    "rabbitmq.publish.lib",
    "rabbitmq.publish.rs",
    "rabbitmq.batch.raw",
    "rabbitmq.batch.lib",
    "rabbitmq.outbox.lib",
    "rabbitmq.consume.raw",
    "rabbitmq.consume.raw-batched",
    "rabbitmq.consume.lib-1",
    "rabbitmq.consume.lib-n",
    "rabbitmq.consume.rs-1",
    "rabbitmq.consume.rs-n",
    "rabbitmq.io.raw",
    "rabbitmq.io.lib",
    "rabbitmq.io.rs",
    "rabbitmq.latency.raw",
    "rabbitmq.latency.lib",
    "memory.publish.lib",
    "memory.publish-consume.lib-n",
    "memory.latency.lib",
];

async fn run_scenario(name: &str, p: &Params, lanes: usize) -> Outcome {
    use abstraction::Work::{Count, Io};
    match name {
        "kafka.publish.raw" => kafka::publish_raw(p).await,
        "kafka.publish.raw-id" => kafka::publish_raw_with_id(p).await,
        "kafka.publish.lib" => kafka::publish_lib(p).await,
        "kafka.publish.rs" => peer::kafka::publish(p).await,
        "kafka.batch.raw" => kafka::batch_raw(p).await,
        "kafka.batch.lib" => kafka::batch_lib(p).await,
        "kafka.outbox.lib" => kafka::outbox_lib(p).await,
        "kafka.consume.raw" => kafka::consume_raw(p, kafka::RawWork::Nothing).await,
        "kafka.consume.raw-read" => kafka::consume_raw(p, kafka::RawWork::Read).await,
        "kafka.consume.lib-1" => kafka::consume_lib(p, 1, Count).await,
        "kafka.consume.lib-n" => kafka::consume_lib(p, lanes, Count).await,
        "kafka.consume.rs-1" => peer::kafka::consume(p, 1, Count).await,
        "kafka.consume.rs-n" => peer::kafka::consume(p, lanes, Count).await,
        "kafka.consume.stream" => kafka::consume_stream(p).await,
        "kafka.io.raw" => kafka::consume_raw(p, kafka::RawWork::Io).await,
        "kafka.io.lib" => kafka::consume_lib(p, IO_CONCURRENCY, Io).await,
        "kafka.io.rs" => peer::kafka::consume(p, IO_CONCURRENCY, Io).await,
        "kafka.latency.raw" => kafka::latency_raw(p).await,
        "kafka.latency.lib" => kafka::latency_lib(p).await,
        "rabbitmq.publish.raw" => rabbitmq::publish_raw(p).await,
        "rabbitmq.publish.lib" => rabbitmq::publish_lib(p).await,
        "rabbitmq.publish.rs" => peer::rabbitmq::publish(p).await,
        "rabbitmq.batch.raw" => rabbitmq::batch_raw(p).await,
        "rabbitmq.batch.lib" => rabbitmq::batch_lib(p).await,
        "rabbitmq.outbox.lib" => rabbitmq::outbox_lib(p).await,
        "rabbitmq.consume.raw" => rabbitmq::consume_raw(p, rabbitmq::RawAck::Each).await,
        "rabbitmq.consume.raw-batched" => rabbitmq::consume_raw(p, rabbitmq::RawAck::Batched).await,
        "rabbitmq.consume.lib-1" => rabbitmq::consume_lib(p, 1, Count).await,
        "rabbitmq.consume.lib-n" => rabbitmq::consume_lib(p, lanes, Count).await,
        "rabbitmq.consume.rs-1" => peer::rabbitmq::consume(p, 1, Count).await,
        "rabbitmq.consume.rs-n" => peer::rabbitmq::consume(p, lanes, Count).await,
        "rabbitmq.io.raw" => rabbitmq::consume_raw(p, rabbitmq::RawAck::Io).await,
        "rabbitmq.io.lib" => rabbitmq::consume_lib(p, IO_CONCURRENCY, Io).await,
        "rabbitmq.io.rs" => peer::rabbitmq::consume(p, IO_CONCURRENCY, Io).await,
        "rabbitmq.latency.raw" => rabbitmq::latency_raw(p).await,
        "rabbitmq.latency.lib" => rabbitmq::latency_lib(p).await,
        "memory.publish.lib" => memory::publish_alone(p).await,
        "memory.publish-consume.lib-n" => memory::end_to_end(p, lanes).await,
        "memory.latency.lib" => memory::latency(p).await,
        other => panic!("unknown scenario {other}"),
    }
}

/// Command line options.
#[derive(Debug, Clone)]
struct Options {
    n: usize,
    memory_n: usize,
    /// Runs of each scenario; the table shows the median one (two shared
    /// cores make single runs swing by 10-20%).
    runs: usize,
    sizes: Vec<usize>,
    only: Vec<String>,
    lanes: usize,
    prefetch: usize,
    queue_type: String,
    out: Option<String>,
    scenario: Option<String>,
}

fn parse_options() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let mut o = Options {
        n: 100_000,
        memory_n: 1_000_000,
        sizes: vec![100, 1024],
        only: vec!["kafka".into(), "rabbitmq".into(), "memory".into()],
        lanes: 4,
        prefetch: 200,
        queue_type: "quorum".into(),
        out: None,
        scenario: None,
        runs: 1,
    };
    let number = |v: Option<String>, name: &str| -> Result<usize, String> {
        v.and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("--{name} needs a number"))
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--preset" => match args.next().as_deref() {
                Some("smoke") => {
                    // Checks that every scenario runs: one size is enough.
                    o.n = 2_000;
                    o.memory_n = 100_000;
                    o.runs = 1;
                    o.sizes = vec![100];
                }
                Some("full") => {
                    o.n = 100_000;
                    o.memory_n = 1_000_000;
                    o.runs = 3;
                    o.sizes = vec![100, 1024];
                }
                other => return Err(format!("--preset smoke|full, not {other:?}")),
            },
            "--n" => o.n = number(args.next(), "n")?,
            "--memory-n" => o.memory_n = number(args.next(), "memory-n")?,
            "--lanes" => o.lanes = number(args.next(), "lanes")?,
            "--runs" => o.runs = number(args.next(), "runs")?.max(1),
            "--prefetch" => o.prefetch = number(args.next(), "prefetch")?,
            "--sizes" => {
                o.sizes = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|s| s.trim().parse().map_err(|_| format!("bad size `{s}`")))
                    .collect::<Result<_, _>>()?
            }
            "--only" => {
                o.only = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|s| s.trim().to_owned())
                    .collect()
            }
            "--queue-type" => match args.next().as_deref() {
                Some(t @ ("quorum" | "classic")) => o.queue_type = t.to_owned(),
                other => return Err(format!("--queue-type quorum|classic, not {other:?}")),
            },
            "--out" => o.out = args.next(),
            "--scenario" => o.scenario = args.next(),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

fn params(o: &Options, size: usize, scenario: &str) -> Params {
    Params {
        n: if scenario.contains(".latency.") {
            latency::latency_n(o.n)
        } else if scenario.starts_with("memory.") {
            o.memory_n
        } else {
            o.n
        },
        size,
        window: 1_000,
        chunk: 1_000,
        prefetch: o.prefetch,
        kafka_brokers: std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into()),
        rabbitmq_url: std::env::var("RABBITMQ_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
        keys: if scenario.contains(".io.") {
            IO_KEYS
        } else {
            64
        },
        queue_type: o.queue_type.clone(),
    }
}

/// Runs one scenario in a child process of this binary; its outcome.
fn in_child(o: &Options, name: &str, size: usize) -> Result<Outcome, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let output = Command::new(exe)
        .args(["--scenario", name, "--n", &o.n.to_string()])
        .args(["--memory-n", &o.memory_n.to_string()])
        .args([
            "--lanes",
            &o.lanes.to_string(),
            "--sizes",
            &size.to_string(),
        ])
        .args(["--prefetch", &o.prefetch.to_string()])
        .args(["--queue-type", &o.queue_type])
        .output()
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("OUTCOME "))
        .and_then(|json| serde_json::from_str(json).ok())
        .ok_or_else(|| {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
            format!(
                "{name} failed ({}): {}",
                output.status,
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            )
        })
}

/// The run with the median rate of `runs` runs (the first failure, if any).
fn median_of(
    runs: usize,
    mut run: impl FnMut() -> Result<Outcome, String>,
) -> Result<Outcome, String> {
    let mut outcomes = (0..runs).map(|_| run()).collect::<Result<Vec<_>, _>>()?;
    outcomes.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    Ok(outcomes.swap_remove(outcomes.len() / 2))
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let (_, librdkafka) = rdkafka::util::get_rdkafka_version();
    let tansu = first_line(".brokers/tansu/tansu", &["--version"]);
    let rabbitmq = first_line("rabbitmqctl", &["version"]);
    format!(
        "{} ({cores} cores); {}; librdkafka {librdkafka} (rdkafka 0.39), lapin 4.12; Kafka side: {tansu} (memory storage, loopback); RabbitMQ {rabbitmq} (loopback); {}",
        cpu,
        first_line("rustc", &["--version"]),
        first_line("date", &["-u", "+%Y-%m-%d"]),
    )
}

/// Where the run reports its progress: a bar on a terminal, lines otherwise.
enum Progress {
    Bar(ProgressBar),
    Lines,
}

impl Progress {
    /// A bar of `runs` child runs when stderr is a terminal.
    fn new(runs: usize) -> Self {
        if !std::io::stderr().is_terminal() {
            return Progress::Lines;
        }
        let bar = ProgressBar::new(runs as u64);
        let style = ProgressStyle::with_template(
            "{elapsed_precise} [{wide_bar}] {pos}/{len} runs, eta {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.enable_steady_tick(std::time::Duration::from_millis(500));
        Progress::Bar(bar)
    }

    /// A scenario starts.
    fn start(&self, name: &str, size: usize) {
        match self {
            Progress::Bar(bar) => bar.set_message(format!("{name} ({size} B)")),
            Progress::Lines => eprintln!("running {name} ({size} B)..."),
        }
    }

    /// One child run finished.
    fn run_done(&self) {
        if let Progress::Bar(bar) = self {
            bar.inc(1);
        }
    }

    /// A line that stays (above the bar on a terminal).
    fn note(&self, line: &str) {
        match self {
            Progress::Bar(bar) => bar.println(line),
            Progress::Lines => eprintln!("{line}"),
        }
    }

    /// Removes the bar before the table is printed.
    fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// What a row's figure must reach (issue 15); checked on the medians.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// Information only.
    None,
    /// Ours ≥ 95% of the raw reference loop and ≥ ruststream.
    Raw,
    /// As [`Target::Raw`], and N lanes ≥ ours with 1 lane (the scenario named).
    Lanes(&'static str),
    /// A handler awaiting 1 ms: ours ≥ 90% of min(64k msgs/s, the rate of
    /// the reference raw loop named), with per-key order kept.
    Io(&'static str),
    /// At least this many msgs/s.
    Rate(f64),
}

/// One row of the table: the raw client, ours and ruststream doing the
/// same work.
struct Row {
    backend: &'static str,
    what: &'static str,
    raw: Option<&'static str>,
    ours: &'static str,
    rs: Option<&'static str>,
    target: Target,
}

const fn row(
    backend: &'static str,
    what: &'static str,
    raw: Option<&'static str>,
    ours: &'static str,
    rs: Option<&'static str>,
    target: Target,
) -> Row {
    Row {
        backend,
        what,
        raw,
        ours,
        rs,
        target,
    }
}

/// The end-to-end latency rows: their p50 / p99 is from the publish call
/// to the handler's start, and their rate is the fixed one.
const LATENCY_ROW: &str =
    "end-to-end latency at 1,000 msgs/s, 1 lane (p50 / p99: publish call to handler start)";

const ROWS: &[Row] = &[
    row(
        "kafka",
        "publish (1000 in flight)",
        Some("kafka.publish.raw"),
        "kafka.publish.lib",
        Some("kafka.publish.rs"),
        Target::Raw,
    ),
    row(
        "kafka",
        "consume + commit, 1 lane",
        Some("kafka.consume.raw-read"),
        "kafka.consume.lib-1",
        Some("kafka.consume.rs-1"),
        Target::Raw,
    ),
    row(
        "kafka",
        "consume + commit, N lanes",
        Some("kafka.consume.raw-read"),
        "kafka.consume.lib-n",
        Some("kafka.consume.rs-n"),
        Target::Lanes("kafka.consume.lib-1"),
    ),
    row(
        "kafka",
        "handler awaits 1 ms, 1000 keys, concurrency 64 (raw: sequential loop)",
        Some("kafka.io.raw"),
        "kafka.io.lib",
        Some("kafka.io.rs"),
        Target::Io("kafka.consume.raw-read"),
    ),
    row(
        "kafka",
        LATENCY_ROW,
        Some("kafka.latency.raw"),
        "kafka.latency.lib",
        None,
        Target::None,
    ),
    row(
        "kafka",
        "info: publish, against raw records that carry ours' message-id header",
        Some("kafka.publish.raw-id"),
        "kafka.publish.lib",
        None,
        Target::None,
    ),
    row(
        "kafka",
        "info: batch publish (1000)",
        Some("kafka.batch.raw"),
        "kafka.batch.lib",
        None,
        Target::None,
    ),
    row(
        "kafka",
        "info: outbox (transactions of 100) + relay (raw: our batch publish)",
        Some("kafka.batch.lib"),
        "kafka.outbox.lib",
        None,
        Target::None,
    ),
    row(
        "kafka",
        "info: consume, 1 lane, against the bare raw loop (reads nothing)",
        Some("kafka.consume.raw"),
        "kafka.consume.lib-1",
        None,
        Target::None,
    ),
    row(
        "kafka",
        "info: consume, backend stream alone (no runtime)",
        Some("kafka.consume.raw-read"),
        "kafka.consume.stream",
        None,
        Target::None,
    ),
    row(
        "rabbitmq",
        "publish, confirms (1000 in flight)",
        Some("rabbitmq.publish.raw"),
        "rabbitmq.publish.lib",
        Some("rabbitmq.publish.rs"),
        Target::Raw,
    ),
    row(
        "rabbitmq",
        "consume + ack, 1 lane",
        Some("rabbitmq.consume.raw-batched"),
        "rabbitmq.consume.lib-1",
        Some("rabbitmq.consume.rs-1"),
        Target::Raw,
    ),
    row(
        "rabbitmq",
        "consume + ack, N lanes",
        Some("rabbitmq.consume.raw-batched"),
        "rabbitmq.consume.lib-n",
        Some("rabbitmq.consume.rs-n"),
        Target::Lanes("rabbitmq.consume.lib-1"),
    ),
    row(
        "rabbitmq",
        "handler awaits 1 ms, 1000 keys, concurrency 64 (raw: sequential loop)",
        Some("rabbitmq.io.raw"),
        "rabbitmq.io.lib",
        Some("rabbitmq.io.rs"),
        Target::Io("rabbitmq.consume.raw-batched"),
    ),
    row(
        "rabbitmq",
        LATENCY_ROW,
        Some("rabbitmq.latency.raw"),
        "rabbitmq.latency.lib",
        None,
        Target::None,
    ),
    row(
        "rabbitmq",
        "info: batch publish (1000)",
        Some("rabbitmq.batch.raw"),
        "rabbitmq.batch.lib",
        None,
        Target::None,
    ),
    row(
        "rabbitmq",
        "info: outbox (transactions of 100) + relay (raw: our batch publish)",
        Some("rabbitmq.batch.lib"),
        "rabbitmq.outbox.lib",
        None,
        Target::None,
    ),
    row(
        "rabbitmq",
        "info: consume, 1 lane, against a raw loop that awaits each ack",
        Some("rabbitmq.consume.raw"),
        "rabbitmq.consume.lib-1",
        None,
        Target::None,
    ),
    row(
        "memory",
        "publish + consume, N lanes",
        None,
        "memory.publish-consume.lib-n",
        None,
        Target::Rate(2_000_000.0),
    ),
    row(
        "memory",
        LATENCY_ROW,
        None,
        "memory.latency.lib",
        None,
        Target::None,
    ),
    row(
        "memory",
        "info: publish alone",
        None,
        "memory.publish.lib",
        None,
        Target::None,
    ),
];

fn rate(o: &Outcome) -> String {
    format!("{:.0}", o.rate())
}

fn latency(o: &Outcome) -> Option<String> {
    match (o.p50_us, o.p99_us) {
        (Some(a), Some(b)) => Some(format!("{a} / {b}")),
        _ => None,
    }
}

fn mib(o: &Outcome) -> String {
    format!("{:.0}", o.peak_rss_kib as f64 / 1024.0)
}

/// One side of a row as found in the results.
enum Side<'a> {
    Absent,
    Failed,
    Ran(&'a Outcome),
}

impl Side<'_> {
    fn outcome(&self) -> Option<&Outcome> {
        match self {
            Side::Ran(o) => Some(o),
            _ => None,
        }
    }

    /// A cell of the table from the outcome.
    fn cell(&self, f: impl Fn(&Outcome) -> String) -> String {
        match self {
            Side::Absent => "–".into(),
            Side::Failed => "failed".into(),
            Side::Ran(o) => f(o),
        }
    }
}

/// Results by (scenario, size).
type Results = BTreeMap<(String, usize), Result<Outcome, String>>;

fn side<'a>(results: &'a Results, name: Option<&str>, size: usize) -> Side<'a> {
    match name.and_then(|n| results.get(&(n.to_owned(), size))) {
        None => Side::Absent,
        Some(Err(_)) => Side::Failed,
        Some(Ok(o)) => Side::Ran(o),
    }
}

/// The target's text and whether it is met (`None`: nothing to check, or
/// a side it needs is missing).
fn verdict(row: &Row, results: &Results, size: usize) -> (String, Option<bool>) {
    let ours = side(results, Some(row.ours), size);
    let raw = side(results, row.raw, size);
    let rs = side(results, row.rs, size);
    let Some(ours) = ours.outcome() else {
        return ("–".into(), None);
    };
    let ahead_of_rs = || rs.outcome().map(|r| ours.rate() >= r.rate());
    let of_raw = |share: f64| raw.outcome().map(|r| ours.rate() >= share * r.rate());
    match row.target {
        Target::None => ("information".into(), None),
        Target::Raw => {
            let met = of_raw(0.95).zip(ahead_of_rs()).map(|(a, b)| a && b);
            ("≥ 95% of raw, ≥ ruststream".into(), met)
        }
        Target::Lanes(one) => {
            let one = side(results, Some(one), size);
            let not_slower = one.outcome().map(|o| ours.rate() >= o.rate());
            let met = of_raw(0.95)
                .zip(ahead_of_rs())
                .zip(not_slower)
                .map(|((a, b), c)| a && b && c);
            ("≥ 95% of raw, ≥ ruststream, ≥ 1 lane".into(), met)
        }
        Target::Io(reference) => match side(results, Some(reference), size).outcome() {
            Some(r) => {
                let floor = 0.9 * IO_CEILING.min(r.rate());
                let in_order = ours.out_of_order == Some(0);
                (
                    format!("≥ {floor:.0} (90% of min(64k, reference raw)), per-key order"),
                    Some(ours.rate() >= floor && in_order),
                )
            }
            None => (
                "90% of min(64k, reference raw): reference missing".into(),
                None,
            ),
        },
        Target::Rate(floor) => (format!("≥ {floor:.0}"), Some(ours.rate() >= floor)),
    }
}

/// The Markdown table (and what misses its target) for `results`.
fn table(o: &Options, results: &Results) -> String {
    let mut table = String::new();
    table.push_str(&format!(
        "Machine: {}\n\nN = {} messages per scenario ({} on memory; sequential 1 ms loops: {}; latency rows: {} at {} msgs/s), median of {} runs; N lanes = {}; prefetch {}; RabbitMQ {} queues; msgs/s; latency p50 / p99 in µs (publish call to broker confirmation; latency rows: publish call to handler start); peak RSS in MiB of the scenario's process. raw = the raw client's reference loop doing the same work, ours = this library, rs = ruststream 0.7.\n\n",
        machine(), o.n, o.memory_n, kafka::sequential_n(o.n), latency::latency_n(o.n), latency::RATE, o.runs, o.lanes, o.prefetch, o.queue_type
    ));
    table.push_str("| backend | scenario | size | raw | ours | rs | ours/raw | target | met | p50 / p99 raw · ours · rs | RSS raw · ours · rs |\n");
    table.push_str("|---|---|---|---|---|---|---|---|---|---|---|\n");
    let mut misses = Vec::new();
    let mut failures = Vec::new();
    for &size in &o.sizes {
        for row in ROWS {
            if !o.only.iter().any(|b| b == row.backend) {
                continue;
            }
            let ours = side(results, Some(row.ours), size);
            let raw = side(results, row.raw, size);
            let rs = side(results, row.rs, size);
            if matches!(ours, Side::Absent) {
                continue;
            }
            let ratio = match (raw.outcome(), ours.outcome()) {
                (Some(r), Some(l)) => format!("{:.0}%", 100.0 * l.rate() / r.rate()),
                _ => "–".into(),
            };
            let (target, met) = verdict(row, results, size);
            let met = match met {
                Some(true) => "yes".to_owned(),
                Some(false) => {
                    misses.push(format!("{} {} {size} B", row.backend, row.what));
                    "**no**".to_owned()
                }
                None => "–".to_owned(),
            };
            let disorder: Vec<String> = [("raw", &raw), ("ours", &ours), ("rs", &rs)]
                .iter()
                .filter_map(|(who, s)| {
                    let n = s.outcome().and_then(|o| o.out_of_order)?;
                    (n > 0).then(|| format!("{who} {n}"))
                })
                .collect();
            let met = if disorder.is_empty() {
                met
            } else {
                format!("{met} (out of key order: {})", disorder.join(", "))
            };
            let lat: Vec<String> = [&raw, &ours, &rs]
                .iter()
                .map(|s| s.outcome().and_then(latency).unwrap_or_else(|| "–".into()))
                .collect();
            let lat = if lat.iter().all(|l| l == "–") {
                "–".to_owned()
            } else {
                lat.join(" · ")
            };
            let rss: Vec<String> = [&raw, &ours, &rs].iter().map(|s| s.cell(mib)).collect();
            table.push_str(&format!(
                "| {} | {} | {size} B | {} | {} | {} | {ratio} | {target} | {met} | {lat} | {} |\n",
                row.backend,
                row.what,
                raw.cell(rate),
                ours.cell(rate),
                rs.cell(rate),
                rss.join(" · "),
            ));
        }
    }
    for ((name, size), r) in results {
        if let Err(e) = r {
            failures.push(format!("{name} ({size} B): {e}"));
        }
    }
    table.push_str(&format!(
        "\nBelow target: {}\n",
        if misses.is_empty() {
            "none".to_owned()
        } else {
            misses.join("; ")
        }
    ));
    if !failures.is_empty() {
        table.push_str(&format!("\nFailed: {}\n", failures.join("; ")));
    }
    table
}

#[tokio::main]
async fn main() {
    let o = match parse_options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if let Some(name) = &o.scenario {
        let p = params(&o, o.sizes[0], name);
        let outcome = run_scenario(name, &p, o.lanes).await;
        println!("OUTCOME {}", serde_json::to_string(&outcome).expect("json"));
        return;
    }

    let started = std::time::Instant::now();
    let selected: Vec<&str> = SCENARIOS
        .iter()
        .copied()
        .filter(|name| {
            let backend = name.split('.').next().unwrap_or_default();
            o.only.iter().any(|b| b == backend)
        })
        .collect();
    let progress = Progress::new(o.sizes.len() * selected.len() * o.runs);
    let mut results: Results = BTreeMap::new();
    for &size in &o.sizes {
        for &name in &selected {
            progress.start(name, size);
            let r = median_of(o.runs, || {
                let outcome = in_child(&o, name, size);
                progress.run_done();
                outcome
            });
            if let Err(e) = &r {
                progress.note(&format!("  {e}"));
            }
            results.insert((name.to_string(), size), r);
        }
    }
    progress.finish();

    let table = table(&o, &results);
    println!("{table}");
    eprintln!("benchmark took {:.0} s", started.elapsed().as_secs_f64());
    if let Some(path) = &o.out {
        std::fs::write(path, &table).expect("write --out file");
    }
    if results.values().any(Result::is_err) {
        std::process::exit(1);
    }
}
