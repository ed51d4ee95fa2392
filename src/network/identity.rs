//! Which cluster, and which member, a peer request comes from.
//!
//! Every request a node sends a peer carries two metadata entries: the cluster id and the sender's
//! node id. A node refuses a request from another cluster before it decodes it, so a node started
//! with another cluster's `--peers` (a copied config, a reused address) cannot disturb this one or be
//! taken over by it. The sender's id must match the node the message itself claims to be from (a
//! vote's candidate, an append's leader), so one member cannot speak in another's name by editing
//! only the body. Neither is a secret: against a forger who can reach the peer port, what protects
//! the cluster is peer TLS (see the README's Security section).
//!
//! The cluster id is derived, as etcd derives its own, from `--cluster-token` and the initial voters'
//! ids and peer addresses, so every initial member computes the same id without talking to the
//! others, and a node whose data directory was wiped computes it again. It is stored with the node's
//! data at the first start and read from there afterwards (see `store`): later changes to `--peers`
//! do not change it.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::sync::lock;
use crate::types::{Member, NodeId};

/// The metadata key of the sender's cluster id (16 hex digits).
pub const CLUSTER_ID_HEADER: &str = "raftkv-cluster-id";
/// The metadata key of the sender's node id (decimal).
pub const FROM_HEADER: &str = "raftkv-from";
/// On a refusal of a sender that a committed membership change removed: tells that node it is no
/// longer a member, so it stops (see [`Removal`]).
pub const REMOVED_HEADER: &str = "raftkv-removed";

/// Whether a peer has told this node it was removed from the cluster ([`REMOVED_HEADER`]). A removed
/// node may never hear of its own removal through the log: the leader stops replicating to it as
/// soon as the change is proposed. What it does hear is the others refusing its votes, and that
/// refusal says why. Once set it stays set: removals are committed changes, and ids are not reused.
#[derive(Debug, Default)]
pub struct Removal(std::sync::atomic::AtomicBool);

