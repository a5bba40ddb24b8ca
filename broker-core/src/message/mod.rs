//! The message model shared by every backend: exact for what the brokers
//! carry (key and header values as bytes, headers in order with duplicates,
//! typed AMQP values and properties kept), with text accessors on top.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arrayvec::ArrayString;
use bytes::Bytes;
use uuid::Uuid;

use crate::error::{BrokerError, Result};
use crate::topic::validate_topic;

mod amqp;
mod headers;

pub use amqp::{AmqpProperties, AmqpValue};
pub use headers::{HeaderValue, Headers};

/// Header names the library reserves on the wire. Backends that have no
/// native property for a field (Kafka) carry it in these headers.
pub mod header {
    /// The message id.
    pub const MESSAGE_ID: &str = "message-id";
    /// The correlation id.
    pub const CORRELATION_ID: &str = "correlation-id";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace state, vendor data that goes with `traceparent`. Carried as
    /// an ordinary header (written by the `otel` feature when the span's
    /// context has one).
    pub const TRACESTATE: &str = "tracestate";
    /// The content type on Kafka (RabbitMQ has the `content_type` property).
    pub const CONTENT_TYPE: &str = "content-type";
    /// Creation time in milliseconds since the Unix epoch.
    pub const TIMESTAMP: &str = "timestamp-ms";
    /// Why a message was dead-lettered.
    pub const DLQ_REASON: &str = "x-dlq-reason";
    /// Kind of failure: `handler`, `permanent`, `decode`, `validation`,
    /// `panic`, `delivery-limit`.
    pub const DLQ_ERROR_KIND: &str = "x-dlq-error-kind";
    /// The topic the message was consumed from.
    pub const DLQ_ORIGINAL_TOPIC: &str = "x-dlq-original-topic";
    /// How many times the handler ran.
    pub const DLQ_ATTEMPTS: &str = "x-dlq-attempts";
    /// When it was dead-lettered, milliseconds since the Unix epoch.
    pub const DLQ_FAILED_AT: &str = "x-dlq-failed-at-ms";
    /// The consumer group that gave up on it.
    pub const DLQ_GROUP: &str = "x-dlq-group";
    /// Kafka partition the message came from.
    pub const DLQ_PARTITION: &str = "x-dlq-partition";
    /// Kafka offset the message came from.
    pub const DLQ_OFFSET: &str = "x-dlq-offset";
    /// On a delayed retry's copy: the attempt it will be (2 for the first
    /// retry). The consumer runtime reads it into [`crate::Received::attempt`]
    /// and removes it (and the other `x-retry-*` headers) before the
    /// handler sees the message.
    pub const RETRY_ATTEMPT: &str = "x-retry-attempt";
    /// On a delayed retry's copy: when it is due, milliseconds since the
    /// Unix epoch.
    pub const RETRY_DUE: &str = "x-retry-due-ms";
    /// On a delayed retry's copy where the retry destination is shared by
    /// the topic's groups (Kafka's retry topics): the group it is for.
    pub const RETRY_GROUP: &str = "x-retry-group";
}

/// One event on the wire: payload bytes plus the metadata every backend keeps.
///
/// ```
/// use broker_core::Message;
/// let msg = Message::new(&b"{\"user\":42}"[..])
///     .with_key("user-42")
///     .with_header("source", "quickstart")
///     .with_correlation_id("req-7");
/// assert_eq!(msg.key_str(), Some("user-42"));
/// assert_eq!(msg.headers()["source"], "quickstart");
///
/// // Keys and header values are bytes; nothing is changed on the way.
/// let raw = Message::new("x").with_key(&[0xff, 0xfe][..]).with_header("h", &[0xff][..]);
/// assert_eq!(raw.key(), Some(&[0xff, 0xfe][..]));
/// assert_eq!(raw.key_str(), None);
/// ```
// Shared fields: a message is cloned for every group, retry and dead
// letter, and a clone is one reference count, not a copy of its strings.
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    fields: Arc<Fields>,
}

#[derive(Clone, PartialEq, Eq)]
struct Fields {
    id: Id,
    payload: Bytes,
    key: Option<Bytes>,
    headers: Headers,
    timestamp: SystemTime,
    correlation_id: Option<String>,
    traceparent: Option<String>,
    content_type: Option<String>,
    amqp: Option<Box<AmqpProperties>>,
    null_payload: bool,
}

