//! `amqps://` against a RabbitMQ node with a TLS listener and a certificate
//! from a private CA: `scripts/ensure-rabbitmq-tls.sh start` starts one (the
//! test command does) and prints `RABBITMQ_TLS_URL` and `RABBITMQ_TLS_CA`.
//! Without those variables the tests say "skipped".

use std::time::Duration;

use broker_core::testkit::{backend_selected, unique};
use broker_core::{Backoff, Message, Publisher, Subscriber, Subscription};
use broker_rabbitmq::RabbitMqBroker;

/// The TLS node's URL and the CA file, when the test command started it.
fn tls_node() -> Option<(String, String)> {
    if !backend_selected("rabbitmq") {
        return None;
    }
    match (
        std::env::var("RABBITMQ_TLS_URL"),
        std::env::var("RABBITMQ_TLS_CA"),
    ) {
        (Ok(url), Ok(ca)) => Some((url, ca)),
        _ => {
            eprintln!(
                "skipped: RABBITMQ_TLS_URL / RABBITMQ_TLS_CA not set (bash scripts/ensure-rabbitmq-tls.sh start)"
            );
            None
        }
    }
}

fn quick_reconnect() -> Backoff {
    Backoff::reconnect_default()
        .max_attempts(2)
        .initial_delay(Duration::from_millis(50))
        .max_delay(Duration::from_millis(100))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_roundtrip_with_a_trusted_private_ca() {
    let Some((url, ca)) = tls_node() else {
        return;
    };
    assert!(url.starts_with("amqps://"), "{url}");
    let pem = std::fs::read_to_string(&ca).expect("CA file");
    let broker = RabbitMqBroker::builder(url)
        .tls_ca_pem(pem)
        .queue_expiry(Duration::from_secs(60))
        .reconnect(quick_reconnect())
        .connect()
        .await
        .expect("TLS connection");
    assert!(Publisher::health(&broker).await.is_healthy());
    let topic = unique("rmq.tls");
    let mut stream = broker
        .subscribe(Subscription::new(&topic, "g"))
        .await
        .expect("subscribe");
    let sent = Message::new("over TLS").with_key("k").with_header("h", "v");
    broker.publish(&topic, sent.clone()).await.expect("publish");
    let got = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("delivery in time")
        .expect("stream open")
        .expect("delivery");
    assert_eq!(got.message().id(), sent.id());
    assert_eq!(got.message().payload(), sent.payload());
    assert_eq!(got.message().key_str(), Some("k"));
    assert_eq!(got.message().headers()["h"], "v");
    got.ack().await.expect("ack");
    stream.close().await.expect("close");
    broker.close().await.expect("close");
}

/// Without the private CA the certificate is not trusted: connecting fails
/// at once (reconnecting cannot help) with an error that names the cause and
/// never the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_refuses_an_untrusted_certificate() {
    let Some((url, _ca)) = tls_node() else {
        return;
    };
    let url = url.replacen("guest:guest@", "guest:tls-s3cret@", 1);
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        RabbitMqBroker::builder(url)
            .reconnect(quick_reconnect())
            .connect(),
    )
    .await
    .expect("a bounded failure, not a hang")
    .expect_err("an untrusted certificate must not connect");
    assert!(
        matches!(err, broker_core::BrokerError::Refused { .. }) && !err.is_transient(),
        "an untrusted certificate is final, not retried: {err:?}"
    );
    let text = format!("{err} {err:?}");
    assert!(!text.contains("tls-s3cret"), "{text}");
    assert!(
        text.to_lowercase().contains("certificate") || text.contains("UnknownIssuer"),
        "the error says why: {text}"
    );
}
