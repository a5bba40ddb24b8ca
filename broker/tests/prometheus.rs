//! The Prometheus exporter (feature `prometheus`): the text a `/metrics`
//! handler returns after a publish and a handle on the in-memory broker.
//! Its own test binary: it installs the process's global recorder.

#![cfg(feature = "prometheus")]

use std::time::Duration;

use broker::config::BrokerConfig;
use broker::metrics::names;
use broker::{Brokers, Message, Publisher, Received};

/// The sample lines of `name` whose labels include all of `labels`.
fn samples<'a>(text: &'a str, name: &str, labels: &[(&str, &str)]) -> Vec<&'a str> {
    text.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .filter(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_text_has_the_labelled_counters_and_the_histogram() {
    broker::prometheus::install().expect("first recorder of this process");
    // Installing again gives the same recorder.
    broker::prometheus::install().expect("idempotent");

    let brokers = Brokers::connect(BrokerConfig::memory()).await.unwrap();
    let endpoints = brokers.endpoints("exported").unwrap();
    let topic = broker_core::testkit::unique("obs.prometheus");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let consumer = endpoints
        .consumer(&topic, "exported-group")
        .handler(move |_: Received| {
            let tx = tx.clone();
            async move {
                tx.send(()).unwrap();
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();
    for _ in 0..2 {
        endpoints
            .publisher
            .publish(&topic, Message::new("x"))
            .await
            .unwrap();
    }
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("handled in time");
    }
    // The counter is bumped after the handler returned and the ack settled.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while consumer.metrics().handled < 2 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let text = broker::prometheus::render();
    let published = samples(
        &text,
        names::PUBLISHED,
        &[("topic", &topic), ("backend", "memory")],
    );
    assert_eq!(published.len(), 1, "{text}");
    assert!(published[0].ends_with(" 2"), "{}", published[0]);

    let consumer_labels = [
        ("topic", topic.as_str()),
        ("group", "exported-group"),
        ("backend", "memory"),
    ];
    let handled = samples(&text, names::HANDLED, &consumer_labels);
    assert_eq!(handled.len(), 1, "{text}");
    assert!(handled[0].ends_with(" 2"), "{}", handled[0]);

    // A real histogram (buckets), not a summary, with its count.
    let mut with_outcome = consumer_labels.to_vec();
    with_outcome.push(("outcome", "ok"));
    let buckets = samples(
        &text,
        &format!("{}_bucket", names::HANDLE_DURATION),
        &with_outcome,
    );
    assert_eq!(
        buckets.len(),
        broker::metrics::HANDLE_DURATION_BUCKETS.len() + 1,
        "{text}"
    );
    assert!(buckets
        .iter()
        .any(|b| b.contains("le=\"+Inf\"") && b.ends_with(" 2")));
    let count = samples(
        &text,
        &format!("{}_count", names::HANDLE_DURATION),
        &with_outcome,
    );
    assert_eq!(count.len(), 1, "{text}");
    assert!(count[0].ends_with(" 2"), "{}", count[0]);

    // Help text from `describe`.
    assert!(
        text.contains(&format!("# HELP {} ", names::HANDLED)),
        "{text}"
    );
    assert!(text.contains(&format!("# TYPE {} histogram", names::HANDLE_DURATION)));

    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    brokers.close().await.unwrap();
}
