//! openraft's network: how this node calls its peers.
//!
//! Messages are openraft's own types, bincode-encoded in a protobuf `bytes` field (see
//! `proto/raftkv/internal/v1/raft.proto` for why). Transport failures map to openraft's error kinds so it
//! backs off from dead peers (`Unreachable`) but retries at once after a lost packet (`Network`).
//!
//! Replication to each follower is one long-lived HTTP/2 stream (`StreamAppend`), so requests are
//! pipelined: the leader sends new entries while earlier ones are still being flushed by the follower.
//! With openraft's default, one unary call at a time, every entry waited for the answer to the
//! request before it, often one that only carried the commit index, and paid for its own HTTP/2
//! stream.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::AbortHandle;
use openraft::base::{BoxFuture, BoxStream};
use openraft::error::{
    NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2, stream_append_sequential};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, OptionalSend, RPCTypes};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::Streaming;
use tonic::transport::Channel;

use super::{MAX_PEER_MESSAGE_BYTES, PeerChannels, Purpose};
use crate::codec;
use crate::pb::internal::raft_client::RaftClient;
use crate::pb::internal::{Payload, SnapshotChunk};
use crate::types::{NodeId, Snapshot, SnapshotData, TypeConfig, Vote};

const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;

pub struct NetworkFactory {
    pub id: NodeId,
    pub channels: PeerChannels,
    /// `--dial` overrides of membership addresses.
    pub routes: std::sync::Arc<std::collections::BTreeMap<NodeId, String>>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        self.client(target, node, Purpose::Raft)
    }

    async fn new_snapshot_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        self.client(target, node, Purpose::Snapshot)
    }
}

impl NetworkFactory {
    fn client(&self, target: NodeId, node: &BasicNode, purpose: Purpose) -> PeerClient {
        let addr = self.routes.get(&target).unwrap_or(&node.addr);
        let client = match self.channels.get(addr, purpose) {
            Ok(ch) => Ok(raft_client(ch)),
            Err(e) => Err(format!(
                "bad address {:?} for node {target}: {e}",
                node.addr
            )),
        };
        PeerClient {
            id: self.id,
            target,
            client,
            unary_only: false,
        }
    }
}

pub fn raft_client(ch: Channel) -> RaftClient<Channel> {
    RaftClient::new(ch)
        .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES)
}

pub struct PeerClient {
    id: NodeId,
    target: NodeId,
    /// An address that cannot even be parsed is reported on every call rather than panicking.
    client: Result<RaftClient<Channel>, String>,
    /// Set once the peer answers `StreamAppend` with UNIMPLEMENTED (a binary from before it existed,
    /// mid rolling upgrade): replication to it then goes one unary call at a time.
    unary_only: bool,
}

impl PeerClient {
    fn client(&self) -> Result<RaftClient<Channel>, RPCError<TypeConfig>> {
        self.client
            .clone()
            .map_err(|e| RPCError::Unreachable(Unreachable::from_string(e)))
    }

    fn status_to_error(
        &self,
        action: RPCTypes,
        ttl: Duration,
        status: tonic::Status,
    ) -> RPCError<TypeConfig> {
        status_to_error(self.id, self.target, action, ttl, status)
    }

