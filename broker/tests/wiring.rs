//! The facade's wiring: configuration to brokers to per-module endpoints,
//! the production guard, the warnings, and the errors for backends or TLS a
//! build leaves out. Tests that need a broker run against the test brokers
//! (`RABBITMQ_URL`, `KAFKA_BROKERS`; `bash scripts/test.sh` starts both) and
//! report themselves skipped when `BROKER_TEST_BACKENDS` leaves them out.

use std::time::Duration;

use broker::config::{BrokerConfig, BrokerKind, Route};
use broker::{BrokerError, Brokers, BrokersBuilder, Message, Publisher, Subscription};

const SECRET: &str = "s3cret-pw";

#[cfg(feature = "rabbitmq")]
fn rabbitmq_url() -> String {
    std::env::var("RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

#[cfg(feature = "kafka")]
fn kafka_brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// The variable a startup error names.
fn var_of(err: &BrokerError) -> &str {
    match err {
        BrokerError::Config(e) => e.var(),
        other => panic!("expected a configuration error, got {other}"),
    }
}

#[test]
fn guard_refuses_the_memory_fallback_and_says_why() {
    let builder = BrokersBuilder::from_vars([
        ("KAFKA_BROKERS", "kafka-1:9092"),
        ("BROKER_REQUIRE_REAL", "true"),
    ])
    .unwrap();
    assert_eq!(
        builder.config().default_route(),
        Route::Single(BrokerKind::Memory)
    );
    let err = builder.check().unwrap_err();
    assert_eq!(var_of(&err), "BROKER_REQUIRE_REAL");
    let text = err.to_string();
    assert!(text.contains("in-memory"), "{text}");
    // The reason carries the likely cause.
    assert!(text.contains("KAFKA_BROKERS is set"), "{text}");
}

#[tokio::test]
async fn guard_refuses_to_connect_without_a_real_broker() {
    let err = Brokers::builder(BrokerConfig::memory())
        .require_real_broker(true)
        .connect()
        .await
        .unwrap_err();
    assert_eq!(var_of(&err), "BROKER_REQUIRE_REAL");
    // Off (the default), the same configuration runs on memory.
    let brokers = Brokers::connect(BrokerConfig::memory()).await.unwrap();
    assert!(!brokers.requires_real_broker());
    assert_eq!(
        brokers.endpoints("billing").unwrap().route,
        Route::Single(BrokerKind::Memory)
    );
}

#[cfg(feature = "rabbitmq")]
#[test]
fn guard_refuses_an_explicit_memory_route() {
    let builder = BrokersBuilder::from_vars([
        ("RABBITMQ_URL", "amqp://app:s3cret-pw@rabbit:5672/%2f"),
        ("BROKER_ROUTE_AUDIT", "memory"),
        ("BROKER_REQUIRE_REAL", "yes"),
    ])
    .unwrap();
    let err = builder.check().unwrap_err();
    assert_eq!(var_of(&err), "BROKER_ROUTE_AUDIT");
    assert!(!err.to_string().contains(SECRET));
    // Without the guard the route is fine.
    builder.require_real_broker(false).check().unwrap();
}

#[test]
fn guard_and_dual_policy_values_are_checked() {
    let err = BrokersBuilder::from_vars([("BROKER_REQUIRE_REAL", "maybe")]).unwrap_err();
    assert_eq!(var_of(&err), "BROKER_REQUIRE_REAL");
    let err = BrokersBuilder::from_vars([("BROKER_DUAL_SECONDARY", "always")]).unwrap_err();
    assert_eq!(var_of(&err), "BROKER_DUAL_SECONDARY");
    // Empty counts as unset.
    let builder = BrokersBuilder::from_vars([("BROKER_REQUIRE_REAL", " ")]).unwrap();
    builder.check().unwrap();
}

#[test]
fn configuration_errors_name_their_variable() {
    let err = BrokersBuilder::from_vars([("BROKER_ROUTE_BILLING", "kafak")]).unwrap_err();
    assert_eq!(var_of(&err), "BROKER_ROUTE_BILLING");
    let err = BrokersBuilder::from_vars([("BROKER_ROUTE_BILLING", "rabbitmq")]).unwrap_err();
    assert_eq!(var_of(&err), "BROKER_ROUTE_BILLING");
    assert!(err.to_string().contains("disabled"), "{err}");
    let err = BrokersBuilder::from_vars([("KAFKA_ENABLED", "true")]).unwrap_err();
    assert_eq!(var_of(&err), "KAFKA_BROKERS");
}

#[test]
fn warns_about_broker_variables_that_have_no_effect() {
    let builder = BrokersBuilder::from_vars([
        ("KAFKA_BROKERS", "kafka-1:9092"),
        ("RABBITMQ_ENABLED", "false"),
        ("RABBITMQ_URL", "amqp://app:s3cret-pw@rabbit:5672/%2f"),
        ("RABBITMQ_QUEUE_EXPIRY_MS", "60000"),
    ])
    .unwrap();
    let warnings = builder.warnings();
    assert_eq!(warnings.len(), 3, "{warnings:?}");
    assert!(
        warnings[0].starts_with("KAFKA_BROKERS is set")
            && warnings[0].contains("KAFKA_ENABLED is not set")
    );
    assert!(
        warnings[1].starts_with("RABBITMQ_URL is set")
            && warnings[1].contains("RABBITMQ_ENABLED is false")
    );
    assert!(warnings[2].starts_with("RABBITMQ_QUEUE_EXPIRY_MS is set"));
    for w in warnings {
        assert!(
            !w.contains(SECRET) && !w.contains("kafka-1"),
            "a value in a warning: {w}"
        );
    }

    let builder = BrokersBuilder::from_vars([
        ("KAFKA_ENABLED", "false"),
        ("KAFKA_BROKERS", "kafka-1:9092"),
    ])
    .unwrap();
    assert_eq!(builder.warnings().len(), 1);
    assert!(builder.warnings()[0].contains("KAFKA_ENABLED is false"));

    // Enabled brokers: nothing to warn about.
    let builder = BrokersBuilder::from_vars([
        ("KAFKA_ENABLED", "true"),
        ("KAFKA_BROKERS", "kafka-1:9092"),
        ("RABBITMQ_URL", "amqp://app:s3cret-pw@rabbit:5672/%2f"),
    ])
    .unwrap();
    assert!(builder.warnings().is_empty(), "{:?}", builder.warnings());
    assert!(BrokersBuilder::new(BrokerConfig::memory())
        .warnings()
        .is_empty());
}

#[cfg(not(feature = "kafka"))]
#[test]
fn kafka_without_its_feature_is_a_startup_error() {
    let enabled = [("KAFKA_ENABLED", "true"), ("KAFKA_BROKERS", "kafka-1:9092")];
    let err = BrokersBuilder::from_vars(enabled)
        .unwrap()
        .check()
        .unwrap_err();
    assert_eq!(var_of(&err), "KAFKA_ENABLED");
    assert!(err.to_string().contains("feature `kafka-tls`"), "{err}");
    let routed = [
        ("KAFKA_ENABLED", "true"),
        ("KAFKA_BROKERS", "kafka-1:9092"),
        ("BROKER_ROUTE_USAGE", "kafka"),
    ];
    let err = BrokersBuilder::from_vars(routed)
        .unwrap()
        .check()
        .unwrap_err();
    assert_eq!(var_of(&err), "BROKER_ROUTE_USAGE");
}

#[cfg(not(feature = "rabbitmq"))]
#[test]
fn rabbitmq_without_its_feature_is_a_startup_error() {
    let vars = [
        ("RABBITMQ_URL", "amqp://app:s3cret-pw@rabbit:5672/%2f"),
        ("BROKER_ROUTE_CREDITS", "rabbitmq"),
    ];
    let err = BrokersBuilder::from_vars(vars)
        .unwrap()
        .check()
        .unwrap_err();
    assert_eq!(var_of(&err), "BROKER_ROUTE_CREDITS");
    assert!(
        err.to_string().contains("feature `rabbitmq-rustls`"),
        "{err}"
    );
    assert!(!err.to_string().contains(SECRET));
}

#[cfg(all(
    feature = "rabbitmq",
    not(any(
        feature = "rabbitmq-rustls",
        feature = "rabbitmq-rustls-ring",
        feature = "rabbitmq-native-tls"
    ))
))]
#[test]
fn amqps_without_a_tls_feature_is_a_startup_error() {
    let vars = [("RABBITMQ_URL", "amqps://app:s3cret-pw@rabbit:5671/%2f")];
    let err = BrokersBuilder::from_vars(vars)
        .unwrap()
        .check()
        .unwrap_err();
    assert_eq!(var_of(&err), "RABBITMQ_URL");
    assert!(err.to_string().contains("rabbitmq-rustls"), "{err}");
    assert!(!err.to_string().contains(SECRET));
}

