//! `raftkv.v1.Cluster`: what an operator needs to see at a glance.

use std::sync::Arc;

use openraft::async_runtime::watch::WatchReceiver;
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
        let header = self.node.header(None);
        let role = self.node.role().to_string();
        let metrics = self.node.raft.metrics();
        let m = metrics.borrow_watched();
        let membership = m.membership_config.membership();
        let voters = membership
            .voter_ids()
            .map(|id| {
                let member = membership.get_node(&id).cloned().unwrap_or_default();
                pb::Member {
                    id,
                    address: member.addr,
                    peer_address: member.peer_addr,
                }
            })
            .collect();
        let leader_address = m
            .current_leader
            .and_then(|l| membership.get_node(&l))
            .map(|n| n.addr.clone())
            .unwrap_or_default();
        Ok(Response::new(pb::StatusResponse {
            header: Some(header),
            id: self.node.id,
            role,
            term: m.current_term,
            leader_id: m.current_leader.unwrap_or(0),
            commit_index: m
                .cluster_committed
                .as_ref()
                .or(m.local_committed.as_ref())
                .map_or(0, |l| l.index),
            applied_index: m.last_applied.as_ref().map_or(0, |l| l.index),
            voters,
            leader_address,
            last_log_index: m.last_log_index.unwrap_or(0),
            snapshot_index: m.snapshot.as_ref().map_or(0, |l| l.index),
            first_log_index: m.purged.as_ref().map_or(0, |l| l.index + 1),
            cluster_id: self.node.cluster.to_string(),
        }))
    }
}
