//! Answers peers' Raft protocol messages and snapshot transfers, on the peer listener only.
//!
//! Before openraft sees a message, this module checks what it can: the request comes from this
//! cluster and names its sender (see `identity`); every payload decodes within a byte limit (see
//! `codec`); a vote, append or snapshot comes from the sender it names and that sender is in the
//! membership this node knows (or its bootstrap `--peers`); a vote's leadership-transfer flag is
//! ignored (a genuine transfer has already dropped the leases it would skip); and snapshots are
//! size-checked. A node a membership change removed is told so, and a removed node answers nothing.
//! What none of this stops is a forger who can reach the peer port and names a member: peer TLS
//! does (see the README).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use openraft::async_runtime::watch::WatchReceiver;
use openraft::raft::AppendEntriesRequest;
use openraft::vote::RaftLeaderId;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status, Streaming};

use super::SNAPSHOT_CHUNK_BYTES;
use super::identity::{ClusterId, REMOVED_HEADER, Refusals, sent_by};
use super::vouch::Vouches;
use crate::codec;
use crate::node::VoteHold;
use crate::pb::internal::raft_server::Raft as RaftRpc;
use crate::pb::internal::{MembersRequest, MembersResponse, Payload, SnapshotChunk};
use crate::store::snapshot::Inbox;
use crate::store::snapshot::inbox::InboxError;
use crate::store::{Raft, StateMachineStore};
use crate::sync::lock;
use crate::types::{Member, NodeId, Snapshot, SnapshotMeta, TypeConfig, Vote, VoteRequest};

/// What the service checks a peer message against before openraft sees it.
#[derive(Clone)]
pub struct Admission {
    pub id: NodeId,
    pub cluster: ClusterId,
    /// The initial voters (`--peers`): who may speak to a node that knows no membership yet.
    pub bootstrap_peers: BTreeMap<NodeId, Member>,
    /// Joining an existing cluster (`--join`): until this node knows a membership, any node of this
    /// cluster may speak to it (the cluster id is checked first; a new node has nothing to protect).
    pub joining: bool,
    /// Who was removed from the cluster, as this node's applied state knows it.
    pub sm: StateMachineStore,
    /// Set when this node learns it was removed itself.
    pub removal: Arc<super::identity::Removal>,
    /// Senders this node's membership does not name but known members vouched for (see `vouch`).
    pub vouches: Vouches,
    /// The latest leadership transfer this node heard of from its leader.
    pub transfers: Transfers,
    pub vote_hold: VoteHold,
    /// Where a received snapshot is written, bounded by `--max-snapshot-bytes`.
    pub inbox: Inbox,
}

pub struct RaftService {
    raft: Raft,
    admission: Admission,
    refusals: Arc<Refusals>,
}

impl RaftService {
    pub fn new(raft: Raft, admission: Admission) -> Self {
        RaftService {
            raft,
            admission,
            refusals: Arc::default(),
        }
    }

    /// Where refused messages are counted; shared with the peer identity check and the Forward service
    /// so one flood costs one log line a second.
    pub fn refusals(&self) -> Arc<Refusals> {
        self.refusals.clone()
    }

    pub fn cluster(&self) -> ClusterId {
        self.admission.cluster
    }
}

fn decode<T: DeserializeOwned>(payload: &Payload) -> Result<T, Status> {
    codec::decode(&payload.data)
        .map_err(|e| Status::invalid_argument(format!("undecodable peer message: {e}")))
}

fn reply<T: Serialize>(value: &T) -> Result<Response<Payload>, Status> {
    let data = codec::encode(value).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(Payload { data }))
}

/// A node whose Raft has stopped is, to its peers, simply unreachable.
fn stopped(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("raft stopped: {e}"))
}

/// Response metadata on a vote refused because of the hold after a restart (see `node::vote_hold`):
/// the milliseconds left. The refusal itself looks like any other, so this is how an operator or a
/// test tells the two apart.
pub const VOTE_HELD_HEADER: &str = "raftkv-vote-held-ms";

