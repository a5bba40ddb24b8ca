//! Kafka settings and which librdkafka settings are secrets.

use super::*;

/// Whether a librdkafka setting holds a credential, so its value must not be
/// logged: keys containing `password`, `secret`, `token` or `jaas`,
/// `sasl.oauthbearer.config`, and key material (`*key*.pem`, `*key*.key`).
///
/// ```
/// use broker_core::config::is_sensitive_key;
/// assert!(is_sensitive_key("sasl.password"));
/// assert!(is_sensitive_key("ssl.key.pem"));
/// assert!(!is_sensitive_key("ssl.key.location")); // a path, not the key
/// assert!(!is_sensitive_key("security.protocol"));
/// ```
pub fn is_sensitive_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    // `jaas` is not librdkafka's, but KAFKA_SASL_JAAS_CONFIG is common in
    // Java-oriented deployments and embeds the password.
    ["password", "secret", "token", "jaas"]
        .iter()
        .any(|word| key.contains(word))
        || key == "sasl.oauthbearer.config"
        || (key.contains("key") && (key.ends_with(".pem") || key.ends_with(".key")))
}

pub(super) fn redact_value<'a>(key: &str, value: &'a str) -> &'a str {
    if is_sensitive_key(key) {
        REDACTED
    } else {
        value
    }
}

/// How to reach Kafka.
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaSettings {
    /// Bootstrap servers, `host:port,host:port`.
    pub brokers: String,
    /// Client id reported to the brokers.
    pub client_id: String,
    /// Extra librdkafka settings (`security.protocol`, `sasl.password`, ...),
    /// passed to the client as they are. Sensitive values (see
    /// [`is_sensitive_key`]) are redacted in `Debug`.
    pub properties: BTreeMap<String, String>,
}

impl KafkaSettings {
    /// Settings for the given bootstrap servers, client id `broker-client`
    /// and no extra properties.
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaSettings {
            brokers: brokers.into(),
            client_id: DEFAULT_CLIENT_ID.to_owned(),
            properties: BTreeMap::new(),
        }
    }

    /// Sets the client id.
    pub fn client_id(mut self, client_id: impl Into<String>) -> Self {
        self.client_id = client_id.into();
        self
    }

    /// Sets a librdkafka property, e.g. `.set("compression.type", "zstd")`.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(key.into(), value.into());
        self
    }
}

impl fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Properties<'a>(&'a BTreeMap<String, String>);
        impl fmt::Debug for Properties<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_map()
                    .entries(self.0.iter().map(|(k, v)| (k, redact_value(k, v))))
                    .finish()
            }
        }
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("client_id", &self.client_id)
            .field("properties", &Properties(&self.properties))
            .finish()
    }
}
