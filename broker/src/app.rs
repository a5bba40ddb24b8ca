//! The application runtime: declare the app's modules, register typed
//! consumers per module, start them all at once, serve one health view, and
//! shut everything down on SIGTERM or ctrl-c.
//!
//! ```
//! use std::time::Duration;
//! use broker::{App, Event, PublisherExt, Received};
//! # #[derive(broker::serde::Serialize, broker::serde::Deserialize)]
//! # #[serde(crate = "broker::serde")]
//! # struct Ping { n: u32 }
//! # broker::no_validation!(Ping);
//! # impl Event for Ping { const TOPIC: &'static str = "app.ops.ping"; }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> broker::Result<()> {
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let mut app = App::from_vars(["ops"], [("BROKER_ROUTE_OPS", "memory")])
//!     .await?
//!     .shutdown_signal(async move { let _ = stopped.await; }) // default: SIGTERM or ctrl-c
//!     .shutdown_deadline(Duration::from_secs(10));
//! let ops = app.publisher("ops")?;
//! app.consume("ops", "pinger", |ping: Ping, _meta: Received| async move {
//!     assert_eq!(ping.n, 1);
//!     Ok(())
//! });
//! let running = app.start().await?;          // every consumer at once
//! let status = running.status();             // cheap to clone: for HTTP handlers
//! ops.publish_event(&Ping { n: 1 }).await?;
//! assert!(status.health().await.ready);
//! stop.send(()).unwrap();
//! running.run().await?;                      // waits for the signal, drains, closes
//! # Ok(()) }
//! ```
//!
//! # Startup
//!
//! The app names its modules; a `BROKER_ROUTE_<MODULE>` for a module it did
//! not declare is a startup error naming the variable (a typo would
//! otherwise leave the module on the default route unnoticed). Consumers
//! are started concurrently: Kafka consumers each wait for their partition
//! assignment, and waiting for them one after another added up (three took
//! 45.6 s on the test broker). If one fails to start, the others are shut
//! down and the error returned.
//!
//! # Health
//!
//! [`AppStatus::health`] asks every broker the declared modules use
//! (bounded by [`App::health_timeout`]) and reads every consumer's state
//! and counters into a [`HealthReport`], which serialises (serde) as:
//!
//! ```json
//! {"ready":true,"phase":"running",
//!  "brokers":[{"broker":"kafka","healthy":true,"error":null,"node":null}],
//!  "consumers":[{"module":"credits","topic":"credits.end","group":"billing","route":"kafka",
//!    "running":true,"stopped_by":null,"handled":3,"failed":1,"retried":1,"dead_lettered":0,
//!    "last_error":"handler: ledger unavailable","last_error_at_ms":1700000000000}]}
//! ```
//!
//! `ready` holds while the app runs, every broker answers and every consumer
//! runs; [`HealthReport::http_status`] maps it to 200 or 503. `last_error`
//! is the handler's own error text; for undecodable or invalid payloads it
//! names only the kind, since serde and validator quote payload values.
//!
//! # Shutdown
//!
//! [`Running::run`] (or [`Running::serve`], which also runs an HTTP server)
//! waits for the shutdown signal, then: the phase becomes `stopping` (health
//! answers 503, so load balancers stop sending), the server stops accepting
//! and finishes its requests while every consumer stops taking messages and
//! lets in-flight handlers finish, both within [`App::shutdown_deadline`]
//! (handlers still running then are abandoned and redelivered later); then
//! the publishers are closed, flushing what is queued.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use broker_core::config::{BrokerKind, ConfigError, Route};
use broker_core::message::{millis_since_epoch, now_millis};
use broker_core::{
    typed, typed_batch, Backoff, BatchError, BatchHandler, BrokerError, ConsumerHandle, Event,
    FailureKind, Handler, HandlerError, Health, Metrics, MetricsSnapshot, Publisher, Received,
    Result, RetryMode,
};
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::wiring::{Brokers, BrokersBuilder, Endpoints};

/// Default for [`App::shutdown_deadline`].
pub const DEFAULT_SHUTDOWN_DEADLINE: Duration = Duration::from_secs(30);
/// Default for [`App::health_timeout`].
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long closing the publishers may take after the drain (Kafka flushes
/// what is queued).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `last_error` kept, in characters.
const MAX_ERROR_CHARS: usize = 512;

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// An application: its declared modules on connected [`Brokers`], the
/// consumers it registered, and how it shuts down. See the [module
/// documentation](self).
pub struct App {
    brokers: Brokers,
    modules: Vec<String>,
    overrides: BTreeMap<String, Endpoints>,
    consumers: Vec<ConsumerOptions>,
    shutdown_deadline: Duration,
    health_timeout: Duration,
    signal: Option<BoxFuture>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("brokers", &self.brokers)
            .field("modules", &self.modules)
            .field("consumers", &self.consumers)
            .field("shutdown_deadline", &self.shutdown_deadline)
            .finish_non_exhaustive()
    }
}

