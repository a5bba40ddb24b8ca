//! Headers: an ordered list of (name, value) that keeps duplicates, with
//! values as bytes (or a typed AMQP value received from RabbitMQ).

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;

use super::amqp::AmqpValue;

/// One header value.
///
/// Kafka header values are bytes or null; AMQP header values are typed.
/// Bytes are what both brokers share (a Kafka header value, an AMQP long
/// string); the other variants keep what only one of them has, so a message
/// goes back out to the same kind of broker unchanged.
///
/// Across broker kinds (see the README's mapping table): `Bytes` is lossless
/// both ways; `Null` is a Kafka null value or AMQP `void`; a typed AMQP value
/// goes to Kafka as its text ([`HeaderValue::to_text`]) and comes back as
/// bytes.
#[derive(Clone, PartialEq, Eq)]
pub enum HeaderValue {
    /// Bytes: a Kafka header value, an AMQP long string.
    Bytes(Bytes),
    /// No value: a Kafka header whose value is null, AMQP `void`.
    Null,
    /// An AMQP value of another type (integer, boolean, table, ...), as received.
    Amqp(AmqpValue),
}

impl HeaderValue {
    /// The value's bytes; `None` for null and typed AMQP values.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            HeaderValue::Bytes(b) => Some(b),
            _ => None,
        }
    }

    /// The value as text when it is UTF-8 bytes.
    pub fn as_str(&self) -> Option<&str> {
        self.as_bytes().and_then(|b| std::str::from_utf8(b).ok())
    }

    /// The value as text for display or for a broker without typed headers:
    /// bytes as UTF-8 (invalid sequences replaced), null as `""`, typed AMQP
    /// values as [`AmqpValue::to_text`].
    pub fn to_text(&self) -> Cow<'_, str> {
        match self {
            HeaderValue::Bytes(b) => String::from_utf8_lossy(b),
            HeaderValue::Null => Cow::Borrowed(""),
            HeaderValue::Amqp(v) => Cow::Owned(v.to_text()),
        }
    }

    /// The bytes a broker without typed headers (Kafka) carries: bytes as
    /// they are, null as no value, typed AMQP values as their text.
    pub fn to_wire_bytes(&self) -> Option<Cow<'_, [u8]>> {
        match self {
            HeaderValue::Bytes(b) => Some(Cow::Borrowed(b)),
            HeaderValue::Null => None,
            HeaderValue::Amqp(v) => Some(Cow::Owned(v.to_text().into_bytes())),
        }
    }
}

impl fmt::Debug for HeaderValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderValue::Bytes(b) => match std::str::from_utf8(b) {
                Ok(s) => s.fmt(f),
                Err(_) => write!(f, "bytes{:02x?}", b.as_ref()),
            },
            HeaderValue::Null => f.write_str("null"),
            HeaderValue::Amqp(v) => v.fmt(f),
        }
    }
}

