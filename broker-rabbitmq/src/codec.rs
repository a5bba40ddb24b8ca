//! [`Message`] to AMQP properties and back, exactly.
//!
//! Native properties carry the id, the correlation id, the content type, the
//! timestamp (in seconds, as AMQP defines it) and the other AMQP properties
//! ([`AmqpProperties`]). Headers carry what AMQP has no property for: the key
//! (bytes, as a long string), the timestamp's milliseconds when it is not a
//! whole second, and the `traceparent`. Application headers keep their AMQP
//! type ([`HeaderValue`]). AMQP tables hold each name once, in name order:
//! headers that repeat a name or come in another order (from Kafka, say) are
//! written with their values of one name as an array and their order in
//! [`HEADER_ORDER`], and read back as they were. Reading strips what writing
//! added, so a message reads back exactly as it was published.
//!
//! A message from another AMQP client without a `message_id` gets an id
//! derived from its content ([`broker_core::message::derived_id`] over body,
//! properties and headers), the same on every redelivery.

use broker_core::message::{derived_id, from_millis_since_epoch, header};
use broker_core::{AmqpProperties, AmqpValue, BrokerError, HeaderValue, Headers, Message};
use bytes::Bytes;
use lapin::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
};
use lapin::BasicProperties;

/// Header carrying the message key (AMQP routes by topic, not by key).
pub const KEY_HEADER: &str = "x-message-key";

/// Header listing the header names in their order, written only when the
/// headers repeat a name or are not in name order (AMQP tables cannot say so).
pub const HEADER_ORDER: &str = "x-header-order";

/// Delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

/// Header carrying a message's AMQP `expiration` while it waits in a delay
/// queue (see [`encode_delayed`]); read back into the property.
pub const DELAYED_EXPIRATION: &str = "x-delayed-expiration";

/// Headers RabbitMQ adds on redelivery and dead-lettering (a delay queue
/// dead-letters every message it releases); not part of the message.
const BROKER_HEADERS: [&str; 8] = [
    "x-delivery-count",
    "x-death",
    "x-first-death-reason",
    "x-first-death-queue",
    "x-first-death-exchange",
    "x-last-death-reason",
    "x-last-death-queue",
    "x-last-death-exchange",
];

pub(crate) fn short(what: &str, value: &str) -> Result<ShortString, BrokerError> {
    ShortString::try_new(value).map_err(|_| BrokerError::Rejected {
        backend: "rabbitmq",
        reason: format!("{what} is {} bytes; AMQP allows at most 255", value.len()),
    })
}

fn long(bytes: &[u8]) -> AMQPValue {
    AMQPValue::LongString(LongString::from(bytes))
}

/// Our value as lapin's.
fn to_amqp(value: &AmqpValue) -> Result<AMQPValue, BrokerError> {
    Ok(match value {
        AmqpValue::Bool(v) => AMQPValue::Boolean(*v),
        AmqpValue::I8(v) => AMQPValue::ShortShortInt(*v),
        AmqpValue::U8(v) => AMQPValue::ShortShortUInt(*v),
        AmqpValue::I16(v) => AMQPValue::ShortInt(*v),
        AmqpValue::U16(v) => AMQPValue::ShortUInt(*v),
        AmqpValue::I32(v) => AMQPValue::LongInt(*v),
        AmqpValue::U32(v) => AMQPValue::LongUInt(*v),
        AmqpValue::I64(v) => AMQPValue::LongLongInt(*v),
        AmqpValue::F32(v) => AMQPValue::Float(*v),
        AmqpValue::F64(v) => AMQPValue::Double(*v),
        AmqpValue::Decimal { scale, value } => AMQPValue::DecimalValue(DecimalValue {
            scale: *scale,
            value: *value,
        }),
        AmqpValue::LongString(b) => long(b),
        AmqpValue::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items.iter().map(to_amqp).collect::<Result<Vec<_>, _>>()?,
        )),
        AmqpValue::Timestamp(v) => AMQPValue::Timestamp(*v),
        AmqpValue::Table(fields) => {
            let mut table = FieldTable::default();
            for (name, v) in fields {
                table.insert(short(&format!("table field `{name}`"), name)?, to_amqp(v)?);
            }
            AMQPValue::FieldTable(table)
        }
        AmqpValue::ByteArray(b) => AMQPValue::ByteArray(ByteArray::from(b.to_vec())),
        AmqpValue::Void => AMQPValue::Void,
    })
}