fn sender(vote: &Vote) -> NodeId {
    *vote.leader_id().node_id()
}

/// PERMISSION_DENIED unless the message's `claimed` sender is the node that sent it and a member.
fn check_sender(
    raft: &Raft,
    admission: &Admission,
    refusals: &Refusals,
    rpc: &'static str,
    from: NodeId,
    claimed: NodeId,
) -> Result<(), Status> {
    if claimed != from {
        refusals.note(rpc, from, "speaks in another node's name");
        return Err(Status::permission_denied(format!(
            "node {from} sent a message in node {claimed}'s name"
        )));
    }
    check_member(raft, admission, refusals, rpc, from)
}

/// Whether `from` may send this node peer messages: a voter or learner of the membership this node
/// knows. A node that knows no membership yet (fresh or wiped, waiting for the first entry) hears
/// from its bootstrap `--peers` instead; once it has one, the flags no longer count, so a member
/// removed later is refused even if it was an initial voter.
///
/// During a membership change the latest membership may not be committed yet and can still be
/// replaced; a member of the committed one is admitted too, so a node that heard of a change first
/// still hears from a leader that did not. And a node that missed a change (it was down) admits a
/// member of the newer membership that members it knows vouched for (see `vouch`).
pub fn admits(
    raft: &Raft,
    bootstrap: &BTreeMap<NodeId, Member>,
    joining: bool,
    vouches: &Vouches,
    me: NodeId,
    from: NodeId,
) -> bool {
    if from == me {
        return true;
    }
    let metrics = raft.metrics();
    let m = metrics.borrow_watched();
    let membership = m.membership_config.membership();
    if membership.voter_ids().next().is_none() {
        joining || bootstrap.contains_key(&from)
    } else {
        membership.get_node(&from).is_some()
            || m.committed_membership_config
                .membership()
                .get_node(&from)
                .is_some()
            || vouches.vouched(from)
    }
}

/// Whether `id` is a member, as this node's log knows it: the answer to [`RaftRpc::members`].
fn membership_of(raft: &Raft, sm: &StateMachineStore, id: NodeId) -> MembersResponse {
    let metrics = raft.metrics();
    let m = metrics.borrow_watched();
    let retired = sm.is_retired(id);
    let named = m.membership_config.membership().get_node(&id).is_some()
        || m.committed_membership_config
            .membership()
            .get_node(&id)
            .is_some();
    MembersResponse {
        member: named && !retired,
        retired,
    }
}

/// Whether this node was removed from the cluster: a peer said so, or it applied its own removal.
pub fn removed(admission: &Admission) -> bool {
    admission.removal.is_set() || admission.sm.is_retired(admission.id)
}

/// PERMISSION_DENIED unless `from` is admitted (see [`admits`]).
fn check_member(
    raft: &Raft,
    admission: &Admission,
    refusals: &Refusals,
    rpc: &'static str,
    from: NodeId,
) -> Result<(), Status> {
    if removed(admission) {
        refusals.note(rpc, from, "this node was removed from the cluster");
        return Err(Status::failed_precondition(format!(
            "node {} was removed from the cluster",
            admission.id
        )));
    }
    // A removal this node applied is final, whatever was vouched for before it.
    let retired = admission.sm.is_retired(from);
    if !retired
        && admits(
            raft,
            &admission.bootstrap_peers,
            admission.joining,
            &admission.vouches,
            admission.id,
            from,
        )
    {
        return Ok(());
    }
    refusals.note(rpc, from, "not a member");
    if !retired {
        // Perhaps a member added while this node was away: its next message is admitted if so.
        admission.vouches.ask(from);
    }
    let mut status =
        Status::permission_denied(format!("node {from} is not a member of this cluster"));
    if retired {
        // Only for a removal this node applied (committed, so final): the sender stops for good.
        status.metadata_mut().insert(
            REMOVED_HEADER,
            tonic::metadata::MetadataValue::from_static("1"),
        );
    }
    Err(status)
}

