//! Snapshots: a consistent copy of the applied state, used to purge the log and to catch up nodes that
//! are too far behind (or whose data was wiped).
//!
//! A snapshot is a file in `--data-dir/snapshots/` (see `file` for its format); `sm_snapshot` names the
//! current one and holds its metadata. Every step streams: a build walks `sm_data` into the file
//! while applies continue (see `capture`), a leader sends the file in chunks, a follower writes the
//! chunks to disk as they arrive (see `inbox`), and an install loads the file into a fresh tree that
//! replaces `sm_data` in one transaction. No step holds the image in memory.
//!
//! Why a file and not a sled value: sled stores a large value as a blob file of its own and keeps
//! old copies around until its segments are cleaned, and it never fsyncs blob files on a flush (see
//! `durable`). A file of our own is written once, fsynced, renamed into place and deleted when the
//! next one is current.
//!
//! Durability order, relied on by the log's purge (see the parent module): a snapshot's file is
//! fsynced and renamed into place, then `sm_snapshot` points at it, and that is flushed durably,
//! before openraft hears of the snapshot (and purges the log behind it). The file it replaced is
//! deleted only after that flush.

mod capture;
pub mod file;
pub mod inbox;
pub(crate) mod legacy;

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use openraft::RaftSnapshotBuilder;
use sled::transaction::{TransactionError, Transactional};

pub(crate) use capture::Capture;
pub use inbox::Inbox;

use super::history::History;
use super::leases::LeaseRecord;
use super::record::Record;
use super::state_machine::{LAST_APPLIED_KEY, LAST_MEMBERSHIP_KEY, RETIRED_KEY, StateMachineStore};
use super::{io_err, read_decoded, tx_err};
use crate::sync::lock;
use crate::types::{
    LogId, NodeId, Snapshot, SnapshotData, SnapshotMeta, StoredMembership, TypeConfig,
};

/// The directory, inside the data directory, that holds snapshot files.
pub const SNAPSHOT_DIR: &str = "snapshots";
/// The current snapshot's `SnapshotMeta`, so it can be read without opening the file.
pub(crate) const SNAPSHOT_META_KEY: &[u8] = b"snapshot_meta";
/// The current snapshot's file name, inside [`SNAPSHOT_DIR`].
pub(crate) const SNAPSHOT_FILE_KEY: &[u8] = b"snapshot_file";
/// Snapshot files end so; anything else in the directory is a leftover of an interrupted step.
const SUFFIX: &str = ".snap";

/// Runs blocking snapshot work on tokio's blocking pool: with two cores the runtime has two workers,
/// and a build that held one showed up in every client's tail latency.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(io::Error::other)?
}

pub(crate) fn dir_of(data_dir: &Path) -> PathBuf {
    data_dir.join(SNAPSHOT_DIR)
}

/// A new file name for a snapshot at `meta`: its log id, for people, and a sequence number, because
/// a node can build or receive the same log id twice and the current file must never be overwritten.
pub(crate) fn new_name(meta: &SnapshotMeta) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let at = meta.last_log_id.as_ref().map_or_else(
        || "empty".to_string(),
        |id| {
            format!(
                "{}-{}-{}",
                id.leader_id.term, id.leader_id.node_id, id.index
            )
        },
    );
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{at}-{nanos}-{}{SUFFIX}",
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// fsyncs a directory, so that a rename or delete inside it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Opens a snapshot file for openraft to send or read.
fn open_data(path: &Path) -> io::Result<SnapshotData> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    Ok(SnapshotData {
        file,
        path: path.to_path_buf(),
        len,
    })
}

pub struct SnapshotBuilder {
    pub(super) sm: StateMachineStore,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> io::Result<Snapshot> {
        let built = self.build().await;
        self.sm
            .inner
            .integrity
            .observe("building a snapshot", built)
    }
}

impl SnapshotBuilder {
    async fn build(&mut self) -> io::Result<Snapshot> {
        let started = Instant::now();
        // A build and an install never overlap: an install replaces the tree a build walks.
        let _serial = self.sm.inner.snapshot_lock.lock().await;
        let (meta, path, pairs, bytes) = capture_image(&self.sm, "").await?;
        let name = file_name(&path)?;
        if !store_unless_older(&self.sm, &meta, &name).await? {
            tracing::info!(
                built = ?meta.last_log_id,
                "a newer snapshot was installed meanwhile; not storing this one"
            );
            let snapshot = open_data(&path)?;
            // Removed from the directory; the open file stays readable for openraft.
            std::fs::remove_file(&path)?;
            return Ok(Snapshot { meta, snapshot });
        }
        tracing::info!(
            last_log_id = ?meta.last_log_id,
            keys = pairs,
            bytes,
            total_ms = started.elapsed().as_millis() as u64,
            "built snapshot"
        );
        Ok(Snapshot {
            meta,
            snapshot: open_data(&path)?,
        })
    }
}

