//! The Raft log and vote, in a dedicated append-only log engine apart from the state machine's sled.
//!
//! The engine is `raft-log`: a write-ahead log in chunk files, where every record (a vote, an
//! entry, a truncation, a purge, a commit point) is appended with a checksum, the latest state is
//! kept in memory, and a purge deletes whole chunk files. Against sled as a log this removes the
//! page cache, the segment cleaning and the key-by-key purge from the write path (docs/measurements.md
//! has the comparison that chose it).
//!
//! **One order for everything.** openraft requires vote saves and log appends to be serialized.
//! Here they are records of one WAL, written in the order openraft issues them, so whatever a crash
//! keeps is a prefix of that order: a vote is never durable without the appends issued before it,
//! nor an append without the vote before it.
//!
//! **Group commit.** openraft submits appends without waiting for them. Each append writes its
//! records into the engine's open chunk in memory (readable at once) and queues its completion for
//! one flusher thread. The flusher asks the engine for one fsync covering everything buffered, and
//! completes every queued callback when it returns; appends that arrive meanwhile share the next
//! fsync. The engine's own worker batches only requests that arrive within a fixed wait of each
//! other, which would add that wait to every lone write (or, at zero, give each append its own
//! fsync), so its wait is zero and the batching happens here, by queueing.
//!
//! **Bounds.** Entries in the open chunk stay in memory until that chunk is closed and synced, and
//! older ones are cached up to a byte limit, so the chunk size bounds the log's memory as much as the
//! cache does; it also bounds what a purge leaves on disk behind the purge point.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{EntryPayload, OptionalSend, RaftLogReader};
use raft_log::api::raft_log_writer::RaftLogWriter;
use tokio::sync::oneshot;

use super::Integrity;
use super::record::Record;
use crate::sync::lock;
use crate::types::{Entry, LogId, TypeConfig, Vote};

/// Where a data directory keeps the log engine's chunk files, beside `sled/`.
pub const LOG_DIR: &str = "raft-log";

/// Chunk files close at this size: it bounds the entries held in memory until their chunk is synced,
/// and the dead bytes a purge cannot delete yet (those in the chunk holding the purge point).
const CHUNK_MAX_BYTES: usize = 32 * 1024 * 1024;
/// Entries read back for replication or apply are served from this cache before the chunk files.
const CACHE_MAX_BYTES: usize = 64 * 1024 * 1024;
/// Appends are queued for the flush worker up to this many bytes before an append blocks.
const FLUSH_QUEUE_MAX_BYTES: usize = 64 * 1024 * 1024;

/// The engine's view of raftkv's types: ids, vote and entries encoded as raftkv's own records, so
/// that the engine's files, like sled's, hold only shapes raftkv defines (see `record`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct WalTypes;

impl raft_log::Types for WalTypes {
    type LogId = WalLogId;
    type LogPayload = WalEntry;
    type Vote = WalVote;
    type UserData = Vec<u8>;
    type Callback = mpsc::SyncSender<io::Result<()>>;

    fn log_index(log_id: &WalLogId) -> u64 {
        log_id.0.index
    }

    fn payload_size(payload: &WalEntry) -> u64 {
        payload.size
    }
}

pub(crate) type Wal = raft_log::RaftLog<WalTypes>;

/// A log id in the engine. Ordered as openraft orders log ids (leader, then index); the engine
/// compares them to refuse a purge or truncation that would go backwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WalLogId(pub LogId);

impl Ord for WalLogId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let key = |id: &LogId| {
            let id = super::record::LogId::from(id);
            (id.term, id.node_id, id.index)
        };
        key(&self.0).cmp(&key(&other.0))
    }
}

impl PartialOrd for WalLogId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The vote in the engine, ordered as openraft orders votes: the engine refuses a vote that goes
/// backwards, the same rule openraft keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WalVote(pub Vote);

impl PartialOrd for WalVote {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        self.0.partial_cmp(&other.0)
    }
}

/// A log entry in the engine, with its encoded size (the cache's measure) kept beside it.
#[derive(Debug, Clone)]
pub(crate) struct WalEntry {
    pub entry: Entry,
    size: u64,
}

