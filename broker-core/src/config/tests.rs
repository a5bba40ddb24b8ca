//! Tests of the configuration as a whole.

use super::*;
use BrokerKind::{Kafka, Memory, RabbitMq};

fn dual(primary: BrokerKind, secondary: BrokerKind) -> Route {
    Route::Dual { primary, secondary }
}

fn err(vars: &[(&str, &str)]) -> ConfigError {
    BrokerConfig::from_vars(vars.iter().copied()).unwrap_err()
}

const KAFKA_ON: [(&str, &str); 2] = [
    ("KAFKA_ENABLED", "true"),
    ("KAFKA_BROKERS", "k1:9092,k2:9093"),
];

#[test]
fn parses_every_route_form() {
    let cases = [
        ("kafka", Route::Single(Kafka)),
        (" Kafka ", Route::Single(Kafka)),
        ("rabbitmq", Route::Single(RabbitMq)),
        ("RABBIT", Route::Single(RabbitMq)),
        ("memory", Route::Single(Memory)),
        ("kafka+rabbitmq", dual(Kafka, RabbitMq)),
        ("Rabbit + KAFKA", dual(RabbitMq, Kafka)),
    ];
    for (input, expected) in cases {
        assert_eq!(input.parse::<Route>(), Ok(expected), "{input}");
    }
    for bad in [
        "",
        "redis",
        "kafka+kafka",
        "kafka+memory",
        "memory+rabbitmq",
        "kafka+rabbitmq+kafka",
        "+kafka",
    ] {
        assert_eq!(
            bad.parse::<Route>(),
            Err(ParseRouteError(bad.to_owned())),
            "{bad}"
        );
    }
}

#[test]
fn route_display_round_trips_and_lists_brokers() {
    for route in [
        Route::Single(Kafka),
        Route::Single(Memory),
        dual(RabbitMq, Kafka),
    ] {
        assert_eq!(route.to_string().parse::<Route>(), Ok(route));
    }
    assert_eq!(dual(Kafka, RabbitMq).to_string(), "kafka+rabbitmq");
    assert_eq!(dual(RabbitMq, Kafka).primary(), RabbitMq);
    assert_eq!(dual(RabbitMq, Kafka).brokers(), vec![RabbitMq, Kafka]);
    assert_eq!(Route::Single(Memory).brokers(), vec![Memory]);
}

#[test]
fn every_error_names_its_variable() {
    let cases: Vec<(ConfigError, &str)> = vec![
        (err(&[("KAFKA_ENABLED", "maybe")]), "KAFKA_ENABLED"),
        (err(&[("RABBITMQ_ENABLED", "2")]), "RABBITMQ_ENABLED"),
        (err(&[("KAFKA_ENABLED", "yes")]), "KAFKA_BROKERS"),
        (
            err(&[("KAFKA_ENABLED", "on"), ("KAFKA_BROKERS", "  ")]),
            "KAFKA_BROKERS",
        ),
        (
            err(&[
                ("KAFKA_ENABLED", "1"),
                ("KAFKA_BROKERS", "k1:9092,,k2:9092"),
            ]),
            "KAFKA_BROKERS",
        ),
        (
            err(&[("KAFKA_ENABLED", "1"), ("KAFKA_BROKERS", "k1")]),
            "KAFKA_BROKERS",
        ),
        (
            err(&[("KAFKA_ENABLED", "1"), ("KAFKA_BROKERS", "k1:port")]),
            "KAFKA_BROKERS",
        ),
        (
            err(&[("KAFKA_ENABLED", "1"), ("KAFKA_BROKERS", "k1:70000")]),
            "KAFKA_BROKERS",
        ),
        (
            err(&[("KAFKA_ENABLED", "1"), ("KAFKA_BROKERS", ":9092")]),
            "KAFKA_BROKERS",
        ),
        (err(&[("RABBITMQ_ENABLED", "TRUE")]), "RABBITMQ_URL"),
        (err(&[("RABBITMQ_URL", "http://rabbit/")]), "RABBITMQ_URL"),
        (err(&[("RABBITMQ_URL", "rabbit:5672")]), "RABBITMQ_URL"),
        (
            err(&[("BROKER_ROUTE_BILLING", "redis")]),
            "BROKER_ROUTE_BILLING",
        ),
        (err(&[("BROKER_ROUTE_", "memory")]), "BROKER_ROUTE_"),
        (
            err(&[
                ("KAFKA_ENABLED", "true"),
                ("KAFKA_BROKERS", "k:1"),
                ("KAFKA_", "x"),
            ]),
            "KAFKA_",
        ),
    ];
    for (error, var) in cases {
        assert_eq!(error.var(), var, "{error}");
        assert!(error.to_string().contains(var), "{error}");
    }
    assert_eq!(
        err(&[("KAFKA_ENABLED", "maybe")]),
        ConfigError::InvalidBool {
            var: "KAFKA_ENABLED".into(),
            value: "maybe".into()
        }
    );
    assert!(matches!(
        err(&[("KAFKA_ENABLED", "true")]),
        ConfigError::Missing { .. }
    ));
    assert!(matches!(
        err(&[("RABBITMQ_URL", "http://x")]),
        ConfigError::Invalid { .. }
    ));
    assert_eq!(
        err(&[("BROKER_ROUTE_BILLING", " Redis ")]),
        ConfigError::UnknownRoute {
            var: "BROKER_ROUTE_BILLING".into(),
            value: "Redis".into()
        }
    );
}

