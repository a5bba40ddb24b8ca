//! From configuration to connected brokers to per-module endpoints.
//!
//! [`Brokers`] connects what a [`BrokerConfig`] enables (each backend only
//! when its cargo feature is on) and gives each application module the
//! [`Endpoints`] of its route: publisher, subscriber and dead-letter
//! destination, dual routes included. [`BrokersBuilder`] adds the settings
//! around the configuration:
//!
//! | variable | builder | meaning |
//! |---|---|---|
//! | `BROKER_REQUIRE_REAL` | [`BrokersBuilder::require_real_broker`] | `true`: refuse to start when a module would run on the in-memory broker |
//! | `BROKER_DUAL_SECONDARY` | [`BrokersBuilder::dual_policy`] | dual routes: `best-effort` (default) or `required` |
//!
//! Every startup refusal is a [`BrokerError::Config`] whose
//! [`ConfigError::var`] names the variable to fix: a route to a backend this
//! build leaves out (naming the cargo feature to enable), `amqps://` or a
//! Kafka TLS protocol without a TLS feature, the production guard.
//! Broker variables that are set but have no effect (`KAFKA_BROKERS` without
//! `KAFKA_ENABLED=true`, `RABBITMQ_URL` with `RABBITMQ_ENABLED=false`) are
//! logged as warnings at startup ([`BrokersBuilder::warnings`]); values are
//! never logged.
//!
//! ```
//! use broker::config::{BrokerConfig, ConfigError};
//! use broker::{BrokerError, Brokers};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BrokerError> {
//! // Nothing enabled: every module runs on the in-memory broker...
//! let brokers = Brokers::connect(BrokerConfig::memory()).await?;
//! let billing = brokers.endpoints("billing")?;
//! assert_eq!(billing.route.to_string(), "memory");
//!
//! // ...which a production service refuses.
//! let err = Brokers::builder(BrokerConfig::memory())
//!     .require_real_broker(true)
//!     .connect()
//!     .await
//!     .unwrap_err();
//! assert!(matches!(&err, BrokerError::Config(e) if e.var() == "BROKER_REQUIRE_REAL"));
//! # Ok(()) }
//! ```

use std::future::Future;
use std::sync::Arc;

use broker_core::config::{BrokerConfig, BrokerKind, ConfigError, Route};
use broker_core::instrument::Instrumented;
use broker_core::migrate::{DualPublisher, SecondaryPolicy};
use broker_core::{
    typed, BrokerError, ConsumerBuilder, ConsumerHandle, Event, HandlerError, MemoryBroker,
    Publisher, Received, Result, Subscriber,
};
#[cfg(feature = "kafka")]
use broker_kafka::KafkaBroker;
#[cfg(feature = "rabbitmq")]
use broker_rabbitmq::RabbitMqBroker;

/// `BROKER_REQUIRE_REAL`: `true` refuses the in-memory broker.
pub const REQUIRE_REAL_VAR: &str = "BROKER_REQUIRE_REAL";
/// `BROKER_DUAL_SECONDARY`: `best-effort` or `required`.
pub const DUAL_SECONDARY_VAR: &str = "BROKER_DUAL_SECONDARY";

/// How a module reaches its broker(s).
#[derive(Clone)]
pub struct Endpoints {
    /// The module's route (`BROKER_ROUTE_<MODULE>` or the default).
    pub route: Route,
    /// Where the module publishes: its broker, or both brokers of a dual
    /// route. Adds a `traceparent` to messages that have none.
    pub publisher: Arc<dyn Publisher>,
    /// Where the module consumes: its broker, or the primary of a dual route.
    pub subscriber: Arc<dyn Subscriber>,
    /// Where the module's consumers put dead letters: the broker they
    /// consume from, so a dead letter sits next to its original.
    pub dead_letters: Arc<dyn Publisher>,
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoints")
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

impl Endpoints {
    /// A consumer of `topic` in `group` on this route, with dead letters on
    /// the broker it consumes from.
    pub fn consumer(&self, topic: &str, group: &str) -> ConsumerBuilder {
        broker_core::Consumer::from_parts(
            self.subscriber.clone(),
            self.dead_letters.clone(),
            topic,
            group,
        )
    }

