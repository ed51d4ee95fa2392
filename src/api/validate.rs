//! Turns public requests into commands, rejecting bad input before anything reaches the log. Every
//! message names the limit that was crossed.

use crate::api::error::ApiError;
use crate::config::{Limits, MAX_KEY_BYTES, MAX_TXN_OPS};
use crate::pb::v1 as pb;
use crate::types::{Command, Compare, CompareResult, CompareTarget, Txn, TxnOp};

/// Bytes a pair adds to a response beyond its key and value: field tags, length prefixes and three
/// revisions as varints, rounded up.
pub const PAIR_OVERHEAD_BYTES: usize = 64;
/// Bytes a response has beyond its pairs: the header (four varints) and flags, rounded up.
pub const RESPONSE_OVERHEAD_BYTES: usize = 128;

pub fn key(limits: &Limits, key: &[u8], what: &str) -> Result<(), ApiError> {
    if key.is_empty() {
        return Err(ApiError::InvalidArgument(format!(
            "{what} must not be empty"
        )));
    }
    if key.len() > limits.max_key_bytes {
        return Err(ApiError::InvalidArgument(format!(
            "{what} is {} bytes; the limit is {} bytes",
            key.len(),
            limits.max_key_bytes
        )));
    }
    Ok(())
}

fn value(limits: &Limits, value: &[u8]) -> Result<(), ApiError> {
    if value.len() > limits.max_value_bytes {
        return Err(ApiError::InvalidArgument(format!(
            "value is {} bytes; the limit is {} bytes (--max-value-bytes)",
            value.len(),
            limits.max_value_bytes
        )));
    }
    Ok(())
}

pub fn put(limits: &Limits, req: pb::PutRequest) -> Result<Command, ApiError> {
    key(limits, &req.key, "key")?;
    value(limits, &req.value)?;
    Ok(Command::Put {
        key: req.key,
        value: req.value,
        prev_kv: req.prev_kv,
    })
}

pub fn delete(limits: &Limits, req: pb::DeleteRequest) -> Result<Command, ApiError> {
    key(limits, &req.key, "key")?;
    Ok(Command::Delete {
        key: req.key,
        prev_kv: req.prev_kv,
    })
}

pub fn consistency(raw: i32) -> Result<pb::Consistency, ApiError> {
    pb::Consistency::try_from(raw)
        .map_err(|_| ApiError::InvalidArgument(format!("unknown consistency {raw}")))
}

/// Validates a scan range and returns the effective limit.
pub fn scan(limits: &Limits, req: &pb::ScanRequest) -> Result<usize, ApiError> {
    if req.start.len() > limits.max_key_bytes || req.end.len() > limits.max_key_bytes {
        return Err(ApiError::InvalidArgument(format!(
            "scan bounds are limited to {} bytes",
            limits.max_key_bytes
        )));
    }
    if !req.end.is_empty() && req.end < req.start {
        return Err(ApiError::InvalidArgument(
            "scan end is before its start".into(),
        ));
    }
    match req.limit as usize {
        0 => Ok(limits.default_scan_limit),
        n if n > limits.max_scan_limit => Err(ApiError::InvalidArgument(format!(
            "scan limit {n} is above the maximum {}; page through with `more` instead",
            limits.max_scan_limit
        ))),
        n => Ok(n),
    }
}

pub fn txn(limits: &Limits, req: pb::TxnRequest) -> Result<Command, ApiError> {
    for (list, n) in [
        ("compare", req.compare.len()),
        ("success", req.success.len()),
        ("failure", req.failure.len()),
    ] {
        if n > limits.max_txn_ops {
            return Err(ApiError::InvalidArgument(format!(
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

fn compare(limits: &Limits, c: pb::Compare) -> Result<Compare, ApiError> {
    key(limits, &c.key, "compare key")?;
    let result = match pb::CompareResult::try_from(c.result) {
        Ok(pb::CompareResult::Equal) => CompareResult::Equal,
        Ok(pb::CompareResult::NotEqual) => CompareResult::NotEqual,
        Ok(pb::CompareResult::Greater) => CompareResult::Greater,
        Ok(pb::CompareResult::Less) => CompareResult::Less,
        Err(_) => {
            return Err(ApiError::InvalidArgument(format!(
                "unknown compare result {}",
                c.result
            )));
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
            return Err(ApiError::InvalidArgument(
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

fn ops(limits: &Limits, ops: Vec<pb::Op>) -> Result<Vec<TxnOp>, ApiError> {
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
            None => Err(ApiError::InvalidArgument(
                "txn op is empty (set put, delete or get)".into(),
            )),
        })
        .collect()
}

/// The public API's rules for a command that arrives already built: forwarded over the peer port,
/// where anyone who can reach the port can send one.
pub fn command(limits: &Limits, cmd: &Command) -> Result<(), ApiError> {
    check_command(limits, cmd, true)
}

/// What `apply` refuses whatever this node's settings: keys the public API could neither read nor
/// delete, and transactions over the op limit. Both limits are fixed (not flags), so every node
/// decides the same way for the same entry; value sizes are a per-node flag and are left to the edge,
/// where a node's setting cannot make replicas disagree.
pub fn applicable(cmd: &Command) -> Result<(), ApiError> {
    let limits = Limits {
        max_key_bytes: MAX_KEY_BYTES,
        max_value_bytes: usize::MAX,
        max_request_bytes: usize::MAX,
        max_txn_ops: MAX_TXN_OPS,
        default_scan_limit: 0,
        max_scan_limit: 0,
        max_response_bytes: usize::MAX,
    };
    check_command(&limits, cmd, false)
}

fn check_command(limits: &Limits, cmd: &Command, values: bool) -> Result<(), ApiError> {
    let checked_value = |v: &[u8]| if values { value(limits, v) } else { Ok(()) };
    match cmd {
        Command::Put {
            key: k, value: v, ..
        } => {
            key(limits, k, "key")?;
            checked_value(v)
        }
        Command::Delete { key: k, .. } => key(limits, k, "key"),
        Command::Txn(txn) => {
            for (list, n) in [
                ("compare", txn.compare.len()),
                ("success", txn.success.len()),
                ("failure", txn.failure.len()),
            ] {
                if n > limits.max_txn_ops {
                    return Err(ApiError::InvalidArgument(format!(
                        "txn has {n} {list} entries; the limit is {}",
                        limits.max_txn_ops
                    )));
                }
            }
            for c in &txn.compare {
                key(limits, &c.key, "compare key")?;
                if let CompareTarget::Value(v) = &c.target {
                    checked_value(v)?;
                }
            }
            for op in txn.success.iter().chain(&txn.failure) {
                match op {
                    TxnOp::Put {
                        key: k, value: v, ..
                    } => {
                        key(limits, k, "key")?;
                        checked_value(v)?;
                    }
                    TxnOp::Delete { key: k, .. } | TxnOp::Get { key: k } => key(limits, k, "key")?,
                }
            }
            Ok(())
        }
    }
}
