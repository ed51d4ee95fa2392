//! A running raftkv node: the Raft handle and the operations the API is built from.
//!
//! Writes and strong reads need the leader's authority; this module finds it. A follower forwards a write
//! to the leader (one hop: the leader never forwards again) and asks the leader for a read index before a
//! strong read. While there is no leader, or the one it knew is unreachable, a request waits for the
//! next leader until its deadline, so clients ride through a failover instead of seeing errors.
//!
//! - [`write`]: where a write goes (propose here, forward, or wait for a leader) and what its failure
//!   means;
//! - [`forward`]: the follower's batches of forwarded writes and read-index requests, and the leader's
//!   answers to them;
//! - [`read`]: linearizable reads (read index, here or at the leader) and waiting for an applied revision;
//! - [`vote_hold`]: refusing votes for a while after a start;
//! - [`membership`]: the members, and adding, promoting and removing them, moving the leadership;
//! - [`join`]: how a node started with `--join` becomes a member;
//! - [`lease`]: the leader's clock for leases: keep-alives, expiries, checkpoints;
//! - [`drain`]: a graceful stop: no new requests, a leader's handover, the last answers;
//! - [`error`]: what a caller may do after a failure.

mod drain;
pub mod error;
pub mod forward;
mod gauges;
pub mod join;
pub mod lease;
mod log_growth;
pub mod membership;
mod read;
pub mod vote_hold;
mod write;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;
use openraft::error::{InitializeError, RaftError};
use openraft::{LinearizerOption, ServerState};
use tokio::time::Instant;

use crate::config::ServerArgs;
use crate::limits::Limits;
use crate::network::PeerChannels;
use crate::network::client::NetworkFactory;
use crate::network::identity::{ClusterId, PeerIdentity, Removal};
use crate::network::vouch::Vouches;
use crate::store::{self, Integrity, Raft, StateMachineStore};
use crate::types::{KeyValue, Member, NodeId, TypeConfig};
pub use drain::InFlight;
pub use error::{Error, LeaderHint};
use forward::Forwarder;
use read::{ApplyWaiters, ReadIndexRounds};
pub use vote_hold::VoteHold;

/// How long a start waits for the replay of the committed log before serving anyway (with a WARN).
const MAX_REPLAY_WAIT: Duration = Duration::from_secs(60);

pub struct Node {
    id: NodeId,
    /// The cluster this node belongs to; peer requests from any other are refused.
    cluster: ClusterId,
    raft: Raft,
    sm: StateMachineStore,
    channels: PeerChannels,
    limits: Limits,
    request_timeout: Duration,
    /// `--max-snapshot-bytes`: the most an InstallSnapshot may make this node write.
    max_snapshot_bytes: usize,
    /// The initial voters' addresses (for a node started with `--join`, the members it found): a
    /// node that has not yet received the membership (a fresh or wiped one) still knows where its
    /// peers are.
    peers: BTreeMap<NodeId, Member>,
    /// Started with `--join`: joins a running cluster instead of bootstrapping one.
    joining: bool,
    /// Set once a peer says this node was removed (see `membership::Node::removed`).
    removal: Arc<Removal>,
    /// Serializes membership changes on this leader (see `membership`).
    membership_lock: tokio::sync::Mutex<()>,
    /// The requests being served, and whether new ones are taken (see `drain`).
    requests: Arc<drain::Requests>,
    /// Strong reads on a follower waiting for a read index from the leader.
    read_rounds: Arc<ReadIndexRounds>,
    /// Reads waiting for this node to apply a revision.
    apply_waiters: Arc<ApplyWaiters>,
    /// Writes on a follower on their way to the leader, sent in batches.
    forwarder: Forwarder,
    /// Senders this node's membership does not name yet, vouched for by members it knows.
    vouches: Vouches,
    /// How this leader confirms it still leads before a strong read: a quorum acknowledgement younger
    /// than the read lease, or a fresh heartbeat round (see `ServerArgs::read_lease`).
    read_option: LinearizerOption,
    vote_hold: VoteHold,
    /// One permit per watch stream served (`--max-watches`).
    watch_slots: Arc<tokio::sync::Semaphore>,
    max_watches: usize,
    /// Lease deadlines, kept while this node leads (see `lease`).
    lease_clock: lease::LeaseClock,
    /// Reads the whole store in the background while the node lives (see `store::integrity`).
    _scrubber: Option<store::integrity::Scrubber>,
    /// Background work that lives as long as the node: snapshots by log size (`log_growth`), a
    /// removed node's end of campaigns (`membership`). A JoinSet, so its tasks stop with the node.
    background: std::sync::Mutex<tokio::task::JoinSet<()>>,
}

