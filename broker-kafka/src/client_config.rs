//! librdkafka configuration: the project's defaults, overridden by every
//! entry of [`KafkaSettings::properties`] (from `KAFKA_*` variables or the
//! builder).

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;

use broker_core::config::{is_sensitive_key, ConfigError, KafkaSettings};
use broker_core::BrokerError;

/// Producer defaults: idempotent, acknowledged by all in-sync replicas.
const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("max.in.flight.requests.per.connection", "5"),
    ("message.timeout.ms", "30000"),
    ("retry.backoff.ms", "100"),
    ("retry.backoff.max.ms", "1000"),
    ("linger.ms", "5"),
];

/// Consumer defaults: commits are ours (only finished offsets), new groups
/// start at the beginning of the topic.
const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
    ("auto.offset.reset", "earliest"),
    ("session.timeout.ms", "30000"),
    ("enable.partition.eof", "false"),
    // librdkafka stops fetching a partition whose local queue is over
    // `queued.min.messages` for this long (its default, 1 s, idles a
    // consumer that drains faster than 100k messages per second).
    ("fetch.queue.backoff.ms", "100"),
];

/// Settings that belong to one kind of client only: leaving them out of the
/// others avoids librdkafka's "is a producer property and will be ignored"
/// warnings.
const PRODUCER_ONLY: &[&str] = &[
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "max.in.flight.requests.per.connection",
    "max.in.flight",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "linger.ms",
    "queue.buffering.max.ms",
    "batch.size",
    "batch.num.messages",
    "compression.type",
    "compression.codec",
    "compression.level",
    "retries",
    "message.send.max.retries",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "transactional.id",
    "transaction.timeout.ms",
    "partitioner",
];
const CONSUMER_ONLY: &[&str] = &[
    "group.id",
    "group.instance.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.commit.interval.ms",
    "auto.offset.reset",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "max.poll.interval.ms",
    "partition.assignment.strategy",
    "group.protocol",
    "isolation.level",
    "fetch.min.bytes",
    "fetch.max.bytes",
    "fetch.wait.max.ms",
    "max.partition.fetch.bytes",
    "fetch.message.max.bytes",
    "queued.min.messages",
    "queued.max.messages.kbytes",
    "enable.partition.eof",
    "fetch.queue.backoff.ms",
    "check.crcs",
];

/// Which client a configuration is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Producer,
    Consumer,
    Admin,
}

/// The librdkafka configuration of a client.
pub(crate) fn client_config(settings: &KafkaSettings, role: Role) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &settings.brokers);
    config.set("client.id", &settings.client_id);
    let defaults = match role {
        Role::Producer => PRODUCER_DEFAULTS,
        Role::Consumer => CONSUMER_DEFAULTS,
        Role::Admin => &[],
    };
    for (k, v) in defaults {
        config.set(*k, *v);
    }
    for (k, v) in &settings.properties {
        let skip = match role {
            Role::Producer => CONSUMER_ONLY.contains(&k.as_str()),
            Role::Consumer => PRODUCER_ONLY.contains(&k.as_str()),
            Role::Admin => {
                CONSUMER_ONLY.contains(&k.as_str()) || PRODUCER_ONLY.contains(&k.as_str())
            }
        };
        if !skip {
            config.set(k, v);
        }
    }
    config
}

/// The environment variable that sets librdkafka setting `key`.
pub(crate) fn env_var_of(key: &str) -> String {
    format!("KAFKA_{}", key.replace('.', "_").to_ascii_uppercase())
}

/// Maps a client creation error to [`BrokerError::Config`] naming the
/// setting, with the value redacted when it is a credential.
pub(crate) fn config_error(error: KafkaError) -> BrokerError {
    match error {
        KafkaError::ClientConfig(_, description, key, _value) if !key.is_empty() => {
            let reason = if is_sensitive_key(&key) {
                format!("librdkafka rejected `{key}` (value redacted)")
            } else {
                format!("librdkafka rejected `{key}`: {description}")
            };
            BrokerError::Config(ConfigError::Invalid {
                var: env_var_of(&key),
                reason,
            })
        }
        KafkaError::ClientCreation(reason) => BrokerError::Config(ConfigError::Invalid {
            var: "KAFKA_*".into(),
            // librdkafka's creation errors name settings, not their values.
            reason: format!("librdkafka could not create the client: {reason}"),
        }),
        other => BrokerError::backend("kafka", other),
    }
}

/// The value librdkafka will use for `key` (the override, else the default).
pub(crate) fn effective<'a>(settings: &'a KafkaSettings, key: &str) -> Option<&'a str> {
    settings
        .properties
        .get(key)
        .map(String::as_str)
        .or_else(|| {
            PRODUCER_DEFAULTS
                .iter()
                .chain(CONSUMER_DEFAULTS)
                .find(|(k, _)| *k == key)
                .map(|(_, v)| *v)
        })
}

#[cfg(test)]
mod tests {
    use rdkafka::producer::FutureProducer;

    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let s = KafkaSettings::new("h:1")
            .set("linger.ms", "20")
            .set("group.id", "x");
        let p = client_config(&s, Role::Producer);
        assert_eq!(p.get("linger.ms"), Some("20"));
        assert_eq!(p.get("acks"), Some("all"));
        assert_eq!(p.get("enable.idempotence"), Some("true"));
        assert_eq!(p.get("group.id"), None);
        let c = client_config(&s, Role::Consumer);
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        assert_eq!(c.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(c.get("linger.ms"), None);
        assert_eq!(c.get("fetch.queue.backoff.ms"), Some("100"));
        assert_eq!(p.get("fetch.queue.backoff.ms"), None);
        assert_eq!(effective(&s, "linger.ms"), Some("20"));
        assert_eq!(effective(&s, "message.timeout.ms"), Some("30000"));
    }

    #[test]
    fn invalid_setting_is_a_config_error_naming_it() {
        let s = KafkaSettings::new("h:1").set("no.such.setting", "1");
        let Err(err) = client_config(&s, Role::Producer).create::<FutureProducer>() else {
            panic!("an unknown setting must be refused");
        };
        let err = config_error(err);
        match err {
            BrokerError::Config(e) => {
                assert_eq!(e.var(), "KAFKA_NO_SUCH_SETTING");
                assert!(e.to_string().contains("no.such.setting"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn invalid_secret_value_is_redacted() {
        let s = KafkaSettings::new("h:1").set("sasl.password", "");
        // An empty password is accepted; make the value invalid another way:
        let s = s
            .set("ssl.key.password", "hunter2")
            .set("ssl.key.pem", "hunter2-pem");
        if let Err(e) = client_config(&s, Role::Producer).create::<FutureProducer>() {
            let text = config_error(e).to_string();
            assert!(!text.contains("hunter2"), "{text}");
        }
    }
}