/// A message id. Nearly every id is a hyphenated UUID, 36 ASCII bytes:
/// ids up to that length are kept inline, so making or decoding a message
/// allocates one string fewer, and reading one checks nothing (an
/// `ArrayString` holds a `str`; a byte array would be checked as UTF-8 at
/// every read, about 190 instructions, several times per message).
#[derive(Clone, PartialEq, Eq)]
enum Id {
    Inline(ArrayString<INLINE_ID>),
    Heap(String),
}

/// The longest id kept inline: a hyphenated UUID.
const INLINE_ID: usize = 36;

impl Id {
    fn new_v7() -> Self {
        let mut text = [0; INLINE_ID];
        let uuid = Uuid::now_v7().hyphenated();
        Id::from(&*uuid.encode_lower(&mut text))
    }

    fn as_str(&self) -> &str {
        match self {
            Id::Inline(id) => id,
            Id::Heap(id) => id,
        }
    }
}

impl From<&str> for Id {
    fn from(id: &str) -> Self {
        match ArrayString::from(id) {
            Ok(inline) => Id::Inline(inline),
            Err(_) => Id::Heap(id.to_owned()),
        }
    }
}

impl From<String> for Id {
    fn from(id: String) -> Self {
        match ArrayString::from(&id) {
            Ok(inline) => Id::Inline(inline),
            Err(_) => Id::Heap(id),
        }
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_str().fmt(f)
    }
}

impl Message {
    fn of(fields: Fields) -> Self {
        Message {
            fields: Arc::new(fields),
        }
    }

    /// The fields, copied first if another clone shares them.
    fn fields_mut(&mut self) -> &mut Fields {
        Arc::make_mut(&mut self.fields)
    }

    /// A message read back from a broker, with the id and time its
    /// publisher gave it: no new id is made and the clock is not read
    /// (backends decode with this, once per delivered message).
    pub fn restore(id: &str, payload: impl Into<Bytes>, timestamp: SystemTime) -> Self {
        Message::of(Fields {
            id: id.into(),
            payload: payload.into(),
            key: None,
            headers: Headers::new(),
            timestamp,
            correlation_id: None,
            traceparent: None,
            content_type: None,
            amqp: None,
            null_payload: false,
        })
    }

