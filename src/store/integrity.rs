//! Corruption is detected, not served.
//!
//! sled checks a CRC on every message it reads from its log segments, but only when a page is read
//! from disk: a node started on a damaged file answers from its cache and its intact pages, and a key
//! on a damaged page fails with sled's corruption error only when something reads it. A node in that
//! state must not keep serving: it would answer some keys and fail others, and its log may be missing
//! what it acknowledged. So every layer reports corruption here, and the first report trips this node
//! for good: reads are refused from then on, health turns NOT_SERVING and the process exits non-zero
//! (see server.rs), so an operator wipes the data directory and the node rejoins by snapshot.
//!
//! What counts as corruption: sled's `Corruption` error, and any stored value that does not decode.
//! Both arrive as `io::ErrorKind::InvalidData` (sled's own conversion and `codec`'s), which is how the
//! storage traits' errors are classified at their boundary. Data received from a peer that does not
//! decode is the peer's problem, not ours, and is reported with another kind (see `snapshot::install`).
//!
//! Three ways find it: [`check_meta`] at open (cheap: the metadata and the ends of the log), a
//! background [`Scrubber`] that reads and decodes every stored value at a bounded rate, and every
//! ordinary read or write that meets it. `raftkv check` runs the first two on a stopped node.

use std::fmt::Display;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::log::LogSummary;
use super::migrate::{COMMITTED_KEY, LAST_PURGED_KEY, SnapshotMetaV2, StoredSnapshotV2, VOTE_KEY};
use super::record::Record;
use super::snapshot::legacy::{self, SNAPSHOT_KEY};
use super::snapshot::{SNAPSHOT_FILE_KEY, SNAPSHOT_META_KEY};
use super::state_machine::{
    CLEAN_SHUTDOWN_KEY, LAST_APPLIED_KEY, LAST_MEMBERSHIP_KEY, RETIRED_KEY, StoredValue,
};
use super::{NODE_ID_KEY, SERDE_SHAPES, trees};
use crate::types::{Entry, LogId, NodeId, SnapshotMeta, StoredMembership, Vote};

/// Shared by every handle on one data directory: the first corruption any of them meets trips it.
#[derive(Debug)]
pub struct Integrity {
    dir: PathBuf,
    tripped: watch::Sender<Option<String>>,
}

