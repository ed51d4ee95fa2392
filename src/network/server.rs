//! Answers peers: Raft protocol messages, snapshot transfers, and the two requests followers make on
//! behalf of clients (forwarded writes and read-index), on the peer listener only.
//!
//! Before openraft sees a message, this module checks what it can: the request comes from this
//! cluster and names its sender (see `identity`); every payload decodes within a byte limit (see
//! `codec`); a vote, append or snapshot comes from the sender it names and that sender is in the
//! membership this node knows (or its bootstrap `--peers`); anything that claims a leadership transfer
//! is refused (raftkv never transfers leadership, so only a forgery carries one); snapshots are
//! size-checked; and forwarded writes pass the public API's validation. What none of this stops is a
//! forger who can reach the peer port and names a member: peer TLS does (see the README).

use std::io::Cursor;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use openraft::async_runtime::watch::WatchReceiver;
use openraft::raft::AppendEntriesRequest;
use openraft::vote::RaftLeaderId;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status, Streaming};

use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;

use crate::codec;
use crate::listener::{ConnectionLimits, limited_incoming};
use crate::network::identity;
use crate::network::{MAX_PEER_MESSAGE_BYTES, SNAPSHOT_CHUNK_BYTES};
use crate::node::Node;
use crate::pb::internal::raft_server::{Raft as RaftRpc, RaftServer};
use crate::pb::internal::{
    Payload, ProposeBatchRequest, ProposeBatchResponse, ReadIndexRequest, ReadIndexResponse,
    SnapshotChunk,
};
use crate::types::{Command, NodeId, Snapshot, SnapshotMeta, TypeConfig, Vote, VoteRequest};

pub struct RaftService {
    pub node: Arc<Node>,
    refusals: Arc<Refusals>,
}

impl RaftService {
    pub fn new(node: Arc<Node>) -> Self {
        RaftService {
            node,
            refusals: Arc::default(),
        }
    }
}

/// Serves the Raft service to peers until the listener fails or the caller drops the future.
pub async fn serve(
    node: Arc<Node>,
    listener: TcpListener,
    connections: ConnectionLimits,
    max_concurrent_streams: u32,
    tls: Option<Arc<crate::tls::ServerTls>>,
) -> anyhow::Result<()> {
    let service = RaftService::new(node);
    let identify = Identify {
        cluster: service.node.cluster,
        refusals: service.refusals.clone(),
    };
    let raft = RaftServer::new(service)
        .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES);
    crate::listener::bounded_server(max_concurrent_streams)
        .add_service(InterceptedService::new(raft, identify))
        .serve_with_incoming(limited_incoming(listener, connections, "peer", tls))
        .await?;
    Ok(())
}

/// The sender of a peer request, as its metadata names it (see `identity`), once its cluster checked.
#[derive(Clone, Copy)]
struct PeerSender(NodeId);

/// Refuses requests from another cluster, or that do not say where they come from, before their
/// bodies are read; tags the rest with their sender.
#[derive(Clone)]
struct Identify {
    cluster: identity::ClusterId,
    refusals: Arc<Refusals>,
}

impl tonic::service::Interceptor for Identify {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        match identity::sender(request.metadata(), self.cluster) {
            Ok(from) => {
                if let Some(certified) = certified_node(&request)
                    && certified != from
                {
                    // A member's certificate used to speak in another member's name.
                    self.refusals
                        .note("any", from, "sender differs from its certificate");
                    return Err(Status::permission_denied(format!(
                        "the request claims node {from}, its TLS certificate is node {certified}'s"
                    )));
                }
                request.extensions_mut().insert(PeerSender(from));
                Ok(request)
            }
            Err(e) => {
                let why = match e {
                    identity::IdentityError::Missing => "no cluster id or sender",
                    identity::IdentityError::OtherCluster { .. } => "another cluster",
                };
                // The claimed sender, for the log line only (0: none that parses).
                let claimed = request
                    .metadata()
                    .get(identity::FROM_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                self.refusals.note("any", claimed, why);
                Err(Status::failed_precondition(e.to_string()))
            }
        }
    }
}