impl Removal {
    pub fn set(&self) {
        if !self.0.swap(true, Ordering::Relaxed) {
            tracing::warn!("a peer says this node was removed from the cluster; it stops serving");
        }
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ClusterId(pub u64);

impl ClusterId {
    /// The id a cluster bootstrapped from `members` with `token` has.
    pub fn derive(token: &str, members: &BTreeMap<NodeId, Member>) -> ClusterId {
        let mut hash = Sha256::new();
        // Lengths before variable parts, so no two different inputs hash the same bytes.
        hash.update((token.len() as u64).to_be_bytes());
        hash.update(token.as_bytes());
        for (id, member) in members {
            hash.update(id.to_be_bytes());
            hash.update((member.peer_addr.len() as u64).to_be_bytes());
            hash.update(member.peer_addr.as_bytes());
        }
        let digest = hash.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        ClusterId(u64::from_be_bytes(first))
    }

    pub fn parse(text: &str) -> Option<ClusterId> {
        if text.len() != 16 {
            return None;
        }
        u64::from_str_radix(text, 16).ok().map(ClusterId)
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// This node's identity, stamped on every outgoing peer request.
#[derive(Clone, Debug)]
pub struct PeerIdentity {
    pub cluster: ClusterId,
    pub node: NodeId,
}

impl Interceptor for PeerIdentity {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let md = request.metadata_mut();
        // Hex and decimal digits are always valid metadata values.
        if let Ok(v) = MetadataValue::try_from(self.cluster.to_string()) {
            md.insert(CLUSTER_ID_HEADER, v);
        }
        md.insert(FROM_HEADER, MetadataValue::from(self.node));
        Ok(request)
    }
}

/// Why a peer request's identity was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("the request does not say which cluster and node it comes from")]
    Missing,
    #[error("the request is from cluster {found}, this node belongs to cluster {expected}")]
    OtherCluster { expected: ClusterId, found: String },
}

/// The sender's node id, if the request is from `cluster`.
pub fn sender(metadata: &MetadataMap, cluster: ClusterId) -> Result<NodeId, IdentityError> {
    let text = |key| metadata.get(key).and_then(|v| v.to_str().ok());
    let (Some(found), Some(from)) = (text(CLUSTER_ID_HEADER), text(FROM_HEADER)) else {
        return Err(IdentityError::Missing);
    };
    if ClusterId::parse(found) != Some(cluster) {
        return Err(IdentityError::OtherCluster {
            expected: cluster,
            // Bounded: what a stranger sent ends up in a log line.
            found: found.chars().take(32).collect(),
        });
    }
    from.parse().map_err(|_| IdentityError::Missing)
}

/// The sender of a peer request, as its metadata names it (see `identity`), once its cluster checked.
#[derive(Clone, Copy)]
struct PeerSender(NodeId);

/// Refuses requests from another cluster, or that do not say where they come from, before their
/// bodies are read; tags the rest with their sender.
#[derive(Clone)]
pub struct Identify {
    cluster: ClusterId,
    refusals: Arc<Refusals>,
}

impl Identify {
    pub fn new(cluster: ClusterId, refusals: Arc<Refusals>) -> Self {
        Identify { cluster, refusals }
    }
}

impl Interceptor for Identify {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        match sender(request.metadata(), self.cluster) {
            Ok(from) => {
                if let Some(certified) = certified_node(&request)
                    && certified != from
                {
                    // A member's certificate used to speak in another member's name.
                    self.refusals
                        .note("any", from, "sender differs from its certificate");
                    return Err(Status::permission_denied(format!(
                        "the request claims node {from}, its TLS certificate is node {certified}'s"
                    )));
                }
                request.extensions_mut().insert(PeerSender(from));
                Ok(request)
            }
            Err(e) => {
                let why = match e {
                    IdentityError::Missing => "no cluster id or sender",
                    IdentityError::OtherCluster { .. } => "another cluster",
                };
                // The claimed sender, for the log line only (0: none that parses).
                let claimed = request
                    .metadata()
                    .get(FROM_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                self.refusals.note("any", claimed, why);
                Err(Status::failed_precondition(e.to_string()))
            }
        }
    }
}

/// The node id in the certificate the peer showed (peer TLS, a certificate from `raftkv certs`).
/// None without TLS or for a certificate that names no node: the CA check alone then applies.
fn certified_node(request: &Request<()>) -> Option<NodeId> {
    let info = request
        .extensions()
        .get::<crate::listener::ConnectionInfo>()?;
    crate::tls::node_id_of(info.peer_certs.as_ref()?.first()?)
}

/// The sender `Identify` found. Every request passed it, so a missing tag is a bug, refused all the same.
pub fn sent_by<T>(request: &Request<T>) -> Result<NodeId, Status> {
    request
        .extensions()
        .get::<PeerSender>()
        .map(|f| f.0)
        .ok_or_else(|| Status::internal("peer request without a checked sender"))
}

/// How often a burst of refused peer messages is logged.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(1);

/// Counts refused peer messages and logs them at most once per [`REFUSAL_LOG_EVERY`], so a flood of
/// forgeries costs a log line a second, not one per message. Hand-written: a rate limiter crate
/// (governor) would drop the suppressed events rather than count them.
#[derive(Default)]
pub struct Refusals {
    total: AtomicU64,
    window: std::sync::Mutex<Option<(Instant, u64)>>,
}

impl Refusals {
    pub fn note(&self, rpc: &'static str, from: NodeId, reason: &str) {
        let total = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        let mut window = lock(&self.window);
        let now = Instant::now();
        match window.as_mut() {
            Some((since, count)) if now.duration_since(*since) < REFUSAL_LOG_EVERY => *count += 1,
            _ => {
                let since_last = window.map_or(1, |(_, count)| count + 1);
                *window = Some((now, 0));
                drop(window);
                tracing::warn!(
                    rpc,
                    from,
                    reason,
                    refused_since_last_line = since_last,
                    refused_total = total,
                    "refused a peer message"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(addrs: &[&str]) -> BTreeMap<NodeId, Member> {
        addrs
            .iter()
            .enumerate()
            .map(|(i, a)| (i as u64 + 1, Member::new("client", *a)))
            .collect()
    }

    #[test]
    fn the_id_depends_on_the_token_and_the_peers_only() {
        let a = ClusterId::derive("raftkv", &members(&["h:1", "h:2"]));
        assert_eq!(a, ClusterId::derive("raftkv", &members(&["h:1", "h:2"])));
        // Client addresses are not part of it: they may change without making another cluster.
        let mut other_clients = members(&["h:1", "h:2"]);
        other_clients.get_mut(&1).unwrap().addr = "elsewhere".into();
        assert_eq!(a, ClusterId::derive("raftkv", &other_clients));
        assert_ne!(a, ClusterId::derive("other", &members(&["h:1", "h:2"])));
        assert_ne!(a, ClusterId::derive("raftkv", &members(&["h:1", "h:3"])));
        assert_ne!(a, ClusterId::derive("raftkv", &members(&["h:1"])));
        assert_eq!(ClusterId::parse(&a.to_string()), Some(a));
    }

    #[test]
    fn a_request_is_checked_for_its_cluster_and_sender() {
        let ours = ClusterId(0x0123_4567_89ab_cdef);
        let mut request = Request::new(());
        PeerIdentity {
            cluster: ours,
            node: 2,
        }
        .call(Request::new(()))
        .map(|r| request = r)
        .unwrap();
        assert_eq!(sender(request.metadata(), ours), Ok(2));
        assert!(matches!(
            sender(request.metadata(), ClusterId(1)),
            Err(IdentityError::OtherCluster { .. })
        ));
        assert_eq!(
            sender(&MetadataMap::new(), ours),
            Err(IdentityError::Missing)
        );
    }
}