impl App {
    /// Reads the configuration from the environment
    /// ([`BrokersBuilder::from_env`]), refuses a `BROKER_ROUTE_<MODULE>` for
    /// a module not in `modules`, and connects.
    ///
    /// # Errors
    ///
    /// [`BrokerError::Config`] naming the variable (an undeclared module's
    /// route, or anything [`BrokersBuilder::connect`] refuses), before any
    /// connection; then a broker that cannot be reached.
    pub async fn from_env<I, S>(modules: I) -> Result<App>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::connect(BrokersBuilder::from_env()?, modules).await
    }

    /// As [`App::from_env`], from `(name, value)` pairs instead of the
    /// process environment (tests).
    pub async fn from_vars<M, S, I, K, V>(modules: M, vars: I) -> Result<App>
    where
        M: IntoIterator<Item = S>,
        S: AsRef<str>,
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Self::connect(BrokersBuilder::from_vars(vars)?, modules).await
    }

    /// Checks `builder`'s routes against `modules`, then connects.
    ///
    /// # Errors
    ///
    /// As [`App::from_env`].
    pub async fn connect<I, S>(builder: BrokersBuilder, modules: I) -> Result<App>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let modules = declared(modules);
        check_routes(builder.config(), &modules)?;
        let brokers = builder.connect().await?;
        Ok(Self::assemble(brokers, modules))
    }

    /// An app on brokers connected already.
    ///
    /// # Errors
    ///
    /// [`BrokerError::Config`] naming the `BROKER_ROUTE_<MODULE>` of a module
    /// not in `modules`.
    pub fn with_brokers<I, S>(brokers: Brokers, modules: I) -> Result<App>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let modules = declared(modules);
        check_routes(brokers.config(), &modules)?;
        Ok(Self::assemble(brokers, modules))
    }

    fn assemble(brokers: Brokers, modules: Vec<String>) -> App {
        App {
            brokers,
            modules,
            overrides: BTreeMap::new(),
            consumers: Vec::new(),
            shutdown_deadline: DEFAULT_SHUTDOWN_DEADLINE,
            health_timeout: DEFAULT_HEALTH_TIMEOUT,
            signal: None,
        }
    }

    /// What ends the app (default: SIGTERM or ctrl-c). Tests pass a channel.
    pub fn shutdown_signal(mut self, signal: impl Future<Output = ()> + Send + 'static) -> Self {
        self.signal = Some(Box::pin(signal));
        self
    }

    /// How long in-flight work may take to finish once shutdown begins
    /// (default 30 s): HTTP requests and handlers alike.
    pub fn shutdown_deadline(mut self, deadline: Duration) -> Self {
        self.shutdown_deadline = deadline;
        self
    }

    /// How long each broker's health check may take (default 5 s; a broker
    /// that does not answer in time is reported unhealthy).
    pub fn health_timeout(mut self, timeout: Duration) -> Self {
        self.health_timeout = timeout;
        self
    }

    /// Uses `endpoints` for `module` instead of its route's (a broker the
    /// app connects itself, or a test double).
    ///
    /// # Errors
    ///
    /// When `module` is not declared (see [`App::endpoints`]).
    pub fn override_endpoints(mut self, module: &str, endpoints: Endpoints) -> Result<Self> {
        let module = self.check_module(module)?;
        self.overrides.insert(module, endpoints);
        Ok(self)
    }

    /// The connected brokers.
    pub fn brokers(&self) -> &Brokers {
        &self.brokers
    }

    /// The declared modules (lowercased).
    pub fn modules(&self) -> &[String] {
        &self.modules
    }

    /// The endpoints of a declared module (its route's, or the override).
    ///
    /// # Errors
    ///
    /// [`BrokerError::Backend`] (backend `app`) naming the module when it is
    /// not declared; what [`Brokers::endpoints`] refuses.
    pub fn endpoints(&self, module: &str) -> Result<Endpoints> {
        let module = self.check_module(module)?;
        match self.overrides.get(&module) {
            Some(endpoints) => Ok(endpoints.clone()),
            None => self.brokers.endpoints(&module),
        }
    }

    /// Where a declared module publishes (see [`Endpoints::publisher`]);
    /// hand it to HTTP handlers. Closed at shutdown, after the drain.
    ///
    /// # Errors
    ///
    /// As [`App::endpoints`].
    pub fn publisher(&self, module: &str) -> Result<Arc<dyn Publisher>> {
        Ok(self.endpoints(module)?.publisher)
    }

    /// Registers a consumer of typed events `E` on `E::TOPIC` in `group`, on
    /// `module`'s route. Undecodable or invalid payloads go to the
    /// dead-letter topic without reaching `handle`. Started by
    /// [`App::start`]; tune it through the returned options.
    pub fn consume<E, F, Fut>(
        &mut self,
        module: &str,
        group: &str,
        handle: F,
    ) -> &mut ConsumerOptions
    where
        E: Event,
        F: Fn(E, Received) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.consume_raw(module, E::TOPIC, group, typed(handle))
    }

    /// Registers a consumer of `topic` in `group` with any [`Handler`].
    pub fn consume_raw(
        &mut self,
        module: &str,
        topic: &str,
        group: &str,
        handler: impl Handler,
    ) -> &mut ConsumerOptions {
        self.register(module, topic, group, Work::One(Arc::new(handler)))
    }

    /// Registers a consumer of typed events `E` that handles them in
    /// batches (see [`broker_core::batch`]): `handle` gets up to
    /// [`ConsumerOptions::batch`]'s `max_messages` decoded events at once.
    /// Undecodable or invalid payloads go to the dead-letter topic without
    /// reaching it.
    pub fn consume_batch<E, F, Fut>(
        &mut self,
        module: &str,
        group: &str,
        handle: F,
    ) -> &mut ConsumerOptions
    where
        E: Event,
        F: Fn(Vec<(E, Received)>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BatchError>> + Send + 'static,
    {
        self.consume_batch_raw(module, E::TOPIC, group, typed_batch(handle))
    }

    /// Registers a consumer of `topic` in `group` with any [`BatchHandler`].
    pub fn consume_batch_raw(
        &mut self,
        module: &str,
        topic: &str,
        group: &str,
        handler: impl BatchHandler,
    ) -> &mut ConsumerOptions {
        self.register(module, topic, group, Work::Batch(Arc::new(handler)))
    }

    fn register(
        &mut self,
        module: &str,
        topic: &str,
        group: &str,
        handler: Work,
    ) -> &mut ConsumerOptions {
        self.consumers.push(ConsumerOptions {
            module: module.to_lowercase(),
            topic: topic.to_owned(),
            group: group.to_owned(),
            handler,
            batch: None,
            concurrency: 1,
            prefetch: None,
            retry: None,
            retry_mode: RetryMode::InPlace,
            delivery_limit: None,
        });
        self.consumers.last_mut().expect("just pushed")
    }

    /// Starts every registered consumer concurrently, each on its module's
    /// subscriber with dead letters next to it. Returns once all are
    /// subscribed (messages published afterwards reach them).
    ///
    /// # Errors
    ///
    /// A consumer of an undeclared module (before anything starts); the
    /// first consumer that fails to start, after the others were shut down
    /// and the publishers closed.
    pub async fn start(self) -> Result<Running> {
        let mut planned = Vec::with_capacity(self.consumers.len());
        for options in self.consumers {
            let endpoints = match self.overrides.get(&options.module) {
                Some(endpoints) => endpoints.clone(),
                None => {
                    check_declared(&self.modules, &options.module)?;
                    self.brokers.endpoints(&options.module)?
                }
            };
            planned.push((options, endpoints));
        }
        let mut kinds = BTreeSet::new();
        for module in &self.modules {
            let route = match self.overrides.get(module) {
                Some(endpoints) => endpoints.route,
                None => self.brokers.config().route(module),
            };
            kinds.extend(route.brokers().into_iter().map(KindKey));
        }

        let started =
            futures::future::join_all(planned.into_iter().map(|(options, endpoints)| async move {
                let metrics = Arc::new(Metrics::default());
                let last_error = Arc::new(Mutex::new(None));
                let builder = endpoints.consumer(&options.topic, &options.group);
                let builder = match &options.handler {
                    Work::One(handler) => builder.handler(Tracked {
                        inner: handler.clone(),
                        last_error: last_error.clone(),
                    }),
                    Work::Batch(handler) => builder.batch_handler(TrackedBatch {
                        inner: handler.clone(),
                        last_error: last_error.clone(),
                    }),
                };
                let mut builder = builder
                    .concurrency(options.concurrency)
                    .metrics(metrics.clone());
                if let Some(prefetch) = options.prefetch {
                    builder = builder.prefetch(prefetch);
                }
                if let (Some((max, wait)), Work::Batch(_)) = (options.batch, &options.handler) {
                    builder = builder.batch(max, wait);
                }
                if let Some(retry) = options.retry.clone() {
                    builder = builder.retry(retry);
                }
                builder = builder.retry_mode(options.retry_mode);
                builder = match options.delivery_limit {
                    None => builder,
                    Some(Some(limit)) => builder.delivery_limit(limit),
                    Some(None) => builder.without_delivery_limit(),
                };
                let result = builder.start().await;
                (options, endpoints.route, metrics, last_error, result)
            }))
            .await;

        let mut slots = Vec::with_capacity(started.len());
        let mut first_error = None;
        for (options, route, metrics, last_error, result) in started {
            match result {
                Ok(handle) => slots.push(Slot {
                    module: options.module,
                    topic: options.topic,
                    group: options.group,
                    route,
                    metrics,
                    last_error,
                    handle: Mutex::new(Some(handle)),
                }),
                Err(e) => {
                    tracing::error!(module = %options.module, topic = %options.topic, group = %options.group, error = %e, "consumer failed to start");
                    first_error.get_or_insert(e);
                }
            }
        }
        let (phase, _) = watch::channel(Phase::Running);
        let shared = Arc::new(Shared {
            brokers: self.brokers,
            kinds: kinds.into_iter().map(|k| k.0).collect(),
            consumers: slots,
            phase,
            health_timeout: self.health_timeout,
        });
        let running = Running {
            shared,
            signal: self.signal.unwrap_or_else(|| Box::pin(terminate_signal())),
            deadline: self.shutdown_deadline,
        };
        if let Some(e) = first_error {
            let Running {
                shared, deadline, ..
            } = running;
            shared.begin_stopping();
            let _ = shared.drain(deadline).await;
            let _ = shared.close().await;
            return Err(e);
        }
        tracing::info!(consumers = running.shared.consumers.len(), "app started");
        Ok(running)
    }

    fn check_module(&self, module: &str) -> Result<String> {
        let module = module.to_lowercase();
        check_declared(&self.modules, &module)?;
        Ok(module)
    }
}

