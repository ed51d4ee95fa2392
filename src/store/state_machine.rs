//! The replicated key-value state, applied from the log.
//!
//! `apply` computes a whole batch of entries against an in-memory overlay of the keys it touches, then
//! writes the changed keys and `last_applied` with plain sled inserts and answers the clients.
//!
//! # Why `apply` neither flushes nor uses a sled transaction
//!
//! Durability of a write comes from the log, not from the state machine: openraft hands an entry to
//! `apply` only once it is committed, i.e. flushed into the logs of a quorum, so a client that hears back
//! has its write on disk on a majority whether or not `sm_data` is. Flushing here would add a second
//! fsync to every batch.
//!
//! Atomicity is not bought from sled either. In sled 0.34 every transaction and every `apply_batch`
//! pins the log with a batch manifest, which seals the current I/O buffer before and after it: two extra
//! buffer writes, each with its own `sync_file_range` and its own job on sled's I/O pool, per call. On
//! the write path that cost more than everything else sled does (plain inserts for the log and the state
//! machine: +20-27 % put throughput, -28 % single-client latency; see docs/benchmarks.md).
//!
//! So a crash can leave `sm_data` half way through a batch, or ahead of `last_applied`. The state machine
//! is therefore trusted on restart only after a clean shutdown ([`StateMachineStore::close`] flushes and
//! leaves a marker naming the `last_applied` it covers). After anything else, [`StateMachineStore::recover`]
//! rebuilds it from the last durable snapshot (or from empty when there is none), and openraft re-applies
//! the committed log after it: at startup up to the commit point this node had saved
//! (`LogStore::save_committed`, durable with the next log flush), the rest once a leader tells it the
//! commit index. That is always possible: the log is purged only behind a snapshot that is already
//! durable (see `snapshot`), and every committed entry after that snapshot is in a quorum's logs.
//! `apply` is deterministic, so re-applying gives the same state and revisions.
//!
//! While the node runs, readers see each key either before or after a batch, never a torn value; a
//! multi-key scan may see part of a batch, as it always could (sled iterators are not point-in-time).
//!
//! `tests/cluster.rs` SIGKILLs every node mid-write and checks that no acknowledged write is lost;
//! `raftkv jepsen` kills and restarts nodes throughout and checks every history.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};
use serde::{Deserialize, Serialize};

use super::history::{Change, History};
use super::leases::{LeaseView, Leases};
use super::record::Record;
use super::snapshot::{self, SnapshotBuilder};
use super::{Integrity, io_err, read_decoded};
use crate::codec;
use crate::sync::lock;
use crate::types::{
    Command, CommandResponse, Compare, CompareResult, CompareTarget, KeyValue, LeaseOp,
    LeaseResponse, LogId, NodeId, Snapshot, SnapshotData, SnapshotMeta, StoredMembership, TxnOp,
    TxnOpResult, TypeConfig,
};

pub(super) const LAST_APPLIED_KEY: &[u8] = b"last_applied";
pub(super) const LAST_MEMBERSHIP_KEY: &[u8] = b"last_membership";
/// The ids of every node a membership change has removed (see [`StateMachineStore::is_retired`]).
pub(crate) const RETIRED_KEY: &[u8] = b"retired_members";
/// Present only between a clean shutdown and the next start; holds the `last_applied` it vouches for.
pub(super) const CLEAN_SHUTDOWN_KEY: &[u8] = b"clean_shutdown";
/// Which of the two data trees is current (absent: the first). A snapshot install fills the other
/// one and switches to it in one transaction (see `snapshot::install`).
pub(crate) const DATA_TREE_KEY: &[u8] = b"data_tree";
/// The two names the data tree alternates between.
pub(crate) const DATA_TREES: [&str; 2] = ["sm_data", "sm_data.1"];

/// A key's value and revisions as stored in `sm_data` (the key itself is the sled key). The value is
/// `serde_bytes` for the reason given on `Command`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredValue {
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    pub create_revision: u64,
    pub mod_revision: u64,
    pub version: u64,
    /// The lease the key is attached to, 0 for none. Outside the serde shape: see the `Record` impl.
    #[serde(skip)]
    pub lease: u64,
}