#[cfg(all(
    feature = "kafka",
    not(any(feature = "kafka-tls", feature = "kafka-tls-vendored"))
))]
#[test]
fn kafka_tls_without_a_tls_feature_is_a_startup_error() {
    let config = BrokerConfig::builder()
        .kafka(
            broker::config::KafkaSettings::new("kafka-1:9093").set("security.protocol", "SASL_SSL"),
        )
        .build()
        .unwrap();
    let err = BrokersBuilder::new(config).check().unwrap_err();
    assert_eq!(var_of(&err), "KAFKA_SECURITY_PROTOCOL");
}

#[cfg(all(feature = "kafka-tls", feature = "rabbitmq-rustls"))]
#[test]
fn tls_configurations_pass_with_tls_features() {
    let config = BrokerConfig::builder()
        .kafka(
            broker::config::KafkaSettings::new("kafka-1:9093").set("security.protocol", "SASL_SSL"),
        )
        .rabbitmq(broker::config::RabbitMqSettings::new(
            "amqps://app:pw@rabbit:5671/%2f",
        ))
        .build()
        .unwrap();
    BrokersBuilder::new(config)
        .require_real_broker(true)
        .check()
        .unwrap();
}

/// Publishes on `endpoints` and reads the message back through its
/// subscriber in a fresh group.
async fn round_trip(endpoints: &broker::Endpoints, topic: &str) {
    let group = broker_core::testkit::unique("wiring");
    let mut stream = endpoints
        .subscriber
        .subscribe(Subscription::new(topic, &group))
        .await
        .expect("subscribe");
    let sent = Message::new("wired").with_key("k1");
    endpoints
        .publisher
        .publish(topic, sent.clone())
        .await
        .expect("publish");
    let got = tokio::time::timeout(Duration::from_secs(60), stream.next())
        .await
        .expect("a delivery within 60 s")
        .expect("stream open")
        .expect("delivery");
    assert_eq!(got.message().id(), sent.id());
    assert_eq!(got.message().payload(), sent.payload());
    got.ack().await.expect("ack");
}