impl RaftService {
    async fn refuse_held_vote(&self, left: Duration) -> Result<Response<Payload>, Status> {
        let refusal = crate::node::vote_hold::held_vote_refusal(&self.raft)
            .await
            .map_err(stopped)?;
        let mut response = reply(&refusal)?;
        response.metadata_mut().insert(
            VOTE_HELD_HEADER,
            tonic::metadata::MetadataValue::from(left.as_millis() as u64),
        );
        Ok(response)
    }

    /// The message names `claimed` as its sender (a vote's candidate, an append's leader): it must be
    /// the node the request came from, and a member.
    fn check_sender<T>(
        &self,
        rpc: &'static str,
        request: &Request<T>,
        claimed: NodeId,
    ) -> Result<(), Status> {
        check_sender(
            &self.raft,
            &self.admission,
            &self.refusals,
            rpc,
            sent_by(request)?,
            claimed,
        )
    }

    /// A vote that claims a leadership transfer would skip the receiver's leader lease (openraft
    /// grants it "because the leader said so"), so one forged message could depose a healthy leader.
    /// The claim is dropped instead: a genuine transfer makes every voter that hears the leader's
    /// TransferLeader drop its lease (see [`RaftRpc::transfer_leader`]), and the leader dropped its
    /// own, so the candidate still wins the votes it needs without it. The leader sends its
    /// TransferLeader to every voter at once, so the candidate's vote can overtake it on the way
    /// here; such a vote waits, briefly, for the transfer it claims, which a forged one only delays.
    async fn check_vote(
        &self,
        rpc: &'static str,
        request: &Request<Payload>,
        req: &mut VoteRequest,
    ) -> Result<(), Status> {
        let from = sender(&req.vote);
        self.check_sender(rpc, request, from)?;
        if req.leadership_transfer {
            // Half the candidate's own vote timeout (election-min-ms), so a vote that waited in
            // vain is still answered in time.
            let wait = Duration::from_millis(self.raft.config().election_timeout_min / 2);
            self.admission
                .transfers
                .wait_for(from, req.vote.leader_id().term(), wait)
                .await;
        }
        req.leadership_transfer = false;
        Ok(())
    }
}

/// The latest leadership transfer a member announced to this node: the announcing leader's term
/// and the target. Any admitted member's, whether openraft acted on it or not: it only ends a wait.
#[derive(Clone)]
pub struct Transfers(Arc<tokio::sync::watch::Sender<Option<(u64, NodeId)>>>);

impl Default for Transfers {
    fn default() -> Self {
        Transfers(Arc::new(tokio::sync::watch::channel(None).0))
    }
}

impl Transfers {
    fn heard(&self, leader_term: u64, to: NodeId) {
        self.0.send_replace(Some((leader_term, to)));
    }

