//! Consumer lag: how far a group's committed offsets trail the end of each
//! partition.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use broker_core::topic::validate_topic;
use broker_core::{BrokerError, Result};

use crate::client_config::{client_config, config_error, Role};
use crate::{KafkaBroker, BACKEND};

/// How far one consumer group is behind on one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionLag {
    /// The partition.
    pub partition: i32,
    /// The group's committed offset (the next offset it will read), or
    /// `None` when the group has committed nothing on this partition.
    pub committed: Option<i64>,
    /// Offset of the first message still in the partition.
    pub low_watermark: i64,
    /// Offset the next message written to the partition will get.
    pub high_watermark: i64,
}

impl PartitionLag {
    /// Messages the group has not finished: from its committed offset (or,
    /// with nothing committed, from the first message kept, as
    /// `auto.offset.reset=earliest` reads) to the end of the partition.
    pub fn lag(&self) -> i64 {
        let from = self
            .committed
            .unwrap_or(self.low_watermark)
            .max(self.low_watermark);
        (self.high_watermark - from).max(0)
    }
}

/// Total lag over partitions.
pub fn total_lag(partitions: &[PartitionLag]) -> i64 {
    partitions.iter().map(PartitionLag::lag).sum()
}

impl KafkaBroker {
    /// The lag of consumer group `group` on `topic`, per partition.
    ///
    /// Reads the group's committed offsets and each partition's watermarks
    /// (without joining the group). The figures are only as good as the
    /// broker's watermarks: real Kafka reports them; the tansu test broker
    /// does not (its high watermark is wrong).
    ///
    /// ```no_run
    /// # async fn demo(broker: broker_kafka::KafkaBroker) -> broker_core::Result<()> {
    /// let lag = broker.consumer_lag("billing-group", "billing.credits.granted").await?;
    /// println!("behind by {} messages", broker_kafka::total_lag(&lag));
    /// # Ok(()) }
    /// ```
    pub async fn consumer_lag(&self, group: &str, topic: &str) -> Result<Vec<PartitionLag>> {
        validate_topic(topic)?;
        if group.is_empty() {
            return Err(BrokerError::Misconfigured("empty consumer group name"));
        }
        let mut config = client_config(self.settings(), Role::Consumer);
        config.set("group.id", group);
        let consumer: BaseConsumer = config.create().map_err(config_error)?;
        let topic = topic.to_owned();
        let timeout = self.request_timeout();
        // librdkafka's offset and watermark calls block: keep them off the runtime.
        tokio::task::spawn_blocking(move || lag_blocking(&consumer, &topic, timeout))
            .await
            .map_err(|e| BrokerError::backend(BACKEND, e))?
    }

    /// Reads the lag of `group` on `topic` ([`KafkaBroker::consumer_lag`])
    /// and sets the `broker_consumer_lag` gauge (labels `topic`, `group`,
    /// `backend="kafka"`) to its total; returns the total. Call it
    /// periodically (every 15 to 60 s) for the groups an app consumes in.
    /// The gauge is recorded with the `metrics` feature of `broker-core`
    /// (the facade's `metrics` or `prometheus`); without it this only reads.
    ///
    /// ```no_run
    /// # async fn demo(broker: broker_kafka::KafkaBroker) -> broker_core::Result<()> {
    /// let mut every = tokio::time::interval(std::time::Duration::from_secs(30));
    /// loop {
    ///     every.tick().await;
    ///     if let Err(e) = broker.record_consumer_lag("billing-group", "billing.credits.granted").await {
    ///         tracing::warn!(error = %e, "consumer lag not read");
    ///     }
    /// }
    /// # }
    /// ```
    pub async fn record_consumer_lag(&self, group: &str, topic: &str) -> Result<i64> {
        let total = total_lag(&self.consumer_lag(group, topic).await?);
        broker_core::metrics::record_consumer_lag(BACKEND, topic, group, total.max(0) as u64);
        Ok(total)
    }
}

fn lag_blocking(
    consumer: &BaseConsumer,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<PartitionLag>> {
    let backend = |e| BrokerError::backend(BACKEND, e);
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(backend)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(BrokerError::backend(
            BACKEND,
            format!("topic `{topic}` does not exist"),
        ));
    }
    let mut wanted = TopicPartitionList::new();
    for &p in &partitions {
        wanted.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(wanted, timeout)
        .map_err(backend)?;
    partitions
        .iter()
        .map(|&partition| {
            let (low_watermark, high_watermark) = consumer
                .fetch_watermarks(topic, partition, timeout)
                .map_err(backend)?;
            let committed = match committed
                .find_partition(topic, partition)
                .map(|e| e.offset())
            {
                Some(Offset::Offset(n)) => Some(n),
                _ => None,
            };
            Ok(PartitionLag {
                partition,
                committed,
                low_watermark,
                high_watermark,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(committed: Option<i64>, low: i64, high: i64) -> PartitionLag {
        PartitionLag {
            partition: 0,
            committed,
            low_watermark: low,
            high_watermark: high,
        }
    }

    #[test]
    fn lag_counts_from_the_commit_or_the_first_kept_message() {
        assert_eq!(at(Some(7), 0, 10).lag(), 3);
        assert_eq!(at(None, 4, 10).lag(), 6);
        // Committed below what retention kept: only the kept ones remain.
        assert_eq!(at(Some(1), 4, 10).lag(), 6);
        assert_eq!(at(Some(10), 0, 10).lag(), 0);
        assert_eq!(total_lag(&[at(Some(7), 0, 10), at(None, 4, 10)]), 9);
    }
}