/// How one registered consumer runs; see [`App::consume`].
pub struct ConsumerOptions {
    module: String,
    topic: String,
    group: String,
    handler: Work,
    batch: Option<(usize, Duration)>,
    concurrency: usize,
    prefetch: Option<usize>,
    retry: Option<Backoff>,
    retry_mode: RetryMode,
    delivery_limit: Option<Option<u32>>,
}

impl std::fmt::Debug for ConsumerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerOptions")
            .field("module", &self.module)
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

impl ConsumerOptions {
    /// Consumes `topic` instead of the event's own (prefixes per
    /// environment, tests).
    pub fn topic(&mut self, topic: impl Into<String>) -> &mut Self {
        self.topic = topic.into();
        self
    }
    /// How many messages are handled at once (default 1); same-key messages
    /// stay in order.
    pub fn concurrency(&mut self, lanes: usize) -> &mut Self {
        self.concurrency = lanes.max(1);
        self
    }
    /// Most unacknowledged messages held (default twice the concurrency).
    pub fn prefetch(&mut self, prefetch: usize) -> &mut Self {
        self.prefetch = Some(prefetch.max(1));
        self
    }
    /// Retry policy for handler errors (default [`Backoff::retry_default`]).
    pub fn retry(&mut self, policy: Backoff) -> &mut Self {
        self.retry = Some(policy);
        self
    }
    /// Batch limits of a batch consumer ([`App::consume_batch`]): at most
    /// `max_messages` per call, at most `max_wait` from a batch's first
    /// message to the call (default 100 messages, 100 ms). Ignored by a
    /// consumer of single messages.
    pub fn batch(&mut self, max_messages: usize, max_wait: Duration) -> &mut Self {
        self.batch = Some((max_messages.max(1), max_wait));
        self
    }
    /// Where a failed message waits for its retry (default in place; see
    /// [`RetryMode`]).
    pub fn retry_mode(&mut self, mode: RetryMode) -> &mut Self {
        self.retry_mode = mode;
        self
    }
    /// Deliveries of one message that may end unsettled before it is
    /// dead-lettered without calling the handler (see
    /// [`broker_core::ConsumerBuilder::delivery_limit`]); `None`: no limit.
    pub fn delivery_limit(&mut self, limit: Option<u32>) -> &mut Self {
        self.delivery_limit = Some(limit);
        self
    }
}