impl Integrity {
    pub fn new(dir: &Path) -> Arc<Self> {
        Arc::new(Self {
            dir: dir.to_path_buf(),
            tripped: watch::Sender::new(None),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Records corruption. Only the first report is logged: after it, every read fails on purpose and
    /// would otherwise report again.
    pub fn report(&self, what: impl Display) {
        let what = what.to_string();
        let first = self.tripped.send_if_modified(|state| {
            if state.is_some() {
                return false;
            }
            *state = Some(what.clone());
            true
        });
        if first {
            tracing::error!(
                data_dir = %self.dir.display(),
                corrupt = %what,
                "storage corruption detected in {}: {what}; this node stops serving. Wipe the data \
                 directory and start the node again: it rejoins the cluster by snapshot",
                self.dir.display()
            );
        }
    }

    /// What was found corrupt, once something was.
    pub fn corrupt(&self) -> Option<String> {
        self.tripped.borrow().clone()
    }

    /// Resolves with the first report; pending forever on a sound store.
    pub async fn tripped(&self) -> String {
        let mut rx = self.tripped.subscribe();
        loop {
            let current = rx.borrow_and_update().clone();
            if let Some(what) = current {
                return what;
            }
            if rx.changed().await.is_err() {
                // The sender lives in `self`, so it cannot be gone while this borrow exists.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Refuses to read once corruption was found: no answer may come from a store known to be damaged.
    pub(crate) fn ensure_sound(&self) -> io::Result<()> {
        match self.corrupt() {
            None => Ok(()),
            Some(what) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "refusing to read: storage in {} is corrupt ({what})",
                    self.dir.display()
                ),
            )),
        }
    }

    /// Passes a storage result through, reporting it first if it is corruption (see the module doc).
    pub(crate) fn observe<T>(&self, what: impl Display, result: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &result
            && e.kind() == io::ErrorKind::InvalidData
            && self.corrupt().is_none()
        {
            self.report(format_args!("{what}: {e}"));
        }
        result
    }
}

/// What a check looked at and what it found wrong.
#[derive(Debug, Default)]
pub struct Report {
    /// One line per thing checked, for `raftkv check`.
    pub checked: Vec<String>,
    pub problems: Vec<String>,
}

impl Report {
    fn problem(&mut self, what: impl Display) {
        self.problems.push(what.to_string());
    }

    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

fn describe_sled(e: &sled::Error) -> String {
    match e {
        sled::Error::Corruption { at, .. } => format!("sled read corrupted data at {at:?}"),
        other => other.to_string(),
    }
}

/// Reads and decodes one value, recording a problem if it is unreadable.
fn read_one<T: Record>(
    report: &mut Report,
    tree: &sled::Tree,
    tree_name: &str,
    key: &[u8],
) -> Option<T> {
    let label = format!("{tree_name}/{}", String::from_utf8_lossy(key));
    match tree.get(key) {
        Ok(Some(bytes)) => match T::decode(&bytes) {
            Ok(v) => {
                report.checked.push(format!("{label}: decodes"));
                Some(v)
            }
            Err(e) => {
                report.problem(format_args!("{label} does not decode: {e}"));
                None
            }
        },
        Ok(None) => {
            report.checked.push(format!("{label}: absent"));
            None
        }
        Err(e) => {
            report.problem(format_args!("{label}: {}", describe_sled(&e)));
            None
        }
    }
}

/// A log entry as stored: its key must be its own index.
fn decode_entry(key: &[u8], bytes: &[u8]) -> Result<Entry, String> {
    let index = <[u8; 8]>::try_from(key)
        .map(u64::from_be_bytes)
        .map_err(|_| format!("raft_log key {key:02x?} is not 8 bytes"))?;
    let entry =
        Entry::decode(bytes).map_err(|e| format!("raft_log entry {index} does not decode: {e}"))?;
    if entry.log_id.index != index {
        return Err(format!(
            "raft_log entry stored at index {index} is entry {}",
            entry.log_id.index
        ));
    }
    Ok(entry)
}

fn ends_of_log(report: &mut Report, logs: &sled::Tree) -> (Option<LogId>, Option<LogId>) {
    let mut end = |which: &str, item: sled::Result<Option<(sled::IVec, sled::IVec)>>| match item {
        Ok(Some((k, v))) => match decode_entry(&k, &v) {
            Ok(e) => {
                report
                    .checked
                    .push(format!("raft_log {which} entry: {}", e.log_id));
                Some(e.log_id)
            }
            Err(e) => {
                report.problem(e);
                None
            }
        },
        Ok(None) => {
            report.checked.push(format!("raft_log {which} entry: none"));
            None
        }
        Err(e) => {
            report.problem(format_args!(
                "raft_log {which} entry: {}",
                describe_sled(&e)
            ));
            None
        }
    };
    let first = end("first", logs.first());
    let last = end("last", logs.last());
    (first, last)
}

fn show<T: Display>(value: &Option<T>) -> String {
    value
        .as_ref()
        .map_or_else(|| "none".to_string(), |v| v.to_string())
}

/// Snapshot metadata in the shape of storage format `format`.
fn read_snapshot_meta(
    report: &mut Report,
    tree: &sled::Tree,
    tree_name: &str,
    format: u32,
) -> Option<SnapshotMeta> {
    if format == SERDE_SHAPES {
        read_one::<SnapshotMetaV2>(report, tree, tree_name, SNAPSHOT_META_KEY).map(|m| m.0)
    } else {
        read_one::<SnapshotMeta>(report, tree, tree_name, SNAPSHOT_META_KEY)
    }
}

/// The start check: every metadata value decodes (in the shape of storage format `format`) and the
/// invariants between them hold. Cheap (a few reads), so it runs before every start. Runs before
/// `recover`, on the directory as the last run left it, so it accepts what a crash may leave (see
/// the crash reasoning in `store`). `log` is what the log engine holds (format 4); without it, the
/// log is read from sled, where formats before 4 kept it.
pub fn check_meta(
    db: &sled::Db,
    node_id: Option<NodeId>,
    format: u32,
    log: Option<&LogSummary>,
) -> Report {
    let mut report = Report::default();
    let trees = match trees(db) {
        Ok(t) => t,
        Err(e) => {
            report.problem(format_args!("opening the trees: {e}"));
            return report;
        }
    };
    if let Some(found) = read_one::<NodeId>(&mut report, &trees.raft_meta, "raft_meta", NODE_ID_KEY)
        && let Some(expected) = node_id
        && found != expected
    {
        // Not corruption; `open` refuses it with its own error. Noted for `raftkv check`.
        report
            .checked
            .push(format!("the directory belongs to node {found}"));
    }
    let (committed, purged) = match log {
        Some(log) => {
            report.checked.push(format!(
                "raft-log: vote {}, committed {}, purged {}",
                show(&log.vote),
                show(&log.committed),
                show(&log.purged)
            ));
            (log.committed, log.purged)
        }
        None => {
            read_one::<Vote>(&mut report, &trees.raft_meta, "raft_meta", VOTE_KEY);
            let committed = read_one::<Option<LogId>>(
                &mut report,
                &trees.raft_meta,
                "raft_meta",
                COMMITTED_KEY,
            )
            .flatten();
            let purged =
                read_one::<LogId>(&mut report, &trees.raft_meta, "raft_meta", LAST_PURGED_KEY);
            (committed, purged)
        }
    };
    let applied = read_one::<LogId>(&mut report, &trees.sm_meta, "sm_meta", LAST_APPLIED_KEY);
    read_one::<StoredMembership>(&mut report, &trees.sm_meta, "sm_meta", LAST_MEMBERSHIP_KEY);
    read_one::<Option<LogId>>(&mut report, &trees.sm_meta, "sm_meta", CLEAN_SHUTDOWN_KEY);
    // A snapshot an older build left in sm_meta is moved at open; its metadata still has to read.
    let snapshot = read_snapshot_meta(&mut report, &trees.sm_snapshot, "sm_snapshot", format)
        .or_else(|| read_snapshot_meta(&mut report, &trees.sm_meta, "sm_meta", format))
        .and_then(|m| m.last_log_id);
    let (first, last) = match log {
        Some(log) => {
            report.checked.push(format!(
                "raft-log first entry: {}, last entry: {}",
                show(&log.first),
                show(&log.last)
            ));
            (log.first, log.last)
        }
        None => ends_of_log(&mut report, &trees.raft_log),
    };

    let mut invariant = |holds: bool, what: String| {
        if holds {
            report.checked.push(format!("{what}: holds"));
        } else {
            report.problem(format_args!("{what} does not hold"));
        }
    };
    // The log is purged only behind a snapshot, and a snapshot is of applied state. A purged log with
    // no snapshot at all is not checked: the node's state is in sm_data either way, and openraft builds
    // a new snapshot when a follower needs one.
    if let (Some(p), Some(s)) = (&purged, &snapshot) {
        invariant(p.index <= s.index, format!("purged {p} <= snapshot {s}"));
    }
    if let (Some(s), Some(a)) = (&snapshot, &applied) {
        invariant(s <= a, format!("snapshot {s} <= last applied {a}"));
    }
    if let (Some(f), Some(l)) = (&first, &last) {
        invariant(f <= l, format!("first log entry {f} <= last log entry {l}"));
    }
    // A commit point is saved only for an entry the log held; the log can lose unflushed entries
    // after it, and a snapshot install can move the purge point past it, so those are not checked.
    if let (Some(c), Some(p)) = (&committed, &purged) {
        report
            .checked
            .push(format!("committed {c} (purged up to {p})"));
    }
    report
}

/// Reads and decodes every value of every tree (in the shape of storage format `format`) at the
/// pacer's rate, giving up early once `stop` says so. sled 0.34 can panic on some damaged pages
/// instead of returning an error; that counts as corruption too, rather than ending the scrub thread
/// unseen.
pub fn scrub(db: &sled::Db, pacer: &mut Pacer<'_>, stop: &dyn Fn() -> bool, format: u32) -> Report {
    let run = std::panic::AssertUnwindSafe(|| scrub_trees(db, pacer, stop, format));
    std::panic::catch_unwind(run).unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let mut report = Report::default();
        report.problem(format_args!("sled panicked while reading: {why}"));
        report
    })
}

fn scrub_trees(
    db: &sled::Db,
    pacer: &mut Pacer<'_>,
    stop: &dyn Fn() -> bool,
    format: u32,
) -> Report {
    let mut report = Report::default();
    let mut names: Vec<sled::IVec> = db.tree_names();
    names.sort();
    for name in names {
        let name_text = String::from_utf8_lossy(&name).into_owned();
        let tree = match db.open_tree(&name) {
            Ok(t) => t,
            Err(e) => {
                report.problem(format_args!("tree {name_text}: {}", describe_sled(&e)));
                continue;
            }
        };
        let mut values = 0u64;
        let mut bytes = 0u64;
        let mut previous: Option<LogId> = None;
        for item in tree.iter() {
            if stop() {
                return report;
            }
            let (k, v) = match item {
                Ok(kv) => kv,
                // A snapshot install switched data trees and dropped the old one under the scrub:
                // nothing is wrong with it, there is just nothing left to read.
                Err(sled::Error::CollectionNotFound(_)) => {
                    report
                        .checked
                        .push(format!("tree {name_text}: dropped during the scrub"));
                    break;
                }
                Err(e) => {
                    // sled cannot step past a page it cannot read: the rest of this tree is unknown.
                    report.problem(format_args!(
                        "tree {name_text} after {values} values: {}",
                        describe_sled(&e)
                    ));
                    break;
                }
            };
            values += 1;
            let size = (k.len() + v.len()) as u64;
            bytes += size;
            if let Err(problem) = check_value(&name_text, &k, &v, &mut previous, format) {
                report.problem(problem);
            }
            pacer.consumed(size);
        }
        report
            .checked
            .push(format!("tree {name_text}: {values} values, {bytes} bytes"));
    }
    report
}

/// Decodes one stored value as the type its tree and key say it is.
fn check_value(
    tree: &str,
    key: &[u8],
    value: &[u8],
    previous_log_id: &mut Option<LogId>,
    format: u32,
) -> Result<(), String> {
    fn decodes<T: Record>(tree: &str, key: &[u8], value: &[u8]) -> Result<(), String> {
        T::decode(value).map(|_| ()).map_err(|e| {
            format!(
                "{tree}/{} does not decode: {e}",
                String::from_utf8_lossy(key)
            )
        })
    }
    match (tree, key) {
        ("raft_log", _) => {
            let entry = decode_entry(key, value)?;
            if let Some(prev) = previous_log_id.replace(entry.log_id)
                && prev >= entry.log_id
            {
                return Err(format!(
                    "raft_log entry {} follows {prev}: log ids must increase",
                    entry.log_id
                ));
            }
            Ok(())
        }
        ("raft_meta", NODE_ID_KEY) => decodes::<NodeId>(tree, key, value),
        ("raft_meta", VOTE_KEY) => decodes::<Vote>(tree, key, value),
        ("raft_meta", COMMITTED_KEY) => decodes::<Option<LogId>>(tree, key, value),
        ("raft_meta", LAST_PURGED_KEY) => decodes::<LogId>(tree, key, value),
        ("sm_data" | "sm_data.1", _) => decodes::<StoredValue>(tree, key, value),
        (super::history::TREE, _) if key.len() == 8 => {
            decodes::<super::history::HistoryRecord>(tree, key, value)
        }
        (super::history::TREE, _) => Err(format!("{tree} has a key of {} bytes", key.len())),
        (super::leases::TREE, _) if key.len() == 8 => {
            decodes::<super::leases::LeaseRecord>(tree, key, value)
        }
        (super::leases::TREE, _) => Err(format!("{tree} has a key of {} bytes", key.len())),
        ("sm_snapshot", SNAPSHOT_FILE_KEY) => std::str::from_utf8(value)
            .map(|_| ())
            .map_err(|_| format!("{tree}/snapshot_file is not a file name")),
        ("sm_meta", LAST_APPLIED_KEY) => decodes::<LogId>(tree, key, value),
        ("sm_meta", LAST_MEMBERSHIP_KEY) => decodes::<StoredMembership>(tree, key, value),
        ("sm_meta", CLEAN_SHUTDOWN_KEY) => decodes::<Option<LogId>>(tree, key, value),
        ("sm_meta", RETIRED_KEY) => {
            crate::codec::decode::<std::collections::BTreeSet<NodeId>>(value)
                .map(|_| ())
                .map_err(|e| format!("{tree}/retired_members does not decode: {e}"))
        }
        ("sm_meta" | "sm_snapshot", SNAPSHOT_META_KEY) if format == SERDE_SHAPES => {
            decodes::<SnapshotMetaV2>(tree, key, value)
        }
        ("sm_meta" | "sm_snapshot", SNAPSHOT_META_KEY) => decodes::<SnapshotMeta>(tree, key, value),
        ("sm_meta" | "sm_snapshot", SNAPSHOT_KEY) if format == SERDE_SHAPES => {
            StoredSnapshotV2::decode(value)
                .and_then(|s| legacy::check_image(&s.0.data))
                .map_err(|e| format!("{tree}/snapshot does not decode: {e}"))
        }
        ("sm_meta" | "sm_snapshot", SNAPSHOT_KEY) => legacy::verify_stored(value)
            .map(|_| ())
            .map_err(|e| format!("{tree}/snapshot does not decode: {e}")),
        // Anything else (sled's default tree, keys a newer build added) only has to be readable.
        _ => Ok(()),
    }
}

/// Paces a reader to a byte rate by sleeping after what it read.
pub struct Pacer<'a> {
    bytes_per_sec: u64,
    window_start: Instant,
    window_bytes: u64,
    sleep: Box<dyn FnMut(Duration) + 'a>,
}

impl<'a> Pacer<'a> {
    pub fn new(bytes_per_sec: u64, sleep: Box<dyn FnMut(Duration) + 'a>) -> Self {
        Self {
            bytes_per_sec,
            window_start: Instant::now(),
            window_bytes: 0,
            sleep,
        }
    }

