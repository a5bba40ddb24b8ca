//! A [`Message`] as an outbox row and back, exactly: key and payload as
//! `bytea`, headers as JSON `[[name, value], ...]` in order with repeats,
//! where a value is `{"b": base64}` (bytes), `null`, or `{"a": typed}` (a
//! typed AMQP value, `{"t": wire type, "v": value}`).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use broker_core::message::from_millis_since_epoch;
use broker_core::{AmqpProperties, AmqpValue, HeaderValue, Headers, Message};
use bytes::Bytes;
use serde_json::{json, Map, Value};

/// The columns of one row, as bound and read.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Row {
    pub message_id: String,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub null_payload: bool,
    pub headers: Value,
    pub content_type: Option<String>,
    pub correlation_id: Option<String>,
    pub traceparent: Option<String>,
    pub timestamp_ms: i64,
    pub amqp: Option<Value>,
}

impl Row {
    pub(crate) fn of(message: &Message) -> Row {
        Row {
            message_id: message.id().to_owned(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().to_vec(),
            null_payload: message.payload_is_null(),
            headers: headers_json(message.headers()),
            content_type: message.content_type().map(str::to_owned),
            correlation_id: message.correlation_id().map(str::to_owned),
            traceparent: message.traceparent().map(str::to_owned),
            timestamp_ms: message.timestamp_millis(),
            amqp: message.amqp().map(properties_json),
        }
    }

    /// The message the row holds. A row the library did not write (edited
    /// by hand) reads as far as it is well-formed: malformed headers are an
    /// error naming the row.
    pub(crate) fn message(&self) -> Result<Message, String> {
        let mut m = Message::restore(
            &self.message_id,
            Bytes::from(self.payload.clone()),
            from_millis_since_epoch(self.timestamp_ms),
        )
        .with_headers(headers_of(&self.headers)?);
        if let Some(k) = &self.key {
            m = m.with_key(k);
        }
        if self.null_payload {
            m = m.with_null_payload();
        }
        if let Some(v) = &self.content_type {
            m = m.with_content_type(v);
        }
        if let Some(v) = &self.correlation_id {
            m = m.with_correlation_id(v);
        }
        if let Some(v) = &self.traceparent {
            m = m.with_traceparent(v);
        }
        if let Some(p) = &self.amqp {
            m = m.with_amqp(properties_of(p)?);
        }
        Ok(m)
    }
}

fn headers_json(headers: &Headers) -> Value {
    Value::Array(
        headers
            .iter()
            .map(|(n, v)| json!([n, header_json(v)]))
            .collect(),
    )
}

fn header_json(v: &HeaderValue) -> Value {
    match v {
        HeaderValue::Bytes(b) => json!({ "b": B64.encode(b) }),
        HeaderValue::Null => Value::Null,
        HeaderValue::Amqp(a) => json!({ "a": amqp_json(a) }),
    }
}

fn amqp_json(v: &AmqpValue) -> Value {
    let (t, value) = match v {
        AmqpValue::Bool(x) => ("t", json!(x)),
        AmqpValue::I8(x) => ("b", json!(x)),
        AmqpValue::U8(x) => ("B", json!(x)),
        AmqpValue::I16(x) => ("s", json!(x)),
        AmqpValue::U16(x) => ("u", json!(x)),
        AmqpValue::I32(x) => ("I", json!(x)),
        AmqpValue::U32(x) => ("i", json!(x)),
        AmqpValue::I64(x) => ("l", json!(x)),
        // Floats by their bits: JSON numbers cannot hold NaN or keep -0.
        AmqpValue::F32(x) => ("f", json!(x.to_bits())),
        AmqpValue::F64(x) => ("d", json!(x.to_bits())),
        AmqpValue::Decimal { scale, value } => ("D", json!([scale, value])),
        AmqpValue::LongString(b) => ("S", json!(B64.encode(b))),
        AmqpValue::Array(items) => ("A", Value::Array(items.iter().map(amqp_json).collect())),
        AmqpValue::Timestamp(x) => ("T", json!(x)),
        AmqpValue::Table(fields) => (
            "F",
            Value::Array(
                fields
                    .iter()
                    .map(|(k, v)| json!([k, amqp_json(v)]))
                    .collect(),
            ),
        ),
        AmqpValue::ByteArray(b) => ("x", json!(B64.encode(b))),
        AmqpValue::Void => ("V", Value::Null),
    };
    json!({ "t": t, "v": value })
}

fn bad(what: &str, v: &Value) -> String {
    format!("outbox row: malformed {what}: {v}")
}

fn bytes_of(v: &Value) -> Result<Bytes, String> {
    v.as_str()
        .and_then(|s| B64.decode(s).ok())
        .map(Bytes::from)
        .ok_or_else(|| bad("base64 bytes", v))
}

fn headers_of(v: &Value) -> Result<Headers, String> {
    let items = v.as_array().ok_or_else(|| bad("headers", v))?;
    let mut headers = Headers::new();
    for item in items {
        let (name, value) = match item.as_array().map(Vec::as_slice) {
            Some([Value::String(n), value]) => (n, value),
            _ => return Err(bad("header", item)),
        };
        let value = match value {
            Value::Null => HeaderValue::Null,
            Value::Object(o) if o.contains_key("b") => HeaderValue::Bytes(bytes_of(&o["b"])?),
            Value::Object(o) if o.contains_key("a") => HeaderValue::from(amqp_of(&o["a"])?),
            other => return Err(bad("header value", other)),
        };
        headers.append(name.clone(), value);
    }
    Ok(headers)
}

fn amqp_of(v: &Value) -> Result<AmqpValue, String> {
    let t = v["t"].as_str().ok_or_else(|| bad("AMQP value", v))?;
    let x = &v["v"];
    let int = |x: &Value| x.as_i64().ok_or_else(|| bad("integer", x));
    let uint = |x: &Value| x.as_u64().ok_or_else(|| bad("integer", x));
    // An integer that must fit a narrower type.
    fn narrow<T: TryFrom<i128>>(n: i128, x: &Value) -> Result<T, String> {
        T::try_from(n).map_err(|_| bad("integer in range", x))
    }
    let signed = |x: &Value| int(x).map(i128::from);
    let unsigned = |x: &Value| uint(x).map(i128::from);
    Ok(match t {
        "t" => AmqpValue::Bool(x.as_bool().ok_or_else(|| bad("boolean", x))?),
        "b" => AmqpValue::I8(narrow(signed(x)?, x)?),
        "B" => AmqpValue::U8(narrow(unsigned(x)?, x)?),
        "s" => AmqpValue::I16(narrow(signed(x)?, x)?),
        "u" => AmqpValue::U16(narrow(unsigned(x)?, x)?),
        "I" => AmqpValue::I32(narrow(signed(x)?, x)?),
        "i" => AmqpValue::U32(narrow(unsigned(x)?, x)?),
        "l" => AmqpValue::I64(int(x)?),
        "f" => AmqpValue::F32(f32::from_bits(narrow(unsigned(x)?, x)?)),
        "d" => AmqpValue::F64(f64::from_bits(uint(x)?)),
        "D" => match x.as_array().map(Vec::as_slice) {
            Some([s, v]) => AmqpValue::Decimal {
                scale: narrow(unsigned(s)?, s)?,
                value: narrow(unsigned(v)?, v)?,
            },
            _ => return Err(bad("decimal", x)),
        },
        "S" => AmqpValue::LongString(bytes_of(x)?),
        "A" => AmqpValue::Array(
            x.as_array()
                .ok_or_else(|| bad("array", x))?
                .iter()
                .map(amqp_of)
                .collect::<Result<_, _>>()?,
        ),
        "T" => AmqpValue::Timestamp(uint(x)?),
        "F" => AmqpValue::Table(
            x.as_array()
                .ok_or_else(|| bad("table", x))?
                .iter()
                .map(|f| match f.as_array().map(Vec::as_slice) {
                    Some([Value::String(k), v]) => Ok((k.clone(), amqp_of(v)?)),
                    _ => Err(bad("table field", f)),
                })
                .collect::<Result<_, _>>()?,
        ),
        "x" => AmqpValue::ByteArray(bytes_of(x)?),
        "V" => AmqpValue::Void,
        _ => return Err(bad("AMQP type", v)),
    })
}

fn properties_json(p: &AmqpProperties) -> Value {
    let mut o = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            o.insert(k.to_owned(), v);
        }
    };
    put(
        "content_encoding",
        p.content_encoding.as_ref().map(|v| json!(v)),
    );
    put("type", p.kind.as_ref().map(|v| json!(v)));
    put("app_id", p.app_id.as_ref().map(|v| json!(v)));
    put("reply_to", p.reply_to.as_ref().map(|v| json!(v)));
    put("priority", p.priority.map(|v| json!(v)));
    put("expiration", p.expiration.as_ref().map(|v| json!(v)));
    put("user_id", p.user_id.as_ref().map(|v| json!(v)));
    put("cluster_id", p.cluster_id.as_ref().map(|v| json!(v)));
    put("delivery_mode", p.delivery_mode.map(|v| json!(v)));
    Value::Object(o)
}

