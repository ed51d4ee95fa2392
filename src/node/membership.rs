//! Who the members are, and the changes an operator makes to them: add a learner, promote it to
//! voter, remove a member, move the leadership.
//!
//! Every change runs on the leader, one at a time; another node forwards it there (`node::forward`)
//! and waits for a leader as a write does. openraft makes the change itself (a voter change goes
//! through a joint configuration); what this module adds are the rules an operator relies on, checked
//! before anything is proposed:
//!
//! - a voter is added as a learner first and promoted only once it has nearly caught up, as etcd
//!   does, so a new voter never stalls commits while it copies the log;
//! - a removal must leave a quorum of voters the leader hears from, and never removes the last one;
//! - ids are never reused: a removed node's data directory still holds its log and votes, and under a
//!   new owner its id would inherit them;
//! - adding a member that is already there, at the same addresses, is no change, so a joining node
//!   (`node::join`) can ask again after a restart.

use std::collections::BTreeSet;
use std::time::Duration;

use openraft::ChangeMembers;
use openraft::Instant as _;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::forward::ForwardError;
use super::{Error, Node};
use crate::types::{Member, NodeId};

/// How many log entries a learner may be behind the leader's last one and still be promoted.
/// Replication brings a live learner within a few batches of the leader; one far behind is still
/// copying the log or a snapshot.
pub const MAX_PROMOTE_LAG: u64 = 1_000;
/// How often a node looks whether it was removed.
const REMOVAL_POLL: Duration = Duration::from_millis(200);
/// A voter the leader has heard from within this many election timeouts counts as live when a
/// removal is checked: a follower stays that long only when it is down or cut off.
const LIVE_WITHIN_ELECTIONS: u32 = 2;
/// How long a removal that looks like it would lose the quorum waits for the leader to hear from
/// the voters: a leader that took office a moment ago has not heard from every one yet.
const LIVENESS_WAIT: Duration = Duration::from_millis(500);
/// How often a `MemberAdd` that promotes looks again whether the learner has caught up.
const CATCH_UP_POLL: Duration = Duration::from_millis(100);

/// A membership change, as the leader receives it (also forwarded, so serializable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// A learner; with `learner: false`, promoted once it has caught up.
    Add {
        id: NodeId,
        member: Member,
        learner: bool,
    },
    Promote {
        id: NodeId,
    },
    Remove {
        id: NodeId,
    },
    MoveLeader {
        to: NodeId,
    },
}

/// One member as `MemberList` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub id: NodeId,
    pub member: Member,
    pub learner: bool,
    /// The last log index the leader knows the member has; 0 off the leader.
    pub matched_index: u64,
}

impl Node {
    /// Whether this node was removed from the cluster: a peer said so (`identity::Removal`), or it
    /// applied its own removal.
    pub fn removed(&self) -> bool {
        self.removal.is_set() || self.sm.is_retired(self.id)
    }

    /// Refuses every request on a node that was removed: its state stops at its removal, and a
    /// client reading it would see the cluster's past as its present.
    pub fn check_member(&self) -> Result<(), Error> {
        if self.removed() {
            return Err(Error::Refused(format!(
                "node {} was removed from the cluster and no longer serves; stop it and wipe its \
                 data directory (a node rejoins under a new id)",
                self.id
            )));
        }
        Ok(())
    }

