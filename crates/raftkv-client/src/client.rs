//! A leader-aware client for the CLI, the benchmark, the fault tests and Rust programs.
//!
//! Any node accepts any request, so the client does not need the leader to be correct; it prefers the
//! leader to save the forwarding hop. A request that fails with `UNAVAILABLE` was not applied, so it is
//! retried on the hinted leader or the next node until the deadline. Any other failure is returned as is:
//! retrying a write whose fate is unknown could apply it twice.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tonic::transport::{Channel, ClientTlsConfig};

use crate::pb::v1 as pb;
use crate::pb::v1::cluster_client::ClusterClient;
use crate::pb::v1::kv_client::KvClient;
use crate::pb::v1::lease_client::LeaseClient;
use crate::pb::v1::maintenance_client::MaintenanceClient;
use crate::{LEADER_ADDR_HEADER, NODE_ID_HEADER, endpoint};

/// The least time left worth another attempt after a refusal: a node answers a little before the
/// deadline it is given (see `Node::deadline`), and needs a round trip and a moment's work to do so.
const MIN_ATTEMPT: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no endpoints given")]
    NoEndpoints,
    #[error("endpoint {addr}: {source}")]
    Endpoint {
        addr: String,
        source: tonic::transport::Error,
    },
}

pub struct Client {
    nodes: Mutex<Vec<(String, Channel)>>,
    preferred: AtomicUsize,
    timeout: Duration,
    /// Also for the leaders that hints point to: every node is dialed the same way.
    tls: Option<ClientTlsConfig>,
}

impl Client {
    pub fn new(endpoints: &[String], timeout: Duration) -> Result<Self, ClientError> {
        Self::with_tls(endpoints, timeout, None)
    }