    /// Until this node has handled a transfer to `candidate` from the leader of the term before the
    /// candidate's (the term it campaigns in), at most `wait`.
    async fn wait_for(&self, candidate: NodeId, candidate_term: u64, wait: Duration) {
        let mut rx = self.0.subscribe();
        let announced = |seen: &Option<(u64, NodeId)>| match seen {
            Some((term, to)) => *to == candidate && term.saturating_add(1) >= candidate_term,
            None => false,
        };
        let _ = tokio::time::timeout(wait, rx.wait_for(announced)).await;
    }
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(&self, request: Request<Payload>) -> Result<Response<Payload>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = decode(request.get_ref())?;
        self.check_sender("AppendEntries", &request, sender(&rpc.vote))?;
        let resp = self.raft.append_entries(rpc).await.map_err(stopped)?;
        reply(&resp)
    }

    type StreamAppendStream = Pin<Box<dyn Stream<Item = Result<Payload, Status>> + Send>>;

    /// Hands the leader's requests to openraft as they arrive, so this node appends a request while
    /// earlier ones still wait for their flush, and answers each in order. A message that does not
    /// decode, or comes from a node outside the membership, ends the stream with its status after
    /// the answers already due; a broken transport just ends it. Either way the leader starts a new
    /// stream from what this node acknowledged.
    async fn stream_append(
        &self,
        request: Request<Streaming<Payload>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        let stream_from = sent_by(&request)?;
        let refused: Arc<std::sync::Mutex<Option<Status>>> = Arc::default();
        let noted = refused.clone();
        let raft = self.raft.clone();
        let admission = self.admission.clone();
        let refusals = self.refusals.clone();
        // The sender checked last: a stream normally carries one leader's messages, so the membership
        // is looked up once per stream rather than once per message.
        let requests = request
            .into_inner()
            .scan(None::<NodeId>, move |checked, message| {
                let verdict = match message {
                    Ok(payload) => {
                        decode::<AppendEntriesRequest<TypeConfig>>(&payload).and_then(|rpc| {
                            let from = sender(&rpc.vote);
                            if *checked != Some(from) {
                                check_sender(
                                    &raft,
                                    &admission,
                                    &refusals,
                                    "StreamAppend",
                                    stream_from,
                                    from,
                                )?;
                                *checked = Some(from);
                            }
                            Ok(rpc)
                        })
                    }
                    Err(status) => {
                        tracing::debug!(%status, "replication stream from the leader broke");
                        return futures::future::ready(None);
                    }
                };
                futures::future::ready(match verdict {
                    Ok(rpc) => Some(rpc),
                    Err(status) => {
                        *lock(&noted) = Some(status);
                        None
                    }
                })
            });
        let answers = self.raft.stream_append(requests).map(|answer| {
            let result = answer.map_err(stopped)?;
            let data = codec::encode(&result).map_err(|e| Status::internal(e.to_string()))?;
            Ok(Payload { data })
        });
        let refusal = futures::stream::once(async move {
            let status = lock(&refused).take();
            status.map(|status| {
                tracing::debug!(%status, "ending a replication stream");
                Err(status)
            })
        })
        .filter_map(futures::future::ready);
        Ok(Response::new(Box::pin(answers.chain(refusal))))
    }

    async fn vote(&self, request: Request<Payload>) -> Result<Response<Payload>, Status> {
        let mut rpc: VoteRequest = decode(request.get_ref())?;
        self.check_vote("Vote", &request, &mut rpc).await?;
        if let Some(left) = self.admission.vote_hold.left() {
            return self.refuse_held_vote(left).await;
        }
        let resp = self.raft.vote(rpc).await.map_err(stopped)?;
        reply(&resp)
    }

    async fn pre_vote(&self, request: Request<Payload>) -> Result<Response<Payload>, Status> {
        let mut rpc: VoteRequest = decode(request.get_ref())?;
        self.check_vote("PreVote", &request, &mut rpc).await?;
        if let Some(left) = self.admission.vote_hold.left() {
            return self.refuse_held_vote(left).await;
        }
        let resp = self.raft.pre_vote(rpc).await.map_err(stopped)?;
        reply(&resp)
    }

    /// The leader hands leadership over (`MoveLeader`, a leader's graceful shutdown): every voter
    /// drops its leader lease for that leader, whose own reads and writes stopped when it began the
    /// transfer, and the target campaigns at once. openraft acts only on a request that carries
    /// this node's current vote, and the sender must be that vote's leader, so a member cannot
    /// transfer another's leadership.
    async fn transfer_leader(
        &self,
        request: Request<Payload>,
    ) -> Result<Response<Payload>, Status> {
        let rpc: openraft::raft::TransferLeaderRequest<TypeConfig> = decode(request.get_ref())?;
        let from = sender(rpc.from_leader());
        self.check_sender("TransferLeader", &request, from)?;
        let (term, to) = (rpc.from_leader().leader_id().term(), *rpc.to_node_id());
        let resp = self
            .raft
            .handle_transfer_leader(rpc)
            .await
            .map_err(stopped)?;
        // After openraft has queued it, so a vote that waited for it is handled after it.
        self.admission.transfers.heard(term, to);
        reply(&resp)
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<Payload>, Status> {
        let origin = sent_by(&request)?;
        let mut stream = request.into_inner();
        let first = stream
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
        let (vote, meta): (Vote, SnapshotMeta) = codec::decode(&first.header)
            .map_err(|e| Status::invalid_argument(format!("undecodable snapshot header: {e}")))?;
        check_sender(
            &self.raft,
            &self.admission,
            &self.refusals,
            "InstallSnapshot",
            origin,
            sender(&vote),
        )?;
        let mut incoming = self.admission.inbox.begin().await.map_err(inbox_status)?;
        let mut chunk = first.data;
        loop {
            if chunk.len() > SNAPSHOT_CHUNK_BYTES {
                return Err(Status::invalid_argument(format!(
                    "snapshot chunk of {} bytes; chunks are at most {SNAPSHOT_CHUNK_BYTES} bytes",
                    chunk.len()
                )));
            }
            incoming.write(&chunk).await.map_err(inbox_status)?;
            match stream.next().await {
                Some(next) => chunk = next?.data,
                None => break,
            }
        }
        // A snapshot openraft cannot install is a storage error to it, and storage errors stop Raft:
        // checked here, a malformed file is only a refused request.
        let data = incoming.finish(&meta).await.map_err(inbox_status)?;
        tracing::info!(?meta.last_log_id, bytes = data.len, "received snapshot");
        let snapshot = Snapshot {
            meta,
            snapshot: data,
        };
        let resp = self
            .raft
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(stopped)?;
        reply(&resp)
    }

    /// Answered to members only, so a stranger cannot probe the membership through it.
    async fn members(
        &self,
        request: Request<MembersRequest>,
    ) -> Result<Response<MembersResponse>, Status> {
        let from = sent_by(&request)?;
        check_member(&self.raft, &self.admission, &self.refusals, "Members", from)?;
        let id = request.get_ref().id;
        Ok(Response::new(membership_of(
            &self.raft,
            &self.admission.sm,
            id,
        )))
    }
}