/// lapin's value as ours. Short strings never come from the wire (RabbitMQ's
/// field types have none): one is read as a long string.
fn from_amqp(value: &AMQPValue) -> AmqpValue {
    match value {
        AMQPValue::Boolean(v) => AmqpValue::Bool(*v),
        AMQPValue::ShortShortInt(v) => AmqpValue::I8(*v),
        AMQPValue::ShortShortUInt(v) => AmqpValue::U8(*v),
        AMQPValue::ShortInt(v) => AmqpValue::I16(*v),
        AMQPValue::ShortUInt(v) => AmqpValue::U16(*v),
        AMQPValue::LongInt(v) => AmqpValue::I32(*v),
        AMQPValue::LongUInt(v) => AmqpValue::U32(*v),
        AMQPValue::LongLongInt(v) => AmqpValue::I64(*v),
        AMQPValue::Float(v) => AmqpValue::F32(*v),
        AMQPValue::Double(v) => AmqpValue::F64(*v),
        AMQPValue::DecimalValue(d) => AmqpValue::Decimal {
            scale: d.scale,
            value: d.value,
        },
        AMQPValue::ShortString(s) => {
            AmqpValue::LongString(Bytes::copy_from_slice(s.as_str().as_bytes()))
        }
        AMQPValue::LongString(s) => AmqpValue::LongString(Bytes::copy_from_slice(s.as_bytes())),
        AMQPValue::FieldArray(a) => AmqpValue::Array(a.as_slice().iter().map(from_amqp).collect()),
        AMQPValue::Timestamp(v) => AmqpValue::Timestamp(*v),
        AMQPValue::FieldTable(t) => AmqpValue::Table(
            t.inner()
                .iter()
                .map(|(k, v)| (k.to_string(), from_amqp(v)))
                .collect(),
        ),
        AMQPValue::ByteArray(b) => AmqpValue::ByteArray(Bytes::copy_from_slice(b.as_slice())),
        AMQPValue::Void => AmqpValue::Void,
    }
}

fn header_to_amqp(value: &HeaderValue) -> Result<AMQPValue, BrokerError> {
    match value {
        HeaderValue::Bytes(b) => Ok(long(b)),
        HeaderValue::Null => Ok(AMQPValue::Void),
        HeaderValue::Amqp(v) => to_amqp(v),
    }
}

/// The application headers as an AMQP table (see the module docs).
fn encode_headers(headers: &Headers, table: &mut FieldTable) -> Result<(), BrokerError> {
    let names: Vec<&str> = headers.iter().map(|(n, _)| n).collect();
    // A table keeps names sorted and unique: anything else needs the order.
    let tabular = names.windows(2).all(|w| w[0] < w[1]);
    for (i, (name, value)) in headers.iter().enumerate() {
        let key = short(&format!("header name `{name}`"), name)?;
        if tabular {
            table.insert(key, header_to_amqp(value)?);
        } else if !names[..i].contains(&name) {
            let values: Vec<&HeaderValue> = headers.get_all(name).collect();
            let value = match values.as_slice() {
                [one] => header_to_amqp(one)?,
                many => AMQPValue::FieldArray(FieldArray::from(
                    many.iter()
                        .map(|v| header_to_amqp(v))
                        .collect::<Result<Vec<_>, _>>()?,
                )),
            };
            table.insert(key, value);
        }
    }
    if !tabular {
        let order = names.iter().map(|n| long(n.as_bytes())).collect::<Vec<_>>();
        table.insert(
            ShortString::from(HEADER_ORDER),
            AMQPValue::FieldArray(FieldArray::from(order)),
        );
    }
    Ok(())
}

