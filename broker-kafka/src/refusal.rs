//! What a refused produce means for the caller: librdkafka's error codes
//! turned into [`BrokerError`]s.
//!
//! A size refusal is [`BrokerError::MessageTooLarge`], final, like the
//! RabbitMQ backend's: the consumer runtime then dead-letters a truncated
//! copy instead of returning the letter forever. Kafka's refusal does not
//! say the limit, so it is read from the topic's `max.message.bytes`
//! (see [`crate::admin::topic_max_message_bytes`]).

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use broker_core::BrokerError;

use crate::BACKEND;

/// Bytes a record batch of one record adds to the message's own bytes
/// ([`broker_core::Message::encoded_len`]): the batch header (61), the
/// record's length, offset and timestamp deltas and attribute varints, and
/// the names of the headers the codec writes. A message at least this far
/// under the topic's limit fits alone, so its refusal was about the batch
/// it travelled in.
pub(crate) const RECORD_OVERHEAD: usize = 512;

/// True for the codes Kafka and librdkafka use to refuse a message or a
/// record batch over `max.message.bytes` (the topic's, the broker's or the
/// producer's own).
pub(crate) fn is_size_refusal(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize
    )
}

/// The error of a size refusal of a message of `size` bytes
/// ([`broker_core::Message::encoded_len`]), given the limit that refused it
/// when known.
///
/// - Limit unknown, or the message does not fit it alone:
///   [`BrokerError::MessageTooLarge`] (final). With the limit unknown,
///   `max` is `size - 1`: the most the broker can have allowed.
/// - The message fits with room to spare: the broker refused the record
///   batch librdkafka put it in, together with others. Sent again it can
///   pass, so the error is transient ([`BrokerError::Backend`]); it names
///   the limit and `batch.size`, the producer setting that bounds batches.
pub(crate) fn size_refusal(
    code: RDKafkaErrorCode,
    topic: &str,
    size: usize,
    limit: Option<usize>,
) -> BrokerError {
    match limit {
        Some(max) if size.saturating_add(RECORD_OVERHEAD) <= max => BrokerError::backend(
            BACKEND,
            format!(
                "{code}: the record batch sent to {topic} was over its limit of {max} bytes; \
                 this message ({size} bytes) fits alone (lower `batch.size` below the limit)"
            ),
        ),
        Some(max) => BrokerError::MessageTooLarge { size, max },
        None => BrokerError::MessageTooLarge {
            size,
            max: size.saturating_sub(1),
        },
    }
}

/// Every other produce error: a timeout, a final refusal, or a transient
/// client error.
pub(crate) fn produce_error(e: KafkaError, message_timeout: Duration) -> BrokerError {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageTimedOut) => BrokerError::Timeout {
            operation: "kafka publish",
            after: message_timeout,
        },
        Some(
            code @ (RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::InvalidTopic),
        ) => BrokerError::Rejected {
            backend: BACKEND,
            reason: code.to_string(),
        },
        _ => BrokerError::backend(BACKEND, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(30);

    #[test]
    fn size_codes_are_size_refusals() {
        assert!(is_size_refusal(RDKafkaErrorCode::MessageSizeTooLarge));
        assert!(is_size_refusal(RDKafkaErrorCode::InvalidMessageSize));
        assert!(!is_size_refusal(RDKafkaErrorCode::InvalidMessage));
        assert!(!is_size_refusal(RDKafkaErrorCode::MessageTimedOut));
    }

    #[test]
    fn a_message_over_the_topic_limit_is_too_large_and_final() {
        let e = size_refusal(
            RDKafkaErrorCode::MessageSizeTooLarge,
            "t",
            5_000,
            Some(1_000),
        );
        assert!(
            matches!(
                e,
                BrokerError::MessageTooLarge {
                    size: 5_000,
                    max: 1_000
                }
            ),
            "{e:?}"
        );
        assert!(!e.is_transient());
        let e = size_refusal(
            RDKafkaErrorCode::InvalidMessageSize,
            "t",
            5_000,
            Some(1_000),
        );
        assert!(matches!(e, BrokerError::MessageTooLarge { .. }), "{e:?}");
    }

    #[test]
    fn a_message_just_under_the_limit_does_not_fit_with_its_framing() {
        let e = size_refusal(RDKafkaErrorCode::MessageSizeTooLarge, "t", 990, Some(1_000));
        assert!(
            matches!(
                e,
                BrokerError::MessageTooLarge {
                    size: 990,
                    max: 1_000
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn an_unknown_limit_is_still_too_large_below_the_size() {
        let e = size_refusal(RDKafkaErrorCode::MessageSizeTooLarge, "t", 5_000, None);
        assert!(
            matches!(
                e,
                BrokerError::MessageTooLarge {
                    size: 5_000,
                    max: 4_999
                }
            ),
            "{e:?}"
        );
        assert!(!e.is_transient());
    }

    #[test]
    fn a_small_message_refused_with_its_batch_may_be_sent_again() {
        let e = size_refusal(
            RDKafkaErrorCode::MessageSizeTooLarge,
            "t",
            100,
            Some(10_000),
        );
        assert!(matches!(e, BrokerError::Backend { .. }), "{e:?}");
        assert!(e.is_transient());
        let text = e.to_string();
        assert!(
            text.contains("10000") && text.contains("batch.size"),
            "{text}"
        );
    }

    #[test]
    fn other_codes_keep_their_mapping() {
        let timed_out = produce_error(
            KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
            TIMEOUT,
        );
        assert!(
            matches!(timed_out, BrokerError::Timeout { after, .. } if after == TIMEOUT),
            "{timed_out:?}"
        );
        for code in [
            RDKafkaErrorCode::InvalidMessage,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::InvalidTopic,
        ] {
            let e = produce_error(KafkaError::MessageProduction(code), TIMEOUT);
            assert!(matches!(e, BrokerError::Rejected { .. }), "{code}: {e:?}");
            assert!(!e.is_transient());
        }
        let e = produce_error(
            KafkaError::MessageProduction(RDKafkaErrorCode::NotLeaderForPartition),
            TIMEOUT,
        );
        assert!(e.is_transient(), "{e:?}");
    }
}
