//! RabbitMQ's settings: the URL and the variables only RabbitMQ needs
//! (required groups, queue expiry, alternate exchange).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use super::{invalid, ConfigError, SecretUrl};
use crate::topic::validate_topic;

pub(super) const RABBITMQ_REQUIRED_GROUPS: &str = "RABBITMQ_REQUIRED_GROUPS";
pub(super) const RABBITMQ_QUEUE_EXPIRY_MS: &str = "RABBITMQ_QUEUE_EXPIRY_MS";
pub(super) const RABBITMQ_ALTERNATE_EXCHANGE: &str = "RABBITMQ_ALTERNATE_EXCHANGE";
pub(super) const RABBITMQ_QUEUE_TYPE: &str = "RABBITMQ_QUEUE_TYPE";
pub(super) const RABBITMQ_NODE_ORDER: &str = "RABBITMQ_NODE_ORDER";

/// The order in which a client tries the nodes of a cluster's node list
/// (`RABBITMQ_URL=amqp://..,amqp://..`), as Spring AMQP's
/// `AddressShuffleMode`. Whatever the order, a client that loses its node
/// goes on to the next one in it, and tries the lost node last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NodeOrder {
    /// As listed: every client starts at the first node (the default).
    #[default]
    InOrder,
    /// In an order drawn at random once per client, so that many clients
    /// with the same list spread over the nodes (`RABBITMQ_NODE_ORDER=shuffle`).
    Shuffle,
}

/// How to reach RabbitMQ, and what RabbitMQ needs to keep the promises the
/// other backends keep on their own.
///
/// ```
/// use std::time::Duration;
/// use broker_core::config::RabbitMqSettings;
/// let settings = RabbitMqSettings::new("amqp://app:secret@rabbit:5672/%2f")
///     .with_required_groups("billing.invoices.created", ["billing-ledger", "audit"])
///     .with_queue_expiry(Duration::from_secs(3600));
/// assert_eq!(settings.required_groups().of("billing.invoices.created").len(), 2);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RabbitMqSettings {
    url: SecretUrl,
    required_groups: RequiredGroups,
    queue_expiry: Option<Duration>,
    alternate_exchange: Option<String>,
    classic_queues: bool,
    node_order: NodeOrder,
}

/// A copy: lets `RabbitMqBroker::connect` take settings by value (as
/// `KafkaBroker::connect` does) or by reference.
impl From<&RabbitMqSettings> for RabbitMqSettings {
    fn from(settings: &RabbitMqSettings) -> Self {
        settings.clone()
    }
}

impl RabbitMqSettings {
    /// Settings for an `amqp://` or `amqps://` URL (checked when the
    /// [`BrokerConfig`](super::BrokerConfig) is built).
    pub fn new(url: impl Into<String>) -> Self {
        RabbitMqSettings {
            url: SecretUrl::new(url),
            required_groups: RequiredGroups::default(),
            queue_expiry: None,
            alternate_exchange: None,
            classic_queues: false,
            node_order: NodeOrder::InOrder,
        }
    }

    /// The order in which the nodes of a node list are tried
    /// (`RABBITMQ_NODE_ORDER`: `in-order`, the default, or `shuffle`).
    pub fn with_node_order(mut self, order: NodeOrder) -> Self {
        self.node_order = order;
        self
    }

    /// The order in which the nodes of a node list are tried.
    pub fn node_order(&self) -> NodeOrder {
        self.node_order
    }

    /// Declares classic queues instead of quorum queues
    /// (`RABBITMQ_QUEUE_TYPE=classic`): for queues an earlier version
    /// declared classic. Classic queues keep no delivery count, so the
    /// consumer's delivery limit cannot stop a message that keeps crashing
    /// the consumer.
    pub fn with_classic_queues(mut self) -> Self {
        self.classic_queues = true;
        self
    }

    /// True when classic queues are declared (default: quorum).
    pub fn classic_queues(&self) -> bool {
        self.classic_queues
    }

    /// The connection URL.
    pub fn url(&self) -> &SecretUrl {
        &self.url
    }

    /// Groups that must receive every message of `topic`, also those
    /// published before the group first subscribed: publishers declare
    /// their queues (Spring Cloud Stream's `requiredGroups`). Adds to the
    /// groups already given for `topic`. Env: `RABBITMQ_REQUIRED_GROUPS`.
    pub fn with_required_groups<I, G>(mut self, topic: impl Into<String>, groups: I) -> Self
    where
        I: IntoIterator<Item = G>,
        G: Into<String>,
    {
        self.required_groups.add(topic, groups);
        self
    }

