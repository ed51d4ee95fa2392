//! openraft's network: how this node calls its peers.
//!
//! Messages are openraft's own types, bincode-encoded in a protobuf `bytes` field (see
//! `proto/raftkv/internal/v1/raft.proto` for why). Transport failures map to openraft's error kinds
//! (`Unreachable`, `Timeout`, `Network`). openraft's own backoff after them waits inside the request
//! stream, which this transport polls only once the call has begun, so it never delayed a connection
//! attempt; streams to a peer that stopped answering wait out a per-peer backoff here instead (see
//! [`super::backoff`]).
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
use openraft::base::{BoxFuture, BoxStream};
use openraft::error::{
    NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{OptionalSend, RPCTypes};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;
use tonic::Streaming;

use super::backoff::PeerHealth;
use super::{PeerChannels, PeerRpc, Purpose, SNAPSHOT_CHUNK_BYTES};
use crate::codec;
use crate::pb::internal::{Payload, SnapshotChunk};
use crate::sync::lock;
use crate::types::{Member, NodeId, Snapshot, SnapshotData, TypeConfig, Vote};

pub struct NetworkFactory {
    pub id: NodeId,
    pub channels: PeerChannels,
    /// Set when a peer's refusal says this node was removed (see `identity::Removal`).
    pub removal: Arc<super::identity::Removal>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerClient {
        self.client(target, node, Purpose::Raft)
    }

    async fn new_snapshot_client(&mut self, target: NodeId, node: &Member) -> PeerClient {
        self.client(target, node, Purpose::Snapshot)
    }
}

impl NetworkFactory {
    fn client(&self, target: NodeId, node: &Member, purpose: Purpose) -> PeerClient {
        let addr = self.channels.route(target, &node.peer_addr);
        let connect = |purpose| {
            self.channels
                .client(addr, purpose)
                .map_err(|e| format!("bad peer address {addr:?} for node {target}: {e}"))
        };
        PeerClient {
            id: self.id,
            target,
            client: connect(purpose),
            streams: connect(Purpose::Replication),
            health: self.channels.health(addr),
            removal: self.removal.clone(),
        }
    }
}

pub struct PeerClient {
    id: NodeId,
    target: NodeId,
    /// An address that cannot even be parsed is reported on every call rather than panicking.
    client: Result<PeerRpc, String>,
    /// Replication streams, on a connection of their own: a follower that stops reading leaves its
    /// stream's data filling the HTTP/2 connection window, which must not stall votes.
    streams: Result<PeerRpc, String>,
    /// Shared with every other client of the same peer (heartbeats, replication, snapshots).
    health: Arc<PeerHealth>,
    removal: Arc<super::identity::Removal>,
}

/// Requests sent and not yet answered on one replication stream. It bounds what a follower that stops
/// reading leaves buffered, and matches the queue openraft keeps on the receiving side.
const MAX_APPENDS_IN_FLIGHT: usize = 64;

impl PeerClient {
    fn client(&self) -> Result<PeerRpc, RPCError<TypeConfig>> {
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
        if status.code() == tonic::Code::PermissionDenied
            && status
                .metadata()
                .contains_key(super::identity::REMOVED_HEADER)
        {
            self.removal.set();
        }
        status_to_error(self.id, self.target, action, ttl, status)
    }

    /// Opens the replication stream; see [`Answers`] for how its answers are read.
    ///
    /// openraft's request generator runs in a pump task, not inside the HTTP/2 body: it holds the
    /// lock openraft's next session for this follower needs, so it must be dropped the moment this
    /// session ends. hyper stops polling a body that waits for flow-control capacity, so ending the
    /// body is not enough; aborting the task is (see [`AbortOnDrop`]).
    async fn open_append_stream<S>(
        &mut self,
        input: S,
        ttl: Duration,
    ) -> Result<Answers, RPCError<TypeConfig>>
    where
        S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        let sent = Arc::new(Mutex::new(VecDeque::new()));
        let in_flight = Arc::new(Semaphore::new(MAX_APPENDS_IN_FLIGHT));
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let pump = AbortOnDrop(tokio::spawn(pump(
            input,
            tx,
            sent.clone(),
            in_flight.clone(),
        )));
        let mut client = self
            .streams
            .clone()
            .map_err(|e| RPCError::Unreachable(Unreachable::from_string(e)))?;
        let request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let opened = tokio::time::timeout(ttl, client.stream_append(request))
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
            Err(status) => return Err(self.status_to_error(RPCTypes::AppendEntries, ttl, status)),
        };
        Ok(Answers {
            inbound,
            sent,
            in_flight,
            ttl,
            id: self.id,
            target: self.target,
            pump,
            done: false,
            health: self.health.clone(),
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
        F: FnOnce(PeerRpc, tonic::Request<Payload>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Payload>, tonic::Status>>,
    {
        let data = codec::encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(Payload { data });
        let ttl = option.hard_ttl();
        request.set_timeout(ttl);
        let response = call(self.client()?, request).await.map_err(|s| {
            // Streams count theirs in `PeerHealth::failed`; unary calls (votes) are counted here.
            metrics::counter!(crate::telemetry::names::PEER_SENT_FAILURES, "to" => self.target.to_string())
                .increment(1);
            self.status_to_error(action, ttl, s)
        })?;
        self.health.succeeded(self.target);
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

/// Moves openraft's requests onto the wire, at most [`MAX_APPENDS_IN_FLIGHT`] unanswered at a time, noting
/// when each was handed over so its answer can be timed.
async fn pump<S>(
    mut input: S,
    wire: tokio::sync::mpsc::Sender<Payload>,
    sent: Arc<Mutex<VecDeque<Instant>>>,
    in_flight: Arc<Semaphore>,
) where
    S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + Unpin,
{
    while let Some(rpc) = input.next().await {
        let data = match codec::encode(&rpc) {
            Ok(data) => data,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode an AppendEntries request; ending the replication stream");
                return;
            }
        };
        // Returned by `Answers` as each answer arrives.
        match in_flight.acquire().await {
            Ok(permit) => permit.forget(),
            Err(_) => return,
        }
        lock(&sent).push_back(Instant::now());
        if wire.send(Payload { data }).await.is_err() {
            return;
        }
    }
}

/// One try at opening a stream to a peer. Dropped unsettled, it counts as a failure: that is how a
/// heartbeat whose caller gave up waiting (a paused peer never answers) is counted.
struct Attempt {
    health: Arc<PeerHealth>,
    target: NodeId,
    settled: bool,
}

impl Attempt {
    fn succeeded(mut self) {
        self.settled = true;
        self.health.succeeded(self.target);
    }

    fn failed(mut self, error: &RPCError<TypeConfig>) {
        self.settled = true;
        self.health.failed(self.target, error);
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.settled {
            self.health
                .failed(self.target, &"no answer before the caller gave up");
        }
    }
}

/// Aborts the pump when the answers are dropped, whatever state the HTTP/2 stream is in.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The follower's answers, one per request and in order. When requests are outstanding and no answer
/// at all comes for a whole ttl, the stream ends with a timeout, as a unary call would have: HTTP/2
/// keepalive alone would take seconds to notice a paused follower, and openraft waits on this stream
/// without a limit. Answers that keep coming, however slowly, mean the follower is alive and working
/// through its queue, so they never time out.
struct Answers {
    inbound: Streaming<Payload>,
    /// When each unanswered request was sent, oldest first.
    sent: Arc<Mutex<VecDeque<Instant>>>,
    in_flight: Arc<Semaphore>,
    ttl: Duration,
    id: NodeId,
    target: NodeId,
    pump: AbortOnDrop,
    done: bool,
    health: Arc<PeerHealth>,
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
                if let Some(sent) = lock(&self.sent).pop_front() {
                    metrics::histogram!(crate::telemetry::names::PEER_RTT, "to" => self.target.to_string())
                        .record(sent.elapsed().as_secs_f64());
                }
                self.in_flight.add_permits(1);
                self.health.succeeded(self.target);
                match codec::decode::<StreamAppendResult<TypeConfig>>(&payload.data) {
                    Ok(answer) => Some((Ok(answer), self)),
                    Err(e) => self.last(Err(RPCError::Network(NetworkError::new(&e)))),
                }
            }
            Ok(None) => {
                // The follower answers every request unless it ends the stream early; requests
                // left unanswered must not pass for a clean end.
                let unanswered = lock(&self.sent).len();
                if unanswered == 0 {
                    return None;
                }
                let reason =
                    format!("replication stream ended with {unanswered} requests unanswered");
                self.last(Err(RPCError::Network(NetworkError::new(
                    &std::io::Error::other(reason),
                ))))
            }
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
        if let Err(e) = &answer {
            self.health.failed(self.target, e);
        }
        self.done = true;
        self.pump.0.abort();
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
        Box::pin(async move {
            // Also how heartbeats to a dead peer are kept cheap: openraft's heartbeat worker gives
            // up after one interval, usually while it is still waiting here.
            let wait = self.health.wait();
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            let attempt = Attempt {
                health: self.health.clone(),
                target: self.target,
                settled: false,
            };
            let opened = self.open_append_stream(input, option.soft_ttl()).await;
            match &opened {
                Ok(_) => attempt.succeeded(),
                Err(e) => attempt.failed(e),
            }
            let answers = opened?;
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
        let len = snapshot.snapshot.len;
        let file = tokio::fs::File::from_std(snapshot.snapshot.file);
        // Read from the file as tonic sends: one chunk in memory at a time. A read error ends the
        // stream early; the receiver then refuses the cut file, and openraft retries.
        let first = SnapshotChunk {
            header,
            data: Vec::new(),
        };
        let rest = futures::stream::unfold(Some(file), |file| async move {
            let mut file = file?;
            let mut data = vec![0u8; SNAPSHOT_CHUNK_BYTES];
            let mut filled = 0;
            while filled < data.len() {
                match file.read(&mut data[filled..]).await {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the snapshot file to send");
                        return None;
                    }
                }
            }
            if filled == 0 {
                return None;
            }
            data.truncate(filled);
            Some((
                SnapshotChunk {
                    header: Vec::new(),
                    data,
                },
                Some(file),
            ))
        });
        let mut request = tonic::Request::new(futures::stream::once(async { first }).chain(rest));
        // Sized for the transfer, not for a heartbeat: a second per 8 MiB on top of openraft's budget,
        // a rate any link between nodes exceeds.
        let ttl =
            option.hard_ttl().max(Duration::from_secs(10)) + Duration::from_secs(len / (8 << 20));
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
