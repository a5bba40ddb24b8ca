//! URLs that carry a password.

use super::*;

/// A URL that may carry a password (`amqp://user:password@host:5672/vhost`),
/// or a comma-separated list of them, one per node of a cluster
/// (`amqp://app:pw@rabbit-1,amqp://app:pw@rabbit-2`; see
/// [`SecretUrl::amqp_nodes`]).
///
/// `Debug` and `Display` print [`SecretUrl::redacted`]; only
/// [`SecretUrl::expose`] returns the password. A `/`, `?`, `#` or `%` in
/// the user name or password must be percent-encoded (as URLs require);
/// a URL that does not split cleanly into its parts is not shown at all.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps a URL; nothing is checked ([`SecretUrl::amqp`] checks).
    pub fn new(url: impl Into<String>) -> Self {
        SecretUrl(url.into())
    }

    /// The real URL, password included: only for handing to a client
    /// library, never for logs.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with the password replaced by `***`
    /// (`amqp://user:***@host:5672/vhost`), query parameters other than
    /// the AMQP client's (`heartbeat`, `frame_max`, `channel_max`,
    /// `connection_timeout`, `auth_mechanism`) shown as `***`, and a
    /// fragment as `#***`. A URL that does not split cleanly into scheme,
    /// user, password, host, port and path (a missing `:` or `/`, an
    /// unencoded `/` in the password, ...) is shown as
    /// `[malformed URL, redacted]`: any part of it could be the password.
    ///
    /// ```
    /// use broker_core::config::SecretUrl;
    /// assert_eq!(SecretUrl::new("amqp://app:s3cret@rabbit/%2f").redacted(), "amqp://app:***@rabbit/%2f");
    /// assert_eq!(SecretUrl::new("amqp//app:s3cret@rabbit/%2f").redacted(), "[malformed URL, redacted]");
    /// ```
    pub fn redacted(&self) -> String {
        let nodes = amqp_url::split_nodes(&self.0);
        match nodes.len() {
            1 => amqp_url::redact(&self.0),
            _ => nodes
                .iter()
                .map(|node| amqp_url::redact(node))
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    /// The node URLs of a list (`amqp://u:pw@rabbit-1,amqp://u:pw@rabbit-2`),
    /// in order; one URL for a single node. A comma starts a new node only
    /// where `amqp://` or `amqps://` follows it (spaces around it are
    /// dropped), so a comma in a password stays in it. Nothing is checked
    /// ([`SecretUrl::amqp_nodes`] checks).
    ///
    /// ```
    /// use broker_core::config::SecretUrl;
    /// let list = SecretUrl::new("amqp://app:pw@rabbit-1, amqp://app:pw@rabbit-2:5673");
    /// let nodes = list.nodes();
    /// assert_eq!(nodes.len(), 2);
    /// assert_eq!(nodes[1].redacted(), "amqp://app:***@rabbit-2:5673");
    /// assert_eq!(list.redacted(), "amqp://app:***@rabbit-1,amqp://app:***@rabbit-2:5673");
    /// ```
    pub fn nodes(&self) -> Vec<SecretUrl> {
        amqp_url::split_nodes(&self.0)
            .into_iter()
            .map(SecretUrl::new)
            .collect()
    }

    /// Reads a node list strictly: each node as [`SecretUrl::amqp`] reads
    /// a URL, and all of them with the same user name, password and vhost
    /// (one set of credentials for the cluster; the scheme and port may
    /// differ). The error names the node at fault by its place in the
    /// list, never quoting it.
    ///
    /// ```
    /// use broker_core::config::SecretUrl;
    /// let nodes = SecretUrl::new("amqp://app:pw@rabbit-1,amqp://app:pw@rabbit-2/%2f").amqp_nodes().unwrap();
    /// assert_eq!(nodes[1].address(), "rabbit-2:5672/%2f");
    /// let err = SecretUrl::new("amqp://app:pw@rabbit-1,amqp://app:other@rabbit-2").amqp_nodes().unwrap_err();
    /// assert_eq!(err.to_string(), "node 2 of 2: its password differs from node 1's: the nodes of a list share user name, password and vhost");
    /// assert!(SecretUrl::new("amqp://app:pw@rabbit-1,rabbit-2").amqp_nodes().is_err());
    /// ```
    pub fn amqp_nodes(&self) -> Result<Vec<AmqpUrl>, UrlError> {
        amqp_url::parse_nodes(&self.0)
    }

    /// Reads an `amqp://` or `amqps://` URL strictly into its parts
    /// (`scheme://[user[:password]@]host[:port][/vhost][?query]`), refusing
    /// anything a client library could read another way: no `://`, a host
    /// that is not a host name, a port that is not a number, an `@` after
    /// the host, a bad percent-escape, spaces. The error never quotes the
    /// URL.
    ///
    /// ```
    /// use broker_core::config::SecretUrl;
    /// let url = SecretUrl::new("amqp://app:s3cret@rabbit:5673/prod").amqp().unwrap();
    /// assert_eq!((url.host.as_str(), url.port, url.vhost.as_deref()), ("rabbit", Some(5673), Some("prod")));
    /// assert_eq!(url.address(), "rabbit:5673/prod");
    /// assert!(SecretUrl::new("amqp:/app:s3cret@rabbit/").amqp().is_err());
    /// ```
    pub fn amqp(&self) -> Result<AmqpUrl, UrlError> {
        amqp_url::parse_amqp(&self.0)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SecretUrl").field(&self.redacted()).finish()
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}
