//! A running raftkv node: the Raft handle and the operations the API is built from.
//!
//! Writes and strong reads need the leader's authority; this module finds it. A follower forwards a write
//! to the leader (one hop: the leader never forwards again) and asks the leader for a read index before a
//! strong read. While there is no leader, or the one it knew is unreachable, a request waits for the
//! next leader until its deadline, so clients ride through a failover instead of seeing errors.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;
use openraft::error::{
    ClientWriteError, Fatal, ForwardReason, InitializeError, LinearizableReadError, RaftError,
};
use openraft::{Instant as _, LinearizerOption, ServerState};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::api::error::{ApiError, LeaderHint, certainly_not_proposed};
use crate::config::{Limits, ServerArgs};
use crate::forward::Forwarder;
use crate::network::client::NetworkFactory;
use crate::network::identity::{ClusterId, PeerIdentity};
use crate::network::{PeerChannels, Purpose};
use crate::pb::internal::ReadIndexRequest;
use crate::pb::v1::ResponseHeader;
use crate::store::{self, StateMachineStore};
use crate::types::{Command, CommandResponse, Member, NodeId, Raft, TypeConfig, VoteResponse};

/// How long a write waits on a leader that has just taken office for its first quorum acknowledgement
/// (see `Node::taking_office`); normally one round trip. Well under a forwarded write's deadline.
const MAX_OFFICE_WAIT: Duration = Duration::from_millis(100);

/// How long a start waits for the replay of the committed log before serving anyway (with a WARN).
const MAX_REPLAY_WAIT: Duration = Duration::from_secs(60);

type QuorumAcked = openraft::metrics::SerdeInstant<openraft::alias::InstantOf<TypeConfig>>;

/// A write that has been committed by a quorum, made durable and applied.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Applied {
    pub revision: u64,
    pub response: CommandResponse,
}

pub struct Node {
    pub id: NodeId,
    /// The cluster this node belongs to; peer requests from any other are refused.
    pub cluster: ClusterId,
    pub raft: Raft,
    pub sm: StateMachineStore,
    pub channels: PeerChannels,
    pub limits: Limits,
    pub request_timeout: Duration,
    /// `--max-snapshot-bytes`: the most an InstallSnapshot may make this node buffer.
    pub max_snapshot_bytes: usize,
    /// The initial voters' addresses: a node that has not yet received the membership (a fresh or
    /// wiped one) still knows where its peers are.
    pub peers: BTreeMap<NodeId, Member>,
    /// `--dial` overrides: where to reach a peer when it is not at its membership peer address.
    pub routes: Arc<BTreeMap<NodeId, String>>,
    /// Strong reads on a follower waiting for a read index from the leader.
    read_rounds: Arc<ReadIndexRounds>,
    /// Reads waiting for this node to apply a revision.
    apply_waiters: Arc<ApplyWaiters>,
    /// Writes on a follower on their way to the leader, sent in batches.
    forwarder: Forwarder,
    /// How this leader confirms it still leads before a strong read: a quorum acknowledgement younger
    /// than the read lease, or a fresh heartbeat round (see `ServerArgs::read_lease`).
    read_option: LinearizerOption,
    /// Until when this node neither votes nor campaigns after starting: the follower lease it may have
    /// granted the leader before a crash was lost with its memory (see [`Node::vote_held`]).
    vote_hold_until: Instant,
    /// Reads the whole store in the background while the node lives (see `store::integrity`).
    _scrubber: Option<store::integrity::Scrubber>,
}

/// What this node currently knows about leadership, read once from the metrics.
struct View {
    leader: Option<NodeId>,
    /// The leader's client address, for hints to clients.
    leader_addr: Option<String>,
    /// Where this node itself reaches the leader: its peer address unless `--dial` reroutes it.
    leader_dial: Option<String>,
}

