//! From configuration to brokers: connects the brokers a [`BrokerConfig`]
//! enables, and gives each module the publisher and subscriber of its route.

use std::sync::Arc;

use broker_core::config::{BrokerConfig, BrokerKind, Route};
use broker_core::instrument::Instrumented;
use broker_core::migrate::{DualPublisher, SecondaryPolicy};
use std::future::Future;

use broker_core::{
    typed, BrokerError, ConsumerBuilder, ConsumerHandle, Event, HandlerError, MemoryBroker,
    Publisher, Received, Result, Subscriber,
};
use broker_kafka::KafkaBroker;
use broker_rabbitmq::RabbitMqBroker;

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
    kafka: Option<KafkaBroker>,
    rabbitmq: Option<RabbitMqBroker>,
    dual_policy: SecondaryPolicy,
}

impl std::fmt::Debug for Brokers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // BrokerConfig's Debug redacts credentials.
        f.debug_struct("Brokers")
            .field("config", &self.config)
            .field("dual_policy", &self.dual_policy)
            .finish_non_exhaustive()
    }
}

impl Brokers {
    /// Connects every broker `config` enables (each retries per its reconnect
    /// policy, then fails with [`BrokerError::Unavailable`]). The in-memory
    /// broker is always there for modules routed to `memory`.
    pub async fn connect(config: BrokerConfig) -> Result<Brokers> {
        let kafka = match &config.kafka {
            Some(settings) => Some(KafkaBroker::connect(settings.clone()).await?),
            None => None,
        };
        let rabbitmq = match &config.rabbitmq {
            Some(settings) => Some(RabbitMqBroker::connect(settings).await?),
            None => None,
        };
        Ok(Brokers {
            config,
            memory: MemoryBroker::new(),
            kafka,
            rabbitmq,
            dual_policy: SecondaryPolicy::BestEffort,
        })
    }

    /// Reads the configuration from the environment and connects
    /// (see [`BrokerConfig::from_env`]); `BROKER_DUAL_SECONDARY=required`
    /// makes dual routes fail a publish the secondary did not take.
    pub async fn from_env() -> Result<Brokers> {
        let config = BrokerConfig::from_env()?;
        let policy = dual_policy_from_env()?;
        Ok(Brokers::connect(config).await?.with_dual_policy(policy))
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

    /// The in-memory broker (shared by every module routed to `memory`).
    pub fn memory(&self) -> &MemoryBroker {
        &self.memory
    }

    /// The Kafka broker, if enabled.
    pub fn kafka(&self) -> Option<&KafkaBroker> {
        self.kafka.as_ref()
    }

    /// The RabbitMQ broker, if enabled.
    pub fn rabbitmq(&self) -> Option<&RabbitMqBroker> {
        self.rabbitmq.as_ref()
    }

    /// One broker as publisher and subscriber.
    pub fn broker(&self, kind: BrokerKind) -> Result<(Arc<dyn Publisher>, Arc<dyn Subscriber>)> {
        // BrokerConfig guarantees routes name enabled brokers; a broker
        // missing here means a hand-made config, so say which.
        let disabled = |name| {
            BrokerError::Config(broker_core::config::ConfigError::Invalid {
                var: format!("{name}_ENABLED"),
                reason: format!("a route uses {name}, which is not enabled"),
            })
        };
        Ok(match kind {
            BrokerKind::Memory => (Arc::new(self.memory.clone()), Arc::new(self.memory.clone())),
            BrokerKind::Kafka => {
                let k = self.kafka.clone().ok_or_else(|| disabled("KAFKA"))?;
                (Arc::new(k.clone()), Arc::new(k))
            }
            BrokerKind::RabbitMq => {
                let r = self.rabbitmq.clone().ok_or_else(|| disabled("RABBITMQ"))?;
                (Arc::new(r.clone()), Arc::new(r))
            }
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
        if let Some(k) = &self.kafka {
            k.close().await?;
        }
        if let Some(r) = &self.rabbitmq {
            r.shutdown().await?;
        }
        self.memory.close().await
    }
}

/// `BROKER_DUAL_SECONDARY`: `best-effort` (default) or `required`.
pub fn dual_policy_from_env() -> Result<SecondaryPolicy> {
    match std::env::var("BROKER_DUAL_SECONDARY")
        .ok()
        .as_deref()
        .map(str::trim)
    {
        None | Some("") | Some("best-effort") => Ok(SecondaryPolicy::BestEffort),
        Some("required") => Ok(SecondaryPolicy::Required),
        Some(other) => Err(BrokerError::Config(
            broker_core::config::ConfigError::Invalid {
                var: "BROKER_DUAL_SECONDARY".into(),
                reason: format!("`{other}` is not `best-effort` or `required`"),
            },
        )),
    }
}
