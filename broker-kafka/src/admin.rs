//! Topic creation: idempotent, and waiting until the cluster's metadata
//! shows the topic, so a consumer subscribing right after finds it.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::context::ClientWatch;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureProducer, Producer};

use broker_core::BrokerError;

/// How topics are created (by [`crate::KafkaBroker::create_topic`], and for
/// every topic the broker publishes to or subscribes to unless disabled).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    /// Number of partitions (default 3).
    pub partitions: i32,
    /// Replication factor; `-1` (the default) lets the cluster decide
    /// (`default.replication.factor`, Kafka 2.4+).
    pub replication_factor: i32,
    /// Topic settings, e.g. `retention.ms`.
    pub config: BTreeMap<String, String>,
}

impl Default for TopicSpec {
    fn default() -> Self {
        TopicSpec {
            partitions: 3,
            replication_factor: -1,
            config: BTreeMap::new(),
        }
    }
}

impl TopicSpec {
    /// Sets the partition count.
    pub fn partitions(mut self, partitions: i32) -> Self {
        self.partitions = partitions;
        self
    }
    /// Sets the replication factor.
    pub fn replication_factor(mut self, factor: i32) -> Self {
        self.replication_factor = factor;
        self
    }
    /// Sets how long messages are kept (`retention.ms`).
    pub fn retention(self, retention: Duration) -> Self {
        self.config("retention.ms", retention.as_millis().to_string())
    }
    /// Sets a topic setting.
    pub fn config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.insert(key.into(), value.into());
        self
    }
}

/// Creates `topics` that do not exist yet (existing ones are left as they
/// are), then waits until metadata lists every one with its partitions.
pub(crate) async fn create_topics(
    admin: &AdminClient<ClientWatch>,
    metadata: &FutureProducer<ClientWatch>,
    topics: &[&str],
    spec: &TopicSpec,
    timeout: Duration,
) -> Result<(), BrokerError> {
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            let replication = TopicReplication::Fixed(spec.replication_factor);
            spec.config.iter().fold(
                NewTopic::new(t, spec.partitions, replication),
                |n, (k, v)| n.set(k, v),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(timeout));
    let results = tokio::time::timeout(
        timeout + Duration::from_secs(1),
        admin.create_topics(&new, &options),
    )
    .await
    .map_err(|_| BrokerError::Timeout {
        operation: "kafka create topics",
        after: timeout,
    })?
    .map_err(|e| BrokerError::backend("kafka", e))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            // Not allowed to create topics: they are managed elsewhere; use
            // them as they are rather than refuse to publish or subscribe.
            Err((
                topic,
                code @ (RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed),
            )) => {
                tracing::warn!(%topic, error = %code, "may not create topics; assuming the cluster manages them");
                return Ok(());
            }
            Err((topic, code)) => {
                return Err(BrokerError::backend(
                    "kafka",
                    format!("could not create topic {topic}: {code}"),
                ))
            }
        }
    }
    wait_for_metadata(metadata, topics, timeout).await
}

/// Polls metadata until every topic is listed with partitions and no error.
async fn wait_for_metadata(
    client: &FutureProducer<ClientWatch>,
    topics: &[&str],
    timeout: Duration,
) -> Result<(), BrokerError> {
    let deadline = tokio::time::Instant::now() + timeout;
    for topic in topics {
        loop {
            let (client, t) = (client.clone(), topic.to_string());
            let ready = tokio::task::spawn_blocking(move || {
                client
                    .client()
                    .fetch_metadata(Some(&t), Duration::from_secs(5))
                    .map(|m| {
                        m.topics().iter().any(|mt| {
                            mt.name() == t && mt.error().is_none() && !mt.partitions().is_empty()
                        })
                    })
            })
            .await
            .map_err(|e| BrokerError::backend("kafka", e))?
            .unwrap_or(false);
            if ready {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(BrokerError::Timeout {
                    operation: "kafka topic metadata",
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// The topic's `max.message.bytes` as the cluster reports it (the topic's
/// own setting or the broker default it inherits), or `None` when the
/// cluster does not answer within `timeout` or does not say.
pub(crate) async fn topic_max_message_bytes(
    admin: &AdminClient<ClientWatch>,
    topic: &str,
    timeout: Duration,
) -> Option<usize> {
    let options = AdminOptions::new().request_timeout(Some(timeout));
    let resources = [ResourceSpecifier::Topic(topic)];
    let described = tokio::time::timeout(
        timeout + Duration::from_secs(1),
        admin.describe_configs(&resources, &options),
    )
    .await
    .ok()?
    .ok()?;
    described
        .into_iter()
        .filter_map(Result::ok)
        .find_map(|config| {
            config
                .get("max.message.bytes")?
                .value
                .as_deref()?
                .parse()
                .ok()
        })
}
