//! The replicated half of leases: which leases exist, their granted TTLs, the countdown the leader
//! last checkpointed, and which keys each one holds.
//!
//! Everything here changes only by applying the log, so every replica holds the same table. Time is
//! not here: the leader keeps each lease's deadline on its own clock and writes what it decides
//! into the log (`node::lease`). A lease's record lives in the `sm_leases` tree (id, big-endian ->
//! [`LeaseRecord`]) and travels in snapshots; the keys a lease holds are recorded on the keys
//! themselves (`StoredValue::lease`), and the id -> keys index is kept in memory only, rebuilt from
//! the data at open and after an install. A store that has never granted a lease skips that walk.
//!
//! Apply computes a batch's lease changes in a [`LeaseView`] beside its key overlay, and commits
//! both together; readers see the table before or after a batch.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use super::io_err;
use super::record::Record;
use super::state_machine::StoredValue;
use crate::codec;

pub(crate) const TREE: &str = "sm_leases";

/// A lease as stored: what it was granted, and the remaining time of its last checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The revision of the grant: which grant of the id this is (see `types::LeaseRef`).
    pub granted_at: u64,
    pub granted_ms: u64,
    /// Remaining milliseconds as of the last checkpoint; `None` once a keep-alive has reset it (or
    /// before the first). A new leader starts the countdown from here, or from `granted_ms`.
    pub checkpoint_ms: Option<u64>,
}

impl Record for LeaseRecord {
    fn encode(&self) -> Result<Vec<u8>, codec::CodecError> {
        codec::encode(self)
    }
    fn decode(bytes: &[u8]) -> Result<Self, codec::CodecError> {
        codec::decode(bytes)
    }
}

/// A lease in memory: its record and the keys attached to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub record: LeaseRecord,
    pub keys: BTreeSet<Vec<u8>>,
}

pub type Table = BTreeMap<u64, Lease>;

/// The lease table: `sm_leases` on disk, with the key index, in memory.
pub struct Leases {
    tree: sled::Tree,
    /// Shared, so apply can compute a batch against it across awaits; a commit while a reader holds
    /// the old table copies it.
    table: RwLock<Arc<Table>>,
}

impl Leases {
    /// An empty table over `tree`. Nothing is read yet: after a crash `tree` and the data may not
    /// agree until recovery has rebuilt the state, which then calls [`Leases::reload`].
    pub(super) fn new(tree: sled::Tree) -> Self {
        Leases {
            tree,
            table: RwLock::new(Arc::new(Table::new())),
        }
    }

    /// Loads the records, and the key index from `data` when any lease exists.
    #[cfg(test)]
    fn open(tree: sled::Tree, data: &sled::Tree) -> io::Result<Self> {
        let leases = Leases::new(tree);
        leases.reload(data)?;
        Ok(leases)
    }