impl WalEntry {
    /// The engine's payload cache evicts by this size, so an entry appended with none would be
    /// held until the cache's item bound, whatever its values weigh. The bytes a command carries
    /// stand in for its encoded size, which is not known until the engine encodes it.
    pub fn new(entry: Entry) -> Self {
        let size = ENTRY_OVERHEAD_BYTES + payload_bytes(&entry);
        WalEntry { entry, size }
    }
}

/// What an entry costs beyond the bytes of its command: its log id, its framing and the cache's
/// own bookkeeping, roughly.
const ENTRY_OVERHEAD_BYTES: u64 = 64;

fn payload_bytes(entry: &Entry) -> u64 {
    let bytes = match &entry.payload {
        EntryPayload::Normal(command) => command.byte_len(),
        EntryPayload::Blank | EntryPayload::Membership(_) => 0,
    };
    u64::try_from(bytes).unwrap_or(u64::MAX)
}

/// Each value is one raftkv record behind a length (codeq's byte-string framing, which reads no more
/// than the bytes that are there, whatever a damaged length claims).
fn encode_record<W: io::Write>(record: &impl Record, w: W) -> io::Result<usize> {
    codeq::Encode::encode(&record.encode()?, w)
}

fn decode_record<T: Record, R: io::Read>(r: R) -> io::Result<(T, usize)> {
    let bytes: Vec<u8> = codeq::Decode::decode(r)?;
    Ok((T::decode(&bytes)?, bytes.len()))
}

/// The codec of a newtype whose one field is a raftkv record.
macro_rules! record_codec {
    ($wrapper:ident) => {
        impl codeq::Encode for $wrapper {
            fn encode<W: io::Write>(&self, w: W) -> io::Result<usize> {
                encode_record(&self.0, w)
            }
        }

        impl codeq::Decode for $wrapper {
            fn decode<R: io::Read>(r: R) -> io::Result<Self> {
                Ok($wrapper(decode_record(r)?.0))
            }
        }
    };
}

record_codec!(WalLogId);
record_codec!(WalVote);

impl codeq::Encode for WalEntry {
    fn encode<W: io::Write>(&self, w: W) -> io::Result<usize> {
        encode_record(&self.entry, w)
    }
}

impl codeq::Decode for WalEntry {
    fn decode<R: io::Read>(r: R) -> io::Result<Self> {
        let (entry, size) = decode_record(r)?;
        Ok(WalEntry {
            entry,
            size: size as u64,
        })
    }
}

/// Opens (or creates) the log engine in `dir`.
pub(crate) fn open_wal(dir: &Path) -> io::Result<Wal> {
    open_wal_sized(dir, CHUNK_MAX_BYTES, CACHE_MAX_BYTES)
}

fn open_wal_sized(dir: &Path, chunk_max_bytes: usize, cache_max_bytes: usize) -> io::Result<Wal> {
    std::fs::create_dir_all(dir)?;
    let mut config = raft_log::Config::new(dir.display());
    config.wal.chunk_max_size = Some(chunk_max_bytes);
    config.wal.flush_batch_wait = Some(Duration::ZERO);
    config.wal.flush_queue_max_bytes = Some(FLUSH_QUEUE_MAX_BYTES);
    config.log_cache_capacity = Some(cache_max_bytes);
    Wal::open(Arc::new(config))
}

/// Asks the engine for an fsync of everything written so far and waits for it. Blocking: for the
/// flusher thread and for code that runs before the node serves (migration).
pub(crate) fn sync_blocking(wal: &Mutex<Wal>) -> io::Result<()> {
    let (tx, rx) = mpsc::sync_channel(1);
    lock(wal).flush(true, Some(tx))?;
    rx.recv()
        .map_err(|_| io::Error::other("the log engine's flush worker stopped"))?
}

/// When the log answers an append or a vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// After the fsync that makes it durable: the only correct answer.
    #[default]
    Fsync,
    /// At once, with the fsync following within [`UNSAFE_SYNC_EVERY`]: the fault harness's proof
    /// that a power cut is seen (`--unsafe-ack-before-fsync`).
    UnsafeAckBeforeFsync,
}

/// How long [`Durability::UnsafeAckBeforeFsync`] leaves acknowledged records unsynced.
const UNSAFE_SYNC_EVERY: Duration = Duration::from_millis(500);

/// Something waiting for the next fsync.
enum Waiter {
    Append(IOFlushed<TypeConfig>),
    Task(oneshot::Sender<io::Result<()>>),
}