/// The peer's status for a snapshot this node would not receive.
fn inbox_status(e: InboxError) -> Status {
    match e {
        InboxError::TooLarge { cap } => {
            tracing::warn!(cap, "refused a snapshot larger than --max-snapshot-bytes");
            Status::resource_exhausted(e.to_string())
        }
        InboxError::Busy => Status::resource_exhausted(e.to_string()),
        InboxError::Malformed(_) | InboxError::Mismatch { .. } => {
            Status::invalid_argument(e.to_string())
        }
        InboxError::Io(_) => {
            tracing::warn!(error = %e, "could not write a received snapshot");
            Status::unavailable(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_transfer_vote_waits_only_for_its_own_transfer() {
        let transfers = Transfers::default();
        let wait = Duration::from_millis(500);
        let waited = |candidate, term| {
            let transfers = transfers.clone();
            async move {
                let started = std::time::Instant::now();
                transfers.wait_for(candidate, term, wait).await;
                started.elapsed()
            }
        };
        // None heard: the whole wait, then judged as any vote.
        assert!(waited(4, 6).await >= wait);
        // Heard before the vote: it goes on at once.
        transfers.heard(5, 4);
        assert!(waited(4, 6).await < wait);
        // Another target, or a transfer from an older term, does not count.
        assert!(waited(2, 6).await >= wait);
        assert!(waited(4, 9).await >= wait);
        // Heard while the vote waits: it goes on then.
        let pending = tokio::spawn(waited(3, 8));
        tokio::task::yield_now().await;
        transfers.heard(7, 3);
        let took = pending.await.expect("the waiting vote");
        assert!(took < wait, "{took:?}");
    }
}