#[tokio::test]
async fn memory_route_round_trip() {
    let brokers = Brokers::connect(BrokerConfig::memory()).await.unwrap();
    let endpoints = brokers.endpoints("anything").unwrap();
    round_trip(&endpoints, &broker_core::testkit::unique("wiring.memory")).await;
    brokers.close().await.unwrap();
}

#[cfg(feature = "rabbitmq")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_route_round_trip_and_guard() {
    if !broker_core::testkit::backend_selected("rabbitmq") {
        return;
    }
    let url = rabbitmq_url();
    let brokers = BrokersBuilder::from_vars([
        ("RABBITMQ_URL", url.as_str()),
        ("RABBITMQ_QUEUE_EXPIRY_MS", "120000"),
        ("BROKER_REQUIRE_REAL", "true"),
    ])
    .unwrap()
    .connect()
    .await
    .expect("connect to RabbitMQ");
    assert!(brokers.requires_real_broker());
    assert!(brokers.rabbitmq().is_some());
    let endpoints = brokers.endpoints("credits").unwrap();
    assert_eq!(endpoints.route, Route::Single(BrokerKind::RabbitMq));
    round_trip(&endpoints, &broker_core::testkit::unique("wiring.rabbitmq")).await;
    // The guard also holds for routes chosen at run time.
    let err = brokers
        .endpoints_for(Route::Single(BrokerKind::Memory))
        .unwrap_err();
    assert_eq!(var_of(&err), "BROKER_REQUIRE_REAL");
    brokers.close().await.unwrap();
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_route_publishes() {
    if !broker_core::testkit::backend_selected("kafka") {
        return;
    }
    let brokers = kafka_brokers();
    let brokers = BrokersBuilder::from_vars([
        ("KAFKA_ENABLED", "true"),
        ("KAFKA_BROKERS", brokers.as_str()),
        ("BROKER_REQUIRE_REAL", "true"),
    ])
    .unwrap()
    .connect()
    .await
    .expect("connect to Kafka");
    assert!(brokers.kafka().is_some());
    let endpoints = brokers.endpoints("usage").unwrap();
    assert_eq!(endpoints.route, Route::Single(BrokerKind::Kafka));
    assert!(endpoints.subscriber.health().await.is_healthy());
    let topic = broker_core::testkit::unique("wiring.kafka");
    endpoints
        .publisher
        .publish(&topic, Message::new("wired").with_key("k1"))
        .await
        .expect("publish to Kafka");
    // Dead letters go to the broker the module consumes from.
    assert!(endpoints.dead_letters.health().await.is_healthy());
    brokers.close().await.unwrap();
}

