//! The broker's one connection, on one node of a node list.
//!
//! `RABBITMQ_URL` may list several nodes of a cluster
//! (`amqp://app:pw@rabbit-1,amqp://app:pw@rabbit-2`). lapin takes one URI
//! per connection, so the failover is ours: a connection attempt is a
//! *round* over the nodes, each tried once (cut to the operation timeout
//! and to the reconnect policy's time left), starting from the node after
//! the one whose connection was lost; the policy's backoff runs only
//! between rounds. A lost node is so tried last, and a client whose node
//! dies is on a live one after one failed connect, not after a backoff.
//! The order of the list is kept, or drawn at random once
//! ([`NodeOrder::Shuffle`]), so that clients spread over the nodes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use broker_core::config::{NodeOrder, SecretUrl};
use broker_core::{BrokerError, Result};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};

use crate::{logs, Failure, Inner, BACKEND};

/// One node of the list: where it is (for logs, errors and health) and the
/// URI lapin connects to.
pub(crate) struct Node {
    /// `host:port/vhost`, without credentials.
    pub(crate) address: String,
    pub(crate) uri: AMQPUri,
}

/// The nodes of `url` in the order they are tried: each read as lapin
/// reads it ([`crate::url::read`]), all with the same credentials and
/// vhost, then shuffled once for [`NodeOrder::Shuffle`].
pub(crate) fn nodes(url: &SecretUrl, order: NodeOrder) -> Result<Vec<Node>> {
    crate::url::check_list(url)?;
    let mut nodes = url
        .nodes()
        .iter()
        .map(|node| crate::url::read(node).map(|(address, uri)| Node { address, uri }))
        .collect::<Result<Vec<_>>>()?;
    if order == NodeOrder::Shuffle {
        // Fisher-Yates on a v4 UUID's 122 random bits: plenty for a node
        // list, and no random-number crate for one draw per client.
        let mut bits = uuid::Uuid::new_v4().as_u128();
        for i in (1..nodes.len()).rev() {
            let j = (bits % (i as u128 + 1)) as usize;
            bits /= i as u128 + 1;
            nodes.swap(i, j);
        }
    }
    Ok(nodes)
}

/// The live connection and the node it is on.
pub(crate) struct Link {
    pub(crate) conn: Arc<Connection>,
    pub(crate) node: usize,
}

/// Which node to try first: the one after the node last lost.
#[derive(Default)]
pub(crate) struct NextNode(AtomicUsize);

/// How many connections were made: channels opened on an earlier one are
/// not used again (lapin can leave a channel of a dead connection looking
/// connected).
#[derive(Default)]
pub(crate) struct Epoch(std::sync::atomic::AtomicU64);

/// The node the connection is on, for health reports without a lock;
/// [`Connected::NONE`] while there is none.
pub(crate) struct Connected(AtomicUsize);

impl Connected {
    const NONE: usize = usize::MAX;

    /// No connection any more (closed on purpose).
    pub(crate) fn clear(&self) {
        self.0.store(Connected::NONE, Ordering::Relaxed);
    }
}

impl Default for Connected {
    fn default() -> Self {
        Connected(AtomicUsize::new(Connected::NONE))
    }
}

impl Inner {
    /// The live connection, connecting (with the reconnect policy) when
    /// there is none. Concurrent callers share one reconnect.
    pub(crate) async fn connection(&self) -> Result<Arc<Connection>> {
        let mut link = self.link.lock().await;
        if self.shut_down.load(Ordering::Acquire) {
            return Err(BrokerError::Closed("rabbitmq broker"));
        }
        if let Some(live) = link.as_ref() {
            if live.conn.status().connected() {
                return Ok(live.conn.clone());
            }
            self.lost(live.node);
        }
        *link = None;
        let (conn, node) = self.connect_with_policy().await?;
        let conn = Arc::new(conn);
        *link = Some(Link {
            conn: conn.clone(),
            node,
        });
        self.connected.0.store(node, Ordering::Relaxed);
        self.epoch.0.fetch_add(1, Ordering::Release);
        tracing::info!(url = %self.options.url, node = %self.nodes[node].address, "connected to RabbitMQ");
        Ok(conn)
    }

    /// The connection on `node` was lost: the next round starts after it.
    fn lost(&self, node: usize) {
        self.connected.clear();
        if let Some(suppressed) = logs::allow("connection lost") {
            tracing::warn!(url = %self.options.url, node = %self.nodes[node].address, suppressed, "RabbitMQ connection lost; reconnecting");
        }
        self.next_node
            .0
            .store((node + 1) % self.nodes.len(), Ordering::Relaxed);
    }