#[test]
fn routes_to_disabled_brokers_are_refused() {
    let to_kafka = err(&[("BROKER_ROUTE_BILLING", "kafka")]);
    assert_eq!(
        to_kafka,
        ConfigError::RouteToDisabled {
            var: "BROKER_ROUTE_BILLING".into(),
            broker: Kafka
        }
    );
    assert_eq!(
        to_kafka.to_string(),
        "BROKER_ROUTE_BILLING routes to Kafka, but Kafka is disabled (set KAFKA_ENABLED=true and KAFKA_BROKERS)"
    );
    // KAFKA_BROKERS alone does not enable Kafka.
    let not_enabled = err(&[("KAFKA_BROKERS", "k:9092"), ("BROKER_ROUTE_X", "kafka")]);
    assert_eq!(not_enabled.var(), "BROKER_ROUTE_X");
    let dual_route = [
        KAFKA_ON[0],
        KAFKA_ON[1],
        ("BROKER_ROUTE_AUDIT", "kafka+rabbitmq"),
    ];
    assert_eq!(
        err(&dual_route),
        ConfigError::RouteToDisabled {
            var: "BROKER_ROUTE_AUDIT".into(),
            broker: RabbitMq
        }
    );
    let switched_off = [
        ("RABBITMQ_ENABLED", "off"),
        ("RABBITMQ_URL", "amqp://h"),
        ("BROKER_ROUTE_A", "rabbit"),
    ];
    assert!(matches!(
        err(&switched_off),
        ConfigError::RouteToDisabled {
            broker: RabbitMq,
            ..
        }
    ));
    assert!(BrokerConfig::from_vars([("BROKER_ROUTE_A", "memory")]).is_ok());
}