impl fmt::Display for HeaderValue {
    /// [`HeaderValue::to_text`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

impl From<&str> for HeaderValue {
    fn from(s: &str) -> Self {
        HeaderValue::Bytes(Bytes::copy_from_slice(s.as_bytes()))
    }
}
impl From<String> for HeaderValue {
    fn from(s: String) -> Self {
        HeaderValue::Bytes(Bytes::from(s))
    }
}
impl From<&String> for HeaderValue {
    fn from(s: &String) -> Self {
        HeaderValue::from(s.as_str())
    }
}
impl From<&[u8]> for HeaderValue {
    fn from(b: &[u8]) -> Self {
        HeaderValue::Bytes(Bytes::copy_from_slice(b))
    }
}
impl From<Vec<u8>> for HeaderValue {
    fn from(b: Vec<u8>) -> Self {
        HeaderValue::Bytes(Bytes::from(b))
    }
}
impl From<Bytes> for HeaderValue {
    fn from(b: Bytes) -> Self {
        HeaderValue::Bytes(b)
    }
}
impl From<AmqpValue> for HeaderValue {
    /// Long strings become [`HeaderValue::Bytes`] and `void` becomes
    /// [`HeaderValue::Null`], so equal values compare equal whichever way
    /// they were made.
    fn from(v: AmqpValue) -> Self {
        match v {
            AmqpValue::LongString(b) => HeaderValue::Bytes(b),
            AmqpValue::Void => HeaderValue::Null,
            other => HeaderValue::Amqp(other),
        }
    }
}

impl PartialEq<str> for HeaderValue {
    fn eq(&self, other: &str) -> bool {
        self.as_bytes() == Some(other.as_bytes())
    }
}
impl PartialEq<&str> for HeaderValue {
    fn eq(&self, other: &&str) -> bool {
        self == *other
    }
}
impl PartialEq<String> for HeaderValue {
    fn eq(&self, other: &String) -> bool {
        self == other.as_str()
    }
}
impl PartialEq<[u8]> for HeaderValue {
    fn eq(&self, other: &[u8]) -> bool {
        self.as_bytes() == Some(other)
    }
}

/// The headers of a message: (name, value) pairs in the order they were
/// added or received, duplicates kept (Kafka allows several headers of one
/// name; AMQP tables do not, see the README's mapping table).
///
/// ```
/// use broker_core::Headers;
/// let mut h = Headers::new();
/// h.append("dup", "1");
/// h.append("dup", "2");
/// h.append("raw", &[0xff, 0xfe][..]);
/// assert_eq!(h["dup"], "1");
/// assert_eq!(h.get_all("dup").count(), 2);
/// assert_eq!(h.get("raw").unwrap().as_bytes(), Some(&[0xff, 0xfe][..]));
/// h.insert("dup", "3"); // replaces every `dup`
/// assert_eq!(h.get_all("dup").collect::<Vec<_>>(), ["3"]);
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers {
    entries: Vec<(String, HeaderValue)>,
}

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Headers::default()
    }

    /// The first value named `name`.
    pub fn get(&self, name: &str) -> Option<&HeaderValue> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// The first value named `name`, as text when it is UTF-8.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(HeaderValue::as_str)
    }

    /// Every value named `name`, in order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a HeaderValue> + 'a {
        self.entries
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v)
    }

    /// True when a header named `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Adds a header after the others, keeping any of the same name.
    pub fn append(&mut self, name: impl Into<String>, value: impl Into<HeaderValue>) {
        self.entries.push((name.into(), value.into()));
    }

    /// Sets `name` to `value`: the first header of that name takes the value
    /// (in its place), the others of that name are removed; added at the end
    /// when there is none.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<HeaderValue>) {
        let name = name.into();
        let value = value.into();
        match self.entries.iter().position(|(n, _)| *n == name) {
            Some(first) => {
                self.entries[first].1 = value;
                let mut i = 0;
                self.entries.retain(|(n, _)| {
                    i += 1;
                    i - 1 == first || *n != name
                });
            }
            None => self.entries.push((name, value)),
        }
    }

    /// Removes every header named `name` and returns the first value.
    pub fn remove(&mut self, name: &str) -> Option<HeaderValue> {
        let first = self.entries.iter().position(|(n, _)| n == name)?;
        let value = self.entries.remove(first).1;
        self.entries.retain(|(n, _)| n != name);
        Some(value)
    }

    /// Keeps only the headers for which `keep(name, value)` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &HeaderValue) -> bool) {
        self.entries.retain(|(n, v)| keep(n, v));
    }

    /// (name, value) pairs in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &HeaderValue)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v))
    }

    /// Number of headers (duplicates counted).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of names and values, as counted against message size limits.
    pub(crate) fn encoded_len(&self) -> usize {
        self.entries
            .iter()
            .map(|(n, v)| n.len() + v.to_wire_bytes().map_or(0, |b| b.len()))
            .sum()
    }
}

impl std::ops::Index<&str> for Headers {
    type Output = HeaderValue;
    /// The first value named `name`; panics when there is none.
    fn index(&self, name: &str) -> &HeaderValue {
        self.get(name)
            .unwrap_or_else(|| panic!("no header named `{name}`"))
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.entries.iter()).finish()
    }
}

impl<N: Into<String>, V: Into<HeaderValue>> FromIterator<(N, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(iter: I) -> Self {
        Headers {
            entries: iter
                .into_iter()
                .map(|(n, v)| (n.into(), v.into()))
                .collect(),
        }
    }
}

impl<N: Into<String>, V: Into<HeaderValue>> Extend<(N, V)> for Headers {
    fn extend<I: IntoIterator<Item = (N, V)>>(&mut self, iter: I) {
        self.entries
            .extend(iter.into_iter().map(|(n, v)| (n.into(), v.into())));
    }
}

impl IntoIterator for Headers {
    type Item = (String, HeaderValue);
    type IntoIter = std::vec::IntoIter<(String, HeaderValue)>;
    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_and_duplicates() {
        let h: Headers = [("b", "1"), ("a", "2"), ("b", "3")].into_iter().collect();
        let names: Vec<_> = h.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["b", "a", "b"]);
        assert_eq!(h["b"], "1");
        assert_eq!(h.get_all("b").collect::<Vec<_>>(), ["1", "3"]);
    }

    #[test]
    fn insert_replaces_all_in_place_and_remove_removes_all() {
        let mut h: Headers = [("b", "1"), ("a", "2"), ("b", "3")].into_iter().collect();
        h.insert("b", "x");
        assert_eq!(
            h.iter().map(|(n, v)| (n, v.to_text())).collect::<Vec<_>>(),
            [("b", "x".into()), ("a", "2".into())]
        );
        h.insert("c", "y");
        assert_eq!(h.len(), 3);
        assert_eq!(h.remove("b"), Some("x".into()));
        assert_eq!(h.remove("b"), None);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn bytes_are_kept_and_text_is_separate() {
        let v = HeaderValue::from(&[0xff, 0xfe][..]);
        assert_eq!(v.as_bytes(), Some(&[0xff, 0xfe][..]));
        assert_eq!(v.as_str(), None);
        assert_eq!(v.to_text(), "\u{fffd}\u{fffd}");
        assert_eq!(HeaderValue::Null.to_wire_bytes(), None);
        assert_eq!(
            HeaderValue::from(AmqpValue::I32(-5)).to_wire_bytes(),
            Some(Cow::Borrowed(&b"-5"[..]))
        );
        assert_eq!(
            HeaderValue::from(AmqpValue::LongString("x".into())),
            HeaderValue::from("x")
        );
    }
}
