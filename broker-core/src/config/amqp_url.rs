//! Strict reading of connection URLs (`amqp://user:password@host:port/vhost`),
//! for two jobs: refusing a malformed URL before a client library reads it
//! some other way (lapin reads `amqp:/app:pw@h/` as localhost with the rest,
//! password included, as the vhost), and redacting: a URL that does not
//! split cleanly into its parts is never shown, since any part of it could
//! be a password.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

/// Shown instead of a URL that does not split into scheme, authority and
/// path: any part of it could be a password.
const MALFORMED: &str = "[malformed URL, redacted]";
/// Query parameters whose values are shown (lapin's; none is a secret).
const SHOWN_PARAMS: &[&str] = &[
    "heartbeat",
    "frame_max",
    "channel_max",
    "connection_timeout",
    "auth_mechanism",
];

/// Where the parts of a URL are (byte ranges of the original text).
struct Spans {
    scheme: Range<usize>,
    user: Option<Range<usize>>,
    password: Option<Range<usize>>,
    host: Range<usize>,
    port: Option<Range<usize>>,
    path: Range<usize>,
    query: Option<Range<usize>>,
    fragment: Option<Range<usize>>,
}

/// Why a URL was refused. The text never quotes the URL: with a misplaced
/// delimiter, any part of it could be the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlError(Cow<'static, str>);

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UrlError {}

impl UrlError {
    const fn fixed(why: &'static str) -> Self {
        UrlError(Cow::Borrowed(why))
    }
}

/// Splits a node list (`amqp://u:p@rabbit-1,amqp://u:p@rabbit-2`) into its
/// URLs. A comma starts a new node only where an `amqp://` or `amqps://`
/// follows it (spaces around it are dropped), so a comma in a password
/// stays in it; an empty entry is kept, and refused by [`parse_nodes`].
pub(super) fn split_nodes(list: &str) -> Vec<&str> {
    let starts_node = |rest: &str| {
        let rest = rest.trim_start().as_bytes();
        [&b"amqp://"[..], &b"amqps://"[..]].iter().any(|scheme| {
            rest.len() >= scheme.len() && rest[..scheme.len()].eq_ignore_ascii_case(scheme)
        })
    };
    let mut nodes = Vec::new();
    let mut start = 0;
    for (i, _) in list.match_indices(',') {
        let rest = &list[i + 1..];
        if starts_node(rest) || rest.trim().is_empty() {
            nodes.push(list[start..i].trim());
            start = i + 1;
        }
    }
    nodes.push(list[start..].trim());
    nodes
}

/// Reads every node of a list strictly ([`parse_amqp`]) and checks that
/// they share the user name, password and vhost (one set of credentials
/// for the whole cluster). The error says which node is at fault, never
/// quoting it.
pub(super) fn parse_nodes(list: &str) -> Result<Vec<AmqpUrl>, UrlError> {
    let texts = split_nodes(list);
    let of = texts.len();
    let mut nodes: Vec<AmqpUrl> = Vec::with_capacity(of);
    for (i, text) in texts.iter().enumerate() {
        let at = |why: &dyn fmt::Display| match of {
            1 => UrlError(Cow::Owned(why.to_string())),
            _ => UrlError(Cow::Owned(format!("node {} of {of}: {why}", i + 1))),
        };
        if text.is_empty() {
            return Err(at(&"an empty entry in the comma-separated node list"));
        }
        let node = parse_amqp(text).map_err(|e| at(&e))?;
        if let Some(first) = nodes.first() {
            let differs = if node.username != first.username {
                Some("user name")
            } else if node.password != first.password {
                Some("password")
            } else if node.vhost_or_default() != first.vhost_or_default() {
                Some("vhost")
            } else {
                None
            };
            if let Some(what) = differs {
                return Err(at(&format_args!(
                    "its {what} differs from node 1's: the nodes of a list share user name, password and vhost"
                )));
            }
        }
        nodes.push(node);
    }
    Ok(nodes)
}

