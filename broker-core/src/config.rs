//! Which brokers are enabled and which broker each application module uses.
//!
//! Read from the environment with [`BrokerConfig::from_env`] or assembled in
//! code with [`BrokerConfig::builder`]; both apply the same checks, and every
//! failure is a [`ConfigError`] naming the variable to fix.
//!
//! | Variable | Meaning |
//! |---|---|
//! | `KAFKA_ENABLED` | `true` enables Kafka (default: disabled) |
//! | `KAFKA_BROKERS` | `host:port,host:port`; required when Kafka is enabled |
//! | `KAFKA_CLIENT_ID` | client id (default: `broker-client`) |
//! | `KAFKA_<NAME>` | any other librdkafka setting: `KAFKA_SECURITY_PROTOCOL` → `security.protocol` |
//! | `RABBITMQ_ENABLED` | enables RabbitMQ (default: enabled iff `RABBITMQ_URL` is set) |
//! | `RABBITMQ_URL` | `amqp://user:password@host:5672/vhost` or `amqps://...`; for a cluster, a comma-separated list of node URLs with the same credentials and vhost |
//! | `RABBITMQ_REQUIRED_GROUPS` | `topic=group,group;topic=group`: groups whose queues publishers declare ([`RequiredGroups`]) |
//! | `RABBITMQ_QUEUE_EXPIRY_MS` | queues RabbitMQ deletes after this long without consumers (default: never) |
//! | `RABBITMQ_ALTERNATE_EXCHANGE` | exchange for messages no queue is bound for (default: none) |
//! | `RABBITMQ_NODE_ORDER` | `in-order` (default) or `shuffle`: the order a node list's nodes are tried ([`NodeOrder`]) |
//! | `BROKER_ROUTE_<MODULE>` | `kafka`, `rabbitmq`, `memory` or `kafka+rabbitmq` |
//!
//! Credentials never appear in `Debug` or `Display` output of these types.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

mod amqp_url;
mod kafka;
mod rabbitmq;
mod route;
mod secret_url;
#[cfg(test)]
mod tests;

pub use amqp_url::{AmqpUrl, UrlError};
use kafka::redact_value;
pub use kafka::{is_sensitive_key, KafkaSettings};
pub use rabbitmq::{NodeOrder, ParseRequiredGroupsError, RabbitMqSettings, RequiredGroups};
pub use route::{BrokerKind, ParseRouteError, Route};
pub use secret_url::SecretUrl;

const KAFKA_ENABLED: &str = "KAFKA_ENABLED";
const KAFKA_BROKERS: &str = "KAFKA_BROKERS";
const KAFKA_CLIENT_ID: &str = "KAFKA_CLIENT_ID";
const KAFKA_PREFIX: &str = "KAFKA_";
/// `KAFKA_*` variables that are not librdkafka settings: the JVM variables
/// Kafka's own images set, and this project's test switch.
const KAFKA_NOT_SETTINGS: &[&str] = &[
    "KAFKA_OPTS",
    "KAFKA_HEAP_OPTS",
    "KAFKA_JVM_PERFORMANCE_OPTS",
    "KAFKA_LOG4J_OPTS",
    "KAFKA_JMX_OPTS",
    "KAFKA_HOME",
    "KAFKA_VERSION",
    "KAFKA_REAL",
];
const RABBITMQ_ENABLED: &str = "RABBITMQ_ENABLED";
const RABBITMQ_URL: &str = "RABBITMQ_URL";
const ROUTE_PREFIX: &str = "BROKER_ROUTE_";
const DEFAULT_CLIENT_ID: &str = "broker-client";
const REDACTED: &str = "[REDACTED]";
const EXPECTED_ROUTES: &str = "kafka, rabbitmq, memory, kafka+rabbitmq or rabbitmq+kafka";

