//! Durable storage: the Raft log and vote in a log engine, the state machine in sled.
//!
//! A data directory holds three stores side by side:
//! - `raft-log/`: the log engine's chunk files (see `log`): the vote, the log entries, the commit
//!   point and the purge point, as records of one write-ahead log;
//! - `snapshots/`: the current snapshot's file (see `snapshot`);
//! - `sled/`: one sled `Db` with the trees
//!   - `raft_meta`: the node id and cluster id this directory belongs to, and the storage format;
//!   - `sm_data` (or `sm_data.1`, whichever `sm_meta` names; a snapshot install switches between
//!     them): user key -> encoded [`state_machine::StoredValue`];
//!   - `sm_meta`: last applied log id, last membership, which data tree is current;
//!   - `sm_snapshot`: the current snapshot's metadata and file name, alone in their tree;
//!   - `sm_history`: revision -> what it changed, the window watches read (see `history`);
//!   - `sm_leases`: lease id -> its granted TTL and last checkpoint (see `leases`);
//!   - `raft_log`: empty; formats before 4 kept the log here (see `migrate`).
//!
//! Crash reasoning, relied on by every part:
//! 1. Log entries and the vote are fsynced before openraft hears they are done, in the order
//!    openraft issued them (one WAL), so a crash keeps a prefix of what was written and never a hole.
//! 2. Applying writes `sm_data` and `last_applied` without a transaction or a flush, so after a crash
//!    the state machine is not trusted: unless the last run ended with a clean shutdown, it is rebuilt
//!    from the last durable snapshot at open, and openraft re-applies the committed log after it, at
//!    once up to the saved commit point (see `state_machine`).
//! 3. A snapshot's file is fsynced and its pointer flushed in sled before openraft purges the log
//!    behind it, and the log engine deletes purged chunk files only after the purge record is
//!    fsynced.
//!
//! So after a crash: `purged <= snapshot <= last_applied`, and every committed entry after the snapshot
//! is still in a quorum's logs for openraft to re-apply.
//!
//! Every value is stored through a `record` of raftkv's own shape, never openraft's serde shape,
//! so that only raftkv decides what its directories contain (docs/storage-format.md).

mod durable;
pub mod history;
pub mod integrity;
pub mod leases;
pub mod log;
mod migrate;
pub(crate) mod record;
pub mod snapshot;
pub mod state_machine;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use integrity::Integrity;
pub use log::{Durability, LogStore};
pub use state_machine::StateMachineStore;

/// The Raft handle over this store. Named here, where the state machine type is, so the model types
/// (`types`) stay free of storage.
pub type Raft = openraft::Raft<crate::types::TypeConfig, StateMachineStore>;

use crate::types::NodeId;

pub(crate) const NODE_ID_KEY: &[u8] = b"node_id";
pub(crate) const CLUSTER_ID_KEY: &[u8] = b"cluster_id";
pub(crate) const FORMAT_KEY: &[u8] = b"format";

/// The layout of what this version stores. 7: leases (`sm_leases`, and a key's lease appended to
/// its stored value). 6: the history of recent changes for watches, in
/// `sm_history`. 5: the snapshot in a file of its own. 4: the Raft log
/// and vote in the log engine. 3: every openraft value through raftkv's own records, the log in
/// sled. 2: openraft's serde shapes, a member with a client and a peer address. 2 to 6 are
/// migrated to 7 at open (see `migrate`). Directories
/// without the key were written before it existed (format 1, one address per member); their
/// membership does not decode as format 2, so they are refused with [`StoreError::Format`] rather
/// than reported corrupt. The history is in docs/storage-format.md.
pub const FORMAT: u32 = 7;

/// The oldest format this version migrates from at open (every one from it up to [`FORMAT`]).
pub const MIGRATES_FROM: u32 = 2;