/// The AMQP properties of `message` (its payload goes as the body, unchanged).
pub(crate) fn encode(message: &Message) -> Result<BasicProperties, BrokerError> {
    let mut headers = FieldTable::default();
    encode_headers(message.headers(), &mut headers)?;
    let mut put = |name: &str, value: &[u8]| {
        headers.insert(ShortString::from(name), long(value));
    };
    let ms = message.timestamp_millis();
    // The AMQP timestamp has seconds; the header only when that loses something.
    if ms < 0 || ms % 1000 != 0 {
        put(header::TIMESTAMP, ms.to_string().as_bytes());
    }
    if let Some(key) = message.key() {
        put(KEY_HEADER, key);
    }
    if let Some(tp) = message.traceparent() {
        put(header::TRACEPARENT, tp.as_bytes());
    }
    let mut props = BasicProperties::default().with_delivery_mode(PERSISTENT);
    // Ids longer than an AMQP short string go in a header instead.
    match ShortString::try_new(message.id()) {
        Ok(id) => props = props.with_message_id(id),
        Err(_) => put(header::MESSAGE_ID, message.id().as_bytes()),
    }
    if let Some(cid) = message.correlation_id() {
        match ShortString::try_new(cid) {
            Ok(cid) => props = props.with_correlation_id(cid),
            Err(_) => put(header::CORRELATION_ID, cid.as_bytes()),
        }
    }
    if ms >= 0 {
        props = props.with_timestamp((ms / 1000) as u64);
    }
    if let Some(ct) = message.content_type() {
        props = props.with_content_type(short("content type", ct)?);
    }
    if let Some(p) = message.amqp() {
        props = encode_properties(props, p)?;
    }
    Ok(props.with_headers(headers))
}

/// The AMQP properties of `message` on its way into a delay queue: as
/// [`encode`], except that an `expiration` property travels in the
/// [`DELAYED_EXPIRATION`] header. RabbitMQ would otherwise expire the
/// message in the delay queue when its own time-to-live is shorter than the
/// queue's, releasing it early, and it drops the property of every message
/// it dead-letters anyway. [`decode`] puts it back, so the message reads
/// back as published; RabbitMQ no longer enforces it after the delay.
pub(crate) fn encode_delayed(message: &Message) -> Result<BasicProperties, BrokerError> {
    let Some(expiration) = message.amqp().and_then(|p| p.expiration.clone()) else {
        return encode(message);
    };
    let mut without = message.clone();
    without.amqp_mut().expiration = None;
    let props = encode(&without)?;
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert(
        ShortString::from(DELAYED_EXPIRATION),
        long(expiration.as_bytes()),
    );
    Ok(props.with_headers(headers))
}

/// The properties without a common field. `user_id` and `delivery_mode` are
/// not sent again (see [`AmqpProperties`]).
fn encode_properties(
    mut props: BasicProperties,
    p: &AmqpProperties,
) -> Result<BasicProperties, BrokerError> {
    if let Some(v) = &p.content_encoding {
        props = props.with_content_encoding(short("content encoding", v)?);
    }
    if let Some(v) = &p.kind {
        props = props.with_type(short("type", v)?);
    }
    if let Some(v) = &p.app_id {
        props = props.with_app_id(short("app id", v)?);
    }
    if let Some(v) = &p.reply_to {
        props = props.with_reply_to(short("reply-to", v)?);
    }
    if let Some(v) = p.priority {
        props = props.with_priority(v);
    }
    if let Some(v) = &p.expiration {
        props = props.with_expiration(short("expiration", v)?);
    }
    if let Some(v) = &p.cluster_id {
        props = props.with_cluster_id(short("cluster id", v)?);
    }
    Ok(props)
}

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// A long string holding UTF-8 text, as `encode` writes its text headers.
fn utf8_long_string(value: &AMQPValue) -> Option<&str> {
    match value {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        _ => None,
    }
}

/// A long string holding a decimal integer, as `encode` writes `timestamp-ms`.
fn ours_integer(value: &AMQPValue) -> Option<i64> {
    utf8_long_string(value).and_then(|s| s.parse().ok())
}