    /// A message with a fresh UUID (v7, so ids sort by creation time) and the current time.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Message::of(Fields {
            id: Id::new_v7(),
            payload: payload.into(),
            key: None,
            headers: Headers::new(),
            timestamp: now_millis(),
            correlation_id: None,
            traceparent: None,
            content_type: None,
            amqp: None,
            null_payload: false,
        })
    }

    /// Sets the id (backends use this when reading a message back).
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.fields_mut().id = id.into().into();
        self
    }
    /// Sets the key (any bytes): partition key on Kafka, ordering key everywhere.
    pub fn with_key(mut self, key: impl AsRef<[u8]>) -> Self {
        self.fields_mut().key = Some(Bytes::copy_from_slice(key.as_ref()));
        self
    }
    /// Adds a header after the others (a header of the same name is kept:
    /// use [`Headers::insert`] through [`Message::headers_mut`] to replace).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<HeaderValue>) -> Self {
        self.fields_mut().headers.append(name, value);
        self
    }
    /// Replaces all headers.
    pub fn with_headers(mut self, headers: Headers) -> Self {
        self.fields_mut().headers = headers;
        self
    }
    /// Sets the creation time (kept to millisecond precision, as brokers do).
    pub fn with_timestamp(mut self, timestamp: SystemTime) -> Self {
        self.fields_mut().timestamp = truncate_millis(timestamp);
        self
    }
    /// Sets the correlation id.
    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Self {
        self.fields_mut().correlation_id = Some(id.into());
        self
    }
    /// Sets the W3C `traceparent`.
    pub fn with_traceparent(mut self, traceparent: impl Into<String>) -> Self {
        self.fields_mut().traceparent = Some(traceparent.into());
        self
    }
    /// Sets the content type (MIME type of the payload, e.g.
    /// `application/json`): the AMQP `content_type` property on RabbitMQ,
    /// the `content-type` header on Kafka.
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.fields_mut().content_type = Some(content_type.into());
        self
    }
    /// Makes the payload null rather than empty: a Kafka tombstone (a record
    /// without a value, which a compacted topic reads as "delete this key").
    /// The payload reads as empty. RabbitMQ has no null body: it sends an
    /// empty one.
    pub fn with_null_payload(mut self) -> Self {
        let fields = self.fields_mut();
        fields.payload = Bytes::new();
        fields.null_payload = true;
        self
    }
    /// Sets the AMQP properties that have no common field (RabbitMQ only;
    /// other brokers do not carry them). Empty properties are none.
    pub fn with_amqp(mut self, properties: AmqpProperties) -> Self {
        self.fields_mut().amqp = (!properties.is_empty()).then(|| Box::new(properties));
        self
    }

    /// Carries the causal context of `cause` into this message: its
    /// correlation id (or its id when it has none) and a `traceparent`.
    /// Use it for events published while handling another.
    ///
    /// With the `otel` feature, when the current span has an OpenTelemetry
    /// context (a `tracing_opentelemetry` layer is installed: inside a
    /// handler that is the runtime's `handle` span, itself a child of
    /// `cause`'s context; or a context entered through the OpenTelemetry
    /// API), the `traceparent` is that span's trace id and span id (and a
    /// non-empty trace state goes into the `tracestate` header), so the
    /// event's consumers continue the work that published it. Otherwise
    /// (and without the feature) it is `cause`'s trace id with a new span
    /// id, or a new trace when `cause` has no valid `traceparent`.
    pub fn caused_by(mut self, cause: &Message) -> Self {
        self.fields_mut().correlation_id = Some(
            cause
                .fields
                .correlation_id
                .clone()
                .unwrap_or_else(|| cause.id().to_owned()),
        );
        #[cfg(feature = "otel")]
        if crate::otel::inject_current(&mut self) {
            return self;
        }
        self.fields_mut().traceparent =
            Some(child_traceparent(cause.fields.traceparent.as_deref()));
        self
    }

    /// The message id.
    pub fn id(&self) -> &str {
        self.fields.id.as_str()
    }
    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.fields.payload
    }
    /// True for a null payload ([`Message::with_null_payload`]).
    pub fn payload_is_null(&self) -> bool {
        self.fields.null_payload
    }
    /// The key's bytes, if any.
    pub fn key(&self) -> Option<&[u8]> {
        self.fields.key.as_deref()
    }
    /// The key as text: `None` when there is no key or it is not UTF-8.
    pub fn key_str(&self) -> Option<&str> {
        self.key().and_then(|k| std::str::from_utf8(k).ok())
    }
    /// The headers.
    pub fn headers(&self) -> &Headers {
        &self.fields.headers
    }
    /// Mutable headers.
    pub fn headers_mut(&mut self) -> &mut Headers {
        &mut self.fields_mut().headers
    }
    /// The creation time.
    pub fn timestamp(&self) -> SystemTime {
        self.fields.timestamp
    }
    /// Milliseconds since the Unix epoch.
    pub fn timestamp_millis(&self) -> i64 {
        millis_since_epoch(self.fields.timestamp)
    }
    /// The correlation id, if any.
    pub fn correlation_id(&self) -> Option<&str> {
        self.fields.correlation_id.as_deref()
    }
    /// The W3C `traceparent`, if any.
    pub fn traceparent(&self) -> Option<&str> {
        self.fields.traceparent.as_deref()
    }
    /// The content type, if any.
    pub fn content_type(&self) -> Option<&str> {
        self.fields.content_type.as_deref()
    }
    /// The AMQP properties kept from RabbitMQ, if any.
    pub fn amqp(&self) -> Option<&AmqpProperties> {
        self.fields.amqp.as_deref()
    }
    /// Mutable AMQP properties (made empty when there are none).
    pub fn amqp_mut(&mut self) -> &mut AmqpProperties {
        self.fields_mut().amqp.get_or_insert_with(Default::default)
    }

    /// Size counted against a backend's message limit: payload, key and headers.
    pub fn encoded_len(&self) -> usize {
        self.fields.payload.len()
            + self.fields.key.as_ref().map_or(0, Bytes::len)
            + self.fields.headers.encoded_len()
            + self.id().len()
            + self.fields.content_type.as_ref().map_or(0, String::len)
            + self.fields.correlation_id.as_ref().map_or(0, String::len)
            + self.fields.traceparent.as_ref().map_or(0, String::len)
    }

    /// Sets the W3C `traceparent` in place.
    #[cfg_attr(not(feature = "otel"), allow(dead_code))]
    pub(crate) fn set_traceparent(&mut self, traceparent: String) {
        self.fields_mut().traceparent = Some(traceparent);
    }

    /// Starts a trace for this message if it carries none, so the consumer's
    /// span can join the publisher's.
    pub(crate) fn ensure_traceparent(&mut self) {
        if self.fields.traceparent.is_none() {
            self.fields_mut().traceparent = Some(child_traceparent(None));
        }
    }
}