    /// Starts a consumer of typed events `E` on `topic` in `group`:
    /// `handle` gets each decoded, validated event; undecodable or invalid
    /// payloads go to the dead-letter topic without reaching it.
    pub async fn start_typed<E, F, Fut>(
        &self,
        topic: &str,
        group: &str,
        concurrency: usize,
        handle: F,
    ) -> Result<ConsumerHandle>
    where
        E: Event,
        F: Fn(E, Received) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.consumer(topic, group)
            .concurrency(concurrency)
            .handler(typed(handle))
            .start()
            .await
    }
}

/// The connected brokers of one application.
#[derive(Clone)]
pub struct Brokers {
    config: BrokerConfig,
    memory: MemoryBroker,
    #[cfg(feature = "kafka")]
    kafka: Option<KafkaBroker>,
    #[cfg(feature = "rabbitmq")]
    rabbitmq: Option<RabbitMqBroker>,
    dual_policy: SecondaryPolicy,
    require_real: bool,
}

impl std::fmt::Debug for Brokers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // BrokerConfig's Debug redacts credentials.
        f.debug_struct("Brokers")
            .field("config", &self.config)
            .field("dual_policy", &self.dual_policy)
            .field("require_real", &self.require_real)
            .finish_non_exhaustive()
    }
}

impl Brokers {
    /// Connects every broker `config` enables (each retries per its reconnect
    /// policy, then fails with [`BrokerError::Unavailable`]). The in-memory
    /// broker is always there for modules routed to `memory`.
    ///
    /// # Errors
    ///
    /// As [`BrokersBuilder::connect`].
    pub async fn connect(config: BrokerConfig) -> Result<Brokers> {
        BrokersBuilder::new(config).connect().await
    }

    /// Reads the configuration and the settings of [`BrokersBuilder`] from
    /// the environment, logs what has no effect, and connects (see
    /// [`BrokersBuilder::from_env`]).
    pub async fn from_env() -> Result<Brokers> {
        BrokersBuilder::from_env()?.connect().await
    }

    /// Starts from `config`, with the guard off and best-effort dual routes.
    pub fn builder(config: BrokerConfig) -> BrokersBuilder {
        BrokersBuilder::new(config)
    }

    /// What the secondary broker of a dual route must do (default best effort).
    pub fn with_dual_policy(mut self, policy: SecondaryPolicy) -> Self {
        self.dual_policy = policy;
        self
    }

    /// The configuration the brokers were connected from.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// Whether modules are refused the in-memory broker
    /// ([`BrokersBuilder::require_real_broker`]).
    pub fn requires_real_broker(&self) -> bool {
        self.require_real
    }

    /// The in-memory broker (shared by every module routed to `memory`).
    pub fn memory(&self) -> &MemoryBroker {
        &self.memory
    }

    /// The Kafka broker, if enabled.
    #[cfg(feature = "kafka")]
    pub fn kafka(&self) -> Option<&KafkaBroker> {
        self.kafka.as_ref()
    }

    /// The RabbitMQ broker, if enabled.
    #[cfg(feature = "rabbitmq")]
    pub fn rabbitmq(&self) -> Option<&RabbitMqBroker> {
        self.rabbitmq.as_ref()
    }