    /// Replaces all required groups.
    pub fn with_all_required_groups(mut self, groups: RequiredGroups) -> Self {
        self.required_groups = groups;
        self
    }

    /// The required groups by topic.
    pub fn required_groups(&self) -> &RequiredGroups {
        &self.required_groups
    }

    /// Queues are declared with `x-expires`: RabbitMQ deletes a queue (with
    /// its messages) once it has had no consumer for this long. Env:
    /// `RABBITMQ_QUEUE_EXPIRY_MS`. Off by default.
    pub fn with_queue_expiry(mut self, after: Duration) -> Self {
        self.queue_expiry = Some(after);
        self
    }

    /// The queue expiry, if any.
    pub fn queue_expiry(&self) -> Option<Duration> {
        self.queue_expiry
    }

    /// An alternate exchange for messages no queue is bound for; see
    /// `RabbitMqBuilder::alternate_exchange`. Env: `RABBITMQ_ALTERNATE_EXCHANGE`.
    pub fn with_alternate_exchange(mut self, name: impl Into<String>) -> Self {
        self.alternate_exchange = Some(name.into());
        self
    }

    /// The alternate exchange, if any.
    pub fn alternate_exchange(&self) -> Option<&str> {
        self.alternate_exchange.as_deref()
    }

    /// Reads the optional RabbitMQ variables for a broker at `url`.
    pub(super) fn from_vars<'a>(
        url: &str,
        get: impl Fn(&str) -> Option<&'a str>,
    ) -> Result<Self, ConfigError> {
        let mut settings = RabbitMqSettings::new(url);
        if let Some(value) = get(RABBITMQ_REQUIRED_GROUPS) {
            settings.required_groups = value
                .parse()
                .map_err(|e: ParseRequiredGroupsError| invalid(RABBITMQ_REQUIRED_GROUPS, &e.0))?;
        }
        if let Some(value) = get(RABBITMQ_QUEUE_EXPIRY_MS) {
            let ms = value
                .parse::<u32>()
                .ok()
                .filter(|&ms| ms > 0)
                .ok_or_else(|| {
                    invalid(
                        RABBITMQ_QUEUE_EXPIRY_MS,
                        &format!("`{value}` is not a number of milliseconds from 1 to 4294967295"),
                    )
                })?;
            settings.queue_expiry = Some(Duration::from_millis(u64::from(ms)));
        }
        if let Some(name) = get(RABBITMQ_ALTERNATE_EXCHANGE) {
            settings.alternate_exchange = Some(name.to_owned());
        }
        if let Some(kind) = get(RABBITMQ_QUEUE_TYPE) {
            settings.classic_queues = match kind.trim().to_ascii_lowercase().as_str() {
                "quorum" => false,
                "classic" => true,
                _ => {
                    return Err(invalid(
                        RABBITMQ_QUEUE_TYPE,
                        &format!("`{kind}` is not a queue type: quorum or classic"),
                    ))
                }
            };
        }
        if let Some(order) = get(RABBITMQ_NODE_ORDER) {
            settings.node_order = match order.trim().to_ascii_lowercase().as_str() {
                "in-order" | "inorder" => NodeOrder::InOrder,
                "shuffle" | "random" => NodeOrder::Shuffle,
                _ => {
                    return Err(invalid(
                        RABBITMQ_NODE_ORDER,
                        &format!("`{order}` is not a node order: in-order or shuffle"),
                    ))
                }
            };
        }
        Ok(settings)
    }

    /// The checks [`BrokerConfig`](super::BrokerConfig) applies, naming the
    /// variable of the value at fault.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        self.required_groups
            .check()
            .map_err(|e| invalid(RABBITMQ_REQUIRED_GROUPS, &e.0))?;
        if self.queue_expiry.is_some_and(|d| d.is_zero()) {
            return Err(invalid(RABBITMQ_QUEUE_EXPIRY_MS, "must be above zero"));
        }
        if let Some(name) = &self.alternate_exchange {
            if name.trim().is_empty() || name.len() > 255 {
                return Err(invalid(
                    RABBITMQ_ALTERNATE_EXCHANGE,
                    "an exchange name of 1 to 255 bytes",
                ));
            }
        }
        Ok(())
    }

    /// The settings besides the URL, for the startup line; empty when none.
    pub(super) fn extras(&self) -> String {
        let mut out = String::new();
        if !self.required_groups.is_empty() {
            out += &format!(", required_groups={}", self.required_groups);
        }
        if let Some(expiry) = self.queue_expiry {
            out += &format!(", queue_expiry_ms={}", expiry.as_millis());
        }
        if let Some(ae) = &self.alternate_exchange {
            out += &format!(", alternate_exchange={ae}");
        }
        if self.classic_queues {
            out += ", queue_type=classic";
        }
        if self.node_order == NodeOrder::Shuffle {
            out += ", node_order=shuffle";
        }
        out
    }
}