impl fmt::Debug for Message {
    // Payloads can be large or sensitive: show their size, not their bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("id", &self.fields.id)
            .field("key", &self.fields.key)
            .field("payload_len", &self.fields.payload.len())
            .field("null_payload", &self.fields.null_payload)
            .field("headers", &self.fields.headers)
            .field("timestamp_ms", &self.timestamp_millis())
            .field("correlation_id", &self.fields.correlation_id)
            .field("traceparent", &self.fields.traceparent)
            .field("content_type", &self.fields.content_type)
            .field("amqp", &self.fields.amqp)
            .finish()
    }
}

/// A UUID derived from `parts` (UUID v5): the same parts give the same id.
/// Backends use it for messages from other producers that carry no id, so
/// the id stays the same on every redelivery (Kafka: topic, partition and
/// offset; RabbitMQ: the message's content, see the README).
pub fn derived_id(parts: &[&[u8]]) -> String {
    let mut name = Vec::with_capacity(parts.iter().map(|p| p.len() + 8).sum());
    for part in parts {
        // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
        name.extend_from_slice(&(part.len() as u64).to_be_bytes());
        name.extend_from_slice(part);
    }
    Uuid::new_v5(&Uuid::NAMESPACE_OID, &name).to_string()
}

/// Checks what every backend refuses before sending: a bad topic name or a
/// message over `max_bytes`. Backends call this first in `publish`.
pub fn check_outgoing(topic: &str, message: &Message, max_bytes: usize) -> Result<()> {
    validate_topic(topic)?;
    let size = message.encoded_len();
    if size > max_bytes {
        return Err(BrokerError::MessageTooLarge {
            size,
            max: max_bytes,
        });
    }
    Ok(())
}

/// Current time at millisecond precision.
pub fn now_millis() -> SystemTime {
    truncate_millis(SystemTime::now())
}

/// Milliseconds since the Unix epoch (negative before it).
pub fn millis_since_epoch(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

/// The time `ms` milliseconds after the Unix epoch.
pub fn from_millis_since_epoch(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms as u64)
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

fn truncate_millis(t: SystemTime) -> SystemTime {
    from_millis_since_epoch(millis_since_epoch(t))
}

/// A W3C `traceparent` continuing `parent`'s trace with a new span id, or a
/// new sampled trace when `parent` is absent or malformed.
fn child_traceparent(parent: Option<&str>) -> String {
    let trace_id = parent
        .and_then(|p| {
            let parts: Vec<&str> = p.split('-').collect();
            (parts.len() == 4 && parts[1].len() == 32).then(|| parts[1].to_owned())
        })
        .unwrap_or_else(|| Uuid::new_v4().simple().to_string());
    let span_id = &Uuid::new_v4().simple().to_string()[..16];
    format!("00-{trace_id}-{span_id}-01")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_message_has_unique_id_and_ms_timestamp() {
        let a = Message::new("x");
        let b = Message::new("x");
        assert_ne!(a.id(), b.id());
        assert_eq!(from_millis_since_epoch(a.timestamp_millis()), a.timestamp());
    }

    #[test]
    fn caused_by_keeps_trace_and_correlation() {
        let cause = Message::new("c")
            .with_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        let effect = Message::new("e").caused_by(&cause);
        assert_eq!(effect.correlation_id(), Some(cause.id()));
        let tp = effect.traceparent().unwrap();
        assert!(tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-"));
        assert_ne!(tp, cause.traceparent().unwrap());
        assert_eq!(tp.len(), 55);
    }

    #[test]
    fn check_outgoing_refuses_topic_and_size() {
        let msg = Message::new(vec![0u8; 100]);
        assert!(matches!(
            check_outgoing("bad topic", &msg, 1000),
            Err(BrokerError::InvalidTopic(_))
        ));
        assert!(matches!(
            check_outgoing("ok", &msg, 50),
            Err(BrokerError::MessageTooLarge { max: 50, .. })
        ));
        assert!(check_outgoing("ok", &msg, 1000).is_ok());
    }

    #[test]
    fn debug_hides_payload() {
        let msg = Message::new("secret-payload");
        assert!(!format!("{msg:?}").contains("secret-payload"));
    }
}
