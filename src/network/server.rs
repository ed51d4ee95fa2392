//! Answers peers: Raft protocol messages, snapshot transfers, and the two requests followers make on
//! behalf of clients (forwarded writes and read-index).

use std::io::Cursor;
use std::sync::Arc;

use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status, Streaming};

use crate::codec;
use crate::node::Node;
use crate::pb::internal::raft_server::Raft as RaftRpc;
use crate::pb::internal::{Payload, ReadIndexRequest, ReadIndexResponse, SnapshotChunk};
use crate::types::{Command, Snapshot, SnapshotMeta, Vote};

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

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(&self, request: Request<Payload>) -> Result<Response<Payload>, Status> {
        let rpc = decode(request.get_ref())?;
        let resp = self.node.raft.append_entries(rpc).await.map_err(stopped)?;
        reply(&resp)
    }

    async fn vote(&self, request: Request<Payload>) -> Result<Response<Payload>, Status> {
        let rpc = decode(request.get_ref())?;
        let resp = self.node.raft.vote(rpc).await.map_err(stopped)?;
        reply(&resp)
    }

    async fn pre_vote(&self, request: Request<Payload>) -> Result<Response<Payload>, Status> {
        let rpc = decode(request.get_ref())?;
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
}
