//! Linearizable reads, on any node, and waiting for an applied revision.
//!
//! A strong read needs a read index the leader confirmed with a quorum after the read began; then the
//! local replica answers once it has applied that index. On the leader that is openraft's read
//! linearizer; on a follower, a round trip to the leader shared by every strong read waiting at the
//! time ([`ReadIndexRounds`]). Waiting for an applied index is one task for all waiting reads
//! ([`ApplyWaiters`]). Both queues are bounded.

use std::collections::BTreeMap;
use std::sync::Arc;
#[cfg(test)]
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;
use openraft::error::{LinearizableReadError, RaftError};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{Error, Node};
use crate::network::PeerChannels;
use crate::store::Raft;
use crate::sync::lock;

impl Node {
    /// The leader's half of a linearizable read: confirm leadership with a quorum and return the index a
    /// reader must have applied. Never forwards.
    ///
    /// Running out of time here is UNAVAILABLE, not DEADLINE_EXCEEDED: this node's deadline ends a
    /// little before the client's (see [`Node::deadline`]), so the client hears why its read was not
    /// served, where its own expired deadline would have told it nothing. A node cannot tell a lost
    /// quorum from a slow one, so the message names both; for a read both mean "safe to retry".
    pub async fn read_index(&self, deadline: Instant) -> Result<u64, Error> {
        let result = tokio::time::timeout_at(
            deadline,
            self.raft.get_read_linearizer(self.read_option.clone()),
        )
        .await;
        match result {
            Err(_) => Err(Error::not_leader(
                "no quorum: no quorum of voters confirmed this leader before the deadline \
                 (they are down, cut off or slow)",
                self.hint(),
            )),
            Ok(Ok(linearizer)) => Ok(linearizer.read_log_id().index()),
            Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(_)))) => {
                Err(Error::not_leader("not the leader", self.hint()))
            }
            Ok(Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(e)))) => {
                Err(Error::not_leader(format!("no quorum: {e}"), self.hint()))
            }
            Ok(Err(RaftError::Fatal(e))) => Err(Error::Stopped(e.to_string())),
        }
    }

    /// A copy of the applied state for a backup that holds every write acknowledged before the call:
    /// it is taken once this node has applied a read index the leader confirmed, and it may hold a
    /// few writes more (those applied by the time the copy starts). Applies go on meanwhile.
    pub async fn export_state(
        &self,
        deadline: Instant,
    ) -> Result<crate::store::snapshot::Exported, Error> {
        self.linearize(deadline).await?;
        crate::store::snapshot::room_for_export(&self.sm).map_err(Error::Exhausted)?;
        Ok(crate::store::snapshot::export(&self.sm).await?)
    }

    /// Makes the next local read linearizable: on return, this node has applied everything committed
    /// before the call began. Works on any node; a deposed or paused leader cannot pass it.
    pub async fn linearize(&self, deadline: Instant) -> Result<(), Error> {
        self.check_member()?;
        loop {
            let view = self.view();
            let attempt = match view.leader {
                Some(leader) if leader == self.id => self.read_index(deadline).await,
                Some(_) => match view.leader_dial {
                    Some(addr) => self.remote_read_index(&addr, deadline).await,
                    None => Err(Error::not_leader("leader address unknown", self.hint())),
                },
                None => {
                    self.await_leader(None, deadline, "no leader").await?;
                    continue;
                }
            };
            match attempt {
                Ok(index) => return self.wait_applied(index, deadline).await,
                // Reads have no side effects, so any failure to reach the leader can be retried.
                Err(Error::NotLeader { reason, .. }) => {
                    self.await_leader(view.leader, deadline, &reason).await?;
                }
                Err(e @ Error::Stopped(_)) => {
                    self.await_leader(view.leader, deadline, &e.to_string())
                        .await?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Asks the leader for a read index, sharing the round trip with every other strong read on this
    /// node that is waiting for one when it is sent (see [`ReadIndexRounds`]). Every failure is
    /// UNAVAILABLE, also running out of time: as on the leader (see [`Node::read_index`]), this node
    /// answers before the client's deadline, and what it knows is that no leader confirmed the read.
    async fn remote_read_index(&self, addr: &str, deadline: Instant) -> Result<u64, Error> {
        let rx = match self.read_rounds.join(addr, deadline) {
            Joined::Queued(rx) => rx,
            Joined::Started(rx) => {
                tokio::spawn(self.read_rounds.clone().run(self.channels.clone()));
                rx
            }
            Joined::Full(max) => {
                return Err(Error::Exhausted(format!(
                    "{max} strong reads are already waiting for a read index from the leader on \
                     node {} (--max-apply-waiters); retry later",
                    self.id
                )));
            }
        };
        let reason = match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(Ok(index))) => return Ok(index),
            Ok(Ok(Err(m))) => format!("no leader confirmed a read index: {m}"),
            Err(_) => "no leader confirmed a read index before the deadline".to_string(),
            Ok(Err(_)) => "read-index round abandoned".to_string(),
        };
        Err(Error::not_leader(reason, self.hint()))
    }

    /// Waits until the local state machine has applied `index` (read-your-writes and strong reads).
    pub async fn wait_applied(&self, index: u64, deadline: Instant) -> Result<(), Error> {
        if self.applied_index() >= index {
            return Ok(());
        }
        match self.apply_waiters.wait(&self.raft, index, deadline).await {
            Ok(()) => Ok(()),
            Err(WaitFailed::Full(max)) => Err(Error::Exhausted(format!(
                "{max} reads are already waiting for node {} to apply a revision \
                 (--max-apply-waiters); retry later",
                self.id
            ))),
            Err(WaitFailed::Deadline) => Err(Error::Deadline(format!(
                "node {} had applied {} of the {index} required before the deadline",
                self.id,
                self.applied_index()
            ))),
            Err(WaitFailed::Stopped) => Err(Error::Stopped(
                "its metrics closed while the read waited".into(),
            )),
        }
    }
}

/// Coalesces a follower's concurrent strong reads onto one read-index round trip to the leader.
///
/// Why this is still linearizable: a read must use a read index the leader confirmed *after* the read
/// began. A round takes only the reads queued before its request is sent; a read that arrives while a
/// round is in flight waits for the next one. So every read gets an index from a request sent after it
/// arrived, exactly as if it had sent its own, and N concurrent reads cost one RPC per round instead of
/// N (the leader's openraft already answers many queued read-index requests with one heartbeat round).
///
/// The reads queued and in flight together are capped (`--max-apply-waiters`, the cap on the other
/// queue a strong read may wait in): a leader that stops answering without closing its connections
/// (a pause, a partition) would otherwise let every read a client sends pile up until its deadline.
pub struct ReadIndexRounds {
    state: std::sync::Mutex<RoundState>,
    max: usize,
}

/// Where a read's answer comes from, or that there is no room for it.
enum Joined {
    /// Taken by the round task that is running.
    Queued(RoundReceiver),
    /// No round task was running: the caller starts one.
    Started(RoundReceiver),
    /// This many reads already wait.
    Full(usize),
}

/// A read index, or why the round found none.
type RoundReceiver = oneshot::Receiver<Result<u64, String>>;

#[derive(Default)]
struct RoundState {
    /// Reads waiting for the next round, each with its own deadline.
    waiting: Vec<(Instant, oneshot::Sender<Result<u64, String>>)>,
    /// Reads in the round now in flight.
    in_flight: usize,
    /// The leader the most recent read saw. Any leader's confirmed index serves every read queued before
    /// the request: a deposed leader cannot confirm one.
    addr: String,
    /// A round task is running (it exits when no read is waiting).
    running: bool,
}

impl ReadIndexRounds {
    pub fn new(max: usize) -> Self {
        Self {
            state: Default::default(),
            max,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RoundState> {
        lock(&self.state)
    }

    /// Queues a read for the next round to the leader at `addr`.
    fn join(&self, addr: &str, deadline: Instant) -> Joined {
        let mut state = self.lock();
        if state.waiting.len() + state.in_flight >= self.max {
            // Reads that gave up (deadline, cancelled call) make room before anyone is refused.
            state.waiting.retain(|(_, tx)| !tx.is_closed());
            if state.waiting.len() + state.in_flight >= self.max {
                return Joined::Full(self.max);
            }
        }
        let (tx, rx) = oneshot::channel();
        state.waiting.push((deadline, tx));
        state.addr = addr.to_string();
        if std::mem::replace(&mut state.running, true) {
            Joined::Queued(rx)
        } else {
            Joined::Started(rx)
        }
    }

    async fn run(self: Arc<Self>, channels: PeerChannels) {
        loop {
            let (waiters, addr) = {
                let mut state = self.lock();
                state.in_flight = 0;
                if state.waiting.is_empty() {
                    state.running = false;
                    return;
                }
                let waiters = std::mem::take(&mut state.waiting);
                state.in_flight = waiters.len();
                (waiters, state.addr.clone())
            };
            // The latest deadline, so no read is cut short; each read also stops at its own.
            let deadline = waiters
                .iter()
                .map(|(d, _)| *d)
                .max()
                .unwrap_or_else(Instant::now);
            let result = super::forward::read_index(&channels, &addr, deadline).await;
            for (_, tx) in waiters {
                let _ = tx.send(result.clone());
            }
        }
    }
}

/// Reads waiting for this node to apply an index, in index order, woken by one task that watches
/// Raft's metrics while any read waits. Each waiter watching the metrics itself (openraft's `Wait`)
/// clones them and re-arms a timer on every change, several times per write and on every heartbeat,
/// so thousands of parked `min_revision` reads cost cores; here a change costs one comparison, and a
/// read is touched once, when its index is reached. The count is capped, like every queue.
pub struct ApplyWaiters {
    state: std::sync::Mutex<WaitState>,
    max: usize,
}

#[derive(Default)]
struct WaitState {
    /// (index, ticket) so that reads waiting for the same index keep their own entries.
    waiting: BTreeMap<(u64, u64), oneshot::Sender<()>>,
    next_ticket: u64,
    /// The waking task is running (it exits when no read waits).
    running: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum WaitFailed {
    /// The cap on waiting reads, which is this number.
    Full(usize),
    Deadline,
    /// Raft's metrics channel closed: the node is stopping.
    Stopped,
}

/// Removes a read's entry when it stops waiting for any reason (woken, timed out or cancelled).
struct Ticket<'a> {
    waiters: &'a ApplyWaiters,
    key: (u64, u64),
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.waiters.lock().waiting.remove(&self.key);
    }
}

impl ApplyWaiters {
    pub fn new(max: usize) -> Self {
        Self {
            state: Default::default(),
            max,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WaitState> {
        lock(&self.state)
    }

    pub async fn wait(
        self: &Arc<Self>,
        raft: &Raft,
        index: u64,
        deadline: Instant,
    ) -> Result<(), WaitFailed> {
        let applied = |raft: &Raft| {
            raft.metrics()
                .borrow_watched()
                .last_applied
                .as_ref()
                .map_or(0, |l| l.index)
        };
        let (rx, ticket) = {
            let mut state = self.lock();
            if state.waiting.len() >= self.max {
                return Err(WaitFailed::Full(self.max));
            }
            // Checked under the lock: the waking task reads the index before it takes the lock, so
            // an index it saw before this entry existed is seen here instead.
            if applied(raft) >= index {
                return Ok(());
            }
            let key = (index, state.next_ticket);
            state.next_ticket += 1;
            let (tx, rx) = oneshot::channel();
            state.waiting.insert(key, tx);
            if !std::mem::replace(&mut state.running, true) {
                tokio::spawn(self.clone().wake(raft.clone()));
            }
            (rx, Ticket { waiters: self, key })
        };
        let result = match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(WaitFailed::Stopped),
            Err(_) => Err(WaitFailed::Deadline),
        };
        drop(ticket);
        result
    }

    async fn wake(self: Arc<Self>, raft: Raft) {
        let mut metrics = raft.metrics();
        drop(raft);
        loop {
            let applied = metrics
                .borrow_watched()
                .last_applied
                .as_ref()
                .map_or(0, |l| l.index);
            {
                let mut state = self.lock();
                let later = state.waiting.split_off(&(applied + 1, 0));
                for (_, tx) in std::mem::replace(&mut state.waiting, later) {
                    let _ = tx.send(());
                }
                if state.waiting.is_empty() {
                    state.running = false;
                    return;
                }
            }
            if metrics.changed().await.is_err() {
                let mut state = self.lock();
                // Dropping the senders tells every waiting read that Raft is gone.
                state.waiting.clear();
                state.running = false;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads queued and in flight together stay under the cap; a read that gave up frees its place.
    #[test]
    fn the_read_index_queue_is_bounded() {
        let rounds = ReadIndexRounds::new(2);
        let deadline = Instant::now() + Duration::from_secs(1);
        let Joined::Started(first) = rounds.join("a", deadline) else {
            panic!("the first read starts a round");
        };
        // The round takes it, as `run` does: it still counts while in flight.
        {
            let mut state = rounds.lock();
            state.in_flight = std::mem::take(&mut state.waiting).len();
        }
        let Joined::Queued(second) = rounds.join("a", deadline) else {
            panic!("room for a second read");
        };
        assert!(matches!(rounds.join("a", deadline), Joined::Full(2)));
        drop(second);
        assert!(matches!(rounds.join("a", deadline), Joined::Queued(_)));
        drop(first);
    }
}