fn file_name(path: &Path) -> io::Result<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| io::Error::other(format!("{} has no file name", path.display())))
}

/// An image of the applied state taken for a backup (see [`export`]).
pub struct Exported {
    pub meta: SnapshotMeta,
    /// The image, open and already removed from the directory: dropped, it frees its space.
    pub file: File,
    pub pairs: u64,
    pub bytes: u64,
}

/// Writes an image of the applied state as it is now to a file of its own, without stopping
/// applies, for a backup. It is not a snapshot of the node's: nothing points at it and the log is
/// not purged behind it.
///
/// The work runs on a task of its own, so a caller that goes away (a client's deadline, a closed
/// connection) cannot leave the capture running or the lock released half way; the file is
/// unlinked as soon as it is whole, so one that nobody takes is gone with its handle.
pub async fn export(sm: &StateMachineStore) -> io::Result<Exported> {
    let sm = sm.clone();
    tokio::spawn(async move {
        // Serialized with builds and installs: they share the capture, and an install replaces the
        // tree.
        let _serial = sm.inner.snapshot_lock.lock().await;
        let (meta, path, pairs, bytes) = capture_image(&sm, "backup-").await?;
        let file = File::open(&path);
        let removed = std::fs::remove_file(&path);
        let file = file?;
        removed?;
        Ok(Exported {
            meta,
            file,
            pairs,
            bytes,
        })
    })
    .await
    .map_err(io::Error::other)?
}

/// The room an export must leave on the data directory's filesystem after its image: the Raft log
/// and the state machine share that filesystem, a full one stops the node, and no backup is worth
/// that. The disk alert fires below a tenth free (docs/alerts.yml); exports stop at a twentieth.
const EXPORT_HEADROOM_DIVISOR: u64 = 20;
/// On a small filesystem a twentieth is little; at least this, unless the filesystem is tiny.
const EXPORT_HEADROOM_MIN: u64 = 64 << 20;

/// Whether an image of about `estimate` bytes still leaves the headroom on a filesystem of `total`
/// bytes with `available` free.
fn leaves_room(available: u64, total: u64, estimate: u64) -> bool {
    let headroom = (total / EXPORT_HEADROOM_DIVISOR).max(EXPORT_HEADROOM_MIN.min(total / 4));
    available >= estimate.saturating_add(headroom)
}

/// Refuses an export the data directory's filesystem has no room for, before it writes anything.
/// The image is estimated from the current snapshot file (same format, same state give or take
/// the writes since), with a quarter more for growth; with no snapshot yet, only the headroom is
/// checked. A filesystem that cannot be asked does not stop a backup.
pub fn room_for_export(sm: &StateMachineStore) -> Result<(), String> {
    let dir = sm.inner.integrity.dir();
    let Ok(fs) = rustix::fs::statvfs(dir) else {
        return Ok(());
    };
    let total = fs.f_blocks.saturating_mul(fs.f_frsize);
    let available = fs.f_bavail.saturating_mul(fs.f_frsize);
    let current = current_name(sm)
        .ok()
        .flatten()
        .and_then(|name| std::fs::metadata(dir_of(dir).join(name)).ok())
        .map_or(0, |m| m.len());
    let estimate = current.saturating_add(current / 4);
    if leaves_room(available, total, estimate) {
        return Ok(());
    }
    Err(format!(
        "not enough free disk for a backup image: about {estimate} bytes needed, {available} of \
         {total} free, and a backup must leave a twentieth of the filesystem (at least 64 MiB) to \
         the Raft log and the state machine"
    ))
}

/// Ends a capture however the build that started it ends: a capture left on would make every later
/// apply keep old values for a build that is gone.
struct EndCapture<'a>(&'a super::state_machine::Inner);

impl Drop for EndCapture<'_> {
    fn drop(&mut self) {
        *lock(&self.0.capture) = None;
    }
}