/// Where the app is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Consumers started; serving.
    Running,
    /// Shutdown began: draining in-flight work.
    Stopping,
    /// Consumers stopped and publishers closed.
    Stopped,
}

/// The app's health: see the [module documentation](self) for its JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    /// Running, every broker healthy and every consumer running.
    pub ready: bool,
    /// Where the app is in its life.
    pub phase: Phase,
    /// Every broker a declared module's route uses.
    pub brokers: Vec<BrokerStatus>,
    /// Every registered consumer, in registration order.
    pub consumers: Vec<ConsumerStatus>,
}

impl HealthReport {
    /// 200 when ready, else 503 (for a readiness probe).
    pub fn http_status(&self) -> u16 {
        if self.ready {
            200
        } else {
            503
        }
    }
}

/// One broker's health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerStatus {
    /// `kafka`, `rabbitmq` or `memory`.
    pub broker: String,
    /// Whether it answered its health check in time.
    pub healthy: bool,
    /// Why not (no credentials: the backends redact them).
    pub error: Option<String>,
    /// The node the connection is on (`host:port/vhost`), for RabbitMQ,
    /// whose connection moves between the nodes of a node list; `None` for
    /// Kafka and memory, and while not connected.
    #[serde(default)]
    pub node: Option<String>,
}