/// The node id in the certificate the peer showed (peer TLS, a certificate from `raftkv certs`).
/// None without TLS or for a certificate that names no node: the CA check alone then applies.
fn certified_node(request: &Request<()>) -> Option<NodeId> {
    let info = request
        .extensions()
        .get::<crate::listener::ConnectionInfo>()?;
    crate::tls::node_id_of(info.peer_certs.as_ref()?.first()?)
}

/// The sender `Identify` found. Every request passed it, so a missing tag is a bug, refused all the same.
fn sent_by<T>(request: &Request<T>) -> Result<NodeId, Status> {
    request
        .extensions()
        .get::<PeerSender>()
        .map(|f| f.0)
        .ok_or_else(|| Status::internal("peer request without a checked sender"))
}

/// How often a burst of refused peer messages is logged.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(1);

/// Counts refused peer messages and logs them at most once per [`REFUSAL_LOG_EVERY`], so a flood of
/// forgeries costs a log line a second, not one per message. Hand-written: a rate limiter crate
/// (governor) would drop the suppressed events rather than count them.
#[derive(Default)]
struct Refusals {
    total: AtomicU64,
    window: std::sync::Mutex<Option<(Instant, u64)>>,
}

impl Refusals {
    fn note(&self, rpc: &'static str, from: NodeId, reason: &str) {
        let total = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match window.as_mut() {
            Some((since, count)) if now.duration_since(*since) < REFUSAL_LOG_EVERY => *count += 1,
            _ => {
                let since_last = window.map_or(1, |(_, count)| count + 1);
                *window = Some((now, 0));
                drop(window);
                tracing::warn!(
                    rpc,
                    from,
                    reason,
                    refused_since_last_line = since_last,
                    refused_total = total,
                    "refused a peer message"
                );
            }
        }
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

/// Response metadata on a vote refused because of the hold after a restart (see `Node::vote_held`):
/// the milliseconds left. The refusal itself looks like any other, so this is how an operator or a
/// test tells the two apart.
pub const VOTE_HELD_HEADER: &str = "raftkv-vote-held-ms";

fn sender(vote: &Vote) -> NodeId {
    *vote.leader_id().node_id()
}

/// PERMISSION_DENIED unless the message's `claimed` sender is the node that sent it and a member.
fn check_sender(
    node: &Node,
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
    check_member(node, refusals, rpc, from)
}

/// PERMISSION_DENIED unless `from` is a voter or learner of the membership this node knows. A node
/// that knows no membership yet (fresh or wiped, waiting for the first entry) hears from its bootstrap
/// `--peers` instead; once it has one, the flags no longer count, so a member removed later is
/// refused even if it was an initial voter.
fn check_member(
    node: &Node,
    refusals: &Refusals,
    rpc: &'static str,
    from: NodeId,
) -> Result<(), Status> {
    if from == node.id {
        return Ok(());
    }
    let known = {
        let metrics = node.raft.metrics();
        let m = metrics.borrow_watched();
        let membership = m.membership_config.membership();
        if membership.voter_ids().next().is_none() {
            node.peers.contains_key(&from)
        } else {
            membership.get_node(&from).is_some()
        }
    };
    if known {
        return Ok(());
    }
    refusals.note(rpc, from, "not a member");
    Err(Status::permission_denied(format!(
        "node {from} is not a member of this cluster"
    )))
}

impl RaftService {
    async fn refuse_held_vote(&self, left: Duration) -> Result<Response<Payload>, Status> {
        let refusal = self.node.held_vote_refusal().await.map_err(stopped)?;
        let mut response = reply(&refusal)?;
        response.metadata_mut().insert(
            VOTE_HELD_HEADER,
            tonic::metadata::MetadataValue::from(left.as_millis() as u64),
        );
        Ok(response)
    }

    fn check_member(&self, rpc: &'static str, from: NodeId) -> Result<(), Status> {
        check_member(&self.node, &self.refusals, rpc, from)
    }

    /// The message names `claimed` as its sender (a vote's candidate, an append's leader): it must be
    /// the node the request came from, and a member.
    fn check_sender<T>(
        &self,
        rpc: &'static str,
        request: &Request<T>,
        claimed: NodeId,
    ) -> Result<(), Status> {
        check_sender(&self.node, &self.refusals, rpc, sent_by(request)?, claimed)
    }

    /// A vote that claims a leadership transfer skips the receiver's leader lease (openraft grants it
    /// "because the leader said so"). raftkv never asks openraft to transfer leadership, so such a
    /// vote is always a forgery; honoured, one such message deposes a healthy leader.
    fn check_vote(
        &self,
        rpc: &'static str,
        request: &Request<Payload>,
        req: &VoteRequest,
    ) -> Result<(), Status> {
        let from = sender(&req.vote);
        self.check_sender(rpc, request, from)?;
        if req.leadership_transfer {
            self.refusals
                .note(rpc, from, "claims a leadership transfer");
            return Err(Status::failed_precondition(
                "raftkv does not transfer leadership; a vote that claims a transfer is refused",
            ));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(&self, request: Request<Payload>) -> Result<Response<Payload>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = decode(request.get_ref())?;
        self.check_sender("AppendEntries", &request, sender(&rpc.vote))?;
        let resp = self.node.raft.append_entries(rpc).await.map_err(stopped)?;
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
        let node = self.node.clone();
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
                                check_sender(&node, &refusals, "StreamAppend", stream_from, from)?;
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
                        *noted.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
                        None
                    }
                })
            });
        let answers = self.node.raft.stream_append(requests).map(|answer| {
            let result = answer.map_err(stopped)?;
            let data = codec::encode(&result).map_err(|e| Status::internal(e.to_string()))?;
            Ok(Payload { data })
        });
        let refusal = futures::stream::once(async move {
            let status = refused.lock().unwrap_or_else(|p| p.into_inner()).take();
            status.map(|status| {
                tracing::debug!(%status, "ending a replication stream");
                Err(status)
            })
        })
        .filter_map(futures::future::ready);
        Ok(Response::new(Box::pin(answers.chain(refusal))))
    }

    async fn vote(&self, request: Request<Payload>) -> Result<Response<Payload>, Status> {
        let rpc: VoteRequest = decode(request.get_ref())?;
        self.check_vote("Vote", &request, &rpc)?;
        if let Some(left) = self.node.vote_held() {
            return self.refuse_held_vote(left).await;
        }
        let resp = self.node.raft.vote(rpc).await.map_err(stopped)?;
        reply(&resp)
    }

    async fn pre_vote(&self, request: Request<Payload>) -> Result<Response<Payload>, Status> {
        let rpc: VoteRequest = decode(request.get_ref())?;
        self.check_vote("PreVote", &request, &rpc)?;
        if let Some(left) = self.node.vote_held() {
            return self.refuse_held_vote(left).await;
        }
        let resp = self.node.raft.pre_vote(rpc).await.map_err(stopped)?;
        reply(&resp)
    }

    /// Refused: raftkv never transfers leadership, and openraft acts on a TransferLeader before it
    /// checks anything (a follower drops its leader lease at once), so only a forgery gets here.
    async fn transfer_leader(
        &self,
        request: Request<Payload>,
    ) -> Result<Response<Payload>, Status> {
        let rpc: openraft::raft::TransferLeaderRequest<TypeConfig> = decode(request.get_ref())?;
        let from = sender(rpc.from_leader());
        self.check_sender("TransferLeader", &request, from)?;
        self.refusals.note(
            "TransferLeader",
            from,
            "raftkv does not transfer leadership",
        );
        Err(Status::failed_precondition(
            "raftkv does not transfer leadership",
        ))
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
            &self.node,
            &self.refusals,
            "InstallSnapshot",
            origin,
            sender(&vote),
        )?;
        let cap = self.node.max_snapshot_bytes;
        let mut data = Vec::new();
        let mut chunk = first.data;
        loop {
            if chunk.len() > SNAPSHOT_CHUNK_BYTES {
                return Err(Status::invalid_argument(format!(
                    "snapshot chunk of {} bytes; chunks are at most {SNAPSHOT_CHUNK_BYTES} bytes",
                    chunk.len()
                )));
            }
            if data.len() + chunk.len() > cap {
                tracing::warn!(cap, "refused a snapshot larger than --max-snapshot-bytes");
                return Err(Status::resource_exhausted(format!(
                    "snapshot exceeds {cap} bytes (--max-snapshot-bytes)"
                )));
            }
            data.extend_from_slice(&chunk);
            match stream.next().await {
                Some(next) => chunk = next?.data,
                None => break,
            }
        }
        // A snapshot openraft cannot install is a storage error to it, and storage errors stop Raft:
        // checked here, a malformed image is only a refused request.
        crate::store::snapshot::check_image(&data)
            .map_err(|e| Status::invalid_argument(format!("undecodable snapshot image: {e}")))?;
        tracing::info!(?meta.last_log_id, bytes = data.len(), "received snapshot");
        let snapshot = Snapshot {
            meta,
            snapshot: Cursor::new(data),
        };
        let resp = self
            .node
            .raft
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(stopped)?;
        reply(&resp)
    }

    async fn read_index(
        &self,
        request: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        self.check_member("ReadIndex", sent_by(&request)?)?;
        let deadline = self
            .node
            .deadline(crate::api::grpc_timeout(request.metadata()));
        let index = self
            .node
            .read_index(deadline)
            .await
            .map_err(|e| e.into_status(self.node.id))?;
        Ok(Response::new(ReadIndexResponse { index }))
    }

    /// A follower reports that its log is behind the commit index and not advancing (its catch-up
    /// watchdog in node.rs). A fallback: a new entry gives replication to it something to send.
    async fn write_blank(
        &self,
        request: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        self.check_member("WriteBlank", sent_by(&request)?)?;
        let raft = &self.node.raft;
        if !raft.is_leader() {
            return Err(crate::api::error::ApiError::unavailable(
                "not the leader",
                self.node.hint(),
            )
            .into_status(self.node.id));
        }
        let resp = raft
            .write_blank()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(ReadIndexResponse {
            index: resp.log_id.index,
        }))
    }

    async fn propose_batch(
        &self,
        request: Request<ProposeBatchRequest>,
    ) -> Result<Response<ProposeBatchResponse>, Status> {
        self.check_member("ProposeBatch", sent_by(&request)?)?;
        let node = &self.node;
        // Proposed concurrently, as if each had arrived on its own call; each keeps its own deadline.
        let outcomes = futures::future::join_all(request.into_inner().writes.into_iter().map(
            |w| async move {
                let deadline = node.deadline(Some(Duration::from_millis(w.timeout_ms)));
                let result = match codec::decode::<Command>(&w.command) {
                    Err(e) => Err(Status::invalid_argument(format!(
                        "undecodable forwarded write: {e}"
                    ))),
                    // The same rules as a write that arrives on the public API: a follower has
                    // checked it already, but anyone can send this.
                    Ok(cmd) => match crate::api::validate::command(&node.limits, &cmd) {
                        Err(e) => Err(e.into_status(node.id)),
                        Ok(()) => node
                            .write(cmd, deadline, false)
                            .await
                            .map_err(|e| e.into_status(node.id)),
                    },
                };
                crate::forward::to_outcome(result)
            },
        ))
        .await;
        Ok(Response::new(ProposeBatchResponse { outcomes }))
    }
}