/// Walks the applied state, as it stands when this starts, into a new file named `prefix` and a new
/// snapshot name (see `capture`); returns its metadata, path, pairs and bytes. The caller holds
/// `snapshot_lock`.
async fn capture_image(
    sm: &StateMachineStore,
    prefix: &'static str,
) -> io::Result<(SnapshotMeta, PathBuf, u64, u64)> {
    let inner = &sm.inner;
    let (meta, retired, leases, _end) = {
        // The state the image will be: no apply is half way while the capture starts.
        let _guard = inner.write_lock.lock().await;
        let retired = sm.retired_ids();
        let leases = inner.leases.records();
        let last_log_id: Option<LogId> = sm.read_meta(LAST_APPLIED_KEY)?;
        let last_membership: StoredMembership =
            sm.read_meta(LAST_MEMBERSHIP_KEY)?.unwrap_or_default();
        *lock(&inner.capture) = Some(Capture::default());
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
        };
        (meta, retired, leases, EndCapture(inner))
    };
    let sm2 = sm.clone();
    let image_meta = meta.clone();
    let (path, pairs, bytes) =
        blocking(move || write_image(&sm2, &image_meta, &retired, &leases, prefix)).await?;
    Ok((meta, path, pairs, bytes))
}

/// Walks `sm_data` into a new snapshot file (see `capture`); returns its path, pairs and bytes. The
/// file is fsynced and in place under its final name when this returns.
fn write_image(
    sm: &StateMachineStore,
    meta: &SnapshotMeta,
    retired: &BTreeSet<NodeId>,
    leases: &[(u64, LeaseRecord)],
    prefix: &str,
) -> io::Result<(PathBuf, u64, u64)> {
    let inner = &sm.inner;
    let dir = dir_of(inner.integrity.dir());
    std::fs::create_dir_all(&dir)?;
    let name = format!("{prefix}{}", new_name(meta));
    let partial = dir.join(format!("{name}.partial"));
    let out = BufWriter::with_capacity(1 << 20, File::create(&partial)?);
    let mut writer = file::Writer::with_state(out, meta, retired, leases)?;
    let data = inner.data();
    let mut last: Option<sled::IVec> = None;
    let mut applies_held = None;
    for item in data.iter() {
        let (key, live) = item.map_err(io_err)?;
        let over = {
            let capture = lock(&inner.capture);
            let capture = capture
                .as_ref()
                .ok_or_else(|| io::Error::other("the snapshot capture ended during its build"))?;
            for (gone, value) in capture.gone_between(last.as_deref(), Some(&key)) {
                writer.push(gone, value)?;
            }
            if let Some(value) = capture.resolve(&key, &live) {
                writer.push(&key, value)?;
            }
            capture.over_limit()
        };
        if over && applies_held.is_none() {
            // Not while holding the capture: an apply holds the write lock while it notes changes.
            tracing::info!("many writes during a snapshot build: applies wait until it is done");
            applies_held = Some(inner.write_lock.blocking_lock());
        }
        last = Some(key);
    }
    {
        let capture = lock(&inner.capture);
        let capture = capture
            .as_ref()
            .ok_or_else(|| io::Error::other("the snapshot capture ended during its build"))?;
        for (gone, value) in capture.gone_between(last.as_deref(), None) {
            writer.push(gone, value)?;
        }
    }
    drop(applies_held);
    let (out, pairs, bytes) = writer.finish()?;
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    let path = dir.join(&name);
    std::fs::rename(&partial, &path)?;
    sync_dir(&dir)?;
    Ok((path, pairs, bytes))
}

/// Makes the file `name` (in place and fsynced) the current snapshot, unless the current one is at
/// least as new: the stored snapshot is what a crash restarts from and what the log is purged
/// behind, so an older one must never replace it. Durable when it returns true; the file it
/// replaced is deleted.
async fn store_unless_older(
    sm: &StateMachineStore,
    meta: &SnapshotMeta,
    name: &str,
) -> io::Result<bool> {
    let inner = &sm.inner;
    let replaced = {
        let _guard = inner.write_lock.lock().await;
        let current: Option<SnapshotMeta> = read_decoded(&inner.snapshots, SNAPSHOT_META_KEY)?;
        if current.is_some_and(|c| c.last_log_id >= meta.last_log_id) {
            return Ok(false);
        }
        let replaced = current_name(sm)?;
        let mut batch = sled::Batch::default();
        batch.insert(SNAPSHOT_META_KEY, meta.encode()?);
        batch.insert(SNAPSHOT_FILE_KEY, name.as_bytes());
        inner.snapshots.apply_batch(batch).map_err(io_err)?;
        replaced
    };
    super::durable::flush(&inner.db, inner.integrity.dir()).await?;
    if let Some(old) = replaced.filter(|old| old != name) {
        remove_quietly(&dir_of(inner.integrity.dir()).join(old));
    }
    Ok(true)
}

