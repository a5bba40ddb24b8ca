//! Benchmark: the abstraction against the raw clients, side by side, on the
//! same brokers in one run, printed as a Markdown table.
//!
//! ```text
//! cargo run --release -p bench -- [--preset smoke|full] [--n N] [--memory-n N]
//!     [--sizes 100,1024] [--only kafka,rabbitmq,memory] [--lanes N] [--prefetch N]
//!     [--runs N]
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
mod measure;
mod memory;
mod outbox;
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
}

impl Params {
    /// The payload of every message.
    pub fn payload(&self) -> bytes::Bytes {
        bytes::Bytes::from(vec![b'x'; self.size])
    }

    /// Key of message `i`: 64 distinct keys, as many users would give.
    pub fn key(&self, i: usize) -> String {
        format!("user-{}", i % 64)
    }
}

/// The scenarios, by name.
const SCENARIOS: &[&str] = &[
    "kafka.publish.raw",
    "kafka.publish.lib",
    "kafka.batch.raw",
    "kafka.batch.lib",
    "kafka.outbox.lib",
    "kafka.consume.raw",
    "kafka.consume.raw-read",
    "kafka.consume.lib-1",
    "kafka.consume.lib-n",
    "kafka.consume.stream",
    "rabbitmq.publish.raw",
    "rabbitmq.publish.lib",
    "rabbitmq.batch.raw",
    "rabbitmq.batch.lib",
    "rabbitmq.outbox.lib",
    "rabbitmq.consume.raw",
    "rabbitmq.consume.lib-1",
    "rabbitmq.consume.lib-n",
    "memory.publish.lib",
    "memory.publish-consume.lib-n",
];