impl BrokerStatus {
    fn new(kind: BrokerKind, health: Health, node: Option<String>) -> Self {
        let (healthy, error) = match health {
            Health::Healthy => (true, None),
            Health::Unhealthy(reason) => (false, Some(reason)),
        };
        BrokerStatus {
            broker: kind.to_string(),
            healthy,
            error,
            node,
        }
    }
}

/// One consumer's state and counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerStatus {
    /// The module it belongs to.
    pub module: String,
    /// The topic it consumes.
    pub topic: String,
    /// Its consumer group.
    pub group: String,
    /// The module's route (`kafka`, `rabbitmq`, `memory`, `kafka+rabbitmq`).
    pub route: String,
    /// Whether it is consuming (false after shutdown, or when its
    /// subscription failed for good).
    pub running: bool,
    /// Why it stopped on its own, when it did: the subscription's error
    /// (say `rabbitmq unavailable after 12 attempts: ...` once a bounded
    /// resubscribe policy ran out). It does not restart by itself; `ready`
    /// stays false until the process restarts. `None` while it runs.
    #[serde(default)]
    pub stopped_by: Option<String>,
    /// Messages whose handler succeeded.
    pub handled: u64,
    /// Handler attempts that failed (errors and panics).
    pub failed: u64,
    /// Attempts that were retries.
    pub retried: u64,
    /// Messages sent to the dead-letter topic.
    pub dead_lettered: u64,
    /// The last failed attempt's error (at most 512 characters; only the
    /// kind for undecodable or invalid payloads).
    pub last_error: Option<String>,
    /// When it happened, in milliseconds since the Unix epoch.
    pub last_error_at_ms: Option<i64>,
}

impl ConsumerStatus {
    /// The counters, as the core runtime keeps them (`published` is 0: a
    /// consumer does not publish).
    pub fn counters(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            published: 0,
            handled: self.handled,
            failed: self.failed,
            retried: self.retried,
            dead_lettered: self.dead_lettered,
        }
    }
}

