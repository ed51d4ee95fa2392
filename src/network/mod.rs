//! Raft traffic between nodes over tonic: [`client`] is openraft's side (it calls peers), [`server`]
//! answers peers on the peer listener (`--peer-listen`), a port of its own: the public port never
//! serves it, so a client can neither call it nor crowd it out. [`identity`] is what every peer
//! request says about where it comes from.

pub mod backoff;
pub mod client;
pub mod identity;
pub mod server;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::codegen::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::pb::internal::raft_client::RaftClient;
use backoff::PeerHealth;
use identity::PeerIdentity;

/// Largest node-to-node message. It bounds an AppendEntries batch: `max_payload_entries` is derived
/// from it and the largest client request, so a full batch always fits.
pub const MAX_PEER_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

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
}

/// A client of a peer's Raft service whose every request carries this node's [`PeerIdentity`].
pub type PeerRpc = RaftClient<InterceptedService<Channel, PeerIdentity>>;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Purpose {
    Raft,
    /// Replication streams (`StreamAppend`), apart from votes and unary calls.
    Replication,
    Snapshot,
    /// Forwarded client writes and read-index requests.
    Client,
}

impl PeerChannels {
    /// `tls`: dial peers over TLS with this configuration (peer TLS), else in plaintext.
    pub fn new(identity: PeerIdentity, tls: Option<ClientTlsConfig>) -> Self {
        PeerChannels {
            channels: Arc::default(),
            health: Arc::default(),
            identity,
            tls,
        }
    }

    /// A Raft client on the shared channel for `addr` and `purpose`.
    pub fn client(&self, addr: &str, purpose: Purpose) -> Result<PeerRpc, tonic::transport::Error> {
        let channel = self.get(addr, purpose)?;
        Ok(RaftClient::with_interceptor(channel, self.identity.clone())
            .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES))
    }

    pub fn health(&self, addr: &str) -> Arc<PeerHealth> {
        let mut map = self
            .health
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        map.entry(addr.to_string()).or_default().clone()
    }

    fn get(&self, addr: &str, purpose: Purpose) -> Result<Channel, tonic::transport::Error> {
        let key = (addr.to_string(), purpose);
        let mut map = self
            .channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(ch) = map.get(&key) {
            return Ok(ch.clone());
        }
        let channel = endpoint(addr, self.tls.as_ref())?.connect_lazy();
        map.insert(key, channel.clone());
        Ok(channel)
    }
}

/// How long a TLS handshake with a node may take before the connection attempt fails.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The connection settings every raftkv-to-raftkv (and CLI-to-raftkv) connection uses. With `tls`
/// the address is dialed over https (whatever scheme it was written with), and the server's
/// certificate must be valid for the address' host.
pub fn endpoint(
    addr: &str,
    tls: Option<&ClientTlsConfig>,
) -> Result<Endpoint, tonic::transport::Error> {
    let uri = match (addr.split_once("://"), tls) {
        (Some((_, rest)), Some(_)) => format!("https://{rest}"),
        (Some(_), None) => addr.to_string(),
        (None, Some(_)) => format!("https://{addr}"),
        (None, None) => format!("http://{addr}"),
    };
    let mut endpoint = Endpoint::from_shared(uri)?;
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.clone().timeout(TLS_HANDSHAKE_TIMEOUT))?;
    }
    Ok(endpoint
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5)))
}