fn valid_percent(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if i + 2 >= b.len() || !(b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit()) {
                return false;
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    true
}

fn decode(s: &str) -> Result<String, UrlError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(UrlError::fixed(
                    "a `%` that does not start an escape (%XX): write a literal % as %25",
                ))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| UrlError::fixed("a percent-escape that is not UTF-8"))
}

fn split(url: &str) -> Result<Spans, UrlError> {
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(UrlError::fixed(
            "the URL contains a space or a control character (percent-encode it)",
        ));
    }
    let Some(colon) = url.find("://") else {
        return Err(UrlError::fixed(
            "the URL does not start with a scheme and `://` (amqp://user:password@host:port/vhost)",
        ));
    };
    let scheme = &url[..colon];
    let mut chars = scheme.chars();
    if !chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        || !chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    {
        return Err(UrlError::fixed(
            "the URL does not start with a scheme and `://` (amqp://user:password@host:port/vhost)",
        ));
    }
    let start = colon + 3;
    let authority_end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    // The host follows the last `@`; the user name ends at the first `:`.
    let (user, password, host_start) = match url[start..authority_end].rfind('@') {
        None => (None, None, start),
        Some(at) => {
            let at = start + at;
            match url[start..at].find(':') {
                Some(c) => (Some(start..start + c), Some(start + c + 1..at), at + 1),
                None => (Some(start..at), None, at + 1),
            }
        }
    };
    let hostport = &url[host_start..authority_end];
    let (host, port) = if hostport.starts_with('[') {
        let close = hostport
            .find(']')
            .ok_or(UrlError::fixed("an IPv6 address without its closing `]`"))?;
        let after = &hostport[close + 1..];
        let port = match after.strip_prefix(':') {
            Some(_) => Some(host_start + close + 2..authority_end),
            None if after.is_empty() => None,
            None => {
                return Err(UrlError::fixed(
                    "text after an IPv6 address's `]` other than `:port`",
                ))
            }
        };
        (host_start..host_start + close + 1, port)
    } else {
        match hostport.rfind(':') {
            Some(c) => (
                host_start..host_start + c,
                Some(host_start + c + 1..authority_end),
            ),
            None => (host_start..authority_end, None),
        }
    };
    let host_text = &url[host.clone()];
    if host_text.is_empty() {
        return Err(UrlError::fixed("the URL has no host"));
    }
    if !host_text.starts_with('[')
        && !host_text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._~%".contains(c))
    {
        return Err(UrlError::fixed(
            "the host has characters a host name cannot have (a `/`, `?` or `#` in the password must be percent-encoded)",
        ));
    }
    if host_text.starts_with('[')
        && !host_text[1..host_text.len() - 1]
            .chars()
            .all(|c| c.is_ascii_hexdigit() || ":.".contains(c))
    {
        return Err(UrlError::fixed("the IPv6 address is not valid"));
    }
    if let Some(p) = &port {
        let text = &url[p.clone()];
        if !text.is_empty()
            && (!text.chars().all(|c| c.is_ascii_digit()) || text.parse::<u16>().is_err())
        {
            return Err(UrlError::fixed(
                "the port is not a number from 0 to 65535 (a `/`, `?` or `#` in the password must be percent-encoded)",
            ));
        }
    }
    let rest_end = url.len();
    let query_at = url[authority_end..].find('?').map(|i| authority_end + i);
    let fragment_at = url[authority_end..].find('#').map(|i| authority_end + i);
    let fragment = fragment_at.map(|f| f + 1..rest_end);
    let query_at = query_at.filter(|q| fragment_at.is_none_or(|f| *q < f));
    let path_end = query_at.or(fragment_at).unwrap_or(rest_end);
    let query = query_at.map(|q| q + 1..fragment_at.unwrap_or(rest_end));
    if url[authority_end..path_end]
        .get(1..)
        .is_some_and(|v| v.contains('/'))
    {
        return Err(UrlError::fixed(
            "a `/` in the vhost: write it %2F (a `/` in the password must be percent-encoded too)",
        ));
    }
    if url[authority_end..].contains('@') {
        return Err(UrlError::fixed(
            "an `@` after the host: a `/`, `?` or `#` in the user name or password must be percent-encoded (%2F, %3F, %23), an `@` in the vhost written %40",
        ));
    }
    for part in [&user, &password].into_iter().flatten() {
        if !valid_percent(&url[part.clone()]) {
            return Err(UrlError::fixed(
                "a `%` in the user name or password that does not start an escape (%XX): write a literal % as %25",
            ));
        }
    }
    for part in [Some(host.clone()), Some(authority_end..path_end)]
        .into_iter()
        .flatten()
    {
        if !valid_percent(&url[part]) {
            return Err(UrlError::fixed(
                "a `%` in the host or vhost that does not start an escape (%XX): write a literal % as %25",
            ));
        }
    }
    Ok(Spans {
        scheme: 0..colon,
        user,
        password,
        host,
        port,
        path: authority_end..path_end,
        query,
        fragment,
    })
}

