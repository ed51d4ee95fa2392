//! Turns public requests into commands, rejecting bad input before anything reaches the log. Every
//! message names the limit that was crossed.

use crate::limits::{Invalid, Limits, key, value};
use crate::pb::v1 as pb;
use crate::types::{Command, Compare, CompareResult, CompareTarget, Txn, TxnOp};

pub fn put(limits: &Limits, req: pb::PutRequest) -> Result<Command, Invalid> {
    key(limits, &req.key, "key")?;
    value(limits, &req.value)?;
    Ok(match req.lease {
        0 => Command::Put {
            key: req.key,
            value: req.value,
            prev_kv: req.prev_kv,
        },
        lease => Command::PutWithLease {
            key: req.key,
            value: req.value,
            prev_kv: req.prev_kv,
            lease,
        },
    })
}

pub fn delete(limits: &Limits, req: pb::DeleteRequest) -> Result<Command, Invalid> {
    key(limits, &req.key, "key")?;
    Ok(Command::Delete {
        key: req.key,
        prev_kv: req.prev_kv,
    })
}

pub fn consistency(raw: i32) -> Result<pb::Consistency, Invalid> {
    pb::Consistency::try_from(raw).map_err(|_| Invalid(format!("unknown consistency {raw}")))
}

/// Validates a scan range and returns the effective limit.
pub fn scan(limits: &Limits, req: &pb::ScanRequest) -> Result<usize, Invalid> {
    if req.start.len() > limits.max_key_bytes || req.end.len() > limits.max_key_bytes {
        return Err(Invalid(format!(
            "scan bounds are limited to {} bytes",
            limits.max_key_bytes
        )));
    }
    if !req.end.is_empty() && req.end < req.start {
        return Err(Invalid("scan end is before its start".into()));
    }
    match req.limit as usize {
        0 => Ok(limits.default_scan_limit),
        n if n > limits.max_scan_limit => Err(Invalid(format!(
            "scan limit {n} is above the maximum {}; page through with `more` instead",
            limits.max_scan_limit
        ))),
        n => Ok(n),
    }
}

pub fn txn(limits: &Limits, req: pb::TxnRequest) -> Result<Command, Invalid> {
    for (list, n) in [
        ("compare", req.compare.len()),
        ("success", req.success.len()),
        ("failure", req.failure.len()),
    ] {
        if n > limits.max_txn_ops {
            return Err(Invalid(format!(
                "txn has {n} {list} entries; the limit is {}",
                limits.max_txn_ops
            )));
        }
    }
    let compare = req
        .compare
        .into_iter()
        .map(|c| compare(limits, c))
        .collect::<Result<_, _>>()?;
    let success = ops(limits, req.success)?;
    let failure = ops(limits, req.failure)?;
    Ok(Command::Txn(Txn {
        compare,
        success,
        failure,
    }))
}

fn compare(limits: &Limits, c: pb::Compare) -> Result<Compare, Invalid> {
    key(limits, &c.key, "compare key")?;
    let result = match pb::CompareResult::try_from(c.result) {
        Ok(pb::CompareResult::Equal) => CompareResult::Equal,
        Ok(pb::CompareResult::NotEqual) => CompareResult::NotEqual,
        Ok(pb::CompareResult::Greater) => CompareResult::Greater,
        Ok(pb::CompareResult::Less) => CompareResult::Less,
        Err(_) => {
            return Err(Invalid(format!("unknown compare result {}", c.result)));
        }
    };
    let target = match c.target {
        Some(pb::compare::Target::Value(v)) => {
            value(limits, &v)?;
            CompareTarget::Value(v)
        }
        Some(pb::compare::Target::Version(v)) => CompareTarget::Version(v),
        Some(pb::compare::Target::ModRevision(v)) => CompareTarget::ModRevision(v),
        Some(pb::compare::Target::CreateRevision(v)) => CompareTarget::CreateRevision(v),
        Some(pb::compare::Target::Lease(v)) => CompareTarget::Lease(v),
        None => {
            return Err(Invalid(
                "compare needs a target (value, version, mod_revision, create_revision or lease)"
                    .into(),
            ));
        }
    };
    Ok(Compare {
        key: c.key,
        result,
        target,
    })
}