/// The running app. [`Running::status`] gives the handle HTTP handlers keep;
/// [`Running::run`] or [`Running::serve`] waits for the shutdown signal and
/// shuts down.
pub struct Running {
    shared: Arc<Shared>,
    signal: BoxFuture,
    deadline: Duration,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("consumers", &self.shared.consumers.len())
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl Running {
    /// A handle on the app's state, for health and metrics endpoints.
    pub fn status(&self) -> AppStatus {
        AppStatus {
            shared: self.shared.clone(),
        }
    }

    /// Waits for the shutdown signal, then shuts down (see
    /// [`Running::shutdown`]).
    ///
    /// # Errors
    ///
    /// As [`Running::shutdown`].
    pub async fn run(self) -> Result<()> {
        let Running {
            shared,
            signal,
            deadline,
        } = self;
        signal.await;
        tracing::info!("shutdown signal received");
        shared.begin_stopping();
        let drained = shared.drain(deadline).await;
        let closed = shared.close().await;
        drained.and(closed)
    }

    /// Runs a server next to the consumers: `server` gets a future that
    /// resolves when shutdown begins (axum's `with_graceful_shutdown` takes
    /// it) and must then finish its requests. On the shutdown signal (or when
    /// the server ends on its own), the server's drain and the consumers'
    /// run together within the deadline; the publishers close after both,
    /// so requests still publishing are not refused.
    ///
    /// ```no_run
    /// # async fn demo(running: broker::Running) -> broker::Result<()> {
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    /// running
    ///     .serve(|stopping| async move {
    ///         // axum::serve(listener, router).with_graceful_shutdown(stopping).await
    ///         # drop(listener); stopping.await;
    ///         Ok::<(), std::io::Error>(())
    ///     })
    ///     .await
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// The server's error ([`BrokerError::Backend`], backend `server`), a
    /// server that did not finish within the deadline
    /// ([`BrokerError::Timeout`]), then as [`Running::shutdown`].
    pub async fn serve<F, Fut, E>(self, server: F) -> Result<()>
    where
        F: FnOnce(Stopping) -> Fut,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
    {
        let mut server = tokio::spawn(server(self.status().stopping()));
        let Running {
            shared,
            mut signal,
            deadline,
        } = self;
        let early = tokio::select! {
            () = &mut signal => {
                tracing::info!("shutdown signal received");
                None
            }
            ended = &mut server => {
                tracing::warn!("server ended before the shutdown signal; shutting down");
                Some(ended)
            }
        };
        shared.begin_stopping();
        let server_done = async move {
            let ended = match early {
                Some(ended) => ended,
                None => match tokio::time::timeout(deadline, &mut server).await {
                    Ok(ended) => ended,
                    Err(_) => {
                        server.abort();
                        return Err(BrokerError::Timeout {
                            operation: "server drain",
                            after: deadline,
                        });
                    }
                },
            };
            match ended {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(BrokerError::backend("server", e)),
                Err(join) => Err(BrokerError::backend("server", join)),
            }
        };
        let (server_result, drained) = tokio::join!(server_done, shared.drain(deadline));
        let closed = shared.close().await;
        if let Err(e) = &server_result {
            tracing::error!(error = %e, "server did not stop cleanly");
        }
        server_result.and(drained).and(closed)
    }

    /// Shuts down now: phase `stopping`, every consumer stops taking
    /// messages and in-flight handlers get until the deadline (the rest are
    /// redelivered later), then the publishers close.
    ///
    /// # Errors
    ///
    /// The first consumer that did not stop cleanly, else the first broker
    /// that failed to close (every consumer and broker is still shut down).
    pub async fn shutdown(self) -> Result<()> {
        let Running {
            shared, deadline, ..
        } = self;
        shared.begin_stopping();
        let drained = shared.drain(deadline).await;
        let closed = shared.close().await;
        drained.and(closed)
    }
}

impl Shared {
    fn begin_stopping(&self) {
        self.phase.send_if_modified(|p| {
            let was_running = *p == Phase::Running;
            if was_running {
                *p = Phase::Stopping;
            }
            was_running
        });
    }

    /// Stops every consumer within `deadline`, concurrently.
    async fn drain(&self, deadline: Duration) -> Result<()> {
        let handles: Vec<(usize, ConsumerHandle)> = self
            .consumers
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| lock(&slot.handle).take().map(|h| (i, h)))
            .collect();
        let results = futures::future::join_all(
            handles
                .into_iter()
                .map(|(i, handle)| async move { (i, handle.shutdown(deadline).await) }),
        )
        .await;
        let mut first = Ok(());
        for (i, result) in results {
            if let Err(e) = result {
                let slot = &self.consumers[i];
                tracing::error!(module = %slot.module, topic = %slot.topic, group = %slot.group, error = %e, "consumer did not stop cleanly");
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    /// Closes every broker's publishing side, bounded.
    async fn close(&self) -> Result<()> {
        let result = match tokio::time::timeout(CLOSE_TIMEOUT, self.brokers.close()).await {
            Ok(result) => result,
            Err(_) => Err(BrokerError::Timeout {
                operation: "closing the publishers",
                after: CLOSE_TIMEOUT,
            }),
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, "publishers did not close cleanly");
        }
        self.phase.send_replace(Phase::Stopped);
        tracing::info!("app stopped");
        result
    }
}

/// A handle on the running app's state; cheap to clone, for HTTP handlers.
#[derive(Clone)]
pub struct AppStatus {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AppStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppStatus")
            .field("phase", &self.phase())
            .finish_non_exhaustive()
    }
}

impl AppStatus {
    /// Where the app is in its life.
    pub fn phase(&self) -> Phase {
        *self.shared.phase.borrow()
    }