    pub fn unpaced() -> Self {
        Self::new(0, Box::new(|_| {}))
    }

    fn consumed(&mut self, bytes: u64) {
        if self.bytes_per_sec == 0 {
            return;
        }
        self.window_bytes = self.window_bytes.saturating_add(bytes);
        let due = Duration::from_secs_f64(self.window_bytes as f64 / self.bytes_per_sec as f64);
        let elapsed = self.window_start.elapsed();
        if due > elapsed {
            (self.sleep)(due - elapsed);
        }
        // A fresh window now and then, so a long stall (a slow disk) is not repaid with a burst.
        if self.window_start.elapsed() > Duration::from_secs(1) {
            self.window_start = Instant::now();
            self.window_bytes = 0;
        }
    }
}

/// Runs scrub passes on their own thread for as long as the handle lives.
pub struct Scrubber {
    /// Dropping it wakes and ends the thread.
    _stop: mpsc::Sender<()>,
}

impl Scrubber {
    /// `bytes_per_sec == 0` disables scrubbing. The first pass starts at once; each next one
    /// `interval` after the previous one ended.
    pub fn start(
        db: sled::Db,
        integrity: Arc<Integrity>,
        bytes_per_sec: u64,
        interval: Duration,
    ) -> io::Result<Option<Self>> {
        if bytes_per_sec == 0 {
            tracing::info!("storage scrub disabled");
            return Ok(None);
        }
        let (tx, rx) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("raftkv-scrub".into())
            .spawn(move || run_scrubber(&db, &integrity, bytes_per_sec, interval, &rx))?;
        Ok(Some(Self { _stop: tx }))
    }
}

fn run_scrubber(
    db: &sled::Db,
    integrity: &Integrity,
    bytes_per_sec: u64,
    interval: Duration,
    stop_rx: &mpsc::Receiver<()>,
) {
    let stopped = || !matches!(stop_rx.try_recv(), Err(mpsc::TryRecvError::Empty));
    loop {
        let started = Instant::now();
        // Sleeps on the stop channel, so dropping the handle ends a paced pass promptly.
        let mut pacer = Pacer::new(
            bytes_per_sec,
            Box::new(|d| {
                let _ = stop_rx.recv_timeout(d);
            }),
        );
        let report = scrub(db, &mut pacer, &stopped, super::FORMAT);
        if stopped() {
            return;
        }
        if let Some(problem) = report.problems.first() {
            integrity.report(format_args!(
                "scrub: {problem} ({} problems in all)",
                report.problems.len()
            ));
            return;
        }
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            trees = report.checked.len(),
            "storage scrub pass clean"
        );
        match stop_rx.recv_timeout(interval) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
    }
}

