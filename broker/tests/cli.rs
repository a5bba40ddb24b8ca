//! The `broker-cli` binary, run as a subprocess: help, usage errors and
//! their exit status, and on memory what one process can show (publish,
//! health, lag not available, topic create); on Kafka (tansu) and RabbitMQ
//! the whole round trip: topic create, publish (argument and stdin), tail,
//! dead letters made by a consumer in this process, `dlq list` with
//! filters, `dlq replay --dry-run` and a filtered replay, lag, health.
//! Kafka and RabbitMQ report themselves skipped when `BROKER_TEST_BACKENDS`
//! leaves them out.

use std::io::Write;
use std::process::{Command, Stdio};

use broker_core::testkit::unique;

/// The binary's exit status, stdout and stderr.
struct Run {
    code: i32,
    out: String,
    err: String,
}

impl Run {
    /// Stdout as JSON objects, one per line.
    fn json(&self) -> Vec<serde_json::Value> {
        self.out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
            .collect()
    }

    /// Asserts exit 0 and returns the JSON lines.
    fn ok(&self, what: &str) -> Vec<serde_json::Value> {
        assert_eq!(
            self.code, 0,
            "{what}: stderr: {}\nstdout: {}",
            self.err, self.out
        );
        self.json()
    }
}

/// Runs `broker-cli args` with only `env` as the broker variables (the
/// test's own RABBITMQ_URL and KAFKA_* do not leak in), `stdin` piped.
fn cli(env: &[(String, String)], args: &[&str], stdin: &str) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_broker-cli"));
    for (key, _) in std::env::vars_os() {
        if let Some(key) = key.to_str() {
            if ["KAFKA_", "RABBITMQ_", "BROKER_"]
                .iter()
                .any(|p| key.starts_with(p))
            {
                command.env_remove(key);
            }
        }
    }
    let mut child = command
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run broker-cli");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let output = child.wait_with_output().expect("broker-cli output");
    Run {
        code: output.status.code().expect("exit code"),
        out: String::from_utf8(output.stdout).expect("utf-8 stdout"),
        err: String::from_utf8(output.stderr).expect("utf-8 stderr"),
    }
}

fn none() -> Vec<(String, String)> {
    Vec::new()
}

#[test]
fn help_on_every_command_with_exit_codes() {
    let top = cli(&none(), &["--help"], "");
    assert_eq!(top.code, 0, "{}", top.err);
    for word in [
        "publish",
        "tail",
        "dlq",
        "lag",
        "health",
        "topic",
        "Exit status",
    ] {
        assert!(top.out.contains(word), "--help lacks {word}: {}", top.out);
    }
    for line in [
        "0  ok",
        "2  usage",
        "3  configuration",
        "4  broker unavailable",
        "5  refused",
        "6  not available",
    ] {
        assert!(top.out.contains(line), "--help lacks `{line}`: {}", top.out);
    }
    let commands: &[(&[&str], &[&str])] = &[
        (
            &["publish"],
            &["--key", "--header", "--content-type", "stdin"],
        ),
        (
            &["tail"],
            &["--group", "--from-start", "--count", "--idle-secs"],
        ),
        (
            &["dlq", "list"],
            &["--kind", "--id", "--header", "--original-topic", "--count"],
        ),
        (&["dlq", "replay"], &["--kind", "--dry-run", "--max"]),
        (&["lag"], &["--group"]),
        (&["health"], &["--route"]),
        (&["topic", "create"], &["--group", "--partitions"]),
        (&["dlq"], &["list", "replay"]),
        (&["topic"], &["create"]),
    ];
    for (command, words) in commands {
        let args: Vec<&str> = command.iter().copied().chain(["--help"]).collect();
        let help = cli(&none(), &args, "");
        assert_eq!(help.code, 0, "{args:?}: {}", help.err);
        assert!(
            help.err.is_empty(),
            "{args:?} wrote to stderr: {}",
            help.err
        );
        for word in *words {
            assert!(
                help.out.contains(word),
                "{args:?} help lacks {word}: {}",
                help.out
            );
        }
        // The broker flags are on every command.
        assert!(help.out.contains("--route"), "{args:?}: {}", help.out);
    }
}

