//! The Raft log and vote, with group commit.
//!
//! openraft 0.10 submits appends without waiting for them, so many appends can be in flight. Each append
//! writes its entries into sled at once (so they are readable) and queues its completion callback for a
//! single flusher thread. The flusher takes every queued callback, runs one blocking `flush`, and
//! completes them all: one fsync covers every append that was written before it started. That is the
//! difference between ~2k and ~10k+ writes/s on this storage.
//!
//! The flusher is a dedicated OS thread rather than a task awaiting `flush_async`: sled 0.34 runs each
//! `flush_async` as a job on its I/O pool, which wakes every idle pool thread per job, and the result
//! then has to hop back to a tokio worker. A thread that blocks in `flush` skips both hand-offs.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use std::sync::{Arc, mpsc};

use super::record::Record;
use super::{Integrity, io_err, read_decoded};
use crate::types::{Entry, LogId, TypeConfig, Vote};

pub(super) const VOTE_KEY: &[u8] = b"vote";
pub(super) const COMMITTED_KEY: &[u8] = b"committed";
pub(super) const LAST_PURGED_KEY: &[u8] = b"last_purged";

/// A cheap handle: sled trees are reference counted, and the flusher queue is shared.
#[derive(Clone)]
pub struct LogStore {
    pub(super) db: sled::Db,
    logs: sled::Tree,
    pub(super) meta: sled::Tree,
    flusher: mpsc::Sender<IOFlushed<TypeConfig>>,
    integrity: Arc<Integrity>,
}

impl LogStore {
    /// Starts the flusher thread; it ends once every handle (and so every sender) is dropped.
    pub(super) fn new(
        db: sled::Db,
        logs: sled::Tree,
        meta: sled::Tree,
        integrity: Arc<Integrity>,
    ) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let flusher_db = db.clone();
        let flusher_integrity = integrity.clone();
        std::thread::Builder::new()
            .name("raftkv-log-flush".into())
            .spawn(move || run_flusher(&flusher_db, &flusher_integrity, &rx))?;
        Ok(Self {
            db,
            logs,
            meta,
            flusher: tx,
            integrity,
        })
    }

    /// Cuts the log at its first missing index. Appends are plain inserts and only a flush makes them
    /// durable, so if sled recovered a later unflushed entry without an earlier one, the log would have a
    /// gap that openraft cannot read past. No entry after such a gap was ever reported flushed (a flush
    /// covers every earlier write), so dropping them loses nothing acknowledged. Runs at open.
    pub(super) fn repair(&self) -> io::Result<()> {
        let purged: Option<LogId> = self.read_meta(LAST_PURGED_KEY)?;
        let mut expected = purged.map(|p| p.index.saturating_add(1));
        let mut orphans = Vec::new();
        for item in self.logs.range(index_key(expected.unwrap_or(0))..) {
            let (key, _) = item.map_err(io_err)?;
            let index = decode_index(&key)?;
            if !orphans.is_empty() || expected.is_some_and(|e| e != index) {
                orphans.push(key);
            } else {
                expected = Some(index.saturating_add(1));
            }
        }
        if let Some(first) = orphans.first() {
            tracing::warn!(
                missing = ?expected,
                first_dropped = decode_index(first)?,
                dropped = orphans.len(),
                "log had a gap after a crash; dropping the unflushed entries after it"
            );
            for key in orphans {
                self.logs.remove(key).map_err(io_err)?;
            }
            self.db.flush().map_err(io_err)?;
        }
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        self.db.flush_async().await.map(|_| ()).map_err(io_err)
    }

    fn read_meta<T: Record>(&self, key: &[u8]) -> io::Result<Option<T>> {
        read_decoded(&self.meta, key)
    }
}