/// A configuration mistake found at startup, naming the variable to fix
/// ([`ConfigError::var`]). Messages never contain credentials.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A flag that is not a boolean.
    #[error("{var}={value} is not a boolean; expected true/false, 1/0, yes/no or on/off")]
    InvalidBool {
        /// The variable.
        var: String,
        /// Its value.
        value: String,
    },
    /// A required variable is unset or empty.
    #[error("{var} is missing: {reason}")]
    Missing {
        /// The variable.
        var: String,
        /// Why it is required.
        reason: String,
    },
    /// A variable has a malformed value.
    #[error("{var} is invalid: {reason}")]
    Invalid {
        /// The variable.
        var: String,
        /// What is wrong (credentials redacted).
        reason: String,
    },
    /// A `BROKER_ROUTE_<MODULE>` value that is not a route.
    #[error("{var}={value} is not a broker route; expected {EXPECTED_ROUTES}")]
    UnknownRoute {
        /// The variable.
        var: String,
        /// Its value.
        value: String,
    },
    /// A route to a broker that is not enabled.
    #[error("{var} routes to {}, but {} is disabled ({})", .broker.name(), .broker.name(), .broker.enable_hint())]
    RouteToDisabled {
        /// The route variable, `BROKER_ROUTE_<MODULE>`.
        var: String,
        /// The disabled broker.
        broker: BrokerKind,
    },
}

impl ConfigError {
    /// The variable to fix.
    pub fn var(&self) -> &str {
        match self {
            ConfigError::InvalidBool { var, .. }
            | ConfigError::Missing { var, .. }
            | ConfigError::Invalid { var, .. }
            | ConfigError::UnknownRoute { var, .. }
            | ConfigError::RouteToDisabled { var, .. } => var,
        }
    }
}

/// The enabled brokers and the route of each module.
///
/// Invariant when built by this module: every route names only enabled
/// brokers (or memory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    /// Kafka settings; `Some` iff Kafka is enabled.
    pub kafka: Option<KafkaSettings>,
    /// RabbitMQ settings; `Some` iff RabbitMQ is enabled.
    pub rabbitmq: Option<RabbitMqSettings>,
    /// Explicit routes by lowercased module name.
    routes: BTreeMap<String, Route>,
}

impl BrokerConfig {
    /// No broker enabled: every module uses the in-memory broker.
    pub fn memory() -> Self {
        BrokerConfig {
            kafka: None,
            rabbitmq: None,
            routes: BTreeMap::new(),
        }
    }

    /// Starts a configuration in code; [`BrokerConfigBuilder::build`]
    /// applies the same checks as [`BrokerConfig::from_vars`].
    pub fn builder() -> BrokerConfigBuilder {
        BrokerConfigBuilder::default()
    }

    /// Reads the process environment (see [`BrokerConfig::from_vars`]).
    ///
    /// # Errors
    ///
    /// As [`BrokerConfig::from_vars`], plus [`ConfigError::Invalid`] for one
    /// of our variables whose value is not UTF-8.
    pub fn from_env() -> Result<Self, ConfigError> {
        let mut vars = Vec::new();
        // `env::vars` panics on any non-UTF-8 variable; only ours must be UTF-8.
        for (key, value) in std::env::vars_os() {
            let Some(key) = key.to_str().filter(|k| is_ours(k)) else {
                continue;
            };
            let value = value.into_string().map_err(|_| ConfigError::Invalid {
                var: key.to_owned(),
                reason: "not valid UTF-8".to_owned(),
            })?;
            vars.push((key.to_owned(), value));
        }
        Self::from_vars(vars)
    }