/// The URL for people: the password replaced by `***`, query parameters
/// other than lapin's replaced by `***`, any fragment hidden, and a URL that
/// does not split into its parts replaced as a whole.
pub(super) fn redact(url: &str) -> String {
    let Ok(s) = split(url) else {
        return MALFORMED.to_owned();
    };
    let mut out = String::with_capacity(url.len());
    out.push_str(&url[s.scheme.clone()]);
    out.push_str("://");
    // A user part without `:` may be a password typed without its user:
    // the user name is shown only next to a password.
    match (&s.user, &s.password) {
        (Some(user), Some(_)) => {
            out.push_str(&url[user.clone()]);
            out.push_str(":***@");
        }
        (Some(_), None) => out.push_str("***@"),
        _ => {}
    }
    out.push_str(&url[s.host.clone()]);
    if let Some(port) = &s.port {
        out.push(':');
        out.push_str(&url[port.clone()]);
    }
    out.push_str(&url[s.path.clone()]);
    if let Some(query) = &s.query {
        out.push('?');
        let pairs: Vec<String> = url[query.clone()]
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if SHOWN_PARAMS.contains(&k) => pair.to_owned(),
                None if pair.is_empty() => String::new(),
                _ => "***".to_owned(),
            })
            .collect();
        out.push_str(&pairs.join("&"));
    }
    if s.fragment.is_some() {
        out.push_str("#***");
    }
    out
}

/// An `amqp://` or `amqps://` URL read strictly into its parts, each
/// percent-decoded, the way RabbitMQ's URI specification reads them.
/// `Debug` hides the password. See [`SecretUrl::amqp`](super::SecretUrl::amqp).
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpUrl {
    /// `amqp` or `amqps` (lowercased).
    pub scheme: String,
    /// The user name, if the URL has one.
    pub username: Option<String>,
    /// The password, if the URL has one (after a `:` in the user part).
    pub password: Option<String>,
    /// The host (an IPv6 address keeps its brackets).
    pub host: String,
    /// The port, if written.
    pub port: Option<u16>,
    /// The vhost (the path without its leading `/`), if the URL has a path.
    pub vhost: Option<String>,
}

impl AmqpUrl {
    /// The port, or the scheme's default (5672, or 5671 for `amqps`).
    pub fn port_or_default(&self) -> u16 {
        self.port
            .unwrap_or(if self.scheme == "amqps" { 5671 } else { 5672 })
    }

    /// The vhost, or `/` when the URL has no path (`amqp://host`).
    pub fn vhost_or_default(&self) -> &str {
        self.vhost.as_deref().unwrap_or("/")
    }