/// The current snapshot's file name, if there is one.
fn current_name(sm: &StateMachineStore) -> io::Result<Option<String>> {
    match sm.inner.snapshots.get(SNAPSHOT_FILE_KEY).map_err(io_err)? {
        Some(bytes) => String::from_utf8(bytes.to_vec()).map(Some).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "sm_snapshot/snapshot_file is not a name",
            )
        }),
        None => Ok(None),
    }
}

/// Removes a file that is no longer needed; failing to is only noted, the next start tidies it.
fn remove_quietly(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "could not remove an old snapshot file");
    }
}

/// Replaces the whole state with the snapshot's (never merges: a merge would resurrect deleted keys).
///
/// The file is loaded into the spare data tree while readers keep reading the current one; one
/// transaction then makes the spare tree current, together with `last_applied`, the membership and
/// the snapshot pointer. A crash before it leaves the old state (the spare tree is dropped at the
/// next open); after it, the new one.
pub(super) async fn install(
    sm: &StateMachineStore,
    meta: &SnapshotMeta,
    data: SnapshotData,
) -> io::Result<()> {
    let inner = &sm.inner;
    let _serial = inner.snapshot_lock.lock().await;
    let dir = dir_of(inner.integrity.dir());
    let name = new_name(meta);
    let path = dir.join(&name);
    {
        let (from, to, dir) = (data.path.clone(), path.clone(), dir.clone());
        blocking(move || {
            std::fs::create_dir_all(&dir)?;
            if from.parent() == Some(dir.as_path()) {
                // Received by the inbox: it is ours to move.
                std::fs::rename(&from, &to)?;
            } else {
                std::fs::copy(&from, &to)?;
                File::open(&to)?.sync_all()?;
            }
            sync_dir(&dir)
        })
        .await?;
    }
    let state = inner.write_lock.lock().await;
    if state.closed {
        return Err(io::Error::other("the state machine is closed"));
    }
    let replaced = current_name(sm)?;
    let sm2 = sm.clone();
    let (meta2, path2, name2) = (meta.clone(), path.clone(), name.clone());
    let (keys, old_tree) = blocking(move || load_and_switch(&sm2, &meta2, &path2, &name2)).await?;
    drop(state);
    let revision = meta.last_log_id.as_ref().map_or(0, |l| l.index);
    // Watches that had not reached the snapshot's revision end now (see `history`).
    inner.history.publish(revision);
    // openraft purges the log behind an installed snapshot, durably (see `durable`).
    super::durable::flush(&inner.db, inner.integrity.dir()).await?;
    if let Some(old) = replaced.filter(|old| *old != name) {
        remove_quietly(&dir.join(old));
    }
    // Off the write lock: applies go on while the old state goes. Emptied before it is dropped,
    // because sled's `drop_tree` pages in every node under one epoch guard and the Db keeps that
    // memory for good, while `clear` frees it as it goes (and leaves `drop_tree` nothing to do).
    // The install has taken effect by now, so a failure here is not the install's: the tree is the
    // spare one, dropped again before the next install and at every open.
    let db = inner.db.clone();
    let sm3 = sm.clone();
    let dropped = blocking(move || {
        sm3.inner.history.drop_below(revision)?;
        old_tree.clear().map_err(io_err)?;
        db.drop_tree(old_tree.name()).map_err(io_err).map(|_| ())
    })
    .await;
    if let Err(e) = dropped {
        tracing::warn!(error = %e, "could not drop the data tree an install replaced");
    }
    tracing::info!(last_log_id = ?meta.last_log_id, keys, "installed snapshot");
    Ok(())
}

