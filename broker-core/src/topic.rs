//! Topic names: the `{service}.{domain}.{event-type}` convention and validation.

/// Longest topic name Kafka accepts.
pub const MAX_TOPIC_LEN: usize = 249;

/// Why a topic name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    /// The name is empty.
    #[error("topic name is empty")]
    Empty,
    /// The name is longer than [`MAX_TOPIC_LEN`].
    #[error("topic name `{name}` is {len} characters long; the limit is {MAX_TOPIC_LEN}")]
    TooLong {
        /// The (possibly truncated) name.
        name: String,
        /// Its length.
        len: usize,
    },
    /// `.` and `..` are reserved by Kafka.
    #[error("topic name `{0}` is reserved")]
    Reserved(String),
    /// A character outside `[A-Za-z0-9._-]`.
    #[error("topic name `{name}` contains `{bad}`; only ASCII letters, digits, `.`, `_` and `-` are allowed")]
    InvalidChar {
        /// The name.
        name: String,
        /// The first offending character.
        bad: char,
    },
}

/// Checks a topic name against the rules both brokers accept
/// (Kafka's: `[A-Za-z0-9._-]`, 1 to 249 characters, not `.` or `..`).
///
/// ```
/// use broker_core::topic::{validate_topic, TopicError};
/// assert!(validate_topic("billing.credits.process-ended").is_ok());
/// assert!(matches!(validate_topic("bad topic"), Err(TopicError::InvalidChar { bad: ' ', .. })));
/// ```
pub fn validate_topic(name: &str) -> Result<(), TopicError> {
    if name.is_empty() {
        return Err(TopicError::Empty);
    }
    if name.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong {
            name: name.chars().take(40).collect::<String>() + "...",
            len: name.len(),
        });
    }
    if name == "." || name == ".." {
        return Err(TopicError::Reserved(name.to_owned()));
    }
    // Bytes, not chars: every publish checks its topic, and a table lookup
    // per byte costs a fraction of decoding chars. The first refused byte
    // starts a char, since every byte before it is ASCII.
    match name.bytes().position(|b| !ALLOWED[usize::from(b)]) {
        Some(at) => Err(TopicError::InvalidChar {
            name: name.to_owned(),
            bad: name[at..].chars().next().unwrap_or('\u{fffd}'),
        }),
        None => Ok(()),
    }
}

/// The bytes a topic name may hold: `[A-Za-z0-9._-]`.
const ALLOWED: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || c == b'-';
        b += 1;
    }
    table
};

/// Builds a `{service}.{domain}.{event-type}` topic name and validates it.
///
/// ```
/// let topic = broker_core::topic::topic_name("billing", "credits", "process-ended").unwrap();
/// assert_eq!(topic, "billing.credits.process-ended");
/// assert!(broker_core::topic::topic_name("billing", "credits", "bad/type").is_err());
/// ```
pub fn topic_name(service: &str, domain: &str, event_type: &str) -> Result<String, TopicError> {
    for part in [service, domain, event_type] {
        if part.is_empty() {
            return Err(TopicError::Empty);
        }
    }
    let name = format!("{service}.{domain}.{event_type}");
    validate_topic(&name)?;
    Ok(name)
}

/// Default dead-letter topic for `topic`: `{topic}.dlq`.
pub fn dead_letter_topic(topic: &str) -> String {
    format!("{topic}{DEAD_LETTER_SUFFIX}")
}

/// Suffix of dead-letter topics (see [`dead_letter_topic`]).
pub const DEAD_LETTER_SUFFIX: &str = ".dlq";

/// True for a dead-letter topic (`{topic}.dlq`).
pub fn is_dead_letter_topic(topic: &str) -> bool {
    topic.len() > DEAD_LETTER_SUFFIX.len() && topic.ends_with(DEAD_LETTER_SUFFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_topics_are_recognised() {
        assert!(is_dead_letter_topic(&dead_letter_topic("billing.credits")));
        assert!(!is_dead_letter_topic("billing.credits"));
        assert!(!is_dead_letter_topic(".dlq"));
    }

    #[test]
    fn accepts_kafka_charset_and_limits() {
        assert!(validate_topic("a").is_ok());
        assert!(validate_topic("feature_usage_topic").is_ok());
        assert!(validate_topic(&"x".repeat(MAX_TOPIC_LEN)).is_ok());
    }

    #[test]
    fn refuses_bad_names_with_typed_errors() {
        assert_eq!(validate_topic(""), Err(TopicError::Empty));
        assert!(matches!(
            validate_topic(&"x".repeat(MAX_TOPIC_LEN + 1)),
            Err(TopicError::TooLong { len: 250, .. })
        ));
        assert_eq!(validate_topic(".."), Err(TopicError::Reserved("..".into())));
        assert!(matches!(
            validate_topic("a/b"),
            Err(TopicError::InvalidChar { bad: '/', .. })
        ));
        assert!(matches!(
            validate_topic("caf\u{e9}"),
            Err(TopicError::InvalidChar { bad: '\u{e9}', .. })
        ));
    }

    #[test]
    fn every_character_is_judged_by_the_rule_and_named_when_refused() {
        let chars = (0..=0x7f_u32)
            .chain([0x80, 0xe9, 0xff, 0x100, 0x2028, 0xfeff, 0x1f600])
            .filter_map(char::from_u32);
        for c in chars {
            let allowed = c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
            let name = format!("ok.{c}.{c}");
            match validate_topic(&name) {
                Ok(()) => assert!(allowed, "{c:?} accepted"),
                Err(TopicError::InvalidChar { bad, .. }) => {
                    assert!(!allowed, "{c:?} refused");
                    assert_eq!(bad, c);
                }
                Err(e) => panic!("{c:?}: {e}"),
            }
        }
    }

    #[test]
    fn naming_helper_rejects_empty_parts() {
        assert_eq!(topic_name("", "b", "c"), Err(TopicError::Empty));
        assert_eq!(dead_letter_topic("a.b.c"), "a.b.c.dlq");
    }
}
