//! Older storage formats, rewritten at open before anything else reads the directory: 2 -> 3, then
//! 3 -> 4 (see [`log_to_engine`]), then 4 -> 5 (see [`snapshot_to_file`]), then 5 -> 6 (see
//! [`add_history`]), then 6 -> 7 (see [`add_leases`]).
//!
//! ## 2 -> 3
//!
//! Format 3 stores openraft's values through raftkv's own records (see `record`). Those were laid
//! out so that every value format 2 stored in openraft's serde shape keeps its bytes (log entries,
//! the vote, log ids, memberships; pinned in `record`'s tests), except snapshot metadata: format 2
//! stored openraft 0.10's `SnapshotMeta`, which ends with a reserved, always-empty `snapshot_id`
//! string, and format 3's record has no such field. So the migration rewrites only the snapshot
//! metadata: `snapshot_meta` alone and inside the stored `snapshot`, in `sm_snapshot` (or in
//! `sm_meta`, where older builds kept them; [`snapshot_to_file`] moves them later, wherever they
//! are). Rewriting the log as well would write the same bytes again, at the risk of a
//! crash half way for no gain.
//!
//! Crash safety: the rewritten values and the new format key go into one sled transaction across
//! the trees, which is then flushed. sled recovers a transaction whole or not at all, so after a
//! crash the directory is either still format 2 throughout (the next start migrates again from
//! scratch: the migration reads only format 2 values) or format 3 throughout. Nothing is deleted.
//!
//! Format 2's shapes are spelt out here too, so this migration keeps reading format 2 whatever a
//! later openraft does to its own types. They reuse format 3's records for the parts whose bytes are
//! the same; a format that changes one of those records must give this module its own copy first.

use serde::{Deserialize, Serialize};
use sled::transaction::{TransactionError, Transactional};

use std::path::Path;
use std::sync::Mutex;

use super::log::{LOG_DIR, WalEntry, WalLogId, WalVote, open_wal, sync_blocking};
use super::record::{self, Record};
use super::snapshot::legacy::{Image, Pair, SNAPSHOT_KEY, StoredSnapshot, StoredSnapshotRecord};
use super::snapshot::{self, SNAPSHOT_FILE_KEY, SNAPSHOT_META_KEY};
use super::{FORMAT_KEY, StoreError, Trees, read_decoded, trees, tx_err};
use crate::codec::{self, CodecError};
use crate::sync::lock;
use crate::types;

/// Format 2's snapshot metadata: openraft 0.10's serde shape, with its reserved `snapshot_id` last
/// (empty when openraft 0.10 wrote it, a transfer id when 0.9 did; ignored either way).
#[derive(Serialize, Deserialize)]
struct SnapshotMetaRecordV2 {
    last_log_id: Option<record::LogId>,
    last_membership: record::StoredMembership,
    snapshot_id: String,
}

/// Snapshot metadata as format 2 stored it.
pub(super) struct SnapshotMetaV2(pub types::SnapshotMeta);

/// The stored snapshot as format 2 stored it (the image inside is the same in both formats).
pub(super) struct StoredSnapshotV2(pub StoredSnapshot);

impl Record for SnapshotMetaV2 {
    fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode(&v2_meta(&self.0))
    }
    fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        Ok(SnapshotMetaV2(from_v2_meta(codec::decode(bytes)?)?))
    }
}

impl Record for StoredSnapshotV2 {
    fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode(&StoredSnapshotRecord {
            meta: v2_meta(&self.0.meta),
            data: serde_bytes::Bytes::new(&self.0.data),
        })
    }
    fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        let stored: StoredSnapshotRecord<SnapshotMetaRecordV2, serde_bytes::ByteBuf> =
            codec::decode(bytes)?;
        Ok(StoredSnapshotV2(StoredSnapshot {
            meta: from_v2_meta(stored.meta)?,
            data: stored.data.into_vec(),
        }))
    }
}

fn v2_meta(meta: &types::SnapshotMeta) -> SnapshotMetaRecordV2 {
    let record::SnapshotMeta {
        last_log_id,
        last_membership,
    } = meta.into();
    SnapshotMetaRecordV2 {
        last_log_id,
        last_membership,
        snapshot_id: String::new(),
    }
}