    /// The members of the latest membership this node knows, with the leader's replication
    /// progress when this node leads.
    pub fn members(&self) -> Vec<MemberInfo> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let matched = |id: NodeId| -> u64 {
            if id == self.id {
                return m.last_log_index.unwrap_or(0);
            }
            m.replication
                .as_ref()
                .and_then(|r| r.get(&id).cloned().flatten())
                .map_or(0, |l| l.index)
        };
        let leading = m.current_leader == Some(self.id);
        membership
            .nodes()
            .map(|(id, member)| MemberInfo {
                id: *id,
                member: member.clone(),
                learner: !voters.contains(id),
                matched_index: if leading { matched(*id) } else { 0 },
            })
            .collect()
    }

    /// Makes `change` through the leader: here when this node leads, forwarded otherwise, waiting
    /// for a leader while there is none (until `deadline`). Answers with the members after it.
    pub async fn change_membership(
        &self,
        change: Change,
        deadline: Instant,
    ) -> Result<Vec<MemberInfo>, Error> {
        loop {
            let view = self.view();
            let leader = match view.leader {
                Some(leader) if leader == self.id => {
                    match self.change_as_leader(change.clone(), deadline).await {
                        // Leadership moved while the change waited (a MoveLeader that another
                        // node won, an election): nothing was proposed, so it is made at the new
                        // leader instead of failing.
                        Err(e)
                            if e.not_proposed()
                                && !matches!(e, Error::Stopped(_))
                                && Instant::now() < deadline =>
                        {
                            self.await_leader(Some(self.id), deadline, &e.to_string())
                                .await?;
                            continue;
                        }
                        result => return result,
                    }
                }
                Some(leader) => leader,
                None => {
                    self.await_leader(None, deadline, "no leader").await?;
                    continue;
                }
            };
            let Some(addr) = view.leader_dial else {
                return Err(Error::not_leader("leader address unknown", self.hint()));
            };
            let reason =
                match super::forward::change_membership(&self.channels, &addr, &change, deadline)
                    .await
                {
                    Ok(members) => return Ok(members),
                    Err(ForwardError::Leader(e)) if e.not_proposed() => e.to_string(),
                    Err(ForwardError::Leader(e)) => return Err(e),
                    Err(ForwardError::NotSent(why)) => {
                        format!("leader {leader} unreachable: {why}")
                    }
                    Err(ForwardError::Lost {
                        deadline: late,
                        why,
                    }) => {
                        let what = format!(
                            "the leader at {addr} did not answer ({why}); the change may have been \
                         made: MemberList shows"
                        );
                        return Err(if late {
                            Error::Deadline(what)
                        } else {
                            Error::MaybeApplied(what)
                        });
                    }
                };
            self.await_leader(Some(leader), deadline, &reason).await?;
        }
    }

    /// Makes `change` on this node, which must lead (a forwarded change is never forwarded again).
    pub async fn change_as_leader(
        &self,
        change: Change,
        deadline: Instant,
    ) -> Result<Vec<MemberInfo>, Error> {
        // One change at a time from this leader: a second waits for the first instead of racing it
        // to openraft's "in progress" refusal.
        let _one = tokio::time::timeout_at(deadline, self.membership_lock.lock())
            .await
            .map_err(|_| {
                Error::not_leader(
                    "another membership change held this leader until the deadline",
                    self.hint(),
                )
            })?;
        if self.view().leader != Some(self.id) {
            return Err(Error::not_leader("not the leader", self.hint()));
        }
        self.finish_joint(deadline).await?;
        match change {
            Change::Add {
                id,
                member,
                learner,
            } => self.add(id, member, learner, deadline).await?,
            Change::Promote { id } => self.promote(id, deadline).await?,
            Change::Remove { id } => self.remove(id, deadline).await?,
            Change::MoveLeader { to } => self.move_leader(to, deadline).await?,
        }
        Ok(self.members())
    }

    /// A change is two log entries (the joint configuration, then the new one), and a leader that
    /// lost its leadership between them leaves the cluster in the joint one, which openraft does not
    /// leave by itself. The next change (a retry of the same one, most likely) finishes it first,
    /// with the empty change openraft's own second step makes, so it judges the membership the
    /// interrupted change was making rather than a union of the old and the new voters.
    async fn finish_joint(&self, deadline: Instant) -> Result<(), Error> {
        let joint = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow_watched();
            m.membership_config.membership().get_joint_config().len() > 1
        };
        if !joint {
            return Ok(());
        }
        tracing::info!("finishing a membership change an earlier leader left half done");
        self.propose(ChangeMembers::AddVoterIds(BTreeSet::new()), deadline)
            .await
    }

    /// Proposes a voter change and waits for it until `deadline`. openraft makes it in two entries
    /// from inside the call (the joint configuration, then the new one), so the call runs on a task
    /// of its own: a deadline that passes between the two must not drop the second and leave the
    /// cluster in the joint configuration.
    async fn propose(
        &self,
        change: ChangeMembers<NodeId, Member>,
        deadline: Instant,
    ) -> Result<(), Error> {
        let raft = self.raft.clone();
        let task = tokio::spawn(async move { raft.change_membership(change, false).await });
        match tokio::time::timeout_at(deadline, task).await {
            Err(_) => Err(proposed_late()),
            Ok(Err(e)) => Err(Error::Internal(format!("the membership change task: {e}"))),
            Ok(Ok(changed)) => self.check(changed),
        }
    }

    async fn add(
        &self,
        id: NodeId,
        member: Member,
        learner: bool,
        deadline: Instant,
    ) -> Result<(), Error> {
        if id == 0 {
            return Err(Error::Invalid(
                "node id 0 is reserved (it means 'no leader')".into(),
            ));
        }
        for (what, addr) in [
            ("address", &member.addr),
            ("peer address", &member.peer_addr),
        ] {
            if addr.is_empty() || !addr.contains(':') || addr.contains('/') {
                return Err(Error::Invalid(format!(
                    "node {id}'s {what} {addr:?} is not HOST:PORT"
                )));
            }
        }
        let members = self.members();
        if let Some(existing) = members.iter().find(|m| m.id == id) {
            if existing.member != member {
                return Err(Error::Refused(format!(
                    "node {id} is already a member, at {}; remove it first, or add the new node \
                     under another id",
                    existing.member
                )));
            }
            // Already there: nothing to add, perhaps a promotion still to make.
            if learner || !existing.learner {
                return Ok(());
            }
            return self.promote_when_caught_up(id, deadline).await;
        }
        if self.sm.is_retired(id) {
            return Err(Error::Refused(format!(
                "node id {id} was removed from this cluster, and ids are never reused; give the \
                 new node another id"
            )));
        }
        if let Some(other) = members
            .iter()
            .find(|m| m.member.peer_addr == member.peer_addr || m.member.addr == member.addr)
        {
            return Err(Error::Refused(format!(
                "node {} is already at {}; two members cannot share an address",
                other.id, other.member
            )));
        }
        let added = tokio::time::timeout_at(deadline, self.raft.add_learner(id, member, false))
            .await
            .map_err(|_| proposed_late())?;
        self.check(added)?;
        tracing::info!(id, "added a learner");
        if learner {
            return Ok(());
        }
        self.promote_when_caught_up(id, deadline).await
    }

    /// Waits (until `deadline`) for learner `id` to come close enough to promote, then promotes it.
    async fn promote_when_caught_up(&self, id: NodeId, deadline: Instant) -> Result<(), Error> {
        loop {
            match self.promote(id, deadline).await {
                Err(Error::Refused(why)) if self.lag(id).is_some() => {
                    if Instant::now() + CATCH_UP_POLL >= deadline {
                        return Err(Error::Deadline(format!(
                            "node {id} was added as a learner but had not caught up before the \
                             deadline ({why}); promote it with MemberPromote once it has"
                        )));
                    }
                    tokio::time::sleep(CATCH_UP_POLL).await;
                }
                other => return other,
            }
        }
    }

    /// How far learner `id` is behind this leader's last log entry (None when it is no learner).
    fn lag(&self, id: NodeId) -> Option<u64> {
        let members = self.members();
        let me = members.iter().find(|m| m.id == self.id)?.matched_index;
        let learner = members.iter().find(|m| m.id == id && m.learner)?;
        Some(me.saturating_sub(learner.matched_index))
    }

    async fn promote(&self, id: NodeId, deadline: Instant) -> Result<(), Error> {
        let members = self.members();
        let Some(member) = members.iter().find(|m| m.id == id) else {
            return Err(self.unknown(id));
        };
        if !member.learner {
            return Ok(());
        }
        let lag = self.lag(id).unwrap_or(u64::MAX);
        if member.matched_index == 0 || lag > MAX_PROMOTE_LAG {
            return Err(Error::Refused(format!(
                "node {id} is not caught up: it has log index {} of the leader's {} (at most \
                 {MAX_PROMOTE_LAG} behind may be promoted); promote it once it has caught up",
                member.matched_index,
                member.matched_index.saturating_add(lag),
            )));
        }
        self.propose(ChangeMembers::AddVoterIds(BTreeSet::from([id])), deadline)
            .await?;
        tracing::info!(id, "promoted a learner to voter");
        Ok(())
    }

    async fn remove(&self, id: NodeId, deadline: Instant) -> Result<(), Error> {
        if self.sm.is_retired(id) {
            // Already done, perhaps by this very request before a retry.
            return Ok(());
        }
        let members = self.members();
        let Some(member) = members.iter().find(|m| m.id == id) else {
            return Err(self.unknown(id));
        };
        let change = if member.learner {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        } else {
            let voters: Vec<NodeId> = members
                .iter()
                .filter(|m| !m.learner)
                .map(|m| m.id)
                .collect();
            if voters.len() == 1 {
                return Err(Error::Refused(format!(
                    "node {id} is the last voter; a cluster needs at least one"
                )));
            }
            let remaining: Vec<NodeId> = voters.into_iter().filter(|v| *v != id).collect();
            let quorum = remaining.len() / 2 + 1;
            let live = |node: &Node| -> Vec<NodeId> {
                remaining
                    .iter()
                    .copied()
                    .filter(|v| node.heard_from(*v))
                    .collect()
            };
            let wait_until = Instant::now()
                + LIVENESS_WAIT.min(deadline.saturating_duration_since(Instant::now()));
            while live(self).len() < quorum && Instant::now() < wait_until {
                tokio::time::sleep(CATCH_UP_POLL.min(LIVENESS_WAIT / 5)).await;
            }
            let live = live(self);
            if live.len() < quorum {
                return Err(Error::Refused(format!(
                    "removing node {id} would leave voters {remaining:?}, of which only {live:?} \
                     are live: fewer than a quorum of {quorum}; bring voters back or add some first"
                )));
            }
            if id == self.id {
                // The leader leaves last: it hands over, and the new leader makes the change.
                let to = self
                    .best_successor()
                    .ok_or_else(|| Error::Refused("no live voter to hand leadership to".into()))?;
                self.move_leader(to, deadline).await?;
                return Err(Error::not_leader(
                    format!("node {id} handed leadership to node {to} before its removal; retry"),
                    self.hint(),
                ));
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        };
        self.propose(change, deadline).await?;
        tracing::info!(id, "removed a member");
        Ok(())
    }

    /// Hands leadership to voter `to` and waits (until `deadline`) until it leads.
    pub(super) async fn move_leader(&self, to: NodeId, deadline: Instant) -> Result<(), Error> {
        let members = self.members();
        let Some(target) = members.iter().find(|m| m.id == to) else {
            return Err(self.unknown(to));
        };
        if target.learner {
            return Err(Error::Refused(format!(
                "node {to} is a learner; only a voter can lead (promote it first)"
            )));
        }
        if to == self.id {
            return Ok(());
        }
        let started = Instant::now();
        loop {
            let term = self.raft.metrics().borrow_watched().current_term;
            self.raft
                .trigger()
                .transfer_leader(to)
                .await
                .map_err(|e| Error::Stopped(e.to_string()))?;
            // Done when another node leads; tried again when this node won a new election itself
            // (the target's campaign failed and this node's timer fired first).
            let settled = |m: &openraft::RaftMetrics<crate::types::TypeConfig>| {
                m.current_leader.is_some()
                    && (m.current_leader != Some(self.id) || m.current_term > term)
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let waited = self
                .raft
                .wait(Some(left))
                .metrics(settled, "leadership moved")
                .await;
            let now = self.view().leader;
            match waited {
                Ok(_) if now == Some(to) => {
                    tracing::info!(
                        to,
                        took_ms = started.elapsed().as_millis() as u64,
                        "moved the leadership"
                    );
                    return Ok(());
                }
                Ok(_) if now == Some(self.id) => {
                    tracing::info!(to, "the handover did not take; trying again");
                }
                // Another voter's election timer fired first: nothing changed but the leader, so
                // the caller asks the new one to hand over (see `change_membership`).
                Ok(_) => {
                    return Err(Error::not_leader(
                        format!(
                            "node {} took the leadership instead of node {to}",
                            now.unwrap_or(0)
                        ),
                        self.hint(),
                    ));
                }
                Err(_) => {
                    return Err(Error::Deadline(format!(
                        "node {to} did not take the leadership before the deadline"
                    )));
                }
            }
        }
    }

    /// The voter to hand leadership to: live, and the furthest along the log.
    pub(super) fn best_successor(&self) -> Option<NodeId> {
        self.members()
            .into_iter()
            .filter(|m| !m.learner && m.id != self.id && self.heard_from(m.id))
            .max_by_key(|m| (m.matched_index, std::cmp::Reverse(m.id)))
            .map(|m| m.id)
    }

    /// Whether this leader has heard from `id` lately (itself always).
    fn heard_from(&self, id: NodeId) -> bool {
        if id == self.id {
            return true;
        }
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        m.heartbeat
            .as_ref()
            .and_then(|h| h.get(&id).cloned().flatten())
            .is_some_and(|at| {
                at.elapsed()
                    < Duration::from_millis(self.raft.config().election_timeout_max)
                        * LIVE_WITHIN_ELECTIONS
            })
    }

    fn unknown(&self, id: NodeId) -> Error {
        if self.sm.is_retired(id) {
            Error::NotFound(format!("node {id} was removed from the cluster"))
        } else {
            Error::NotFound(format!("node {id} is not a member"))
        }
    }

    /// What openraft's answer to a membership change means for the caller.
    fn check<T>(
        &self,
        result: Result<
            T,
            RaftError<crate::types::TypeConfig, ClientWriteError<crate::types::TypeConfig>>,
        >,
    ) -> Result<(), Error> {
        match result {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                Err(Error::not_leader("not the leader", self.hint()))
            }
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => Err(match e {
                ChangeMembershipError::LearnerNotFound(e) => Error::NotFound(e.to_string()),
                ChangeMembershipError::InProgress(e) => Error::Refused(format!(
                    "another membership change is in progress ({e}); retry once it is committed"
                )),
                e => Error::Refused(e.to_string()),
            }),
            Err(RaftError::APIError(e)) => Err(Error::MaybeApplied(e.to_string())),
            Err(RaftError::Fatal(e)) => Err(Error::Stopped(e.to_string())),
        }
    }
}

fn proposed_late() -> Error {
    Error::Deadline(
        "the membership change was proposed but not committed before the deadline; MemberList \
         shows whether it took effect"
            .into(),
    )
}

/// Keeps a removed node from campaigning: its elections could only fail (the members refuse its
/// votes), but each would still cost it and them a round of refusals. Runs while the node lives.
pub(super) async fn stop_campaigns_once_removed(node: std::sync::Weak<Node>) {
    let mut ticker = tokio::time::interval(REMOVAL_POLL);
    let mut told = false;
    loop {
        ticker.tick().await;
        let Some(node) = node.upgrade() else { return };
        if node.removed() {
            // Every tick: the vote hold's end (see `vote_hold`) turns campaigns back on once.
            node.raft.runtime_config().elect(false);
            if !told {
                told = true;
                tracing::warn!(
                    id = node.id,
                    "this node was removed from the cluster; it no longer serves or campaigns"
                );
            }
        }
    }
}
