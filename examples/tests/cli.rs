//! The CLI example on each backend: publish, tail, list dead letters
//! (without removing them) and replay them.

mod common;

use std::time::Duration;

use broker::config::BrokerKind;
use broker::testkit::unique;
use broker::Brokers;
use broker::{Consumer, HandlerError, Received};
use examples::cli::{parse, run, Command};

/// Runs one CLI command line; returns its JSON output lines.
async fn cli(brokers: &Brokers, line: &[&str]) -> Vec<serde_json::Value> {
    let command = parse(line.iter().copied()).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    let mut out = Vec::new();
    run(command, brokers, &mut out)
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

    let replay = cli(&brokers, &["dlq", "replay", &topic, "--idle-secs", idle]).await;
    assert_eq!(replay[0]["replayed"], 2, "{replay:?}");
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
    assert_eq!(
        parse(["publish", "t", "p", "--key", "k", "--header", "a=b", "--header", "c=d=e"]).unwrap(),
        Command::Publish {
            topic: "t".into(),
            payload: "p".into(),
            key: Some("k".into()),
            headers: vec![("a".into(), "b".into()), ("c".into(), "d=e".into())],
        }
    );
    assert_eq!(
        parse(["dlq", "replay", "t", "--max", "5"]).unwrap(),
        Command::DlqReplay {
            topic: "t".into(),
            max: 5,
            idle: Duration::from_secs(5)
        }
    );
    assert!(parse(["tail", "t", "--count", "many"])
        .unwrap_err()
        .contains("--count"));
    assert!(parse(["tail", "t", "--colour", "red"])
        .unwrap_err()
        .contains("--colour"));
    assert!(parse(["publish", "t", "p", "--header", "novalue"])
        .unwrap_err()
        .contains("name=value"));
    assert!(parse(["tail", "t", "--group"])
        .unwrap_err()
        .contains("needs a value"));
    assert!(parse(["frobnicate"]).unwrap_err().starts_with("usage"));
}
