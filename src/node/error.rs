//! What can go wrong with a request inside a node, in the terms a caller acts on.
//!
//! The variants say what the caller may do next, not which gRPC code a client will see: that choice is
//! made once, at the API edge (`api::status`). The distinction that matters most is between a request
//! that was certainly not proposed ([`Error::NotLeader`], [`Error::Stopped`]: safe to retry, here or
//! anywhere) and a write whose fate is unknown ([`Error::MaybeApplied`], [`Error::Deadline`]).
//!
//! Serializable because a leader's verdict on a forwarded write travels back to the follower that
//! forwarded it, which answers its client with the leader's own words.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::limits::Invalid;
use crate::types::NodeId;

/// Who this node believes leads, for the hint in a refusal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderHint {
    pub id: Option<NodeId>,
    /// The leader's client address.
    pub addr: Option<String>,
}

impl fmt::Display for LeaderHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.id, &self.addr) {
            (Some(id), Some(addr)) => write!(f, "leader hint: node {id} at {addr}"),
            (Some(id), None) => write!(f, "leader hint: node {id}"),
            _ => write!(f, "no leader known"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Error {
    /// Not proposed: no usable leader here (not the leader, no quorum, leader unreachable). Safe to
    /// retry, best at the hinted leader.
    #[error("{reason}; {hint}")]
    NotLeader { reason: String, hint: LeaderHint },
    /// Raft has stopped on this node; nothing was proposed. Another node may serve.
    #[error("raft stopped: {0}")]
    Stopped(String),
    /// A write that was proposed but whose outcome this node cannot know: it may have been applied.
    #[error("{0}")]
    MaybeApplied(String),
    /// The deadline passed first. For a write, it may still be applied.
    #[error("{0}")]
    Deadline(String),
    /// The request breaks a rule; retrying it unchanged fails the same way.
    #[error("{0}")]
    Invalid(String),
    /// A bound was reached (a queue is full, a response would be too large); retry later or ask for
    /// less.
    #[error("{0}")]
    Exhausted(String),
    /// Local storage failed.
    #[error("storage: {0}")]
    Storage(String),
    /// A bug or an answer this node did not expect.
    #[error("{0}")]
    Internal(String),
    /// Refused as the cluster stands: a membership change that breaks a rule (one at a time, a
    /// quorum must remain, ids are never reused), a learner not yet caught up, or a node that was
    /// removed from the cluster. Retrying helps only once the state changes. Last, with `NotFound`,
    /// so the variants before keep their encoding between versions.
    #[error("{0}")]
    Refused(String),
    /// The request names a member the cluster does not have.
    #[error("{0}")]
    NotFound(String),
    /// A watch asked for, or fell behind to, a revision this node's history no longer holds; it can
    /// start again at `oldest`, after reading the current state.
    #[error("{reason}")]
    Compacted { reason: String, oldest: u64 },
}

impl Error {
    pub fn not_leader(reason: impl Into<String>, hint: LeaderHint) -> Self {
        Error::NotLeader {
            reason: reason.into(),
            hint,
        }
    }

    /// Whether the request certainly was not proposed, so that retrying it cannot apply it twice.
    pub fn not_proposed(&self) -> bool {
        matches!(self, Error::NotLeader { .. } | Error::Stopped(_))
    }
}

impl From<Invalid> for Error {
    fn from(e: Invalid) -> Self {
        Error::Invalid(e.0)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Storage(e.to_string())
    }
}