/// Makes the state of a new store `image` (a snapshot file, from a backup) relabelled with `meta`:
/// the pairs are copied into a snapshot file of this node's, with `meta` in place of the image's
/// own, and installed as if a leader had sent it. For `raftkv snapshot restore`, which gives the
/// image the membership and log id of the new cluster. Returns the pairs installed. The old
/// cluster's removed ids are left behind with its membership: the new cluster's ids are its own.
pub async fn install_image(
    sm: &StateMachineStore,
    image: impl io::Read + Send + 'static,
    meta: &SnapshotMeta,
) -> io::Result<u64> {
    let dir = dir_of(sm.inner.integrity.dir());
    let path = dir.join(format!("{}.partial", new_name(meta)));
    let (to, relabel) = (path.clone(), meta.clone());
    let (len, pairs) = blocking(move || {
        std::fs::create_dir_all(&dir)?;
        let mut reader = file::Reader::new(BufReader::with_capacity(1 << 20, image))?;
        let out = BufWriter::with_capacity(1 << 20, File::create(&to)?);
        let mut writer =
            file::Writer::with_state(out, &relabel, &BTreeSet::new(), &reader.leases())?;
        while let Some(run) = reader.next_pairs()? {
            for (k, v) in run {
                writer.push(k, v)?;
            }
        }
        let (out, pairs, bytes) = writer.finish()?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        sync_dir(&dir)?;
        Ok((bytes, pairs))
    })
    .await?;
    let data = SnapshotData {
        file: File::open(&path)?,
        path,
        len,
    };
    install(sm, meta, data).await?;
    Ok(pairs)
}

/// Loads the file into the spare tree and switches to it (see [`install`]); returns the pairs loaded
/// and the tree that was current, for the caller to drop. Called with the write lock held.
fn load_and_switch(
    sm: &StateMachineStore,
    meta: &SnapshotMeta,
    path: &Path,
    name: &str,
) -> io::Result<(u64, sled::Tree)> {
    let mut snapshot_batch = sled::Batch::default();
    snapshot_batch.insert(SNAPSHOT_META_KEY, meta.encode()?);
    snapshot_batch.insert(SNAPSHOT_FILE_KEY, name.as_bytes());
    let (_, keys, old) = switch_state(sm, Some((path, Some(meta))), snapshot_batch, true)?;
    Ok((keys, old))
}

/// Makes the state exactly a snapshot file's (or empty, for `None`), without touching the current
/// tree until the end: the file goes into the spare data tree, then one transaction makes that tree
/// current together with `last_applied`, the membership and `snapshot_batch` (applied to
/// `sm_snapshot`). A crash at any point leaves one whole state or the other. A file whose metadata
/// is not `expected` (when given) is refused before anything switches. Returns the file's metadata,
/// the number of pairs loaded and the tree that was current, which the caller drops: no reader
/// holds it any more (readers hold the data lock for the whole read). With `barrier` (an install),
/// the history starts again after the new state's revision, in the same transaction (see `history`).
fn switch_state(
    sm: &StateMachineStore,
    file: Option<(&Path, Option<&SnapshotMeta>)>,
    snapshot_batch: sled::Batch,
    barrier: bool,
) -> io::Result<(Option<SnapshotMeta>, u64, sled::Tree)> {
    let inner = &sm.inner;
    let spare_name = inner.spare_tree_name();
    // Left by an earlier install or a crash during one.
    inner.db.drop_tree(spare_name).map_err(io_err)?;
    let spare = inner.db.open_tree(spare_name).map_err(io_err)?;
    // Removals are for good and ids are never reused, so what this replica knew stays known: the
    // file adds the removals it carries (none, from a version before they were carried).
    let mut retired = sm.retired_ids();
    let mut leases = Vec::new();
    let (found, keys) = match file {
        Some((path, expected)) => {
            let (found, keys, carried, granted) = load_file(&spare, path)?;
            retired.extend(carried);
            leases = granted;
            if let Some(expected) = expected.filter(|e| **e != found) {
                return Err(io::Error::other(format!(
                    "the snapshot file is of {:?}, openraft installs {:?}",
                    found.last_log_id, expected.last_log_id
                )));
            }
            (Some(found), keys)
        }
        None => (None, 0),
    };
    let mut meta_batch = sled::Batch::default();
    match found.as_ref().and_then(|m| m.last_log_id.as_ref()) {
        Some(id) => meta_batch.insert(LAST_APPLIED_KEY, id.encode()?),
        None => meta_batch.remove(LAST_APPLIED_KEY),
    }
    match &found {
        Some(m) => meta_batch.insert(LAST_MEMBERSHIP_KEY, m.last_membership.encode()?),
        None => meta_batch.remove(LAST_MEMBERSHIP_KEY),
    }
    if !retired.is_empty() {
        meta_batch.insert(RETIRED_KEY, crate::codec::encode(&retired).map_err(io_err)?);
    }
    meta_batch.insert(super::state_machine::DATA_TREE_KEY, spare_name.as_bytes());
    let revision = found
        .as_ref()
        .and_then(|m| m.last_log_id.as_ref())
        .map_or(0, |l| l.index);
    let mut history_batch = sled::Batch::default();
    let mut barrier_bytes = None;
    if barrier {
        let (key, value) = History::barrier(revision).map_err(io_err)?;
        barrier_bytes = Some(value.len() as u64);
        history_batch.insert(&key, value);
    }
    // Built before anything switches: nothing after the transaction may fail.
    let lease_table = super::leases::Leases::build(&leases, &spare)?;
    let leases_batch = inner.leases.replace_batch(&leases)?;
    let result: Result<(), TransactionError<String>> = (
        &inner.meta,
        &inner.snapshots,
        inner.history.tree(),
        inner.leases.tree(),
    )
        .transaction(|(m, s, h, l)| {
            m.apply_batch(&meta_batch)?;
            s.apply_batch(&snapshot_batch)?;
            h.apply_batch(&history_batch)?;
            l.apply_batch(&leases_batch)?;
            Ok(())
        });
    result.map_err(tx_err)?;
    inner.leases.replace(lease_table);
    if let Some(bytes) = barrier_bytes {
        inner.history.installed(revision, bytes);
    }
    sm.set_retired(retired);
    let old = inner.switch_data(spare);
    Ok((found, keys, old))
}