    /// Asks every broker (concurrently, each bounded by the health timeout)
    /// and reads every consumer.
    pub async fn health(&self) -> HealthReport {
        let timeout = self.shared.health_timeout;
        let brokers = futures::future::join_all(self.shared.kinds.iter().map(|&kind| async move {
            let (health, node) = match self.shared.brokers.broker(kind) {
                Err(e) => (Health::Unhealthy(e.to_string()), None),
                Ok((publisher, _)) => {
                    let health = match tokio::time::timeout(timeout, publisher.health()).await {
                        Ok(health) => health,
                        Err(_) => Health::Unhealthy(format!(
                            "no answer to the health check within {timeout:?}"
                        )),
                    };
                    (health, publisher.connected_node())
                }
            };
            BrokerStatus::new(kind, health, node)
        }))
        .await;
        let consumers = self.consumers();
        let phase = self.phase();
        HealthReport {
            ready: phase == Phase::Running
                && brokers.iter().all(|b| b.healthy)
                && consumers.iter().all(|c| c.running),
            phase,
            brokers,
            consumers,
        }
    }

    /// Every consumer's state and counters, without asking the brokers.
    pub fn consumers(&self) -> Vec<ConsumerStatus> {
        self.shared
            .consumers
            .iter()
            .map(|slot| {
                let counters = slot.metrics.snapshot();
                // One lock for both: a second `lock` in the same expression
                // would wait for the first guard, which lives to its end.
                let (running, stopped_by) = {
                    let handle = lock(&slot.handle);
                    let handle = handle.as_ref();
                    (
                        handle.is_some_and(|h| h.is_running()),
                        handle.and_then(|h| h.stopped_by()),
                    )
                };
                let (last_error, last_error_at_ms) = match &*lock(&slot.last_error) {
                    Some((text, at)) => (Some(text.clone()), Some(*at)),
                    None => (None, None),
                };
                ConsumerStatus {
                    module: slot.module.clone(),
                    topic: slot.topic.clone(),
                    group: slot.group.clone(),
                    route: slot.route.to_string(),
                    running,
                    stopped_by,
                    handled: counters.handled,
                    failed: counters.failed,
                    retried: counters.retried,
                    dead_lettered: counters.dead_lettered,
                    last_error,
                    last_error_at_ms,
                }
            })
            .collect()
    }

    /// The consumers' counters and states in the Prometheus text format
    /// (version 0.0.4), labelled by module, topic and group:
    /// `broker_consumer_handled_total`, `_failed_total`, `_retried_total`,
    /// `_dead_lettered_total`, `broker_consumer_running`, and
    /// `broker_app_running` (1 while the phase is `running`).
    pub fn prometheus_text(&self) -> String {
        let consumers = self.consumers();
        let mut out = String::new();
        type Read = fn(&ConsumerStatus) -> u64;
        let families: [(&str, &str, &str, Read); 5] = [
            (
                "broker_consumer_handled_total",
                "counter",
                "Messages whose handler succeeded.",
                |c| c.handled,
            ),
            (
                "broker_consumer_failed_total",
                "counter",
                "Handler attempts that failed (errors and panics).",
                |c| c.failed,
            ),
            (
                "broker_consumer_retried_total",
                "counter",
                "Handler attempts that were retries.",
                |c| c.retried,
            ),
            (
                "broker_consumer_dead_lettered_total",
                "counter",
                "Messages sent to the dead-letter topic.",
                |c| c.dead_lettered,
            ),
            (
                "broker_consumer_running",
                "gauge",
                "1 while the consumer is consuming.",
                |c| u64::from(c.running),
            ),
        ];
        for (name, kind, help, read) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for c in &consumers {
                let _ = writeln!(
                    out,
                    "{name}{{module=\"{}\",topic=\"{}\",group=\"{}\"}} {}",
                    escape_label(&c.module),
                    escape_label(&c.topic),
                    escape_label(&c.group),
                    read(c)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP broker_app_running 1 while the app runs (0 once shutdown began).\n\
             # TYPE broker_app_running gauge\nbroker_app_running {}",
            u8::from(self.phase() == Phase::Running)
        );
        out
    }

    /// Resolves once shutdown begins (the phase leaves `running`).
    pub fn stopping(&self) -> Stopping {
        let mut phase = self.shared.phase.subscribe();
        Stopping(Box::pin(async move {
            let _ = phase.wait_for(|p| *p != Phase::Running).await;
        }))
    }
}

/// Resolves once the app begins to shut down; see [`AppStatus::stopping`].
pub struct Stopping(BoxFuture);

impl std::fmt::Debug for Stopping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stopping")
    }
}

impl Future for Stopping {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.0.as_mut().poll(cx)
    }
}