fn properties_of(v: &Value) -> Result<AmqpProperties, String> {
    let o = v.as_object().ok_or_else(|| bad("AMQP properties", v))?;
    let text = |k: &str| o.get(k).and_then(Value::as_str).map(str::to_owned);
    let small = |k: &str| {
        o.get(k)
            .and_then(Value::as_u64)
            .and_then(|n| u8::try_from(n).ok())
    };
    Ok(AmqpProperties {
        content_encoding: text("content_encoding"),
        kind: text("type"),
        app_id: text("app_id"),
        reply_to: text("reply_to"),
        priority: small("priority"),
        expiration: text("expiration"),
        user_id: text("user_id"),
        cluster_id: text("cluster_id"),
        delivery_mode: small("delivery_mode"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use broker_core::testkit::{amqp_message, exact_message};

    #[test]
    fn messages_roundtrip_exactly() {
        let tombstone = Message::new("").with_key("gone").with_null_payload();
        let floats = Message::new("f")
            .with_header("nan", AmqpValue::F64(f64::NAN))
            .with_header("neg0", AmqpValue::F32(-0.0))
            .with_header("u8", AmqpValue::U8(255));
        for m in [exact_message(), amqp_message(), tombstone, floats] {
            let row = Row::of(&m);
            assert_eq!(row.message().unwrap(), m);
        }
    }

    #[test]
    fn malformed_headers_are_an_error() {
        let mut row = Row::of(&Message::new("x"));
        row.headers = json!([["h", {"b": "not base64!"}]]);
        assert!(row.message().unwrap_err().contains("base64"));
        row.headers = json!({"h": 1});
        assert!(row.message().is_err());
    }
}