/// Inserts a snapshot file's pairs into `tree` (which must be empty), as they are read.
/// Returns the file's metadata, the number of pairs, the removed ids and the leases it carries. The file is checked as it is read; a
/// local file that does not read is corruption (`InvalidData`).
type Loaded = (SnapshotMeta, u64, BTreeSet<NodeId>, Vec<(u64, LeaseRecord)>);

fn load_file(tree: &sled::Tree, path: &Path) -> io::Result<Loaded> {
    let mut reader = file::Reader::new(BufReader::with_capacity(1 << 20, File::open(path)?))?;
    let mut keys = 0u64;
    // Plain inserts, not one `apply_batch` per frame: a batch holds one epoch guard for all its
    // inserts, and every insert leaves a copy of its leaf for the epoch collector, which frees only a
    // few hundred objects per pin; so a batched load keeps gigabytes of dead leaves alive. Atomicity
    // comes from the tree switch, not from here.
    while let Some(run) = reader.next_pairs()? {
        keys += run.len() as u64;
        for (k, v) in run {
            tree.insert(k, v).map_err(io_err)?;
        }
    }
    Ok((
        reader.meta().clone(),
        keys,
        reader.retired().clone(),
        reader.leases(),
    ))
}

/// Replaces the state with the stored snapshot's, or empties it when there is none, and returns the
/// log id it now stands at. Only for recovery at open, when nothing else touches the store.
pub(super) fn restore_current(sm: &StateMachineStore) -> io::Result<Option<LogId>> {
    let path = current_name(sm)?.map(|name| dir_of(sm.inner.integrity.dir()).join(name));
    if path.is_none() && sm.inner.data_read().is_empty() {
        // Nothing was ever applied, or nothing that a switch would remove (a new directory). Leases
        // granted before the crash go too: the log grants them again.
        sm.inner.meta.remove(LAST_APPLIED_KEY).map_err(io_err)?;
        sm.inner.meta.remove(LAST_MEMBERSHIP_KEY).map_err(io_err)?;
        sm.inner.leases.tree().clear().map_err(io_err)?;
        return Ok(None);
    }
    let file = path.as_deref().map(|path| (path, None));
    let (found, _, old) = switch_state(sm, file, sled::Batch::default(), false)?;
    // At open, the node serves only once this returns: dropped whole, which is quick (see `install`
    // for the memory that costs until the process ends).
    sm.inner.db.drop_tree(old.name()).map_err(io_err)?;
    Ok(found.and_then(|meta| meta.last_log_id))
}

