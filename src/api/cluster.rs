//! `raftkv.v1.Cluster`: what an operator needs to see at a glance, and the membership changes they
//! make (see `node::membership` for the rules).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::status;
use crate::node::membership::{Change, MemberInfo};
use crate::node::{Error, Node};
use crate::pb::v1 as pb;
use crate::pb::v1::cluster_server::Cluster;
use crate::types::Member;

pub struct ClusterService {
    pub node: Arc<Node>,
}

fn member(id: u64, m: Member, learner: bool) -> pb::Member {
    pb::Member {
        id,
        address: m.addr,
        learner,
        matched_index: 0,
        peer_address: m.peer_addr,
    }
}

fn members(list: Vec<MemberInfo>) -> Vec<pb::Member> {
    list.into_iter()
        .map(|m| pb::Member {
            matched_index: m.matched_index,
            ..member(m.id, m.member, m.learner)
        })
        .collect()
}

impl ClusterService {
    /// Runs a membership change through the leader, answering with the header and members after it.
    async fn change<T>(
        &self,
        request: &Request<T>,
        change: Change,
    ) -> Result<(pb::ResponseHeader, Vec<pb::Member>), Status> {
        let result = async {
            let _in_flight = self.node.admit_request()?;
            let deadline = self
                .node
                .deadline(crate::grpc::timeout_of(request.metadata()));
            self.node.change_membership(change, deadline).await
        }
        .await;
        let list = result.map_err(|e: Error| status::of(self.node.id(), e))?;
        Ok((super::kv::header(self.node.header(None)), members(list)))
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let s = self.node.status();
        let list = |of: Vec<(u64, Member)>, learner| {
            of.into_iter()
                .map(|(id, m)| member(id, m, learner))
                .collect()
        };
        let role = if self.node.removed() {
            "removed"
        } else {
            s.role
        };
        Ok(Response::new(pb::StatusResponse {
            header: Some(super::kv::header(s.header)),
            id: s.header.node_id,
            role: role.to_string(),
            term: s.header.term,
            leader_id: s.header.leader_id,
            commit_index: s.commit_index,
            applied_index: s.applied_index,
            voters: list(s.voters, false),
            learners: list(s.learners, true),
            leader_address: s.leader_addr.unwrap_or_default(),
            last_log_index: s.last_log_index,
            snapshot_index: s.snapshot_index,
            first_log_index: s.first_log_index,
            cluster_id: s.cluster.to_string(),
        }))
    }

    async fn member_list(
        &self,
        _request: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        self.node
            .check_member()
            .map_err(|e| status::of(self.node.id(), e))?;
        Ok(Response::new(pb::MemberListResponse {
            header: Some(super::kv::header(self.node.header(None))),
            members: members(self.node.members()),
        }))
    }

    async fn member_add(
        &self,
        request: Request<pb::MemberAddRequest>,
    ) -> Result<Response<pb::MemberAddResponse>, Status> {
        let r = request.get_ref();
        let peer_addr = if r.peer_address.is_empty() {
            r.address.clone()
        } else {
            r.peer_address.clone()
        };
        let change = Change::Add {
            id: r.id,
            member: Member::new(r.address.clone(), peer_addr),
            learner: r.learner,
        };
        let (header, members) = self.change(&request, change).await?;
        Ok(Response::new(pb::MemberAddResponse {
            header: Some(header),
            members,
        }))
    }

    async fn member_promote(
        &self,
        request: Request<pb::MemberPromoteRequest>,
    ) -> Result<Response<pb::MemberPromoteResponse>, Status> {
        let change = Change::Promote {
            id: request.get_ref().id,
        };
        let (header, members) = self.change(&request, change).await?;
        Ok(Response::new(pb::MemberPromoteResponse {
            header: Some(header),
            members,
        }))
    }

    async fn member_remove(
        &self,
        request: Request<pb::MemberRemoveRequest>,
    ) -> Result<Response<pb::MemberRemoveResponse>, Status> {
        let change = Change::Remove {
            id: request.get_ref().id,
        };
        let (header, members) = self.change(&request, change).await?;
        Ok(Response::new(pb::MemberRemoveResponse {
            header: Some(header),
            members,
        }))
    }

    async fn move_leader(
        &self,
        request: Request<pb::MoveLeaderRequest>,
    ) -> Result<Response<pb::MoveLeaderResponse>, Status> {
        let change = Change::MoveLeader {
            to: request.get_ref().target_id,
        };
        let (header, _) = self.change(&request, change).await?;
        Ok(Response::new(pb::MoveLeaderResponse {
            header: Some(header),
        }))
    }
}