fn ops(limits: &Limits, ops: Vec<pb::Op>) -> Result<Vec<TxnOp>, Invalid> {
    ops.into_iter()
        .map(|op| match op.op {
            Some(pb::op::Op::Put(p)) => {
                key(limits, &p.key, "key")?;
                value(limits, &p.value)?;
                Ok(match p.lease {
                    0 => TxnOp::Put {
                        key: p.key,
                        value: p.value,
                        prev_kv: p.prev_kv,
                    },
                    lease => TxnOp::PutWithLease {
                        key: p.key,
                        value: p.value,
                        prev_kv: p.prev_kv,
                        lease,
                    },
                })
            }
            Some(pb::op::Op::Delete(d)) => {
                key(limits, &d.key, "key")?;
                Ok(TxnOp::Delete {
                    key: d.key,
                    prev_kv: d.prev_kv,
                })
            }
            Some(pb::op::Op::Get(g)) => {
                key(limits, &g.key, "key")?;
                Ok(TxnOp::Get { key: g.key })
            }
            None => Err(Invalid("txn op is empty (set put, delete or get)".into())),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{MAX_KEY_BYTES, MAX_TXN_OPS};

    fn limits() -> Limits {
        Limits {
            max_key_bytes: MAX_KEY_BYTES,
            max_value_bytes: 10,
            max_request_bytes: 1 << 20,
            max_txn_ops: MAX_TXN_OPS,
            default_scan_limit: 100,
            max_scan_limit: 1000,
            max_response_bytes: 1 << 20,
        }
    }

    fn op(op: pb::op::Op) -> pb::Op {
        pb::Op { op: Some(op) }
    }

    #[test]
    fn puts_and_deletes_keep_their_fields_and_check_sizes() {
        let l = limits();
        let cmd = put(
            &l,
            pb::PutRequest {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                prev_kv: true,
                lease: 0,
            },
        )
        .unwrap();
        assert_eq!(
            cmd,
            Command::Put {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                prev_kv: true
            }
        );
        let too_long = pb::PutRequest {
            key: b"k".to_vec(),
            value: vec![0; 11],
            prev_kv: false,
            lease: 0,
        };
        assert!(
            put(&l, too_long)
                .unwrap_err()
                .0
                .contains("--max-value-bytes")
        );
        let no_key = pb::DeleteRequest {
            key: vec![],
            prev_kv: false,
        };
        assert!(
            delete(&l, no_key)
                .unwrap_err()
                .0
                .contains("must not be empty")
        );
        let long_key = pb::DeleteRequest {
            key: vec![b'k'; MAX_KEY_BYTES + 1],
            prev_kv: false,
        };
        assert!(delete(&l, long_key).is_err());
    }

    #[test]
    fn scans_get_the_default_limit_and_refuse_bad_ranges() {
        let l = limits();
        let mut r = pb::ScanRequest::default();
        assert_eq!(scan(&l, &r), Ok(100));
        r.limit = 1000;
        assert_eq!(scan(&l, &r), Ok(1000));
        r.limit = 1001;
        assert!(scan(&l, &r).unwrap_err().0.contains("page through"));
        r.limit = 0;
        r.start = b"b".to_vec();
        r.end = b"a".to_vec();
        assert!(scan(&l, &r).is_err(), "end before start");
        r.end = vec![];
        assert_eq!(scan(&l, &r), Ok(100), "an empty end means to the last key");
        assert!(consistency(pb::Consistency::Eventual as i32).is_ok());
        assert!(consistency(99).is_err());
    }

    #[test]
    fn txns_are_built_op_by_op_and_refuse_what_is_incomplete() {
        let l = limits();
        let txn_req = pb::TxnRequest {
            compare: vec![pb::Compare {
                key: b"c".to_vec(),
                result: pb::CompareResult::Greater as i32,
                target: Some(pb::compare::Target::Version(3)),
            }],
            success: vec![
                op(pb::op::Op::Put(pb::PutRequest {
                    key: b"p".to_vec(),
                    value: b"q".to_vec(),
                    prev_kv: false,
                    lease: 0,
                })),
                op(pb::op::Op::Get(pb::GetRequest {
                    key: b"g".to_vec(),
                    ..Default::default()
                })),
            ],
            failure: vec![op(pb::op::Op::Delete(pb::DeleteRequest {
                key: b"d".to_vec(),
                prev_kv: true,
            }))],
        };
        let Command::Txn(t) = txn(&l, txn_req.clone()).unwrap() else {
            panic!("a txn request builds a txn");
        };
        assert_eq!(t.compare[0].result, CompareResult::Greater);
        assert_eq!(t.compare[0].target, CompareTarget::Version(3));
        assert_eq!(t.success.len(), 2);
        assert_eq!(
            t.failure,
            vec![TxnOp::Delete {
                key: b"d".to_vec(),
                prev_kv: true
            }]
        );

        let mut no_target = txn_req.clone();
        no_target.compare[0].target = None;
        assert!(txn(&l, no_target).unwrap_err().0.contains("needs a target"));
        let mut bad_result = txn_req.clone();
        bad_result.compare[0].result = 17;
        assert!(txn(&l, bad_result).is_err());
        let mut empty_op = txn_req.clone();
        empty_op.success.push(pb::Op { op: None });
        assert!(txn(&l, empty_op).unwrap_err().0.contains("txn op is empty"));
        let mut too_many = txn_req;
        too_many.failure = vec![too_many.failure[0].clone(); MAX_TXN_OPS + 1];
        assert!(txn(&l, too_many).unwrap_err().0.contains("the limit is"));
    }
}