/// `raftkv check`: verifies a stopped node's data directory.
#[derive(clap::Args, Debug, Clone)]
pub struct CheckArgs {
    /// The node's data directory (what it was started with as --data-dir).
    #[arg(long, env = "RAFTKV_DATA_DIR")]
    pub data_dir: PathBuf,
}

/// Why `raftkv check` could not check at all (as opposed to finding corruption).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("{} holds no raftkv data (no sled directory in it)", .0.display())]
    NoData(PathBuf),
    #[error(
        "{} is in use: a running node holds its lock. Stop the node first (or check a copy)",
        .0.display()
    )]
    InUse(PathBuf),
    #[error("cannot open {}: {}", .0.display(), .1)]
    Open(PathBuf, sled::Error),
    #[error("{0}")]
    Format(super::StoreError),
}

/// Opens a stopped node's data and runs the start check and a full, unpaced scrub. Opening lets sled
/// recover its log as a start would; nothing of raftkv's is changed (no repair, no rebuild).
pub fn check_offline(dir: &Path) -> Result<Report, CheckError> {
    if !dir.join("sled").is_dir() {
        return Err(CheckError::NoData(dir.to_path_buf()));
    }
    let db = match super::sled_config(dir).open() {
        Ok(db) => db,
        Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
            return Err(CheckError::InUse(dir.to_path_buf()));
        }
        Err(e @ sled::Error::Corruption { .. }) => {
            let mut report = Report::default();
            report.problem(format_args!("opening sled: {}", describe_sled(&e)));
            return Ok(report);
        }
        Err(e) => return Err(CheckError::Open(dir.to_path_buf(), e)),
    };
    // Another version's layout cannot be judged by this one's decoders; the one it migrates from is
    // checked in its own shape and left as it is (the node migrates it when it starts).
    let format = match super::check_format(&db, dir) {
        Ok(format) => format,
        Err(e @ super::StoreError::Format { .. }) => return Err(CheckError::Format(e)),
        Err(e) => {
            let mut report = Report::default();
            report.problem(format_args!("raft_meta/format: {e}"));
            return Ok(report);
        }
    };
    let has_node = db
        .open_tree("raft_meta")
        .and_then(|meta| meta.get(NODE_ID_KEY))
        .map_err(|e| CheckError::Open(dir.to_path_buf(), e))?
        .is_some();
    let log = if format >= 4 && has_node {
        // Opening the engine replays and checksums every record it holds (and, as a start would,
        // cuts a torn record at its end).
        let log_dir = dir.join(super::log::LOG_DIR);
        if !log_dir.is_dir() {
            let mut report = Report::default();
            report.problem(format_args!("{} is missing", log_dir.display()));
            return Ok(report);
        }
        match super::log::open_wal(&log_dir) {
            Ok(wal) => Some(super::log::summarize(&wal)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(CheckError::InUse(dir.to_path_buf()));
            }
            Err(e) => {
                let mut report = Report::default();
                report.problem(format_args!("opening {}: {e}", log_dir.display()));
                return Ok(report);
            }
        }
    } else {
        None
    };
    let mut report = check_meta(&db, None, format, log.as_ref());
    if format < super::FORMAT {
        report.checked.push(format!(
            "storage format {format}, checked as it is: the node rewrites it as format {} when it \
             next starts",
            super::FORMAT
        ));
    }
    let scrubbed = scrub(&db, &mut Pacer::unpaced(), &|| false, format);
    report.checked.extend(scrubbed.checked);
    report.problems.extend(scrubbed.problems);
    if format >= 5 {
        check_snapshot_file(&db, dir, &mut report);
    }
    Ok(report)
}