#[test]
fn usage_and_config_errors_exit_with_their_codes_on_stderr() {
    for args in [
        &["frobnicate"][..],
        &["tail"],
        &["tail", "t", "--count", "many"],
        &["tail", "t", "--colour", "red"],
        &["publish", "t", "p", "--header", "novalue"],
        &["tail", "t", "--group"],
        &["tail", "t", "--group", "g", "--from-start"],
        &["--route", "nowhere", "health"],
        &["publish", "bad topic!", "p"],
    ] {
        let run = cli(&none(), args, "");
        assert_eq!(run.code, 2, "{args:?}: {}", run.err);
        assert!(run.out.is_empty(), "{args:?} printed data: {}", run.out);
        assert!(!run.err.is_empty(), "{args:?}: nothing on stderr");
    }
    // A route to a broker that is not enabled: configuration, exit 3,
    // naming the variable.
    let run = cli(&none(), &["--route", "kafka", "publish", "t", "p"], "");
    assert_eq!(run.code, 3, "{}", run.err);
    assert!(run.err.contains("BROKER_ROUTE_CLI"), "{}", run.err);
    let env = vec![("BROKER_REQUIRE_REAL".to_owned(), "true".to_owned())];
    let run = cli(&env, &["health"], "");
    assert_eq!(run.code, 3, "{}", run.err);
    assert!(run.err.contains("BROKER_REQUIRE_REAL"), "{}", run.err);
    // Credentials in a bad URL never reach the output.
    let env = vec![(
        "RABBITMQ_URL".to_owned(),
        "amqp://u:hunter2@/nohost:x".to_owned(),
    )];
    let run = cli(&env, &["health"], "");
    assert_eq!(run.code, 3, "{}", run.err);
    assert!(
        !run.err.contains("hunter2") && !run.out.contains("hunter2"),
        "{}",
        run.err
    );
}

#[test]
fn memory_publish_health_lag_topic() {
    let topic = unique("cli.mem");
    let published = cli(
        &none(),
        &["publish", &topic, "hello", "--key", "k", "--header", "a=b"],
        "",
    )
    .ok("publish");
    assert_eq!(published.len(), 1);
    assert_eq!(published[0]["topic"], topic.as_str());
    assert_eq!(published[0]["route"], "memory");
    assert!(published[0]["published"]
        .as_str()
        .is_some_and(|id| !id.is_empty()));
    let from_stdin = cli(&none(), &["publish", &topic, "--id", "m-1"], "from stdin").ok("stdin");
    assert_eq!(from_stdin[0]["published"], "m-1");

    let health = cli(&none(), &["health"], "").ok("health");
    assert_eq!(health.len(), 1);
    assert_eq!(health[0]["healthy"], true);
    assert_eq!(health[0]["route"], "memory");
    assert_eq!(health[0]["brokers"]["memory"]["healthy"], true);
    assert!(health[0]["brokers"].get("kafka").is_none());

    let lag = cli(&none(), &["lag", &topic, "--group", "g"], "");
    assert_eq!(lag.code, 6, "{}", lag.err);
    assert!(lag.err.contains("Kafka only"), "{}", lag.err);
    assert!(lag.out.is_empty());

    let created = cli(&none(), &["topic", "create", &topic], "").ok("topic create");
    assert_eq!(created[0]["backend"], "memory");

    // Nothing waits in a fresh process's memory broker: tail ends idle.
    let tail = cli(&none(), &["tail", &topic, "--idle-secs", "1"], "").ok("tail");
    assert!(tail.is_empty());
}

#[cfg(any(feature = "kafka", feature = "rabbitmq"))]
mod real {
    use std::time::Duration;

    use super::{cli, unique, Run};
    use broker::config::BrokerConfig;
    use broker::{Brokers, HandlerError, Received};