impl Waiter {
    fn complete(self, result: &io::Result<()>) {
        let result = match result {
            Ok(()) => Ok(()),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        };
        match self {
            Waiter::Append(callback) => callback.io_completed(result),
            // The task gave up waiting (its future was dropped); nothing to tell.
            Waiter::Task(tx) => drop(tx.send(result)),
        }
    }
}

/// A cheap handle: the engine is shared behind a lock, and the flusher queue is shared.
#[derive(Clone)]
pub struct LogStore {
    wal: Arc<Mutex<Wal>>,
    flusher: mpsc::Sender<Waiter>,
    integrity: Arc<Integrity>,
    dir: PathBuf,
    /// The bytes of every entry appended since the engine opened (the cache's measure), for the
    /// snapshot trigger that bounds the log by size (see `node::log_growth`).
    appended_bytes: Arc<AtomicU64>,
}

impl LogStore {
    /// Opens the engine in `dir` and starts the flusher thread; the thread ends once every handle
    /// (and so every sender) is dropped, and the engine closes with it.
    pub(super) fn open(
        dir: &Path,
        integrity: Arc<Integrity>,
        durability: Durability,
    ) -> io::Result<Self> {
        let wal = Arc::new(Mutex::new(open_wal(dir)?));
        let (tx, rx) = mpsc::channel();
        let flusher_wal = wal.clone();
        let flusher_integrity = integrity.clone();
        std::thread::Builder::new()
            .name("raftkv-log-flush".into())
            .spawn(move || run_flusher(&flusher_wal, &flusher_integrity, &rx, durability))?;
        Ok(Self {
            wal,
            flusher: tx,
            integrity,
            dir: dir.to_path_buf(),
            appended_bytes: Arc::default(),
        })
    }

    /// The bytes of the entries appended since this node started: it only grows.
    pub fn appended_bytes(&self) -> u64 {
        self.appended_bytes.load(Ordering::Relaxed)
    }

    /// What the log holds, for the start check.
    pub(crate) fn summary(&self) -> LogSummary {
        summarize(&lock(&self.wal))
    }

    /// The size of the engine's files on disk.
    pub fn disk_bytes(&self) -> u64 {
        lock(&self.wal).on_disk_size()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Waits for an fsync of everything written before this call.
    async fn sync(&self) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.flusher
            .send(Waiter::Task(tx))
            .map_err(|_| io::Error::other("the log flusher stopped"))?;
        rx.await
            .map_err(|_| io::Error::other("the log flusher stopped"))?
    }

    fn read_entries(&self, range: &impl RangeBounds<u64>) -> io::Result<Vec<Entry>> {
        self.integrity.ensure_sound()?;
        let (start, end) = to_half_open(range);
        let wal = lock(&self.wal);
        wal.read(start, end.unwrap_or(u64::MAX))
            .map(|item| item.map(|(_, payload)| payload.entry))
            .collect()
    }

    fn log_state(&self) -> LogState<TypeConfig> {
        let wal = lock(&self.wal);
        let state = wal.log_state();
        LogState {
            last_purged_log_id: state.purged().map(|p| p.0),
            last_log_id: state.last().map(|l| l.0),
        }
    }
}

/// What `wal` holds, for the start check and `raftkv check`.
pub(crate) fn summarize(wal: &Wal) -> LogSummary {
    let state = wal.log_state();
    let first = wal
        .read(0, u64::MAX)
        .next()
        .and_then(|item| item.ok())
        .map(|(id, _)| id.0);
    LogSummary {
        vote: state.vote().map(|v| v.0),
        committed: state.committed().map(|c| c.0),
        purged: state.purged().map(|p| p.0),
        first,
        last: first.and(state.last().map(|l| l.0)),
    }
}

/// What the log holds: the values the start check reads and its invariants relate.
#[derive(Debug, Clone, Default)]
pub struct LogSummary {
    pub vote: Option<Vote>,
    pub committed: Option<LogId>,
    pub purged: Option<LogId>,
    pub first: Option<LogId>,
    pub last: Option<LogId>,
}

