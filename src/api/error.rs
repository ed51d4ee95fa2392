//! Errors at the API edge and their gRPC statuses.
//!
//! The status code tells a client what it may do next: `UNAVAILABLE` means the request was not
//! proposed and is safe to retry anywhere; `UNKNOWN` and `DEADLINE_EXCEEDED` on a write mean it may or may
//! not have been applied. Every status raftkv itself produces carries `raftkv-node-id`, so a node that
//! forwarded a request can tell a peer's considered answer from a transport failure.

use tonic::metadata::MetadataValue;

use crate::types::NodeId;

pub const NODE_ID_HEADER: &str = "raftkv-node-id";
pub const LEADER_ID_HEADER: &str = "raftkv-leader-id";
pub const LEADER_ADDR_HEADER: &str = "raftkv-leader-addr";

/// Who this node believes leads, for hints in `UNAVAILABLE` answers.
#[derive(Debug, Clone, Default)]
pub struct LeaderHint {
    pub id: Option<NodeId>,
    pub addr: Option<String>,
}

impl std::fmt::Display for LeaderHint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.id, &self.addr) {
            (Some(id), Some(addr)) => write!(f, "leader hint: node {id} at {addr}"),
            (Some(id), None) => write!(f, "leader hint: node {id}"),
            _ => write!(f, "no leader known"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    TooLarge(String),
    /// Not proposed: safe to retry.
    #[error("{reason}; {hint}")]
    Unavailable { reason: String, hint: LeaderHint },
    /// A write whose fate is unknown: it may have been applied.
    #[error("{0}")]
    Unknown(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("storage: {0}")]
    Storage(#[from] std::io::Error),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn unavailable(reason: impl Into<String>, hint: LeaderHint) -> Self {
        ApiError::Unavailable {
            reason: reason.into(),
            hint,
        }
    }

    pub fn into_status(self, node_id: NodeId) -> tonic::Status {
        let message = self.to_string();
        let mut status = match &self {
            ApiError::InvalidArgument(_) => tonic::Status::invalid_argument(message),
            ApiError::TooLarge(_) => tonic::Status::resource_exhausted(message),
            ApiError::Unavailable { .. } => tonic::Status::unavailable(message),
            ApiError::Unknown(_) => tonic::Status::unknown(message),
            ApiError::DeadlineExceeded(_) => tonic::Status::deadline_exceeded(message),
            ApiError::Storage(_) | ApiError::Internal(_) => tonic::Status::internal(message),
        };
        let md = status.metadata_mut();
        md.insert(NODE_ID_HEADER, MetadataValue::from(node_id));
        if let ApiError::Unavailable { hint, .. } = &self {
            if let Some(id) = hint.id {
                md.insert(LEADER_ID_HEADER, MetadataValue::from(id));
            }
            if let Some(addr) = hint.addr.as_deref().and_then(|a| a.parse().ok()) {
                md.insert(LEADER_ADDR_HEADER, addr);
            }
        }
        status
    }
}

/// True when a status is a raftkv node's own `UNAVAILABLE` or the request never reached a server, i.e.
/// it was certainly not proposed. Anything else from a forwarded write leaves its fate unknown.
pub fn certainly_not_proposed(status: &tonic::Status) -> bool {
    if status.code() != tonic::Code::Unavailable {
        return false;
    }
    if status.metadata().contains_key(NODE_ID_HEADER) {
        return true;
    }
    // tonic's connect failures never sent a byte of the request. Match them exactly: a connection that
    // breaks mid-call ("error reading a body from connection", "connection reset") also says
    // "connect", and that request may well have been proposed.
    let text = format!("{status:?}").to_ascii_lowercase();
    CONNECT_FAILURES.iter().any(|p| text.contains(p))
}

const CONNECT_FAILURES: [&str; 4] = [
    "tcp connect error",
    "error trying to connect",
    "connection refused",
    "client error (connect)",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refusals_before_sending_are_certainly_not_proposed() {
        let own = ApiError::unavailable("not the leader", LeaderHint::default()).into_status(2);
        assert!(certainly_not_proposed(&own));
        for before in [
            "tcp connect error",
            "error trying to connect: tcp connect error: Connection refused (os error 111)",
        ] {
            assert!(
                certainly_not_proposed(&tonic::Status::unavailable(before)),
                "{before}"
            );
        }
        for during in [
            "error reading a body from connection",
            "connection reset",
            "transport error: connection closed before message completed",
            "h2 protocol error: broken pipe",
        ] {
            assert!(
                !certainly_not_proposed(&tonic::Status::unavailable(during)),
                "{during}"
            );
        }
        assert!(!certainly_not_proposed(&tonic::Status::unknown(
            "tcp connect error"
        )));
    }
}
