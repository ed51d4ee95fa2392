//! The replicated key-value state, applied from the log.
//!
//! `apply` computes a whole batch of entries against an in-memory overlay of the keys it touches, then
//! writes the overlay and `last_applied` in one two-tree sled transaction and answers the clients.
//! Computing outside the transaction matters: sled may re-run a transaction closure, so the closure only
//! writes prepared batches and has no side effects.
//!
//! # Why `apply` does not flush
//!
//! Durability of a write comes from the log, not from the state machine: openraft hands an entry to
//! `apply` only once it is committed, i.e. flushed into the logs of a quorum, so a client that hears back
//! has its write on disk on a majority whether or not `sm_data` is. Flushing here would add a second
//! fsync to every batch, serialized after the log's; it was the largest single cost of a write.
//!
//! What a crash can then leave on disk, and why each case is correct:
//! - `sm_data` and `last_applied` change in one transaction, which sled recovers entirely or not at all.
//!   So the recovered state machine is exactly the result of applying the log up to the recovered
//!   `last_applied`: never half a batch, never data ahead of or behind its `last_applied`.
//! - The recovered `last_applied` may be older than what was applied (the flush that would have covered
//!   it never happened). openraft re-applies every committed entry after `last_applied` on restart
//!   (`get_initial_state` / `apply_to_state_machine`), from the local log or, for entries this node lost,
//!   from the leader; `apply` is deterministic, so re-applying gives the same state and revisions.
//! - The recovered `last_applied` may be *ahead* of this node's own recovered log: openraft applies
//!   entries that are committed but only submitted to the local log, and a later flush (any flush, as the
//!   `Db` is shared) may persist the state machine along with the rest. Those entries are committed, so a
//!   quorum holds them durably; on restart openraft sees `last_log_id < last_applied` and treats the log
//!   as purged up to `last_applied` (`get_initial_state`), and the leader re-sends what follows.
//! - Snapshots and purges keep their flushes: a snapshot is durable before the log behind it is purged
//!   (and its flush also persists every state-machine write before it), and an installed snapshot is
//!   durable before openraft purges the log it replaces.
//!
//! `tests/cluster.rs` SIGKILLs every node mid-write and checks that no acknowledged write is lost.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};
use serde::{Deserialize, Serialize};
use sled::transaction::{TransactionError, Transactional};

use super::io_err;
use super::snapshot::{self, SnapshotBuilder};
use crate::codec;
use crate::types::{
    Command, CommandResponse, Compare, CompareResult, CompareTarget, KeyValue, LogId, Snapshot,
    SnapshotData, SnapshotMeta, StoredMembership, TxnOp, TxnOpResult, TypeConfig,
};

pub(super) const LAST_APPLIED_KEY: &[u8] = b"last_applied";
pub(super) const LAST_MEMBERSHIP_KEY: &[u8] = b"last_membership";

/// A key's value and revisions as stored in `sm_data` (the key itself is the sled key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredValue {
    pub value: Vec<u8>,
    pub create_revision: u64,
    pub mod_revision: u64,
    pub version: u64,
}

impl StoredValue {
    fn into_kv(self, key: &[u8]) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            value: self.value,
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
        }
    }
}

/// A cheap, clonable handle. gRPC handlers read through it directly (eventual reads never touch Raft).
#[derive(Clone)]
pub struct StateMachineStore {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) db: sled::Db,
    pub(super) data: sled::Tree,
    pub(super) meta: sled::Tree,
    /// Held while a batch is written and while a snapshot copies the data, so a snapshot is always
    /// one consistent applied state (sled iterators are not point-in-time).
    pub(super) write_lock: tokio::sync::Mutex<()>,
}

