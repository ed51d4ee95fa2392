//! The openraft type configuration and the commands that travel through the log.

use std::fmt;

use serde::{Deserialize, Serialize};

pub type NodeId = u64;

openraft::declare_raft_types!(
    /// raftkv's openraft types: commands in, command results out, members with two addresses.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        Node = Member,
);

/// A member as the membership records it. Clients and peers reach a node on different ports (the Raft
/// service is not on the public one), so both addresses travel with the membership: a follower hints
/// clients at the leader's client address and forwards to its peer address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Where clients reach the node (`--advertise`).
    pub addr: String,
    /// Where peers reach the node (`--peer-advertise`).
    pub peer_addr: String,
}

impl Member {
    pub fn new(addr: impl Into<String>, peer_addr: impl Into<String>) -> Self {
        Member {
            addr: addr.into(),
            peer_addr: peer_addr.into(),
        }
    }
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.peer_addr)
    }
}

pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type VoteRequest = openraft::raft::VoteRequest<TypeConfig>;
pub type VoteResponse = openraft::raft::VoteResponse<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, SnapshotData>;
/// A snapshot's image: an open snapshot file in the data directory (see `store::snapshot`). Open, so
/// that a sender keeps reading it even after a newer snapshot has replaced it on disk.
#[derive(Debug)]
pub struct SnapshotData {
    pub file: std::fs::File,
    pub path: std::path::PathBuf,
    pub len: u64,
}

/// A state-machine change, proposed to the leader and applied on every node in log order.
///
/// Keys and values here and in the types below are `serde_bytes`: bincode writes a byte string as its
/// length and the raw bytes either way, but handles a plain `Vec<u8>` one element at a time, and every
/// put is encoded or decoded many times across the cluster (log, replication, forwarding, reads of
/// the log; see docs/measurements.md). The bytes are the same, pinned by `the_encoding_of_stored_and_sent_types_is_unchanged`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Put {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        prev_kv: bool,
    },
    Delete {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        prev_kv: bool,
    },
    Txn(Txn),
    /// A lease's grant, end or countdown (see [`LeaseOp`]).
    Lease(LeaseOp),
    /// A put that attaches the key to a lease. Its own variant, after the others, so that every
    /// command written before leases keeps its bytes.
    PutWithLease {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        prev_kv: bool,
        lease: u64,
    },
}

/// What happens to leases goes through the log like every other change, so every replica agrees on
/// which leases exist and which keys they hold. Time does not: only the leader reads a clock, and
/// what it decides reaches the log as `Expire` and `Checkpoint` (see `node::lease`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseOp {
    /// `id` 0: the apply picks one (the entry's index, or the next free id above it).
    Grant {
        id: u64,
        ttl_ms: u64,
    },
    Revoke {
        id: u64,
    },
    /// The leader of `term` found these leases past their deadline; they end here. Applied only in
    /// an entry of that term, and only to the grant it names: a decision a leader made before it
    /// lost office, or about a lease that has since ended and been granted again, ends nothing.
    Expire {
        term: u64,
        leases: Vec<LeaseRef>,
    },
    /// Remaining milliseconds per lease, as the leader of `term` counted them, so that a new leader
    /// resumes the countdown. Under the same rules as `Expire`: it shortens what a new leader gives.
    Checkpoint {
        term: u64,
        remaining: Vec<(LeaseRef, u64)>,
    },
    /// A keep-alive after a checkpoint: the lease's next leader counts from the full TTL again.
    /// Applied whenever it commits, since it can only lengthen a lease.
    Clear {
        lease: LeaseRef,
    },
}

/// One grant of a lease: its id and the revision that granted it. Ids can be granted again once a
/// lease ends; the revision tells the grants apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LeaseRef {
    pub id: u64,
    pub granted_at: u64,
}