    /// A client that dials every node over TLS when `tls` is set.
    pub fn with_tls(
        endpoints: &[String],
        timeout: Duration,
        tls: Option<ClientTlsConfig>,
    ) -> Result<Self, ClientError> {
        if endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        let nodes = endpoints
            .iter()
            .map(|addr| match endpoint(addr, tls.as_ref()) {
                Ok(e) => Ok((addr.clone(), e.connect_lazy())),
                Err(source) => Err(ClientError::Endpoint {
                    addr: addr.clone(),
                    source,
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            nodes: Mutex::new(nodes),
            preferred: AtomicUsize::new(0),
            timeout,
            tls,
        })
    }

    fn nodes(&self) -> std::sync::MutexGuard<'_, Vec<(String, Channel)>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every node's channel, and the index of the one to try first (the leader, when known).
    pub(crate) fn channels(&self) -> (usize, Vec<Channel>) {
        let nodes = self.nodes();
        let preferred = self.preferred.load(Ordering::Relaxed) % nodes.len();
        (preferred, nodes.iter().map(|(_, c)| c.clone()).collect())
    }

    fn pick(&self, attempt: usize) -> (usize, Channel) {
        let nodes = self.nodes();
        let i = (self.preferred.load(Ordering::Relaxed) + attempt) % nodes.len();
        (i, nodes[i].1.clone())
    }

    /// Points the client at the hinted leader, adding it if it was not among the endpoints.
    fn follow_hint(&self, status: &tonic::Status) -> bool {
        let Some(addr) = status
            .metadata()
            .get(LEADER_ADDR_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
        else {
            return false;
        };
        let mut nodes = self.nodes();
        let i = match nodes.iter().position(|(a, _)| *a == addr) {
            Some(i) => i,
            None => match endpoint(&addr, self.tls.as_ref()) {
                Ok(e) => {
                    nodes.push((addr, e.connect_lazy()));
                    nodes.len() - 1
                }
                Err(_) => return false,
            },
        };
        self.preferred.store(i, Ordering::Relaxed);
        true
    }

    async fn call<T, F, Fut>(&self, f: F) -> Result<T, tonic::Status>
    where
        F: Fn(KvClient<Channel>, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        self.call_on(|channel, t| f(KvClient::new(channel), t))
            .await
    }

    pub(crate) async fn call_lease<T, F, Fut>(&self, f: F) -> Result<T, tonic::Status>
    where
        F: Fn(LeaseClient<Channel>, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        self.call_on(|channel, t| f(LeaseClient::new(channel), t))
            .await
    }

    async fn call_cluster<T, F, Fut>(&self, f: F) -> Result<T, tonic::Status>
    where
        F: Fn(ClusterClient<Channel>, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        self.call_on(|channel, t| f(ClusterClient::new(channel), t))
            .await
    }

    /// One call, retried on the hinted leader or the next node while it certainly was not acted on.
    async fn call_on<T, F, Fut>(&self, f: F) -> Result<T, tonic::Status>
    where
        F: Fn(Channel, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = Instant::now() + self.timeout;
        let mut attempt = 0;
        // The most telling refusal so far: a node's own answer (it says why: no quorum, no leader)
        // outranks a transport's connect error.
        let mut refused: Option<tonic::Status> = None;
        loop {
            let (i, channel) = self.pick(attempt);
            let remaining = deadline.saturating_duration_since(Instant::now());
            let last = match f(channel, remaining).await {
                Ok(v) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(s) if crate::certainly_not_proposed(&s) => s,
                Err(s) => return Err(own_timeout_is_deadline_exceeded(s)),
            };
            if self.follow_hint(&last) {
                attempt = 0;
            } else {
                attempt += 1;
            }
            let own = |s: &tonic::Status| s.metadata().contains_key(NODE_ID_HEADER);
            let best = match refused.take() {
                Some(earlier) if own(&earlier) && !own(&last) => earlier,
                _ => last,
            };
            let backoff = Duration::from_millis(20 * attempt.min(10) as u64);
            tokio::time::sleep_until((Instant::now() + backoff).min(deadline)).await;
            // An attempt with less time than this left could only end in this client's own timeout,
            // which says less than the refusal in hand, and for a write would turn "not applied"
            // into "unknown".
            if deadline.saturating_duration_since(Instant::now()) < MIN_ATTEMPT {
                return Err(best);
            }
            refused = Some(best);
        }
    }

    pub async fn put(
        &self,
        key: Vec<u8>,
        value: Vec<u8>,
        prev_kv: bool,
    ) -> Result<pb::PutResponse, tonic::Status> {
        self.put_request(pb::PutRequest {
            key,
            value,
            prev_kv,
            lease: 0,
        })
        .await
    }

    /// A put with every field of the request, such as `lease`.
    pub async fn put_request(&self, req: pb::PutRequest) -> Result<pb::PutResponse, tonic::Status> {
        self.call(|mut c, t| {
            let r = with_timeout(req.clone(), t);
            async move { c.put(r).await.map(|r| r.into_inner()) }
        })
        .await
    }

    pub async fn get(
        &self,
        key: Vec<u8>,
        consistency: pb::Consistency,
        min_revision: u64,
    ) -> Result<pb::GetResponse, tonic::Status> {
        let req = pb::GetRequest {
            key,
            consistency: consistency as i32,
            min_revision,
        };
        self.call(|mut c, t| {
            let r = with_timeout(req.clone(), t);
            async move { c.get(r).await.map(|r| r.into_inner()) }
        })
        .await
    }

    pub async fn delete(
        &self,
        key: Vec<u8>,
        prev_kv: bool,
    ) -> Result<pb::DeleteResponse, tonic::Status> {
        let req = pb::DeleteRequest { key, prev_kv };
        self.call(|mut c, t| {
            let r = with_timeout(req.clone(), t);
            async move { c.delete(r).await.map(|r| r.into_inner()) }
        })
        .await
    }

    pub async fn scan(&self, req: pb::ScanRequest) -> Result<pb::ScanResponse, tonic::Status> {
        self.call(|mut c, t| {
            let r = with_timeout(req.clone(), t);
            async move { c.scan(r).await.map(|r| r.into_inner()) }
        })
        .await
    }

    pub async fn txn(&self, req: pb::TxnRequest) -> Result<pb::TxnResponse, tonic::Status> {
        self.call(|mut c, t| {
            let r = with_timeout(req.clone(), t);
            async move { c.txn(r).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// The members, as the first node that answers knows them (matched indexes only from the leader).
    pub async fn member_list(&self) -> Result<pb::MemberListResponse, tonic::Status> {
        self.call_cluster(|mut c, t| {
            let r = with_timeout(pb::MemberListRequest {}, t);
            async move { c.member_list(r).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Adds a member (`learner: false`: waits for it to catch up and promotes it). `peer_address`
    /// empty: the same as `address`.
    pub async fn member_add(
        &self,
        req: pb::MemberAddRequest,
    ) -> Result<pb::MemberAddResponse, tonic::Status> {
        self.call_cluster(|mut c, t| {
            let r = with_timeout(req.clone(), t);
            async move { c.member_add(r).await.map(|r| r.into_inner()) }
        })
        .await
    }

    pub async fn member_promote(
        &self,
        id: u64,
    ) -> Result<pb::MemberPromoteResponse, tonic::Status> {
        self.call_cluster(|mut c, t| {
            let r = with_timeout(pb::MemberPromoteRequest { id }, t);
            async move { c.member_promote(r).await.map(|r| r.into_inner()) }
        })
        .await
    }

    pub async fn member_remove(&self, id: u64) -> Result<pb::MemberRemoveResponse, tonic::Status> {
        self.call_cluster(|mut c, t| {
            let r = with_timeout(pb::MemberRemoveRequest { id }, t);
            async move { c.member_remove(r).await.map(|r| r.into_inner()) }
        })
        .await
    }

    pub async fn move_leader(
        &self,
        target_id: u64,
    ) -> Result<pb::MoveLeaderResponse, tonic::Status> {
        self.call_cluster(|mut c, t| {
            let r = with_timeout(pb::MoveLeaderRequest { target_id }, t);
            async move { c.move_leader(r).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Starts a backup stream from the first node that takes it (any node serves one). No deadline
    /// travels with the call: the node bounds its read index by its own request timeout, but writing
    /// the image takes as long as the state is large, and a gRPC deadline would cut it (and the
    /// stream after it). A dead node is noticed by the connection's keepalive instead.
    pub async fn snapshot(&self) -> Result<tonic::Streaming<pb::SnapshotResponse>, tonic::Status> {
        self.call_on(|channel, _| {
            let r = tonic::Request::new(pb::SnapshotRequest {});
            async move {
                MaintenanceClient::new(channel)
                    .snapshot(r)
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await
    }

    /// Every endpoint's own view of the cluster (an unreachable node is reported, not skipped).
    pub async fn statuses(&self) -> Vec<(String, Result<pb::StatusResponse, tonic::Status>)> {
        let nodes = self.nodes().clone();
        let mut out = Vec::new();
        for (addr, channel) in nodes {
            let r = ClusterClient::new(channel)
                .status(with_timeout(
                    pb::StatusRequest {},
                    self.timeout.min(Duration::from_secs(2)),
                ))
                .await
                .map(|r| r.into_inner())
                .map_err(own_timeout_is_deadline_exceeded);
            out.push((addr, r));
        }
        out
    }
}

/// tonic reports its own client-side timeout as `CANCELLED: Timeout expired`, and so does a tonic
/// server whose copy of the caller's deadline fires first. Either way the deadline passed, which gRPC
/// calls `DEADLINE_EXCEEDED`: for a write that means its fate is unknown, never that it was cancelled.
pub fn own_timeout_is_deadline_exceeded(status: tonic::Status) -> tonic::Status {
    if status.code() == tonic::Code::Cancelled && status.message() == "Timeout expired" {
        let mut mapped = tonic::Status::deadline_exceeded(
            "the deadline passed before an answer came (a write may or may not have been applied)",
        );
        *mapped.metadata_mut() = status.metadata().clone();
        return mapped;
    }
    status
}

pub(crate) fn with_timeout<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout.max(Duration::from_millis(1)));
    r
}
