//! `raftkv.v1.Cluster`: what an operator needs to see at a glance.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::node::Node;
use crate::pb::v1 as pb;
use crate::pb::v1::cluster_server::Cluster;

pub struct ClusterService {
    pub node: Arc<Node>,
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let s = self.node.status();
        let voters = s
            .voters
            .into_iter()
            .map(|(id, member)| pb::Member {
                id,
                address: member.addr,
                peer_address: member.peer_addr,
            })
            .collect();
        Ok(Response::new(pb::StatusResponse {
            header: Some(super::kv::header(s.header)),
            id: s.header.node_id,
            role: s.role.to_string(),
            term: s.header.term,
            leader_id: s.header.leader_id,
            commit_index: s.commit_index,
            applied_index: s.applied_index,
            voters,
            leader_address: s.leader_addr.unwrap_or_default(),
            last_log_index: s.last_log_index,
            snapshot_index: s.snapshot_index,
            first_log_index: s.first_log_index,
            cluster_id: s.cluster.to_string(),
        }))
    }
}