    /// Reads the configuration from `(name, value)` pairs; unrelated names
    /// are ignored and empty values count as unset.
    ///
    /// - Kafka is enabled only by `KAFKA_ENABLED=true`: `KAFKA_BROKERS` alone
    ///   does not enable it. Every other `KAFKA_<NAME>` becomes the librdkafka
    ///   property `<name>` lowercased with `_` → `.`.
    /// - RabbitMQ is enabled by `RABBITMQ_ENABLED`, or, when that is unset,
    ///   by a non-empty `RABBITMQ_URL`.
    /// - `BROKER_ROUTE_<MODULE>` routes module `<module>` (lowercased).
    ///
    /// Booleans accept true/false, 1/0, yes/no, on/off in any case.
    ///
    /// # Errors
    ///
    /// The first mistake found, naming its variable: a bad boolean, a
    /// missing `KAFKA_BROKERS`/`RABBITMQ_URL`, a malformed broker list or URL,
    /// an unknown route, or a route to a disabled broker.
    ///
    /// ```
    /// use broker_core::config::{BrokerConfig, BrokerKind, ConfigError, Route};
    ///
    /// let config = BrokerConfig::from_vars([
    ///     ("KAFKA_ENABLED", "true"),
    ///     ("KAFKA_BROKERS", "kafka-1:9092,kafka-2:9092"),
    ///     ("KAFKA_SASL_PASSWORD", "hunter2"),
    ///     ("RABBITMQ_URL", "amqp://app:s3cret@rabbit:5672/%2f"),
    ///     ("BROKER_ROUTE_BILLING", "rabbitmq"),
    /// ])?;
    /// assert_eq!(config.route("billing"), Route::Single(BrokerKind::RabbitMq));
    /// // No explicit route: Kafka wins when both brokers are enabled.
    /// assert_eq!(config.route("search"), Route::Single(BrokerKind::Kafka));
    /// let printed = config.to_string();
    /// assert!(!printed.contains("hunter2") && !printed.contains("s3cret"));
    ///
    /// let err = BrokerConfig::from_vars([("BROKER_ROUTE_BILLING", "kafka")]).unwrap_err();
    /// assert_eq!(err.var(), "BROKER_ROUTE_BILLING");
    /// # Ok::<(), ConfigError>(())
    /// ```
    pub fn from_vars<I, K, V>(vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let vars: BTreeMap<String, String> = vars
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .filter(|(_, v)| !v.trim().is_empty())
            .collect();
        let get = |var: &str| vars.get(var).map(|v| v.trim());
        let flag = |var: &str| get(var).map(|v| parse_bool(var, v)).transpose();

        let mut builder = BrokerConfig::builder();
        if flag(KAFKA_ENABLED)? == Some(true) {
            let brokers = get(KAFKA_BROKERS).ok_or_else(|| ConfigError::Missing {
                var: KAFKA_BROKERS.to_owned(),
                reason: "required when KAFKA_ENABLED=true (e.g. kafka-1:9092,kafka-2:9092)"
                    .to_owned(),
            })?;
            let mut kafka = KafkaSettings::new(brokers);
            if let Some(id) = get(KAFKA_CLIENT_ID) {
                kafka = kafka.client_id(id);
            }
            for (var, value) in &vars {
                let Some(name) = var.strip_prefix(KAFKA_PREFIX) else {
                    continue;
                };
                if [KAFKA_ENABLED, KAFKA_BROKERS, KAFKA_CLIENT_ID].contains(&var.as_str())
                    || KAFKA_NOT_SETTINGS.contains(&var.as_str())
                {
                    continue;
                }
                if name.is_empty() {
                    return Err(invalid(var, "no librdkafka setting name after KAFKA_"));
                }
                let key = name.to_ascii_lowercase().replace('_', ".");
                kafka.properties.insert(key, value.clone());
            }
            builder = builder.kafka(kafka);
        }

        let url = get(RABBITMQ_URL);
        if flag(RABBITMQ_ENABLED)?.unwrap_or(url.is_some()) {
            let url = url.ok_or_else(|| ConfigError::Missing {
                var: RABBITMQ_URL.to_owned(),
                reason: "required when RABBITMQ_ENABLED=true (e.g. amqp://user:password@host:5672/vhost)"
                    .to_owned(),
            })?;
            builder = builder.rabbitmq(RabbitMqSettings::from_vars(url, get)?);
        }

        for (var, value) in &vars {
            let Some(module) = var.strip_prefix(ROUTE_PREFIX) else {
                continue;
            };
            let route = value.parse().map_err(|_| ConfigError::UnknownRoute {
                var: var.clone(),
                value: value.trim().to_owned(),
            })?;
            builder = builder.route(module, route);
        }
        builder.build()
    }

    /// The route of `module` (case-insensitive): its `BROKER_ROUTE_<MODULE>`
    /// if set, else [`BrokerConfig::default_route`].
    pub fn route(&self, module: &str) -> Route {
        self.routes
            .get(&module.to_lowercase())
            .copied()
            .unwrap_or_else(|| self.default_route())
    }

    /// The route of modules without an explicit one: Kafka if enabled (so
    /// Kafka wins when both are), else RabbitMQ if enabled, else memory.
    pub fn default_route(&self) -> Route {
        Route::Single(if self.kafka.is_some() {
            BrokerKind::Kafka
        } else if self.rabbitmq.is_some() {
            BrokerKind::RabbitMq
        } else {
            BrokerKind::Memory
        })
    }