/// Consumer groups that must receive every message of a topic, by topic.
///
/// Text form (the value of `RABBITMQ_REQUIRED_GROUPS`): `topic=group,group`
/// entries separated by `;`, spaces around names ignored:
///
/// ```
/// use broker_core::config::RequiredGroups;
/// let groups: RequiredGroups = "billing.invoices.created=ledger,audit; app.usage.feature-used=usage-log"
///     .parse()
///     .unwrap();
/// assert_eq!(groups.of("billing.invoices.created"), ["ledger", "audit"]);
/// assert!(groups.of("other.topic").is_empty());
/// assert_eq!(groups.to_string(), "app.usage.feature-used=usage-log;billing.invoices.created=ledger,audit");
/// assert!("billing=".parse::<RequiredGroups>().is_err());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequiredGroups(BTreeMap<String, Vec<String>>);

/// Why a text is not a [`RequiredGroups`] value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseRequiredGroupsError(String);

impl RequiredGroups {
    /// Adds `groups` to the required groups of `topic` (each once).
    pub fn add<I, G>(&mut self, topic: impl Into<String>, groups: I)
    where
        I: IntoIterator<Item = G>,
        G: Into<String>,
    {
        let list = self.0.entry(topic.into()).or_default();
        for group in groups {
            let group = group.into();
            if !list.contains(&group) {
                list.push(group);
            }
        }
    }

    /// The required groups of `topic` (empty when none).
    pub fn of(&self, topic: &str) -> &[String] {
        self.0.get(topic).map_or(&[], Vec::as_slice)
    }

    /// Every topic with its groups, by topic name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[String])> {
        self.0.iter().map(|(t, g)| (t.as_str(), g.as_slice()))
    }

    /// True when no topic has required groups.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every topic name valid, every topic with at least one group, no
    /// empty group name.
    pub fn check(&self) -> Result<(), ParseRequiredGroupsError> {
        for (topic, groups) in &self.0 {
            validate_topic(topic)
                .map_err(|e| ParseRequiredGroupsError(format!("topic `{topic}`: {e}")))?;
            if groups.is_empty() {
                return Err(ParseRequiredGroupsError(format!(
                    "topic `{topic}` has no groups"
                )));
            }
            if let Some(bad) = groups
                .iter()
                .find(|g| g.trim().is_empty() || g.trim() != g.as_str())
            {
                return Err(ParseRequiredGroupsError(format!(
                    "topic `{topic}`: group name `{bad}` is empty or has surrounding spaces"
                )));
            }
        }
        Ok(())
    }
}

impl std::str::FromStr for RequiredGroups {
    type Err = ParseRequiredGroupsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why: String| {
            ParseRequiredGroupsError(format!("{why}; expected `topic=group,group;topic=group`"))
        };
        let mut out = RequiredGroups::default();
        for entry in s.split(';').map(str::trim).filter(|e| !e.is_empty()) {
            let (topic, groups) = entry
                .split_once('=')
                .ok_or_else(|| err(format!("`{entry}` has no `=`")))?;
            let topic = topic.trim();
            if out.0.contains_key(topic) {
                return Err(err(format!("topic `{topic}` is listed twice")));
            }
            let groups: Vec<&str> = groups.split(',').map(str::trim).collect();
            if groups.iter().any(|g| g.is_empty()) {
                return Err(err(format!("an empty group name for topic `{topic}`")));
            }
            out.add(topic, groups);
        }
        out.check().map_err(|e| err(e.0))?;
        Ok(out)
    }
}

