//! [`Message`] to AMQP properties and back.
//!
//! Native properties carry the id, the correlation id and the timestamp (in
//! seconds, as AMQP defines it). Headers carry what AMQP has no property for:
//! the key, the exact timestamp in milliseconds and the `traceparent`. User
//! headers travel as AMQP long strings. Reading strips what writing added, so
//! a message reads back exactly as it was published.

use broker_core::message::{from_millis_since_epoch, header};
use broker_core::{BrokerError, Headers, Message};
use bytes::Bytes;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

/// Header carrying the message key (AMQP routes by topic, not by key).
pub const KEY_HEADER: &str = "x-message-key";

/// Delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

/// Headers RabbitMQ adds on redelivery and dead-lettering; not part of the message.
const BROKER_HEADERS: [&str; 2] = ["x-delivery-count", "x-death"];

pub(crate) fn short(what: &str, value: &str) -> Result<ShortString, BrokerError> {
    ShortString::try_new(value).map_err(|_| BrokerError::Rejected {
        backend: "rabbitmq",
        reason: format!("{what} is {} bytes; AMQP allows at most 255", value.len()),
    })
}

/// The AMQP properties of `message` (its payload goes as the body, unchanged).
pub(crate) fn encode(message: &Message) -> Result<BasicProperties, BrokerError> {
    let mut headers = FieldTable::default();
    for (name, value) in message.headers() {
        headers.insert(
            short(&format!("header name `{name}`"), name)?,
            AMQPValue::LongString(LongString::from(value.as_bytes())),
        );
    }
    let mut put = |name: &str, value: &str| {
        headers.insert(
            ShortString::from(name),
            AMQPValue::LongString(LongString::from(value.as_bytes())),
        );
    };
    put(header::TIMESTAMP, &message.timestamp_millis().to_string());
    if let Some(key) = message.key() {
        put(KEY_HEADER, key);
    }
    if let Some(tp) = message.traceparent() {
        put(header::TRACEPARENT, tp);
    }
    let mut props = BasicProperties::default().with_delivery_mode(PERSISTENT);
    // Ids longer than an AMQP short string go in a header instead.
    match ShortString::try_new(message.id()) {
        Ok(id) => props = props.with_message_id(id),
        Err(_) => put(header::MESSAGE_ID, message.id()),
    }
    if let Some(cid) = message.correlation_id() {
        match ShortString::try_new(cid) {
            Ok(cid) => props = props.with_correlation_id(cid),
            Err(_) => put(header::CORRELATION_ID, cid),
        }
    }
    let ms = message.timestamp_millis();
    if ms >= 0 {
        props = props.with_timestamp((ms / 1000) as u64);
    }
    Ok(props.with_headers(headers))
}

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn integer(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok(),
        other => text(other).and_then(|s| s.parse().ok()),
    }
}

/// Rebuilds the message from a delivery's properties and body.
pub(crate) fn decode(props: &BasicProperties, body: Vec<u8>) -> Message {
    let mut headers = Headers::new();
    let mut key = None;
    let mut traceparent = None;
    let mut timestamp_ms = None;
    let mut id_header = None;
    let mut correlation_header = None;
    if let Some(table) = props.headers() {
        for (name, value) in table.inner() {
            match name.as_str() {
                header::TIMESTAMP => timestamp_ms = integer(value),
                KEY_HEADER => key = text(value),
                header::TRACEPARENT => traceparent = text(value),
                n if BROKER_HEADERS.contains(&n) => {}
                n => {
                    let Some(v) = text(value) else { continue };
                    match n {
                        // Only ours when the native property is absent (see `encode`).
                        header::MESSAGE_ID if props.message_id().is_none() => id_header = Some(v),
                        header::CORRELATION_ID if props.correlation_id().is_none() => {
                            correlation_header = Some(v)
                        }
                        _ => {
                            headers.insert(n.to_owned(), v);
                        }
                    }
                }
            }
        }
    }
    let mut message = Message::new(Bytes::from(body)).with_headers(headers);
    if let Some(id) = props
        .message_id()
        .as_ref()
        .map(|s| s.to_string())
        .or(id_header)
    {
        message = message.with_id(id);
    }
    if let Some(cid) = props
        .correlation_id()
        .as_ref()
        .map(|s| s.to_string())
        .or(correlation_header)
    {
        message = message.with_correlation_id(cid);
    }
    if let Some(k) = key {
        message = message.with_key(k);
    }
    if let Some(tp) = traceparent {
        message = message.with_traceparent(tp);
    }
    // Foreign producers may only set the AMQP timestamp (seconds).
    let ms = timestamp_ms.or_else(|| {
        props
            .timestamp()
            .and_then(|s| i64::try_from(s).ok())
            .map(|s| s * 1000)
    });
    if let Some(ms) = ms {
        message = message.with_timestamp(from_millis_since_epoch(ms));
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn roundtrip_is_exact() {
        let full = Message::new(&b"{\"a\":1}"[..])
            .with_key("k-1")
            .with_header("content-type", "application/json")
            .with_header("x-unicode", "caf\u{e9} \u{2713}")
            .with_header("x-empty", "")
            .with_correlation_id("req-1")
            .with_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .with_timestamp(SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123));
        let bare = Message::new(Bytes::new());
        for m in [full, bare] {
            let props = encode(&m).unwrap();
            assert_eq!(props.delivery_mode(), &Some(PERSISTENT));
            assert_eq!(decode(&props, m.payload().to_vec()), m);
        }
    }

    #[test]
    fn long_ids_and_user_headers_named_like_ours() {
        let long = "i".repeat(300);
        let m = Message::new("x")
            .with_id(long.clone())
            .with_correlation_id(long);
        let props = encode(&m).unwrap();
        assert!(props.message_id().is_none());
        assert_eq!(decode(&props, b"x".to_vec()), m);
        // With the id in its property, a user header of the same name is the user's.
        let m = Message::new("x").with_header("message-id", "user value");
        assert_eq!(decode(&encode(&m).unwrap(), b"x".to_vec()), m);
    }

    #[test]
    fn long_header_name_is_rejected() {
        let m = Message::new("x").with_header("h".repeat(256), "v");
        assert!(matches!(encode(&m), Err(BrokerError::Rejected { .. })));
    }

    #[test]
    fn broker_headers_and_foreign_timestamps() {
        let mut table = FieldTable::default();
        table.insert("x-delivery-count".into(), AMQPValue::LongLongInt(2));
        table.insert("n".into(), AMQPValue::LongInt(5));
        let props = BasicProperties::default()
            .with_timestamp(1_700_000_000)
            .with_headers(table);
        let m = decode(&props, vec![]);
        assert!(m.headers().is_empty());
        assert_eq!(m.timestamp_millis(), 1_700_000_000_000);
    }
}
