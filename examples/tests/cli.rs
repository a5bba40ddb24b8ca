//! The operator's tool (`broker::cli`, binary `broker-cli`) driven as a
//! library on each backend, the example modules' way: publish, tail, list
//! dead letters (without removing them), filter them, dry-run and replay.
//! `broker/tests/cli.rs` runs the binary itself.

mod common;

use std::time::Duration;

use broker::cli::{execute, Cli, Io, MODULE};
use broker::config::BrokerKind;
use broker::testkit::unique;
use broker::Brokers;
use broker::{Consumer, HandlerError, Received};

/// Runs one command line on `brokers` (route of module `cli`); returns its
/// JSON output lines.
async fn cli(brokers: &Brokers, line: &[&str]) -> Vec<serde_json::Value> {
    let args = std::iter::once("broker-cli").chain(line.iter().copied());
    let parsed = Cli::parse_args(args).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    let mut out = Vec::new();
    let mut stdin = std::io::empty();
    let mut io = Io {
        stdin: &mut stdin,
        out: &mut out,
        progress: false,
    };
    let route = brokers.config().route(MODULE);
    execute(&parsed.command, brokers, route, &mut io)
        .await
        .unwrap_or_else(|e| panic!("{line:?}: {e}"));
    String::from_utf8(out)
        .expect("utf-8 output")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

fn ids(lines: &[serde_json::Value]) -> Vec<String> {
    let mut ids: Vec<String> = lines
        .iter()
        .map(|l| l["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

async fn cli_flow(brokers: Brokers) {
    let topic = unique("cli.topic");
    let idle = "3";
    // Make the tail group exist first (RabbitMQ keeps messages only for
    // queues that exist when they arrive).
    assert!(cli(&brokers, &["tail", &topic, "--count", "0"])
        .await
        .is_empty());
    let endpoints = brokers.endpoints("cli").expect("endpoints");
    let failing = Consumer::from_parts(
        endpoints.subscriber.clone(),
        endpoints.dead_letters.clone(),
        &topic,
        unique("app"),
    )
    .handler(|_r: Received| async { Err::<(), _>(HandlerError::permanent("not today")) })
    .start()
    .await
    .expect("failing consumer");

    let first = cli(
        &brokers,
        &[
            "publish",
            &topic,
            "hello",
            "--key",
            "k1",
            "--header",
            "origin=cli",
        ],
    )
    .await;
    let second = cli(&brokers, &["publish", &topic, "world"]).await;
    let mut published = vec![
        first[0]["published"].as_str().unwrap().to_owned(),
        second[0]["published"].as_str().unwrap().to_owned(),
    ];
    published.sort();

    let deadline = tokio::time::Instant::now() + common::WAIT;
    while failing.metrics().dead_lettered < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not dead-lettered: {:?}",
            failing.metrics()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    failing
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");

    let tailed = cli(
        &brokers,
        &["tail", &topic, "--count", "2", "--idle-secs", "30"],
    )
    .await;
    assert_eq!(ids(&tailed), published);
    let hello = tailed
        .iter()
        .find(|l| l["payload"] == "hello")
        .expect("hello");
    assert_eq!(hello["key"], "k1");
    assert_eq!(hello["headers"]["origin"], "cli");

    // Listing twice shows the same letters: listing removes nothing.
    for _ in 0..2 {
        let letters = cli(&brokers, &["dlq", "list", &topic, "--idle-secs", idle]).await;
        assert_eq!(ids(&letters), published, "{letters:?}");
        assert!(letters.iter().all(|l| l["headers"]["x-dlq-reason"]
            .as_str()
            .is_some_and(|r| r.contains("not today"))));
    }

    // Filters: by kind (all are `permanent`), by header, by id.
    let none = cli(
        &brokers,
        &[
            "dlq",
            "list",
            &topic,
            "--kind",
            "decode",
            "--idle-secs",
            idle,
        ],
    )
    .await;
    assert!(none.is_empty(), "{none:?}");
    let by_header = cli(
        &brokers,
        &[
            "dlq",
            "list",
            &topic,
            "--header",
            "origin=cli",
            "--idle-secs",
            idle,
        ],
    )
    .await;
    assert_eq!(by_header.len(), 1, "{by_header:?}");
    assert_eq!(by_header[0]["payload"], "hello");
    let dry = cli(
        &brokers,
        &[
            "dlq",
            "replay",
            &topic,
            "--kind",
            "permanent",
            "--dry-run",
            "--idle-secs",
            idle,
        ],
    )
    .await;
    assert_eq!(ids(&dry[..2]), published, "{dry:?}");
    assert_eq!(dry[2]["would_replay"], 2, "{dry:?}");
    let still = cli(&brokers, &["dlq", "list", &topic, "--idle-secs", idle]).await;
    assert_eq!(ids(&still), published, "a dry run moves nothing: {still:?}");

    let replay = cli(&brokers, &["dlq", "replay", &topic, "--idle-secs", idle]).await;
    assert_eq!(replay[0]["replayed"], 2, "{replay:?}");
    assert_eq!(replay[0]["skipped"], 0, "{replay:?}");
    assert_eq!(replay[0]["left"], 0, "{replay:?}");
    let back = cli(
        &brokers,
        &["tail", &topic, "--count", "2", "--idle-secs", "30"],
    )
    .await;
    assert_eq!(ids(&back), published);
    assert!(
        back.iter()
            .all(|l| l["headers"].get("x-dlq-reason").is_none()),
        "{back:?}"
    );
    let empty = cli(&brokers, &["dlq", "list", &topic, "--idle-secs", idle]).await;
    assert!(empty.is_empty(), "replayed letters are gone: {empty:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_on_memory() {
    cli_flow(common::brokers_for(BrokerKind::Memory).await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_on_rabbitmq() {
    let Some(brokers) = common::brokers_for(BrokerKind::RabbitMq).await else {
        return;
    };
    cli_flow(brokers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_on_kafka() {
    let Some(brokers) = common::brokers_for(BrokerKind::Kafka).await else {
        return;
    };
    cli_flow(brokers).await;
}

#[test]
fn arguments_parse_or_say_what_is_wrong() {
    let parse =
        |line: &[&str]| Cli::parse_args(std::iter::once("broker-cli").chain(line.iter().copied()));
    let publish = parse(&[
        "publish", "t", "p", "--key", "k", "--header", "a=b", "--header", "c=d=e",
    ])
    .unwrap();
    match publish.command {
        broker::cli::Command::Publish(args) => {
            assert_eq!(args.topic, "t");
            assert_eq!(args.payload.as_deref(), Some("p"));
            assert_eq!(args.key.as_deref(), Some("k"));
            assert_eq!(
                args.headers,
                vec![("a".into(), "b".into()), ("c".into(), "d=e".into())]
            );
        }
        other => panic!("{other:?}"),
    }
    match parse(&[
        "dlq",
        "replay",
        "t",
        "--max",
        "5",
        "--kind",
        "decode",
        "--dry-run",
    ])
    .unwrap()
    .command
    {
        broker::cli::Command::Dlq(broker::cli::DlqCommand::Replay(args)) => {
            assert_eq!(args.max, 5);
            assert_eq!(args.idle_secs, 5);
            assert!(args.dry_run);
            assert_eq!(args.filter.kinds, vec!["decode".to_owned()]);
        }
        other => panic!("{other:?}"),
    }
    for (line, says) in [
        (&["tail", "t", "--count", "many"][..], "--count"),
        (&["tail", "t", "--colour", "red"], "--colour"),
        (&["publish", "t", "p", "--header", "novalue"], "NAME=VALUE"),
        (&["tail", "t", "--group"], "--group"),
        (&["frobnicate"], "frobnicate"),
    ] {
        let err = parse(line).unwrap_err();
        assert_eq!(err.exit, broker::cli::Exit::Usage, "{line:?}");
        assert!(err.message.contains(says), "{line:?}: {}", err.message);
    }
}