/// The format whose snapshot metadata is openraft's serde shape (see `migrate`).
pub(crate) const SERDE_SHAPES: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("{0}")]
    Codec(#[from] crate::codec::CodecError),
    #[error(
        "data directory belongs to node {found}, not node {expected}; node ids are never reused"
    )]
    WrongNode { expected: NodeId, found: NodeId },
    #[error(
        "the data in {} is corrupt: {what}. Wipe the directory and start the node again: it \
         rejoins the cluster by snapshot",
        .dir.display()
    )]
    Corrupt { dir: PathBuf, what: String },
    #[error(
        "the data in {} is in storage format {found}; this raftkv reads format {FORMAT} (and \
         migrates formats {MIGRATES_FROM} and later to it at start). Start it with the raftkv that wrote it, or \
         wipe the directory and let the node rejoin by snapshot from peers that run this version",
        .dir.display()
    )]
    Format { dir: PathBuf, found: u32 },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The sled configuration every opener uses, the node and `raftkv check` alike.
pub fn sled_config(dir: &Path) -> sled::Config {
    sled::Config::new()
        .path(dir.join("sled"))
        .mode(sled::Mode::LowSpace)
        // sled's cache is what a node holds beyond the OS page cache; its real footprint is a few
        // times this figure. Kept small so a node's memory stays bounded by a large state, the way
        // etcd leaves its data to the page cache.
        .cache_capacity(64 * 1024 * 1024)
        // Durability comes from explicit flushes at each durability point; the background flusher
        // only bounds how much unacknowledged work a crash can drop.
        .flush_every_ms(Some(1000))
}

/// The trees of a data directory (see the module doc).
pub(crate) struct Trees {
    pub raft_log: sled::Tree,
    pub raft_meta: sled::Tree,
    pub sm_data: sled::Tree,
    pub sm_meta: sled::Tree,
    pub sm_snapshot: sled::Tree,
    pub sm_history: sled::Tree,
    pub sm_leases: sled::Tree,
}

pub(crate) fn trees(db: &sled::Db) -> Result<Trees, StoreError> {
    let sm_meta = db.open_tree("sm_meta")?;
    let data = match sm_meta.get(state_machine::DATA_TREE_KEY)? {
        None => state_machine::DATA_TREES[0],
        Some(name) => state_machine::DATA_TREES
            .into_iter()
            .find(|known| known.as_bytes() == name.as_ref())
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "sm_meta/data_tree names no data tree",
                )
            })?,
    };
    Ok(Trees {
        raft_log: db.open_tree("raft_log")?,
        raft_meta: db.open_tree("raft_meta")?,
        sm_data: db.open_tree(data)?,
        sm_meta,
        sm_snapshot: db.open_tree("sm_snapshot")?,
        sm_history: db.open_tree(history::TREE)?,
        sm_leases: db.open_tree(leases::TREE)?,
    })
}

/// Turns a failure to open into [`StoreError::Corrupt`] when it is corruption, reporting it.
fn classify(integrity: &Integrity, what: &str, e: impl Into<StoreError>) -> StoreError {
    let e = e.into();
    let corrupt = match &e {
        StoreError::Sled(sled::Error::Corruption { .. }) | StoreError::Codec(_) => true,
        StoreError::Io(io) => io.kind() == std::io::ErrorKind::InvalidData,
        _ => false,
    };
    if !corrupt {
        return e;
    }
    let what = format!("{what}: {e}");
    integrity.report(&what);
    StoreError::Corrupt {
        dir: integrity.dir().to_path_buf(),
        what,
    }
}

/// Opens (or creates) a node's storage, checks that the directory is this node's and that its
/// metadata is sound (see `integrity`), migrating an older format first. Corruption found here is
/// [`StoreError::Corrupt`], and trips the returned stores' [`Integrity`] for anything found later.
pub fn open(dir: &Path, node_id: NodeId) -> Result<(LogStore, StateMachineStore), StoreError> {
    open_with(dir, node_id, Durability::Fsync)
}

