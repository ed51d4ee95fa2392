//! The raftkv side of the benchmark: raw generated tonic clients, no retries, so every failure shows up
//! in the report as the status the server returned.

use std::time::Duration;

use tonic::transport::{Channel, ClientTlsConfig};

use super::BenchError;
use super::driver::{CasOutcome, OpError};
use raftkv_client::pb::v1 as pb;
use raftkv_client::pb::v1::cluster_client::ClusterClient;
use raftkv_client::pb::v1::kv_client::KvClient;

#[derive(Clone)]
pub(crate) struct RaftkvConn {
    kv: KvClient<Channel>,
    timeout: Duration,
}

fn request<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r
}

impl RaftkvConn {
    pub(super) fn connect(
        endpoint: &str,
        timeout: Duration,
        tls: Option<&ClientTlsConfig>,
    ) -> Result<Self, BenchError> {
        let channel = raftkv_client::endpoint(endpoint, tls)
            .map_err(|e| BenchError::Connect {
                endpoint: endpoint.to_string(),
                reason: e.to_string(),
            })?
            .connect_lazy();
        Ok(Self {
            kv: KvClient::new(channel),
            timeout,
        })
    }

    pub(super) async fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<(), OpError> {
        let req = pb::PutRequest {
            key,
            value,
            prev_kv: false,
            lease: 0,
        };
        self.kv
            .put(request(req, self.timeout))
            .await
            .map(|_| ())
            .map_err(|s| OpError::from_status(&s))
    }

    pub(super) async fn get(&mut self, key: Vec<u8>, strong: bool) -> Result<(), OpError> {
        let consistency = if strong {
            pb::Consistency::Strong
        } else {
            pb::Consistency::Eventual
        };
        let req = pb::GetRequest {
            key,
            consistency: consistency as i32,
            min_revision: 0,
        };
        self.kv
            .get(request(req, self.timeout))
            .await
            .map(|_| ())
            .map_err(|s| OpError::from_status(&s))
    }

    pub(super) async fn cas(
        &mut self,
        key: Vec<u8>,
        expected: Vec<u8>,
        next: Vec<u8>,
    ) -> Result<CasOutcome, OpError> {
        let req = pb::TxnRequest {
            compare: vec![pb::Compare {
                key: key.clone(),
                result: pb::CompareResult::Equal as i32,
                target: Some(pb::compare::Target::Value(expected)),
            }],
            success: vec![pb::Op {
                op: Some(pb::op::Op::Put(pb::PutRequest {
                    key: key.clone(),
                    value: next,
                    prev_kv: false,
                    lease: 0,
                })),
            }],
            failure: vec![pb::Op {
                op: Some(pb::op::Op::Get(pb::GetRequest {
                    key,
                    consistency: pb::Consistency::Strong as i32,
                    min_revision: 0,
                })),
            }],
        };
        let resp = self
            .kv
            .txn(request(req, self.timeout))
            .await
            .map_err(|s| OpError::from_status(&s))?
            .into_inner();
        let current = resp.results.into_iter().find_map(|r| match r.result {
            Some(pb::op_result::Result::Get(g)) => g.kv.map(|kv| kv.value),
            _ => None,
        });
        Ok(CasOutcome {
            succeeded: resp.succeeded,
            current,
        })
    }
}

/// The endpoint of the leader with the highest term. A node restarted after being killed as leader can
/// report itself leader of its old term until it hears from the current one, so "any node that says
/// leader" is not enough.
pub(super) async fn leader(
    endpoints: &[String],
    timeout: Duration,
    tls: Option<&ClientTlsConfig>,
) -> Option<String> {
    let mut best: Option<(u64, String)> = None;
    for endpoint in endpoints {
        let Ok(ep) = raftkv_client::endpoint(endpoint, tls) else {
            continue;
        };
        let mut client = ClusterClient::new(ep.connect_lazy());
        if let Ok(r) = client.status(request(pb::StatusRequest {}, timeout)).await {
            let s = r.into_inner();
            if s.role == "leader" && best.as_ref().is_none_or(|(term, _)| s.term > *term) {
                best = Some((s.term, endpoint.clone()));
            }
        }
    }
    best.map(|(_, endpoint)| endpoint)
}