/// What a response header reports: who answered, who it thinks leads, and the revision the answer
/// reflects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub node_id: NodeId,
    pub leader_id: NodeId,
    pub term: u64,
    pub revision: u64,
}

/// What an operator sees of one node (`Cluster/Status`).
#[derive(Debug, Clone)]
pub struct Status {
    pub header: Header,
    pub role: &'static str,
    pub leader_addr: Option<String>,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_log_index: u64,
    pub snapshot_index: u64,
    pub first_log_index: u64,
    pub voters: Vec<(NodeId, Member)>,
    pub learners: Vec<(NodeId, Member)>,
    pub cluster: ClusterId,
}

/// What this node currently knows about leadership, read once from the metrics.
struct View {
    leader: Option<NodeId>,
    /// The leader's client address, for hints to clients.
    leader_addr: Option<String>,
    /// Where this node itself reaches the leader (see `PeerChannels::route`).
    leader_dial: Option<String>,
}

impl Node {
    /// Opens storage, starts Raft and, on a fresh data directory, bootstraps the cluster from `--peers`.
    pub async fn start(args: &ServerArgs) -> anyhow::Result<Arc<Node>> {
        let read_lease = args.read_lease()?;
        let vote_hold = VoteHold::from_now(Duration::from_millis(args.election_max_ms));
        let mut config = args.raft_config()?;
        // No campaign of its own during the hold either: a node's vote for itself never passes through
        // the vote hold. Turned on by `VoteHold::end`. A TransferLeader from the current leader still
        // makes it campaign: only that leader's own lease could count on this node, and it is the one
        // giving up (raftkv itself no longer sends one).
        config.enable_elect = false;
        let config = Arc::new(config);
        std::fs::create_dir_all(&args.data_dir)?;
        let durability = if args.unsafe_ack_before_fsync {
            tracing::warn!(
                "--unsafe-ack-before-fsync: log appends are acknowledged before they are durable; \
                 a power cut will lose acknowledged writes"
            );
            store::Durability::UnsafeAckBeforeFsync
        } else {
            store::Durability::Fsync
        };
        let (log, sm) = store::open_with(&args.data_dir, args.id, durability)?;
        sm.history().set_limits(store::history::HistoryLimits {
            max_revisions: args.watch_history_revisions,
            max_bytes: args.watch_history_bytes,
        });
        let scrubber = store::integrity::Scrubber::start(
            sm.db().clone(),
            sm.integrity().clone(),
            args.scrub_bytes_per_sec,
            Duration::from_secs(args.scrub_interval_secs),
        )?;
        let joining = !args.join.is_empty();
        let mut peers = args.peers().clone();
        let derived = match store::stored_cluster_id(sm.db())? {
            Some(stored) => ClusterId(stored),
            None if joining => {
                let (cluster, members) = join::discover(args).await?;
                tracing::info!(%cluster, ?members, "joining a running cluster");
                peers = members;
                cluster
            }
            None => ClusterId::derive(&args.cluster_token, args.peers()),
        };
        let cluster = ClusterId(store::cluster_id(sm.db(), &args.data_dir, derived.0)?);
        if cluster != derived && !joining {
            // Expected after a membership change; worth a line when it is a different --peers or token.
            tracing::info!(%cluster, from_flags = %derived, "using the cluster id stored at the first start");
        }
        let channels = PeerChannels::new(
            PeerIdentity {
                cluster,
                node: args.id,
            },
            args.peer_tls()?.map(|tls| tls.client),
            args.dial.clone().unwrap_or_default(),
        );
        let removal = Arc::new(Removal::default());
        let network = NetworkFactory {
            id: args.id,
            channels: channels.clone(),
            removal: removal.clone(),
        };
        // Where openraft's replay of the committed log will reach (see `store::state_machine`).
        let replay_to = {
            use openraft::storage::RaftLogStorage;
            log.clone().read_committed().await?
        };
        let log_for_growth = log.clone();
        let raft = Raft::new(args.id, config, network, log, sm.clone()).await?;
        let mut background = tokio::task::JoinSet::new();
        if args.snapshot_log_bytes > 0 {
            background.spawn(log_growth::snapshot_by_log_bytes(
                raft.clone(),
                log_for_growth,
                args.snapshot_log_bytes,
            ));
        }
        // Not served before the replay: an eventual read would otherwise see this node go back in
        // time after a crash, to its last snapshot, for as long as the replay takes.
        if let Some(to) = replay_to {
            let wait = raft.wait(Some(MAX_REPLAY_WAIT));
            if let Err(e) = wait.applied_index_at_least(Some(to.index), "replay").await {
                tracing::warn!(error = %e, to = to.index, "serving before the committed log is replayed");
            }
        }
        let vouches = Vouches::start(raft.clone(), channels.clone(), args.id);
        let node = Arc::new(Node {
            id: args.id,
            cluster,
            raft,
            sm,
            channels: channels.clone(),
            limits: args.limits(),
            request_timeout: args.request_timeout(),
            max_snapshot_bytes: args.max_snapshot_bytes,
            peers,
            joining,
            removal,
            membership_lock: tokio::sync::Mutex::new(()),
            requests: Arc::default(),
            read_rounds: Arc::new(ReadIndexRounds::new(args.max_apply_waiters)),
            apply_waiters: Arc::new(ApplyWaiters::new(args.max_apply_waiters)),
            forwarder: Forwarder::start(channels.clone()),
            vouches,
            // A round is still started at once when the acknowledgement is too old (or the lease is 0).
            read_option: LinearizerOption::new(Some(read_lease), true),
            vote_hold,
            watch_slots: Arc::new(tokio::sync::Semaphore::new(
                usize::try_from(args.max_watches).unwrap_or(usize::MAX),
            )),
            max_watches: usize::try_from(args.max_watches).unwrap_or(usize::MAX),
            lease_clock: lease::LeaseClock::new(args.lease_settings()?),
            _scrubber: scrubber,
            background: std::sync::Mutex::new(background),
        });
        crate::sync::lock(&node.background).spawn(lease::run(Arc::downgrade(&node)));
        tokio::spawn(vote_hold.end(node.raft.clone()));
        crate::sync::lock(&node.background).spawn(gauges::publish(Arc::downgrade(&node)));
        crate::sync::lock(&node.background).spawn(membership::stop_campaigns_once_removed(
            Arc::downgrade(&node),
        ));
        if joining {
            tracing::info!("joining: this node is added by the cluster, not bootstrapped");
        } else {
            node.bootstrap(args.peers()).await?;
        }
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
            // Added by an operator (`raftkv member add`) rather than through --join.
            tracing::info!(
                "not one of the initial voters in --peers; waiting for the cluster to add this node \
                 (raftkv member add, or start it with --join)"
            );
            return Ok(());
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
        let leader_dial = leader.and_then(|l| {
            member
                .as_ref()
                .map(|m| self.channels.route(l, &m.peer_addr).to_string())
        });
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
    pub fn header(&self, revision: Option<u64>) -> Header {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        Header {
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
    ) -> Result<(), Error> {
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
        Err(Error::not_leader(
            format!("{why}; no usable leader before the deadline"),
            self.hint(),
        ))
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

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn cluster(&self) -> ClusterId {
        self.cluster
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Reports storage corruption found by reads, applies or the scrubber (see `store::integrity`).
    pub fn integrity(&self) -> &Arc<Integrity> {
        self.sm.integrity()
    }

    /// The local replica's current value of `key`, without any freshness guarantee of its own: the
    /// caller brings the node up to date first (`linearize`, `wait_applied`).
    pub fn local_get(&self, key: &[u8]) -> Result<Option<KeyValue>, Error> {
        Ok(self.sm.get(key)?)
    }

    /// Watch streams being served now.
    pub fn watches_served(&self) -> usize {
        self.max_watches
            .saturating_sub(self.watch_slots.available_permits())
    }

    /// The lease settings this node enforces at the edge.
    pub fn lease_settings(&self) -> &lease::LeaseSettings {
        self.lease_clock.settings()
    }

    /// The leases this replica has applied.
    pub fn leases(&self) -> Arc<store::leases::Table> {
        self.sm.leases().read()
    }

    /// The changes this replica applied, for watches. Like an eventual read, they need no leader.
    pub fn history(&self) -> &store::history::History {
        self.sm.history()
    }

    /// A permit to serve one watch stream: the caller holds it for as long as the stream lives.
    pub fn admit_watch(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Error> {
        drop(self.admit_request()?);
        let permit = self.watch_slots.clone().try_acquire_owned().map_err(|_| {
            Error::Exhausted(format!(
                "node {} already serves as many watches as it may (--max-watches); \
                 watch through another node, or close some",
                self.id
            ))
        })?;
        Ok(permit)
    }

    /// The local replica's pairs in `[start, end)` (`end` empty: to the last key), at most `limit` of
    /// them and no more than a response may carry (`--max-response-bytes`), and whether more follow.
    /// Like [`Node::local_get`], as fresh as the caller made the node.
    pub fn local_scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<(Vec<KeyValue>, bool), Error> {
        let max_bytes = self
            .limits
            .max_response_bytes
            .saturating_sub(crate::limits::RESPONSE_OVERHEAD_BYTES);
        Ok(self.sm.scan(
            start,
            end,
            limit,
            max_bytes,
            crate::limits::PAIR_OVERHEAD_BYTES,
        )?)
    }

    pub fn status(&self) -> Status {
        let header = self.header(None);
        let role = self.role();
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        let membership = m.membership_config.membership();
        let voters = membership
            .voter_ids()
            .map(|id| (id, membership.get_node(&id).cloned().unwrap_or_default()))
            .collect();
        let learners = membership
            .learner_ids()
            .map(|id| (id, membership.get_node(&id).cloned().unwrap_or_default()))
            .collect();
        let leader_addr = m
            .current_leader
            .and_then(|l| membership.get_node(&l))
            .map(|n| n.addr.clone());
        Status {
            header,
            role,
            leader_addr,
            commit_index: m
                .cluster_committed
                .as_ref()
                .or(m.local_committed.as_ref())
                .map_or(0, |l| l.index),
            applied_index: m.last_applied.as_ref().map_or(0, |l| l.index),
            last_log_index: m.last_log_index.unwrap_or(0),
            snapshot_index: m.snapshot.as_ref().map_or(0, |l| l.index),
            first_log_index: m.purged.as_ref().map_or(0, |l| l.index + 1),
            voters,
            learners,
            cluster: self.cluster,
        }
    }

    /// Resolves with why once Raft has stopped on its own (a storage error is fatal by design). Polled,
    /// not watched: the metrics channel changes several times per write, and waking the waiting task for
    /// each change costs the leader a share of a core.
    pub async fn stopped(&self) -> String {
        let mut metrics = self.raft.metrics();
        let mut ticker = tokio::time::interval(STOPPED_POLL);
        loop {
            ticker.tick().await;
            if let Err(e) = &metrics.borrow_watched().running_state {
                return format!("{e}");
            }
            // Only Raft's core task sends metrics, so a closed channel means that task is gone (a
            // panic) without reporting an error. Checked without waiting: Ok for an unseen change (now
            // marked seen), Err once the sender is gone, so at most one tick late.
            if let Some(Err(_)) = futures::FutureExt::now_or_never(metrics.changed()) {
                return "raft metrics closed".to_string();
            }
        }
    }

    /// Stops Raft, bounded by `within` when given (a store that cannot be read may not let it finish).
    pub async fn stop_raft(&self, within: Option<Duration>) {
        let shutdown = self.raft.shutdown();
        let result = match within {
            Some(limit) => match tokio::time::timeout(limit, shutdown).await {
                Ok(r) => r,
                Err(_) => return,
            },
            None => shutdown.await,
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }

    /// After [`Node::stop_raft`]: marks the state machine clean, so the next start keeps the applied
    /// state instead of rebuilding it from the last snapshot.
    pub async fn close(&self) {
        if let Err(e) = self.sm.close().await {
            tracing::warn!(error = %e, "could not mark the state machine clean; the next start rebuilds it");
        }
    }

    /// The Raft service this node offers its peers (see `network::service`).
    pub fn raft_service(&self) -> crate::network::service::RaftService {
        crate::network::service::RaftService::new(
            self.raft.clone(),
            crate::network::service::Admission {
                id: self.id,
                cluster: self.cluster,
                bootstrap_peers: self.peers.clone(),
                joining: self.joining,
                sm: self.sm.clone(),
                removal: self.removal.clone(),
                vouches: self.vouches.clone(),
                transfers: Default::default(),
                vote_hold: self.vote_hold,
                inbox: crate::store::snapshot::Inbox::new(
                    self.sm.integrity().dir(),
                    self.max_snapshot_bytes as u64,
                ),
            },
        )
    }

    /// Whether `from` may send this node peer requests: a voter or learner of the membership it
    /// knows, or, while it knows none yet (fresh or wiped), one of its bootstrap `--peers`.
    pub fn admits(&self, from: NodeId) -> bool {
        !self.sm.is_retired(from)
            && crate::network::service::admits(
                &self.raft,
                &self.peers,
                self.joining,
                &self.vouches,
                self.id,
                from,
            )
    }
}

/// How soon a node notices that Raft stopped on its own.
const STOPPED_POLL: Duration = Duration::from_millis(200);
