//! Where a write goes: proposed here when this node leads, forwarded when another node does, held
//! while there is no leader. A write fails only with a verdict (refused, applied or not) or with an
//! honest "unknown", never by being proposed twice: it is retried only when it certainly was not
//! proposed (see `Error::not_proposed`).

use std::time::Duration;

use openraft::Instant as _;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::error::{ClientWriteError, ForwardReason, RaftError};
use tokio::time::Instant;

use super::forward::ForwardError;
use super::{Error, Node};
use crate::telemetry::names;
use crate::types::{Applied, Command, CommandResponse, LeaseResponse, TypeConfig};

/// How long a write waits on a leader that has just taken office for its first quorum acknowledgement
/// (see `Node::taking_office`); normally one round trip. Well under a forwarded write's deadline.
const MAX_OFFICE_WAIT: Duration = Duration::from_millis(100);

type QuorumAcked = openraft::metrics::SerdeInstant<openraft::alias::InstantOf<TypeConfig>>;

/// Whether a write that reaches a follower goes on to the leader.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hop {
    /// A client's write: forwarded to the leader if this node does not lead.
    Forward,
    /// A write another node forwarded: proposed here or refused, never forwarded again, so a write
    /// takes one hop at most and two nodes that disagree about the leader cannot bounce it between them.
    LeaderOnly,
}

impl Node {
    /// Commits a client's write: proposed here when this node leads, forwarded to the leader otherwise.
    pub async fn write(&self, cmd: Command, deadline: Instant) -> Result<Applied, Error> {
        self.route(cmd, deadline, Hop::Forward).await
    }

    /// Commits a write another node forwarded, only if this node leads (see [`Hop::LeaderOnly`]).
    pub async fn propose_as_leader(
        &self,
        cmd: Command,
        deadline: Instant,
    ) -> Result<Applied, Error> {
        self.route(cmd, deadline, Hop::LeaderOnly).await
    }

    async fn route(&self, cmd: Command, deadline: Instant, hop: Hop) -> Result<Applied, Error> {
        let mut office_wait: Option<Instant> = None;
        loop {
            let view = self.view();
            match view.leader {
                Some(leader) if leader == self.id => {
                    let acked_before = self.quorum_acked();
                    let pending = Pending::start();
                    let result =
                        tokio::time::timeout_at(deadline, self.raft.client_write(cmd.clone()))
                            .await;
                    drop(pending);
                    // Refused before it was appended (not the leader) is no failed proposal.
                    let failed = !matches!(
                        result,
                        Ok(Ok(_))
                            | Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(
                                _
                            ))))
                    );
                    if failed {
                        metrics::counter!(names::PROPOSALS_FAILED).increment(1);
                    }
                    match result {
                        Err(_) => {
                            return Err(Error::Deadline(
                                "the write was proposed but not confirmed before the deadline; it may still be applied"
                                    .into(),
                            ));
                        }
                        Ok(Ok(resp)) => {
                            match &resp.data {
                                CommandResponse::Rejected { reason } => {
                                    return Err(Error::Invalid(format!("not applied: {reason}")));
                                }
                                CommandResponse::Lease(LeaseResponse::NotFound { id }) => {
                                    return Err(Error::NotFound(format!(
                                        "lease {id} not found (never granted, revoked or expired); nothing was written"
                                    )));
                                }
                                CommandResponse::Lease(LeaseResponse::Exists { id }) => {
                                    return Err(Error::Refused(format!(
                                        "lease {id} already exists; grant another id, or 0 for one the server picks"
                                    )));
                                }
                                _ => {}
                            }
                            return Ok(Applied {
                                revision: resp.log_id.index,
                                response: resp.data,
                            });
                        }
                        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                            // Rejected before it was appended: safe to retry, here or elsewhere.
                            // Bounded, so a forwarded write held by a new leader that is cut off
                            // before its first acknowledgement still goes back in time to be sent
                            // to whichever node leads instead.
                            if f.reason == ForwardReason::LeaseExpired
                                && self.taking_office(acked_before.as_ref())
                                && office_wait.get_or_insert_with(Instant::now).elapsed()
                                    < MAX_OFFICE_WAIT
                            {
                                self.await_quorum_ack(acked_before, deadline).await?;
                                continue;
                            }
                            if hop == Hop::LeaderOnly {
                                return Err(Error::not_leader("not the leader", self.hint()));
                            }
                            let why = if f.reason == ForwardReason::LeaseExpired {
                                "no quorum: no quorum has acknowledged this leader within its lease"
                            } else {
                                "lost leadership"
                            };
                            self.await_leader(Some(self.id), deadline, why).await?;
                        }
                        Ok(Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(f)))) => {
                            return Err(Error::MaybeApplied(format!(
                                "leadership changed while the write was in flight; it may or may not be applied ({f})"
                            )));
                        }
                        Ok(Err(RaftError::APIError(e))) => {
                            return Err(Error::Internal(e.to_string()));
                        }
                        Ok(Err(RaftError::Fatal(e))) => return Err(Error::Stopped(e.to_string())),
                    }
                }
                Some(leader) => {
                    if hop == Hop::LeaderOnly {
                        return Err(Error::not_leader("not the leader", self.hint()));
                    }
                    let Some(addr) = view.leader_dial else {
                        return Err(Error::not_leader("leader address unknown", self.hint()));
                    };
                    match self.forwarder.write(leader, &addr, &cmd, deadline).await {
                        Ok(applied) => return Ok(applied),
                        Err(e) => {
                            let why = match forwarded_failure(leader, e) {
                                Retry::After(why) => why,
                                Retry::No(e) => return Err(e),
                            };
                            tracing::debug!(leader, %why, "forward not proposed; waiting for a leader");
                            self.await_leader(Some(leader), deadline, &why).await?;
                        }
                    }
                }
                None => self.await_leader(None, deadline, "no leader").await?,
            }
        }
    }

    /// This leader's latest quorum acknowledgement, as its metrics show it.
    fn quorum_acked(&self) -> Option<QuorumAcked> {
        self.raft.metrics().borrow_watched().last_quorum_acked
    }

    /// Whether a write refused with `LeaseExpired` (no quorum has acknowledged this leader within the
    /// leader lease) is worth retrying here. It is while this node took office a moment ago: no
    /// acknowledgement before the write, or one that arrived since. A leader cut off from the others
    /// has only an old one, and gets the ordinary refusal path. Treated like any other refusal, a
    /// write at a new leader went looking for another leader and cost the first write after every
    /// failover 200 ms (the cap of `await_leader`).
    fn taking_office(&self, acked_before: Option<&QuorumAcked>) -> bool {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        let lease = Duration::from_millis(self.raft.config().election_timeout_max);
        m.current_leader == Some(self.id)
            && (acked_before.is_none() || m.last_quorum_acked.as_ref() != acked_before)
            && m.last_quorum_acked
                .as_ref()
                .is_none_or(|t| t.elapsed() < lease)
    }

    /// Waits (up to 20 ms) for a quorum acknowledgement newer than `acked_before`, or a leader change.
    async fn await_quorum_ack(
        &self,
        acked_before: Option<QuorumAcked>,
        deadline: Instant,
    ) -> Result<(), Error> {
        let id = self.id;
        let acked_or_moved = move |m: &openraft::RaftMetrics<TypeConfig>| {
            m.last_quorum_acked != acked_before || m.current_leader != Some(id)
        };
        let what = "a quorum acknowledgement";
        if self
            .wait_metrics(Duration::from_millis(20), deadline, what, acked_or_moved)
            .await
        {
            return Ok(());
        }
        Err(Error::not_leader(
            "elected, but no quorum acknowledged this leader before the deadline",
            self.hint(),
        ))
    }
}