/// A key without a lease is stored exactly as before leases existed (pinned in `types`), so
/// existing data, snapshots and backups need no rewrite; a key with one has the lease id appended.
/// The two are told apart by length: the old shape leaves the id over as trailing bytes.
impl Record for StoredValue {
    fn encode(&self) -> Result<Vec<u8>, codec::CodecError> {
        if self.lease == 0 {
            codec::encode(self)
        } else {
            codec::encode(&(self, self.lease))
        }
    }
    fn decode(bytes: &[u8]) -> Result<Self, codec::CodecError> {
        match codec::decode::<StoredValue>(bytes) {
            Err(codec::CodecError::Trailing(_)) => {
                let (mut value, lease): (StoredValue, u64) = codec::decode(bytes)?;
                if lease == 0 {
                    return Err(codec::CodecError::Invalid(
                        "a stored value names lease 0".into(),
                    ));
                }
                value.lease = lease;
                Ok(value)
            }
            other => other,
        }
    }
}

impl StoredValue {
    fn into_kv(self, key: &[u8]) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            value: self.value,
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            lease: self.lease,
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
    /// The current data tree. Readers hold the lock for a whole read, so that once an install has
    /// switched trees no one still reads the old one when it is dropped.
    data: RwLock<sled::Tree>,
    pub(super) meta: sled::Tree,
    /// The current snapshot. Not in `meta`: sled rewrites a tree node whole (as a blob file when it is
    /// large) after a few updates to any key in it, and `last_applied` changes with every batch, so a
    /// snapshot stored beside it was rewritten and fsynced again every few applies.
    pub(super) snapshots: sled::Tree,
    /// Held while a batch is written and while a snapshot copies the data, so a snapshot is always
    /// one consistent applied state (sled iterators are not point-in-time).
    pub(super) write_lock: tokio::sync::Mutex<WriteState>,
    /// Serializes snapshot builds and installs: an install replaces the tree a build walks.
    pub(super) snapshot_lock: tokio::sync::Mutex<()>,
    /// While a snapshot is built: the pre-images of keys changed since it began (see
    /// `snapshot::capture`). Taken inside `write_lock`, never the other way round.
    pub(super) capture: Mutex<Option<snapshot::Capture>>,
    pub(super) integrity: Arc<Integrity>,
    /// `RETIRED_KEY`'s set, kept in memory: the peer port asks it of senders it refuses.
    retired: RwLock<BTreeSet<NodeId>>,
    /// The recent changes, for watches (see `history`).
    pub(super) history: History,
    /// Which leases exist and the keys they hold (see `leases`).
    pub(super) leases: Leases,
}

impl Inner {
    /// The current data tree, held for one read.
    pub(super) fn data_read(&self) -> RwLockReadGuard<'_, sled::Tree> {
        self.data.read().unwrap_or_else(|p| p.into_inner())
    }

    /// A handle to the current data tree, for work that runs while nothing can switch it (at open,
    /// or under `snapshot_lock`).
    pub(super) fn data(&self) -> sled::Tree {
        self.data_read().clone()
    }

    /// The data tree that is not current: where an install loads a snapshot.
    pub(super) fn spare_tree_name(&self) -> &'static str {
        let current = self.data_read().name();
        if current.as_ref() == DATA_TREES[0].as_bytes() {
            DATA_TREES[1]
        } else {
            DATA_TREES[0]
        }
    }

    /// Makes `next` the current data tree once every reader of the old one is done; returns the old.
    pub(super) fn switch_data(&self, next: sled::Tree) -> sled::Tree {
        let mut current = self.data.write().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *current, next)
    }
}

#[derive(Default)]
pub(super) struct WriteState {
    /// Set by [`StateMachineStore::close`]: nothing may be applied after the clean-shutdown marker.
    pub(super) closed: bool,
    /// A batch failed half way: the state on disk matches no `last_applied`, so it must never be
    /// marked clean.
    pub(super) torn: bool,
}