    /// One broker as publisher and subscriber.
    ///
    /// # Errors
    ///
    /// [`BrokerError::Config`] when `kind` is not enabled (naming its
    /// `*_ENABLED` variable), or is memory while the production guard is on.
    pub fn broker(&self, kind: BrokerKind) -> Result<(Arc<dyn Publisher>, Arc<dyn Subscriber>)> {
        // BrokerConfig guarantees routes name enabled brokers, and connect
        // checked the features; a broker missing here means a hand-made
        // route, so say which.
        #[allow(dead_code)] // unused when both backends are compiled out
        fn disabled(name: &str) -> BrokerError {
            BrokerError::Config(ConfigError::Invalid {
                var: format!("{name}_ENABLED"),
                reason: format!("a route uses {name}, which is not enabled"),
            })
        }
        Ok(match kind {
            BrokerKind::Memory => {
                if self.require_real {
                    return Err(invalid(
                        REQUIRE_REAL_VAR,
                        "a route uses the in-memory broker, which BROKER_REQUIRE_REAL=true refuses",
                    ));
                }
                (Arc::new(self.memory.clone()), Arc::new(self.memory.clone()))
            }
            #[cfg(feature = "kafka")]
            BrokerKind::Kafka => {
                let k = self.kafka.clone().ok_or_else(|| disabled("KAFKA"))?;
                (Arc::new(k.clone()), Arc::new(k))
            }
            #[cfg(feature = "rabbitmq")]
            BrokerKind::RabbitMq => {
                let r = self.rabbitmq.clone().ok_or_else(|| disabled("RABBITMQ"))?;
                (Arc::new(r.clone()), Arc::new(r))
            }
            #[allow(unreachable_patterns)] // reachable when a backend is compiled out
            other => return Err(missing_feature_error(other, backend_var(other))),
        })
    }

    /// The endpoints of `module` per its route.
    pub fn endpoints(&self, module: &str) -> Result<Endpoints> {
        let route = self.config.route(module);
        self.endpoints_for(route)
    }

    /// The endpoints of an explicit route (migration tools switch routes
    /// at run time with this).
    pub fn endpoints_for(&self, route: Route) -> Result<Endpoints> {
        let (primary, subscriber) = self.broker(route.primary())?;
        let publisher: Arc<dyn Publisher> = match route {
            Route::Single(_) => Arc::new(Instrumented::new(primary.clone())),
            Route::Dual { secondary, .. } => {
                let (secondary, _) = self.broker(secondary)?;
                Arc::new(Instrumented::new(DualPublisher::new(
                    primary.clone(),
                    secondary,
                    self.dual_policy,
                )))
            }
        };
        Ok(Endpoints {
            route,
            publisher,
            subscriber,
            dead_letters: primary,
        })
    }

    /// Closes every broker's publishing side (flushing what is queued).
    pub async fn close(&self) -> Result<()> {
        #[cfg(feature = "kafka")]
        if let Some(k) = &self.kafka {
            k.close().await?;
        }
        #[cfg(feature = "rabbitmq")]
        if let Some(r) = &self.rabbitmq {
            r.close().await?;
        }
        self.memory.close().await
    }
}

/// Settings around a [`BrokerConfig`]: the production guard and the dual
/// route policy. [`BrokersBuilder::connect`] checks everything it can before
/// opening a connection.
///
/// ```
/// use broker::config::{BrokerConfig, KafkaSettings};
/// use broker::{BrokerError, BrokersBuilder};
///
/// // KAFKA_BROKERS alone does not enable Kafka: a warning, and with the
/// // guard on, a refusal that says why.
/// let builder = BrokersBuilder::from_vars([
///     ("KAFKA_BROKERS", "kafka-1:9092"),
///     ("BROKER_REQUIRE_REAL", "true"),
/// ])?;
/// assert!(builder.warnings()[0].contains("KAFKA_ENABLED"));
/// let err = builder.check().unwrap_err();
/// assert!(matches!(&err, BrokerError::Config(e) if e.var() == "BROKER_REQUIRE_REAL"));
///
/// // The same from code.
/// let config = BrokerConfig::builder().kafka(KafkaSettings::new("kafka-1:9092")).build()?;
/// # #[cfg(feature = "kafka")]
/// BrokersBuilder::new(config).require_real_broker(true).check()?;
/// # Ok::<(), BrokerError>(())
/// ```
#[derive(Debug, Clone)]
pub struct BrokersBuilder {
    config: BrokerConfig,
    dual_policy: SecondaryPolicy,
    require_real: bool,
    warnings: Vec<String>,
}

impl BrokersBuilder {
    /// Starts from `config`: guard off, best-effort dual routes, no warnings.
    pub fn new(config: BrokerConfig) -> Self {
        BrokersBuilder {
            config,
            dual_policy: SecondaryPolicy::BestEffort,
            require_real: false,
            warnings: Vec::new(),
        }
    }