    /// `host:port/vhost` (the vhost's `/` and `%` percent-encoded): the
    /// address errors name, without credentials.
    pub fn address(&self) -> String {
        let vhost = self
            .vhost_or_default()
            .replace('%', "%25")
            .replace('/', "%2f");
        format!("{}:{}/{vhost}", self.host, self.port_or_default())
    }
}

impl fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpUrl")
            .field("scheme", &self.scheme)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("host", &self.host)
            .field("port", &self.port)
            .field("vhost", &self.vhost)
            .finish()
    }
}

pub(super) fn parse_amqp(url: &str) -> Result<AmqpUrl, UrlError> {
    let s = split(url)?;
    let scheme = url[s.scheme.clone()].to_ascii_lowercase();
    if scheme != "amqp" && scheme != "amqps" {
        return Err(UrlError::fixed("the scheme must be amqp:// or amqps://"));
    }
    let part = |r: &Option<Range<usize>>| r.clone().map(|r| decode(&url[r])).transpose();
    let username = part(&s.user)?;
    let password = part(&s.password)?;
    match (username.as_deref(), password.as_deref()) {
        (Some(""), _) => {
            return Err(UrlError::fixed(
                "an empty user name (the client would log in as guest)",
            ))
        }
        (Some(_), None | Some("")) => {
            return Err(UrlError::fixed(
                "a user name without a password (the client would send the password `guest`)",
            ))
        }
        _ => {}
    }
    let host = decode(&url[s.host.clone()])?;
    let port = match s.port.map(|r| &url[r]) {
        None | Some("") => None,
        Some(p) => Some(
            p.parse()
                .map_err(|_| UrlError::fixed("the port is not a number from 0 to 65535"))?,
        ),
    };
    let path = &url[s.path.clone()];
    let vhost = match path.strip_prefix('/') {
        Some(v) => Some(decode(v)?),
        None => None,
    };
    Ok(AmqpUrl {
        scheme,
        username,
        password,
        host,
        port,
        vhost,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::{BrokerConfig, SecretUrl};

    /// Every window of three characters of `secret`: none may be shown.
    fn leaks(printed: &str, secret: &str) -> Option<String> {
        let chars: Vec<char> = secret.chars().collect();
        chars
            .windows(3)
            .map(|w| w.iter().collect::<String>())
            .find(|w| printed.contains(w.as_str()))
    }

    /// The URL with one change at every position: each character deleted,
    /// doubled, and each URL delimiter (and a space) inserted before it or
    /// put in its place.
    fn mutations(url: &str) -> Vec<String> {
        let chars: Vec<char> = url.chars().collect();
        let mut out = Vec::new();
        for i in 0..=chars.len() {
            let (a, b) = chars.split_at(i);
            let a: String = a.iter().collect();
            let b: String = b.iter().collect();
            for d in ['/', ':', '@', '?', '#', '%', ' ', '[', ']', '\\'] {
                out.push(format!("{a}{d}{b}"));
                if let Some(c) = b.chars().next() {
                    out.push(format!("{a}{d}{}", &b[c.len_utf8()..]));
                }
            }
            if let Some(c) = b.chars().next() {
                let rest = &b[c.len_utf8()..];
                out.push(format!("{a}{rest}"));
                out.push(format!("{a}{c}{c}{rest}"));
            }
        }
        out
    }

    #[test]
    fn no_form_of_a_url_shows_its_password() {
        let bases = [
            ("amqp://app:Zq9xWv@rabbit.example:5672/prod", "Zq9xWv"),
            ("amqps://billing:Kp4tRm@rabbit:5671/%2f", "Kp4tRm"),
            ("amqp://app:Hy7dQn@h/", "Hy7dQn"),
            ("amqp://app:Vb2mLs@10.0.0.5", "Vb2mLs"),
            ("amqp://app:Tg5hYu@h:5672/v?heartbeat=10", "Tg5hYu"),
            ("amqp://a:Wx3cEr%2Fq@h/v", "Wx3cEr"),
        ];
        let mut checked = 0;
        for (base, secret) in bases {
            for url in mutations(base).into_iter().chain([base.to_owned()]) {
                let secret_url = SecretUrl::new(url.clone());
                let mut printed = vec![
                    secret_url.redacted(),
                    format!("{secret_url:?}"),
                    secret_url.to_string(),
                ];
                match secret_url.amqp() {
                    Ok(parsed) => {
                        printed.push(format!("{parsed:?}"));
                        printed.push(parsed.address());
                    }
                    Err(e) => printed.push(e.to_string()),
                }
                match BrokerConfig::from_vars([("RABBITMQ_URL", url.as_str())]) {
                    Ok(config) => {
                        printed.push(config.to_string());
                        printed.push(format!("{config:?}"));
                    }
                    Err(e) => {
                        printed.push(e.to_string());
                        printed.push(format!("{e:?}"));
                    }
                }
                for p in &printed {
                    if let Some(w) = leaks(p, secret) {
                        panic!("`{w}` of the password shown for input {url:?}: {p}");
                    }
                }
                checked += 1;
            }
        }
        assert!(checked > 1000, "{checked}");
    }

    #[test]
    fn malformed_forms_are_refused_without_quoting_them() {
        for url in [
            "amqp//app:s3cret@h:5672/%2f",
            "amqp:/app:s3cret@h/",
            "amqp:app:s3cret@h/",
            "app:s3cret@h:5672",
            "amqp://app:s3/cret@h/v",
            "amqp://app:12/cret@h/v",
            "amqp://app:s3?cret@h/v",
            "amqp://app:s3#cret@h/v",
            "amqp://app:s3cret@/v",
            "amqp://app:s3cret@h:99999/v",
            "amqp://app:s3cret@h:port/v",
            "amqp://app:s3cret@h/a/b",
            "amqp://app:s3cret@h/v%zz",
            "amqp://app:s3%cret@h/v",
            "amqp://app:s3cret@h h/v",
            "amqp://app:s3cret@h/v\n",
            "amqp://app@h/v",
            "amqp://:s3cret@h/v",
            "amqp://app:@h/v",
            "http://app:s3cret@h/v",
            "amqp://app:s3cret@[::1/v",
        ] {
            let err = SecretUrl::new(url).amqp().expect_err(url).to_string();
            assert!(!err.contains("s3") && !err.contains("cret"), "{url}: {err}");
            if url.trim() != url {
                continue; // variables are trimmed
            }
            let config = BrokerConfig::from_vars([("RABBITMQ_URL", url)]).expect_err(url);
            assert_eq!(config.var(), "RABBITMQ_URL");
            let shown = format!("{config} {config:?}");
            assert!(
                !shown.contains("s3") && !shown.contains("cret"),
                "{url}: {shown}"
            );
        }
    }

    #[test]
    fn well_formed_urls_read_as_written() {
        let url = SecretUrl::new("AMQPS://us%40er:p%2Fw:x@Rabbit-1.example:5671/v%2Fh?heartbeat=5")
            .amqp()
            .unwrap();
        assert_eq!(url.scheme, "amqps");
        assert_eq!(url.username.as_deref(), Some("us@er"));
        assert_eq!(url.password.as_deref(), Some("p/w:x"));
        assert_eq!(url.host, "Rabbit-1.example");
        assert_eq!(url.port, Some(5671));
        assert_eq!(url.vhost.as_deref(), Some("v/h"));
        assert_eq!(url.address(), "Rabbit-1.example:5671/v%2fh");
        assert!(!format!("{url:?}").contains("p/w"));
        let bare = SecretUrl::new("amqp://rabbit").amqp().unwrap();
        assert_eq!(
            (bare.port_or_default(), bare.vhost_or_default()),
            (5672, "/")
        );
        assert_eq!(bare.address(), "rabbit:5672/%2f");
        let empty_vhost = SecretUrl::new("amqp://rabbit/").amqp().unwrap();
        assert_eq!(empty_vhost.vhost.as_deref(), Some(""));
    }
}