    /// The explicit routes, by lowercased module name.
    pub fn routes(&self) -> impl Iterator<Item = (&str, &Route)> {
        self.routes
            .iter()
            .map(|(module, route)| (module.as_str(), route))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(kafka) = &self.kafka {
            check_brokers(&kafka.brokers).map_err(|reason| invalid(KAFKA_BROKERS, &reason))?;
        }
        if let Some(rabbitmq) = &self.rabbitmq {
            rabbitmq.validate()?;
            let url = rabbitmq.url();
            if let Err(e) = url.amqp_nodes() {
                let reason = format!(
                    "`{url}` is not a URL of the form amqp://user:password@host:port/vhost \
                     (or amqps://), nor a comma-separated list of them: {e}"
                );
                return Err(invalid(RABBITMQ_URL, &reason));
            }
        }
        for (module, route) in &self.routes {
            let var = format!("{ROUTE_PREFIX}{}", module.to_uppercase());
            if module.is_empty() {
                return Err(invalid(
                    &var,
                    "the module name after BROKER_ROUTE_ is empty",
                ));
            }
            let enabled = |kind| match kind {
                BrokerKind::Kafka => self.kafka.is_some(),
                BrokerKind::RabbitMq => self.rabbitmq.is_some(),
                BrokerKind::Memory => true,
            };
            if let Some(broker) = route.brokers().into_iter().find(|&kind| !enabled(kind)) {
                return Err(ConfigError::RouteToDisabled { var, broker });
            }
        }
        Ok(())
    }
}

/// One line per broker and per route, credentials redacted; for startup logs.
impl fmt::Display for BrokerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kafka {
            Some(kafka) => {
                write!(
                    f,
                    "kafka: enabled, brokers={}, client_id={}",
                    kafka.brokers, kafka.client_id
                )?;
                for (key, value) in &kafka.properties {
                    write!(f, ", {key}={}", redact_value(key, value))?;
                }
                writeln!(f)?;
            }
            None => writeln!(f, "kafka: disabled")?,
        }
        match &self.rabbitmq {
            Some(rabbitmq) => writeln!(
                f,
                "rabbitmq: enabled, url={}{}",
                rabbitmq.url(),
                rabbitmq.extras()
            )?,
            None => writeln!(f, "rabbitmq: disabled")?,
        }
        write!(f, "default route: {}", self.default_route())?;
        for (module, route) in &self.routes {
            write!(f, "\nroute {module}: {route}")?;
        }
        Ok(())
    }
}

/// Builds a [`BrokerConfig`] in code. Brokers not given are disabled.
#[derive(Debug, Clone, Default)]
pub struct BrokerConfigBuilder {
    kafka: Option<KafkaSettings>,
    rabbitmq: Option<RabbitMqSettings>,
    routes: BTreeMap<String, Route>,
}

impl BrokerConfigBuilder {
    /// Enables Kafka.
    pub fn kafka(mut self, settings: KafkaSettings) -> Self {
        self.kafka = Some(settings);
        self
    }

    /// Enables RabbitMQ.
    pub fn rabbitmq(mut self, settings: RabbitMqSettings) -> Self {
        self.rabbitmq = Some(settings);
        self
    }

    /// Routes `module` (case-insensitive); a later route for the same
    /// module replaces the earlier one.
    pub fn route(mut self, module: impl AsRef<str>, route: Route) -> Self {
        self.routes.insert(module.as_ref().to_lowercase(), route);
        self
    }

    /// Checks the configuration as [`BrokerConfig::from_vars`] does.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the equivalent variable: `KAFKA_BROKERS` for a
    /// malformed broker list, `RABBITMQ_URL` for a non-AMQP URL,
    /// `BROKER_ROUTE_<MODULE>` for a route to a disabled broker.
    pub fn build(self) -> Result<BrokerConfig, ConfigError> {
        let config = BrokerConfig {
            kafka: self.kafka,
            rabbitmq: self.rabbitmq,
            routes: self.routes,
        };
        config.validate()?;
        Ok(config)
    }
}

fn is_ours(var: &str) -> bool {
    [KAFKA_PREFIX, "RABBITMQ_", ROUTE_PREFIX]
        .iter()
        .any(|prefix| var.starts_with(prefix))
}

fn invalid(var: &str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        var: var.to_owned(),
        reason: reason.to_owned(),
    }
}

fn parse_bool(var: &str, value: &str) -> Result<bool, ConfigError> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::InvalidBool {
            var: var.to_owned(),
            value: value.to_owned(),
        }),
    }
}

/// `Err(reason)` unless `list` is `host:port[,host:port...]` with numeric ports.
fn check_brokers(list: &str) -> Result<(), String> {
    for entry in list.split(',').map(str::trim) {
        let valid = entry.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && port.parse::<u16>().is_ok()
        });
        if !valid {
            return Err(format!(
                "`{entry}` is not host:port; expected a comma-separated list like kafka-1:9092,kafka-2:9092"
            ));
        }
    }
    Ok(())
}
