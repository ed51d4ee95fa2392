//! The openraft type configuration and the commands that travel through the log.

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

pub type NodeId = u64;

openraft::declare_raft_types!(
    /// raftkv's openraft types: commands in, command results out, nodes addressed by `host:port`.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        Node = openraft::BasicNode,
);

pub type Raft = openraft::Raft<TypeConfig, crate::store::StateMachineStore>;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, SnapshotData>;
/// Snapshots are held in memory while they are built, sent and installed. That bounds the data set a node
/// can hold by RAM, which is acceptable for the small clusters raftkv is for; streaming from sled would
/// lift it.
pub type SnapshotData = Cursor<Vec<u8>>;

/// A state-machine change, proposed to the leader and applied on every node in log order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        prev_kv: bool,
    },
    Delete {
        key: Vec<u8>,
        prev_kv: bool,
    },
    Txn(Txn),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    pub compare: Vec<Compare>,
    pub success: Vec<TxnOp>,
    pub failure: Vec<TxnOp>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
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
    Value(Vec<u8>),
    Version(u64),
    ModRevision(u64),
    CreateRevision(u64),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnOp {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        prev_kv: bool,
    },
    Delete {
        key: Vec<u8>,
        prev_kv: bool,
    },
    Get {
        key: Vec<u8>,
    },
}

/// A key's value with the revisions etcd users expect. Revisions are Raft log indexes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub create_revision: u64,
    pub mod_revision: u64,
    pub version: u64,
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