    /// Opens the replication stream; see [`Answers`] for how its answers are read.
    async fn open_append_stream<S>(
        &mut self,
        input: S,
        ttl: Duration,
    ) -> Result<Answers, RPCError<TypeConfig>>
    where
        S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        let sent = Arc::new(Mutex::new(VecDeque::new()));
        let sent_at = sent.clone();
        // Ends the outgoing stream (and drops openraft's request generator, which holds a lock its
        // next session needs) as soon as the answers are dropped; see `Answers::stop`.
        let (input, stop) = futures::stream::abortable(input);
        let requests = input.scan((), move |_, rpc| {
            let message = match codec::encode(&rpc) {
                Ok(data) => {
                    lock(&sent_at).push_back(Instant::now());
                    Some(Payload { data })
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode an AppendEntries request; ending the replication stream");
                    None
                }
            };
            futures::future::ready(message)
        });
        let mut client = self.client()?;
        let opened = tokio::time::timeout(ttl, client.stream_append(tonic::Request::new(requests)))
            .await
            .map_err(|_| {
                RPCError::Timeout(Timeout {
                    action: RPCTypes::AppendEntries,
                    id: self.id,
                    target: self.target,
                    timeout: ttl,
                })
            })?;
        let inbound = match opened {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                tracing::info!(
                    peer = self.target,
                    "peer has no StreamAppend; replicating to it one call at a time"
                );
                self.unary_only = true;
                return Err(RPCError::Network(NetworkError::new(&status)));
            }
            Err(status) => return Err(self.status_to_error(RPCTypes::AppendEntries, ttl, status)),
        };
        Ok(Answers {
            inbound,
            sent,
            ttl,
            id: self.id,
            target: self.target,
            stop: AbortOnDrop(stop),
            done: false,
        })
    }

    async fn unary<Req, Resp, F, Fut>(
        &self,
        action: RPCTypes,
        option: &RPCOption,
        req: &Req,
        call: F,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        F: FnOnce(RaftClient<Channel>, tonic::Request<Payload>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Payload>, tonic::Status>>,
    {
        let data = codec::encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(Payload { data });
        let ttl = option.hard_ttl();
        request.set_timeout(ttl);
        let response = call(self.client()?, request)
            .await
            .map_err(|s| self.status_to_error(action, ttl, s))?;
        codec::decode(&response.into_inner().data)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }
}

fn status_to_error(
    id: NodeId,
    target: NodeId,
    action: RPCTypes,
    ttl: Duration,
    status: tonic::Status,
) -> RPCError<TypeConfig> {
    match status.code() {
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => RPCError::Timeout(Timeout {
            action,
            id,
            target,
            timeout: ttl,
        }),
        tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&status)),
        _ => RPCError::Network(NetworkError::new(&status)),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Stops the outgoing half of a replication stream when the incoming half is dropped. Without it the
/// request stream would live on inside hyper, parked in openraft's generator while holding the lock
/// that openraft's next session for this follower waits on.
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The follower's answers, one per request and in order. A request that goes unanswered for the RPC
/// timeout ends the stream with a timeout, as a unary call would have: HTTP/2 keepalive alone would
/// take seconds to notice a paused follower, and openraft waits on this stream without a limit.
struct Answers {
    inbound: Streaming<Payload>,
    /// When each unanswered request was sent, oldest first.
    sent: Arc<Mutex<VecDeque<Instant>>>,
    ttl: Duration,
    id: NodeId,
    target: NodeId,
    stop: AbortOnDrop,
    done: bool,
}

type Answer = Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>;

impl Answers {
    async fn next(mut self) -> Option<(Answer, Self)> {
        if self.done {
            return None;
        }
        let message = loop {
            match tokio::time::timeout(self.ttl, self.inbound.message()).await {
                Ok(message) => break message,
                // Checked only after a wait of one whole ttl, so a stalled follower is noticed
                // within two: one timer per wait instead of one per request.
                Err(_) => {
                    let oldest = lock(&self.sent).front().copied();
                    if oldest.is_some_and(|at| at.elapsed() >= self.ttl) {
                        let timeout = Timeout {
                            action: RPCTypes::AppendEntries,
                            id: self.id,
                            target: self.target,
                            timeout: self.ttl,
                        };
                        return self.last(Err(RPCError::Timeout(timeout)));
                    }
                }
            }
        };
        match message {
            Ok(Some(payload)) => {
                lock(&self.sent).pop_front();
                match codec::decode::<StreamAppendResult<TypeConfig>>(&payload.data) {
                    Ok(answer) => Some((Ok(answer), self)),
                    Err(e) => self.last(Err(RPCError::Network(NetworkError::new(&e)))),
                }
            }
            Ok(None) => None,
            Err(status) => {
                let error = status_to_error(
                    self.id,
                    self.target,
                    RPCTypes::AppendEntries,
                    self.ttl,
                    status,
                );
                self.last(Err(error))
            }
        }
    }

    /// Yields one final item; the stream ends after it.
    fn last(mut self, answer: Answer) -> Option<(Answer, Self)> {
        self.done = true;
        self.stop.0.abort();
        Some((answer, self))
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotData;

    /// Pipelined: requests go out as openraft produces them, on one HTTP/2 stream per session.
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<BoxStream<'s, Answer>, RPCError<TypeConfig>>>
    where
        S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>>
            + OptionalSend
            + Unpin
            + 'static,
    {
        if self.unary_only {
            return stream_append_sequential(self, input, option);
        }
        Box::pin(async move {
            let answers = self.open_append_stream(input, option.hard_ttl()).await?;
            let stream: BoxStream<'s, Answer> =
                Box::pin(futures::stream::unfold(answers, Answers::next));
            Ok(stream)
        })
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(
            RPCTypes::AppendEntries,
            &option,
            &rpc,
            |mut c, r| async move { c.append_entries(r).await },
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(RPCTypes::Vote, &option, &rpc, |mut c, r| async move {
            c.vote(r).await
        })
        .await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(RPCTypes::Vote, &option, &rpc, |mut c, r| async move {
            c.pre_vote(r).await
        })
        .await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(
            RPCTypes::TransferLeader,
            &option,
            &req,
            |mut c, r| async move { c.transfer_leader(r).await },
        )
        .await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let header = codec::encode(&(vote, snapshot.meta))
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        let data = snapshot.snapshot.into_inner();
        let mut chunks = vec![SnapshotChunk {
            header,
            data: Vec::new(),
        }];
        chunks.extend(data.chunks(SNAPSHOT_CHUNK_BYTES).map(|c| SnapshotChunk {
            header: Vec::new(),
            data: c.to_vec(),
        }));
        // The whole stream is built before the call: a client-streaming call awaited before its
        // producer runs would wait forever.
        let mut request = tonic::Request::new(futures::stream::iter(chunks));
        // Sized for the transfer, not for a heartbeat: ~1 s per 8 MiB on top of openraft's budget.
        let ttl = option.hard_ttl().max(Duration::from_secs(10))
            + Duration::from_secs((data.len() / (8 << 20)) as u64);
        request.set_timeout(ttl);
        let mut client = self.client()?;
        let call = client.install_snapshot(request);
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            result = call => {
                let response = result.map_err(|s| match self.status_to_error(RPCTypes::InstallSnapshot, ttl, s) {
                    RPCError::Timeout(t) => StreamingError::Timeout(t),
                    RPCError::Unreachable(u) => StreamingError::Unreachable(u),
                    RPCError::Network(n) => StreamingError::Network(n),
                    RPCError::RemoteError(r) => StreamingError::Network(NetworkError::new(&r)),
                })?;
                codec::decode(&response.into_inner().data).map_err(|e| StreamingError::Network(NetworkError::new(&e)))
            }
        }
    }
}