impl StateMachineStore {
    pub(super) fn new(
        db: sled::Db,
        data: sled::Tree,
        meta: sled::Tree,
        snapshots: sled::Tree,
        history: sled::Tree,
        leases: sled::Tree,
        integrity: Arc<Integrity>,
    ) -> Result<Self, super::StoreError> {
        let retired = match meta.get(RETIRED_KEY)? {
            Some(bytes) => codec::decode(&bytes)?,
            None => BTreeSet::new(),
        };
        let leases = Leases::new(leases);
        Ok(Self {
            inner: Arc::new(Inner {
                leases,
                retired: RwLock::new(retired),
                db,
                data: RwLock::new(data),
                meta,
                snapshots,
                write_lock: tokio::sync::Mutex::new(WriteState::default()),
                snapshot_lock: tokio::sync::Mutex::new(()),
                capture: Mutex::new(None),
                integrity,
                history: History::new(history),
            }),
        })
    }

    /// Who hears of corruption in this store, and whether it has been found.
    pub fn integrity(&self) -> &Arc<Integrity> {
        &self.inner.integrity
    }

    /// Whether a membership change this replica applied removed node `id`. Node ids are never
    /// reused: a data directory left behind by a removed node still holds its log, and a new node
    /// under its id would inherit that node's votes in other members' eyes. The removals this
    /// replica applied count, and those a snapshot it installed carried.
    pub fn is_retired(&self, id: NodeId) -> bool {
        self.inner
            .retired
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&id)
    }

    /// Every id this replica knows was removed, for a snapshot to carry.
    pub(super) fn retired_ids(&self) -> BTreeSet<NodeId> {
        self.inner
            .retired
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// After `RETIRED_KEY` was written with `ids`.
    pub(super) fn set_retired(&self, ids: BTreeSet<NodeId>) {
        *self
            .inner
            .retired
            .write()
            .unwrap_or_else(|p| p.into_inner()) = ids;
    }

    /// The recent changes this replica applied, for watches.
    pub fn history(&self) -> &History {
        &self.inner.history
    }

    /// The leases this replica has applied.
    pub fn leases(&self) -> &Leases {
        &self.inner.leases
    }

    /// The database, for the background scrub.
    pub fn db(&self) -> &sled::Db {
        &self.inner.db
    }

    /// Reads one key from the local state. Never from a store found corrupt (see `integrity`).
    pub fn get(&self, key: &[u8]) -> io::Result<Option<KeyValue>> {
        let integrity = &self.inner.integrity;
        integrity.ensure_sound()?;
        let read = match self.inner.data_read().get(key).map_err(io_err) {
            Ok(Some(bytes)) => StoredValue::decode(&bytes)
                .map(|v| Some(v.into_kv(key)))
                .map_err(Into::into),
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        integrity.observe("reading a key from sm_data", read)
    }

    /// Reads up to `limit` pairs in `[start, end)` (`end` empty: no upper bound), and whether more remain.
    /// Stops before the pair that would take the response past `max_bytes` (the first pair is always
    /// returned, so a scan moves past any value), counting each pair as its key, its stored bytes and
    /// `pair_overhead`. The stored bytes are counted before decoding, so what is held stays within the
    /// budget plus one pair. Each pair is consistent; the scan as a whole may interleave with a
    /// concurrent apply.
    pub fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        max_bytes: usize,
        pair_overhead: usize,
    ) -> io::Result<(Vec<KeyValue>, bool)> {
        let integrity = &self.inner.integrity;
        integrity.ensure_sound()?;
        let scanned = self.scan_unchecked(start, end, limit, max_bytes, pair_overhead);
        integrity.observe("scanning sm_data", scanned)
    }

    fn scan_unchecked(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        max_bytes: usize,
        pair_overhead: usize,
    ) -> io::Result<(Vec<KeyValue>, bool)> {
        let data = self.inner.data_read();
        let iter = if end.is_empty() {
            data.range(start..)
        } else {
            data.range(start..end)
        };
        let mut out = Vec::new();
        let mut bytes_used = 0usize;
        for item in iter {
            let (key, bytes) = item.map_err(io_err)?;
            let cost = key.len() + bytes.len() + pair_overhead;
            if out.len() == limit || (!out.is_empty() && bytes_used + cost > max_bytes) {
                return Ok((out, true));
            }
            bytes_used += cost;
            out.push(StoredValue::decode(&bytes)?.into_kv(&key));
        }
        Ok((out, false))
    }

    pub(super) fn read_meta<T: Record>(&self, key: &[u8]) -> io::Result<Option<T>> {
        read_decoded(&self.inner.meta, key)
    }

    /// Marks the applied state as complete on disk, for the next start to trust it. Called once Raft
    /// has stopped; anything openraft still tries to apply afterwards is refused, since it would be
    /// written after the marker.
    pub async fn close(&self) -> io::Result<()> {
        let mut state = self.inner.write_lock.lock().await;
        state.closed = true;
        if let Some(what) = self.inner.integrity.corrupt() {
            return Err(io::Error::other(format!(
                "the store is corrupt ({what}); not marking it clean"
            )));
        }
        if state.torn {
            return Err(io::Error::other(
                "an apply failed half way; the state is left to be rebuilt at the next start",
            ));
        }
        let applied: Option<LogId> = self.read_meta(LAST_APPLIED_KEY)?;
        // The marker must not reach the disk before the state it vouches for.
        self.inner.db.flush_async().await.map_err(io_err)?;
        self.inner
            .meta
            .insert(CLEAN_SHUTDOWN_KEY, applied.encode()?)
            .map_err(io_err)?;
        super::durable::flush(&self.inner.db, self.inner.integrity.dir()).await?;
        Ok(())
    }

    /// Makes the state machine one that openraft can re-apply the log on top of. Runs at open, before
    /// openraft reads `applied_state`: after a clean shutdown the state is kept; after anything else it
    /// is rebuilt from the last durable snapshot (see the module comment). The marker is consumed, so a
    /// crash later in this run is not mistaken for a clean stop.
    pub(super) fn recover(&self) -> io::Result<()> {
        let marker = self.inner.meta.remove(CLEAN_SHUTDOWN_KEY).map_err(io_err)?;
        // An unreadable `last_applied` is not fatal here: it is about to be replaced anyway.
        let applied = self.read_meta::<LogId>(LAST_APPLIED_KEY);
        let clean = match (&marker, &applied) {
            (Some(bytes), Ok(applied)) => {
                Option::<LogId>::decode(bytes).is_ok_and(|marked| &marked == applied)
            }
            _ => false,
        };
        let mut applied = applied.ok().flatten();
        if !clean {
            let had_state = applied.is_some() || !self.inner.data_read().is_empty();
            let restored = snapshot::restore_current(self)?;
            if had_state {
                tracing::info!(
                    was_applied = ?applied,
                    restored_to = ?restored,
                    "no clean shutdown: state machine rebuilt from the last snapshot; \
                     openraft re-applies the committed log after it"
                );
            }
            applied = restored;
        } else {
            // Rebuilt with the state otherwise (see `snapshot::restore_current`).
            self.inner.leases.reload(&self.inner.data())?;
        }
        self.inner.history.load(applied.map_or(0, |l| l.index))?;
        self.inner.db.flush().map(|_| ()).map_err(io_err)
    }
}

