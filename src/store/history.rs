//! The recent history of changes, for watches: what each revision did to which keys.
//!
//! Every applied revision that changes keys leaves one record in the `sm_history` tree, keyed by the
//! revision (big-endian, so sled's order is revision order). A watch reads the records from the
//! revision it has reached, so a slow watcher costs only its own reads: apply never waits for one.
//! The window is bounded by a count of records and by their bytes (`--watch-history-revisions`,
//! `--watch-history-bytes`); the oldest records go first. History is per node: it is not part of a
//! snapshot, and a snapshot install starts it again after the snapshot's revision.
//!
//! # Knowing where the history is complete
//!
//! A watch may start at a revision only if every change from it on is in the window; otherwise it
//! would silently miss events. Each record therefore names the revision of the record before it
//! (`prev`): "nothing changed between `prev` and me". The window starts at the `prev + 1` of the
//! oldest record whose chain down from the newest is unbroken. A record whose `prev` is itself is a
//! barrier (a snapshot install): nothing before it is known. An empty tree starts after the applied
//! revision.
//!
//! That rule holds whatever a crash leaves, so nothing here needs a flush or a transaction of its
//! own (see `state_machine` for why apply uses neither):
//! - a record removed from the bottom of the window, or one a crash lost in the middle, breaks the
//!   chain there, and the window starts above the break;
//! - records after the applied revision a crash left behind are removed at open, and openraft
//!   re-applies those entries, writing the same records again (apply is deterministic);
//! - the records up to a snapshot's revision were written before that snapshot was flushed, so
//!   rebuilding the state from it at open keeps the history below it;
//! - an install writes its barrier in the same transaction that switches the state.
//!
//! Readers check the start *after* reading: the start moves past a record before the record is
//! removed, so a reader that missed a record always sees that it did.

use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::io_err;
use super::record::Record;
use super::state_machine::StoredValue;
use crate::codec;
use crate::sync::lock;

pub(crate) const TREE: &str = "sm_history";

/// What one revision did to one key. `kv` is the key's new state, `None` for a delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub kv: Option<StoredValue>,
    pub prev: Option<StoredValue>,
}

/// One revision's record as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HistoryRecord {
    /// The revision of the record before this one (this record's own revision for a barrier).
    prev: u64,
    changes: Vec<Change>,
}

/// As for `StoredValue`, a record whose changes name no lease keeps the bytes of format 6; one that
/// does has, appended, the leases of each change's new and previous value.
impl Record for HistoryRecord {
    fn encode(&self) -> Result<Vec<u8>, codec::CodecError> {
        let lease = |v: &Option<StoredValue>| v.as_ref().map_or(0, |v| v.lease);
        let leases: Vec<(u64, u64)> = self
            .changes
            .iter()
            .map(|c| (lease(&c.kv), lease(&c.prev)))
            .collect();
        if leases.iter().all(|&(a, b)| a == 0 && b == 0) {
            codec::encode(self)
        } else {
            codec::encode(&(self, leases))
        }
    }
    fn decode(bytes: &[u8]) -> Result<Self, codec::CodecError> {
        match codec::decode::<HistoryRecord>(bytes) {
            Err(codec::CodecError::Trailing(_)) => {
                let (mut record, leases): (HistoryRecord, Vec<(u64, u64)>) = codec::decode(bytes)?;
                if leases.len() != record.changes.len() {
                    return Err(codec::CodecError::Invalid(
                        "a history record's leases do not match its changes".into(),
                    ));
                }
                for (change, (kv, prev)) in record.changes.iter_mut().zip(leases) {
                    if let Some(v) = change.kv.as_mut() {
                        v.lease = kv;
                    }
                    if let Some(v) = change.prev.as_mut() {
                        v.lease = prev;
                    }
                }
                Ok(record)
            }
            other => other,
        }
    }
}

/// The changes of one revision, as a reader gets them (only those its filter kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revision {
    pub revision: u64,
    pub changes: Vec<Change>,
}

/// A read asked for revisions the window no longer holds. `oldest` is where it starts now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("revision {asked} is no longer in this node's history, which starts at {oldest}")]
pub struct Compacted {
    pub asked: u64,
    pub oldest: u64,
}

/// What a read found: the revisions with matching changes, and the revision it is complete through.
#[derive(Debug, Default)]
pub struct Read {
    pub revisions: Vec<Revision>,
    pub through: u64,
}