    /// Reads the process environment (see [`BrokersBuilder::from_vars`])
    /// and logs each warning at `WARN` (variable names only, never values).
    ///
    /// # Errors
    ///
    /// As [`BrokersBuilder::from_vars`], plus [`ConfigError::Invalid`] for
    /// one of the library's variables whose value is not UTF-8.
    pub fn from_env() -> Result<Self> {
        let mut vars = Vec::new();
        for (key, value) in std::env::vars_os() {
            let Some(key) = key.to_str().filter(|k| is_ours(k)) else {
                continue;
            };
            let value = value
                .into_string()
                .map_err(|_| invalid(key, "not valid UTF-8"))?;
            vars.push((key.to_owned(), value));
        }
        let builder = Self::from_vars(vars)?;
        for warning in &builder.warnings {
            tracing::warn!("{warning}");
        }
        Ok(builder)
    }

    /// Reads the configuration ([`BrokerConfig::from_vars`]),
    /// `BROKER_REQUIRE_REAL` and `BROKER_DUAL_SECONDARY` from `(name, value)`
    /// pairs, and notes broker variables that have no effect
    /// ([`BrokersBuilder::warnings`]).
    ///
    /// # Errors
    ///
    /// [`BrokerError::Config`] naming the variable: any error of
    /// [`BrokerConfig::from_vars`], a `BROKER_REQUIRE_REAL` that is not a
    /// boolean, a `BROKER_DUAL_SECONDARY` that is not a policy.
    pub fn from_vars<I, K, V>(vars: I) -> Result<Self>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let vars: Vec<(String, String)> = vars
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        let get = |name: &str| {
            vars.iter()
                .rev()
                .find(|(k, v)| k == name && !v.trim().is_empty())
                .map(|(_, v)| v.trim())
        };
        let config = BrokerConfig::from_vars(vars.iter().cloned())?;
        let require_real = match get(REQUIRE_REAL_VAR) {
            None => false,
            Some(value) => parse_bool(REQUIRE_REAL_VAR, value)?,
        };
        let dual_policy = parse_dual_policy(get(DUAL_SECONDARY_VAR))?;
        let warnings = ignored_vars(&config, &get);
        Ok(BrokersBuilder {
            config,
            dual_policy,
            require_real,
            warnings,
        })
    }

    /// What the secondary broker of a dual route must do
    /// (`BROKER_DUAL_SECONDARY`; default best effort).
    pub fn dual_policy(mut self, policy: SecondaryPolicy) -> Self {
        self.dual_policy = policy;
        self
    }

    /// The production guard (`BROKER_REQUIRE_REAL`): when on, starting fails
    /// if no broker is enabled (modules without a route would fall back to
    /// the in-memory broker) or a `BROKER_ROUTE_<MODULE>` names `memory`, and
    /// [`Brokers::endpoints_for`] refuses memory routes.
    pub fn require_real_broker(mut self, on: bool) -> Self {
        self.require_real = on;
        self
    }

    /// The configuration to connect.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// Broker variables that are set but have no effect, one sentence each
    /// (names, never values): `KAFKA_BROKERS` without `KAFKA_ENABLED=true`,
    /// RabbitMQ variables while RabbitMQ is disabled. Only
    /// [`BrokersBuilder::from_vars`] and [`BrokersBuilder::from_env`] find
    /// them.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Everything [`BrokersBuilder::connect`] checks before connecting.
    ///
    /// # Errors
    ///
    /// [`BrokerError::Config`] naming the variable:
    /// - a broker this build leaves out (`KAFKA_ENABLED`, `RABBITMQ_URL`, or
    ///   the `BROKER_ROUTE_<MODULE>` that names it), with the cargo feature
    ///   of the `broker` crate to enable;
    /// - `RABBITMQ_URL=amqps://...` or `KAFKA_SECURITY_PROTOCOL=ssl|sasl_ssl`
    ///   without a TLS feature for that backend;
    /// - with the guard on: `BROKER_REQUIRE_REAL` when no broker is enabled,
    ///   or the `BROKER_ROUTE_<MODULE>` that names `memory`.
    pub fn check(&self) -> Result<()> {
        check_features(&self.config)?;
        if self.require_real {
            if self.config.default_route() == Route::Single(BrokerKind::Memory) {
                let mut reason = "no broker is enabled, so modules would run on the in-memory \
                                  broker; enable Kafka (KAFKA_ENABLED=true and KAFKA_BROKERS) \
                                  or RabbitMQ (RABBITMQ_URL)"
                    .to_owned();
                for warning in &self.warnings {
                    reason.push_str("; ");
                    reason.push_str(warning);
                }
                return Err(invalid(REQUIRE_REAL_VAR, &reason));
            }
            if let Some((module, _)) = self
                .config
                .routes()
                .find(|(_, route)| route.brokers().contains(&BrokerKind::Memory))
            {
                return Err(invalid(
                    &route_var(module),
                    "routes to the in-memory broker, which BROKER_REQUIRE_REAL=true refuses",
                ));
            }
        }
        Ok(())
    }

    /// Checks ([`BrokersBuilder::check`]), then connects every broker the
    /// configuration enables.
    ///
    /// # Errors
    ///
    /// What [`BrokersBuilder::check`] finds, before any connection; then the
    /// first broker that cannot be reached ([`BrokerError::Unavailable`]
    /// after its reconnect policy, [`BrokerError::Refused`] for a refused
    /// login).
    pub async fn connect(self) -> Result<Brokers> {
        self.check()?;
        let config = self.config;
        #[cfg(feature = "kafka")]
        let kafka = match &config.kafka {
            Some(settings) => Some(KafkaBroker::connect(settings.clone()).await?),
            None => None,
        };
        #[cfg(feature = "rabbitmq")]
        let rabbitmq = match &config.rabbitmq {
            Some(settings) => Some(RabbitMqBroker::builder_from(settings).connect().await?),
            None => None,
        };
        tracing::info!(default_route = %config.default_route(), "brokers connected");
        Ok(Brokers {
            config,
            memory: MemoryBroker::new(),
            #[cfg(feature = "kafka")]
            kafka,
            #[cfg(feature = "rabbitmq")]
            rabbitmq,
            dual_policy: self.dual_policy,
            require_real: self.require_real,
        })
    }
}