#[cfg(all(feature = "kafka", feature = "rabbitmq"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_per_module_and_dual_route() {
    if !broker_core::testkit::backend_selected("kafka")
        || !broker_core::testkit::backend_selected("rabbitmq")
    {
        return;
    }
    let (kafka, rabbitmq) = (kafka_brokers(), rabbitmq_url());
    let brokers = BrokersBuilder::from_vars([
        ("KAFKA_ENABLED", "true"),
        ("KAFKA_BROKERS", kafka.as_str()),
        ("RABBITMQ_URL", rabbitmq.as_str()),
        ("RABBITMQ_QUEUE_EXPIRY_MS", "120000"),
        ("BROKER_ROUTE_CREDITS", "rabbitmq"),
        ("BROKER_ROUTE_MIGRATING", "rabbitmq+kafka"),
        ("BROKER_ROUTE_SCRATCH", "memory"),
        // A publish fails unless the secondary (Kafka) accepted it too.
        ("BROKER_DUAL_SECONDARY", "required"),
    ])
    .unwrap()
    .connect()
    .await
    .expect("connect to both brokers");

    // Kafka wins the default when both are enabled.
    assert_eq!(
        brokers.endpoints("usage").unwrap().route,
        Route::Single(BrokerKind::Kafka)
    );
    assert_eq!(
        brokers.endpoints("CREDITS").unwrap().route,
        Route::Single(BrokerKind::RabbitMq)
    );
    assert_eq!(
        brokers.endpoints("scratch").unwrap().route,
        Route::Single(BrokerKind::Memory)
    );

    let dual = brokers.endpoints("migrating").unwrap();
    assert_eq!(
        dual.route,
        Route::Dual {
            primary: BrokerKind::RabbitMq,
            secondary: BrokerKind::Kafka
        }
    );
    // Consumes from the primary, so the round trip reads RabbitMQ; the
    // required secondary makes the publish prove Kafka took it as well.
    round_trip(&dual, &broker_core::testkit::unique("wiring.dual")).await;

    // The secondary is required: with Kafka closed, the dual publish fails
    // although RabbitMQ still accepts it.
    brokers.kafka().unwrap().close().await.unwrap();
    let err = dual
        .publisher
        .publish(
            &broker_core::testkit::unique("wiring.dual"),
            Message::new("x"),
        )
        .await;
    assert!(
        err.is_err(),
        "a dual publish succeeded without its required secondary"
    );
    brokers.close().await.ok();
}
