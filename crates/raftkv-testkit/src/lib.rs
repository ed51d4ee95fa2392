//! A cluster of real `raftkv server` processes, driven from outside the way an operator, a crash or a
//! frozen machine would: the integration tests and the fault harness (`raftkv-jepsen`) both run their
//! nodes through it, so there is one place that knows how a node is launched, signalled and polled.
//!
//! Each node is a separate process of the given binary with its own data directory and log file under
//! the cluster's directory (`n<id>.data`, `n<id>.log`; the log is appended to, so a restarted node's
//! log goes on where the last one stopped). A node's addresses come from its [`NodeSpec`]: free
//! loopback ports by default ([`loopback`]), or whatever a caller sets up, with a command wrapper (the
//! fault harness's `ip netns exec`) and flags of its own. Dropping a [`Cluster`] SIGKILLs every node,
//! and when the thread is panicking it first prints the tail of every log, so a failed test can be read
//! without running it again.
//!
//! Nothing here panics on what a process, a socket or the disk does: every action returns [`Error`],
//! which a test unwraps and the fault harness reports.

mod cluster;

use std::io;
use std::time::Duration;

pub use cluster::{Builder, Cluster};

/// How one node is reached and launched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub id: u64,
    /// Its `--listen` address, where clients (and this harness) reach it.
    pub addr: String,
    /// Its `--peer-listen` address, where only Raft traffic is served.
    pub peer_addr: String,
    /// A command the binary runs under (`ip netns exec NS`). It must exec the binary, so that the
    /// child's pid is the node's own and SIGKILL or SIGSTOP reach raftkv, not a wrapper.
    pub wrapper: Vec<String>,
    /// Flags for this node alone, after the cluster's own.
    pub args: Vec<String>,
}

impl NodeSpec {
    /// Node `id` on two loopback ports that were free a moment ago.
    pub fn loopback(id: u64) -> Result<NodeSpec, Error> {
        Ok(NodeSpec {
            id,
            addr: format!("127.0.0.1:{}", free_port()?),
            peer_addr: format!("127.0.0.1:{}", free_port()?),
            wrapper: Vec::new(),
            args: Vec::new(),
        })
    }
}

/// Nodes 1..=`n` on free loopback ports.
pub fn loopback(n: u64) -> Result<Vec<NodeSpec>, Error> {
    (1..=n).map(NodeSpec::loopback).collect()
}

/// A loopback TCP port that was free a moment ago. The node binds it shortly after; a clash makes that
/// node fail to start, which its caller sees as an exit or a missing leader.
pub fn free_port() -> Result<u16, Error> {
    portpicker::pick_unused_port().ok_or(Error::NoFreePort)
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no free loopback port")]
    NoFreePort,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("starting node {id} ({command}): {source}")]
    Spawn {
        id: u64,
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("node {0} is already running")]
    AlreadyRunning(u64),
    #[error("the cluster already has a node {0}")]
    Exists(u64),
    #[error("node {0} is not running")]
    NotRunning(u64),
    #[error("kill -{signal} node {id} (pid {pid}) failed")]
    Signal {
        id: u64,
        pid: u32,
        signal: &'static str,
    },
    #[error("node {id} did not stop within {timeout:?} of SIGTERM, so it was SIGKILLed")]
    StopTimeout { id: u64, timeout: Duration },
    #[error("node {id} still running after {timeout:?}")]
    StillRunning { id: u64, timeout: Duration },
    #[error("no agreed leader among {among:?} within {timeout:?}: {last}")]
    NoLeader {
        among: Vec<u64>,
        timeout: Duration,
        last: String,
    },
    #[error("node {id} did not reach {what} within {timeout:?}: {last}")]
    NotReached {
        id: u64,
        what: String,
        timeout: Duration,
        last: String,
    },
    /// Boxed: it is large, and every other variant is small.
    #[error("TLS certificates: {0}")]
    Tls(#[source] Box<raftkv::tls::TlsError>),
    #[error("endpoint {addr}: {source}")]
    Endpoint {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
}
