//! `connect` with the default reconnect policy gives up within its
//! documented bound (30 s from the call, plus one second of slack) whether
//! the port refuses connections or accepts and never answers, and the error
//! names the address. No broker is needed.

use std::time::{Duration, Instant};

use broker_core::config::KafkaSettings;
use broker_core::BrokerError;
use broker_kafka::KafkaBroker;

const BOUND: Duration = Duration::from_secs(31);

async fn connect_fails_within_bound(address: String) {
    let started = Instant::now();
    let err = KafkaBroker::connect(KafkaSettings::new(address.clone()))
        .await
        .expect_err("no Kafka there");
    let elapsed = started.elapsed();
    assert!(elapsed <= BOUND, "connect took {elapsed:?}");
    assert!(
        matches!(err, BrokerError::Unavailable { .. }),
        "{err:?} after {elapsed:?}"
    );
    assert!(err.is_transient(), "{err:?}");
    let shown = format!("{err}");
    let source = std::error::Error::source(&err).map(|s| s.to_string());
    assert!(
        source.as_deref().is_some_and(|s| s.contains(&address)),
        "the error names {address}: {shown} / {source:?}"
    );
}

/// Nothing listens: every attempt is refused at once.
#[tokio::test]
async fn closed_port_fails_within_the_bound() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    connect_fails_within_bound(format!("127.0.0.1:{port}")).await;
}

/// A listener that accepts and never answers: every attempt waits for its
/// timeout, and those waits count toward the bound.
#[tokio::test]
async fn silent_listener_fails_within_the_bound() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket);
        }
    });
    connect_fails_within_bound(address).await;
    held.abort();
}
