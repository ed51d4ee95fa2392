//! What a request may hold: the limits every node enforces, and the rules for a command that every
//! replica applies the same way.
//!
//! Apart from the API because three layers need the same answer: the public API refuses a bad request
//! before it reaches the log, the leader refuses a forwarded command (anyone who can reach the peer port
//! can send one), and the state machine refuses to apply a committed entry that breaks the fixed rules.

use crate::types::{Command, CompareTarget, LeaseOp, TxnOp};

/// A request that breaks a limit; the message names the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// Fixed, not flags: `apply` enforces them too (see [`applicable`]), and every replica must decide the
/// same way about the same entry.
pub const MAX_KEY_BYTES: usize = 4096;
pub const MAX_TXN_OPS: usize = 128;

/// Largest node-to-node message. It bounds an AppendEntries batch: `max_payload_entries` is derived
/// from it and the largest client request, so a full batch always fits.
pub const MAX_PEER_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// Bytes a pair adds to a response beyond its key and value: field tags, length prefixes and three
/// revisions as varints, rounded up.
pub const PAIR_OVERHEAD_BYTES: usize = 64;
/// Bytes a response has beyond its pairs: the header (four varints) and flags, rounded up.
pub const RESPONSE_OVERHEAD_BYTES: usize = 128;

/// Input limits, enforced at the API edge before anything reaches the log.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    pub max_request_bytes: usize,
    pub max_txn_ops: usize,
    pub default_scan_limit: usize,
    pub max_scan_limit: usize,
    pub max_response_bytes: usize,
}

pub fn key(limits: &Limits, key: &[u8], what: &str) -> Result<(), Invalid> {
    if key.is_empty() {
        return Err(Invalid(format!("{what} must not be empty")));
    }
    if key.len() > limits.max_key_bytes {
        return Err(Invalid(format!(
            "{what} is {} bytes; the limit is {} bytes",
            key.len(),
            limits.max_key_bytes
        )));
    }
    Ok(())
}

pub fn value(limits: &Limits, value: &[u8]) -> Result<(), Invalid> {
    if value.len() > limits.max_value_bytes {
        return Err(Invalid(format!(
            "value is {} bytes; the limit is {} bytes (--max-value-bytes)",
            value.len(),
            limits.max_value_bytes
        )));
    }
    Ok(())
}

/// The public API's rules for a command that arrives already built: forwarded over the peer port,
/// where anyone who can reach the port can send one.
pub fn command(limits: &Limits, cmd: &Command) -> Result<(), Invalid> {
    check_command(limits, cmd, true)
}

/// What `apply` refuses whatever this node's settings: keys the public API could neither read nor
/// delete, and transactions over the op limit. Both limits are fixed (not flags), so every node
/// decides the same way for the same entry; value sizes are a per-node flag and are left to the edge,
/// where a node's setting cannot make replicas disagree.
pub fn applicable(cmd: &Command) -> Result<(), Invalid> {
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

/// The longest TTL any lease may have, whatever `--max-lease-ttl-ms` says: a fixed rule, so that
/// apply decides the same on every node. Far above any flag's useful value (a year).
pub const MAX_LEASE_TTL_MS: u64 = 365 * 24 * 3600 * 1000;
/// The most leases one expire or checkpoint entry names; the leader splits larger sets.
pub const MAX_LEASES_PER_ENTRY: usize = 4096;

fn lease_id(id: u64) -> Result<(), Invalid> {
    if id == 0 {
        return Err(Invalid("lease id 0 names no lease".into()));
    }
    Ok(())
}

fn check_lease(op: &LeaseOp) -> Result<(), Invalid> {
    match op {
        LeaseOp::Grant { ttl_ms, .. } => {
            if *ttl_ms == 0 || *ttl_ms > MAX_LEASE_TTL_MS {
                return Err(Invalid(format!(
                    "a lease TTL must be between 1 and {MAX_LEASE_TTL_MS} ms, not {ttl_ms}"
                )));
            }
            Ok(())
        }
        LeaseOp::Revoke { id } => lease_id(*id),
        LeaseOp::Expire { leases, .. } => {
            if leases.len() > MAX_LEASES_PER_ENTRY {
                return Err(Invalid(format!("an expiry of {} leases", leases.len())));
            }
            leases.iter().try_for_each(|l| lease_id(l.id))
        }
        LeaseOp::Checkpoint { remaining, .. } => {
            if remaining.len() > MAX_LEASES_PER_ENTRY {
                return Err(Invalid(format!(
                    "a checkpoint of {} leases",
                    remaining.len()
                )));
            }
            remaining.iter().try_for_each(|(l, _)| lease_id(l.id))
        }
        LeaseOp::Clear { lease } => lease_id(lease.id),
    }
}

fn check_command(limits: &Limits, cmd: &Command, values: bool) -> Result<(), Invalid> {
    let checked_value = |v: &[u8]| if values { value(limits, v) } else { Ok(()) };
    match cmd {
        Command::Put {
            key: k, value: v, ..
        } => {
            key(limits, k, "key")?;
            checked_value(v)
        }
        Command::PutWithLease {
            key: k,
            value: v,
            lease,
            ..
        } => {
            key(limits, k, "key")?;
            lease_id(*lease)?;
            checked_value(v)
        }
        Command::Lease(op) => check_lease(op),
        Command::Delete { key: k, .. } => key(limits, k, "key"),
        Command::Txn(txn) => {
            for (list, n) in [
                ("compare", txn.compare.len()),
                ("success", txn.success.len()),
                ("failure", txn.failure.len()),
            ] {
                if n > limits.max_txn_ops {
                    return Err(Invalid(format!(
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
                    TxnOp::PutWithLease {
                        key: k,
                        value: v,
                        lease,
                        ..
                    } => {
                        key(limits, k, "key")?;
                        lease_id(*lease)?;
                        checked_value(v)?;
                    }
                    TxnOp::Delete { key: k, .. } | TxnOp::Get { key: k } => key(limits, k, "key")?,
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Txn;

    #[test]
    fn apply_refuses_what_no_client_could_send_whatever_the_value_limit() {
        let key = |n: usize| vec![b'k'; n];
        let put = |k: Vec<u8>, v: usize| Command::Put {
            key: k,
            value: vec![0; v],
            prev_kv: false,
        };
        // Values are a per-node flag: apply never refuses one for its size.
        assert_eq!(applicable(&put(key(1), 10 << 20)), Ok(()));
        assert!(applicable(&put(key(MAX_KEY_BYTES + 1), 1)).is_err());
        assert!(applicable(&put(vec![], 1)).is_err());
        let ops = vec![TxnOp::Get { key: key(1) }; MAX_TXN_OPS + 1];
        let txn = Command::Txn(Txn {
            compare: vec![],
            success: ops,
            failure: vec![],
        });
        assert!(applicable(&txn).is_err());

        // A forwarded command also meets this node's value limit.
        let limits = Limits {
            max_key_bytes: MAX_KEY_BYTES,
            max_value_bytes: 8,
            max_request_bytes: 1 << 20,
            max_txn_ops: MAX_TXN_OPS,
            default_scan_limit: 1,
            max_scan_limit: 1,
            max_response_bytes: 1 << 20,
        };
        assert!(command(&limits, &put(key(1), 9)).is_err());
        assert_eq!(command(&limits, &put(key(1), 8)), Ok(()));
    }
}