    pub(super) fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// The table as it stands after the last applied batch.
    pub fn read(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Every lease's record, for a snapshot.
    pub(super) fn records(&self) -> Vec<(u64, LeaseRecord)> {
        self.read().iter().map(|(id, l)| (*id, l.record)).collect()
    }

    /// Rebuilds memory from `sm_leases` and `data`: at open once the state is recovered, and after
    /// an install replaced both.
    pub(super) fn reload(&self, data: &sled::Tree) -> io::Result<()> {
        let mut table = Table::new();
        for item in self.tree.iter() {
            let (key, bytes) = item.map_err(io_err)?;
            let id = id_of(&key)?;
            let record = LeaseRecord::decode(&bytes)?;
            table.insert(
                id,
                Lease {
                    record,
                    keys: BTreeSet::new(),
                },
            );
        }
        if !table.is_empty() {
            attach_keys(&mut table, data)?;
        }
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
        Ok(())
    }

    /// The table `records` make over `data`, for an install to build before it switches (the
    /// switch itself must not fail half way) and swap in with [`Leases::replace`].
    pub(super) fn build(records: &[(u64, LeaseRecord)], data: &sled::Tree) -> io::Result<Table> {
        let mut table: Table = records
            .iter()
            .map(|(id, record)| {
                (
                    *id,
                    Lease {
                        record: *record,
                        keys: BTreeSet::new(),
                    },
                )
            })
            .collect();
        if !table.is_empty() {
            attach_keys(&mut table, data)?;
        }
        Ok(table)
    }

    /// Makes `table` the one in memory (its records are already in `sm_leases`).
    pub(super) fn replace(&self, table: Table) {
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
    }

    /// Writes a batch's lease changes to `sm_leases` (plain inserts, like the rest of apply) and
    /// then into memory. Called under the state machine's write lock.
    pub(super) fn commit(&self, changed: BTreeMap<u64, Option<Lease>>) -> io::Result<()> {
        if changed.is_empty() {
            return Ok(());
        }
        for (id, lease) in &changed {
            match lease {
                Some(l) => self
                    .tree
                    .insert(id.to_be_bytes(), l.record.encode()?)
                    .map(|_| ()),
                None => self.tree.remove(id.to_be_bytes()).map(|_| ()),
            }
            .map_err(io_err)?;
        }
        let mut guard = self.table.write().unwrap_or_else(|p| p.into_inner());
        let table = Arc::make_mut(&mut guard);
        for (id, lease) in changed {
            match lease {
                Some(l) => table.insert(id, l),
                None => table.remove(&id),
            };
        }
        Ok(())
    }

    /// The batch that makes `sm_leases` hold exactly `records`, for an install's transaction.
    pub(super) fn replace_batch(&self, records: &[(u64, LeaseRecord)]) -> io::Result<sled::Batch> {
        let mut batch = sled::Batch::default();
        for item in self.tree.iter() {
            let (key, _) = item.map_err(io_err)?;
            batch.remove(key);
        }
        for (id, record) in records {
            batch.insert(&id.to_be_bytes(), record.encode()?);
        }
        Ok(batch)
    }
}

fn id_of(key: &[u8]) -> io::Result<u64> {
    super::u64_of_key(TREE, key)
}

/// Fills each lease's key set from the keys that name it. A key naming a lease the table does not
/// hold is corruption: apply removes a lease's keys in the same batch as the lease.
fn attach_keys(table: &mut Table, data: &sled::Tree) -> io::Result<()> {
    for item in data.iter() {
        let (key, bytes) = item.map_err(io_err)?;
        let value = StoredValue::decode(&bytes)?;
        if value.lease == 0 {
            continue;
        }
        match table.get_mut(&value.lease) {
            Some(lease) => {
                lease.keys.insert(key.to_vec());
            }
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "a key is attached to lease {}, which {TREE} does not hold",
                        value.lease
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// A batch's view of the lease table: the committed table plus this batch's changes.
pub(super) struct LeaseView {
    base: Arc<Table>,
    pub(super) changed: BTreeMap<u64, Option<Lease>>,
}

impl LeaseView {
    pub(super) fn new(base: Arc<Table>) -> Self {
        LeaseView {
            base,
            changed: BTreeMap::new(),
        }
    }

    pub(super) fn get(&self, id: u64) -> Option<&Lease> {
        match self.changed.get(&id) {
            Some(changed) => changed.as_ref(),
            None => self.base.get(&id),
        }
    }

    pub(super) fn exists(&self, id: u64) -> bool {
        self.get(id).is_some()
    }

    fn get_mut(&mut self, id: u64) -> Option<&mut Lease> {
        if !self.changed.contains_key(&id) {
            let base = self.base.get(&id)?.clone();
            self.changed.insert(id, Some(base));
        }
        self.changed.get_mut(&id).and_then(Option::as_mut)
    }

    pub(super) fn grant(&mut self, id: u64, granted_at: u64, granted_ms: u64) {
        self.changed.insert(
            id,
            Some(Lease {
                record: LeaseRecord {
                    granted_at,
                    granted_ms,
                    checkpoint_ms: None,
                },
                keys: BTreeSet::new(),
            }),
        );
    }

    /// Whether `lease` is the grant that holds its id now.
    pub(super) fn current(&self, lease: &crate::types::LeaseRef) -> bool {
        self.get(lease.id)
            .is_some_and(|l| l.record.granted_at == lease.granted_at)
    }

    /// Ends a lease and returns the keys it held, for the caller to delete.
    pub(super) fn end(&mut self, id: u64) -> Option<BTreeSet<Vec<u8>>> {
        let lease = self.get(id)?.clone();
        self.changed.insert(id, None);
        Some(lease.keys)
    }

    pub(super) fn checkpoint(&mut self, id: u64, remaining_ms: u64) {
        if let Some(lease) = self.get_mut(id) {
            lease.record.checkpoint_ms =
                (remaining_ms < lease.record.granted_ms).then_some(remaining_ms);
        }
    }

    /// Moves `key` from lease `from` to lease `to` (either may be 0: none).
    pub(super) fn reattach(&mut self, key: &[u8], from: u64, to: u64) {
        if from == to {
            return;
        }
        if from != 0
            && let Some(lease) = self.get_mut(from)
        {
            lease.keys.remove(key);
        }
        if to != 0
            && let Some(lease) = self.get_mut(to)
        {
            lease.keys.insert(key.to_vec());
        }
    }

    /// The id a grant with id 0 gets: `preferred` (the entry's index), or the next free one above.
    pub(super) fn free_id(&self, preferred: u64) -> u64 {
        let mut id = preferred.max(1);
        while self.exists(id) {
            id = id.wrapping_add(1).max(1);
        }
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_changes_nothing_until_committed_and_keeps_keys_with_their_lease() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let data = db.open_tree("sm_data").unwrap();
        let leases = Leases::open(db.open_tree(TREE).unwrap(), &data).unwrap();
        let changed = {
            let mut view = LeaseView::new(leases.read());
            view.grant(7, 1, 5000);
            view.reattach(b"a", 0, 7);
            view.reattach(b"b", 0, 7);
            view.reattach(b"b", 7, 0);
            assert_eq!(view.free_id(7), 8);
            view.checkpoint(7, 1200);
            view.changed
        };
        assert!(leases.read().is_empty());
        leases.commit(changed).unwrap();
        let lease = leases.read()[&7].clone();
        assert_eq!(lease.record.checkpoint_ms, Some(1200));
        assert_eq!(lease.keys, BTreeSet::from([b"a".to_vec()]));

        // The index comes back from the keys themselves.
        let stored = StoredValue {
            value: b"v".to_vec(),
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            lease: 7,
        };
        data.insert(b"a", stored.encode().unwrap()).unwrap();
        let again = Leases::open(leases.tree().clone(), &data).unwrap();
        assert_eq!(*again.read(), *leases.read());

        // A checkpoint at the full TTL is a reset.
        let changed = {
            let mut view = LeaseView::new(again.read());
            view.checkpoint(7, 5000);
            assert_eq!(view.end(7), Some(BTreeSet::from([b"a".to_vec()])));
            assert!(!view.exists(7));
            view.changed
        };
        again.commit(changed).unwrap();
        assert!(again.read().is_empty());
        assert!(again.tree().is_empty());
    }

    #[test]
    fn a_key_naming_a_missing_lease_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let data = db.open_tree("sm_data").unwrap();
        let tree = db.open_tree(TREE).unwrap();
        let record = LeaseRecord {
            granted_at: 1,
            granted_ms: 1000,
            checkpoint_ms: None,
        };
        tree.insert(1u64.to_be_bytes(), record.encode().unwrap())
            .unwrap();
        let stored = StoredValue {
            value: vec![],
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            lease: 2,
        };
        data.insert(b"k", stored.encode().unwrap()).unwrap();
        let err = Leases::open(tree, &data).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