/// The application headers of a table, in the order [`HEADER_ORDER`] gives
/// when it is there and matches the table, else in the table's order.
fn decode_headers(user: Vec<(&str, &AMQPValue)>, order: Option<&AMQPValue>) -> Headers {
    let plain = |user: &[(&str, &AMQPValue)]| -> Headers {
        user.iter()
            .map(|(n, v)| (*n, HeaderValue::from(from_amqp(v))))
            .collect()
    };
    let Some(AMQPValue::FieldArray(order)) = order else {
        return plain(&user);
    };
    let names: Option<Vec<String>> = order.as_slice().iter().map(text).collect();
    let Some(names) = names else {
        return plain(&user);
    };
    let mut headers = Headers::new();
    for (name, value) in &user {
        let count = names.iter().filter(|n| n == name).count();
        if count > 1 && !matches!(value, AMQPValue::FieldArray(a) if a.as_slice().len() == count) {
            return plain(&user);
        }
    }
    if names.iter().any(|n| !user.iter().any(|(u, _)| u == n))
        || user.iter().any(|(u, _)| !names.iter().any(|n| n == u))
    {
        return plain(&user);
    }
    let mut taken: Vec<(&str, usize)> = Vec::new();
    for name in &names {
        let (_, value) = user.iter().find(|(u, _)| u == name).expect("checked above");
        let count = names.iter().filter(|n| *n == name).count();
        let value = if count > 1 {
            let seen = match taken.iter_mut().find(|(n, _)| n == name) {
                Some((_, i)) => {
                    *i += 1;
                    *i
                }
                None => {
                    taken.push((name, 0));
                    0
                }
            };
            match value {
                AMQPValue::FieldArray(a) => &a.as_slice()[seen],
                _ => unreachable!("checked above"),
            }
        } else {
            value
        };
        headers.append(name.clone(), HeaderValue::from(from_amqp(value)));
    }
    headers
}

/// How often the queue delivered this message before without it being
/// settled: quorum queues' `x-delivery-count` (returned by a nack with
/// requeue, or with the channel of a consumer that stopped or crashed).
/// Classic queues keep no count: 1 when redelivered, else 0.
pub(crate) fn earlier_deliveries(props: &BasicProperties, redelivered: bool) -> u32 {
    let counted = props
        .headers()
        .as_ref()
        .and_then(|t| t.inner().get("x-delivery-count"))
        .and_then(|v| match v {
            AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
            AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
            AMQPValue::LongUInt(n) => Some(*n),
            AMQPValue::ShortInt(n) => u32::try_from(*n).ok(),
            AMQPValue::ShortUInt(n) => Some(u32::from(*n)),
            _ => None,
        });
    counted.unwrap_or(u32::from(redelivered))
}

