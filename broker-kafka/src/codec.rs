//! Mapping between [`Message`] and Kafka records, byte for byte.
//!
//! Kafka has native key, value, headers and timestamp; the message id,
//! correlation id, `traceparent` and content type travel in the reserved
//! headers of [`broker_core::message::header`] (written first) and are
//! stripped again on read, so the application sees exactly the message that
//! was published. Keys and header values are bytes and stay bytes (a null
//! header value is [`HeaderValue::Null`]); headers keep their order and
//! duplicates. A typed AMQP header value (from a message bridged from
//! RabbitMQ) is written as its text.
//!
//! A record from another producer without an id header gets an id derived
//! from its topic, partition and offset, the same on every redelivery.

use bytes::Bytes;
use rdkafka::message::{Header, Headers, OwnedHeaders, Timestamp};

use broker_core::message::{derived_id, from_millis_since_epoch, header};
use broker_core::{HeaderValue, Message};

/// Headers of the record: the reserved ones, then the application's.
pub(crate) fn encode_headers(message: &Message) -> OwnedHeaders {
    let reserved = [
        (header::MESSAGE_ID, Some(message.id())),
        (header::CORRELATION_ID, message.correlation_id()),
        (header::TRACEPARENT, message.traceparent()),
        (header::CONTENT_TYPE, message.content_type()),
    ];
    let mut headers = OwnedHeaders::new_with_capacity(message.headers().len() + reserved.len());
    for (key, value) in reserved {
        // Already among the application's headers (a foreign record had it
        // after others, see `decode`): written there, in its place.
        let in_place = |value: &str| message.headers().get_all(key).any(|v| v == value);
        if let Some(value) = value.filter(|v| !in_place(v)) {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
    }
    for (key, value) in message.headers().iter() {
        let bytes = value.to_wire_bytes();
        headers = headers.insert(Header {
            key,
            value: bytes.as_deref(),
        });
    }
    headers
}

/// The message a record carries. A missing value (a tombstone) is a null payload.
pub(crate) fn decode(record: &impl rdkafka::Message) -> Message {
    let payload = record
        .payload()
        .map(Bytes::copy_from_slice)
        .unwrap_or_default();
    let tombstone = record.payload().is_none();
    let mut id = None;
    let mut correlation_id = None;
    let mut traceparent = None;
    let mut content_type = None;
    let mut user = broker_core::Headers::new();
    if let Some(headers) = record.headers() {
        // Reserved headers come first when `encode_headers` wrote them.
        let mut leading = true;
        for h in headers.iter() {
            // A reserved header is ours only once and only as UTF-8;
            // anything else is the application's, kept as it came.
            let text = h.value.and_then(|v| std::str::from_utf8(v).ok());
            let slot = match h.key {
                header::MESSAGE_ID => Some(&mut id),
                header::CORRELATION_ID => Some(&mut correlation_id),
                header::TRACEPARENT => Some(&mut traceparent),
                header::CONTENT_TYPE => Some(&mut content_type),
                _ => None,
            };
            match (slot, text) {
                // Borrowed: most ids are kept inline, without a string.
                (Some(slot @ None), Some(text)) => {
                    *slot = Some(text);
                    // After the application's headers (another producer's
                    // order, e.g. OpenTelemetry appends `traceparent`): also
                    // kept in place, so it goes out again where it was.
                    if !leading {
                        user.append(h.key, HeaderValue::from(text));
                    }
                }
                _ => {
                    leading = false;
                    user.append(h.key, h.value.map_or(HeaderValue::Null, HeaderValue::from))
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
    let foreign_id;
    let id = match id {
        Some(id) => id,
        None => {
            // The record's place in the log is what stays the same.
            let place = format!(
                "{}/{}/{}",
                record.topic(),
                record.partition(),
                record.offset()
            );
            foreign_id = derived_id(&[b"kafka", place.as_bytes()]);
            &foreign_id
        }
    };
    let mut message = match timestamp {
        Some(at) => Message::restore(id, payload, at),
        None => Message::new(payload).with_id(id),
    };
    if let Some(key) = record.key() {
        message = message.with_key(key);
    }
    if let Some(c) = correlation_id {
        message = message.with_correlation_id(c);
    }
    if let Some(t) = traceparent {
        message = message.with_traceparent(t);
    }
    if let Some(c) = content_type {
        message = message.with_content_type(c);
    }
    if tombstone {
        message = message.with_null_payload();
    }
    if user.is_empty() {
        message
    } else {
        message.with_headers(user)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use rdkafka::message::OwnedMessage;

    use super::*;

    fn record(message: &Message) -> OwnedMessage {
        OwnedMessage::new(
            (!message.payload_is_null()).then(|| message.payload().to_vec()),
            message.key().map(<[u8]>::to_vec),
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
            .with_content_type("application/json")
            .with_header("x-empty", "")
            .with_header("x-null", HeaderValue::Null)
            .with_header("dup", &[0xff, 0xfe][..])
            .with_header("a", "first")
            .with_header("dup", "2")
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
    fn foreign_record_gets_a_stable_id_and_a_null_payload() {
        let at = |offset| {
            OwnedMessage::new(
                None,
                None,
                "t".into(),
                Timestamp::NotAvailable,
                0,
                offset,
                None,
            )
        };
        let m = decode(&at(7));
        assert_eq!(m.id().len(), 36);
        assert_eq!(decode(&at(7)).id(), m.id(), "the same record, the same id");
        assert_ne!(decode(&at(8)).id(), m.id());
        assert!(m.payload().is_empty());
        assert!(m.payload_is_null());
        assert!(m.headers().is_empty());
        // A tombstone goes out as one.
        assert!(rdkafka::Message::payload(&record(&m)).is_none());
        assert!(!decode(&record(&Message::new(""))).payload_is_null());
    }

    #[test]
    fn foreign_reserved_headers_keep_their_place() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "a",
                value: Some(&b"1"[..]),
            })
            .insert(Header {
                key: "traceparent",
                value: Some(tp.as_bytes()),
            })
            .insert(Header {
                key: "b",
                value: Some(&b"2"[..]),
            });
        let r = OwnedMessage::new(
            Some(b"p".to_vec()),
            None,
            "t".into(),
            Timestamp::CreateTime(5),
            0,
            9,
            Some(headers),
        );
        let m = decode(&r);
        assert_eq!(m.traceparent(), Some(tp));
        let written: Vec<(String, Option<Vec<u8>>)> = encode_headers(&m)
            .iter()
            .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
            .collect();
        let names: Vec<&str> = written.iter().map(|(k, _)| k.as_str()).collect();
        // Only the derived id is added; the rest is as the producer wrote it.
        assert_eq!(names, ["message-id", "a", "traceparent", "b"]);
        assert_eq!(written[2].1.as_deref(), Some(tp.as_bytes()));
        assert_eq!(decode(&record(&m)), m);
    }

    #[test]
    fn foreign_bytes_and_reserved_names_are_kept() {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "content-type",
                value: Some(&[0xff][..]),
            })
            .insert(Header {
                key: "h",
                value: None::<&[u8]>,
            })
            .insert(Header {
                key: "h",
                value: Some(&b"v"[..]),
            });
        let r = OwnedMessage::new(
            Some(b"p".to_vec()),
            Some(vec![0xff, 0xfe]),
            "t".into(),
            Timestamp::CreateTime(5),
            0,
            0,
            Some(headers),
        );
        let m = decode(&r);
        assert_eq!(m.key(), Some(&[0xff, 0xfe][..]));
        assert_eq!(m.content_type(), None);
        let got: Vec<_> = m.headers().iter().map(|(n, v)| (n, v.clone())).collect();
        assert_eq!(
            got,
            [
                ("content-type", HeaderValue::from(&[0xff][..])),
                ("h", HeaderValue::Null),
                ("h", HeaderValue::from("v")),
            ]
        );
        // Written back: the same headers, bytes and nulls included.
        let again = decode(&record(&m));
        assert_eq!(again, m);
    }
}
