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
//! | `RABBITMQ_URL` | `amqp://user:password@host:5672/vhost` or `amqps://...` |
//! | `RABBITMQ_REQUIRED_GROUPS` | `topic=group,group;topic=group`: groups whose queues publishers declare ([`RequiredGroups`]) |
//! | `RABBITMQ_QUEUE_EXPIRY_MS` | queues RabbitMQ deletes after this long without consumers (default: never) |
//! | `RABBITMQ_ALTERNATE_EXCHANGE` | exchange for messages no queue is bound for (default: none) |
//! | `BROKER_ROUTE_<MODULE>` | `kafka`, `rabbitmq`, `memory` or `kafka+rabbitmq` |
//!
//! Credentials never appear in `Debug` or `Display` output of these types.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

mod amqp_url;
mod rabbitmq;

pub use amqp_url::{AmqpUrl, UrlError};
pub use rabbitmq::{ParseRequiredGroupsError, RabbitMqSettings, RequiredGroups};

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

/// A broker backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BrokerKind {
    /// Apache Kafka.
    Kafka,
    /// RabbitMQ.
    RabbitMq,
    /// The embedded in-memory broker (always available).
    Memory,
}

impl BrokerKind {
    fn name(self) -> &'static str {
        match self {
            BrokerKind::Kafka => "Kafka",
            BrokerKind::RabbitMq => "RabbitMQ",
            BrokerKind::Memory => "memory",
        }
    }

    fn enable_hint(self) -> &'static str {
        match self {
            BrokerKind::Kafka => "set KAFKA_ENABLED=true and KAFKA_BROKERS",
            BrokerKind::RabbitMq => "set RABBITMQ_URL",
            BrokerKind::Memory => "the memory broker is always enabled",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "kafka" => Some(BrokerKind::Kafka),
            "rabbitmq" | "rabbit" => Some(BrokerKind::RabbitMq),
            "memory" => Some(BrokerKind::Memory),
            _ => None,
        }
    }
}

impl fmt::Display for BrokerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BrokerKind::Kafka => "kafka",
            BrokerKind::RabbitMq => "rabbitmq",
            BrokerKind::Memory => "memory",
        })
    }
}

/// The broker(s) a module publishes to and consumes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// One broker.
    Single(BrokerKind),
    /// Two different real brokers (e.g. while migrating from one to the
    /// other); `primary` is the one named first.
    Dual {
        /// The broker named first.
        primary: BrokerKind,
        /// The broker named second.
        secondary: BrokerKind,
    },
}

impl Route {
    /// The single broker, or the primary of a dual route.
    pub fn primary(&self) -> BrokerKind {
        match *self {
            Route::Single(kind) | Route::Dual { primary: kind, .. } => kind,
        }
    }

    /// Every broker of the route, primary first.
    pub fn brokers(&self) -> Vec<BrokerKind> {
        match *self {
            Route::Single(kind) => vec![kind],
            Route::Dual { primary, secondary } => vec![primary, secondary],
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Route::Single(kind) => write!(f, "{kind}"),
            Route::Dual { primary, secondary } => write!(f, "{primary}+{secondary}"),
        }
    }
}

/// A string that is not a [`Route`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a broker route; expected {EXPECTED_ROUTES}")]
pub struct ParseRouteError(String);

impl FromStr for Route {
    type Err = ParseRouteError;

    /// Parses `kafka`, `rabbitmq` (or `rabbit`), `memory`, or two different
    /// real brokers joined by `+`; case-insensitive, surrounding spaces ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseRouteError(s.trim().to_owned());
        match s.split_once('+') {
            None => BrokerKind::parse(s).map(Route::Single).ok_or_else(err),
            Some((a, b)) => match (BrokerKind::parse(a), BrokerKind::parse(b)) {
                (Some(primary), Some(secondary))
                    if primary != secondary
                        && ![primary, secondary].contains(&BrokerKind::Memory) =>
                {
                    Ok(Route::Dual { primary, secondary })
                }
                _ => Err(err()),
            },
        }
    }
}

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

fn redact_value<'a>(key: &str, value: &'a str) -> &'a str {
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

/// A URL that may carry a password (`amqp://user:password@host:5672/vhost`).
///
/// `Debug` and `Display` print [`SecretUrl::redacted`]; only
/// [`SecretUrl::expose`] returns the password. A `/`, `?`, `#` or `%` in
/// the user name or password must be percent-encoded (as URLs require);
/// a URL that does not split cleanly into its parts is not shown at all.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps a URL; nothing is checked ([`SecretUrl::amqp`] checks).
    pub fn new(url: impl Into<String>) -> Self {
        SecretUrl(url.into())
    }

    /// The real URL, password included: only for handing to a client
    /// library, never for logs.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with the password replaced by `***`
    /// (`amqp://user:***@host:5672/vhost`), query parameters other than
    /// the AMQP client's (`heartbeat`, `frame_max`, `channel_max`,
    /// `connection_timeout`, `auth_mechanism`) shown as `***`, and a
    /// fragment as `#***`. A URL that does not split cleanly into scheme,
    /// user, password, host, port and path (a missing `:` or `/`, an
    /// unencoded `/` in the password, ...) is shown as
    /// `[malformed URL, redacted]`: any part of it could be the password.
    ///
    /// ```
    /// use broker_core::config::SecretUrl;
    /// assert_eq!(SecretUrl::new("amqp://app:s3cret@rabbit/%2f").redacted(), "amqp://app:***@rabbit/%2f");
    /// assert_eq!(SecretUrl::new("amqp//app:s3cret@rabbit/%2f").redacted(), "[malformed URL, redacted]");
    /// ```
    pub fn redacted(&self) -> String {
        amqp_url::redact(&self.0)
    }

    /// Reads an `amqp://` or `amqps://` URL strictly into its parts
    /// (`scheme://[user[:password]@]host[:port][/vhost][?query]`), refusing
    /// anything a client library could read another way: no `://`, a host
    /// that is not a host name, a port that is not a number, an `@` after
    /// the host, a bad percent-escape, spaces. The error never quotes the
    /// URL.
    ///
    /// ```
    /// use broker_core::config::SecretUrl;
    /// let url = SecretUrl::new("amqp://app:s3cret@rabbit:5673/prod").amqp().unwrap();
    /// assert_eq!((url.host.as_str(), url.port, url.vhost.as_deref()), ("rabbit", Some(5673), Some("prod")));
    /// assert_eq!(url.address(), "rabbit:5673/prod");
    /// assert!(SecretUrl::new("amqp:/app:s3cret@rabbit/").amqp().is_err());
    /// ```
    pub fn amqp(&self) -> Result<AmqpUrl, UrlError> {
        amqp_url::parse_amqp(&self.0)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SecretUrl").field(&self.redacted()).finish()
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

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
            if let Err(e) = url.amqp() {
                let reason = format!(
                    "`{url}` is not a URL of the form amqp://user:password@host:port/vhost \
                     (or amqps://): {e}"
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

#[cfg(test)]
mod tests {
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
                BrokerConfig::from_vars([("KAFKA_ENABLED", value), ("KAFKA_BROKERS", "k:1")])
                    .unwrap();
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
}