impl Command {
    /// The key and value bytes the command carries: what it weighs in memory and on disk, less a
    /// small constant per part.
    pub fn byte_len(&self) -> usize {
        match self {
            Command::Put { key, value, .. } => key.len() + value.len(),
            Command::Delete { key, .. } => key.len(),
            Command::PutWithLease { key, value, .. } => key.len() + value.len(),
            Command::Lease(op) => match op {
                LeaseOp::Expire { leases, .. } => leases.len() * 16,
                LeaseOp::Checkpoint { remaining, .. } => remaining.len() * 24,
                _ => 16,
            },
            Command::Txn(txn) => {
                let compares = txn.compare.iter().map(|compare| {
                    let operand = match &compare.target {
                        CompareTarget::Value(value) => value.len(),
                        _ => 0,
                    };
                    compare.key.len() + operand
                });
                let ops = txn.success.iter().chain(&txn.failure).map(|op| match op {
                    TxnOp::Put { key, value, .. } | TxnOp::PutWithLease { key, value, .. } => {
                        key.len() + value.len()
                    }
                    TxnOp::Delete { key, .. } | TxnOp::Get { key } => key.len(),
                });
                compares.chain(ops).sum()
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    pub compare: Vec<Compare>,
    pub success: Vec<TxnOp>,
    pub failure: Vec<TxnOp>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub result: CompareResult,
    pub target: CompareTarget,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareResult {
    Equal,
    NotEqual,
    Greater,
    Less,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    Value(#[serde(with = "serde_bytes")] Vec<u8>),
    Version(u64),
    ModRevision(u64),
    CreateRevision(u64),
    /// The id of the lease the key is attached to (0: none, or no key).
    Lease(u64),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnOp {
    Put {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        prev_kv: bool,
    },
    Delete {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        prev_kv: bool,
    },
    Get {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Last, for the reason given on `Command::PutWithLease`.
    PutWithLease {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        prev_kv: bool,
        lease: u64,
    },
}

/// A key's value with the revisions etcd users expect. Revisions are Raft log indexes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    pub create_revision: u64,
    pub mod_revision: u64,
    pub version: u64,
    /// Not part of the encoding (which is pinned): 0 wherever the bytes come from.
    #[serde(skip)]
    pub lease: u64,
}

/// A write that has been committed by a quorum, made durable and applied: what a client's write
/// returns, and what a leader sends back for a forwarded one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The log index of the write: the revision it created.
    pub revision: u64,
    pub response: CommandResponse,
}

/// What applying a log entry produced. Blank and membership entries produce `None`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum CommandResponse {
    #[default]
    None,
    Put {
        prev: Option<KeyValue>,
    },
    Delete {
        deleted: bool,
        prev: Option<KeyValue>,
    },
    Txn {
        succeeded: bool,
        results: Vec<TxnOpResult>,
    },
    /// The entry was committed but not applied: it breaks a rule the public API enforces (see
    /// `limits::applicable`), so it can only have come from a forged or foreign proposal. Last, so
    /// the other variants keep their encoding.
    Rejected {
        reason: String,
    },
    Lease(LeaseResponse),
}

/// What a lease operation, or a write that names a lease, found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseResponse {
    Granted {
        id: u64,
        ttl_ms: u64,
    },
    Revoked,
    /// Expires and checkpoints answer nobody in particular.
    Done,
    /// Revoke of a lease that does not exist, or a put naming one (nothing was written).
    NotFound {
        id: u64,
    },
    /// A grant of an id that is in use.
    Exists {
        id: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnOpResult {
    Put {
        prev: Option<KeyValue>,
    },
    Delete {
        deleted: bool,
        prev: Option<KeyValue>,
    },
    Get {
        kv: Option<KeyValue>,
    },
}

impl fmt::Display for Command {
    /// Log lines name the operation and key sizes, never values: values may be large or sensitive.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Put { key, value, .. } => {
                write!(f, "put(key {}B, value {}B)", key.len(), value.len())
            }
            Command::Delete { key, .. } => write!(f, "delete(key {}B)", key.len()),
            Command::PutWithLease {
                key, value, lease, ..
            } => write!(
                f,
                "put(key {}B, value {}B, lease {lease})",
                key.len(),
                value.len()
            ),
            Command::Lease(op) => match op {
                LeaseOp::Grant { id, ttl_ms } => write!(f, "lease grant({id}, {ttl_ms} ms)"),
                LeaseOp::Revoke { id } => write!(f, "lease revoke({id})"),
                LeaseOp::Expire { leases, .. } => {
                    write!(f, "lease expire({} leases)", leases.len())
                }
                LeaseOp::Checkpoint { remaining, .. } => {
                    write!(f, "lease checkpoint({} leases)", remaining.len())
                }
                LeaseOp::Clear { lease } => write!(f, "lease clear({})", lease.id),
            },
            Command::Txn(t) => write!(
                f,
                "txn({} compares, {} success ops, {} failure ops)",
                t.compare.len(),
                t.success.len(),
                t.failure.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::state_machine::StoredValue;

    fn hex(bytes: Vec<u8>) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Stored logs, state and peer messages must keep their exact bytes across releases (a change needs a
    /// `codec` format version). Pinned here; a 300-byte value crosses bincode's one-byte length limit.
    #[test]
    fn the_encoding_of_stored_and_sent_types_is_unchanged() {
        let put = Command::Put {
            key: b"key".to_vec(),
            value: vec![7; 300],
            prev_kv: true,
        };
        let expected = format!("0100036b6579fb2c01{}01", "07".repeat(300));
        assert_eq!(hex(crate::codec::encode(&put).unwrap()), expected);

        let txn = Command::Txn(Txn {
            compare: vec![Compare {
                key: b"c".to_vec(),
                result: CompareResult::Equal,
                target: CompareTarget::Value(b"x".to_vec()),
            }],
            success: vec![
                TxnOp::Put {
                    key: b"p".to_vec(),
                    value: b"q".to_vec(),
                    prev_kv: false,
                },
                TxnOp::Delete {
                    key: b"d".to_vec(),
                    prev_kv: true,
                },
                TxnOp::Get { key: b"g".to_vec() },
            ],
            failure: vec![],
        });
        let bytes = crate::codec::encode(&txn).unwrap();
        assert_eq!(
            hex(bytes.clone()),
            "010201016300000178030001700171000101640102016700"
        );
        assert_eq!(crate::codec::decode::<Command>(&bytes).unwrap(), txn);

        let kv = KeyValue {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            create_revision: 1,
            mod_revision: 300,
            version: 2,
            lease: 0,
        };
        assert_eq!(
            hex(crate::codec::encode(&kv).unwrap()),
            "01016b017601fb2c0102"
        );
        assert_eq!(
            crate::codec::decode::<KeyValue>(&crate::codec::encode(&kv).unwrap()).unwrap(),
            kv
        );
        let stored = StoredValue {
            value: b"v".to_vec(),
            create_revision: 1,
            mod_revision: 2,
            version: 3,
            lease: 0,
        };
        assert_eq!(hex(crate::codec::encode(&stored).unwrap()), "010176010203");
        assert_eq!(
            crate::codec::decode::<StoredValue>(&crate::codec::encode(&stored).unwrap()).unwrap(),
            stored
        );
        let back: Command = crate::codec::decode(&crate::codec::encode(&put).unwrap()).unwrap();
        assert_eq!(back, put);
    }
}