/// How much history a node keeps (at least one record, whatever the bytes say).
#[derive(Debug, Clone, Copy)]
pub struct HistoryLimits {
    pub max_revisions: u64,
    pub max_bytes: u64,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        Self {
            max_revisions: 100_000,
            max_bytes: 128 * 1024 * 1024,
        }
    }
}

/// What the writer keeps of the window; changed only under the state machine's write lock.
#[derive(Debug, Default)]
struct Tally {
    /// The newest record's revision, or the revision the window starts after when it is empty.
    last: u64,
    records: u64,
    bytes: u64,
}

pub struct History {
    tree: sled::Tree,
    /// The oldest revision from which every change is in the tree. Only grows while the node runs.
    start: AtomicU64,
    /// The applied revision, published once its records are written.
    applied: watch::Sender<u64>,
    tally: Mutex<Tally>,
    max_revisions: AtomicU64,
    max_bytes: AtomicU64,
}

fn key_of(revision: u64) -> [u8; 8] {
    revision.to_be_bytes()
}

fn revision_of(key: &[u8]) -> io::Result<u64> {
    super::u64_of_key(TREE, key)
}

impl History {
    /// The history in `tree`, not usable until [`History::load`] has run.
    pub(super) fn new(tree: sled::Tree) -> Self {
        let (applied, _) = watch::channel(0);
        let limits = HistoryLimits::default();
        Self {
            tree,
            start: AtomicU64::new(1),
            applied,
            tally: Mutex::new(Tally::default()),
            max_revisions: AtomicU64::new(limits.max_revisions),
            max_bytes: AtomicU64::new(limits.max_bytes),
        }
    }

    pub fn set_limits(&self, limits: HistoryLimits) {
        self.max_revisions
            .store(limits.max_revisions.max(1), Ordering::Relaxed);
        self.max_bytes.store(limits.max_bytes, Ordering::Relaxed);
    }

    pub(super) fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// Finds where the window starts, once the state stands at `applied` (at open, after recovery).
    /// Removes the records after `applied` (openraft writes them again) and those below the start.
    pub(super) fn load(&self, applied: u64) -> io::Result<()> {
        for item in self.tree.range(key_of(applied.saturating_add(1))..) {
            let (k, _) = item.map_err(io_err)?;
            self.tree.remove(k).map_err(io_err)?;
        }
        let mut start = applied + 1;
        let mut last = None;
        let mut expect: Option<u64> = None;
        let (mut records, mut bytes) = (0u64, 0u64);
        for item in self.tree.iter().rev() {
            let (k, v) = item.map_err(io_err)?;
            let revision = revision_of(&k)?;
            if expect.is_some_and(|e| e != revision) {
                break;
            }
            let record = HistoryRecord::decode(&v)?;
            last.get_or_insert(revision);
            records += 1;
            bytes += v.len() as u64;
            if record.prev >= revision {
                start = revision + 1;
                break;
            }
            start = record.prev + 1;
            expect = Some(record.prev);
        }
        for item in self.tree.range(..key_of(start)) {
            let (k, v) = item.map_err(io_err)?;
            if revision_of(&k)? + 1 == start && HistoryRecord::decode(&v)?.changes.is_empty() {
                // The barrier the window starts after: kept until the window moves on.
                continue;
            }
            self.tree.remove(k).map_err(io_err)?;
        }
        self.start.store(start, Ordering::SeqCst);
        *lock(&self.tally) = Tally {
            last: last.unwrap_or(applied),
            records,
            bytes,
        };
        self.applied.send_replace(applied);
        Ok(())
    }

