//! Errors at the API edge and their gRPC statuses.
//!
//! The status code tells a client what it may do next: `UNAVAILABLE` means the request was not
//! proposed and is safe to retry anywhere; `UNKNOWN` and `DEADLINE_EXCEEDED` on a write mean it may or may
//! not have been applied. Every status raftkv itself produces carries `raftkv-node-id`, so a node that
//! forwarded a request can tell a peer's considered answer from a transport failure.

use tonic::metadata::MetadataValue;

use crate::types::NodeId;

pub use raftkv_client::{LEADER_ADDR_HEADER, LEADER_ID_HEADER, NODE_ID_HEADER};

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

/// The client crate's retry rule: a status is certainly not proposed when it is a raftkv node's own
/// `UNAVAILABLE` or its transport error shows the request never reached a server.
pub use raftkv_client::certainly_not_proposed;

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule the client crate applies reads the header this node stamps on its refusals.
    #[test]
    fn this_nodes_refusal_is_certainly_not_proposed() {
        let own = ApiError::unavailable("not the leader", LeaderHint::default()).into_status(2);
        assert!(certainly_not_proposed(&own));
        let unknown = ApiError::Unknown("in flight".into()).into_status(2);
        assert!(!certainly_not_proposed(&unknown));
    }
}
