//! The etcd side of the benchmark, through the tonic-based `etcd-client` crate. Each connection is a
//! client bound to one endpoint, so connections spread over the cluster exactly as raftkv's do.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KvClient, Txn, TxnOp, TxnOpResponse,
};

use super::BenchError;
use super::driver::{CasOutcome, OpError};

#[derive(Clone)]
pub(crate) struct EtcdConn {
    kv: KvClient,
}

fn op_error(e: etcd_client::Error) -> OpError {
    match e {
        // etcd-client is on tonic 0.13, raftkv on 0.14: the code's name is the common ground.
        etcd_client::Error::GRpcStatus(s) => OpError {
            code: format!("{:?}", s.code()),
            message: s.message().to_string(),
        },
        other => OpError {
            code: "transport".into(),
            message: other.to_string(),
        },
    }
}

fn url(endpoint: &str) -> String {
    if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    }
}

async fn client(endpoint: &str, timeout: Duration) -> Result<Client, BenchError> {
    let options = ConnectOptions::new()
        .with_timeout(timeout)
        .with_connect_timeout(Duration::from_millis(500));
    Client::connect([url(endpoint)], Some(options))
        .await
        .map_err(|e| BenchError::Connect {
            endpoint: endpoint.to_string(),
            reason: e.to_string(),
        })
}

impl EtcdConn {
    pub(super) async fn connect(endpoint: &str, timeout: Duration) -> Result<Self, BenchError> {
        Ok(Self {
            kv: client(endpoint, timeout).await?.kv_client(),
        })
    }

    pub(super) async fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<(), OpError> {
        self.kv
            .put(key, value, None)
            .await
            .map(|_| ())
            .map_err(op_error)
    }

    pub(super) async fn get(&mut self, key: Vec<u8>, strong: bool) -> Result<(), OpError> {
        let options = (!strong).then(|| GetOptions::new().with_serializable());
        self.kv
            .get(key, options)
            .await
            .map(|_| ())
            .map_err(op_error)
    }

    pub(super) async fn cas(
        &mut self,
        key: Vec<u8>,
        expected: Vec<u8>,
        next: Vec<u8>,
    ) -> Result<CasOutcome, OpError> {
        let txn = Txn::new()
            .when([Compare::value(key.clone(), CompareOp::Equal, expected)])
            .and_then([TxnOp::put(key.clone(), next, None)])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.kv.txn(txn).await.map_err(op_error)?;
        let current = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        });
        Ok(CasOutcome {
            succeeded: resp.succeeded(),
            current,
        })
    }
}

/// etcd names members by id: the leader is the endpoint whose own member id is the leader it reports.
pub(super) async fn leader(endpoints: &[String], timeout: Duration) -> Option<String> {
    for endpoint in endpoints {
        let Ok(mut c) = client(endpoint, timeout).await else {
            continue;
        };
        if let Ok(s) = c.status().await
            && s.header().map(|h| h.member_id()) == Some(s.leader())
        {
            return Some(endpoint.clone());
        }
    }
    None
}