async fn run_scenario(name: &str, p: &Params, lanes: usize) -> Outcome {
    match name {
        "kafka.publish.raw" => kafka::publish_raw(p).await,
        "kafka.publish.lib" => kafka::publish_lib(p).await,
        "kafka.batch.raw" => kafka::batch_raw(p).await,
        "kafka.batch.lib" => kafka::batch_lib(p).await,
        "kafka.outbox.lib" => kafka::outbox_lib(p).await,
        "kafka.consume.raw" => kafka::consume_raw(p, kafka::RawWork::Nothing).await,
        "kafka.consume.raw-read" => kafka::consume_raw(p, kafka::RawWork::Read).await,
        "kafka.consume.lib-1" => kafka::consume_lib(p, 1).await,
        "kafka.consume.lib-n" => kafka::consume_lib(p, lanes).await,
        "kafka.consume.stream" => kafka::consume_stream(p).await,
        "rabbitmq.publish.raw" => rabbitmq::publish_raw(p).await,
        "rabbitmq.publish.lib" => rabbitmq::publish_lib(p).await,
        "rabbitmq.batch.raw" => rabbitmq::batch_raw(p).await,
        "rabbitmq.batch.lib" => rabbitmq::batch_lib(p).await,
        "rabbitmq.outbox.lib" => rabbitmq::outbox_lib(p).await,
        "rabbitmq.consume.raw" => rabbitmq::consume_raw(p).await,
        "rabbitmq.consume.lib-1" => rabbitmq::consume_lib(p, 1).await,
        "rabbitmq.consume.lib-n" => rabbitmq::consume_lib(p, lanes).await,
        "memory.publish.lib" => memory::publish_alone(p).await,
        "memory.publish-consume.lib-n" => memory::end_to_end(p, lanes).await,
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
                    o.n = 2_000;
                    o.memory_n = 100_000;
                    o.runs = 1;
                }
                Some("full") => {
                    o.n = 100_000;
                    o.memory_n = 1_000_000;
                    o.runs = 3;
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
            "--out" => o.out = args.next(),
            "--scenario" => o.scenario = args.next(),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

fn params(o: &Options, size: usize, scenario: &str) -> Params {
    Params {
        n: if scenario.starts_with("memory.") {
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

/// One row of the table: a raw scenario and the abstraction's counterpart.
struct Pair {
    backend: &'static str,
    what: &'static str,
    raw: Option<&'static str>,
    lib: &'static str,
}

const PAIRS: &[Pair] = &[
    Pair {
        backend: "kafka",
        what: "publish (1000 in flight)",
        raw: Some("kafka.publish.raw"),
        lib: "kafka.publish.lib",
    },
    Pair {
        backend: "kafka",
        what: "batch publish (1000)",
        raw: Some("kafka.batch.raw"),
        lib: "kafka.batch.lib",
    },
    Pair {
        backend: "kafka",
        what: "outbox (transactions of 100) + relay, against direct batch publish",
        raw: Some("kafka.batch.lib"),
        lib: "kafka.outbox.lib",
    },
    Pair {
        backend: "kafka",
        what: "consume + commit, 1 lane",
        raw: Some("kafka.consume.raw"),
        lib: "kafka.consume.lib-1",
    },
    Pair {
        backend: "kafka",
        what: "consume + commit, N lanes",
        raw: Some("kafka.consume.raw"),
        lib: "kafka.consume.lib-n",
    },
    Pair {
        backend: "kafka",
        what: "consume + commit, backend stream alone (no runtime)",
        raw: Some("kafka.consume.raw"),
        lib: "kafka.consume.stream",
    },
    Pair {
        backend: "kafka",
        what: "consume + commit, 1 lane, against a raw loop that reads key, payload and headers",
        raw: Some("kafka.consume.raw-read"),
        lib: "kafka.consume.lib-1",
    },
    Pair {
        backend: "rabbitmq",
        what: "publish, confirms (1000 in flight)",
        raw: Some("rabbitmq.publish.raw"),
        lib: "rabbitmq.publish.lib",
    },
    Pair {
        backend: "rabbitmq",
        what: "batch publish (1000)",
        raw: Some("rabbitmq.batch.raw"),
        lib: "rabbitmq.batch.lib",
    },
    Pair {
        backend: "rabbitmq",
        what: "outbox (transactions of 100) + relay, against direct batch publish",
        raw: Some("rabbitmq.batch.lib"),
        lib: "rabbitmq.outbox.lib",
    },
    Pair {
        backend: "rabbitmq",
        what: "consume + ack, 1 lane",
        raw: Some("rabbitmq.consume.raw"),
        lib: "rabbitmq.consume.lib-1",
    },
    Pair {
        backend: "rabbitmq",
        what: "consume + ack, N lanes",
        raw: Some("rabbitmq.consume.raw"),
        lib: "rabbitmq.consume.lib-n",
    },
    Pair {
        backend: "memory",
        what: "publish",
        raw: None,
        lib: "memory.publish.lib",
    },
    Pair {
        backend: "memory",
        what: "publish + consume, N lanes",
        raw: None,
        lib: "memory.publish-consume.lib-n",
    },
];

fn rate(o: &Outcome) -> String {
    format!("{:.0}", o.rate())
}

fn latency(o: &Outcome) -> String {
    match (o.p50_us, o.p99_us) {
        (Some(a), Some(b)) => format!("{a} / {b}"),
        _ => "–".into(),
    }
}

fn mib(o: &Outcome) -> String {
    format!("{:.0}", o.peak_rss_kib as f64 / 1024.0)
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
    let mut results: BTreeMap<(String, usize), Result<Outcome, String>> = BTreeMap::new();
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

    let mut table = String::new();
    table.push_str(&format!(
        "Machine: {}\n\nN = {} messages per scenario ({} on memory), median of {} runs; N lanes = {}; prefetch {}; msgs/s; latency p50 / p99 in µs (publish call to broker confirmation); peak RSS in MiB of the scenario's process.\n\n",
        machine(), o.n, o.memory_n, o.runs, o.lanes, o.prefetch
    ));
    table.push_str("| backend | scenario | size | raw msgs/s | lib msgs/s | lib/raw | raw p50 / p99 | lib p50 / p99 | raw RSS | lib RSS |\n");
    table.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    let mut misses = Vec::new();
    for &size in &o.sizes {
        for pair in PAIRS {
            if !o.only.iter().any(|b| b == pair.backend) {
                continue;
            }
            let get = |name: &str| results.get(&(name.to_owned(), size));
            let lib = match get(pair.lib) {
                Some(Ok(l)) => l,
                Some(Err(e)) => {
                    table.push_str(&format!(
                        "| {} | {} | {size} B | failed: {e} |||||||\n",
                        pair.backend, pair.what
                    ));
                    continue;
                }
                None => continue,
            };
            let (raw_rate, ratio, raw_lat, raw_rss) = match pair.raw.and_then(get) {
                Some(Ok(r)) => {
                    let ratio = lib.rate() / r.rate();
                    if ratio < 0.95 {
                        misses.push(format!(
                            "{} {} {size} B: {:.0}%",
                            pair.backend,
                            pair.what,
                            ratio * 100.0
                        ));
                    }
                    (
                        rate(r),
                        format!("{:.0}%", ratio * 100.0),
                        latency(r),
                        mib(r),
                    )
                }
                Some(Err(e)) => (format!("failed: {e}"), "–".into(), "–".into(), "–".into()),
                None => {
                    if lib.rate() < 1_000_000.0 {
                        misses.push(format!(
                            "{} {} {size} B: below 1M msgs/s",
                            pair.backend, pair.what
                        ));
                    }
                    ("–".into(), "–".into(), "–".into(), "–".into())
                }
            };
            table.push_str(&format!(
                "| {} | {} | {size} B | {raw_rate} | {} | {ratio} | {raw_lat} | {} | {raw_rss} | {} |\n",
                pair.backend, pair.what, rate(lib), latency(lib), mib(lib)
            ));
        }
    }
    table.push_str(&format!(
        "\nBelow target (abstraction ≥ 95% of raw; memory backend ≥ 1M msgs/s): {}\n",
        if misses.is_empty() {
            "none".to_owned()
        } else {
            misses.join("; ")
        }
    ));
    println!("{table}");
    eprintln!("benchmark took {:.0} s", started.elapsed().as_secs_f64());
    if let Some(path) = &o.out {
        std::fs::write(path, &table).expect("write --out file");
    }
    if results.values().any(Result::is_err) {
        std::process::exit(1);
    }
}
