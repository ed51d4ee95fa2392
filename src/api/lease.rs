//! `raftkv.v1.Lease`: grants and revokes go through the log like any write; keep-alives and
//! remaining times are answered by the leader's clock (see `node::lease`), forwarded there from any
//! other node.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::kv::header;
use super::status;
use crate::node::{Error, Node};
use crate::pb::v1 as pb;
use crate::pb::v1::lease_server::Lease;
use crate::types::{Command, CommandResponse, LeaseOp, LeaseResponse};

/// What one listed id or key costs in a response beyond its bytes (a tag and a length, or a
/// varint id), rounded up.
const PER_ITEM_BYTES: usize = 11;
/// Keep-alive responses a stream buffers before it stops reading requests.
const STREAM_BUFFER: usize = 4;

pub struct LeaseService {
    pub node: Arc<Node>,
}

fn not_found(id: u64) -> Error {
    Error::NotFound(format!(
        "lease {id} not found (never granted, revoked or expired)"
    ))
}

impl LeaseService {
    fn header(&self, revision: Option<u64>) -> Option<pb::ResponseHeader> {
        Some(header(self.node.header(revision)))
    }

    async fn grant(
        &self,
        req: pb::LeaseGrantRequest,
        deadline: Instant,
    ) -> Result<pb::LeaseGrantResponse, Error> {
        let _in_flight = self.node.admit_request()?;
        let settings = *self.node.lease_settings();
        let max = settings.max_ttl.as_millis() as u64;
        if req.ttl_ms == 0 || req.ttl_ms > max {
            return Err(Error::Invalid(format!(
                "ttl_ms must be between 1 and {max} (--max-lease-ttl-ms), not {}",
                req.ttl_ms
            )));
        }
        // Not exact under concurrent grants: a bound on memory, not a rule every replica applies.
        if self.node.leases().len() >= settings.max_leases {
            return Err(Error::Exhausted(format!(
                "{} leases exist (--max-leases); revoke some or let them expire",
                settings.max_leases
            )));
        }
        let ttl_ms = req.ttl_ms.max(settings.min_ttl.as_millis() as u64);
        let cmd = Command::Lease(LeaseOp::Grant { id: req.id, ttl_ms });
        let applied = self.node.write(cmd, deadline).await?;
        match applied.response {
            CommandResponse::Lease(LeaseResponse::Granted { id, ttl_ms }) => {
                Ok(pb::LeaseGrantResponse {
                    header: self.header(Some(applied.revision)),
                    id,
                    ttl_ms,
                })
            }
            other => Err(Error::Internal(format!(
                "unexpected grant result {other:?}"
            ))),
        }
    }

    async fn revoke(
        &self,
        req: pb::LeaseRevokeRequest,
        deadline: Instant,
    ) -> Result<pb::LeaseRevokeResponse, Error> {
        let _in_flight = self.node.admit_request()?;
        if req.id == 0 {
            return Err(not_found(0));
        }
        let cmd = Command::Lease(LeaseOp::Revoke { id: req.id });
        let applied = self.node.write(cmd, deadline).await?;
        match applied.response {
            CommandResponse::Lease(LeaseResponse::Revoked) => Ok(pb::LeaseRevokeResponse {
                header: self.header(Some(applied.revision)),
            }),
            other => Err(Error::Internal(format!(
                "unexpected revoke result {other:?}"
            ))),
        }
    }

    /// One keep-alive: the TTL the lease now has, 0 for one that does not exist.
    async fn keep_alive(
        node: &Node,
        id: u64,
        deadline: Instant,
    ) -> Result<pb::LeaseKeepAliveResponse, Error> {
        let _in_flight = node.admit_request()?;
        let ttl = if id == 0 {
            None
        } else {
            node.lease_time(id, true, deadline).await?
        };
        Ok(pb::LeaseKeepAliveResponse {
            header: Some(header(node.header(None))),
            id,
            ttl_ms: ttl.map_or(0, |t| t.as_millis() as u64),
        })
    }

