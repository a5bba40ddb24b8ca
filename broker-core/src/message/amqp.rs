//! What AMQP 0-9-1 carries that has no common field: typed header values and
//! the message properties. Kept on messages received from RabbitMQ so that a
//! dead letter, a replay or a bridge to RabbitMQ sends them back unchanged.

use std::fmt;

use bytes::Bytes;

/// An AMQP 0-9-1 field value, as RabbitMQ carries it in header tables.
///
/// Mirrors the wire types (RabbitMQ's reading of the spec), so that the core
/// does not depend on an AMQP client. Floats compare by their bits.
#[derive(Clone)]
pub enum AmqpValue {
    /// `t`
    Bool(bool),
    /// `b`
    I8(i8),
    /// `B`
    U8(u8),
    /// `s` (RabbitMQ's short int)
    I16(i16),
    /// `u`
    U16(u16),
    /// `I`
    I32(i32),
    /// `i`
    U32(u32),
    /// `l`
    I64(i64),
    /// `f`
    F32(f32),
    /// `d`
    F64(f64),
    /// `D`: `value` × 10^-`scale`.
    Decimal {
        /// Digits after the point.
        scale: u8,
        /// Unscaled value.
        value: u32,
    },
    /// `S`: bytes (AMQP long strings need not be UTF-8).
    LongString(Bytes),
    /// `A`
    Array(Vec<AmqpValue>),
    /// `T`: seconds since the Unix epoch.
    Timestamp(u64),
    /// `F`: a nested table, in the order received.
    Table(Vec<(String, AmqpValue)>),
    /// `x`: RabbitMQ's byte array.
    ByteArray(Bytes),
    /// `V`
    Void,
}

impl AmqpValue {
    /// Text for a broker without typed headers and for display: numbers in
    /// decimal, booleans as `true`/`false`, timestamps as seconds, strings and
    /// byte arrays as their bytes read as UTF-8, void as `""`, arrays and
    /// tables as JSON.
    pub fn to_text(&self) -> String {
        match self {
            AmqpValue::Bool(v) => v.to_string(),
            AmqpValue::I8(v) => v.to_string(),
            AmqpValue::U8(v) => v.to_string(),
            AmqpValue::I16(v) => v.to_string(),
            AmqpValue::U16(v) => v.to_string(),
            AmqpValue::I32(v) => v.to_string(),
            AmqpValue::U32(v) => v.to_string(),
            AmqpValue::I64(v) => v.to_string(),
            AmqpValue::F32(v) => v.to_string(),
            AmqpValue::F64(v) => v.to_string(),
            AmqpValue::Decimal { scale, value } => decimal_text(*scale, *value),
            AmqpValue::LongString(b) | AmqpValue::ByteArray(b) => {
                String::from_utf8_lossy(b).into_owned()
            }
            AmqpValue::Timestamp(v) => v.to_string(),
            AmqpValue::Void => String::new(),
            AmqpValue::Array(_) | AmqpValue::Table(_) => self.to_json().to_string(),
        }
    }

    fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            AmqpValue::Bool(v) => Value::from(*v),
            AmqpValue::I8(v) => Value::from(*v),
            AmqpValue::U8(v) => Value::from(*v),
            AmqpValue::I16(v) => Value::from(*v),
            AmqpValue::U16(v) => Value::from(*v),
            AmqpValue::I32(v) => Value::from(*v),
            AmqpValue::U32(v) => Value::from(*v),
            AmqpValue::I64(v) => Value::from(*v),
            AmqpValue::Timestamp(v) => Value::from(*v),
            AmqpValue::F32(v) => Value::from(*v),
            AmqpValue::F64(v) => Value::from(*v),
            AmqpValue::Void => Value::Null,
            AmqpValue::Array(items) => Value::Array(items.iter().map(Self::to_json).collect()),
            AmqpValue::Table(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_json()))
                    .collect(),
            ),
            other => Value::String(other.to_text()),
        }
    }

    fn tag(&self) -> u8 {
        match self {
            AmqpValue::Bool(_) => b't',
            AmqpValue::I8(_) => b'b',
            AmqpValue::U8(_) => b'B',
            AmqpValue::I16(_) => b's',
            AmqpValue::U16(_) => b'u',
            AmqpValue::I32(_) => b'I',
            AmqpValue::U32(_) => b'i',
            AmqpValue::I64(_) => b'l',
            AmqpValue::F32(_) => b'f',
            AmqpValue::F64(_) => b'd',
            AmqpValue::Decimal { .. } => b'D',
            AmqpValue::LongString(_) => b'S',
            AmqpValue::Array(_) => b'A',
            AmqpValue::Timestamp(_) => b'T',
            AmqpValue::Table(_) => b'F',
            AmqpValue::ByteArray(_) => b'x',
            AmqpValue::Void => b'V',
        }
    }
}