/// Completes queued waiters in batches, one fsync per batch. Waiters queued while an fsync runs wait
/// for the next one: that fsync may have started before their records were written.
fn run_flusher(
    wal: &Mutex<Wal>,
    integrity: &Integrity,
    rx: &mpsc::Receiver<Waiter>,
    durability: Durability,
) {
    if durability == Durability::UnsafeAckBeforeFsync {
        return run_lying_flusher(wal, rx);
    }
    let mut batch = Vec::new();
    while let Ok(first) = rx.recv() {
        batch.push(first);
        batch.extend(rx.try_iter());
        // Every waiter in `batch` was queued after its records were written, so this fsync covers all.
        let started = std::time::Instant::now();
        let result = integrity.observe("flushing the log", sync_blocking(wal));
        metrics::histogram!(crate::telemetry::names::LOG_FSYNC)
            .record(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            tracing::error!(error = %e, "log flush failed; the node will stop");
        }
        for waiter in batch.drain(..) {
            waiter.complete(&result);
        }
    }
}

/// [`Durability::UnsafeAckBeforeFsync`]: every waiter is told "durable" as soon as its records are
/// in the kernel's hands (written, not synced), and the fsync runs on a timer of its own. Written
/// first, so that only a power cut loses them: a SIGKILL keeps what the kernel holds, and the
/// harness's control run (`crash-all` with this flag) must pass.
fn run_lying_flusher(wal: &Mutex<Wal>, rx: &mpsc::Receiver<Waiter>) {
    let mut last_sync = std::time::Instant::now();
    loop {
        match rx.recv_timeout(UNSAFE_SYNC_EVERY) {
            Ok(first) => {
                // Every waiter here was queued after its records were written.
                let batch: Vec<Waiter> = std::iter::once(first).chain(rx.try_iter()).collect();
                let result = write_blocking(wal);
                for waiter in batch {
                    waiter.complete(&result);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        if last_sync.elapsed() >= UNSAFE_SYNC_EVERY {
            if let Err(e) = sync_blocking(wal) {
                tracing::error!(error = %e, "log flush failed");
            }
            last_sync = std::time::Instant::now();
        }
    }
}

/// Hands everything buffered to the kernel, without an fsync, and waits for it.
fn write_blocking(wal: &Mutex<Wal>) -> io::Result<()> {
    let (tx, rx) = mpsc::sync_channel(1);
    lock(wal).flush(false, Some(tx))?;
    rx.recv()
        .map_err(|_| io::Error::other("the log engine's flush worker stopped"))?
}

/// Turns any range of log indexes into the half-open `[start, end)` form the engine reads.
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
        Ok(lock(&self.wal).log_state().vote().map(|v| v.0))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        Ok(self.log_state())
    }

    /// A commit record, durable with the next fsync. It lets a restarted node re-apply its own log
    /// up to what it knew was committed before it serves anything, instead of falling back to its
    /// last snapshot until it hears from a leader. The engine refuses a commit point past its last
    /// entry or behind an earlier one; neither is worth failing the node for (a snapshot install
    /// can move the commit point past the log before the purge catches up), so those are skipped.
    async fn save_committed(&mut self, committed: Option<LogId>) -> io::Result<()> {
        let Some(committed) = committed.map(WalLogId) else {
            return Ok(());
        };
        let result = {
            let mut wal = lock(&self.wal);
            let state = wal.log_state();
            let within = state.last().is_some_and(|last| committed <= *last)
                && state.committed().is_none_or(|c| committed >= *c);
            if within {
                wal.commit(committed).map(|_| ())
            } else {
                Ok(())
            }
        };
        self.integrity.observe("saving the commit point", result)
    }

    /// The saved commit point. A commit record follows the entries it names in the WAL, so if it
    /// survived a crash they did too.
    async fn read_committed(&mut self) -> io::Result<Option<LogId>> {
        Ok(lock(&self.wal).log_state().committed().map(|c| c.0))
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        let result = async {
            lock(&self.wal).save_vote(WalVote(*vote))?;
            self.sync().await
        }
        .await;
        self.integrity.observe("saving the vote", result)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut bytes = 0;
        let written = lock(&self.wal)
            .append(entries.into_iter().map(|entry| {
                let entry = WalEntry::new(entry);
                bytes += entry.size;
                (WalLogId(entry.entry.log_id), entry)
            }))
            .map(|_| ());
        if written.is_ok() {
            self.appended_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        let result = written.and_then(|()| {
            // The entries are readable now; they are durable once the flusher completes the callback.
            self.flusher
                .send(Waiter::Append(callback))
                .map_err(|_| io::Error::other("the log flusher stopped"))
        });
        self.integrity.observe("appending to the log", result)
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> io::Result<()> {
        let result = async {
            let from = last_log_id.map_or(0, |id| id.index + 1);
            {
                let mut wal = lock(&self.wal);
                // Nothing after `from`: the engine would look for an entry at `from - 1` to keep.
                let end = wal.log_state().last().map_or(0, |l| l.0.index + 1);
                if from >= end {
                    return Ok(());
                }
                wal.truncate(from)?;
            }
            self.sync().await
        }
        .await;
        self.integrity.observe("truncating the log", result)
    }

    /// A purge record; the chunk files wholly behind it are deleted by the engine once that record
    /// is synced, so a crash never leaves a log whose first entries are gone without the record that
    /// says so.
    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        let result = async {
            lock(&self.wal).purge(WalLogId(log_id))?;
            self.sync().await
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

    /// The engine holds appended entries in memory until their chunk is synced, and after that
    /// only up to its cache's capacity. Big values must count at their size: counted as nothing,
    /// every entry stayed cached up to the engine's item bound, and a node under churn of large
    /// values grew to gigabytes of memory.
    #[test]
    fn the_entry_cache_is_bounded_by_the_bytes_of_the_values() {
        const CHUNK: usize = 1024 * 1024;
        const CACHE: usize = 4 * 1024 * 1024;
        const VALUE: usize = 256 * 1024;
        let dir = tempfile::tempdir().unwrap();
        let wal = Mutex::new(open_wal_sized(dir.path(), CHUNK, CACHE).unwrap());
        for index in 1..=64 {
            let entry = Entry {
                log_id: openraft::testing::log_id::<TypeConfig>(1, 1, index),
                payload: EntryPayload::Normal(crate::types::Command::Put {
                    key: index.to_be_bytes().to_vec(),
                    value: vec![7; VALUE],
                    prev_kv: false,
                }),
            };
            lock(&wal)
                .append([(WalLogId(entry.log_id), WalEntry::new(entry))])
                .unwrap();
            sync_blocking(&wal).unwrap();
        }
        let cached = lock(&wal).stat().payload_cache_item_count as usize;
        // The cache's capacity, the two chunks that may not be evicted yet, and the one entry
        // whose insert goes over before it evicts.
        let bound = CACHE + 2 * CHUNK + VALUE;
        assert!(
            cached * VALUE <= bound,
            "{cached} entries of {VALUE} B cached, more than {bound} B"
        );
    }

    /// What the engine's records carry for raftkv: a 4-byte big-endian length, then raftkv's own
    /// record (the codec's version byte, then the fields as varints). Pinned, like `record`'s.
    #[test]
    fn the_bytes_inside_the_engine_records_are_pinned() {
        let id = WalLogId(openraft::testing::log_id::<TypeConfig>(3, 2, 300));
        let mut bytes = Vec::new();
        codeq::Encode::encode(&id, &mut bytes).unwrap();
        assert_eq!(bytes, [0, 0, 0, 6, 1, 3, 2, 251, 44, 1]);
        let back: WalLogId = codeq::Decode::decode(&bytes[..]).unwrap();
        assert_eq!(back, id);
        let vote = WalVote(Vote::new_committed(4, 1));
        let mut bytes = Vec::new();
        codeq::Encode::encode(&vote, &mut bytes).unwrap();
        assert_eq!(bytes, [0, 0, 0, 4, 1, 4, 1, 1]);
        // A length that claims more than is there is an error, not an allocation of that size.
        let short = [0xff, 0xff, 0xff, 0xff, 1, 3];
        assert!(<WalLogId as codeq::Decode>::decode(&short[..]).is_err());
    }

    #[test]
    fn log_ids_order_by_leader_then_index() {
        let id = |term, node, index| {
            WalLogId(openraft::testing::log_id::<TypeConfig>(term, node, index))
        };
        assert!(id(1, 1, 9) < id(2, 1, 3));
        assert!(id(2, 1, 3) < id(2, 2, 1));
        assert!(id(2, 2, 1) < id(2, 2, 2));
    }
}