fn from_v2_meta(meta: SnapshotMetaRecordV2) -> Result<types::SnapshotMeta, CodecError> {
    record::SnapshotMeta {
        last_log_id: meta.last_log_id,
        last_membership: meta.last_membership,
    }
    .try_into()
}

/// The points a migration can be stopped at, for the tests that show a stop anywhere is harmless.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Everything format 2 stored was read and converted; nothing written yet.
    Converted,
    /// The transaction is written (durable at the next flush, sled's own or the node's).
    Written,
}

/// Rewrites a format 2 directory as format 3 (see the module doc).
pub(super) fn to_3(db: &sled::Db) -> Result<(), StoreError> {
    to_3_until(db, None)
}

/// [`to_3`], returning early after `stop` when one is given.
pub(super) fn to_3_until(db: &sled::Db, stop: Option<Step>) -> Result<(), StoreError> {
    let t = trees(db)?;
    let mut meta_writes: Vec<(&'static [u8], sled::IVec)> = Vec::new();
    let mut snapshot_writes: Vec<(&'static [u8], sled::IVec)> = Vec::new();
    let mut covers = None;
    for (tree, writes) in [
        (&t.sm_meta, &mut meta_writes),
        (&t.sm_snapshot, &mut snapshot_writes),
    ] {
        if let Some(bytes) = tree.get(SNAPSHOT_META_KEY)? {
            let SnapshotMetaV2(meta) = SnapshotMetaV2::decode(&bytes)?;
            covers = meta.last_log_id;
            writes.push((SNAPSHOT_META_KEY, meta.encode()?.into()));
        }
        if let Some(bytes) = tree.get(SNAPSHOT_KEY)? {
            let StoredSnapshotV2(stored) = StoredSnapshotV2::decode(&bytes)?;
            writes.push((SNAPSHOT_KEY, stored.encode()?.into()));
        }
    }
    if stop == Some(Step::Converted) {
        return Ok(());
    }
    let format: sled::IVec = codec::encode(&3u32)?.into();
    let result: Result<(), TransactionError<String>> = (&t.raft_meta, &t.sm_meta, &t.sm_snapshot)
        .transaction(|(raft_meta, sm_meta, sm_snapshot)| {
            for (key, value) in &meta_writes {
                sm_meta.insert(*key, value.clone())?;
            }
            for (key, value) in &snapshot_writes {
                sm_snapshot.insert(*key, value.clone())?;
            }
            raft_meta.insert(FORMAT_KEY, format.clone())?;
            Ok(())
        });
    result.map_err(tx_err)?;
    if stop == Some(Step::Written) {
        return Ok(());
    }
    db.flush()?;
    tracing::info!(
        snapshot = ?covers,
        rewritten = meta_writes.len() + snapshot_writes.len(),
        "migrated the data directory from storage format 2 to 3: rewrote the snapshot metadata \
         without openraft's reserved snapshot_id; the log, vote and memberships already had \
         format 3's bytes"
    );
    Ok(())
}

/// Where format 3 kept the vote, the commit point and the purge point, in `raft_meta`.
pub(crate) const VOTE_KEY: &[u8] = b"vote";
pub(crate) const COMMITTED_KEY: &[u8] = b"committed";
pub(crate) const LAST_PURGED_KEY: &[u8] = b"last_purged";

/// The keys format 3 kept in `raft_meta` for the log, which format 4 keeps in the log engine.
pub(crate) const LOG_META_KEYS: [&[u8]; 3] = [VOTE_KEY, COMMITTED_KEY, LAST_PURGED_KEY];

/// ## 3 -> 4
///
/// Format 4 keeps the vote, the log and the commit and purge points in the log engine (`log`)
/// instead of sled. The migration copies them into a new engine directory beside `sled/`, fsyncs
/// it, renames it into place (the step that decides: an engine directory under its real name is
/// always complete), and only then empties sled's log tree, removes the keys and writes format 4 in
/// one sled transaction. A crash before the rename leaves format 3 as it was, and the copy starts
/// again; after it, the next start finds the engine directory and only finishes the sled part.
///
/// The copy keeps what format 3's reads kept: entries after the purge point, up to the first gap a
/// crash may have left (format 3 cut its log there at every open; nothing after a gap was ever
/// reported flushed).
pub(super) fn log_to_engine(db: &sled::Db, dir: &Path) -> Result<(), StoreError> {
    let t = trees(db)?;
    let target = dir.join(LOG_DIR);
    let mut copied = None;
    if !target.is_dir() {
        let staging = dir.join(format!("{LOG_DIR}.migrating"));
        if staging.exists() {
            std::fs::remove_dir_all(&staging)?;
        }
        std::fs::create_dir_all(&staging)?;
        let wal = Mutex::new(open_wal(&staging)?);
        copied = Some(copy_log(&t, &wal)?);
        sync_blocking(&wal)?;
        drop(wal);
        std::fs::rename(&staging, &target)?;
        std::fs::File::open(dir)?.sync_all()?;
    }
    t.raft_log.clear()?;
    let format: sled::IVec = codec::encode(&4u32)?.into();
    t.raft_meta
        .transaction(|raft_meta| {
            for key in LOG_META_KEYS {
                raft_meta.remove(key)?;
            }
            raft_meta.insert(FORMAT_KEY, format.clone())?;
            Ok(())
        })
        .map_err(|e: TransactionError<String>| tx_err(e))?;
    super::durable::flush_blocking(db, dir)?;
    match copied {
        Some(entries) => tracing::info!(
            entries,
            "migrated the data directory from storage format 3 to 4: the Raft log and vote moved \
             from sled into {LOG_DIR}/"
        ),
        None => tracing::info!(
            "finished migrating the data directory from storage format 3 to 4: {LOG_DIR}/ was \
             already complete"
        ),
    }
    Ok(())
}

/// Copies format 3's log into the engine; returns how many entries it copied.
fn copy_log(t: &Trees, wal: &Mutex<super::log::Wal>) -> Result<u64, StoreError> {
    use raft_log::api::raft_log_writer::RaftLogWriter;
    let vote: Option<types::Vote> = read_decoded(&t.raft_meta, VOTE_KEY)?;
    let purged: Option<types::LogId> = read_decoded(&t.raft_meta, LAST_PURGED_KEY)?;
    let committed: Option<types::LogId> =
        read_decoded::<Option<types::LogId>>(&t.raft_meta, COMMITTED_KEY)?.flatten();
    let mut wal = lock(wal);
    if let Some(vote) = vote {
        wal.save_vote(WalVote(vote))?;
    }
    if let Some(purged) = purged {
        wal.purge(WalLogId(purged))?;
    }
    let mut expected = purged.map(|p| p.index + 1);
    let mut copied = 0u64;
    for item in t.raft_log.range(expected.unwrap_or(0).to_be_bytes()..) {
        let (_, bytes) = item?;
        let entry = types::Entry::decode(&bytes)?;
        if expected.is_some_and(|e| e != entry.log_id.index) {
            tracing::warn!(
                missing = ?expected,
                "the format 3 log had a gap after a crash; not copying the unflushed entries after it"
            );
            break;
        }
        expected = Some(entry.log_id.index + 1);
        wal.append([(WalLogId(entry.log_id), WalEntry::new(entry))])?;
        copied += 1;
    }
    let state = wal.log_state();
    let commit = committed
        .map(WalLogId)
        .filter(|c| state.last().is_some_and(|last| c <= last));
    if let Some(committed) = commit {
        wal.commit(committed)?;
    }
    Ok(copied)
}

/// Moves the snapshot out of sled into a file of its own (format 5; see `snapshot`).
///
/// Formats 2 to 4 stored the whole snapshot as one sled value, in `sm_snapshot` (or in `sm_meta`,
/// where builds before its own tree kept it). Its image is written as a snapshot file, fsynced
/// and renamed into `snapshots/`; then one transaction across the trees points `sm_snapshot` at
/// it, removes the old values and writes format 5. A crash before the transaction leaves format 4
/// as it was (the next start migrates again and removes the unused file); after it, format 5.
pub(super) fn snapshot_to_file(db: &sled::Db, dir: &Path) -> Result<(), StoreError> {
    let t = trees(db)?;
    let mut moved = None;
    for tree in [&t.sm_snapshot, &t.sm_meta] {
        let Some(bytes) = tree.get(SNAPSHOT_KEY)? else {
            continue;
        };
        let stored = StoredSnapshot::decode(&bytes)?;
        let image: Image = codec::decode(&stored.data)?;
        drop(bytes);
        let keys = image.pairs.len();
        let name = write_snapshot_file(dir, &stored.meta, image.pairs)?;
        moved = Some((stored.meta, name, keys));
        break;
    }
    let format: sled::IVec = codec::encode(&5u32)?.into();
    let pointer = match &moved {
        Some((meta, name, _)) => Some((sled::IVec::from(meta.encode()?), name.clone())),
        None => None,
    };
    let result: Result<(), TransactionError<String>> = (&t.sm_meta, &t.sm_snapshot, &t.raft_meta)
        .transaction(|(m, s, r)| {
            for key in [SNAPSHOT_KEY, SNAPSHOT_META_KEY] {
                m.remove(key)?;
            }
            s.remove(SNAPSHOT_KEY)?;
            if let Some((meta, name)) = &pointer {
                s.insert(SNAPSHOT_META_KEY, meta.clone())?;
                s.insert(SNAPSHOT_FILE_KEY, name.as_bytes())?;
            }
            r.insert(FORMAT_KEY, format.clone())?;
            Ok(())
        });
    result.map_err(tx_err)?;
    super::durable::flush_blocking(db, dir)?;
    match moved {
        Some((meta, name, keys)) => tracing::info!(
            last_log_id = ?meta.last_log_id,
            keys,
            file = name,
            "migrated the data directory from storage format 4 to 5: the snapshot moved from sled \
             into snapshots/"
        ),
        None => tracing::info!(
            "migrated the data directory from storage format 4 to 5 (there was no snapshot to move)"
        ),
    }
    Ok(())
}

/// Writes `pairs` (in key order, as sled iterated them) as a snapshot file in place; returns its name.
fn write_snapshot_file(
    dir: &Path,
    meta: &types::SnapshotMeta,
    pairs: Vec<Pair>,
) -> Result<String, StoreError> {
    let data_dir = dir;
    let dir = snapshot::dir_of(dir);
    std::fs::create_dir_all(&dir)?;
    // The caller removes the snapshot from sled once this returns: the directory's own name must be
    // as durable as the file in it.
    snapshot::sync_dir(data_dir)?;
    let name = snapshot::new_name(meta);
    let partial = dir.join(format!("{name}.partial"));
    let out = std::io::BufWriter::new(std::fs::File::create(&partial)?);
    let mut writer = snapshot::file::Writer::new(out, meta).map_err(std::io::Error::from)?;
    for Pair(k, v) in pairs {
        writer.push(&k, &v).map_err(std::io::Error::from)?;
    }
    let (out, _, _) = writer.finish().map_err(std::io::Error::from)?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&partial, dir.join(&name))?;
    snapshot::sync_dir(&dir)?;
    Ok(name)
}

/// Format 6 adds `sm_history`, which starts empty: watches on a migrated node start after the
/// revision it had applied (see `history`). Only the format changes, so that a build before 6,
/// which would apply entries without recording them, refuses the directory instead of leaving a
/// gap in the history that the next start could not see.
pub(super) fn add_history(db: &sled::Db, dir: &Path) -> Result<(), StoreError> {
    let t = trees(db)?;
    t.sm_history.clear()?;
    t.raft_meta.insert(FORMAT_KEY, codec::encode(&6u32)?)?;
    super::durable::flush_blocking(db, dir)?;
    tracing::info!("migrated the data directory from storage format 5 to 6: watch history added");
    Ok(())
}

/// Format 7 adds leases: `sm_leases`, which starts empty, and values that may carry a lease id
/// (every value of an older format reads as having none). Only the format changes, so that a build
/// before 7, which could not read a leased value, refuses the directory.
pub(super) fn add_leases(db: &sled::Db, dir: &Path) -> Result<(), StoreError> {
    let t = trees(db)?;
    t.sm_leases.clear()?;
    t.raft_meta.insert(FORMAT_KEY, codec::encode(&7u32)?)?;
    super::durable::flush_blocking(db, dir)?;
    tracing::info!("migrated the data directory from storage format 6 to 7: leases added");
    Ok(())
}
