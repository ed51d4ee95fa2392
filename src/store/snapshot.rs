//! Snapshots: a consistent copy of the applied state, used to purge the log and to catch up nodes that
//! are too far behind (or whose data was wiped).
//!
//! The image is the raw `sm_data` pairs. The current snapshot is stored in `sm_snapshot` and flushed
//! before `build_snapshot` returns, because openraft purges the log behind a snapshot as soon as it has
//! one.

use std::io::{self, Cursor};

use openraft::RaftSnapshotBuilder;
use serde::{Deserialize, Serialize};
use sled::transaction::{TransactionError, Transactional};

use super::record::{self, Record};
use super::state_machine::{LAST_APPLIED_KEY, LAST_MEMBERSHIP_KEY, StateMachineStore};
use super::{io_err, read_decoded, tx_err};
use crate::codec;
use crate::types::{LogId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig};

pub(super) const SNAPSHOT_KEY: &[u8] = b"snapshot";
/// The stored snapshot's `SnapshotMeta` on its own, so it can be compared without decoding the data.
pub(super) const SNAPSHOT_META_KEY: &[u8] = b"snapshot_meta";

/// The state-machine contents at one applied log id.
#[derive(Deserialize)]
struct Image {
    pairs: Vec<Pair>,
}

/// One key and its stored value. `serde_bytes` writes each as its length and then the raw bytes: the
/// same bytes bincode writes for a plain `Vec<u8>`, which it does one call per byte. The stored format
/// is unchanged (see `the_image_format_is_unchanged`); encoding and decoding are several times faster.
#[derive(Deserialize)]
struct Pair(
    #[serde(with = "serde_bytes")] Vec<u8>,
    #[serde(with = "serde_bytes")] Vec<u8>,
);

/// [`Image`] as it is written: borrowing sled's reference-counted values instead of copying them.
#[derive(Serialize)]
struct ImageRef<'a> {
    pairs: Vec<PairRef<'a>>,
}

#[derive(Serialize)]
struct PairRef<'a>(
    #[serde(with = "serde_bytes")] &'a [u8],
    #[serde(with = "serde_bytes")] &'a [u8],
);

/// The current snapshot: its metadata and its image.
pub(super) struct StoredSnapshot {
    pub(super) meta: SnapshotMeta,
    pub(super) data: Vec<u8>,
}

/// [`StoredSnapshot`] as it is stored: the metadata's record (format 3's, or format 2's in
/// `migrate`) and the image as a byte string, written from a borrowed image (`&Bytes`) and read into
/// an owned one (`ByteBuf`), with the same bytes.
#[derive(Serialize, Deserialize)]
pub(super) struct StoredSnapshotRecord<M, D> {
    pub(super) meta: M,
    pub(super) data: D,
}

impl Record for StoredSnapshot {
    fn encode(&self) -> Result<Vec<u8>, codec::CodecError> {
        codec::encode(&StoredSnapshotRecord {
            meta: record::SnapshotMeta::from(&self.meta),
            data: serde_bytes::Bytes::new(&self.data),
        })
    }
    fn decode(bytes: &[u8]) -> Result<Self, codec::CodecError> {
        let stored: StoredSnapshotRecord<record::SnapshotMeta, serde_bytes::ByteBuf> =
            codec::decode(bytes)?;
        Ok(StoredSnapshot {
            meta: stored.meta.try_into()?,
            data: stored.data.into_vec(),
        })
    }
}

/// Runs CPU-heavy snapshot work on tokio's blocking pool. With two cores the runtime has two workers;
/// a build that held one for 20 ms (10k keys) showed up in every client's tail latency.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(io::Error::other)?
}

pub struct SnapshotBuilder {
    pub(super) sm: StateMachineStore,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = crate::types::SnapshotData;

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
        let started = std::time::Instant::now();
        let inner = &self.sm.inner;
        let (meta, pairs) = {
            // Applies wait while the pairs are copied, so the image is one applied state.
            let _guard = inner.write_lock.lock().await;
            let last_log_id: Option<LogId> = self.sm.read_meta(LAST_APPLIED_KEY)?;
            let last_membership: StoredMembership =
                self.sm.read_meta(LAST_MEMBERSHIP_KEY)?.unwrap_or_default();
            let tree = inner.data.clone();
            let pairs = blocking(move || {
                tree.iter()
                    .collect::<Result<Vec<(sled::IVec, sled::IVec)>, _>>()
                    .map_err(io_err)
            })
            .await?;
            let meta = SnapshotMeta {
                last_log_id,
                last_membership,
            };
            (meta, pairs)
        };
        let copied = started.elapsed();
        let keys = pairs.len();
        let data = blocking(move || {
            let image = ImageRef {
                pairs: pairs.iter().map(|(k, v)| PairRef(k, v)).collect(),
            };
            Ok(codec::encode(&image)?)
        })
        .await?;
        let stored = StoredSnapshot { meta, data };
        if !store_unless_older(&self.sm, &stored).await? {
            tracing::info!(
                built = ?stored.meta.last_log_id,
                "a newer snapshot was installed meanwhile; not storing this one"
            );
        }
        // The log behind it is purged next, durably (see `durable`).
        super::durable::flush(&inner.db, inner.integrity.dir()).await?;
        tracing::info!(
            last_log_id = ?stored.meta.last_log_id,
            keys,
            bytes = stored.data.len(),
            copy_ms = copied.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "built snapshot"
        );
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Cursor::new(stored.data),
        })
    }
}