impl fmt::Display for RequiredGroups {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (topic, groups)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(";")?;
            }
            write!(f, "{topic}={}", groups.join(","))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::BrokerConfig;
    use super::*;

    fn rabbit(extra: &[(&str, &str)]) -> Result<RabbitMqSettings, ConfigError> {
        let mut vars = vec![("RABBITMQ_URL", "amqp://h")];
        vars.extend_from_slice(extra);
        BrokerConfig::from_vars(vars).map(|c| c.rabbitmq.expect("enabled"))
    }

    #[test]
    fn optional_variables_are_read() {
        let s = rabbit(&[
            ("RABBITMQ_REQUIRED_GROUPS", " a.b=g1, g2 ;c=g3;"),
            ("RABBITMQ_QUEUE_EXPIRY_MS", "60000"),
            ("RABBITMQ_ALTERNATE_EXCHANGE", "broker.unroutable"),
            ("RABBITMQ_QUEUE_TYPE", "Classic"),
            ("RABBITMQ_NODE_ORDER", "Shuffle"),
        ])
        .unwrap();
        assert!(s.classic_queues());
        assert_eq!(s.node_order(), NodeOrder::Shuffle);
        assert_eq!(rabbit(&[]).unwrap().node_order(), NodeOrder::InOrder);
        let bad = rabbit(&[("RABBITMQ_NODE_ORDER", "round-robin")]).unwrap_err();
        assert_eq!(bad.var(), "RABBITMQ_NODE_ORDER", "{bad}");
        assert!(!rabbit(&[]).unwrap().classic_queues(), "quorum by default");
        let bad = rabbit(&[("RABBITMQ_QUEUE_TYPE", "stream")]).unwrap_err();
        assert!(bad.to_string().contains("RABBITMQ_QUEUE_TYPE"), "{bad}");
        assert_eq!(s.required_groups().of("a.b"), ["g1", "g2"]);
        assert_eq!(s.required_groups().of("c"), ["g3"]);
        assert_eq!(s.queue_expiry(), Some(Duration::from_secs(60)));
        assert_eq!(s.alternate_exchange(), Some("broker.unroutable"));
        let plain = rabbit(&[]).unwrap();
        assert!(plain.required_groups().is_empty());
        assert_eq!(
            (plain.queue_expiry(), plain.alternate_exchange()),
            (None, None)
        );
    }

    #[test]
    fn malformed_values_name_their_variable() {
        for (var, value) in [
            ("RABBITMQ_REQUIRED_GROUPS", "topic-without-groups"),
            ("RABBITMQ_REQUIRED_GROUPS", "t="),
            ("RABBITMQ_REQUIRED_GROUPS", "t=a,,b"),
            ("RABBITMQ_REQUIRED_GROUPS", "bad topic=g"),
            ("RABBITMQ_REQUIRED_GROUPS", "=g"),
            ("RABBITMQ_REQUIRED_GROUPS", "t=a;t=b"),
            ("RABBITMQ_QUEUE_EXPIRY_MS", "0"),
            ("RABBITMQ_QUEUE_EXPIRY_MS", "10s"),
            ("RABBITMQ_QUEUE_EXPIRY_MS", "-5"),
            ("RABBITMQ_QUEUE_EXPIRY_MS", "99999999999"),
        ] {
            let err = rabbit(&[(var, value)]).expect_err(value);
            assert!(matches!(err, ConfigError::Invalid { .. }), "{err:?}");
            assert_eq!(err.var(), var, "{value}: {err}");
        }
        let code = BrokerConfig::builder()
            .rabbitmq(RabbitMqSettings::new("amqp://h").with_required_groups("t", [" "]))
            .build()
            .expect_err("blank group");
        assert_eq!(code.var(), "RABBITMQ_REQUIRED_GROUPS");
    }

    #[test]
    fn text_form_round_trips() {
        let groups: RequiredGroups = "x=a,b;y=c".parse().unwrap();
        assert_eq!(
            groups.to_string().parse::<RequiredGroups>().unwrap(),
            groups
        );
        let display = BrokerConfig::from_vars([
            ("RABBITMQ_URL", "amqp://u:pw@h"),
            ("RABBITMQ_REQUIRED_GROUPS", "x=a"),
            ("RABBITMQ_QUEUE_EXPIRY_MS", "5000"),
        ])
        .unwrap()
        .to_string();
        assert!(
            display.contains("url=amqp://u:***@h, required_groups=x=a, queue_expiry_ms=5000"),
            "{display}"
        );
    }
}