/// Reads the current snapshot's file through (every frame's checksum, every value) and compares its
/// metadata with the one `sm_snapshot` holds.
fn check_snapshot_file(db: &sled::Db, dir: &Path, report: &mut Report) {
    let Ok(tree) = db.open_tree("sm_snapshot") else {
        return;
    };
    let Ok(Some(name)) = tree.get(SNAPSHOT_FILE_KEY) else {
        return;
    };
    let Ok(name) = std::str::from_utf8(&name) else {
        return;
    };
    let path = super::snapshot::dir_of(dir).join(name);
    let stored: Option<SnapshotMeta> = read_one(report, &tree, "sm_snapshot", SNAPSHOT_META_KEY);
    let read = std::fs::File::open(&path)
        .map_err(super::snapshot::file::FileError::from)
        .and_then(|f| super::snapshot::file::verify(io::BufReader::new(f)));
    match read {
        Ok((meta, pairs)) if stored.as_ref().is_none_or(|s| *s == meta) => {
            report.checked.push(format!(
                "snapshot file {}: {pairs} pairs, every frame's checksum",
                path.display()
            ))
        }
        Ok((meta, _)) => report.problem(format_args!(
            "snapshot file {} is of {}, sm_snapshot says {}",
            path.display(),
            show(&meta.last_log_id),
            show(&stored.and_then(|s| s.last_log_id))
        )),
        Err(e) => report.problem(format_args!("snapshot file {}: {e}", path.display())),
    }
}

/// Prints what was checked and what is wrong. Exit status: 0 clean, 1 corrupt, 2 not checked.
pub fn run_check(args: &CheckArgs) -> std::process::ExitCode {
    use std::process::ExitCode;
    let dir = args.data_dir.display();
    match check_offline(&args.data_dir) {
        Ok(report) => {
            for line in &report.checked {
                println!("ok      {line}");
            }
            for line in &report.problems {
                println!("CORRUPT {line}");
            }
            if report.is_clean() {
                println!("{dir}: clean ({} checks)", report.checked.len());
                ExitCode::SUCCESS
            } else {
                println!(
                    "{dir}: CORRUPT ({} problems). Wipe the directory and start the node again: it \
                     rejoins the cluster by snapshot",
                    report.problems.len()
                );
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