/// Stores a built snapshot as the current one, unless the stored one is at least as new. openraft may
/// install a newer snapshot from the leader while a build is being encoded; the stored snapshot is
/// what a crash restarts from and what the log is purged behind, so an older build must never
/// replace it. Returns whether it was stored (durable at the next flush).
async fn store_unless_older(sm: &StateMachineStore, stored: &StoredSnapshot) -> io::Result<bool> {
    let inner = &sm.inner;
    let mut batch = sled::Batch::default();
    batch.insert(SNAPSHOT_KEY, stored.encode()?);
    batch.insert(SNAPSHOT_META_KEY, stored.meta.encode()?);
    let _guard = inner.write_lock.lock().await;
    let current: Option<SnapshotMeta> = read_decoded(&inner.snapshots, SNAPSHOT_META_KEY)?;
    if current.is_some_and(|c| c.last_log_id >= stored.meta.last_log_id) {
        return Ok(false);
    }
    inner.snapshots.apply_batch(batch).map_err(io_err)?;
    Ok(true)
}

/// Whether `data` is a snapshot image this node can install: checked before a received snapshot reaches
/// openraft, which treats a failed install as a storage error and stops.
pub fn check_image(data: &[u8]) -> Result<(), codec::CodecError> {
    codec::decode::<Image>(data).map(|_| ())
}

/// Whether `bytes` decode as a stored snapshot (for the decoder property tests).
pub fn check_stored(bytes: &[u8]) -> Result<(), codec::CodecError> {
    StoredSnapshot::decode(bytes).map(|_| ())
}

/// Replaces the whole state with the snapshot's (never merges: a merge would resurrect deleted keys).
pub(super) async fn install(
    sm: &StateMachineStore,
    meta: &SnapshotMeta,
    data: Vec<u8>,
) -> io::Result<()> {
    // Bytes from the leader, not from this disk: not decoding is not local corruption (`integrity`).
    let image: Image = codec::decode(&data)
        .map_err(|e| io::Error::other(format!("the received snapshot does not decode: {e}")))?;
    let inner = &sm.inner;
    let state = inner.write_lock.lock().await;
    if state.closed {
        return Err(io::Error::other("the state machine is closed"));
    }

    let mut data_batch = sled::Batch::default();
    for item in inner.data.iter() {
        let (k, _) = item.map_err(io_err)?;
        data_batch.remove(k);
    }
    let keys = image.pairs.len();
    for Pair(k, v) in image.pairs {
        data_batch.insert(k, v);
    }
    let mut meta_batch = sled::Batch::default();
    match &meta.last_log_id {
        Some(id) => meta_batch.insert(LAST_APPLIED_KEY, id.encode()?),
        None => meta_batch.remove(LAST_APPLIED_KEY),
    }
    meta_batch.insert(LAST_MEMBERSHIP_KEY, meta.last_membership.encode()?);
    let stored = StoredSnapshot {
        meta: meta.clone(),
        data,
    };
    let mut snapshot_batch = sled::Batch::default();
    snapshot_batch.insert(SNAPSHOT_KEY, stored.encode()?);
    snapshot_batch.insert(SNAPSHOT_META_KEY, meta.encode()?);
    sm.commit(data_batch, meta_batch, snapshot_batch).await?;
    tracing::info!(last_log_id = ?meta.last_log_id, keys, "installed snapshot");
    Ok(())
}

/// Replaces the state with the stored snapshot's, or empties it when there is none, and returns the
/// log id it now stands at. Only for recovery at open, when nothing else touches the store.
pub(super) fn restore_current(sm: &StateMachineStore) -> io::Result<Option<LogId>> {
    let inner = &sm.inner;
    inner.data.clear().map_err(io_err)?;
    let Some(stored) = read_decoded::<StoredSnapshot>(&sm.inner.snapshots, SNAPSHOT_KEY)? else {
        inner.meta.remove(LAST_APPLIED_KEY).map_err(io_err)?;
        inner.meta.remove(LAST_MEMBERSHIP_KEY).map_err(io_err)?;
        return Ok(None);
    };
    let image: Image = codec::decode(&stored.data)?;
    let mut batch = sled::Batch::default();
    for Pair(k, v) in image.pairs {
        batch.insert(k, v);
    }
    inner.data.apply_batch(batch).map_err(io_err)?;
    inner
        .meta
        .insert(LAST_MEMBERSHIP_KEY, stored.meta.last_membership.encode()?)
        .map_err(io_err)?;
    match &stored.meta.last_log_id {
        Some(id) => inner.meta.insert(LAST_APPLIED_KEY, id.encode()?),
        None => inner.meta.remove(LAST_APPLIED_KEY),
    }
    .map_err(io_err)?;
    Ok(stored.meta.last_log_id)
}