/// [`open`], with the log's [`Durability`] chosen (the unsafe one only for the harness's self-test).
pub fn open_with(
    dir: &Path,
    node_id: NodeId,
    durability: Durability,
) -> Result<(LogStore, StateMachineStore), StoreError> {
    let integrity = Integrity::new(dir);
    let db = sled_config(dir)
        .open()
        .map_err(|e| classify(&integrity, "opening sled", e))?;
    let format = check_format(&db, dir)?;
    let existing = trees(&db)?.raft_meta.get(NODE_ID_KEY)?.is_some();
    if format < FORMAT {
        // In the shape the directory is in: corruption is found before anything is rewritten.
        fail_on_problems(
            &integrity,
            integrity::check_meta(&db, Some(node_id), format, None),
        )?;
        if format == SERDE_SHAPES {
            migrate::to_3(&db).map_err(|e| classify(&integrity, "migrating to format 3", e))?;
        }
        if format < 4 {
            migrate::log_to_engine(&db, dir)
                .map_err(|e| classify(&integrity, "migrating to format 4", e))?;
        }
        if format < 5 {
            migrate::snapshot_to_file(&db, dir)
                .map_err(|e| classify(&integrity, "migrating to format 5", e))?;
        }
        if format < 6 {
            migrate::add_history(&db, dir)
                .map_err(|e| classify(&integrity, "migrating to format 6", e))?;
        }
        migrate::add_leases(&db, dir)
            .map_err(|e| classify(&integrity, "migrating to format 7", e))?;
    }
    let log_dir = dir.join(log::LOG_DIR);
    if existing && !log_dir.is_dir() {
        let what = format!(
            "{} is missing: this node's Raft log and vote are gone",
            log_dir.display()
        );
        integrity.report(&what);
        return Err(StoreError::Corrupt {
            dir: dir.to_path_buf(),
            what,
        });
    }
    let log = LogStore::open(&log_dir, integrity.clone(), durability)
        .map_err(|e| classify(&integrity, "opening the log", e))?;
    let report = integrity::check_meta(&db, Some(node_id), FORMAT, Some(&log.summary()));
    fail_on_problems(&integrity, report)?;
    let opened = open_checked(db, node_id, integrity.clone(), log)
        .map_err(|e| classify(&integrity, "opening the stores", e))?;
    durable::sync_layout(dir).map_err(|e| classify(&integrity, "syncing the data directory", e))?;
    Ok(opened)
}

/// [`StoreError::Corrupt`] with the start check's first problem, if it found any.
fn fail_on_problems(integrity: &Integrity, report: integrity::Report) -> Result<(), StoreError> {
    let Some(problem) = report.problems.first() else {
        return Ok(());
    };
    let what = format!(
        "start check: {problem} ({} problems in all)",
        report.problems.len()
    );
    integrity.report(&what);
    Err(StoreError::Corrupt {
        dir: integrity.dir().to_path_buf(),
        what,
    })
}

fn open_checked(
    db: sled::Db,
    node_id: NodeId,
    integrity: Arc<Integrity>,
    log: LogStore,
) -> Result<(LogStore, StateMachineStore), StoreError> {
    let t = trees(&db)?;
    match t.raft_meta.get(NODE_ID_KEY)? {
        Some(bytes) => {
            let found: NodeId = crate::codec::decode(&bytes)?;
            if found != node_id {
                return Err(StoreError::WrongNode {
                    expected: node_id,
                    found,
                });
            }
        }
        None => {
            t.raft_meta
                .insert(NODE_ID_KEY, crate::codec::encode(&node_id)?)?;
            t.raft_meta
                .insert(FORMAT_KEY, crate::codec::encode(&FORMAT)?)?;
            // Which node this is must survive a power cut like its vote does.
            durable::flush_blocking(&db, integrity.dir())?;
        }
    }
    let sm = StateMachineStore::new(
        db,
        t.sm_data,
        t.sm_meta,
        t.sm_snapshot,
        t.sm_history,
        t.sm_leases,
        integrity,
    )?;
    snapshot::tidy(&sm)?;
    sm.recover()?;
    Ok((log, sm))
}

/// The storage format the directory is in ([`FORMAT`] for a new one), or [`StoreError::Format`]
/// unless that is one this version reads or migrates.
pub fn check_format(db: &sled::Db, dir: &Path) -> Result<u32, StoreError> {
    let meta = db.open_tree("raft_meta")?;
    if meta.get(NODE_ID_KEY)?.is_none() {
        return Ok(FORMAT);
    }
    let found = match meta.get(FORMAT_KEY)? {
        Some(bytes) => crate::codec::decode(&bytes)?,
        None => 1,
    };
    if !(MIGRATES_FROM..=FORMAT).contains(&found) {
        return Err(StoreError::Format {
            dir: dir.to_path_buf(),
            found,
        });
    }
    Ok(found)
}

