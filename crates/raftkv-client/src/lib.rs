//! The Rust client of raftkv: the public API's protobuf types and gRPC stubs ([`pb`]), a leader-aware
//! [`Client`], watches that resume on their own ([`Watch`]), leases with a background keep-alive
//! ([`KeepAlive`]), a lock built on them ([`Lock`]), the metadata headers a node answers with, and the rule for when a failed call is safe to
//! retry ([`certainly_not_proposed`]).
//!
//! It depends on nothing of the server, so a program that only talks to a cluster builds only this.

mod client;
mod endpoint;
mod lease;
mod lock;
mod retry;
mod watch;

pub use client::{Client, ClientError, own_timeout_is_deadline_exceeded};
pub use endpoint::endpoint;
pub use lease::{KeepAlive, LeaseLost};
pub use lock::{Lock, LockError};
pub use retry::{certainly_not_proposed, certainly_not_sent};
pub use watch::{Watch, WatchError, WatchOptions, prefix_end};

/// Generated protobuf and gRPC code of the public API.
pub mod pb {
    /// `raftkv.v1`.
    pub mod v1 {
        tonic::include_proto!("raftkv.v1");
    }
}

/// On every status a raftkv node produces itself: which node answered. Its absence on an
/// `UNAVAILABLE` means a transport (or a proxy) said it, not a node.
pub const NODE_ID_HEADER: &str = "raftkv-node-id";
/// On an `UNAVAILABLE` from a node that knows the leader: the leader's id.
pub const LEADER_ID_HEADER: &str = "raftkv-leader-id";
/// On an `UNAVAILABLE` from a node that knows the leader: the leader's client address, to retry at.
pub const LEADER_ADDR_HEADER: &str = "raftkv-leader-addr";
/// On the `OUT_OF_RANGE` that ends a watch: the oldest revision the node can still stream from.
pub const COMPACT_REVISION_HEADER: &str = "raftkv-compact-revision";