/// Rebuilds the message from a delivery's properties and body.
pub(crate) fn decode(props: &BasicProperties, body: Vec<u8>) -> Message {
    let mut user = Vec::new();
    let mut key = None;
    let mut traceparent = None;
    let mut timestamp_ms = None;
    let mut id_header = None;
    let mut correlation_header = None;
    let mut delayed_expiration = None;
    let mut order = None;
    if let Some(table) = props.headers() {
        for (name, value) in table.inner() {
            match name.as_str() {
                // Ours only in the form `encode` writes: anything else is
                // the application's header, kept as it came.
                // Each value is read once: the guard of a match arm cannot
                // keep what it parsed.
                header::TIMESTAMP if timestamp_ms.is_none() => match ours_integer(value) {
                    Some(ms) => timestamp_ms = Some(ms),
                    None => user.push((name.as_str(), value)),
                },
                KEY_HEADER => match value {
                    AMQPValue::LongString(k) => key = Some(k.as_bytes()),
                    other => user.push((name.as_str(), other)),
                },
                HEADER_ORDER => order = Some(value),
                header::TRACEPARENT => match utf8_long_string(value) {
                    Some(text) => traceparent = Some(text),
                    None => user.push((name.as_str(), value)),
                },
                n if BROKER_HEADERS.contains(&n) => {}
                DELAYED_EXPIRATION if props.expiration().is_none() => {
                    match utf8_long_string(value) {
                        Some(text) => delayed_expiration = Some(text),
                        None => user.push((name.as_str(), value)),
                    }
                }
                // Only ours when the native property is absent (see `encode`).
                header::MESSAGE_ID if props.message_id().is_none() => id_header = text(value),
                header::CORRELATION_ID if props.correlation_id().is_none() => {
                    correlation_header = text(value)
                }
                n => user.push((n, value)),
            }
        }
    }
    let headers = decode_headers(user, order);
    let id = props
        .message_id()
        .as_ref()
        .map(|s| s.to_string())
        .or(id_header);
    let body = Bytes::from(body);
    let mut message = Message::new(body.clone()).with_headers(headers);
    if let Some(k) = key {
        message = message.with_key(k);
    }
    if let Some(cid) = props
        .correlation_id()
        .as_ref()
        .map(|s| s.to_string())
        .or(correlation_header)
    {
        message = message.with_correlation_id(cid);
    }
    if let Some(tp) = traceparent {
        message = message.with_traceparent(tp);
    }
    if let Some(ct) = props.content_type() {
        message = message.with_content_type(ct.as_str());
    }
    message = message.with_amqp(AmqpProperties {
        content_encoding: props.content_encoding().as_ref().map(|s| s.to_string()),
        kind: props.kind().as_ref().map(|s| s.to_string()),
        app_id: props.app_id().as_ref().map(|s| s.to_string()),
        reply_to: props.reply_to().as_ref().map(|s| s.to_string()),
        priority: *props.priority(),
        expiration: props
            .expiration()
            .as_ref()
            .map(|s| s.to_string())
            .or(delayed_expiration.map(str::to_owned)),
        user_id: props.user_id().as_ref().map(|s| s.to_string()),
        cluster_id: props.cluster_id().as_ref().map(|s| s.to_string()),
        // Ours are always persistent: only another value is worth keeping.
        delivery_mode: props.delivery_mode().filter(|m| *m != PERSISTENT),
    });
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
    match id {
        Some(id) => message.with_id(id),
        None => {
            // The same content gives the same id on every redelivery.
            let summary = format!(
                "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}",
                message.key(),
                message.headers(),
                message.correlation_id(),
                message.content_type(),
                message.amqp(),
                props.timestamp(),
            );
            let id = derived_id(&[b"rabbitmq", &body, summary.as_bytes()]);
            message.with_id(id)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn roundtrip(m: &Message) -> Message {
        decode(&encode(m).unwrap(), m.payload().to_vec())
    }

    #[test]
    fn roundtrip_is_exact() {
        let full = Message::new(&b"{\"a\":1}"[..])
            .with_key("k-1")
            .with_content_type("application/json")
            .with_header("x-unicode", "caf\u{e9} \u{2713}")
            .with_header("x-empty", "")
            .with_correlation_id("req-1")
            .with_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .with_timestamp(SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123));
        let whole_second = Message::new("s")
            .with_timestamp(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        let bare = Message::new(Bytes::new());
        for m in [full, whole_second, bare] {
            let props = encode(&m).unwrap();
            assert_eq!(props.delivery_mode(), &Some(PERSISTENT));
            assert_eq!(roundtrip(&m), m);
        }
    }

    #[test]
    fn bytes_duplicates_order_and_types_roundtrip() {
        let m = Message::new("x")
            .with_key(&[0xff, 0xfe][..])
            .with_header("z", &[0xff][..])
            .with_header("dup", "1")
            .with_header("a", HeaderValue::Null)
            .with_header("dup", "2")
            .with_header("n", AmqpValue::I32(-7))
            .with_header(
                "t",
                AmqpValue::Table(vec![
                    ("b".into(), AmqpValue::Bool(true)),
                    ("d".into(), AmqpValue::Decimal { scale: 2, value: 5 }),
                ]),
            )
            .with_amqp(AmqpProperties {
                kind: Some("order.created".into()),
                app_id: Some("shop".into()),
                reply_to: Some("replies".into()),
                priority: Some(5),
                content_encoding: Some("identity".into()),
                ..Default::default()
            });
        let back = roundtrip(&m);
        assert_eq!(back, m);
        assert_eq!(
            back.headers().get_all("dup").collect::<Vec<_>>(),
            ["1", "2"]
        );
        let props = encode(&m).unwrap();
        assert_eq!(props.kind().as_ref().unwrap().as_str(), "order.created");
        assert_eq!(props.priority(), &Some(5));
    }

    #[test]
    fn sorted_unique_headers_need_no_order_header() {
        let m = Message::new("x")
            .with_header("a", "1")
            .with_header("b", "2");
        let props = encode(&m).unwrap();
        assert!(!props.headers().as_ref().unwrap().contains_key(HEADER_ORDER));
        let m = Message::new("x")
            .with_header("b", "1")
            .with_header("a", "2");
        let props = encode(&m).unwrap();
        assert!(props.headers().as_ref().unwrap().contains_key(HEADER_ORDER));
        assert_eq!(roundtrip(&m), m);
    }

    #[test]
    fn long_ids_and_user_headers_named_like_ours() {
        let long = "i".repeat(300);
        let m = Message::new("x")
            .with_id(long.clone())
            .with_correlation_id(long);
        let props = encode(&m).unwrap();
        assert!(props.message_id().is_none());
        assert_eq!(roundtrip(&m), m);
        // With the id in its property, a user header of the same name is the user's.
        let m = Message::new("x").with_header("message-id", "user value");
        assert_eq!(roundtrip(&m), m);
    }

    #[test]
    fn reserved_names_in_other_forms_stay_the_applications() {
        let mut table = FieldTable::default();
        table.insert("traceparent".into(), AMQPValue::LongInt(7));
        table.insert("timestamp-ms".into(), AMQPValue::Boolean(true));
        table.insert(DELAYED_EXPIRATION.into(), AMQPValue::LongInt(9));
        let props = BasicProperties::default()
            .with_message_id("id-1".into())
            .with_timestamp(1_700_000_000)
            .with_headers(table);
        let m = decode(&props, vec![]);
        assert_eq!(m.traceparent(), None);
        assert_eq!(
            m.headers()["traceparent"],
            HeaderValue::Amqp(AmqpValue::I32(7))
        );
        assert_eq!(
            m.headers()["timestamp-ms"],
            HeaderValue::Amqp(AmqpValue::Bool(true))
        );
        assert_eq!(
            m.headers()[DELAYED_EXPIRATION],
            HeaderValue::Amqp(AmqpValue::I32(9))
        );
        assert_eq!(m.amqp(), None);
        assert_eq!(m.timestamp_millis(), 1_700_000_000_000);
        let again = encode(&m).unwrap();
        let table = again.headers().clone().unwrap();
        assert_eq!(table.inner()["traceparent"], AMQPValue::LongInt(7));
        assert_eq!(table.inner()["timestamp-ms"], AMQPValue::Boolean(true));
    }

    #[test]
    fn a_delayed_message_reads_back_as_published() {
        let m = Message::new("x")
            .with_key("k")
            .with_header("app", "1")
            .with_amqp(AmqpProperties {
                expiration: Some("1000".into()),
                priority: Some(2),
                ..Default::default()
            });
        let props = encode_delayed(&m).unwrap();
        assert_eq!(
            props.expiration(),
            &None,
            "no time-to-live in the delay queue"
        );
        // What RabbitMQ adds when the delay queue releases it.
        let mut table = props.headers().clone().unwrap();
        table.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::default()),
        );
        table.insert("x-delivery-count".into(), AMQPValue::LongLongInt(0));
        for name in ["reason", "queue", "exchange"] {
            table.insert(format!("x-first-death-{name}").as_str().into(), long(b"v"));
            table.insert(format!("x-last-death-{name}").as_str().into(), long(b"v"));
        }
        let released = props.with_headers(table);
        assert_eq!(decode(&released, b"x".to_vec()), m);
        // Without an expiration, the same as a plain publish.
        let plain = Message::new("y").with_header("b", "2");
        assert_eq!(encode_delayed(&plain).unwrap(), encode(&plain).unwrap());
    }

    #[test]
    fn long_header_name_is_rejected() {
        let m = Message::new("x").with_header("h".repeat(256), "v");
        assert!(matches!(encode(&m), Err(BrokerError::Rejected { .. })));
    }

    #[test]
    fn foreign_messages_keep_types_and_get_a_stable_id() {
        let mut table = FieldTable::default();
        table.insert("x-delivery-count".into(), AMQPValue::LongLongInt(2));
        table.insert("n".into(), AMQPValue::LongInt(5));
        table.insert("flag".into(), AMQPValue::Boolean(true));
        let props = BasicProperties::default()
            .with_timestamp(1_700_000_000)
            .with_app_id("other".into())
            .with_headers(table);
        let m = decode(&props, b"body".to_vec());
        assert_eq!(m.headers().len(), 2);
        assert_eq!(m.headers()["n"], HeaderValue::Amqp(AmqpValue::I32(5)));
        assert_eq!(m.timestamp_millis(), 1_700_000_000_000);
        assert_eq!(m.amqp().unwrap().app_id.as_deref(), Some("other"));
        // Same content, same id; other content, another id.
        assert_eq!(decode(&props, b"body".to_vec()).id(), m.id());
        assert_ne!(decode(&props, b"other".to_vec()).id(), m.id());
        // And it goes back out with its types and properties.
        let again = encode(&m).unwrap();
        assert_eq!(
            again.headers().as_ref().unwrap().inner()["n"],
            AMQPValue::LongInt(5)
        );
        assert_eq!(again.app_id().as_ref().unwrap().as_str(), "other");
    }
}