impl StateMachineStore {
    pub(super) fn new(
        db: sled::Db,
        data: sled::Tree,
        meta: sled::Tree,
    ) -> Result<Self, super::StoreError> {
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                data,
                meta,
                write_lock: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// Reads one key from the local state.
    pub fn get(&self, key: &[u8]) -> io::Result<Option<KeyValue>> {
        match self.inner.data.get(key).map_err(io_err)? {
            Some(bytes) => Ok(Some(codec::decode::<StoredValue>(&bytes)?.into_kv(key))),
            None => Ok(None),
        }
    }

    /// Reads up to `limit` pairs in `[start, end)` (`end` empty: no upper bound), and whether more remain.
    /// Each pair is consistent; the scan as a whole may interleave with a concurrent apply.
    pub fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> io::Result<(Vec<KeyValue>, bool)> {
        let iter = if end.is_empty() {
            self.inner.data.range(start..)
        } else {
            self.inner.data.range(start..end)
        };
        let mut out = Vec::new();
        for item in iter {
            let (key, bytes) = item.map_err(io_err)?;
            if out.len() == limit {
                return Ok((out, true));
            }
            out.push(codec::decode::<StoredValue>(&bytes)?.into_kv(&key));
        }
        Ok((out, false))
    }

    pub(super) fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> io::Result<Option<T>> {
        match self.inner.meta.get(key).map_err(io_err)? {
            Some(bytes) => Ok(Some(codec::decode(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Writes prepared batches to both trees atomically; durable at the next flush of the `Db`.
    pub(super) fn write(&self, data: &sled::Batch, meta: &sled::Batch) -> io::Result<()> {
        let inner = &self.inner;
        let result: Result<(), TransactionError<String>> =
            (&inner.data, &inner.meta).transaction(|(d, m)| {
                d.apply_batch(data)?;
                m.apply_batch(meta)?;
                Ok(())
            });
        result.map_err(io_err)
    }

    /// Writes prepared batches to both trees atomically, then makes them durable.
    pub(super) async fn commit(&self, data: sled::Batch, meta: sled::Batch) -> io::Result<()> {
        self.write(&data, &meta)?;
        self.inner
            .db
            .flush_async()
            .await
            .map(|_| ())
            .map_err(io_err)
    }
}

/// The keys a batch has touched, over the committed state: later entries in a batch see earlier ones.
struct Overlay<'a> {
    data: &'a sled::Tree,
    changed: HashMap<Vec<u8>, Option<StoredValue>>,
}

impl Overlay<'_> {
    fn get(&mut self, key: &[u8]) -> io::Result<Option<StoredValue>> {
        if let Some(v) = self.changed.get(key) {
            return Ok(v.clone());
        }
        match self.data.get(key).map_err(io_err)? {
            Some(bytes) => Ok(Some(codec::decode(&bytes)?)),
            None => Ok(None),
        }
    }

    fn put(&mut self, key: &[u8], value: Vec<u8>, revision: u64) -> io::Result<Option<KeyValue>> {
        let prev = self.get(key)?;
        let next = match &prev {
            Some(p) => StoredValue {
                value,
                create_revision: p.create_revision,
                mod_revision: revision,
                version: p.version + 1,
            },
            None => StoredValue {
                value,
                create_revision: revision,
                mod_revision: revision,
                version: 1,
            },
        };
        self.changed.insert(key.to_vec(), Some(next));
        Ok(prev.map(|p| p.into_kv(key)))
    }

    fn delete(&mut self, key: &[u8]) -> io::Result<Option<KeyValue>> {
        let prev = self.get(key)?;
        if prev.is_some() {
            self.changed.insert(key.to_vec(), None);
        }
        Ok(prev.map(|p| p.into_kv(key)))
    }

    fn into_batch(self) -> io::Result<sled::Batch> {
        let mut batch = sled::Batch::default();
        for (key, value) in self.changed {
            match value {
                Some(v) => batch.insert(key, codec::encode(&v)?),
                None => batch.remove(key),
            }
        }
        Ok(batch)
    }
}

/// etcd's rule: comparing the value of an absent key always fails (there is no value to compare);
/// the numeric targets of an absent key are 0.
fn compare_holds(cmp: &Compare, current: Option<&StoredValue>) -> bool {
    use std::cmp::Ordering;
    let ordering: Ordering = match (&cmp.target, current) {
        (CompareTarget::Value(_), None) => return false,
        (CompareTarget::Value(v), Some(cur)) => cur.value.as_slice().cmp(v.as_slice()),
        (CompareTarget::Version(v), cur) => cur.map_or(0, |c| c.version).cmp(v),
        (CompareTarget::ModRevision(v), cur) => cur.map_or(0, |c| c.mod_revision).cmp(v),
        (CompareTarget::CreateRevision(v), cur) => cur.map_or(0, |c| c.create_revision).cmp(v),
    };
    match cmp.result {
        CompareResult::Equal => ordering == Ordering::Equal,
        CompareResult::NotEqual => ordering != Ordering::Equal,
        CompareResult::Greater => ordering == Ordering::Greater,
        CompareResult::Less => ordering == Ordering::Less,
    }
}

fn execute(cmd: Command, revision: u64, view: &mut Overlay<'_>) -> io::Result<CommandResponse> {
    Ok(match cmd {
        Command::Put {
            key,
            value,
            prev_kv,
        } => {
            let prev = view.put(&key, value, revision)?;
            CommandResponse::Put {
                prev: prev.filter(|_| prev_kv),
            }
        }
        Command::Delete { key, prev_kv } => {
            let prev = view.delete(&key)?;
            CommandResponse::Delete {
                deleted: prev.is_some(),
                prev: prev.filter(|_| prev_kv),
            }
        }
        Command::Txn(txn) => {
            let mut succeeded = true;
            for cmp in &txn.compare {
                if !compare_holds(cmp, view.get(&cmp.key)?.as_ref()) {
                    succeeded = false;
                    break;
                }
            }
            let ops = if succeeded { txn.success } else { txn.failure };
            let mut results = Vec::with_capacity(ops.len());
            for op in ops {
                results.push(match op {
                    TxnOp::Put {
                        key,
                        value,
                        prev_kv,
                    } => TxnOpResult::Put {
                        prev: view.put(&key, value, revision)?.filter(|_| prev_kv),
                    },
                    TxnOp::Delete { key, prev_kv } => {
                        let prev = view.delete(&key)?;
                        TxnOpResult::Delete {
                            deleted: prev.is_some(),
                            prev: prev.filter(|_| prev_kv),
                        }
                    }
                    TxnOp::Get { key } => TxnOpResult::Get {
                        kv: view.get(&key)?.map(|v| v.into_kv(&key)),
                    },
                });
            }
            CommandResponse::Txn { succeeded, results }
        }
    })
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembership)> {
        let applied = self.read_meta(LAST_APPLIED_KEY)?;
        let membership = self.read_meta(LAST_MEMBERSHIP_KEY)?.unwrap_or_default();
        Ok((applied, membership))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> io::Result<()>
    where
        Strm: Stream<Item = io::Result<EntryResponder<TypeConfig>>> + Unpin + OptionalSend,
    {
        let mut pending = Vec::new();
        let mut last_applied = None;
        let mut membership = None;

        let guard = self.inner.write_lock.lock().await;
        let mut view = Overlay {
            data: &self.inner.data,
            changed: HashMap::new(),
        };
        while let Some((entry, responder)) = entries.try_next().await? {
            let response = match entry.payload {
                EntryPayload::Blank => CommandResponse::None,
                EntryPayload::Normal(cmd) => execute(cmd, entry.log_id.index, &mut view)?,
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m));
                    CommandResponse::None
                }
            };
            last_applied = Some(entry.log_id);
            pending.push((responder, response));
        }
        let Some(last_applied) = last_applied else {
            return Ok(());
        };
        let data = view.into_batch()?;
        let mut meta = sled::Batch::default();
        meta.insert(LAST_APPLIED_KEY, codec::encode(&last_applied)?);
        if let Some(m) = &membership {
            meta.insert(LAST_MEMBERSHIP_KEY, codec::encode(m)?);
        }
        // No flush: see the module comment for why the log's durability is enough.
        self.write(&data, &meta)?;
        drop(guard);

        // Committed (durable on a quorum's logs) and applied: now the clients hear back.
        for (responder, response) in pending {
            if let Some(r) = responder {
                r.send(response);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { sm: self.clone() }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> io::Result<()> {
        snapshot::install(self, meta, snapshot.into_inner()).await
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        snapshot::current(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, sled::Tree) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let t = db.open_tree("t").unwrap();
        (dir, t)
    }

    #[test]
    fn put_tracks_revisions_and_versions() {
        let (_d, t) = tree();
        let mut view = Overlay {
            data: &t,
            changed: HashMap::new(),
        };
        let put = |k: &str, v: &str| Command::Put {
            key: k.into(),
            value: v.into(),
            prev_kv: true,
        };
        assert_eq!(
            execute(put("a", "1"), 5, &mut view).unwrap(),
            CommandResponse::Put { prev: None }
        );
        let r = execute(put("a", "2"), 9, &mut view).unwrap();
        let CommandResponse::Put { prev: Some(prev) } = r else {
            panic!("expected prev_kv, got {r:?}")
        };
        assert_eq!(
            (prev.value.as_slice(), prev.version, prev.mod_revision),
            (&b"1"[..], 1, 5)
        );
        let now = view.get(b"a").unwrap().unwrap();
        assert_eq!(
            (now.create_revision, now.mod_revision, now.version),
            (5, 9, 2)
        );
    }

    #[test]
    fn txn_create_if_absent_then_cas() {
        let (_d, t) = tree();
        let mut view = Overlay {
            data: &t,
            changed: HashMap::new(),
        };
        let create = |v: &str| {
            Command::Txn(crate::types::Txn {
                compare: vec![Compare {
                    key: b"k".to_vec(),
                    result: CompareResult::Equal,
                    target: CompareTarget::Version(0),
                }],
                success: vec![TxnOp::Put {
                    key: b"k".to_vec(),
                    value: v.into(),
                    prev_kv: false,
                }],
                failure: vec![TxnOp::Get { key: b"k".to_vec() }],
            })
        };
        let r1 = execute(create("first"), 1, &mut view).unwrap();
        assert!(matches!(
            r1,
            CommandResponse::Txn {
                succeeded: true,
                ..
            }
        ));
        let r2 = execute(create("second"), 2, &mut view).unwrap();
        let CommandResponse::Txn {
            succeeded: false,
            results,
        } = r2
        else {
            panic!("second create must fail: {r2:?}")
        };
        assert!(matches!(&results[0], TxnOpResult::Get { kv: Some(kv) } if kv.value == b"first"));

        let absent_value = Compare {
            key: b"nope".to_vec(),
            result: CompareResult::NotEqual,
            target: CompareTarget::Value(b"x".to_vec()),
        };
        assert!(
            !compare_holds(&absent_value, None),
            "value compares on absent keys fail, as in etcd"
        );
    }
}
