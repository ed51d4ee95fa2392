//! The operations a benchmark client issues, for either system. An enum rather than a trait object: the
//! dispatch is a match, and neither system pays for boxing futures the other does not.

use std::time::Duration;

use super::{BenchError, Target};

/// One shared connection (an HTTP/2 channel); cloning it shares the connection.
#[derive(Clone)]
pub(super) enum Conn {
    Raftkv(super::raftkv::RaftkvConn),
    #[cfg(feature = "etcd")]
    Etcd(super::etcd::EtcdConn),
}

/// A failed request, keyed by its gRPC status code (or `transport` when no status came back).
#[derive(Debug)]
pub(super) struct OpError {
    pub code: String,
    pub message: String,
}

impl OpError {
    pub(super) fn from_status(s: &tonic::Status) -> Self {
        Self {
            code: format!("{:?}", s.code()),
            message: s.message().to_string(),
        }
    }
}

pub(super) struct CasOutcome {
    pub succeeded: bool,
    /// On a failed compare: the key's current value (None: absent).
    pub current: Option<Vec<u8>>,
}

impl Conn {
    pub(super) async fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<(), OpError> {
        match self {
            Conn::Raftkv(c) => c.put(key, value).await,
            #[cfg(feature = "etcd")]
            Conn::Etcd(c) => c.put(key, value).await,
        }
    }

    pub(super) async fn get(&mut self, key: Vec<u8>, strong: bool) -> Result<(), OpError> {
        match self {
            Conn::Raftkv(c) => c.get(key, strong).await,
            #[cfg(feature = "etcd")]
            Conn::Etcd(c) => c.get(key, strong).await,
        }
    }

    pub(super) async fn cas(
        &mut self,
        key: Vec<u8>,
        expected: Vec<u8>,
        next: Vec<u8>,
    ) -> Result<CasOutcome, OpError> {
        match self {
            Conn::Raftkv(c) => c.cas(key, expected, next).await,
            #[cfg(feature = "etcd")]
            Conn::Etcd(c) => c.cas(key, expected, next).await,
        }
    }
}

/// Opens `n` connections, connection `i` to endpoint `i mod len`.
pub(super) async fn connect(
    target: Target,
    endpoints: &[String],
    n: usize,
    timeout: Duration,
    tls: Option<&tonic::transport::ClientTlsConfig>,
) -> Result<Vec<Conn>, BenchError> {
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let endpoint = &endpoints[i % endpoints.len()];
        conns.push(match target {
            Target::Raftkv => {
                Conn::Raftkv(super::raftkv::RaftkvConn::connect(endpoint, timeout, tls)?)
            }
            #[cfg(feature = "etcd")]
            Target::Etcd => Conn::Etcd(super::etcd::EtcdConn::connect(endpoint, timeout).await?),
            #[cfg(not(feature = "etcd"))]
            Target::Etcd => return Err(BenchError::EtcdDisabled),
        });
    }
    Ok(conns)
}

/// The endpoint (as given) of the node that currently leads.
pub(super) async fn leader(
    target: Target,
    endpoints: &[String],
    timeout: Duration,
    tls: Option<&tonic::transport::ClientTlsConfig>,
) -> Result<String, BenchError> {
    let found = match target {
        Target::Raftkv => super::raftkv::leader(endpoints, timeout, tls).await,
        #[cfg(feature = "etcd")]
        Target::Etcd => super::etcd::leader(endpoints, timeout).await,
        #[cfg(not(feature = "etcd"))]
        Target::Etcd => return Err(BenchError::EtcdDisabled),
    };
    found.ok_or_else(|| BenchError::NoLeader(endpoints.to_vec()))
}