impl Node {
    /// Opens storage, starts Raft and, on a fresh data directory, bootstraps the cluster from `--peers`.
    pub async fn start(args: &ServerArgs) -> anyhow::Result<Arc<Node>> {
        let started = Instant::now();
        let read_lease = args.read_lease()?;
        let hold_until = started + Duration::from_millis(args.election_max_ms);
        let mut config = args.raft_config()?;
        // No campaign of its own during the hold either: a node's vote for itself never passes through
        // `vote_held`. Turned on by `end_vote_hold`. A TransferLeader from the current leader still
        // makes it campaign: only that leader's own lease could count on this node, and it is the one
        // giving up (raftkv itself no longer sends one).
        config.enable_elect = false;
        let config = Arc::new(config);
        std::fs::create_dir_all(&args.data_dir)?;
        let (log, sm) = store::open(&args.data_dir, args.id)?;
        let scrubber = store::integrity::Scrubber::start(
            sm.db().clone(),
            sm.integrity().clone(),
            args.scrub_bytes_per_sec,
            Duration::from_secs(args.scrub_interval_secs),
        )?;
        let derived = ClusterId::derive(&args.cluster_token, &args.peers);
        let cluster = ClusterId(store::cluster_id(sm.db(), derived.0)?);
        if cluster != derived {
            // Expected after a membership change; worth a line when it is a different --peers or token.
            tracing::info!(%cluster, from_flags = %derived, "using the cluster id stored at the first start");
        }
        let channels = PeerChannels::new(
            PeerIdentity {
                cluster,
                node: args.id,
            },
            args.peer_tls()?.map(|tls| tls.client),
        );
        let routes = Arc::new(args.dial.clone().unwrap_or_default());
        let network = NetworkFactory {
            id: args.id,
            channels: channels.clone(),
            routes: routes.clone(),
        };
        // Where openraft's replay of the committed log will reach (see `store::state_machine`).
        let replay_to = {
            use openraft::storage::RaftLogStorage;
            log.clone().read_committed().await?
        };
        let raft = Raft::new(args.id, config, network, log, sm.clone()).await?;
        // Not served before the replay: an eventual read would otherwise see this node go back in
        // time after a crash, to its last snapshot, for as long as the replay takes.
        if let Some(to) = replay_to {
            let wait = raft.wait(Some(MAX_REPLAY_WAIT));
            if let Err(e) = wait.applied_index_at_least(Some(to.index), "replay").await {
                tracing::warn!(error = %e, to = to.index, "serving before the committed log is replayed");
            }
        }
        let node = Arc::new(Node {
            id: args.id,
            cluster,
            raft,
            sm,
            channels: channels.clone(),
            limits: args.limits(),
            request_timeout: args.request_timeout(),
            max_snapshot_bytes: args.max_snapshot_bytes,
            peers: args.peers.clone(),
            routes,
            read_rounds: Arc::new(ReadIndexRounds::new(args.max_apply_waiters)),
            apply_waiters: Arc::new(ApplyWaiters::new(args.max_apply_waiters)),
            forwarder: Forwarder::start(args.id, channels.clone()),
            // A round is still started at once when the acknowledgement is too old (or the lease is 0).
            read_option: LinearizerOption::new(Some(read_lease), true),
            vote_hold_until: hold_until,
            _scrubber: scrubber,
        });
        tokio::spawn(end_vote_hold(node.raft.clone(), hold_until));
        node.bootstrap(&args.peers).await?;
        tokio::spawn(catch_up_watchdog(Arc::downgrade(&node)));
        Ok(node)
    }