#[test]
fn builder_applies_the_same_checks() {
    let built = BrokerConfig::builder()
        .route("Feature_Usage", Route::Single(RabbitMq))
        .build();
    assert_eq!(
        built.unwrap_err(),
        ConfigError::RouteToDisabled {
            var: "BROKER_ROUTE_FEATURE_USAGE".into(),
            broker: RabbitMq
        }
    );
    let bad_brokers = BrokerConfig::builder()
        .kafka(KafkaSettings::new("nope"))
        .build();
    assert_eq!(bad_brokers.unwrap_err().var(), "KAFKA_BROKERS");
    let bad_url = BrokerConfig::builder()
        .rabbitmq(RabbitMqSettings::new("https://u:topsecret@h/"))
        .build()
        .unwrap_err();
    assert_eq!(bad_url.var(), "RABBITMQ_URL");
    assert!(!bad_url.to_string().contains("topsecret"), "{bad_url}");
    let config = BrokerConfig::builder()
        .kafka(
            KafkaSettings::new("[::1]:9092")
                .client_id("svc")
                .set("acks", "all"),
        )
        .rabbitmq(RabbitMqSettings::new("AMQPS://h:5671"))
        .route("billing", dual(RabbitMq, Kafka))
        .build()
        .unwrap();
    assert_eq!(config.route("BILLING"), dual(RabbitMq, Kafka));
    assert_eq!(config.kafka.unwrap().properties["acks"], "all");
    assert_eq!(
        BrokerConfig::memory(),
        BrokerConfig::builder().build().unwrap()
    );
}

#[test]
fn default_route_prefers_kafka_then_rabbitmq_then_memory() {
    let rabbit = ("RABBITMQ_URL", "amqp://h");
    let default = |vars: &[(&str, &str)]| {
        BrokerConfig::from_vars(vars.iter().copied())
            .unwrap()
            .default_route()
    };
    assert_eq!(default(&[]), Route::Single(Memory));
    assert_eq!(default(&[rabbit]), Route::Single(RabbitMq));
    assert_eq!(default(&KAFKA_ON), Route::Single(Kafka));
    assert_eq!(
        default(&[KAFKA_ON[0], KAFKA_ON[1], rabbit]),
        Route::Single(Kafka)
    );
    assert_eq!(
        default(&[("KAFKA_ENABLED", "false"), ("KAFKA_BROKERS", "k:1"), rabbit]),
        Route::Single(RabbitMq)
    );
    assert_eq!(
        BrokerConfig::memory().route("anything"),
        Route::Single(Memory)
    );
}

#[test]
fn module_names_are_case_insensitive() {
    let config = BrokerConfig::from_vars([
        ("BROKER_ROUTE_FEATURE_USAGE", "memory"),
        ("RABBITMQ_URL", "amqp://h"),
    ])
    .unwrap();
    assert_eq!(config.route("feature_usage"), Route::Single(Memory));
    assert_eq!(config.route("Feature_Usage"), Route::Single(Memory));
    assert_eq!(config.route("billing"), Route::Single(RabbitMq));
    assert_eq!(
        config.routes().collect::<Vec<_>>(),
        vec![("feature_usage", &Route::Single(Memory))]
    );
}