/// The keys a batch has touched, over the committed state: later entries in a batch see earlier ones.
struct Overlay<'a> {
    data: &'a sled::Tree,
    changed: HashMap<Vec<u8>, Option<StoredValue>>,
    /// The changes of the entry being executed, in order, for the history.
    log: Vec<Change>,
    /// The leases as this batch has left them so far.
    leases: LeaseView,
}

impl Overlay<'_> {
    fn get(&mut self, key: &[u8]) -> io::Result<Option<StoredValue>> {
        if let Some(v) = self.changed.get(key) {
            return Ok(v.clone());
        }
        match self.data.get(key).map_err(io_err)? {
            Some(bytes) => Ok(Some(StoredValue::decode(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Writes `key`, attached to `lease` (0: none; the caller has checked that it exists).
    fn put(
        &mut self,
        key: &[u8],
        value: Vec<u8>,
        revision: u64,
        lease: u64,
    ) -> io::Result<Option<KeyValue>> {
        let prev = self.get(key)?;
        let next = match &prev {
            Some(p) => StoredValue {
                value,
                create_revision: p.create_revision,
                mod_revision: revision,
                version: p.version + 1,
                lease,
            },
            None => StoredValue {
                value,
                create_revision: revision,
                mod_revision: revision,
                version: 1,
                lease,
            },
        };
        self.leases
            .reattach(key, prev.as_ref().map_or(0, |p| p.lease), lease);
        self.changed.insert(key.to_vec(), Some(next.clone()));
        self.log.push(Change {
            key: key.to_vec(),
            kv: Some(next),
            prev: prev.clone(),
        });
        Ok(prev.map(|p| p.into_kv(key)))
    }

    fn delete(&mut self, key: &[u8]) -> io::Result<Option<KeyValue>> {
        let prev = self.get(key)?;
        if let Some(p) = &prev {
            self.leases.reattach(key, p.lease, 0);
            self.changed.insert(key.to_vec(), None);
            self.log.push(Change {
                key: key.to_vec(),
                kv: None,
                prev: prev.clone(),
            });
        }
        Ok(prev.map(|p| p.into_kv(key)))
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
        (CompareTarget::Lease(v), cur) => cur.map_or(0, |c| c.lease).cmp(v),
    };
    match cmp.result {
        CompareResult::Equal => ordering == Ordering::Equal,
        CompareResult::NotEqual => ordering != Ordering::Equal,
        CompareResult::Greater => ordering == Ordering::Greater,
        CompareResult::Less => ordering == Ordering::Less,
    }
}

/// A put naming a lease that does not exist writes nothing, as in etcd.
fn lease_not_found(id: u64) -> CommandResponse {
    CommandResponse::Lease(LeaseResponse::NotFound { id })
}

/// `term`: the term of the entry (of the leader that appended it).
fn execute(
    cmd: Command,
    revision: u64,
    term: u64,
    view: &mut Overlay<'_>,
) -> io::Result<CommandResponse> {
    Ok(match cmd {
        Command::Put {
            key,
            value,
            prev_kv,
        } => {
            let prev = view.put(&key, value, revision, 0)?;
            CommandResponse::Put {
                prev: prev.filter(|_| prev_kv),
            }
        }
        Command::PutWithLease {
            key,
            value,
            prev_kv,
            lease,
        } => {
            if !view.leases.exists(lease) {
                return Ok(lease_not_found(lease));
            }
            let prev = view.put(&key, value, revision, lease)?;
            CommandResponse::Put {
                prev: prev.filter(|_| prev_kv),
            }
        }
        Command::Lease(op) => CommandResponse::Lease(execute_lease(op, revision, term, view)?),
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
            // All or nothing: a txn that names a missing lease writes none of its ops.
            let missing = ops.iter().find_map(|op| match op {
                TxnOp::PutWithLease { lease, .. } if !view.leases.exists(*lease) => Some(*lease),
                _ => None,
            });
            if let Some(id) = missing {
                return Ok(lease_not_found(id));
            }
            let mut results = Vec::with_capacity(ops.len());
            for op in ops {
                results.push(match op {
                    TxnOp::Put {
                        key,
                        value,
                        prev_kv,
                    } => TxnOpResult::Put {
                        prev: view.put(&key, value, revision, 0)?.filter(|_| prev_kv),
                    },
                    TxnOp::PutWithLease {
                        key,
                        value,
                        prev_kv,
                        lease,
                    } => TxnOpResult::Put {
                        prev: view.put(&key, value, revision, lease)?.filter(|_| prev_kv),
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

/// Grants, ends and checkpoints leases. Ending a lease deletes its keys at this revision.
fn execute_lease(
    op: LeaseOp,
    revision: u64,
    term: u64,
    view: &mut Overlay<'_>,
) -> io::Result<LeaseResponse> {
    Ok(match op {
        LeaseOp::Grant { id, ttl_ms } => {
            let id = match id {
                0 => view.leases.free_id(revision),
                id if view.leases.exists(id) => return Ok(LeaseResponse::Exists { id }),
                id => id,
            };
            view.leases.grant(id, revision, ttl_ms);
            LeaseResponse::Granted { id, ttl_ms }
        }
        LeaseOp::Revoke { id } => match view.leases.end(id) {
            None => LeaseResponse::NotFound { id },
            Some(keys) => {
                for key in keys {
                    view.delete(&key)?;
                }
                LeaseResponse::Revoked
            }
        },
        // A leader's decision counts only in an entry of its own term: one it made before it lost
        // office, appended again once it came back, would override a keep-alive that another
        // leader acknowledged in between.
        LeaseOp::Expire { term: decided, .. } | LeaseOp::Checkpoint { term: decided, .. }
            if decided != term =>
        {
            LeaseResponse::Done
        }
        LeaseOp::Expire { leases, .. } => {
            for lease in leases {
                if view.leases.current(&lease) {
                    for key in view.leases.end(lease.id).unwrap_or_default() {
                        view.delete(&key)?;
                    }
                }
            }
            LeaseResponse::Done
        }
        LeaseOp::Checkpoint { remaining, .. } => {
            for (lease, ms) in remaining {
                if view.leases.current(&lease) {
                    view.leases.checkpoint(lease.id, ms);
                }
            }
            LeaseResponse::Done
        }
        LeaseOp::Clear { lease } => {
            if view.leases.current(&lease) {
                view.leases.checkpoint(lease.id, u64::MAX);
            }
            LeaseResponse::Done
        }
    })
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembership)> {
        let state = (|| -> io::Result<(Option<LogId>, StoredMembership)> {
            let applied = self.read_meta(LAST_APPLIED_KEY)?;
            let membership = self.read_meta(LAST_MEMBERSHIP_KEY)?.unwrap_or_default();
            Ok((applied, membership))
        })();
        self.inner
            .integrity
            .observe("reading the applied state", state)
    }

    async fn apply<Strm>(&mut self, entries: Strm) -> io::Result<()>
    where
        Strm: Stream<Item = io::Result<EntryResponder<TypeConfig>>> + Unpin + OptionalSend,
    {
        let started = std::time::Instant::now();
        let applied = self.apply_batch(entries).await;
        metrics::histogram!(crate::telemetry::names::APPLY).record(started.elapsed().as_secs_f64());
        self.inner.integrity.observe("applying", applied)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { sm: self.clone() }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> io::Result<()> {
        let installed = snapshot::install(self, meta, snapshot).await;
        self.inner
            .integrity
            .observe("installing a snapshot", installed)
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        let current = snapshot::current(self);
        self.inner
            .integrity
            .observe("reading the stored snapshot", current)
    }
}

impl StateMachineStore {
    async fn apply_batch<Strm>(&mut self, mut entries: Strm) -> io::Result<()>
    where
        Strm: Stream<Item = io::Result<EntryResponder<TypeConfig>>> + Unpin + OptionalSend,
    {
        let mut pending = Vec::new();
        let mut last_applied = None;
        let mut membership: Option<StoredMembership> = None;
        // Set once a membership entry is in the batch: the removed ids so far plus this batch's.
        let mut retired: Option<BTreeSet<NodeId>> = None;

        let mut guard = self.inner.write_lock.lock().await;
        // Not switched while the write lock is held (an install takes it to switch).
        let data = self.inner.data();
        let mut view = Overlay {
            data: &data,
            changed: HashMap::new(),
            log: Vec::new(),
            leases: LeaseView::new(self.inner.leases.read()),
        };
        let mut history = Vec::new();
        while let Some((entry, responder)) = entries.try_next().await? {
            let response = match entry.payload {
                EntryPayload::Blank => CommandResponse::None,
                EntryPayload::Normal(cmd) => match crate::limits::applicable(&cmd) {
                    Ok(()) => execute(
                        cmd,
                        entry.log_id.index,
                        entry.log_id.leader_id.term,
                        &mut view,
                    )?,
                    // Every replica decides the same (the rules are fixed), so skipping keeps them
                    // identical; the entry stays in the log and counts as applied.
                    Err(e) => {
                        tracing::warn!(index = entry.log_id.index, %cmd, reason = %e, "not applying a committed entry");
                        CommandResponse::Rejected {
                            reason: e.to_string(),
                        }
                    }
                },
                EntryPayload::Membership(m) => {
                    let before: Option<StoredMembership> = match &membership {
                        Some(m) => Some(m.clone()),
                        None => self.read_meta(LAST_MEMBERSHIP_KEY)?,
                    };
                    let retired = retired.get_or_insert_with(|| {
                        self.inner
                            .retired
                            .read()
                            .unwrap_or_else(|p| p.into_inner())
                            .clone()
                    });
                    if let Some(before) = before {
                        for (id, _) in before.membership().nodes() {
                            if m.get_node(id).is_none() {
                                retired.insert(*id);
                            }
                        }
                    }
                    membership = Some(StoredMembership::new(Some(entry.log_id), m));
                    CommandResponse::None
                }
            };
            if !view.log.is_empty() {
                history.push((entry.log_id.index, std::mem::take(&mut view.log)));
            }
            last_applied = Some(entry.log_id);
            pending.push((responder, response));
        }
        let Some(last_applied) = last_applied else {
            return Ok(());
        };
        if guard.closed {
            return Err(io::Error::other("the state machine is closed"));
        }
        // Plain inserts, no flush: see the module comment for why that is safe. Until the last one
        // lands, the state is torn; an error below leaves it marked so.
        guard.torn = true;
        if let Some(capture) = lock(&self.inner.capture).as_mut() {
            // Before the tree changes: a snapshot build must find every pre-image in place.
            for key in view.changed.keys() {
                capture.note(key, || data.get(key)).map_err(io_err)?;
            }
        }
        let Overlay {
            changed, leases, ..
        } = view;
        for (key, value) in changed {
            match value {
                Some(v) => data.insert(key, v.encode()?),
                None => data.remove(key),
            }
            .map_err(io_err)?;
        }
        let lease_changes = leases.changed;
        self.inner.leases.commit(lease_changes)?;
        self.inner.history.write(history)?;
        let meta = &self.inner.meta;
        if let Some(m) = &membership {
            meta.insert(LAST_MEMBERSHIP_KEY, m.encode()?)
                .map_err(io_err)?;
        }
        if let Some(retired) = &retired {
            meta.insert(RETIRED_KEY, codec::encode(retired).map_err(io_err)?)
                .map_err(io_err)?;
        }
        meta.insert(LAST_APPLIED_KEY, last_applied.encode()?)
            .map_err(io_err)?;
        guard.torn = false;
        // Before the write lock is let go: a snapshot capture takes it, and must see the removals
        // of every entry its applied index covers.
        if let Some(retired) = retired {
            self.set_retired(retired);
        }
        drop(guard);
        self.inner.history.publish(last_applied.index);

        // Committed (durable on a quorum's logs) and applied: now the clients hear back.
        for (responder, response) in pending {
            if let Some(r) = responder {
                r.send(response);
            }
        }
        Ok(())
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
        let leases = Leases::new(t.clone());
        let mut view = Overlay {
            data: &t,
            changed: HashMap::new(),
            log: Vec::new(),
            leases: LeaseView::new(leases.read()),
        };
        let put = |k: &str, v: &str| Command::Put {
            key: k.into(),
            value: v.into(),
            prev_kv: true,
        };
        assert_eq!(
            execute(put("a", "1"), 5, 1, &mut view).unwrap(),
            CommandResponse::Put { prev: None }
        );
        let r = execute(put("a", "2"), 9, 1, &mut view).unwrap();
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
        let leases = Leases::new(t.clone());
        let mut view = Overlay {
            data: &t,
            changed: HashMap::new(),
            log: Vec::new(),
            leases: LeaseView::new(leases.read()),
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
        let r1 = execute(create("first"), 1, 1, &mut view).unwrap();
        assert!(matches!(
            r1,
            CommandResponse::Txn {
                succeeded: true,
                ..
            }
        ));
        let r2 = execute(create("second"), 2, 1, &mut view).unwrap();
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