/// Completes queued append callbacks in batches, one flush per batch. Appends queued while a flush
/// runs wait for the next one: that flush may have started before their entries were written.
fn run_flusher(db: &sled::Db, integrity: &Integrity, rx: &mpsc::Receiver<IOFlushed<TypeConfig>>) {
    let mut batch = Vec::new();
    while let Ok(first) = rx.recv() {
        batch.push(first);
        batch.extend(rx.try_iter());
        // Every callback in `batch` was queued after its entries were written, so this flush covers all.
        let result = integrity.observe("flushing the log", db.flush().map_err(io_err));
        if let Err(e) = &result {
            tracing::error!(error = %e, "log flush failed; the node will stop");
        }
        for callback in batch.drain(..) {
            callback.io_completed(match &result {
                Ok(_) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            });
        }
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn decode_index(key: &[u8]) -> io::Result<u64> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "log key is not 8 bytes"))?;
    Ok(u64::from_be_bytes(bytes))
}

/// Turns any range of log indexes into the half-open `[start, end)` form sled iterates.
fn to_half_open(range: &impl RangeBounds<u64>) -> (u64, Option<u64>) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.checked_add(1),
        Bound::Excluded(&e) => Some(e),
        Bound::Unbounded => None,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<Entry>> {
        let entries = self.read_entries(&range);
        self.integrity.observe("reading log entries", entries)
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        let vote = self.read_meta(VOTE_KEY);
        self.integrity.observe("reading the vote", vote)
    }
}

impl LogStore {
    fn read_entries(&self, range: &impl RangeBounds<u64>) -> io::Result<Vec<Entry>> {
        self.integrity.ensure_sound()?;
        let (start, end) = to_half_open(range);
        // Never hand out entries a crash left behind at or below the purge marker (see get_log_state).
        let start = match self.read_meta::<LogId>(LAST_PURGED_KEY)? {
            Some(p) => start.max(p.index.saturating_add(1)),
            None => start,
        };
        let iter = match end {
            Some(end) if end <= start => return Ok(Vec::new()),
            Some(end) => self.logs.range(index_key(start)..index_key(end)),
            None => self.logs.range(index_key(start)..),
        };
        iter.map(|item| {
            let (_, bytes) = item.map_err(io_err)?;
            Ok(Entry::decode(&bytes)?)
        })
        .collect()
    }

    fn log_state(&self) -> io::Result<LogState<TypeConfig>> {
        let last_purged: Option<LogId> = self.read_meta(LAST_PURGED_KEY)?;
        let last = match self.logs.last().map_err(io_err)? {
            Some((_, bytes)) => Some(Entry::decode(&bytes)?.log_id),
            None => None,
        };
        // A crash between `purge` making its marker durable and its deletes reaching disk leaves
        // entries at or below the marker (typically after a snapshot install purged past a lagging
        // log). They are dead: the log ends at the marker unless something newer follows it.
        let last = match (last, last_purged) {
            (Some(l), Some(p)) if l.index <= p.index => Some(p),
            (l, p) => l.or(p),
        };
        Ok(LogState {
            last_log_id: last,
            last_purged_log_id: last_purged,
        })
    }

    /// See `read_committed`.
    fn committed(&self) -> io::Result<Option<LogId>> {
        let Some(committed) = self.read_meta::<Option<LogId>>(COMMITTED_KEY)?.flatten() else {
            return Ok(None);
        };
        let state = self.log_state()?;
        let purged_index = state.last_purged_log_id.as_ref().map(|p| p.index);
        if purged_index.is_some_and(|p| committed.index <= p) {
            // Behind the snapshot: openraft starts from the applied state anyway.
            return Ok(Some(committed));
        }
        let Some(last) = state.last_log_id else {
            return Ok(None);
        };
        let index = committed.index.min(last.index);
        match self.logs.get(index_key(index)).map_err(io_err)? {
            Some(bytes) => {
                let found = Entry::decode(&bytes)?.log_id;
                // At the saved index the entry must be the very one that was committed.
                Ok((index < committed.index || found == committed).then_some(found))
            }
            None => Ok(None),
        }
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        let state = self.log_state();
        self.integrity.observe("reading the log state", state)
    }