/// SIGTERM (on Unix) or ctrl-c, whichever comes first.
async fn terminate_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only ctrl-c stops the app")
            }
        }
    }
    if let Err(e) = tokio::signal::ctrl_c().await {
        tracing::error!(error = %e, "cannot listen for ctrl-c; the app runs until killed");
        futures::future::pending::<()>().await;
    }
}

struct Shared {
    brokers: Brokers,
    kinds: Vec<BrokerKind>,
    consumers: Vec<Slot>,
    phase: watch::Sender<Phase>,
    health_timeout: Duration,
}

type LastError = Arc<Mutex<Option<(String, i64)>>>;

struct Slot {
    module: String,
    topic: String,
    group: String,
    route: Route,
    metrics: Arc<Metrics>,
    last_error: LastError,
    handle: Mutex<Option<ConsumerHandle>>,
}

/// The registered handler, noting each failure's text for the health view.
/// A registered consumer's handler.
enum Work {
    One(Arc<dyn Handler>),
    Batch(Arc<dyn BatchHandler>),
}

struct Tracked {
    inner: Arc<dyn Handler>,
    last_error: LastError,
}

/// [`Tracked`] for a batch handler: notes the first failure of a batch
/// (the runtime catches its panics).
struct TrackedBatch {
    inner: Arc<dyn BatchHandler>,
    last_error: LastError,
}

#[async_trait]
impl BatchHandler for TrackedBatch {
    async fn handle_batch(&self, batch: Vec<Received>) -> Result<(), BatchError> {
        let result = self.inner.handle_batch(batch).await;
        if let Err(e) = &result {
            let text = match e.failures().and_then(|f| f.first()) {
                Some((_, error)) => error_text(error),
                None => "the whole batch failed".to_owned(),
            };
            *lock(&self.last_error) = Some((text, millis_since_epoch(now_millis())));
        }
        result
    }
}

/// A handler error as the health view shows it: never payload values.
fn error_text(e: &HandlerError) -> String {
    match e.kind() {
        // serde and validator errors quote payload values.
        FailureKind::Decode => "decode: the payload is not a valid event".to_owned(),
        FailureKind::Validation => "validation: the event failed validation".to_owned(),
        _ => e.to_string().chars().take(MAX_ERROR_CHARS).collect(),
    }
}

#[async_trait]
impl Handler for Tracked {
    async fn handle(&self, message: Received) -> Result<(), HandlerError> {
        // Panics are caught here (as the runtime would) to note them too.
        let result = match AssertUnwindSafe(self.inner.handle(message))
            .catch_unwind()
            .await
        {
            Ok(result) => result,
            Err(panic) => Err(HandlerError::new(
                FailureKind::Panic,
                panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "handler panicked".to_owned()),
            )),
        };
        if let Err(e) = &result {
            let text = error_text(e);
            *lock(&self.last_error) = Some((text, millis_since_epoch(now_millis())));
        }
        result
    }
}

/// Orders broker kinds for the health view (Kafka, RabbitMQ, memory).
#[derive(PartialEq, Eq)]
struct KindKey(BrokerKind);

impl KindKey {
    fn rank(&self) -> u8 {
        match self.0 {
            BrokerKind::Kafka => 0,
            BrokerKind::RabbitMq => 1,
            BrokerKind::Memory => 2,
        }
    }
}
impl PartialOrd for KindKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for KindKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.rank().cmp(&other.rank())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn declared<I, S>(modules: I) -> Vec<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut out: Vec<String> = Vec::new();
    for module in modules {
        let module = module.as_ref().to_lowercase();
        if !out.contains(&module) {
            out.push(module);
        }
    }
    out
}

/// A `BROKER_ROUTE_<MODULE>` for a module the app does not declare.
fn check_routes(config: &broker_core::config::BrokerConfig, modules: &[String]) -> Result<()> {
    if let Some((module, _)) = config
        .routes()
        .find(|(module, _)| !modules.iter().any(|m| m == module))
    {
        return Err(BrokerError::Config(ConfigError::Invalid {
            var: format!("BROKER_ROUTE_{}", module.to_uppercase()),
            reason: format!(
                "this app has no module `{module}` (its modules: {}); fix the name or remove \
                 the variable",
                modules.join(", ")
            ),
        }));
    }
    Ok(())
}

fn check_declared(modules: &[String], module: &str) -> Result<()> {
    if modules.iter().any(|m| m == module) {
        return Ok(());
    }
    Err(BrokerError::backend(
        "app",
        format!(
            "module `{module}` is not declared (the app's modules: {})",
            modules.join(", ")
        ),
    ))
}

/// Escapes a Prometheus label value.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
