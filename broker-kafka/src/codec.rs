//! Mapping between [`Message`] and Kafka records.
//!
//! Kafka has native key, value, headers and timestamp; the message id,
//! correlation id and `traceparent` travel in the reserved headers of
//! [`broker_core::message::header`] and are stripped again on read, so the
//! application sees exactly the message that was published.

use bytes::Bytes;
use rdkafka::message::{Header, Headers, OwnedHeaders, Timestamp};

use broker_core::message::{from_millis_since_epoch, header};
use broker_core::Message;

/// Headers of the record: the reserved ones, then the application's.
pub(crate) fn encode_headers(message: &Message) -> OwnedHeaders {
    let reserved = [
        (header::MESSAGE_ID, Some(message.id())),
        (header::CORRELATION_ID, message.correlation_id()),
        (header::TRACEPARENT, message.traceparent()),
    ];
    let mut headers = OwnedHeaders::new_with_capacity(message.headers().len() + reserved.len());
    for (key, value) in reserved {
        if let Some(value) = value {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
    }
    for (key, value) in message.headers() {
        headers = headers.insert(Header {
            key,
            value: Some(value.as_str()),
        });
    }
    headers
}

/// The message a record carries. Records from other producers (no id
/// header) get a fresh id; a missing value is an empty payload.
pub(crate) fn decode(record: &impl rdkafka::Message) -> Message {
    let payload = record
        .payload()
        .map(Bytes::copy_from_slice)
        .unwrap_or_default();
    let text = |v: Option<&[u8]>| {
        // Header values are strings in our model; a null value reads as "".
        v.map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    let mut id = None;
    let mut correlation_id = None;
    let mut traceparent = None;
    let mut user = broker_core::Headers::new();
    if let Some(headers) = record.headers() {
        for h in headers.iter() {
            match h.key {
                // Borrowed: most ids are kept inline, without a string.
                header::MESSAGE_ID => {
                    id = Some(String::from_utf8_lossy(h.value.unwrap_or_default()))
                }
                header::CORRELATION_ID => correlation_id = Some(text(h.value)),
                header::TRACEPARENT => traceparent = Some(text(h.value)),
                key => {
                    user.insert(key.to_owned(), text(h.value));
                }
            }
        }
    }
    let timestamp = match record.timestamp() {
        Timestamp::CreateTime(ms) | Timestamp::LogAppendTime(ms) => {
            Some(from_millis_since_epoch(ms))
        }
        Timestamp::NotAvailable => None,
    };
    // Only a foreign record needs a new id or the clock.
    let mut message = match (id, timestamp) {
        (Some(id), Some(at)) => Message::restore(&id, payload, at),
        (Some(id), None) => Message::new(payload).with_id(id),
        (None, at) => {
            let fresh = Message::new(payload);
            match at {
                Some(at) => fresh.with_timestamp(at),
                None => fresh,
            }
        }
    };
    if let Some(key) = record.key() {
        message = message.with_key(String::from_utf8_lossy(key));
    }
    if let Some(c) = correlation_id {
        message = message.with_correlation_id(c);
    }
    if let Some(t) = traceparent {
        message = message.with_traceparent(t);
    }
    message.with_headers(user)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use rdkafka::message::OwnedMessage;

    use super::*;

    fn record(message: &Message) -> OwnedMessage {
        OwnedMessage::new(
            Some(message.payload().to_vec()),
            message.key().map(|k| k.as_bytes().to_vec()),
            "t".into(),
            Timestamp::CreateTime(message.timestamp_millis()),
            0,
            0,
            Some(encode_headers(message)),
        )
    }

    #[test]
    fn full_message_roundtrips() {
        let sent = Message::new("payload")
            .with_key("k")
            .with_header("content-type", "application/json")
            .with_header("x-empty", "")
            .with_correlation_id("corr")
            .with_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .with_timestamp(SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123));
        assert_eq!(decode(&record(&sent)), sent);
    }

    #[test]
    fn bare_message_roundtrips() {
        let sent = Message::new(Bytes::new());
        let got = decode(&record(&sent));
        assert_eq!(got, sent);
        assert_eq!(got.key(), None);
        assert_eq!(got.correlation_id(), None);
    }

    #[test]
    fn foreign_record_gets_an_id_and_empty_payload() {
        let r = OwnedMessage::new(None, None, "t".into(), Timestamp::NotAvailable, 0, 0, None);
        let m = decode(&r);
        assert!(!m.id().is_empty());
        assert!(m.payload().is_empty());
        assert!(m.headers().is_empty());
    }
}
