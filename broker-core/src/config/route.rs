//! Brokers and routes: which broker a module uses.

use super::*;

/// A broker backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BrokerKind {
    /// Apache Kafka.
    Kafka,
    /// RabbitMQ.
    RabbitMq,
    /// The embedded in-memory broker (always available).
    Memory,
}

impl BrokerKind {
    pub(super) fn name(self) -> &'static str {
        match self {
            BrokerKind::Kafka => "Kafka",
            BrokerKind::RabbitMq => "RabbitMQ",
            BrokerKind::Memory => "memory",
        }
    }

    pub(super) fn enable_hint(self) -> &'static str {
        match self {
            BrokerKind::Kafka => "set KAFKA_ENABLED=true and KAFKA_BROKERS",
            BrokerKind::RabbitMq => "set RABBITMQ_URL",
            BrokerKind::Memory => "the memory broker is always enabled",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "kafka" => Some(BrokerKind::Kafka),
            "rabbitmq" | "rabbit" => Some(BrokerKind::RabbitMq),
            "memory" => Some(BrokerKind::Memory),
            _ => None,
        }
    }
}

impl fmt::Display for BrokerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BrokerKind::Kafka => "kafka",
            BrokerKind::RabbitMq => "rabbitmq",
            BrokerKind::Memory => "memory",
        })
    }
}

/// The broker(s) a module publishes to and consumes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// One broker.
    Single(BrokerKind),
    /// Two different real brokers (e.g. while migrating from one to the
    /// other); `primary` is the one named first.
    Dual {
        /// The broker named first.
        primary: BrokerKind,
        /// The broker named second.
        secondary: BrokerKind,
    },
}

impl Route {
    /// The single broker, or the primary of a dual route.
    pub fn primary(&self) -> BrokerKind {
        match *self {
            Route::Single(kind) | Route::Dual { primary: kind, .. } => kind,
        }
    }

    /// Every broker of the route, primary first.
    pub fn brokers(&self) -> Vec<BrokerKind> {
        match *self {
            Route::Single(kind) => vec![kind],
            Route::Dual { primary, secondary } => vec![primary, secondary],
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Route::Single(kind) => write!(f, "{kind}"),
            Route::Dual { primary, secondary } => write!(f, "{primary}+{secondary}"),
        }
    }
}

/// A string that is not a [`Route`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a broker route; expected {EXPECTED_ROUTES}")]
pub struct ParseRouteError(pub(super) String);

impl FromStr for Route {
    type Err = ParseRouteError;

    /// Parses `kafka`, `rabbitmq` (or `rabbit`), `memory`, or two different
    /// real brokers joined by `+`; case-insensitive, surrounding spaces ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseRouteError(s.trim().to_owned());
        match s.split_once('+') {
            None => BrokerKind::parse(s).map(Route::Single).ok_or_else(err),
            Some((a, b)) => match (BrokerKind::parse(a), BrokerKind::parse(b)) {
                (Some(primary), Some(secondary))
                    if primary != secondary
                        && ![primary, secondary].contains(&BrokerKind::Memory) =>
                {
                    Ok(Route::Dual { primary, secondary })
                }
                _ => Err(err()),
            },
        }
    }
}