/// Removes what an interrupted build, transfer or install left behind: snapshot files other than the
/// current one, and the spare data tree. Runs at open, before anything else uses the store.
pub(super) fn tidy(sm: &StateMachineStore) -> io::Result<()> {
    let inner = &sm.inner;
    let dir = dir_of(inner.integrity.dir());
    std::fs::create_dir_all(&dir)?;
    let current = current_name(sm)?;
    if let Some(name) = &current
        && !dir.join(name).is_file()
    {
        // The log behind it is purged: nothing else holds that state. Found here, at open, rather
        // than when a crash restart or a lagging follower first needs it.
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the current snapshot file {} is missing",
                dir.join(name).display()
            ),
        ));
    }
    let mut removed = 0;
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if current.as_deref().is_some_and(|c| name.to_str() == Some(c)) {
            continue;
        }
        remove_quietly(&entry.path());
        removed += 1;
    }
    if removed > 0 {
        sync_dir(&dir)?;
        tracing::info!(
            removed,
            "removed snapshot files left by an interrupted build or transfer"
        );
    }
    inner
        .db
        .drop_tree(inner.spare_tree_name())
        .map_err(io_err)?;
    Ok(())
}

/// Whether `bytes` decode as a snapshot that formats 2 to 4 stored in sled, image and all (for the
/// decoder bound tests: a migration reads them from disk).
pub fn check_legacy(bytes: &[u8]) -> bool {
    legacy::verify_stored(bytes).is_ok()
}

pub(super) fn current(sm: &StateMachineStore) -> io::Result<Option<Snapshot>> {
    let Some(meta) = read_decoded::<SnapshotMeta>(&sm.inner.snapshots, SNAPSHOT_META_KEY)? else {
        return Ok(None);
    };
    let Some(name) = current_name(sm)? else {
        return Ok(None);
    };
    let path = dir_of(sm.inner.integrity.dir()).join(name);
    Ok(Some(Snapshot {
        meta,
        snapshot: open_data(&path)?,
    }))
}

/// Snapshot metadata at `index` (term 1, node 1), for tests.
#[cfg(test)]
pub(crate) fn test_meta(index: u64) -> SnapshotMeta {
    SnapshotMeta {
        last_log_id: Some(openraft::testing::log_id::<TypeConfig>(1, 1, index)),
        last_membership: StoredMembership::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::test_meta as meta_at;

    #[test]
    fn an_export_leaves_a_twentieth_of_the_disk() {
        const GIB: u64 = 1 << 30;
        // 100 GiB filesystem: 5 GiB must stay free after the image.
        assert!(leaves_room(6 * GIB, 100 * GIB, GIB));
        assert!(!leaves_room(6 * GIB, 100 * GIB, GIB + 1));
        assert!(!leaves_room(4 * GIB, 100 * GIB, 0));
        // 400 MiB filesystem: the 64 MiB floor applies rather than 20 MiB.
        assert!(!leaves_room(70 << 20, 400 << 20, 10 << 20));
        assert!(leaves_room(80 << 20, 400 << 20, 10 << 20));
        // A tiny one: a quarter of it.
        assert!(leaves_room(30 << 20, 100 << 20, 4 << 20));
        assert!(!leaves_room(20 << 20, 100 << 20, 4 << 20));
        assert!(!leaves_room(0, 0, 1));
    }

    fn empty_file(sm: &StateMachineStore, meta: &SnapshotMeta) -> String {
        let name = new_name(meta);
        let dir = dir_of(sm.inner.integrity.dir());
        let out = File::create(dir.join(&name)).unwrap();
        file::Writer::new(out, meta).unwrap().finish().unwrap();
        name
    }

    #[tokio::test]
    async fn an_older_build_never_replaces_a_newer_stored_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, sm) = crate::store::open(dir.path(), 1).unwrap();
        let newer = empty_file(&sm, &meta_at(9));
        let older = empty_file(&sm, &meta_at(5));
        assert!(store_unless_older(&sm, &meta_at(9), &newer).await.unwrap());
        assert!(!store_unless_older(&sm, &meta_at(5), &older).await.unwrap());
        let stored = current(&sm).unwrap().unwrap();
        assert_eq!(stored.meta, meta_at(9));
        assert_eq!(file_name(&stored.snapshot.path).unwrap(), newer);
        let newest = empty_file(&sm, &meta_at(12));
        assert!(
            store_unless_older(&sm, &meta_at(12), &newest)
                .await
                .unwrap()
        );
        assert_eq!(current(&sm).unwrap().unwrap().meta, meta_at(12));
        assert!(
            !dir_of(dir.path()).join(&newer).exists(),
            "the replaced file is deleted"
        );
    }
}