    fn ids(lines: &[serde_json::Value]) -> Vec<String> {
        let mut ids: Vec<String> = lines
            .iter()
            .filter_map(|l| l["id"].as_str().map(str::to_owned))
            .collect();
        ids.sort();
        ids
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    fn quiet(run: &Run, what: &str) {
        // Piped stderr: no progress bar, no warnings.
        assert!(
            run.err.is_empty(),
            "{what} wrote to a pipe's stderr: {}",
            run.err
        );
    }

    /// The whole flow through the binary, with `env` naming one real broker.
    pub async fn flow(env: Vec<(String, String)>, kafka: bool) {
        let topic = unique("cli.topic");
        let run = |args: Vec<&str>, stdin: &'static str| {
            let env = env.clone();
            let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
            async move {
                tokio::task::spawn_blocking(move || {
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    cli(&env, &args, stdin)
                })
                .await
                .expect("cli task")
            }
        };
        // The consumer's and the tail's groups keep what is published from
        // now on (RabbitMQ: their queues are declared).
        let created = run(
            vec![
                "topic", "create", &topic, "--group", "app", "--group", "tail",
            ],
            "",
        )
        .await
        .ok("topic create");
        match kafka {
            true => assert_eq!(created[0]["topics"][1], format!("{topic}.dlq")),
            false => assert_eq!(
                created[0]["queues"],
                serde_json::json!([
                    format!("{topic}:app"),
                    format!("{topic}:tail"),
                    format!("{topic}.dlq")
                ])
            ),
        }

        // One key: one partition on Kafka, so the letters keep their order.
        let mut published = Vec::new();
        for (payload, origin) in [("hello", "cli"), ("world", "other")] {
            let header = format!("origin={origin}");
            let out = run(
                vec![
                    "publish", &topic, payload, "--key", "k1", "--header", &header,
                ],
                "",
            )
            .await
            .ok("publish");
            published.push(out[0]["published"].as_str().expect("id").to_owned());
        }
        let out = run(
            vec![
                "publish",
                &topic,
                "-",
                "--key",
                "k1",
                "--content-type",
                "text/plain",
            ],
            "from-stdin",
        )
        .await
        .ok("publish stdin");
        published.push(out[0]["published"].as_str().expect("id").to_owned());
        let hello = published[0].clone();

        // A consumer here refuses every message: three dead letters.
        let config = BrokerConfig::from_vars(env.clone()).expect("config");
        let brokers = Brokers::connect(config).await.expect("connect");
        let endpoints = brokers.endpoints("cli").expect("endpoints");
        let failing = endpoints
            .consumer(&topic, "app")
            .handler(|_r: Received| async { Err::<(), _>(HandlerError::permanent("not today")) })
            .start()
            .await
            .expect("consumer");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while failing.metrics().dead_lettered < 3 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "not dead-lettered: {:?}",
                failing.metrics()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        failing
            .shutdown(Duration::from_secs(10))
            .await
            .expect("shutdown");
        brokers.close().await.expect("close");

        let tailed = run(
            vec![
                "tail",
                &topic,
                "--group",
                "tail",
                "--count",
                "3",
                "--idle-secs",
                "30",
            ],
            "",
        )
        .await;
        quiet(&tailed, "tail");
        let tailed = tailed.ok("tail");
        assert_eq!(ids(&tailed), sorted(published.clone()));
        let first = tailed
            .iter()
            .find(|l| l["id"] == hello.as_str())
            .expect("hello");
        assert_eq!(first["payload"], "hello");
        assert_eq!(first["key"], "k1");
        assert_eq!(first["headers"]["origin"], "cli");
        let stdin_line = tailed
            .iter()
            .find(|l| l["payload"] == "from-stdin")
            .expect("stdin payload");
        assert_eq!(stdin_line["content_type"], "text/plain");

        // Listing twice shows the same letters; filters pick among them.
        for _ in 0..2 {
            let letters = run(vec!["dlq", "list", &topic, "--idle-secs", "3"], "")
                .await
                .ok("dlq list");
            assert_eq!(ids(&letters), sorted(published.clone()), "{letters:?}");
            assert!(letters
                .iter()
                .all(|l| l["headers"]["x-dlq-error-kind"] == "permanent"));
        }
        let none = run(
            vec![
                "dlq",
                "list",
                &topic,
                "--kind",
                "decode",
                "--idle-secs",
                "3",
            ],
            "",
        )
        .await
        .ok("dlq list --kind decode");
        assert!(none.is_empty(), "{none:?}");
        let by_header = run(
            vec![
                "dlq",
                "list",
                &topic,
                "--header",
                "origin=cli",
                "--idle-secs",
                "3",
            ],
            "",
        )
        .await
        .ok("dlq list --header");
        assert_eq!(ids(&by_header), vec![hello.clone()]);
        let by_id = run(
            vec![
                "dlq",
                "list",
                &topic,
                "--id",
                &published[1],
                "--kind",
                "permanent",
                "--idle-secs",
                "3",
            ],
            "",
        )
        .await
        .ok("dlq list --id");
        assert_eq!(ids(&by_id), vec![published[1].clone()]);

        // A dry run prints what it would replay and moves nothing.
        let dry = run(
            vec![
                "dlq",
                "replay",
                &topic,
                "--header",
                "origin=cli",
                "--dry-run",
                "--idle-secs",
                "3",
            ],
            "",
        )
        .await;
        quiet(&dry, "dry run");
        let dry = dry.ok("dry run");
        assert_eq!(dry.len(), 2, "{dry:?}");
        assert_eq!(dry[0]["id"], hello.as_str());
        assert_eq!(dry[1]["would_replay"], 1, "{dry:?}");
        assert_eq!(dry[1]["skipped"], 2, "{dry:?}");
        let letters = run(vec!["dlq", "list", &topic, "--idle-secs", "3"], "")
            .await
            .ok("after dry run");
        assert_eq!(letters.len(), 3, "{letters:?}");

        // The replay: the filtered letter goes back, the others stay.
        let replay = run(
            vec![
                "dlq",
                "replay",
                &topic,
                "--header",
                "origin=cli",
                "--idle-secs",
                "3",
            ],
            "",
        )
        .await;
        quiet(&replay, "replay");
        let replay = replay.ok("replay");
        assert_eq!(replay.len(), 1, "{replay:?}");
        assert_eq!(replay[0]["replayed"], 1, "{replay:?}");
        assert_eq!(replay[0]["skipped"], 2, "{replay:?}");
        assert_eq!(replay[0]["left"], 0, "{replay:?}");
        let back = run(
            vec![
                "tail",
                &topic,
                "--group",
                "tail",
                "--count",
                "1",
                "--idle-secs",
                "30",
            ],
            "",
        )
        .await
        .ok("tail replayed");
        assert_eq!(ids(&back), vec![hello.clone()]);
        assert!(back[0]["headers"].get("x-dlq-reason").is_none(), "{back:?}");
        assert_eq!(back[0]["headers"]["origin"], "cli");
        let left = run(vec!["dlq", "list", &topic, "--idle-secs", "3"], "")
            .await
            .ok("dlq list after replay");
        assert_eq!(ids(&left), sorted(published[1..].to_vec()), "{left:?}");

        let health = run(vec!["health"], "").await.ok("health");
        assert_eq!(health[0]["healthy"], true, "{health:?}");
        let backend = if kafka { "kafka" } else { "rabbitmq" };
        assert_eq!(health[0]["brokers"][backend]["healthy"], true, "{health:?}");
        assert_eq!(health[0]["route"], backend);

        let lag = run(vec!["lag", &topic, "--group", "tail"], "").await;
        let from_start = run(
            vec![
                "tail",
                &topic,
                "--from-start",
                "--count",
                "4",
                "--idle-secs",
                "30",
            ],
            "",
        )
        .await;
        if kafka {
            let lag = lag.ok("lag");
            assert_eq!(lag[0]["group"], "tail");
            // tansu's watermarks are wrong, so only the shape is checked here.
            assert_eq!(
                lag[0]["partitions"].as_array().map(Vec::len),
                Some(3),
                "{lag:?}"
            );
            let all = from_start.ok("tail --from-start");
            let mut expected = published.clone();
            expected.push(hello.clone());
            assert_eq!(ids(&all), sorted(expected));
        } else {
            assert_eq!(lag.code, 6, "{}", lag.err);
            assert_eq!(from_start.code, 6, "{}", from_start.err);
            assert!(
                from_start.err.contains("--from-start"),
                "{}",
                from_start.err
            );
        }
    }
}

#[cfg(feature = "rabbitmq")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_round_trip_through_the_binary() {
    if !broker_core::testkit::backend_selected("rabbitmq") {
        return;
    }
    let url = std::env::var("RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    real::flow(vec![("RABBITMQ_URL".into(), url)], false).await;
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_round_trip_through_the_binary() {
    if !broker_core::testkit::backend_selected("kafka") {
        return;
    }
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let env = [
        ("KAFKA_ENABLED", "true"),
        ("KAFKA_BROKERS", brokers.as_str()),
        // tansu's first group join waits half the session timeout.
        ("KAFKA_SESSION_TIMEOUT_MS", "6000"),
        ("KAFKA_HEARTBEAT_INTERVAL_MS", "1000"),
    ];
    real::flow(
        env.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        true,
    )
    .await;
}
