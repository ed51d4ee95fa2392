//! The one table from raftkv's failures to gRPC statuses, for every public call.
//!
//! The status code tells a client what it may do next: `UNAVAILABLE` means the request was not
//! proposed and is safe to retry anywhere (the `raftkv-leader-*` headers say where); `UNKNOWN` and
//! `DEADLINE_EXCEEDED` on a write mean it may or may not have been applied. Every status raftkv itself
//! produces carries `raftkv-node-id`, so a client can tell a node's considered answer from a transport
//! failure.

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use crate::limits::Invalid;
use crate::node::Error;
use crate::types::NodeId;

pub use raftkv_client::{
    COMPACT_REVISION_HEADER, LEADER_ADDR_HEADER, LEADER_ID_HEADER, NODE_ID_HEADER,
};

/// The status node `node_id` answers with for `e`.
pub fn of(node_id: NodeId, e: Error) -> Status {
    let code = match &e {
        Error::NotLeader { .. } | Error::Stopped(_) => Code::Unavailable,
        Error::MaybeApplied(_) => Code::Unknown,
        Error::Deadline(_) => Code::DeadlineExceeded,
        Error::Invalid(_) => Code::InvalidArgument,
        Error::Exhausted(_) => Code::ResourceExhausted,
        Error::Storage(_) | Error::Internal(_) => Code::Internal,
        Error::Refused(_) => Code::FailedPrecondition,
        Error::NotFound(_) => Code::NotFound,
        Error::Compacted { .. } => Code::OutOfRange,
    };
    let mut status = Status::new(code, e.to_string());
    let md = status.metadata_mut();
    md.insert(NODE_ID_HEADER, MetadataValue::from(node_id));
    if let Error::Compacted { oldest, .. } = &e {
        md.insert(COMPACT_REVISION_HEADER, MetadataValue::from(*oldest));
    }
    if let Error::NotLeader { hint, .. } = &e {
        if let Some(id) = hint.id {
            md.insert(LEADER_ID_HEADER, MetadataValue::from(id));
        }
        if let Some(addr) = hint.addr.as_deref().and_then(|a| a.parse().ok()) {
            md.insert(LEADER_ADDR_HEADER, addr);
        }
    }
    status
}

/// A request the API refused before it reached the node.
pub fn invalid(node_id: NodeId, e: Invalid) -> Status {
    of(node_id, e.into())
}

/// A handler's answer: the response, or the status that says what went wrong.
pub fn reply<T>(
    node: &crate::node::Node,
    result: Result<T, Error>,
) -> Result<tonic::Response<T>, tonic::Status> {
    result
        .map(tonic::Response::new)
        .map_err(|e| of(node.id(), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::LeaderHint;

    /// Each kind of failure keeps the code clients already act on.
    #[test]
    fn every_failure_has_its_code() {
        let hint = LeaderHint {
            id: Some(3),
            addr: Some("127.0.0.1:7003".into()),
        };
        for (e, code) in [
            (
                Error::not_leader("not the leader", hint.clone()),
                Code::Unavailable,
            ),
            (Error::Stopped("fatal".into()), Code::Unavailable),
            (Error::MaybeApplied("?".into()), Code::Unknown),
            (Error::Deadline("late".into()), Code::DeadlineExceeded),
            (Error::Invalid("bad".into()), Code::InvalidArgument),
            (Error::Exhausted("full".into()), Code::ResourceExhausted),
            (Error::Storage("disk".into()), Code::Internal),
            (Error::Internal("bug".into()), Code::Internal),
            (Error::Refused("removed".into()), Code::FailedPrecondition),
            (Error::NotFound("no node 9".into()), Code::NotFound),
            (
                Error::Compacted {
                    reason: "gone".into(),
                    oldest: 40,
                },
                Code::OutOfRange,
            ),
        ] {
            let status = of(2, e.clone());
            assert_eq!(status.code(), code, "{e:?}");
            assert_eq!(status.metadata().get(NODE_ID_HEADER).unwrap(), "2");
        }
        let refused = of(2, Error::not_leader("not the leader", hint));
        assert_eq!(refused.metadata().get(LEADER_ID_HEADER).unwrap(), "3");
        assert_eq!(
            refused.metadata().get(LEADER_ADDR_HEADER).unwrap(),
            "127.0.0.1:7003"
        );
        assert!(refused.message().contains("node 3 at 127.0.0.1:7003"));
        let compacted = of(
            2,
            Error::Compacted {
                reason: "gone".into(),
                oldest: 40,
            },
        );
        assert_eq!(
            compacted.metadata().get(COMPACT_REVISION_HEADER).unwrap(),
            "40"
        );
        // The client crate's retry rule reads the header this table stamps on a refusal.
        assert!(raftkv_client::certainly_not_proposed(&refused));
        let unknown = of(2, Error::MaybeApplied("?".into()));
        assert!(!raftkv_client::certainly_not_proposed(&unknown));
    }
}
