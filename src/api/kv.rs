//! `raftkv.v1.KV`: validation, then the consistency the caller asked for.

use std::sync::Arc;

use tokio::time::Instant;
use tonic::{Request, Response, Status};

use super::{status, validate};
use crate::limits::{PAIR_OVERHEAD_BYTES, RESPONSE_OVERHEAD_BYTES};
use crate::node::{Error, Header, Node};
use crate::pb::v1 as pb;
use crate::pb::v1::kv_server::Kv;
use crate::types::{Applied, Command, CommandResponse, KeyValue, Txn, TxnOp, TxnOpResult};

pub struct KvService {
    pub node: Arc<Node>,
}

pub fn to_pb(kv: KeyValue) -> pb::KeyValue {
    pb::KeyValue {
        key: kv.key,
        value: kv.value,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        lease: kv.lease,
    }
}

pub fn header(h: Header) -> pb::ResponseHeader {
    pb::ResponseHeader {
        node_id: h.node_id,
        leader_id: h.leader_id,
        term: h.term,
        revision: h.revision,
    }
}

impl KvService {
    /// Brings this node to the freshness a read asked for.
    async fn prepare_read(
        &self,
        consistency: i32,
        min_revision: u64,
        deadline: Instant,
    ) -> Result<(), Error> {
        match validate::consistency(consistency)? {
            pb::Consistency::Eventual => {
                if min_revision > 0 {
                    self.node.wait_applied(min_revision, deadline).await?;
                }
            }
            pb::Consistency::Strong | pb::Consistency::Unspecified => {
                self.node.linearize(deadline).await?;
                // Already at or past min_revision unless it names a revision the cluster has not reached.
                if min_revision > 0 {
                    self.node.wait_applied(min_revision, deadline).await?;
                }
            }
        }
        Ok(())
    }

    /// Refuses, before proposing it, a txn whose results would pass `--max-response-bytes`, judged by
    /// the sizes of the values it would return as this node sees them now (the larger branch counts).
    /// The values can still grow before the txn applies; then the response is sent anyway, bounded by
    /// the txn's op count times the largest pair, because the txn has already taken effect.
    fn check_txn_response_size(&self, txn: &Txn) -> Result<(), Error> {
        let limits = self.node.limits();
        let branch = |ops: &[TxnOp]| -> Result<usize, Error> {
            let mut total = 0usize;
            for (i, op) in ops.iter().enumerate() {
                let returned = match op {
                    TxnOp::Get { key } => Some(key),
                    TxnOp::Put {
                        key, prev_kv: true, ..
                    }
                    | TxnOp::Delete { key, prev_kv: true } => Some(key),
                    _ => None,
                };
                total += RESPONSE_OVERHEAD_BYTES;
                let Some(key) = returned else { continue };
                // A value this txn itself writes earlier may be what a later op returns.
                let written = ops[..i]
                    .iter()
                    .filter_map(|o| match o {
                        TxnOp::Put { key: k, value, .. } if k == key => Some(value.len()),
                        _ => None,
                    })
                    .max()
                    .unwrap_or(0);
                let stored = self.node.local_get(key)?.map_or(0, |kv| kv.value.len());
                total += key.len() + stored.max(written) + PAIR_OVERHEAD_BYTES;
            }
            Ok(total)
        };
        let estimate = branch(&txn.success)?.max(branch(&txn.failure)?);
        if estimate > limits.max_response_bytes {
            return Err(Error::Exhausted(format!(
                "txn results would be about {estimate} bytes; the limit is {} bytes \
                 (--max-response-bytes); split the txn or read the values with Get or Scan",
                limits.max_response_bytes
            )));
        }
        Ok(())
    }

    async fn put(&self, req: pb::PutRequest, deadline: Instant) -> Result<pb::PutResponse, Error> {
        let _in_flight = self.node.admit_request()?;
        let cmd = validate::put(self.node.limits(), req)?;
        let applied = self.node.write(cmd, deadline).await?;
        match applied.response {
            CommandResponse::Put { prev } => Ok(pb::PutResponse {
                header: Some(header(self.node.header(Some(applied.revision)))),
                prev_kv: prev.map(to_pb),
            }),
            _ => Err(unexpected(&applied)),
        }
    }

