//! Turns public requests into commands, rejecting bad input before anything reaches the log. Every
//! message names the limit that was crossed.

use crate::limits::{Invalid, Limits, key, value};
use crate::pb::v1 as pb;
use crate::types::{Command, Compare, CompareResult, CompareTarget, Txn, TxnOp};

pub fn put(limits: &Limits, req: pb::PutRequest) -> Result<Command, Invalid> {
    key(limits, &req.key, "key")?;
    value(limits, &req.value)?;
    Ok(Command::Put {
        key: req.key,
        value: req.value,
        prev_kv: req.prev_kv,
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
        None => {
            return Err(Invalid(
                "compare needs a target (value, version, mod_revision or create_revision)".into(),
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
                Ok(TxnOp::Put {
                    key: p.key,
                    value: p.value,
                    prev_kv: p.prev_kv,
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