/// Moves a snapshot that an older raftkv stored in `sm_meta` to `sm_snapshot`. Runs at open, before
/// anything reads the snapshot; a no-op once done.
pub(super) fn move_out_of_meta(sm: &StateMachineStore) -> io::Result<()> {
    let inner = &sm.inner;
    let Some(stored) = inner.meta.get(SNAPSHOT_KEY).map_err(io_err)? else {
        return Ok(());
    };
    let stored_meta = inner.meta.get(SNAPSHOT_META_KEY).map_err(io_err)?;
    let result: Result<(), TransactionError<String>> =
        (&inner.meta, &inner.snapshots).transaction(|(m, s)| {
            s.insert(SNAPSHOT_KEY, stored.clone())?;
            m.remove(SNAPSHOT_KEY)?;
            if let Some(v) = &stored_meta {
                s.insert(SNAPSHOT_META_KEY, v.clone())?;
                m.remove(SNAPSHOT_META_KEY)?;
            }
            Ok(())
        });
    result.map_err(tx_err)?;
    inner.db.flush().map_err(io_err)?;
    tracing::info!("moved the stored snapshot to its own tree");
    Ok(())
}

/// Decodes a stored snapshot and the image inside it, for the checks in `integrity`.
pub(super) fn verify_stored(bytes: &[u8]) -> Result<SnapshotMeta, codec::CodecError> {
    let stored = StoredSnapshot::decode(bytes)?;
    codec::decode::<Image>(&stored.data)?;
    Ok(stored.meta)
}

pub(super) fn current(sm: &StateMachineStore) -> io::Result<Option<Snapshot>> {
    let Some(stored) = read_decoded::<StoredSnapshot>(&sm.inner.snapshots, SNAPSHOT_KEY)? else {
        return Ok(None);
    };
    Ok(Some(Snapshot {
        meta: stored.meta,
        snapshot: Cursor::new(stored.data),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta_at(index: u64) -> SnapshotMeta {
        SnapshotMeta {
            last_log_id: Some(openraft::testing::log_id::<crate::types::TypeConfig>(
                1, 1, index,
            )),
            last_membership: StoredMembership::default(),
        }
    }

    /// Snapshots written by earlier builds (plain `Vec<u8>` fields) must still read, and the other way.
    #[test]
    fn the_image_format_is_unchanged() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct OldImage {
            pairs: Vec<(Vec<u8>, Vec<u8>)>,
        }
        #[derive(Serialize)]
        struct OldStored {
            meta: record::SnapshotMeta,
            data: Vec<u8>,
        }
        let long = vec![7u8; 300];
        let old = OldImage {
            pairs: vec![
                (b"a".to_vec(), b"".to_vec()),
                (b"key".to_vec(), long.clone()),
            ],
        };
        let new = ImageRef {
            pairs: vec![PairRef(b"a", b""), PairRef(b"key", &long)],
        };
        let bytes = codec::encode(&new).unwrap();
        assert_eq!(bytes, codec::encode(&old).unwrap());
        let back: Image = codec::decode(&bytes).unwrap();
        let back: Vec<(Vec<u8>, Vec<u8>)> =
            back.pairs.into_iter().map(|Pair(k, v)| (k, v)).collect();
        assert_eq!(back, old.pairs);

        let stored = StoredSnapshot {
            meta: meta_at(3),
            data: bytes.clone(),
        };
        let old_stored = OldStored {
            meta: (&meta_at(3)).into(),
            data: bytes,
        };
        assert_eq!(
            stored.encode().unwrap(),
            codec::encode(&old_stored).unwrap()
        );
    }

    #[tokio::test]
    async fn an_older_build_never_replaces_a_newer_stored_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, sm) = crate::store::open(dir.path(), 1).unwrap();
        let newer = StoredSnapshot {
            meta: meta_at(9),
            data: vec![1],
        };
        let older = StoredSnapshot {
            meta: meta_at(5),
            data: vec![2],
        };
        assert!(store_unless_older(&sm, &newer).await.unwrap());
        assert!(!store_unless_older(&sm, &older).await.unwrap());
        let stored = current(&sm).unwrap().unwrap();
        assert_eq!(stored.meta, meta_at(9));
        assert_eq!(stored.snapshot.into_inner(), vec![1]);
        let newest = StoredSnapshot {
            meta: meta_at(12),
            data: vec![3],
        };
        assert!(store_unless_older(&sm, &newest).await.unwrap());
        assert_eq!(current(&sm).unwrap().unwrap().meta, meta_at(12));
    }
}