    /// A plain insert, durable with the next flush (a log append's or sled's once-a-second one). It lets
    /// a restarted node re-apply its own log up to what it knew was committed before it serves
    /// anything, instead of falling back to its last snapshot until it hears from a leader.
    async fn save_committed(&mut self, committed: Option<LogId>) -> io::Result<()> {
        let result = async {
            self.meta
                .insert(COMMITTED_KEY, committed.encode()?)
                .map_err(io_err)?;
            io::Result::Ok(())
        }
        .await;
        self.integrity.observe("saving the commit point", result)
    }

    /// The saved commit point, but never past what this log still holds: entries after the last
    /// flush may be gone, and those before it are the ones that were committed (a commit point is
    /// saved only for entries already in the log, and only a later leader could have replaced them,
    /// which would have needed them to be uncommitted).
    async fn read_committed(&mut self) -> io::Result<Option<LogId>> {
        let committed = self.committed();
        self.integrity
            .observe("reading the commit point", committed)
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        let result = async {
            self.meta.insert(VOTE_KEY, vote.encode()?).map_err(io_err)?;
            self.flush().await
        }
        .await;
        self.integrity.observe("saving the vote", result)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let result = async {
            // Plain inserts, not a `Batch`: a sled batch seals the I/O buffer twice (see `state_machine`).
            // Atomicity is not needed: nothing here counts until the flush, and `repair` removes whatever
            // a crash left after a hole.
            for entry in entries {
                self.logs
                    .insert(index_key(entry.log_id.index), entry.encode()?)
                    .map_err(io_err)?;
            }
            // The entries are readable now; they are durable once the flusher completes the callback.
            if let Err(mpsc::SendError(callback)) = self.flusher.send(callback) {
                // Only possible if the flusher thread died; flush inline rather than lose the completion.
                let result = self.flush().await;
                callback.io_completed(result);
            }
            io::Result::Ok(())
        }
        .await;
        self.integrity.observe("appending to the log", result)
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> io::Result<()> {
        let result = async {
            let from = last_log_id.map_or(0, |id| id.index + 1);
            let mut batch = sled::Batch::default();
            for item in self.logs.range(index_key(from)..) {
                let (key, _) = item.map_err(io_err)?;
                batch.remove(key);
            }
            // One batch is atomic, so a crash cannot leave a hole in the log.
            self.logs.apply_batch(batch).map_err(io_err)?;
            self.flush().await
        }
        .await;
        self.integrity.observe("truncating the log", result)
    }

    /// Makes the purge durable with the `last_purged` marker and leaves the deleting to a blocking
    /// thread. Entries at or below the marker are dead from the moment it is written (reads, the log
    /// state and `repair` all start after it), so nothing waits for them to go. openraft awaits purge
    /// inside its core loop: deleting the ~9k entries behind a snapshot there stalled every write for
    /// tens of milliseconds, the worst of the put tail (max 100 ms; see docs/benchmarks.md).
    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        let result = async {
            // The marker must be durable before any delete is: a crash must never leave a log whose
            // first entries are gone without the marker that says so (`repair` would cut the rest).
            self.meta
                .insert(LAST_PURGED_KEY, log_id.encode()?)
                .map_err(io_err)?;
            self.flush().await?;
            let logs = self.logs.clone();
            tokio::task::spawn_blocking(move || {
                // Plain removes: a sled batch costs two extra buffer writes (see `append`). A crash part
                // way leaves dead entries below the marker; the next purge's range covers them.
                let removed = logs
                    .range(..=index_key(log_id.index))
                    .keys()
                    .try_for_each(|key| logs.remove(key?).map(|_| ()));
                if let Err(e) = removed {
                    tracing::warn!(error = %e, upto = log_id.index, "deleting purged log entries failed; they stay dead on disk");
                }
            });
            io::Result::Ok(())
        }
        .await;
        self.integrity.observe("purging the log", result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_open_ranges() {
        assert_eq!(to_half_open(&(3..7)), (3, Some(7)));
        assert_eq!(to_half_open(&(3..=7)), (3, Some(8)));
        assert_eq!(to_half_open(&(3..)), (3, None));
        assert_eq!(to_half_open(&(..)), (0, None));
        assert_eq!(to_half_open(&(0..=u64::MAX)), (0, None));
    }
}