fn decimal_text(scale: u8, value: u32) -> String {
    let digits = value.to_string();
    let scale = usize::from(scale);
    if scale == 0 {
        return digits;
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    format!("{int}.{frac}")
}

impl PartialEq for AmqpValue {
    fn eq(&self, other: &Self) -> bool {
        use AmqpValue::*;
        match (self, other) {
            (F32(a), F32(b)) => a.to_bits() == b.to_bits(),
            (F64(a), F64(b)) => a.to_bits() == b.to_bits(),
            (Bool(a), Bool(b)) => a == b,
            (I8(a), I8(b)) => a == b,
            (U8(a), U8(b)) => a == b,
            (I16(a), I16(b)) => a == b,
            (U16(a), U16(b)) => a == b,
            (I32(a), I32(b)) => a == b,
            (U32(a), U32(b)) => a == b,
            (I64(a), I64(b)) => a == b,
            (Decimal { scale: s, value: v }, Decimal { scale: t, value: w }) => s == t && v == w,
            (LongString(a), LongString(b)) | (ByteArray(a), ByteArray(b)) => a == b,
            (Array(a), Array(b)) => a == b,
            (Timestamp(a), Timestamp(b)) => a == b,
            (Table(a), Table(b)) => a == b,
            (Void, Void) => true,
            _ => false,
        }
    }
}

// Floats compare by bits, so equality is reflexive.
impl Eq for AmqpValue {}

impl fmt::Debug for AmqpValue {
    // Shows the wire type with the value, e.g. `I(42)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", char::from(self.tag()), self.to_text())
    }
}

/// The AMQP basic properties that have no common [`Message`](super::Message)
/// field (the id, correlation id, timestamp, content type and headers
/// have one). Kept on receipt from RabbitMQ and sent again when the message
/// goes back to RabbitMQ; other brokers do not carry them (README mapping
/// table).
///
/// Two are not sent again as received: `delivery_mode` (the library always
/// publishes persistent messages) and `user_id` (RabbitMQ refuses a
/// `user_id` other than the publishing connection's login). A dead letter
/// drops `expiration`, as RabbitMQ's own dead-lettering does, so it does not
/// expire in the dead-letter queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmqpProperties {
    /// `content_encoding`, e.g. `gzip`.
    pub content_encoding: Option<String>,
    /// `type`: the message type name.
    pub kind: Option<String>,
    /// `app_id`: the producing application.
    pub app_id: Option<String>,
    /// `reply_to`: where replies go.
    pub reply_to: Option<String>,
    /// `priority`, 0 to 9 (queues declared without priorities ignore it).
    pub priority: Option<u8>,
    /// `expiration`: per-message TTL in milliseconds, as text.
    pub expiration: Option<String>,
    /// `user_id` as received (not sent again, see above).
    pub user_id: Option<String>,
    /// `cluster_id` (deprecated in AMQP 0-9-1, kept for completeness).
    pub cluster_id: Option<String>,
    /// `delivery_mode` as received: 1 transient, 2 persistent.
    pub delivery_mode: Option<u8>,
}

impl AmqpProperties {
    /// True when no property is set.
    pub fn is_empty(&self) -> bool {
        *self == AmqpProperties::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_forms() {
        assert_eq!(
            AmqpValue::Decimal {
                scale: 2,
                value: 12345
            }
            .to_text(),
            "123.45"
        );
        assert_eq!(AmqpValue::Decimal { scale: 3, value: 5 }.to_text(), "0.005");
        assert_eq!(AmqpValue::Decimal { scale: 0, value: 7 }.to_text(), "7");
        assert_eq!(AmqpValue::Bool(true).to_text(), "true");
        let table = AmqpValue::Table(vec![
            ("n".into(), AmqpValue::I32(1)),
            (
                "a".into(),
                AmqpValue::Array(vec![AmqpValue::LongString("x".into()), AmqpValue::Void]),
            ),
        ]);
        assert_eq!(table.to_text(), r#"{"a":["x",null],"n":1}"#);
        assert_eq!(format!("{:?}", AmqpValue::I32(42)), "I(42)");
    }

    #[test]
    fn nan_equals_itself() {
        assert_eq!(AmqpValue::F64(f64::NAN), AmqpValue::F64(f64::NAN));
        assert_ne!(AmqpValue::I32(1), AmqpValue::U32(1));
    }
}