/// The cluster id stored at this data directory's first start, if it has had one.
pub fn stored_cluster_id(db: &sled::Db) -> Result<Option<u64>, StoreError> {
    let meta = db.open_tree("raft_meta")?;
    match meta.get(CLUSTER_ID_KEY)? {
        Some(bytes) => Ok(Some(crate::codec::decode(&bytes)?)),
        None => Ok(None),
    }
}

/// The cluster this data directory belongs to: the one stored at its first start, or `derived` (which
/// is then stored) on a new directory. Stored once, so that later changes to `--peers` or the token
/// do not move a running cluster to another id.
pub fn cluster_id(db: &sled::Db, dir: &Path, derived: u64) -> Result<u64, StoreError> {
    let meta = db.open_tree("raft_meta")?;
    if let Some(bytes) = meta.get(CLUSTER_ID_KEY)? {
        return Ok(crate::codec::decode(&bytes)?);
    }
    meta.insert(CLUSTER_ID_KEY, crate::codec::encode(&derived)?)?;
    // Lost, the id would be derived again from flags that may have changed since.
    durable::flush_blocking(db, dir)?;
    Ok(derived)
}

/// Creates the storage of a member of a new cluster whose state is `image` (a snapshot file, read
/// front to back) at `last_log_id`, with `members` all voters, and `cluster` as its id
/// (`raftkv snapshot restore`). The state is an installed snapshot and the log is empty, as on a node
/// whose log was purged behind a snapshot. The vote is in the image's term, so the new cluster's
/// first election is above it and its entries come after `last_log_id` in Raft's order. Returns the
/// pairs installed. `dir` must be new.
pub async fn create_from_image(
    dir: &Path,
    node_id: NodeId,
    cluster: u64,
    image: impl std::io::Read + Send + 'static,
    last_log_id: Option<crate::types::LogId>,
    members: &std::collections::BTreeMap<NodeId, crate::types::Member>,
) -> Result<u64, StoreError> {
    use openraft::storage::RaftLogStorage;
    let (mut log, sm) = open(dir, node_id)?;
    cluster_id(sm.db(), dir, cluster)?;
    let voters = members.keys().copied().collect();
    let membership = openraft::Membership::new(vec![voters], members.clone())
        .map_err(|e| std::io::Error::other(format!("the new membership: {e}")))?;
    let meta = crate::types::SnapshotMeta {
        last_log_id,
        last_membership: crate::types::StoredMembership::new(last_log_id, membership),
    };
    let keys = snapshot::install_image(&sm, image, &meta).await?;
    let term = last_log_id.map_or(0, |l| l.leader_id.term);
    log.save_vote(&crate::types::Vote::new(term, node_id))
        .await?;
    sm.close().await?;
    Ok(keys)
}

/// Reads and decodes one stored value; `None` if the key is absent.
pub(crate) fn read_decoded<T: record::Record>(
    tree: &sled::Tree,
    key: &[u8],
) -> std::io::Result<Option<T>> {
    match tree.get(key).map_err(io_err)? {
        Some(bytes) => Ok(Some(T::decode(&bytes)?)),
        None => Ok(None),
    }
}

/// A sled key that is a big-endian u64 (a revision, a lease id), so sled's order is numeric order.
/// Anything else is corruption of `tree`.
pub(crate) fn u64_of_key(tree: &str, key: &[u8]) -> std::io::Result<u64> {
    let bytes: [u8; 8] = key.try_into().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{tree} has a key of {} bytes", key.len()),
        )
    })?;
    Ok(u64::from_be_bytes(bytes))
}

/// openraft reports storage failures as `io::Error`. sled's own conversion keeps what `integrity`
/// needs: its corruption error becomes `InvalidData`.
pub(crate) fn io_err(e: impl Into<std::io::Error>) -> std::io::Error {
    e.into()
}

/// A failed sled transaction as an `io::Error`, keeping a storage error's kind.
pub(crate) fn tx_err(e: sled::transaction::TransactionError<String>) -> std::io::Error {
    match e {
        sled::transaction::TransactionError::Storage(e) => e.into(),
        sled::transaction::TransactionError::Abort(why) => std::io::Error::other(why),
    }
}