    /// The number of the live connection (see [`Epoch`]).
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.0.load(Ordering::Acquire)
    }

    /// The address of the node the connection is on, if it is connected
    /// (as far as this client has noticed).
    pub(crate) fn connected_node(&self) -> Option<&str> {
        let node = self.connected.0.load(Ordering::Relaxed);
        self.nodes.get(node).map(|n| n.address.as_str())
    }

    /// Connects under the reconnect policy, in rounds over the nodes: each
    /// attempt is cut to the policy's time left, so the whole takes at most
    /// the policy's limit; a refusal (credentials, vhost, TLS) ends it at
    /// once. The error names every address (`host:port/vhost`).
    async fn connect_with_policy(&self) -> Result<(Connection, usize)> {
        let policy = &self.options.reconnect;
        let started = tokio::time::Instant::now();
        let mut delays = policy.delays();
        let mut attempts = 0usize;
        loop {
            let first = self.next_node.0.load(Ordering::Relaxed);
            let mut lost = Vec::with_capacity(self.nodes.len());
            for k in 0..self.nodes.len() {
                let node = (first + k) % self.nodes.len();
                attempts += 1;
                let limit = policy
                    .time_left(started)
                    .map_or(self.options.operation_timeout, |left| {
                        left.min(self.options.operation_timeout)
                    });
                if limit.is_zero() {
                    break;
                }
                match self.connect_once(node, limit).await {
                    Ok(conn) => return Ok((conn, node)),
                    Err(Failure::Final(e)) => return Err(e),
                    Err(Failure::Lost(e)) => {
                        lost.push(format!("{}: {e}", self.nodes[node].address))
                    }
                }
            }
            let lost = lost.join("; ");
            let next = delays
                .next()
                .filter(|d| policy.time_left(started).is_none_or(|left| *d < left));
            let Some(delay) = next else {
                return Err(BrokerError::Unavailable {
                    backend: BACKEND,
                    attempts,
                    source: format!("connect to {lost}").into(),
                });
            };
            if let Some(suppressed) = logs::allow("connect failed") {
                tracing::warn!(url = %self.options.url, attempt = attempts, ?delay, error = %lost, suppressed, "RabbitMQ connection attempt failed on every node; retrying");
            }
            tokio::time::sleep(delay).await;
        }
    }

    async fn connect_once(&self, node: usize, limit: Duration) -> Result<Connection, Failure> {
        let uri = self.nodes[node].uri.clone();
        let mut props = ConnectionProperties::default();
        if let Some(name) = &self.options.connection_name {
            props = props.with_connection_name(name.clone().into());
        }
        match &self.options.tls_ca_pem {
            None => {
                self.bounded_by("connect", limit, Connection::connect_uri(uri, props))
                    .await
            }
            Some(pem) => {
                let tls = lapin::tcp::OwnedTLSConfig {
                    identity: None,
                    cert_chain: Some(pem.clone()),
                };
                let builder = lapin::DefaultConnectionBuilder::new()
                    .map_err(|e| crate::classify("connect", e))?
                    .with_uri(uri)
                    .with_properties(props)
                    .with_tls_config(tls);
                self.bounded_by("connect", limit, builder.connect()).await
            }
        }
    }

    /// Opens a channel on the live connection; a connection that turns out
    /// dead is dropped so the next call reconnects (to the next node).
    pub(crate) async fn channel(&self) -> Result<lapin::Channel, Failure> {
        let conn = self.connection().await.map_err(Failure::Final)?;
        let channel = self.bounded("channel open", conn.create_channel()).await;
        if channel.is_err() {
            let mut link = self.link.lock().await;
            if let Some(live) = link.as_ref().filter(|l| Arc::ptr_eq(&l.conn, &conn)) {
                self.lost(live.node);
                *link = None;
            }
        }
        channel
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = "amqp://app:s3cret@rabbit-1:5672/prod,amqp://app:s3cret@rabbit-2:5673/prod, amqps://app:s3cret@rabbit-3/prod";

    fn addresses(order: NodeOrder) -> Vec<String> {
        nodes(&SecretUrl::new(LIST), order)
            .expect("a valid list")
            .into_iter()
            .map(|n| n.address)
            .collect()
    }

    #[test]
    fn a_node_list_is_read_in_order_or_shuffled() {
        let listed = [
            "rabbit-1:5672/prod",
            "rabbit-2:5673/prod",
            "rabbit-3:5671/prod",
        ];
        assert_eq!(addresses(NodeOrder::InOrder), listed);
        let mut orders = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let mut shuffled = addresses(NodeOrder::Shuffle);
            orders.insert(shuffled.clone());
            shuffled.sort();
            assert_eq!(shuffled, listed, "the same nodes");
        }
        assert_eq!(orders.len(), 6, "every order of three nodes is drawn");
    }

    #[test]
    fn a_list_with_two_sets_of_credentials_is_refused_without_showing_them() {
        for bad in [
            "amqp://app:s3cret@rabbit-1,amqp://app:other@rabbit-2",
            "amqp://app:s3cret@rabbit-1,rabbit-2",
            "amqp://app:s3cret@rabbit-1,,amqp://app:s3cret@rabbit-2",
            "amqp://app:s3cret@rabbit-1,amqp:/app:s3cret@rabbit-2/",
        ] {
            let err = match nodes(&SecretUrl::new(bad), NodeOrder::InOrder) {
                Ok(_) => panic!("{bad}: accepted"),
                Err(e) => e,
            };
            let shown = format!("{err} {err:?}");
            assert!(matches!(err, BrokerError::Config(_)), "{bad}: {shown}");
            assert!(shown.contains("RABBITMQ_URL"), "{bad}: {shown}");
            assert!(
                !shown.contains("s3cret") && !shown.contains("other"),
                "{bad}: {shown}"
            );
        }
    }
}