    async fn get(&self, req: pb::GetRequest, deadline: Instant) -> Result<pb::GetResponse, Error> {
        let _in_flight = self.node.admit_request()?;
        crate::limits::key(self.node.limits(), &req.key, "key")?;
        self.prepare_read(req.consistency, req.min_revision, deadline)
            .await?;
        let header = header(self.node.header(None));
        let kv = self.node.local_get(&req.key)?;
        Ok(pb::GetResponse {
            header: Some(header),
            kv: kv.map(to_pb),
        })
    }

    async fn delete(
        &self,
        req: pb::DeleteRequest,
        deadline: Instant,
    ) -> Result<pb::DeleteResponse, Error> {
        let _in_flight = self.node.admit_request()?;
        let cmd = validate::delete(self.node.limits(), req)?;
        let applied = self.node.write(cmd, deadline).await?;
        match applied.response {
            CommandResponse::Delete { deleted, prev } => Ok(pb::DeleteResponse {
                header: Some(header(self.node.header(Some(applied.revision)))),
                deleted,
                prev_kv: prev.map(to_pb),
            }),
            _ => Err(unexpected(&applied)),
        }
    }

    async fn scan(
        &self,
        req: pb::ScanRequest,
        deadline: Instant,
    ) -> Result<pb::ScanResponse, Error> {
        let _in_flight = self.node.admit_request()?;
        let limit = validate::scan(self.node.limits(), &req)?;
        self.prepare_read(req.consistency, req.min_revision, deadline)
            .await?;
        let header = header(self.node.header(None));
        let (kvs, more) = self.node.local_scan(&req.start, &req.end, limit)?;
        Ok(pb::ScanResponse {
            header: Some(header),
            kvs: kvs.into_iter().map(to_pb).collect(),
            more,
        })
    }

    async fn txn(&self, req: pb::TxnRequest, deadline: Instant) -> Result<pb::TxnResponse, Error> {
        let _in_flight = self.node.admit_request()?;
        let cmd = validate::txn(self.node.limits(), req)?;
        if let Command::Txn(txn) = &cmd {
            self.check_txn_response_size(txn)?;
        }
        let applied = self.node.write(cmd, deadline).await?;
        let CommandResponse::Txn { succeeded, results } = &applied.response else {
            return Err(unexpected(&applied));
        };
        let header = header(self.node.header(Some(applied.revision)));
        let results = results
            .iter()
            .cloned()
            .map(|r| pb::OpResult {
                result: Some(match r {
                    TxnOpResult::Put { prev } => pb::op_result::Result::Put(pb::PutResponse {
                        header: Some(header),
                        prev_kv: prev.map(to_pb),
                    }),
                    TxnOpResult::Delete { deleted, prev } => {
                        pb::op_result::Result::Delete(pb::DeleteResponse {
                            header: Some(header),
                            deleted,
                            prev_kv: prev.map(to_pb),
                        })
                    }
                    TxnOpResult::Get { kv } => pb::op_result::Result::Get(pb::GetResponse {
                        header: Some(header),
                        kv: kv.map(to_pb),
                    }),
                }),
            })
            .collect();
        Ok(pb::TxnResponse {
            header: Some(header),
            succeeded: *succeeded,
            results,
        })
    }
}

fn unexpected(applied: &Applied) -> Error {
    Error::Internal(format!(
        "unexpected state-machine response {:?}",
        applied.response
    ))
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        let deadline = super::deadline(&self.node, &request);
        status::reply(
            &self.node,
            KvService::put(self, request.into_inner(), deadline).await,
        )
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let deadline = super::deadline(&self.node, &request);
        status::reply(
            &self.node,
            KvService::get(self, request.into_inner(), deadline).await,
        )
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let deadline = super::deadline(&self.node, &request);
        status::reply(
            &self.node,
            KvService::delete(self, request.into_inner(), deadline).await,
        )
    }

    async fn scan(
        &self,
        request: Request<pb::ScanRequest>,
    ) -> Result<Response<pb::ScanResponse>, Status> {
        let deadline = super::deadline(&self.node, &request);
        status::reply(
            &self.node,
            KvService::scan(self, request.into_inner(), deadline).await,
        )
    }

    async fn txn(
        &self,
        request: Request<pb::TxnRequest>,
    ) -> Result<Response<pb::TxnResponse>, Status> {
        let deadline = super::deadline(&self.node, &request);
        status::reply(
            &self.node,
            KvService::txn(self, request.into_inner(), deadline).await,
        )
    }
}