/// What a failed forward leaves the write to do.
#[derive(Debug, PartialEq, Eq)]
enum Retry {
    /// It certainly was not proposed: wait for a (new) leader and try again; the reason says why.
    After(String),
    /// The final answer.
    No(Error),
}

/// Keeps the leader's own verdict where it gave one; a transport failure is retried only when the
/// batch certainly never left this node, and is otherwise a write of unknown fate.
fn forwarded_failure(leader: u64, e: ForwardError) -> Retry {
    match e {
        ForwardError::Leader(e) if e.not_proposed() => {
            Retry::After(format!("leader {leader} did not propose it: {e}"))
        }
        ForwardError::Leader(e) => Retry::No(e),
        ForwardError::NotSent(why) => Retry::After(format!("leader {leader} unreachable: {why}")),
        ForwardError::Lost {
            deadline: true,
            why,
        } => Retry::No(Error::Deadline(format!(
            "forwarded write not confirmed before the deadline; it may still be applied: {why}"
        ))),
        ForwardError::Lost {
            deadline: false,
            why,
        } => Retry::No(Error::MaybeApplied(format!(
            "forwarded write failed after it may have reached the leader; it may be applied: {why}"
        ))),
    }
}

/// A write this leader has proposed and not yet heard the outcome of, counted in
/// `raftkv_server_proposals_pending` for as long as it lives (also when its caller gives up).
struct Pending;

impl Pending {
    fn start() -> Pending {
        metrics::gauge!(names::PROPOSALS_PENDING).increment(1.0);
        Pending
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        metrics::gauge!(names::PROPOSALS_PENDING).decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::LeaderHint;

    #[test]
    fn a_leaders_refusal_or_an_unsent_batch_is_retried() {
        let refused =
            ForwardError::Leader(Error::not_leader("not the leader", LeaderHint::default()));
        assert!(matches!(forwarded_failure(2, refused), Retry::After(_)));
        let stopped = ForwardError::Leader(Error::Stopped("storage".into()));
        assert!(matches!(forwarded_failure(2, stopped), Retry::After(_)));
        let unsent = ForwardError::NotSent("connection refused".into());
        assert!(
            matches!(forwarded_failure(2, unsent), Retry::After(why) if why.contains("leader 2"))
        );
    }

    #[test]
    fn a_write_that_may_have_reached_the_leader_is_never_retried() {
        for verdict in [
            Error::Invalid("too big".into()),
            Error::Exhausted("queue full".into()),
            Error::Deadline("late".into()),
            Error::MaybeApplied("leader changed".into()),
        ] {
            let got = forwarded_failure(2, ForwardError::Leader(verdict.clone()));
            assert_eq!(got, Retry::No(verdict), "the leader's verdict is kept");
        }
        let lost = ForwardError::Lost {
            deadline: false,
            why: "connection reset".into(),
        };
        assert!(matches!(
            forwarded_failure(2, lost),
            Retry::No(Error::MaybeApplied(_))
        ));
        let late = ForwardError::Lost {
            deadline: true,
            why: "timeout".into(),
        };
        assert!(matches!(
            forwarded_failure(2, late),
            Retry::No(Error::Deadline(_))
        ));
    }
}