    /// Exactly one node, the lowest id in `--peers`, initializes a fresh cluster; the others start empty
    /// and receive the first entry by replication. One initializer means one identical first entry
    /// everywhere: if every node initialized, each would write that entry under its own id, and a node
    /// that later lost its disk would hold a conflicting first entry that replication cannot repair.
    /// A node with any Raft state never initializes again, and a wiped non-initializer simply rejoins.
    async fn bootstrap(&self, peers: &BTreeMap<NodeId, Member>) -> anyhow::Result<()> {
        if self.raft.is_initialized().await? {
            tracing::info!("existing Raft state found; not bootstrapping");
            return Ok(());
        }
        if !peers.contains_key(&self.id) {
            anyhow::bail!(
                "node {} is not in --peers; a fresh node must be one of the initial voters",
                self.id
            );
        }
        let initializer = peers.keys().next().copied();
        if initializer != Some(self.id) {
            tracing::info!(
                initializer = ?initializer,
                "fresh data directory; waiting for the cluster to replicate to this node"
            );
            return Ok(());
        }
        match self.raft.initialize(peers.clone()).await {
            Ok(()) => tracing::info!(
                voters = ?peers,
                cluster = %self.cluster,
                "bootstrapped a new cluster"
            ),
            Err(RaftError::APIError(InitializeError::NotAllowed(e))) => {
                tracing::info!(reason = %e, "already initialized")
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    fn view(&self) -> View {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        let leader = m.current_leader;
        let member = leader.and_then(|l| {
            m.membership_config
                .membership()
                .get_node(&l)
                .or_else(|| self.peers.get(&l))
                .cloned()
        });
        let leader_dial = leader
            .and_then(|l| self.routes.get(&l).cloned())
            .or_else(|| member.as_ref().map(|m| m.peer_addr.clone()));
        let leader_addr = member.map(|m| m.addr);
        View {
            leader,
            leader_addr,
            leader_dial,
        }
    }

    pub fn hint(&self) -> LeaderHint {
        let v = self.view();
        LeaderHint {
            id: v.leader,
            addr: v.leader_addr,
        }
    }

    /// The header for a response. Read it *before* reading data, so `revision` never claims more than
    /// the data shows.
    pub fn header(&self, revision: Option<u64>) -> ResponseHeader {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        ResponseHeader {
            node_id: self.id,
            leader_id: m.current_leader.unwrap_or(0),
            term: m.current_term,
            revision: revision.unwrap_or_else(|| m.last_applied.as_ref().map_or(0, |l| l.index)),
        }
    }

    /// The time by which this node answers. With a client deadline, it answers a little before it, so
    /// the client hears raftkv's own status (what happened, who leads) rather than its local timeout.
    pub fn deadline(&self, requested: Option<Duration>) -> Instant {
        let budget = match requested {
            Some(d) => {
                let d = d.min(self.request_timeout * 6);
                d.saturating_sub((d / 10).min(Duration::from_millis(100)))
            }
            None => self.request_timeout,
        };
        Instant::now() + budget
    }

    /// Waits for `cond` on this node's metrics, for at most `cap` and never past `deadline`, then lets
    /// the caller retry. Whether `cond` held does not matter to the caller, only whether time is left.
    async fn wait_metrics(
        &self,
        cap: Duration,
        deadline: Instant,
        what: &str,
        cond: impl Fn(&openraft::RaftMetrics<TypeConfig>) -> bool + Send,
    ) -> bool {
        let now = Instant::now();
        if now < deadline {
            let cap = deadline.saturating_duration_since(now).min(cap);
            let _ = self.raft.wait(Some(cap)).metrics(cond, what).await;
        }
        Instant::now() < deadline
    }

    /// Waits a little for leadership to move away from `not` (None: for any leader), then lets the caller
    /// retry. The wait is capped because a leader whose lease lapsed (e.g. after a pause) refuses work
    /// while still reporting itself leader, and recovers without any change a watcher could see.
    async fn await_leader(
        &self,
        not: Option<NodeId>,
        deadline: Instant,
        why: &str,
    ) -> Result<(), ApiError> {
        let new_leader = |m: &openraft::RaftMetrics<TypeConfig>| {
            m.current_leader.is_some() && m.current_leader != not
        };
        if self
            .wait_metrics(
                Duration::from_millis(200),
                deadline,
                "a new leader",
                new_leader,
            )
            .await
        {
            return Ok(());
        }
        Err(ApiError::unavailable(
            format!("{why}; no usable leader before the deadline"),
            self.hint(),
        ))
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
    ) -> Result<(), ApiError> {
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
        Err(ApiError::unavailable(
            "elected, but no quorum acknowledged this leader before the deadline",
            self.hint(),
        ))
    }

    /// Commits a write through the leader, forwarding from a follower when `forward` is set.
    pub async fn write(
        &self,
        cmd: Command,
        deadline: Instant,
        forward: bool,
    ) -> Result<Applied, ApiError> {
        let mut office_wait: Option<Instant> = None;
        loop {
            let view = self.view();
            match view.leader {
                Some(leader) if leader == self.id => {
                    let acked_before = self.quorum_acked();
                    let result =
                        tokio::time::timeout_at(deadline, self.raft.client_write(cmd.clone()))
                            .await;
                    match result {
                        Err(_) => {
                            return Err(ApiError::DeadlineExceeded(
                                "the write was proposed but not confirmed before the deadline; it may still be applied"
                                    .into(),
                            ));
                        }
                        Ok(Ok(resp)) => {
                            if let CommandResponse::Rejected { reason } = resp.data {
                                return Err(ApiError::InvalidArgument(format!(
                                    "not applied: {reason}"
                                )));
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
                            if !forward {
                                return Err(ApiError::unavailable("not the leader", self.hint()));
                            }
                            let why = if f.reason == ForwardReason::LeaseExpired {
                                "no quorum: no quorum has acknowledged this leader within its lease"
                            } else {
                                "lost leadership"
                            };
                            self.await_leader(Some(self.id), deadline, why).await?;
                        }
                        Ok(Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(f)))) => {
                            return Err(ApiError::Unknown(format!(
                                "leadership changed while the write was in flight; it may or may not be applied ({f})"
                            )));
                        }
                        Ok(Err(RaftError::APIError(e))) => {
                            return Err(ApiError::Internal(e.to_string()));
                        }
                        Ok(Err(RaftError::Fatal(e))) => {
                            return Err(ApiError::unavailable(
                                format!("raft stopped: {e}"),
                                LeaderHint::default(),
                            ));
                        }
                    }
                }
                Some(leader) => {
                    if !forward {
                        return Err(ApiError::unavailable("not the leader", self.hint()));
                    }
                    let Some(addr) = view.leader_dial else {
                        return Err(ApiError::unavailable("leader address unknown", self.hint()));
                    };
                    match self.forwarder.write(leader, &addr, &cmd, deadline).await {
                        Ok(applied) => return Ok(applied),
                        Err(status) if certainly_not_proposed(&status) => {
                            tracing::debug!(leader, %status, "forward failed before proposing; waiting for a leader");
                            let why = format!("leader {leader} unreachable: {}", status.message());
                            self.await_leader(Some(leader), deadline, &why).await?;
                        }
                        Err(status) => return Err(forwarded_failure(status)),
                    }
                }
                None => self.await_leader(None, deadline, "no leader").await?,
            }
        }
    }

    /// The leader's half of a linearizable read: confirm leadership with a quorum and return the index a
    /// reader must have applied. Never forwards.
    ///
    /// Running out of time here is UNAVAILABLE, not DEADLINE_EXCEEDED: this node's deadline ends a
    /// little before the client's (see [`Node::deadline`]), so the client hears why its read was not
    /// served, where its own expired deadline would have told it nothing. A node cannot tell a lost
    /// quorum from a slow one, so the message names both; for a read both mean "safe to retry".
    pub async fn read_index(&self, deadline: Instant) -> Result<u64, ApiError> {
        let result = tokio::time::timeout_at(
            deadline,
            self.raft.get_read_linearizer(self.read_option.clone()),
        )
        .await;
        match result {
            Err(_) => Err(ApiError::unavailable(
                "no quorum: no quorum of voters confirmed this leader before the deadline \
                 (they are down, cut off or slow)",
                self.hint(),
            )),
            Ok(Ok(linearizer)) => Ok(linearizer.read_log_id().index()),
            Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(_)))) => {
                Err(ApiError::unavailable("not the leader", self.hint()))
            }
            Ok(Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(e)))) => Err(
                ApiError::unavailable(format!("no quorum: {e}"), self.hint()),
            ),
            Ok(Err(RaftError::Fatal(e))) => Err(ApiError::unavailable(
                format!("raft stopped: {e}"),
                LeaderHint::default(),
            )),
        }
    }

    /// How long vote requests must still be refused: for election-max-ms after start. Before a
    /// crash this node may have acknowledged the leader, which then serves reads on that
    /// acknowledgement for up to the read lease, counting on this node not to help elect anyone, itself
    /// included, for election-max-ms. openraft keeps that promise in memory only, so a node that
    /// restarts quickly keeps it here. Held whatever this node's own `--read-lease-ms`: the leader's
    /// setting is the one that counts on it.
    pub fn vote_held(&self) -> Option<Duration> {
        let left = self
            .vote_hold_until
            .saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// The answer to a vote or pre-vote during the hold: a refusal that carries this node's vote and
    /// last log id, as openraft's own refusals do. A candidate adopts a higher term and notes a longer
    /// log from a refusal, but learns nothing from an error (and logs it as an unreachable peer), so
    /// answering with an error could leave a lower-term candidate campaigning in vain for the hold.
    pub async fn held_vote_refusal(&self) -> Result<VoteResponse, Fatal<TypeConfig>> {
        self.raft
            .with_raft_state(|st| {
                VoteResponse::new(st.vote_ref(), st.log_ids.last().cloned(), false)
            })
            .await
    }

    /// Makes the next local read linearizable: on return, this node has applied everything committed
    /// before the call began. Works on any node; a deposed or paused leader cannot pass it.
    pub async fn linearize(&self, deadline: Instant) -> Result<(), ApiError> {
        loop {
            let view = self.view();
            let attempt = match view.leader {
                Some(leader) if leader == self.id => self.read_index(deadline).await,
                Some(_) => match view.leader_dial {
                    Some(addr) => self.remote_read_index(&addr, deadline).await,
                    None => Err(ApiError::unavailable("leader address unknown", self.hint())),
                },
                None => {
                    self.await_leader(None, deadline, "no leader").await?;
                    continue;
                }
            };
            match attempt {
                Ok(index) => return self.wait_applied(index, deadline).await,
                // Reads have no side effects, so any failure to reach the leader can be retried.
                Err(ApiError::Unavailable { reason, .. }) => {
                    self.await_leader(view.leader, deadline, &reason).await?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Asks the leader for a read index, sharing the round trip with every other strong read on this
    /// node that is waiting for one when it is sent (see [`ReadIndexRounds`]). Every failure is
    /// UNAVAILABLE, also running out of time: as on the leader (see [`Node::read_index`]), this node
    /// answers before the client's deadline, and what it knows is that no leader confirmed the read.
    async fn remote_read_index(&self, addr: &str, deadline: Instant) -> Result<u64, ApiError> {
        let rx = match self.read_rounds.join(addr, deadline) {
            Joined::Queued(rx) => rx,
            Joined::Started(rx) => {
                tokio::spawn(self.read_rounds.clone().run(self.channels.clone()));
                rx
            }
            Joined::Full(max) => {
                return Err(ApiError::TooLarge(format!(
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
        Err(ApiError::unavailable(reason, self.hint()))
    }

    /// Waits until the local state machine has applied `index` (read-your-writes and strong reads).
    pub async fn wait_applied(&self, index: u64, deadline: Instant) -> Result<(), ApiError> {
        if self.applied_index() >= index {
            return Ok(());
        }
        match self.apply_waiters.wait(&self.raft, index, deadline).await {
            Ok(()) => Ok(()),
            Err(WaitFailed::Full(max)) => Err(ApiError::TooLarge(format!(
                "{max} reads are already waiting for node {} to apply a revision \
                 (--max-apply-waiters); retry later",
                self.id
            ))),
            Err(WaitFailed::Deadline) => Err(ApiError::DeadlineExceeded(format!(
                "node {} had applied {} of the {index} required before the deadline",
                self.id,
                self.applied_index()
            ))),
            Err(WaitFailed::Stopped) => Err(ApiError::unavailable(
                "raft stopped while the read waited",
                LeaderHint::default(),
            )),
        }
    }

    pub fn applied_index(&self) -> u64 {
        self.raft
            .metrics()
            .borrow_watched()
            .last_applied
            .as_ref()
            .map_or(0, |l| l.index)
    }

    pub fn role(&self) -> &'static str {
        match self.raft.metrics().borrow_watched().state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        }
    }
}

/// Lets this node campaign once its vote hold is over (see [`Node::vote_held`]).
async fn end_vote_hold(raft: Raft, until: Instant) {
    tokio::time::sleep_until(until).await;
    raft.runtime_config().elect(true);
}

/// Notices a follower whose log stays behind the commit index it hears from the leader, without moving,
/// for over a second, and asks the leader for a blank entry. A fallback: a node whose disk was wiped
/// looked like this for as long as the leader kept re-sending one append to it, and a heartbeat's log
/// check now settles that (`allow_log_reversion`, config.rs). The log line says it happened.
async fn catch_up_watchdog(node: std::sync::Weak<Node>) {
    let mut behind_since: Option<Instant> = None;
    let mut prev_last_log = 0;
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    loop {
        ticker.tick().await;
        let Some(node) = node.upgrade() else { return };
        let (state, last_log, committed) = {
            let metrics = node.raft.metrics();
            let m = metrics.borrow_watched();
            let committed = m
                .cluster_committed
                .as_ref()
                .or(m.local_committed.as_ref())
                .map_or(0, |l| l.index);
            (m.state, m.last_log_index.unwrap_or(0), committed)
        };
        // Only a log that is behind *and not moving* is stuck; a follower catching up under load is not.
        let advancing = last_log != prev_last_log;
        prev_last_log = last_log;
        if state == ServerState::Leader || last_log >= committed || advancing {
            behind_since = None;
            continue;
        }
        let since = *behind_since.get_or_insert_with(Instant::now);
        if since.elapsed() < Duration::from_secs(1) {
            continue;
        }
        behind_since = None;
        let Some(addr) = node.view().leader_dial else {
            continue;
        };
        let Ok(mut client) = node.channels.client(&addr, Purpose::Client) else {
            continue;
        };
        let mut request = tonic::Request::new(ReadIndexRequest {});
        request.set_timeout(Duration::from_secs(2));
        match client.write_blank(request).await {
            Ok(_) => tracing::info!(
                last_log,
                committed,
                "log behind the leader's commit; asked the leader to resume replication"
            ),
            Err(e) => tracing::debug!(error = %e, "catch-up nudge failed"),
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
        self.state.lock().unwrap_or_else(|p| p.into_inner())
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
            let result = one_read_index(&channels, &addr, deadline).await;
            for (_, tx) in waiters {
                let _ = tx.send(result.clone());
            }
        }
    }
}

async fn one_read_index(
    channels: &PeerChannels,
    addr: &str,
    deadline: Instant,
) -> Result<u64, String> {
    let mut client = channels
        .client(addr, Purpose::Client)
        .map_err(|e| format!("bad leader address {addr}: {e}"))?;
    let mut request = tonic::Request::new(ReadIndexRequest {});
    request.set_timeout(deadline.saturating_duration_since(Instant::now()));
    match client.read_index(request).await {
        Ok(r) => Ok(r.into_inner().index),
        Err(s) => Err(format!("leader at {addr}: {}", s.message())),
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
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many reads wait now.
    pub fn len(&self) -> usize {
        self.lock().waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

/// A forwarded write failed after it may have reached the leader: keep raftkv's own verdict where the
/// leader gave one, otherwise the outcome is unknown.
fn forwarded_failure(status: tonic::Status) -> ApiError {
    match status.code() {
        tonic::Code::InvalidArgument => ApiError::InvalidArgument(status.message().to_string()),
        tonic::Code::ResourceExhausted => ApiError::TooLarge(status.message().to_string()),
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            ApiError::DeadlineExceeded(format!(
                "forwarded write not confirmed before the deadline; it may still be applied: {}",
                status.message()
            ))
        }
        _ => ApiError::Unknown(format!(
            "forwarded write failed after it may have reached the leader; it may be applied: {}",
            status.message()
        )),
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
