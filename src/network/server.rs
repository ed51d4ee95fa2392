//! Answers peers: Raft protocol messages, snapshot transfers, and the two requests followers make on
//! behalf of clients (forwarded writes and read-index).

use std::io::Cursor;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use openraft::raft::AppendEntriesRequest;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status, Streaming};

use crate::codec;
use crate::node::Node;
use crate::pb::internal::raft_server::Raft as RaftRpc;
use crate::pb::internal::{
    Payload, ProposeBatchRequest, ProposeBatchResponse, ReadIndexRequest, ReadIndexResponse,
    SnapshotChunk,
};
use crate::types::{Command, Snapshot, SnapshotMeta, TypeConfig, Vote};

pub struct RaftService {
    pub node: Arc<Node>,
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
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(&self, request: Request<Payload>) -> Result<Response<Payload>, Status> {
        let rpc = decode(request.get_ref())?;
        let resp = self.node.raft.append_entries(rpc).await.map_err(stopped)?;
        reply(&resp)
    }

    type StreamAppendStream = Pin<Box<dyn Stream<Item = Result<Payload, Status>> + Send>>;

    /// Hands the leader's requests to openraft as they arrive, so this node appends a request while
    /// earlier ones still wait for their flush, and answers each in order. A message that does not
    /// decode ends the stream with INVALID_ARGUMENT after the answers already due; a broken transport
    /// just ends it. Either way the leader starts a new stream from what this node acknowledged.
    async fn stream_append(
        &self,
        request: Request<Streaming<Payload>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        let undecodable = Arc::new(std::sync::Mutex::new(None));
        let noted = undecodable.clone();
        let requests = request.into_inner().scan((), move |_, message| {
            let rpc = match message {
                Ok(payload) => {
                    match codec::decode::<AppendEntriesRequest<TypeConfig>>(&payload.data) {
                        Ok(rpc) => Some(rpc),
                        Err(e) => {
                            let reason = format!("undecodable peer message: {e}");
                            *noted.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
                            None
                        }
                    }
                }
                Err(status) => {
                    tracing::debug!(%status, "replication stream from the leader broke");
                    None
                }
            };
            futures::future::ready(rpc)
        });
        let answers = self.node.raft.stream_append(requests).map(|answer| {
            let result = answer.map_err(stopped)?;
            let data = codec::encode(&result).map_err(|e| Status::internal(e.to_string()))?;
            Ok(Payload { data })
        });
        let refusal = futures::stream::once(async move {
            let reason = undecodable.lock().unwrap_or_else(|p| p.into_inner()).take();
            reason.map(|reason| {
                tracing::warn!(%reason, "ending a replication stream");
                Err(Status::invalid_argument(reason))
            })
        })
        .filter_map(futures::future::ready);
        Ok(Response::new(Box::pin(answers.chain(refusal))))
    }

    async fn vote(&self, request: Request<Payload>) -> Result<Response<Payload>, Status> {
        let rpc = decode(request.get_ref())?;
        if let Some(left) = self.node.vote_held() {
            return self.refuse_held_vote(left).await;
        }
        let resp = self.node.raft.vote(rpc).await.map_err(stopped)?;
        reply(&resp)
    }

    async fn pre_vote(&self, request: Request<Payload>) -> Result<Response<Payload>, Status> {
        let rpc = decode(request.get_ref())?;
        if let Some(left) = self.node.vote_held() {
            return self.refuse_held_vote(left).await;
        }
        let resp = self.node.raft.pre_vote(rpc).await.map_err(stopped)?;
        reply(&resp)
    }

    async fn transfer_leader(
        &self,
        request: Request<Payload>,
    ) -> Result<Response<Payload>, Status> {
        let rpc = decode(request.get_ref())?;
        let resp = self
            .node
            .raft
            .handle_transfer_leader(rpc)
            .await
            .map_err(stopped)?;
        reply(&resp)
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<Payload>, Status> {
        let mut stream = request.into_inner();
        let first = stream
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
        let (vote, meta): (Vote, SnapshotMeta) = codec::decode(&first.header)
            .map_err(|e| Status::invalid_argument(format!("undecodable snapshot header: {e}")))?;
        let mut data = first.data;
        while let Some(chunk) = stream.next().await {
            data.extend_from_slice(&chunk?.data);
        }
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
        _request: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
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

    async fn propose(&self, request: Request<Payload>) -> Result<Response<Payload>, Status> {
        let deadline = self
            .node
            .deadline(crate::api::grpc_timeout(request.metadata()));
        let cmd: Command = decode(request.get_ref())?;
        let applied = self
            .node
            .write(cmd, deadline, false)
            .await
            .map_err(|e| e.into_status(self.node.id))?;
        reply(&applied)
    }

    async fn propose_batch(
        &self,
        request: Request<ProposeBatchRequest>,
    ) -> Result<Response<ProposeBatchResponse>, Status> {
        let node = &self.node;
        // Proposed concurrently, as if each had arrived on its own call; each keeps its own deadline.
        let outcomes = futures::future::join_all(request.into_inner().writes.into_iter().map(
            |w| async move {
                let deadline = node.deadline(Some(Duration::from_millis(w.timeout_ms)));
                let result = match codec::decode::<Command>(&w.command) {
                    Err(e) => Err(Status::invalid_argument(format!(
                        "undecodable forwarded write: {e}"
                    ))),
                    Ok(cmd) => node
                        .write(cmd, deadline, false)
                        .await
                        .map_err(|e| e.into_status(node.id)),
                };
                crate::forward::to_outcome(result)
            },
        ))
        .await;
        Ok(Response::new(ProposeBatchResponse { outcomes }))
    }
}