    /// Writes one record per revision in `batch` (in revision order), then trims the window. Called
    /// under the state machine's write lock, before [`History::publish`].
    pub(super) fn write(&self, batch: Vec<(u64, Vec<Change>)>) -> io::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut tally = lock(&self.tally);
        for (revision, changes) in batch {
            let bytes = HistoryRecord {
                prev: tally.last,
                changes,
            }
            .encode()?;
            tally.bytes += bytes.len() as u64;
            tally.records += 1;
            tally.last = revision;
            self.tree.insert(key_of(revision), bytes).map_err(io_err)?;
        }
        self.trim(&mut tally)
    }

    fn trim(&self, tally: &mut Tally) -> io::Result<()> {
        let max_revisions = self.max_revisions.load(Ordering::Relaxed);
        let max_bytes = self.max_bytes.load(Ordering::Relaxed);
        while tally.records > 1 && (tally.records > max_revisions || tally.bytes > max_bytes) {
            let Some((k, v)) = self.tree.first().map_err(io_err)? else {
                break;
            };
            let revision = revision_of(&k)?;
            // Before the removal: a reader that misses the record must see that it may have.
            self.start.fetch_max(revision + 1, Ordering::SeqCst);
            self.tree.remove(&k).map_err(io_err)?;
            tally.records = tally.records.saturating_sub(1);
            tally.bytes = tally.bytes.saturating_sub(v.len() as u64);
        }
        Ok(())
    }

    /// Tells watchers that everything up to `applied` can be read.
    pub(super) fn publish(&self, applied: u64) {
        self.applied.send_if_modified(|current| {
            let newer = applied > *current;
            if newer {
                *current = applied;
            }
            newer
        });
    }

    /// The barrier an install at `revision` writes in its switching transaction.
    pub(super) fn barrier(revision: u64) -> Result<([u8; 8], Vec<u8>), codec::CodecError> {
        let record = HistoryRecord {
            prev: revision,
            changes: Vec::new(),
        };
        Ok((key_of(revision), record.encode()?))
    }

    /// After an install at `revision` switched the state (its barrier is written): nothing before
    /// it can be streamed any more. The records below it are removed by [`History::drop_below`].
    /// Called under the write lock, before [`History::publish`].
    pub(super) fn installed(&self, revision: u64, barrier_bytes: u64) {
        self.start.fetch_max(revision + 1, Ordering::SeqCst);
        let mut tally = lock(&self.tally);
        *tally = Tally {
            last: revision,
            records: 1,
            bytes: barrier_bytes,
        };
    }

    /// Removes the records an install left below its barrier, oldest first.
    pub(super) fn drop_below(&self, revision: u64) -> io::Result<()> {
        for item in self.tree.range(..key_of(revision)) {
            let (k, _) = item.map_err(io_err)?;
            self.tree.remove(k).map_err(io_err)?;
        }
        Ok(())
    }

    /// The oldest revision a watch can start from.
    pub fn start(&self) -> u64 {
        self.start.load(Ordering::SeqCst)
    }

    /// The applied revision, to wait on.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Reads the changes of revisions `from..=through` that `keep` keeps, whole revisions only, until
    /// about `max_bytes` of kept changes or `max_records` records were read (at least one revision).
    /// [`Compacted`] when the window no longer holds `from`.
    pub fn read(
        &self,
        from: u64,
        through: u64,
        keep: impl Fn(&[u8]) -> bool,
        max_bytes: usize,
        max_records: usize,
    ) -> io::Result<Result<Read, Compacted>> {
        let mut out = Read {
            revisions: Vec::new(),
            through,
        };
        if from <= through {
            let (mut bytes, mut records) = (0usize, 0usize);
            for item in self.tree.range(key_of(from)..=key_of(through)) {
                let (k, v) = item.map_err(io_err)?;
                let revision = revision_of(&k)?;
                if records >= max_records || bytes >= max_bytes {
                    out.through = revision - 1;
                    break;
                }
                records += 1;
                let record = HistoryRecord::decode(&v)?;
                let changes: Vec<Change> = record
                    .changes
                    .into_iter()
                    .filter(|c| keep(&c.key))
                    .collect();
                if changes.is_empty() {
                    continue;
                }
                bytes += changes.iter().map(change_bytes).sum::<usize>();
                out.revisions.push(Revision { revision, changes });
            }
        }
        let oldest = self.start();
        if from < oldest {
            return Ok(Err(Compacted {
                asked: from,
                oldest,
            }));
        }
        Ok(Ok(out))
    }
}

