//! The broker URL, read twice: strictly by the library
//! ([`SecretUrl::amqp`]) and by lapin's own parser. Any difference in what
//! they read (host, port, user, password, vhost) is refused: lapin would
//! otherwise connect somewhere else than written (it reads `amqp:/app:pw@h/`
//! as localhost with the guest login and the rest, password included, as
//! the vhost).

use broker_core::config::{ConfigError, SecretUrl};
use broker_core::BrokerError;
use lapin::uri::AMQPUri;

fn refused(url: &SecretUrl, why: impl std::fmt::Display) -> BrokerError {
    BrokerError::Config(ConfigError::Invalid {
        var: "RABBITMQ_URL".into(),
        reason: format!("`{url}` cannot be used: {why}"),
    })
}

/// Checks a node list as a whole (every node an AMQP URL, one set of
/// credentials and vhost), before each node is read by [`read`].
pub(crate) fn check_list(url: &SecretUrl) -> Result<(), BrokerError> {
    url.amqp_nodes().map(drop).map_err(|e| {
        refused(
            url,
            format_args!(
                "not of the form amqp://user:password@host:port/vhost, nor a comma-separated list of such URLs: {e}"
            ),
        )
    })
}

/// The address for errors (`host:port/vhost`) and the URL as lapin reads
/// it, once both readings agree.
pub(crate) fn read(url: &SecretUrl) -> Result<(String, AMQPUri), BrokerError> {
    let ours = url.amqp().map_err(|e| {
        refused(
            url,
            format_args!("not of the form amqp://user:password@host:port/vhost: {e}"),
        )
    })?;
    let lapin: AMQPUri = url.expose().parse().map_err(|e: String| {
        // lapin's message can quote the whole URL ("Invalid URL: '...'"):
        // shown only when it holds nothing of it.
        let secret = ours.password.as_deref().unwrap_or_default();
        let quotes = e.contains(url.expose()) || (!secret.is_empty() && e.contains(secret));
        let e = if quotes {
            "lapin cannot read it"
        } else {
            e.as_str()
        };
        refused(url, format_args!("the AMQP client refuses it: {e}"))
    })?;
    let auth = &lapin.authority;
    if ours.host.starts_with('[') {
        return Err(refused(
            url,
            format_args!(
                "the AMQP client (lapin) reads an IPv6 address as `{}`: use a host name",
                auth.host
            ),
        ));
    }
    let user = ours.username.as_deref().unwrap_or("guest");
    let differs = |what: &str, written: &str, read: &str| {
        refused(
            url,
            format_args!(
                "the AMQP client would read the {what} as `{read}` where the URL says `{written}`"
            ),
        )
    };
    if auth.host != ours.host {
        return Err(differs("host", &ours.host, &auth.host));
    }
    if auth.port != ours.port_or_default() {
        return Err(differs(
            "port",
            &ours.port_or_default().to_string(),
            &auth.port.to_string(),
        ));
    }
    if auth.userinfo.username != user {
        return Err(differs("user name", user, &auth.userinfo.username));
    }
    if auth.userinfo.password != ours.password.as_deref().unwrap_or("guest") {
        return Err(refused(
            url,
            "the AMQP client would read the password differently from the URL",
        ));
    }
    if lapin.vhost != ours.vhost_or_default() {
        return Err(differs("vhost", ours.vhost_or_default(), &lapin.vhost));
    }
    if lapin.scheme.to_string() != ours.scheme {
        return Err(differs("scheme", &ours.scheme, &lapin.scheme.to_string()));
    }
    Ok((ours.address(), lapin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lapin_reads_as_written_are_kept() {
        for (url, address) in [
            (
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                "127.0.0.1:5672/%2f",
            ),
            ("amqp://app:s3cret@rabbit", "rabbit:5672/%2f"),
            ("amqps://app:s%2F3cret@rabbit:5671/prod", "rabbit:5671/prod"),
            (
                "amqp://rabbit.internal/v%2Fh?heartbeat=10",
                "rabbit.internal:5672/v%2fh",
            ),
        ] {
            let (a, uri) = read(&SecretUrl::new(url)).expect(url);
            assert_eq!(a, address);
            assert_eq!(
                format!("{}:{}", uri.authority.host, uri.authority.port),
                address.split('/').next().unwrap()
            );
        }
    }

    #[test]
    fn urls_lapin_would_read_otherwise_are_refused() {
        for url in [
            // lapin: localhost, guest, vhost "app:s3cret@h/"
            "amqp:/app:s3cret@h/",
            "amqp//app:s3cret@h:5672/%2f",
            // lapin: an IPv6 host becomes localhost
            "amqp://app:s3cret@[::1]:5672/%2f",
            // lapin: an empty password becomes guest
            "amqp://app:@h/",
            // lapin: a heartbeat that is not a number
            "amqp://app:s3cret@h/?heartbeat=x",
        ] {
            let err = read(&SecretUrl::new(url)).expect_err(url);
            let shown = format!("{err} {err:?}");
            assert!(matches!(err, BrokerError::Config(_)), "{url}: {shown}");
            assert!(!err.is_transient());
            assert!(!shown.contains("s3cret"), "{url}: {shown}");
            assert!(shown.contains("RABBITMQ_URL"), "{shown}");
        }
    }
}