/// `BROKER_DUAL_SECONDARY` from the environment: `best-effort` (default) or
/// `required`.
///
/// # Errors
///
/// [`ConfigError::Invalid`] naming `BROKER_DUAL_SECONDARY` for another value.
pub fn dual_policy_from_env() -> Result<SecondaryPolicy> {
    parse_dual_policy(std::env::var(DUAL_SECONDARY_VAR).ok().as_deref())
}

fn parse_dual_policy(value: Option<&str>) -> Result<SecondaryPolicy> {
    match value.map(str::trim) {
        None | Some("") | Some("best-effort") => Ok(SecondaryPolicy::BestEffort),
        Some("required") => Ok(SecondaryPolicy::Required),
        Some(other) => Err(invalid(
            DUAL_SECONDARY_VAR,
            &format!("`{other}` is not `best-effort` or `required`"),
        )),
    }
}

fn parse_bool(var: &str, value: &str) -> Result<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(BrokerError::Config(ConfigError::InvalidBool {
            var: var.to_owned(),
            value: value.to_owned(),
        })),
    }
}

fn invalid(var: &str, reason: &str) -> BrokerError {
    BrokerError::Config(ConfigError::Invalid {
        var: var.to_owned(),
        reason: reason.to_owned(),
    })
}

fn is_ours(var: &str) -> bool {
    ["KAFKA_", "RABBITMQ_", "BROKER_"]
        .iter()
        .any(|prefix| var.starts_with(prefix))
}

fn route_var(module: &str) -> String {
    format!("BROKER_ROUTE_{}", module.to_uppercase())
}

/// The variable that enables `kind`.
fn backend_var(kind: BrokerKind) -> String {
    match kind {
        BrokerKind::Kafka => "KAFKA_ENABLED".to_owned(),
        BrokerKind::RabbitMq => "RABBITMQ_URL".to_owned(),
        BrokerKind::Memory => REQUIRE_REAL_VAR.to_owned(),
    }
}

