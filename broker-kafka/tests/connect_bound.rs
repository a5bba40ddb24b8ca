//! `connect` with the default reconnect policy gives up within its
//! documented bound (30 s from the call, plus one second of slack) whether
//! the port refuses connections or accepts and never answers, and the error
//! names the address. No broker is needed.

use std::time::{Duration, Instant};

use broker_core::config::KafkaSettings;
use broker_core::BrokerError;
use broker_kafka::KafkaBroker;

const BOUND: Duration = Duration::from_secs(31);

/// Counts librdkafka's log lines at INFO and above (through `tracing`).
mod counting {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Metadata, Subscriber};

    pub static LINES: AtomicUsize = AtomicUsize::new(0);
    struct Count;
    impl Subscriber for Count {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, e: &Event<'_>) {
            let meta = e.metadata();
            if meta.target().contains("rdkafka") && *meta.level() <= tracing::Level::INFO {
                LINES.fetch_add(1, Ordering::Relaxed);
            }
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }
    pub fn init() {
        let _ = tracing::subscriber::set_global_default(Count);
    }
    pub fn lines() -> usize {
        LINES.load(Ordering::Relaxed)
    }
}

async fn connect_fails_within_bound(address: String) {
    counting::init();
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
    // Repeats are held back (one line of a kind per 10 s): a handful of
    // kinds over 30 s, not the thousands librdkafka writes.
    let lines = counting::lines();
    assert!(lines <= 40, "{lines} librdkafka log lines in {elapsed:?}");
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

/// The test broker refuses the SASL handshake: `connect` returns at once
/// with a final `Refused` that says so, not after the reconnect policy, and
/// shows no password.
#[tokio::test]
async fn refused_authentication_is_final_and_immediate() {
    if !broker_core::testkit::backend_selected("kafka") {
        return;
    }
    if std::env::var("KAFKA_REAL").as_deref() == Ok("1") {
        // How the refusal reads depends on the listener; this is the test broker's.
        eprintln!("skipped: checks the test broker's SASL refusal");
        return;
    }
    let servers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let started = Instant::now();
    let err = KafkaBroker::connect(
        KafkaSettings::new(servers)
            .set("security.protocol", "sasl_plaintext")
            .set("sasl.mechanism", "SCRAM-SHA-512")
            .set("sasl.username", "app")
            .set("sasl.password", "s3cret-pw"),
    )
    .await
    .expect_err("the test broker does not take this login");
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(6),
        "took {elapsed:?}: {err:?}"
    );
    match &err {
        BrokerError::Refused {
            operation, reason, ..
        } => {
            assert_eq!(*operation, "authenticate");
            assert!(reason.contains("SASL"), "{reason}");
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    assert!(!err.is_transient(), "{err:?}");
    assert!(!format!("{err} {err:?}").contains("s3cret-pw"));
}
