//! openraft's network: how this node calls its peers.
//!
//! Messages are openraft's own types, bincode-encoded in a protobuf `bytes` field (see
//! `proto/raftkv/internal/v1/raft.proto` for why). Transport failures map to openraft's error kinds so it
//! backs off from dead peers (`Unreachable`) but retries at once after a lost packet (`Network`).

use std::future::Future;
use std::time::Duration;

use openraft::error::{
    NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, RPCTypes};
use serde::Serialize;
use serde::de::DeserializeOwned;
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
        match status.code() {
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => RPCError::Timeout(Timeout {
                action,
                id: self.id,
                target: self.target,
                timeout: ttl,
            }),
            tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&status)),
            _ => RPCError::Network(NetworkError::new(&status)),
        }
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

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotData;

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