#[test]
fn kafka_variables_pass_through_as_librdkafka_properties() {
    let config = BrokerConfig::from_vars([
        KAFKA_ON[0],
        KAFKA_ON[1],
        ("KAFKA_CLIENT_ID", "billing-svc"),
        ("KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
        ("KAFKA_SASL_PASSWORD", "p4ss"),
        ("KAFKA_COMPRESSION_TYPE", "zstd"),
        ("KAFKA_LINGER_MS", ""),
        ("KAFKA_HEAP_OPTS", "-Xmx1G"),
        ("KAFKA_REAL", "1"),
        ("RABBITMQ_VHOST", "ignored"),
    ])
    .unwrap();
    let kafka = config.kafka.unwrap();
    assert_eq!(kafka.brokers, "k1:9092,k2:9093");
    assert_eq!(kafka.client_id, "billing-svc");
    let expected: BTreeMap<String, String> = [
        ("compression.type", "zstd"),
        ("sasl.password", "p4ss"),
        ("security.protocol", "SASL_SSL"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(kafka.properties, expected);
    assert_eq!(KafkaSettings::new("k:1").client_id, "broker-client");
}

#[test]
fn booleans_and_rabbitmq_enablement() {
    for (value, enabled) in [
        ("TRUE", true),
        ("1", true),
        ("Yes", true),
        ("on", true),
        ("false", false),
        ("0", false),
        ("NO", false),
        ("off", false),
    ] {
        let config =
            BrokerConfig::from_vars([("KAFKA_ENABLED", value), ("KAFKA_BROKERS", "k:1")]).unwrap();
        assert_eq!(config.kafka.is_some(), enabled, "{value}");
    }
    let unset = BrokerConfig::from_vars([("KAFKA_ENABLED", ""), ("RABBITMQ_URL", "")]).unwrap();
    assert_eq!(unset, BrokerConfig::memory());
    let by_url = BrokerConfig::from_vars([("RABBITMQ_URL", "amqp://u:pw@h:5672/v")]).unwrap();
    assert_eq!(
        by_url.rabbitmq.unwrap().url().expose(),
        "amqp://u:pw@h:5672/v"
    );
    let off = BrokerConfig::from_vars([
        ("RABBITMQ_ENABLED", "false"),
        ("RABBITMQ_URL", "http://bad"),
    ])
    .unwrap();
    assert!(off.rabbitmq.is_none());
}

#[test]
fn secret_url_redacts_the_password() {
    let cases = [
        (
            "amqp://user:pass@host:5672/vhost",
            "amqp://user:***@host:5672/vhost",
        ),
        (
            "amqps://user:p@ss:w@rd@host/vhost",
            "amqps://user:***@host/vhost",
        ),
        ("amqp://user:a:b@host", "amqp://user:***@host"),
        ("amqp://user@host:5672/", "amqp://***@host:5672/"),
        ("amqp://host:5672/v%40x", "amqp://host:5672/v%40x"),
        (
            "amqp://u:p@h/v?heartbeat=10&password=x&k",
            "amqp://u:***@h/v?heartbeat=10&***&***",
        ),
        ("amqp://u:p@h/v#frag", "amqp://u:***@h/v#***"),
        // An `@` after the host: the URL does not split, nothing is shown.
        ("amqp://host:5672/v@x", "[malformed URL, redacted]"),
        ("user:pass@host", "[malformed URL, redacted]"),
    ];
    for (url, redacted) in cases {
        let secret = SecretUrl::new(url);
        assert_eq!(secret.redacted(), redacted);
        assert_eq!(secret.to_string(), redacted);
        assert_eq!(format!("{secret:?}"), format!("SecretUrl({redacted:?})"));
        assert_eq!(secret.expose(), url);
    }
    let at_in_password = SecretUrl::new("amqp://app:s3cr@t!@rabbit:5672/%2f");
    for printed in [at_in_password.to_string(), format!("{at_in_password:?}")] {
        assert!(!printed.contains("s3cr"), "{printed}");
        assert!(printed.contains("@rabbit:5672/%2f"), "{printed}");
    }
}

#[test]
fn kafka_settings_debug_redacts_sensitive_values() {
    let settings = KafkaSettings::new("k:9092")
        .set("sasl.password", "hunter2")
        .set("sasl.oauthbearer.config", "principal=x secret=oauth-s3cret")
        .set("security.protocol", "SASL_SSL");
    let debug = format!("{settings:?}");
    assert!(
        !debug.contains("hunter2") && !debug.contains("oauth-s3cret"),
        "{debug}"
    );
    assert!(
        debug.contains(r#""sasl.password": "[REDACTED]""#),
        "{debug}"
    );
    assert!(debug.contains("SASL_SSL"), "{debug}");
}

#[test]
fn sensitive_keys() {
    for key in [
        "sasl.password",
        "ssl.key.password",
        "ssl.keystore.password",
        "sasl.oauthbearer.client.secret",
        "sasl.oauthbearer.config",
        "ssl.key.pem",
        "ssl_key.key",
        "SASL.PASSWORD",
        "sasl.jaas.config",
        "api.token",
    ] {
        assert!(is_sensitive_key(key), "{key}");
    }
    for key in [
        "security.protocol",
        "sasl.username",
        "ssl.key.location",
        "ssl.ca.pem",
        "compression.type",
    ] {
        assert!(!is_sensitive_key(key), "{key}");
    }
}

#[test]
fn broker_config_output_is_redacted() {
    let config = BrokerConfig::from_vars([
        KAFKA_ON[0],
        KAFKA_ON[1],
        ("KAFKA_SASL_PASSWORD", "kafka-pw-123"),
        ("KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
        ("RABBITMQ_URL", "amqps://app:rabbit@pw-456@rabbit:5671/prod"),
        ("BROKER_ROUTE_BILLING", "kafka+rabbitmq"),
    ])
    .unwrap();
    let display = config.to_string();
    let debug = format!("{config:?}");
    let pretty = format!("{config:#?}");
    for printed in [&display, &debug, &pretty] {
        assert!(!printed.contains("kafka-pw-123"), "{printed}");
        assert!(
            !printed.contains("pw-456") && !printed.contains("rabbit@pw"),
            "{printed}"
        );
    }
    assert_eq!(
        display,
        "kafka: enabled, brokers=k1:9092,k2:9093, client_id=broker-client, \
         sasl.password=[REDACTED], security.protocol=SASL_SSL\n\
         rabbitmq: enabled, url=amqps://app:***@rabbit:5671/prod\n\
         default route: kafka\n\
         route billing: kafka+rabbitmq"
    );
}

#[test]
fn rabbitmq_url_takes_a_node_list_with_one_set_of_credentials() {
    let list = "amqp://app:s3cret@rabbit-1:5672/prod, amqp://app:s3cret@rabbit-2:5673/prod,amqps://app:s3cret@rabbit-3/prod";
    let config = BrokerConfig::from_vars([("RABBITMQ_URL", list)]).unwrap();
    let url = config.rabbitmq.as_ref().unwrap().url();
    let addresses: Vec<String> = url
        .amqp_nodes()
        .unwrap()
        .iter()
        .map(|n| n.address())
        .collect();
    assert_eq!(
        addresses,
        [
            "rabbit-1:5672/prod",
            "rabbit-2:5673/prod",
            "rabbit-3:5671/prod"
        ]
    );
    let shown = format!("{config} {config:?}");
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(
        shown.contains("url=amqp://app:***@rabbit-1:5672/prod,amqp://app:***@rabbit-2:5673/prod,amqps://app:***@rabbit-3/prod"),
        "{shown}"
    );
    // A comma in a password does not start a node.
    let comma = SecretUrl::new("amqp://app:a,b@rabbit-1,amqp://app:a,b@rabbit-2");
    assert_eq!(comma.nodes().len(), 2);
    assert_eq!(
        comma.amqp_nodes().unwrap()[0].password.as_deref(),
        Some("a,b")
    );

    for (bad, why) in [
        (
            "amqp://app:s3cret@rabbit-1,amqp://app:other@rabbit-2",
            "node 2 of 2: its password differs",
        ),
        (
            "amqp://app:s3cret@rabbit-1,amqp://ops:s3cret@rabbit-2",
            "node 2 of 2: its user name differs",
        ),
        (
            "amqp://app:s3cret@rabbit-1/a,amqp://app:s3cret@rabbit-2/b",
            "node 2 of 2: its vhost differs",
        ),
        ("amqp://app:s3cret@rabbit-1,", "node 2 of 2: an empty entry"),
        (
            "amqp://app:s3cret@rabbit-1,,amqp://app:s3cret@rabbit-2",
            "node 1 of 2",
        ),
        ("amqp://app:s3cret@rabbit-1 amqp://app:s3cret@rabbit-2", ""),
        ("amqp://app:s3cret@rabbit-1,rabbit-2:5672", ""),
        ("amqp://app:s3cret@rabbit-1,http://app:s3cret@rabbit-2", ""),
    ] {
        let err = BrokerConfig::from_vars([("RABBITMQ_URL", bad)]).expect_err(bad);
        let text = format!("{err} {err:?}");
        assert_eq!(err.var(), "RABBITMQ_URL", "{bad}: {text}");
        assert!(text.contains(why), "{bad}: {text}");
        assert!(!text.contains("s3cret"), "{bad}: {text}");
    }
}
