//! openraft's transport over tonic: [`client`] is openraft's side (it calls peers), [`service`] answers
//! peers on the peer listener (`--peer-listen`), a port of its own: the public port never serves it,
//! so a client can neither call it nor crowd it out. [`identity`] is what every peer request says about
//! where it comes from, and [`vouch`] how a node admits a member its own log does not name yet. The
//! channels here also carry the node's forwarding (`node::forward`).

pub mod backoff;
pub mod client;
pub mod identity;
pub mod service;
#[cfg(test)]
mod tests;
pub mod vouch;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tonic::codegen::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig};

use crate::limits::MAX_PEER_MESSAGE_BYTES;
use crate::pb::internal::forward_client::ForwardClient;
use crate::pb::internal::raft_client::RaftClient;
use crate::sync::lock;
use crate::types::NodeId;
use backoff::PeerHealth;
use identity::PeerIdentity;

/// The data in one InstallSnapshot chunk; a receiver refuses larger ones.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;

/// One lazily connected channel per peer address and purpose, shared by every caller. tonic channels
/// reconnect by themselves, so a restarted peer is reached again without rebuilding anything, and
/// snapshots get their own connection so a large transfer never delays heartbeats.
#[derive(Clone)]
pub struct PeerChannels {
    channels: Arc<Mutex<HashMap<(String, Purpose), Channel>>>,
    /// One per peer address, whatever the purpose: a peer that is down is down for all of them.
    health: Arc<Mutex<HashMap<String, Arc<PeerHealth>>>>,
    /// Stamped on every request, so a peer can refuse what comes from another cluster.
    identity: PeerIdentity,
    /// With peer TLS: peers are dialed over https and shown this node's certificate.
    tls: Option<ClientTlsConfig>,
    /// `--dial` overrides: where to reach a peer when it is not at its membership peer address (the
    /// fault harness routes each link through a proxy of its own).
    routes: Arc<BTreeMap<NodeId, String>>,
}

/// A client of a peer's Raft service whose every request carries this node's [`PeerIdentity`].
pub type PeerRpc = RaftClient<InterceptedService<Channel, PeerIdentity>>;
/// A client of a peer's Forward service (see `node::forward`), identified the same way.
pub type ForwardRpc = ForwardClient<InterceptedService<Channel, PeerIdentity>>;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Purpose {
    Raft,
    /// Replication streams (`StreamAppend`), apart from votes and unary calls.
    Replication,
    Snapshot,
    /// Forwarded client writes and read-index requests.
    Forward,
}

impl PeerChannels {
    /// `tls`: dial peers over TLS with this configuration (peer TLS), else in plaintext.
    pub fn new(
        identity: PeerIdentity,
        tls: Option<ClientTlsConfig>,
        routes: BTreeMap<NodeId, String>,
    ) -> Self {
        PeerChannels {
            channels: Arc::default(),
            health: Arc::default(),
            identity,
            tls,
            routes: Arc::new(routes),
        }
    }

    /// Where to dial `peer`, whose membership records `peer_addr`.
    pub fn route<'a>(&'a self, peer: NodeId, peer_addr: &'a str) -> &'a str {
        self.routes.get(&peer).map_or(peer_addr, String::as_str)
    }

    /// A Raft client on the shared channel for `addr` and `purpose`.
    pub fn client(&self, addr: &str, purpose: Purpose) -> Result<PeerRpc, tonic::transport::Error> {
        let channel = self.get(addr, purpose)?;
        Ok(RaftClient::with_interceptor(channel, self.identity.clone())
            .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES))
    }

    /// A Forward client on the shared forwarding channel for `addr`.
    pub fn forward_client(&self, addr: &str) -> Result<ForwardRpc, tonic::transport::Error> {
        let channel = self.get(addr, Purpose::Forward)?;
        Ok(
            ForwardClient::with_interceptor(channel, self.identity.clone())
                .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES),
        )
    }

    pub fn health(&self, addr: &str) -> Arc<PeerHealth> {
        lock(&self.health)
            .entry(addr.to_string())
            .or_default()
            .clone()
    }

    fn get(&self, addr: &str, purpose: Purpose) -> Result<Channel, tonic::transport::Error> {
        let key = (addr.to_string(), purpose);
        let mut map = lock(&self.channels);
        if let Some(ch) = map.get(&key) {
            return Ok(ch.clone());
        }
        let channel = endpoint(addr, self.tls.as_ref())?.connect_lazy();
        map.insert(key, channel.clone());
        Ok(channel)
    }
}

/// The connection settings every raftkv-to-raftkv connection uses: the same as every client's.
pub use raftkv_client::endpoint;

/// True when a failed peer call certainly never reached the peer's handler, so the request in it was
/// certainly not acted on (the client crate's rule, read from the transport error's type).
pub use raftkv_client::certainly_not_sent;
