//! The vote hold: for election-max-ms after it starts, a node neither votes nor campaigns.
//!
//! Before a crash this node may have acknowledged the leader, which then serves reads on that
//! acknowledgement for up to the read lease, counting on this node not to help elect anyone, itself
//! included, for election-max-ms. openraft keeps that promise in memory only, so a node that restarts
//! quickly keeps it here. Held whatever this node's own `--read-lease-ms`: the leader's setting is the one
//! that counts on it.
//!
//! The peer service asks [`VoteHold::left`] before it lets a vote reach openraft, and answers with
//! [`held_vote_refusal`] meanwhile; the node's own campaigns stay off until [`VoteHold::end`].

use std::time::Duration;

use openraft::error::Fatal;
use tokio::time::Instant;

use crate::store::Raft;
use crate::types::{TypeConfig, VoteResponse};

#[derive(Debug, Clone, Copy)]
pub struct VoteHold {
    until: Instant,
}

impl VoteHold {
    /// A hold that lasts `length` from now (the start of the node).
    pub fn from_now(length: Duration) -> Self {
        VoteHold {
            until: Instant::now() + length,
        }
    }

    /// How long vote requests must still be refused; None once the hold is over.
    pub fn left(&self) -> Option<Duration> {
        let left = self.until.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Lets this node campaign once the hold is over. Until then `enable_elect` is off (see
    /// `Node::start`): a node's vote for itself never passes through the peer service.
    pub async fn end(self, raft: Raft) {
        tokio::time::sleep_until(self.until).await;
        raft.runtime_config().elect(true);
    }
}

/// The answer to a vote or pre-vote during the hold: a refusal that carries this node's vote and last
/// log id, as openraft's own refusals do. A candidate adopts a higher term and notes a longer log from a
/// refusal, but learns nothing from an error (and logs it as an unreachable peer), so answering with an
/// error could leave a lower-term candidate campaigning in vain for the hold.
pub async fn held_vote_refusal(raft: &Raft) -> Result<VoteResponse, Fatal<TypeConfig>> {
    raft.with_raft_state(|st| VoteResponse::new(st.vote_ref(), st.log_ids.last().cloned(), false))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_hold_lasts_its_length_and_then_ends() {
        let hold = VoteHold::from_now(Duration::from_millis(100));
        assert!(hold.left().is_some_and(|l| l <= Duration::from_millis(100)));
        tokio::time::sleep_until(hold.until).await;
        assert_eq!(hold.left(), None);
        assert_eq!(VoteHold::from_now(Duration::ZERO).left(), None);
    }
}