    async fn time_to_live(
        &self,
        req: pb::LeaseTimeToLiveRequest,
        deadline: Instant,
    ) -> Result<pb::LeaseTimeToLiveResponse, Error> {
        let _in_flight = self.node.admit_request()?;
        // The keys and granted TTL as of now, from this replica once it has caught up.
        self.node.linearize(deadline).await?;
        let header = self.header(None);
        let table = self.node.leases();
        let lease = table.get(&req.id).ok_or_else(|| not_found(req.id))?;
        // Measured before anything is copied: a lease may hold many keys.
        let max = self.node.limits().max_response_bytes;
        let keys_bytes: usize = if req.keys {
            lease.keys.iter().map(|k| k.len() + PER_ITEM_BYTES).sum()
        } else {
            0
        };
        if keys_bytes > max {
            return Err(Error::Exhausted(format!(
                "lease {} holds {} keys ({keys_bytes} bytes), more than --max-response-bytes {max}; \
                 ask without keys",
                req.id,
                lease.keys.len()
            )));
        }
        let keys: Vec<Vec<u8>> = if req.keys {
            lease.keys.iter().cloned().collect()
        } else {
            Vec::new()
        };
        let granted_ttl_ms = lease.record.granted_ms;
        drop(table);
        let left = self
            .node
            .lease_time(req.id, false, deadline)
            .await?
            .ok_or_else(|| not_found(req.id))?;
        Ok(pb::LeaseTimeToLiveResponse {
            header,
            id: req.id,
            ttl_ms: left.as_millis() as u64,
            granted_ttl_ms,
            keys,
        })
    }

    async fn leases(&self, deadline: Instant) -> Result<pb::LeaseLeasesResponse, Error> {
        let _in_flight = self.node.admit_request()?;
        self.node.linearize(deadline).await?;
        let header = self.header(None);
        let table = self.node.leases();
        let max = self.node.limits().max_response_bytes;
        if table.len().saturating_mul(PER_ITEM_BYTES) > max {
            return Err(Error::Exhausted(format!(
                "{} leases would pass --max-response-bytes {max}",
                table.len()
            )));
        }
        let ids = table.keys().copied().collect();
        Ok(pb::LeaseLeasesResponse { header, ids })
    }
}

type KeepAliveStream =
    Pin<Box<dyn Stream<Item = Result<pb::LeaseKeepAliveResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn grant(
        &self,
        request: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        let deadline = super::deadline(&self.node, &request);
        status::reply(
            &self.node,
            LeaseService::grant(self, request.into_inner(), deadline).await,
        )
    }

    async fn revoke(
        &self,
        request: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let deadline = super::deadline(&self.node, &request);
        status::reply(
            &self.node,
            LeaseService::revoke(self, request.into_inner(), deadline).await,
        )
    }

    type KeepAliveStream = KeepAliveStream;

    /// One task per stream answers its requests in order, one at a time; a request arriving while
    /// the last is answered waits in the stream (HTTP/2 flow control bounds it). Each keep-alive gets
    /// the node's request timeout. The stream ends with the client's, or with UNAVAILABLE when the
    /// node stops.
    async fn keep_alive(
        &self,
        request: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let node = self.node.clone();
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let stopping = node.stopping();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = requests.next() => next,
                    _ = stopping.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("the node is stopping"))).await;
                        return;
                    }
                };
                let req = match next {
                    None => return,
                    Some(Err(_)) => return,
                    Some(Ok(req)) => req,
                };
                let deadline = node.deadline(None);
                let reply = LeaseService::keep_alive(&node, req.id, deadline)
                    .await
                    .map_err(|e| status::of(node.id(), e));
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn keep_alive_once(
        &self,
        request: Request<pb::LeaseKeepAliveRequest>,
    ) -> Result<Response<pb::LeaseKeepAliveResponse>, Status> {
        let deadline = super::deadline(&self.node, &request);
        let id = request.into_inner().id;
        let result = LeaseService::keep_alive(&self.node, id, deadline)
            .await
            .and_then(|r| {
                if r.ttl_ms == 0 {
                    Err(not_found(id))
                } else {
                    Ok(r)
                }
            });
        status::reply(&self.node, result)
    }

    async fn time_to_live(
        &self,
        request: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        let deadline = super::deadline(&self.node, &request);
        status::reply(
            &self.node,
            LeaseService::time_to_live(self, request.into_inner(), deadline).await,
        )
    }

    async fn leases(
        &self,
        request: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        let deadline = super::deadline(&self.node, &request);
        status::reply(&self.node, LeaseService::leases(self, deadline).await)
    }
}