fn missing_feature_error(kind: BrokerKind, var: String) -> BrokerError {
    let (name, feature) = match kind {
        BrokerKind::Kafka => ("Kafka", "kafka-tls` (or `kafka"),
        BrokerKind::RabbitMq => ("RabbitMQ", "rabbitmq-rustls` (or `rabbitmq"),
        BrokerKind::Memory => ("memory", "-"),
    };
    BrokerError::Config(ConfigError::Invalid {
        var,
        reason: format!(
            "{name} is configured, but this build of the `broker` crate has no {name} backend: \
             enable its cargo feature `{feature}`)"
        ),
    })
}

/// A configured backend or TLS this build cannot serve.
fn check_features(config: &BrokerConfig) -> Result<()> {
    // The variable to name: the first route that uses the backend, else the
    // one that enabled it.
    let var_for = |kind: BrokerKind| {
        config
            .routes()
            .find(|(_, route)| route.brokers().contains(&kind))
            .map(|(module, _)| route_var(module))
            .unwrap_or_else(|| backend_var(kind))
    };
    if config.kafka.is_some() && !cfg!(feature = "kafka") {
        return Err(missing_feature_error(
            BrokerKind::Kafka,
            var_for(BrokerKind::Kafka),
        ));
    }
    if config.rabbitmq.is_some() && !cfg!(feature = "rabbitmq") {
        return Err(missing_feature_error(
            BrokerKind::RabbitMq,
            var_for(BrokerKind::RabbitMq),
        ));
    }
    if let Some(kafka) = &config.kafka {
        let tls = kafka
            .properties
            .get("security.protocol")
            .is_some_and(|p| p.to_ascii_lowercase().contains("ssl"));
        if tls && !cfg!(any(feature = "kafka-tls", feature = "kafka-tls-vendored")) {
            return Err(invalid(
                "KAFKA_SECURITY_PROTOCOL",
                "TLS needs a Kafka TLS backend: enable cargo feature `kafka-tls` (system \
                 OpenSSL) or `kafka-tls-vendored` of the `broker` crate",
            ));
        }
    }
    if let Some(rabbitmq) = &config.rabbitmq {
        let url = rabbitmq.url().expose();
        let tls = url
            .get(..8)
            .is_some_and(|s| s.eq_ignore_ascii_case("amqps://"));
        if tls
            && !cfg!(any(
                feature = "rabbitmq-rustls",
                feature = "rabbitmq-rustls-ring",
                feature = "rabbitmq-native-tls"
            ))
        {
            return Err(invalid(
                "RABBITMQ_URL",
                "`amqps://` needs a TLS backend: enable cargo feature `rabbitmq-rustls`, \
                 `rabbitmq-rustls-ring` or `rabbitmq-native-tls` of the `broker` crate",
            ));
        }
    }
    Ok(())
}

/// Broker variables that are set but have no effect with `config`.
fn ignored_vars<'a>(config: &BrokerConfig, get: &impl Fn(&str) -> Option<&'a str>) -> Vec<String> {
    let mut warnings = Vec::new();
    if config.kafka.is_none() {
        let why = match get("KAFKA_ENABLED") {
            Some(_) => "KAFKA_ENABLED is false",
            None => "KAFKA_ENABLED is not set",
        };
        for var in ["KAFKA_BROKERS", "KAFKA_CLIENT_ID"] {
            if get(var).is_some() {
                warnings.push(format!(
                    "{var} is set but Kafka is disabled ({why}); set KAFKA_ENABLED=true to use Kafka"
                ));
            }
        }
    }
    if config.rabbitmq.is_none() {
        for var in [
            "RABBITMQ_URL",
            "RABBITMQ_REQUIRED_GROUPS",
            "RABBITMQ_QUEUE_EXPIRY_MS",
            "RABBITMQ_ALTERNATE_EXCHANGE",
            "RABBITMQ_QUEUE_TYPE",
        ] {
            if get(var).is_some() {
                let why = if get("RABBITMQ_ENABLED").is_some() {
                    "RABBITMQ_ENABLED is false"
                } else {
                    "RABBITMQ_URL is not set"
                };
                warnings.push(format!("{var} is set but RabbitMQ is disabled ({why})"));
            }
        }
    }
    warnings
}