/// About what a change costs in a response.
pub fn change_bytes(c: &Change) -> usize {
    let value = |v: &Option<StoredValue>| v.as_ref().map_or(0, |v| v.value.len());
    2 * c.key.len() + value(&c.kv) + value(&c.prev) + 64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(v: &str, rev: u64) -> Option<StoredValue> {
        Some(StoredValue {
            value: v.into(),
            create_revision: rev,
            mod_revision: rev,
            version: 1,
            lease: 0,
        })
    }

    fn put(key: &str, rev: u64) -> Vec<Change> {
        vec![Change {
            key: key.into(),
            kv: value("v", rev),
            prev: None,
        }]
    }

    fn history() -> (tempfile::TempDir, sled::Db, History) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let h = History::new(db.open_tree(TREE).unwrap());
        h.load(0).unwrap();
        (dir, db, h)
    }

    fn revisions(h: &History, from: u64, through: u64) -> Result<Vec<u64>, Compacted> {
        h.read(from, through, |_| true, usize::MAX, usize::MAX)
            .unwrap()
            .map(|r| r.revisions.iter().map(|r| r.revision).collect())
    }

    #[test]
    fn reads_whole_revisions_in_order_and_filters_keys() {
        let (_d, _db, h) = history();
        h.write(vec![(2, put("a", 2)), (3, put("b", 3)), (5, put("a", 5))])
            .unwrap();
        assert_eq!(revisions(&h, 1, 5), Ok(vec![2, 3, 5]));
        assert_eq!(revisions(&h, 3, 4), Ok(vec![3]));
        let only_a = h
            .read(1, 5, |k| k == b"a", usize::MAX, usize::MAX)
            .unwrap()
            .unwrap();
        let got: Vec<u64> = only_a.revisions.iter().map(|r| r.revision).collect();
        assert_eq!((got, only_a.through), (vec![2, 5], 5));
        let one = h.read(1, 5, |_| true, 1, usize::MAX).unwrap().unwrap();
        assert_eq!((one.revisions.len(), one.through), (1, 2));
    }

    #[test]
    fn trimming_moves_the_start_and_readers_see_it() {
        let (_d, _db, h) = history();
        h.set_limits(HistoryLimits {
            max_revisions: 2,
            max_bytes: u64::MAX,
        });
        h.write(vec![(2, put("a", 2)), (3, put("b", 3)), (7, put("c", 7))])
            .unwrap();
        assert_eq!(h.start(), 3);
        assert_eq!(
            revisions(&h, 2, 7),
            Err(Compacted {
                asked: 2,
                oldest: 3
            })
        );
        assert_eq!(revisions(&h, 3, 7), Ok(vec![3, 7]));
    }

    #[test]
    fn load_finds_the_unbroken_window_after_a_crash() {
        let (_d, db, h) = history();
        h.write(vec![(2, put("a", 2)), (4, put("b", 4)), (6, put("c", 6))])
            .unwrap();
        h.write(vec![(9, put("d", 9))]).unwrap();
        // A crash lost record 4 but kept 6 and 9, and the state was rebuilt at 8.
        h.tree.remove(key_of(4)).unwrap();
        let reopened = History::new(db.open_tree(TREE).unwrap());
        reopened.load(8).unwrap();
        assert_eq!(reopened.start(), 5, "the chain breaks below 6");
        assert_eq!(revisions(&reopened, 5, 8), Ok(vec![6]));
        assert!(reopened.tree.get(key_of(9)).unwrap().is_none());
        // Re-applying 9 links it to 6 again.
        reopened.write(vec![(9, put("d", 9))]).unwrap();
        let again = History::new(db.open_tree(TREE).unwrap());
        again.load(9).unwrap();
        assert_eq!(again.start(), 5);
    }

    #[test]
    fn an_install_barrier_hides_what_came_before() {
        let (_d, db, h) = history();
        h.write(vec![(2, put("a", 2)), (3, put("b", 3))]).unwrap();
        let (k, v) = History::barrier(10).unwrap();
        h.tree.insert(k, v.clone()).unwrap();
        h.installed(10, v.len() as u64);
        assert_eq!(
            revisions(&h, 3, 10),
            Err(Compacted {
                asked: 3,
                oldest: 11
            })
        );
        h.write(vec![(12, put("c", 12))]).unwrap();
        // Reopened before the old records were dropped: the barrier still bounds the window.
        let reopened = History::new(db.open_tree(TREE).unwrap());
        reopened.load(12).unwrap();
        assert_eq!(reopened.start(), 11);
        assert_eq!(revisions(&reopened, 11, 12), Ok(vec![12]));
        assert!(reopened.tree.get(key_of(2)).unwrap().is_none());
    }

    #[test]
    fn an_empty_history_starts_after_the_applied_revision() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let h = History::new(db.open_tree(TREE).unwrap());
        h.load(41).unwrap();
        assert_eq!(h.start(), 42);
        h.write(vec![(43, put("a", 43))]).unwrap();
        assert_eq!(revisions(&h, 42, 43), Ok(vec![43]));
    }
}
