//! Storage tests on real sled directories: openraft's conformance suite, then what the suite cannot
//! know about (reopening after a restart, our apply semantics, snapshot install replacing state).

use futures::stream;
use openraft::storage::{IOFlushed, RaftLogStorage, RaftStateMachine};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;
use openraft::{
    Entry, EntryPayload, ErrorSubject, ErrorVerb, Membership, RaftLogReader, RaftSnapshotBuilder,
    StorageError,
};

use super::{LogStore, StateMachineStore, StoreError, open};
use crate::types::{Command, LogId, TypeConfig, Vote};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<TypeConfig>> {
        let err = |e: std::io::Error| {
            StorageError::from_io_error(ErrorSubject::Store, ErrorVerb::Read, e)
        };
        let dir = tempfile::tempdir().map_err(err)?;
        let (log, sm) =
            open(dir.path(), 1).map_err(|e| err(std::io::Error::other(e.to_string())))?;
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_conformance_suite() {
    Suite::test_all(Builder).await.unwrap();
}

fn log_id(term: u64, index: u64) -> LogId {
    openraft::testing::log_id::<TypeConfig>(term, 1, index)
}

fn put(
    index: u64,
    key: &str,
    value: &str,
) -> Entry<openraft::alias::CommittedLeaderIdOf<TypeConfig>, openraft::alias::PayloadOf<TypeConfig>>
{
    Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Normal(Command::Put {
            key: key.into(),
            value: value.into(),
            prev_kv: false,
        }),
    }
}

/// Reopens a directory after its handles were dropped. The flusher threads let go of their handles
/// only once they see the queue closed, so the file locks are released shortly after, not at once.
async fn reopen(
    dir: &std::path::Path,
    id: u64,
) -> Result<(LogStore, StateMachineStore), StoreError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match open(dir, id) {
            Err(StoreError::Sled(e))
                if e.to_string().contains("lock") && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Err(StoreError::Io(e))
                if e.kind() == std::io::ErrorKind::WouldBlock
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            other => return other,
        }
    }
}

async fn append(log: &mut LogStore, entries: Vec<crate::types::Entry>) {
    let (tx, rx) = TypeConfig::oneshot();
    log.append(entries, IOFlushed::signal(tx)).await.unwrap();
    rx.await.unwrap().unwrap();
}

async fn log_indexes(log: &mut LogStore) -> Vec<u64> {
    log.try_get_log_entries(0..100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.log_id.index)
        .collect()
}

async fn build_snapshot(sm: &mut StateMachineStore) -> crate::types::Snapshot {
    sm.get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap()
}

async fn apply(sm: &mut StateMachineStore, entries: Vec<crate::types::Entry>) {
    sm.apply(stream::iter(entries.into_iter().map(|e| Ok((e, None)))))
        .await
        .unwrap();
}

#[tokio::test]
async fn log_and_vote_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, _sm) = open(dir.path(), 7).unwrap();
        append(&mut log, (1..=5).map(|i| put(i, "k", "v")).collect()).await;
        let vote = Vote::new(3, 2);
        log.save_vote(&vote).await.unwrap();
        log.truncate_after(Some(log_id(1, 4))).await.unwrap();
        log.purge(log_id(1, 2)).await.unwrap();
    }
    let (mut log, _sm) = reopen(dir.path(), 7).await.unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 2)));
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 2)));
    assert_eq!(state.last_log_id, Some(log_id(1, 4)));
    let indexes = log_indexes(&mut log).await;
    assert_eq!(
        indexes,
        vec![3, 4],
        "purged and truncated entries are gone, the rest is intact"
    );
}

/// The chunk files of the log engine under `dir`, in order.
fn wal_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir.join(super::log::LOG_DIR))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    files.sort();
    files
}

/// A crash in the middle of a write leaves a torn record at the end of the log: the log ends at the
/// entry before it (never acknowledged: its fsync had not returned), and goes on from there.
#[tokio::test]
async fn a_torn_record_at_the_end_of_the_log_is_cut_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, _sm) = open(dir.path(), 7).unwrap();
        append(&mut log, (1..=5).map(|i| put(i, "k", "v")).collect()).await;
    }
    let last = wal_files(dir.path()).pop().unwrap();
    let len = std::fs::metadata(&last).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&last).unwrap();
    file.set_len(len - 3).unwrap();
    drop(file);
    let (mut log, _sm) = reopen(dir.path(), 7).await.unwrap();
    assert_eq!(
        log.get_log_state().await.unwrap().last_log_id,
        Some(log_id(1, 4))
    );
    append(&mut log, vec![put(5, "k", "v2")]).await;
    assert_eq!(log_indexes(&mut log).await, vec![1, 2, 3, 4, 5]);
}

/// Bytes flipped inside a record the log depends on are corruption, refused at open with the
/// directory named, never a log that silently ends early.
#[tokio::test]
async fn a_damaged_log_record_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, _sm) = open(dir.path(), 7).unwrap();
        append(
            &mut log,
            (1..=50).map(|i| put(i, "key", &"v".repeat(100))).collect(),
        )
        .await;
        log.save_vote(&Vote::new(3, 2)).await.unwrap();
    }
    let file = wal_files(dir.path()).pop().unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&file, bytes).unwrap();
    assert!(!check_offline(dir.path()).await.is_clean());
    match reopen(dir.path(), 7).await {
        Err(StoreError::Corrupt { dir: d, .. }) => assert_eq!(d, dir.path()),
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("a damaged log opened"),
    }
}

#[tokio::test]
async fn data_dir_of_another_node_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path(), 1).unwrap());
    assert!(matches!(
        reopen(dir.path(), 2).await,
        Err(StoreError::WrongNode {
            expected: 2,
            found: 1
        })
    ));
}

fn delete(index: u64, key: &str) -> crate::types::Entry {
    Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Normal(Command::Delete {
            key: key.into(),
            prev_kv: false,
        }),
    }
}

#[tokio::test]
async fn a_clean_shutdown_keeps_the_applied_state() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (_log, mut sm) = open(dir.path(), 1).unwrap();
        apply(
            &mut sm,
            vec![put(1, "a", "1"), put(2, "b", "2"), put(3, "a", "3")],
        )
        .await;
        apply(&mut sm, vec![delete(4, "b")]).await;
        sm.close().await.unwrap();
        // Nothing may be applied after the marker: it would not be covered by it.
        let late = sm
            .apply(stream::iter([Ok((put(5, "late", "x"), None))]))
            .await;
        assert!(late.is_err(), "apply after close must be refused");
    }
    let (_log, mut sm) = reopen(dir.path(), 1).await.unwrap();
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(1, 4)));
    let a = sm.get(b"a").unwrap().unwrap();
    assert_eq!(
        (
            a.value.as_slice(),
            a.create_revision,
            a.mod_revision,
            a.version
        ),
        (&b"3"[..], 1, 3, 2)
    );
    assert_eq!(sm.get(b"b").unwrap(), None);
    assert_eq!(sm.get(b"late").unwrap(), None);
}

/// Without a clean shutdown the applied state may be torn, so it restarts from the last snapshot and
/// openraft re-applies the log after it; re-applying gives the same state and revisions.
#[tokio::test]
async fn after_a_crash_the_state_machine_restarts_from_the_last_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (_log, mut sm) = open(dir.path(), 1).unwrap();
        apply(&mut sm, vec![put(1, "a", "1"), put(2, "b", "2")]).await;
        build_snapshot(&mut sm).await;
        apply(
            &mut sm,
            vec![put(3, "a", "3"), delete(4, "b"), put(5, "c", "5")],
        )
        .await;
        // Dropped without `close`: a crash.
    }
    let (_log, mut sm) = reopen(dir.path(), 1).await.unwrap();
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(1, 2)), "back at the snapshot");
    assert_eq!(sm.get(b"a").unwrap().unwrap().value, b"1");
    assert_eq!(sm.get(b"b").unwrap().unwrap().value, b"2");
    assert_eq!(sm.get(b"c").unwrap(), None);

    apply(
        &mut sm,
        vec![put(3, "a", "3"), delete(4, "b"), put(5, "c", "5")],
    )
    .await;
    let a = sm.get(b"a").unwrap().unwrap();
    assert_eq!((a.mod_revision, a.version), (3, 2));
    assert_eq!(sm.get(b"b").unwrap(), None);
    assert_eq!(sm.get(b"c").unwrap().unwrap().mod_revision, 5);

    // With no snapshot at all, a crash leaves an empty state machine (the whole log is replayed).
    let dir = tempfile::tempdir().unwrap();
    {
        let (_log, mut sm) = open(dir.path(), 1).unwrap();
        apply(&mut sm, vec![put(1, "a", "1")]).await;
    }
    let (_log, mut sm) = reopen(dir.path(), 1).await.unwrap();
    assert_eq!(sm.applied_state().await.unwrap().0, None);
    assert_eq!(sm.get(b"a").unwrap(), None);
}

/// Purged entries are gone from reads at once, and the chunk files wholly behind the purge point
/// are deleted, so the log's disk use follows what it retains.
#[tokio::test]
async fn purged_entries_are_hidden_at_once_and_whole_chunks_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _sm) = open(dir.path(), 7).unwrap();
    // Big enough entries to fill more than one chunk file.
    let value = "x".repeat(1 << 20);
    for i in 1..=80 {
        append(&mut log, vec![put(i, "k", &value)]).await;
    }
    let before = wal_files(dir.path()).len();
    assert!(before >= 2, "{before} chunk files");
    log.purge(log_id(1, 70)).await.unwrap();
    let visible: Vec<u64> = log
        .try_get_log_entries(0..1000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.log_id.index)
        .collect();
    assert_eq!(visible, (71..=80).collect::<Vec<_>>());
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 70)));
    assert_eq!(state.last_log_id, Some(log_id(1, 80)));
    // The engine deletes the files after the purge record's fsync, on its own thread.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while wal_files(dir.path()).len() >= before {
        assert!(
            std::time::Instant::now() < deadline,
            "no chunk file deleted 10 s after purging 70 of 80 MiB"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    drop((log, _sm));
    let (mut log, _sm) = reopen(dir.path(), 7).await.unwrap();
    assert_eq!(log_indexes(&mut log).await, (71..=80).collect::<Vec<_>>());
}

/// Every key's stored bytes, for comparing two state machines.
fn dump(sm: &StateMachineStore) -> Vec<(Vec<u8>, Vec<u8>)> {
    sm.inner
        .data()
        .iter()
        .map(|kv| {
            let (k, v) = kv.unwrap();
            (k.to_vec(), v.to_vec())
        })
        .collect()
}

/// Applies keep coming while a snapshot is built; the snapshot must still be exactly the state at the
/// index it names. Checked against a replay of the same entries up to that index on a fresh store. (It
/// fails within a few runs if the build copies without the apply lock and nothing patches the keys
/// applied during the copy.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_built_while_applies_run_is_exactly_one_applied_state() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    fn entry(i: u64) -> crate::types::Entry {
        match i % 3 {
            0 => delete(i, &format!("k{}", (i * 7) % 20_000)),
            _ => put(i, &format!("k{}", (i * 13) % 30_000), &format!("v{i}")),
        }
    }
    const PRELOAD: u64 = 45_000;
    let dirs = [(); 3].map(|_| tempfile::tempdir().unwrap());
    let (_log, mut sm) = open(dirs[0].path(), 1).unwrap();
    apply(&mut sm, (1..=PRELOAD).map(entry).collect()).await;

    let stop = Arc::new(AtomicBool::new(false));
    let applied = Arc::new(AtomicU64::new(PRELOAD));
    let mut writer = sm.clone();
    let writing = tokio::spawn({
        let (stop, applied) = (stop.clone(), applied.clone());
        async move {
            let mut next = PRELOAD + 1;
            while !stop.load(Ordering::Relaxed) && next < PRELOAD + 200_000 {
                apply(&mut writer, (next..next + 10).map(entry).collect()).await;
                next += 10;
                applied.store(next - 1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        }
    });
    // The build starts with applies already under way.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while applied.load(Ordering::Relaxed) < PRELOAD + 100 {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer did not start"
        );
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let before = applied.load(Ordering::Relaxed);
    let snap = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    writing.await.unwrap();
    let at = snap.meta.last_log_id.unwrap().index;
    assert!(at >= before, "the snapshot is older than the build");

    let (_l, mut expected) = open(dirs[1].path(), 1).unwrap();
    apply(&mut expected, (1..=at).map(entry).collect()).await;
    let (_l, mut restored) = open(dirs[2].path(), 1).unwrap();
    restored
        .install_snapshot(&snap.meta, snap.snapshot)
        .await
        .unwrap();
    let (got, want) = (dump(&restored), dump(&expected));
    assert_eq!(got.len(), want.len(), "key count at index {at}");
    assert!(
        got == want,
        "snapshot at index {at} differs from the replay"
    );
}

#[tokio::test]
async fn snapshot_round_trip_replaces_state() {
    let src_dir = tempfile::tempdir().unwrap();
    let (_l, mut src) = open(src_dir.path(), 1).unwrap();
    let members =
        Membership::new_with_defaults(vec![[1u64, 2, 3].into_iter().collect()], [1u64, 2, 3]);
    apply(
        &mut src,
        vec![
            Entry {
                log_id: log_id(1, 1),
                payload: EntryPayload::Membership(members),
            },
            put(2, "keep", "yes"),
            put(3, "k2", "v2"),
        ],
    )
    .await;
    let snap = src
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    assert_eq!(snap.meta.last_log_id, Some(log_id(1, 3)));
    let stored = src.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(stored.meta, snap.meta);

    // The target has a key the snapshot does not: installing must remove it, not merge.
    let dst_dir = tempfile::tempdir().unwrap();
    let (_l2, mut dst) = open(dst_dir.path(), 2).unwrap();
    apply(&mut dst, vec![put(1, "stale", "gone")]).await;
    dst.install_snapshot(&snap.meta, snap.snapshot)
        .await
        .unwrap();
    assert_eq!(dst.get(b"stale").unwrap(), None);
    assert_eq!(dst.get(b"keep").unwrap().unwrap().value, b"yes");
    let (applied, membership) = dst.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(1, 3)));
    assert_eq!(membership.voter_ids().collect::<Vec<_>>(), vec![1, 2, 3]);
    let (all, more) = dst.scan(b"", b"", 100, usize::MAX, 0).unwrap();
    assert_eq!((all.len(), more), (2, false));
}

/// Removed ids are state: a replica that catches up by snapshot refuses them as one that applied
/// the removals does, and keeps the ones it knew.
#[tokio::test]
async fn a_snapshot_carries_the_removed_ids() {
    // Voters `before`, then `after`: the ids in `before` only are removed.
    async fn change(sm: &mut StateMachineStore, before: &[u64], after: &[u64]) {
        let voters = |ids: &[u64]| {
            EntryPayload::Membership(Membership::new_with_defaults(
                vec![ids.iter().copied().collect()],
                ids.iter().copied(),
            ))
        };
        let entries = [before, after]
            .iter()
            .zip(1..)
            .map(|(ids, index)| Entry {
                log_id: log_id(1, index),
                payload: voters(ids),
            })
            .collect();
        apply(sm, entries).await;
    }
    let src_dir = tempfile::tempdir().unwrap();
    let (_l, mut src) = open(src_dir.path(), 1).unwrap();
    change(&mut src, &[1, 2, 3], &[1, 2]).await;
    assert!(src.is_retired(3));
    let snap = build_snapshot(&mut src).await;

    let dst_dir = tempfile::tempdir().unwrap();
    {
        let (_l2, mut dst) = open(dst_dir.path(), 2).unwrap();
        change(&mut dst, &[1, 2, 9], &[1, 2]).await;
        dst.install_snapshot(&snap.meta, snap.snapshot)
            .await
            .unwrap();
        assert!(dst.is_retired(3), "carried by the snapshot");
        assert!(dst.is_retired(9), "known before it");
        assert!(!dst.is_retired(1));
    }
    let (_l2, dst) = open(dst_dir.path(), 2).unwrap();
    assert!(dst.is_retired(3) && dst.is_retired(9), "durable");
}

#[tokio::test]
async fn scan_respects_bounds_and_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (_l, mut sm) = open(dir.path(), 1).unwrap();
    apply(
        &mut sm,
        (1..=5).map(|i| put(i, &format!("k{i}"), "v")).collect(),
    )
    .await;
    let (kvs, more) = sm.scan(b"k2", b"k4", 10, usize::MAX, 0).unwrap();
    assert_eq!(
        kvs.iter().map(|k| k.key.clone()).collect::<Vec<_>>(),
        vec![b"k2".to_vec(), b"k3".to_vec()]
    );
    assert!(!more);
    let (kvs, more) = sm.scan(b"k", b"", 2, usize::MAX, 0).unwrap();
    assert_eq!((kvs.len(), more), (2, true));
}

/// A scan stops before the pair that would pass its byte budget, but always returns the first pair,
/// so a value larger than the budget still makes progress.
#[tokio::test]
async fn scan_stops_at_its_byte_budget_but_returns_at_least_one_pair() {
    let dir = tempfile::tempdir().unwrap();
    let (_l, mut sm) = open(dir.path(), 1).unwrap();
    let value = "v".repeat(1000);
    apply(
        &mut sm,
        (1..=5).map(|i| put(i, &format!("k{i}"), &value)).collect(),
    )
    .await;
    let (kvs, more) = sm.scan(b"k", b"", 10, 2500, 10).unwrap();
    assert_eq!((kvs.len(), more), (2, true));
    let (kvs, more) = sm.scan(b"k", b"", 10, 1, 10).unwrap();
    assert_eq!((kvs.len(), more), (1, true));
    let (kvs, more) = sm.scan(b"k5", b"", 10, 1, 10).unwrap();
    assert_eq!((kvs.len(), more), (1, false));
}

/// The commit point is a record after the entries it names, so it never runs past the log: a commit
/// point the log does not hold (a snapshot install can report one before the purge catches up) or
/// one behind the saved one is not saved, rather than failing the node.
#[tokio::test]
async fn the_saved_commit_point_never_runs_past_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _sm) = open(dir.path(), 1).unwrap();
    assert_eq!(log.read_committed().await.unwrap(), None);
    append(&mut log, (0..=5).map(|i| put(i, "k", "v")).collect()).await;
    log.save_committed(Some(log_id(1, 4))).await.unwrap();
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 4)));
    log.save_committed(Some(log_id(1, 8))).await.unwrap();
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 4)));
    log.save_committed(Some(log_id(2, 5))).await.unwrap();
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 4)));
    log.save_committed(Some(log_id(1, 3))).await.unwrap();
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 4)));
    log.save_committed(Some(log_id(1, 5))).await.unwrap();
    drop((log, _sm));
    let (mut log, _sm) = reopen(dir.path(), 1).await.unwrap();
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 5)));
}

fn blob_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join("sled").join("blobs")).map_or(0, |d| d.count())
}

/// sled writes a large tree node as a blob file, and rewrites a node whole after a few updates to any
/// key in it. The snapshot once shared its tree with `last_applied`, which every apply updates: with a
/// 3 MB state, every few applies wrote and fsynced a new 3 MB file (one-client put p90 doubled).
#[tokio::test]
async fn applies_do_not_rewrite_the_stored_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(dir.path(), 1).unwrap();
    let value = "v".repeat(1000);
    let entries = (1..=2000)
        .map(|i| put(i, &format!("k{i:05}"), &value))
        .collect();
    apply(&mut sm, entries).await;
    build_snapshot(&mut sm).await;
    let after_snapshot = blob_files(dir.path());

    for i in 2001..=2300 {
        apply(&mut sm, vec![put(i, "hot", "x")]).await;
    }
    sm.inner.db.flush().unwrap();
    let after_applies = blob_files(dir.path());
    assert!(
        after_applies <= after_snapshot + 1,
        "300 applies rewrote the snapshot: {after_snapshot} blob files before, {after_applies} after"
    );
}

/// A data directory written before the snapshot had its own tree (it was in `sm_meta`, as one sled
/// value) keeps its snapshot: format 5's migration finds it there and writes it as a file.
#[tokio::test]
async fn a_snapshot_in_the_old_place_is_moved_at_open() {
    use super::snapshot::SNAPSHOT_META_KEY;
    use super::snapshot::legacy::SNAPSHOT_KEY;
    let dir = tempfile::tempdir().unwrap();
    {
        let (_log, mut sm) = open(dir.path(), 1).unwrap();
        apply(&mut sm, vec![put(1, "a", "1"), put(2, "b", "2")]).await;
        build_snapshot(&mut sm).await;
        to_legacy_snapshot(&sm);
        // Put it back where older versions kept it.
        let inner = sm.inner.clone();
        for key in [SNAPSHOT_KEY, SNAPSHOT_META_KEY] {
            let v = inner.snapshots.remove(key).unwrap().unwrap();
            inner.meta.insert(key, v).unwrap();
        }
        set_format(sm.db(), 4);
        apply(&mut sm, vec![put(3, "a", "3")]).await;
        inner.db.flush().unwrap();
        // Dropped without `close`: a crash, so the state is rebuilt from the snapshot.
    }
    // Twice: the second open finds nothing left to move and must not lose the snapshot either.
    for _ in 0..2 {
        let (_log, mut sm) = reopen(dir.path(), 1).await.unwrap();
        for key in [SNAPSHOT_KEY, SNAPSHOT_META_KEY] {
            assert_eq!(sm.inner.meta.get(key).unwrap(), None, "left in sm_meta");
        }
        assert_eq!(sm.inner.snapshots.get(SNAPSHOT_KEY).unwrap(), None);
        let snapshot = sm.get_current_snapshot().await.unwrap().expect("kept");
        assert_eq!(snapshot.meta.last_log_id, Some(log_id(1, 2)));
        let (applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(
            applied,
            Some(log_id(1, 2)),
            "rebuilt from the moved snapshot"
        );
        assert_eq!(sm.get(b"a").unwrap().unwrap().value, b"1");
    }
}

/// Turns the current snapshot back into what formats 2 to 4 stored: one sled value in `sm_snapshot`
/// (format 3's record) and no file. Returns the image's bytes.
fn to_legacy_snapshot(sm: &StateMachineStore) -> Vec<u8> {
    use super::snapshot::legacy::{ImageRef, PairRef, SNAPSHOT_KEY, StoredSnapshot};
    use super::snapshot::{SNAPSHOT_FILE_KEY, file};
    let current = super::snapshot::current(sm).unwrap().unwrap();
    let mut reader = file::Reader::new(std::io::BufReader::new(current.snapshot.file)).unwrap();
    let mut pairs = Vec::new();
    while let Some(run) = reader.next_pairs().unwrap() {
        pairs.extend(run.into_iter().map(|(k, v)| (k.to_vec(), v.to_vec())));
    }
    let image = crate::codec::encode(&ImageRef {
        pairs: pairs.iter().map(|(k, v)| PairRef(k, v)).collect(),
    })
    .unwrap();
    let stored = StoredSnapshot {
        meta: current.meta,
        data: image.clone(),
    };
    let snapshots = &sm.inner.snapshots;
    snapshots
        .insert(
            SNAPSHOT_KEY,
            super::record::Record::encode(&stored).unwrap(),
        )
        .unwrap();
    snapshots.remove(SNAPSHOT_FILE_KEY).unwrap();
    sm.inner.db.flush().unwrap();
    std::fs::remove_dir_all(current.snapshot.path.parent().unwrap()).unwrap();
    image
}

/// `integrity::check_offline` once the handles a test dropped have let go of sled's lock.
async fn check_offline(dir: &std::path::Path) -> super::integrity::Report {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match super::integrity::check_offline(dir) {
            Err(super::integrity::CheckError::InUse(_)) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            other => return other.unwrap(),
        }
    }
}

/// A value sled read back intact but that does not decode: what a flipped byte that sled's CRC did
/// not cover (or a bug) leaves. The read that meets it fails, trips the store, and from then on no
/// read is answered; the scrub names it; the state is never marked clean.
#[tokio::test]
async fn an_undecodable_value_trips_the_store_and_no_read_is_answered_after() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(dir.path(), 1).unwrap();
    apply(&mut sm, vec![put(1, "a", "1"), put(2, "b", "2")]).await;
    sm.inner.data().insert(b"b", vec![1u8, 0xff, 0xff]).unwrap();
    assert_eq!(sm.integrity().corrupt(), None);
    assert_eq!(sm.get(b"a").unwrap().unwrap().value, b"1");

    let err = sm.get(b"b").unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    let what = sm.integrity().corrupt().expect("the store is tripped");
    assert!(what.contains("sm_data"), "{what}");
    assert!(
        sm.get(b"a").is_err(),
        "no read may be answered from a store found corrupt"
    );
    assert!(sm.scan(b"", b"", 10, usize::MAX, 0).is_err());

    let report = super::integrity::scrub(
        sm.db(),
        &mut super::integrity::Pacer::unpaced(),
        &|| false,
        super::FORMAT,
    );
    assert!(
        report.problems.iter().any(|p| p.contains("sm_data/b")),
        "{:?}",
        report.problems
    );
    assert!(
        sm.close().await.is_err(),
        "a corrupt store is not marked clean"
    );
}

/// The start check decodes the metadata before anything uses it: a last-applied id that does not
/// decode is refused at open with the directory and the value named, and `raftkv check` reports it
/// too.
#[tokio::test]
async fn undecodable_metadata_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (_log, sm) = open(dir.path(), 1).unwrap();
        sm.inner
            .meta
            .insert(super::state_machine::LAST_APPLIED_KEY, vec![1u8, 0xff])
            .unwrap();
        sm.db().flush().unwrap();
    }
    assert!(!check_offline(dir.path()).await.is_clean());
    match reopen(dir.path(), 1).await {
        Err(StoreError::Corrupt { dir: d, what }) => {
            assert_eq!(d, dir.path());
            assert!(what.contains("sm_meta/last_applied"), "{what}");
        }
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("a store with an undecodable last applied id opened"),
    }
}

/// A purged log with no snapshot is not corruption: the state is in sm_data, and openraft builds a new
/// snapshot when a follower needs one. Refusing to start would strand a sound node.
#[tokio::test]
async fn a_purged_log_without_a_snapshot_still_opens() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, _sm) = open(dir.path(), 1).unwrap();
        append(&mut log, (1..=5).map(|i| put(i, "k", "v")).collect()).await;
        log.purge(log_id(1, 3)).await.unwrap();
    }
    let report = check_offline(dir.path()).await;
    assert!(report.is_clean(), "{:?}", report.problems);
    assert!(reopen(dir.path(), 1).await.is_ok());
}

/// Fills a directory with log entries, applied data and a snapshot, and closes it cleanly twice, so
/// that sled has written its own snapshot past all of it: that data is then read back lazily, with
/// sled checking each message's CRC, as on a node that restarts.
pub(crate) async fn filled_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, mut sm) = open(dir.path(), 1).unwrap();
        for batch in 0..40u64 {
            let entries: Vec<_> = (1..=100)
                .map(|i| {
                    let n = batch * 100 + i;
                    put(n, &format!("key{n:06}"), &format!("{n:0>200}"))
                })
                .collect();
            append(&mut log, entries.clone()).await;
            apply(&mut sm, entries).await;
        }
        build_snapshot(&mut sm).await;
        sm.close().await.unwrap();
    }
    let (_log, sm) = reopen(dir.path(), 1).await.unwrap();
    assert_eq!(
        sm.scan(b"", b"", 10_000, usize::MAX, 0).unwrap().0.len(),
        4000
    );
    sm.close().await.unwrap();
    dir
}

/// XORs bytes spread over the middle half of the largest file under the sled directory.
pub(crate) fn flip_bytes(dir: &std::path::Path) -> std::path::PathBuf {
    fn files(dir: &std::path::Path, out: &mut Vec<(u64, std::path::PathBuf)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                files(&entry.path(), out);
            } else {
                out.push((meta.len(), entry.path()));
            }
        }
    }
    let mut all = Vec::new();
    files(&dir.join("sled"), &mut all);
    let (len, path) = all.into_iter().max().unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let len = len as usize;
    for offset in (len / 4..len * 3 / 4).step_by(1021) {
        bytes[offset] ^= 0x5a;
    }
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Bytes flipped in a closed directory are found: by the start check or, for data nothing reads at
/// start, by a full scrub. Before this check existed the node opened and served such a directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bytes_in_a_closed_directory_are_found() {
    let dir = filled_dir().await;
    let clean = check_offline(dir.path()).await;
    assert!(clean.is_clean(), "{:?}", clean.problems);
    assert!(
        clean
            .checked
            .iter()
            .any(|c| c.contains("sm_data: 4000 values")),
        "{:?}",
        clean.checked
    );
    let flipped = flip_bytes(dir.path());
    let report = check_offline(dir.path()).await;
    assert!(
        !report.is_clean(),
        "bytes flipped in {} went unnoticed: {:?}",
        flipped.display(),
        report.checked
    );
}

/// A committed entry the public API would have refused (here: forged before validation existed on the
/// peer port) is not applied, so no replica ever holds a key that cannot be read or deleted. The
/// entries after it still apply, and revisions stay log indexes.
#[tokio::test]
async fn entries_validation_would_reject_are_not_applied() {
    let dir = tempfile::tempdir().unwrap();
    let (_l, mut sm) = open(dir.path(), 1).unwrap();
    let entry = |index: u64, cmd: Command| Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Normal(cmd),
    };
    let put_key = |key: Vec<u8>| Command::Put {
        key,
        value: b"v".to_vec(),
        prev_kv: false,
    };
    sm.apply(stream::iter(vec![
        Ok((entry(1, put_key(vec![])), None)),
        Ok((entry(2, put_key(vec![b'x'; 100_000])), None)),
        Ok((
            entry(
                3,
                Command::Txn(crate::types::Txn {
                    compare: vec![],
                    success: (0..129)
                        .map(|i| crate::types::TxnOp::Get {
                            key: format!("k{i}").into_bytes(),
                        })
                        .collect(),
                    failure: vec![],
                }),
            ),
            None,
        )),
        Ok((entry(4, put_key(b"ok".to_vec())), None)),
    ]))
    .await
    .unwrap();
    let (kvs, _) = sm.scan(b"", b"", 100, usize::MAX, 0).unwrap();
    assert_eq!(
        kvs.iter().map(|k| k.key.clone()).collect::<Vec<_>>(),
        vec![b"ok".to_vec()]
    );
    assert_eq!(kvs[0].mod_revision, 4);
    assert_eq!(
        sm.applied_state().await.unwrap().0,
        Some(log_id(1, 4)),
        "refused entries still count as applied"
    );
}

/// A directory written before the storage format was recorded (format 1: one address per member)
/// is refused as another format, not opened, and not reported corrupt; a new one records its format
/// and its cluster id, and keeps the id it stored first.
#[tokio::test]
async fn a_directory_in_another_format_is_refused_and_the_cluster_id_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (_log, sm) = open(dir.path(), 7).unwrap();
        assert_eq!(super::cluster_id(sm.db(), dir.path(), 42).unwrap(), 42);
        assert_eq!(
            super::cluster_id(sm.db(), dir.path(), 43).unwrap(),
            42,
            "the first id stays"
        );
        sm.db()
            .open_tree("raft_meta")
            .unwrap()
            .remove(super::FORMAT_KEY)
            .unwrap();
        sm.db().flush().unwrap();
    }
    match reopen(dir.path(), 7).await {
        Err(StoreError::Format { found: 1, .. }) => {}
        Err(e) => panic!("expected a format refusal, got {e}"),
        Ok(_) => panic!("a format 1 directory was opened"),
    }
}

/// The entries of [`format_2_dir`]: a blank, a membership with both addresses, puts and a delete.
fn migration_entries() -> Vec<crate::types::Entry> {
    let nodes: std::collections::BTreeMap<u64, crate::types::Member> = (1..=3)
        .map(|id| {
            let member =
                crate::types::Member::new(format!("127.0.0.1:{id}1"), format!("127.0.0.1:{id}2"));
            (id, member)
        })
        .collect();
    let members = Membership::new(vec![[1u64, 2, 3].into()], nodes).unwrap();
    let mut entries = vec![
        Entry {
            log_id: log_id(1, 1),
            payload: EntryPayload::Blank,
        },
        Entry {
            log_id: log_id(1, 2),
            payload: EntryPayload::Membership(members),
        },
    ];
    entries.extend((3..=40).map(|i| put(i, &format!("k{}", i % 7), &format!("v{i}"))));
    entries.push(delete(41, "k3"));
    entries
}

/// A directory as a format 2 raftkv left it after a clean stop: a vote, a purged log, a snapshot
/// and applied state after it. Written by this build, then given format 2's snapshot metadata
/// (openraft 0.10's own serde shape, as format 2 stored it; every other value had the same bytes)
/// and format key. tests/migration.rs does the same with a directory made by the format 2 binary.
async fn format_2_dir() -> tempfile::TempDir {
    use super::snapshot::SNAPSHOT_META_KEY;
    use super::snapshot::legacy::SNAPSHOT_KEY;
    /// How format 2 stored the snapshot: openraft's `SnapshotMeta` as it serializes itself.
    #[derive(serde::Serialize)]
    struct StoredSnapshotV2 {
        meta: crate::types::SnapshotMeta,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    }
    let (dir, sm, image) = sled_log_dir().await;
    let snapshots = sm.inner.snapshots.clone();
    let meta: crate::types::SnapshotMeta = super::read_decoded(&snapshots, SNAPSHOT_META_KEY)
        .unwrap()
        .unwrap();
    let v2 = StoredSnapshotV2 { meta, data: image };
    let v2_bytes = crate::codec::encode(&v2).unwrap();
    // The migration's own reader of format 2 agrees with what openraft's shape gave.
    let ours = super::migrate::StoredSnapshotV2(super::snapshot::legacy::StoredSnapshot {
        meta: v2.meta.clone(),
        data: v2.data.clone(),
    });
    assert_eq!(v2_bytes, super::record::Record::encode(&ours).unwrap());
    snapshots.insert(SNAPSHOT_KEY, v2_bytes).unwrap();
    snapshots
        .insert(SNAPSHOT_META_KEY, crate::codec::encode(&v2.meta).unwrap())
        .unwrap();
    set_format(sm.db(), 2);
    drop(sm);
    std::fs::remove_dir_all(dir.path().join(super::log::LOG_DIR)).unwrap();
    dir
}

/// A directory after a clean stop with a snapshot at 30 (stored as formats 2 to 4 stored it, in
/// sled) and applied state up to 41, and its log where formats 2 and 3 kept it, in sled; the log
/// engine's directory is still there for the caller to remove once the store is dropped. Also
/// returns the snapshot's image.
async fn sled_log_dir() -> (tempfile::TempDir, StateMachineStore, Vec<u8>) {
    let (dir, sm, image) = format_4_parts().await;
    write_sled_log(sm.db(), &migration_entries());
    (dir, sm, image)
}

/// A directory after a clean stop with a snapshot at 30 stored as one sled value, and applied state
/// up to 41.
async fn format_4_parts() -> (tempfile::TempDir, StateMachineStore, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let (log, mut sm) = open(dir.path(), 1).unwrap();
    drop(log);
    let entries = migration_entries();
    apply(&mut sm, entries[..30].to_vec()).await;
    build_snapshot(&mut sm).await;
    apply(&mut sm, entries[30..].to_vec()).await;
    sm.close().await.unwrap();
    let image = to_legacy_snapshot(&sm);
    (dir, sm, image)
}

/// The log as formats 2 and 3 kept it in sled, after a clean stop: a vote, a commit point and the
/// entries after a purge at 20 (format 3's records; format 2 had the same bytes).
fn write_sled_log(db: &sled::Db, entries: &[crate::types::Entry]) {
    use super::migrate::{COMMITTED_KEY, LAST_PURGED_KEY, VOTE_KEY};
    use super::record::Record;
    let t = super::trees(db).unwrap();
    for entry in &entries[20..] {
        t.raft_log
            .insert(entry.log_id.index.to_be_bytes(), entry.encode().unwrap())
            .unwrap();
    }
    let meta = [
        (VOTE_KEY, Vote::new_committed(1, 1).encode().unwrap()),
        (COMMITTED_KEY, Some(log_id(1, 41)).encode().unwrap()),
        (LAST_PURGED_KEY, log_id(1, 20).encode().unwrap()),
    ];
    for (key, value) in meta {
        t.raft_meta.insert(key, value).unwrap();
    }
    db.flush().unwrap();
}

fn set_format(db: &sled::Db, format: u32) {
    super::trees(db)
        .unwrap()
        .raft_meta
        .insert(super::FORMAT_KEY, crate::codec::encode(&format).unwrap())
        .unwrap();
    db.flush().unwrap();
}

/// A directory as a format 3 raftkv left it after a clean stop (the log in sled).
async fn format_3_dir() -> tempfile::TempDir {
    let (dir, sm, _) = sled_log_dir().await;
    set_format(sm.db(), 3);
    drop(sm);
    std::fs::remove_dir_all(dir.path().join(super::log::LOG_DIR)).unwrap();
    dir
}

/// Opens a directory with sled alone, once the handles a test dropped have let go of its lock.
async fn raw_db(dir: &std::path::Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match super::sled_config(dir).open() {
            Err(e) if e.to_string().contains("lock") && std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            other => return other.unwrap(),
        }
    }
}

/// Every value of the trees no migration rewrites.
fn unchanged_trees(db: &sled::Db) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    ["sm_data"]
        .iter()
        .flat_map(|name| {
            let tree = db.open_tree(name).unwrap();
            tree.iter()
                .map(|kv| {
                    let (k, v) = kv.unwrap();
                    (name.to_string(), k.to_vec(), v.to_vec())
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// What a migrated directory must hold: everything [`format_2_dir`] wrote, read through format 4.
async fn assert_migrated(dir: &std::path::Path) {
    let (mut log, mut sm) = reopen(dir, 1).await.unwrap();
    let t = super::trees(sm.db()).unwrap();
    let format: u32 =
        crate::codec::decode(&t.raft_meta.get(super::FORMAT_KEY).unwrap().unwrap()).unwrap();
    assert_eq!(format, super::FORMAT);
    assert!(t.raft_log.is_empty(), "sled's log tree is emptied");
    for key in super::migrate::LOG_META_KEYS {
        assert_eq!(t.raft_meta.get(key).unwrap(), None);
    }
    assert_eq!(
        log.read_vote().await.unwrap(),
        Some(Vote::new_committed(1, 1))
    );
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 20)));
    assert_eq!(state.last_log_id, Some(log_id(1, 41)));
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 41)));
    let entries = log.try_get_log_entries(0..100).await.unwrap();
    assert_eq!(entries, migration_entries()[20..].to_vec());

    let snapshot = sm
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("the snapshot is kept");
    assert_eq!(snapshot.meta.last_log_id, Some(log_id(1, 30)));
    assert_eq!(snapshot.meta.last_membership.log_id(), &Some(log_id(1, 2)));
    assert!(snapshot.snapshot.path.is_file(), "the snapshot is a file");
    assert_eq!(
        t.sm_snapshot
            .get(super::snapshot::legacy::SNAPSHOT_KEY)
            .unwrap(),
        None,
        "and no longer in sled"
    );
    let (applied, membership) = sm.applied_state().await.unwrap();
    assert_eq!(
        applied,
        Some(log_id(1, 41)),
        "the clean stop's state is kept"
    );
    let peer = membership
        .membership()
        .get_node(&2)
        .map(|m| m.peer_addr.clone());
    assert_eq!(peer.as_deref(), Some("127.0.0.1:22"));
    let k3 = sm.get(b"k3").unwrap();
    assert_eq!(k3, None, "deleted at 41");
    let k5 = sm.get(b"k5").unwrap().unwrap();
    assert_eq!(
        (
            k5.value.as_slice(),
            k5.create_revision,
            k5.mod_revision,
            k5.version
        ),
        (&b"v40"[..], 5, 40, 6)
    );
    // Cleanly again, so the next open keeps this state too.
    sm.close().await.unwrap();
}

#[tokio::test]
async fn a_format_2_directory_is_migrated_at_open_and_checked_as_it_is_before() {
    let dir = format_2_dir().await;
    let before = unchanged_trees(&raw_db(dir.path()).await);
    let report = check_offline(dir.path()).await;
    assert!(report.is_clean(), "{:?}", report.problems);
    assert!(
        report
            .checked
            .iter()
            .any(|c| c.contains("storage format 2")),
        "{:?}",
        report.checked
    );
    // The old shape is not readable as the new one: the migration is what makes it open.
    assert!(
        super::integrity::check_meta(&raw_db(dir.path()).await, Some(1), 3, None)
            .problems
            .iter()
            .any(|p| p.contains("snapshot_meta")),
    );
    assert_migrated(dir.path()).await;
    assert_eq!(
        unchanged_trees(&raw_db(dir.path()).await),
        before,
        "the data is not rewritten"
    );
    let report = check_offline(dir.path()).await;
    assert!(report.is_clean(), "{:?}", report.problems);
    assert!(
        !report
            .checked
            .iter()
            .any(|c| c.contains("storage format 2"))
    );
    // Opened again: format 4, nothing left to migrate.
    assert_migrated(dir.path()).await;
    assert_a_crash_restores_the_snapshot_at_30(dir.path()).await;
}

/// `raftkv check` finds no problem in `dir`, and among what it checked is `what`.
async fn assert_checked_clean(dir: &std::path::Path, what: &str) {
    let report = check_offline(dir).await;
    assert!(report.is_clean(), "{:?}", report.problems);
    assert!(
        report.checked.iter().any(|c| c.contains(what)),
        "{:?}",
        report.checked
    );
}

/// After a crash (a start that ends without `close`), the state is rebuilt from the snapshot at 30
/// of [`migration_entries`].
async fn assert_a_crash_restores_the_snapshot_at_30(dir: &std::path::Path) {
    drop(reopen(dir, 1).await.unwrap());
    let (_log, mut sm) = reopen(dir, 1).await.unwrap();
    assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(1, 30)));
    assert_eq!(sm.get(b"k3").unwrap().unwrap().mod_revision, 24);
}

/// A migration stopped at any point (a crash) leaves a directory the next start opens correctly:
/// untouched format 2 before the transaction, complete format 3 after it.
#[tokio::test]
async fn an_interrupted_migration_is_finished_or_redone_at_the_next_open() {
    use super::migrate::{Step, to_3_until};
    for (stop, format_after) in [(Step::Converted, 2), (Step::Written, 3)] {
        let dir = format_2_dir().await;
        {
            let db = raw_db(dir.path()).await;
            to_3_until(&db, Some(stop)).unwrap();
            assert_eq!(
                super::check_format(&db, dir.path()).unwrap(),
                format_after,
                "stopped after {stop:?}"
            );
        }
        assert_migrated(dir.path()).await;
    }
}

/// A format 2 snapshot still in the place older builds kept it (`sm_meta`) is migrated there, then
/// moved.
#[tokio::test]
async fn a_format_2_snapshot_in_the_old_place_is_migrated_and_moved() {
    use super::snapshot::SNAPSHOT_META_KEY;
    use super::snapshot::legacy::SNAPSHOT_KEY;
    let dir = format_2_dir().await;
    {
        let db = raw_db(dir.path()).await;
        let t = super::trees(&db).unwrap();
        for key in [SNAPSHOT_KEY, SNAPSHOT_META_KEY] {
            let v = t.sm_snapshot.remove(key).unwrap().unwrap();
            t.sm_meta.insert(key, v).unwrap();
        }
        db.flush().unwrap();
    }
    assert_migrated(dir.path()).await;
}

#[tokio::test]
async fn a_format_3_directory_moves_its_log_out_of_sled_at_open() {
    let dir = format_3_dir().await;
    let before = unchanged_trees(&raw_db(dir.path()).await);
    let report = check_offline(dir.path()).await;
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_migrated(dir.path()).await;
    assert_eq!(unchanged_trees(&raw_db(dir.path()).await), before);
    assert_checked_clean(dir.path(), "raft-log: vote").await;
    assert_migrated(dir.path()).await;
}

/// The move of the log stopped at either side of its deciding step (a crash): a half-written
/// staging copy is discarded and the copy made again; a complete engine directory with sled still at
/// format 3 is kept and the sled part finished.
#[tokio::test]
async fn an_interrupted_move_of_the_log_is_redone_or_finished() {
    // Before the rename: a staging directory with a partial copy.
    let dir = format_3_dir().await;
    let staging = dir
        .path()
        .join(format!("{}.migrating", super::log::LOG_DIR));
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(staging.join("r-00_000_000_000_000_000_000.wal"), b"partial").unwrap();
    assert_migrated(dir.path()).await;
    assert!(!staging.exists());

    // After the rename, before sled was updated: the engine directory of a finished migration of
    // the same directory, beside sled still at format 3.
    let done = format_3_dir().await;
    let interrupted = format_3_dir().await;
    assert_migrated(done.path()).await;
    let (log, sm) = reopen(done.path(), 1).await.unwrap();
    drop((log, sm));
    let engine = super::log::LOG_DIR;
    let copy = std::process::Command::new("cp")
        .arg("-r")
        .arg(done.path().join(engine))
        .arg(interrupted.path().join(engine))
        .status()
        .unwrap();
    assert!(copy.success());
    assert_migrated(interrupted.path()).await;
}

/// A format 4 directory whose log engine directory is gone lost its vote and log: refused, not
/// started as a new node that could vote twice in a term.
#[tokio::test]
async fn a_directory_without_its_log_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path(), 1).unwrap());
    let _ = reopen(dir.path(), 1).await.unwrap();
    std::fs::remove_dir_all(dir.path().join(super::log::LOG_DIR)).unwrap();
    match reopen(dir.path(), 1).await {
        Err(StoreError::Corrupt { what, .. }) => assert!(what.contains("missing"), "{what}"),
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("a directory without its log opened"),
    }
}

/// Format 4 kept the snapshot as one sled value; format 5 moves it into a file at open, checked as
/// format 4 before and as format 5 after, and a crash afterwards rebuilds the state from the file.
#[tokio::test]
async fn a_format_4_directory_moves_its_snapshot_into_a_file_at_open() {
    let (dir, sm, _) = format_4_parts().await;
    set_format(sm.db(), 4);
    drop(sm);
    let report = check_offline(dir.path()).await;
    assert!(report.is_clean(), "{:?}", report.problems);
    assert!(
        report
            .checked
            .iter()
            .any(|c| c.contains("storage format 4"))
    );
    {
        let (_log, mut sm) = reopen(dir.path(), 1).await.unwrap();
        let snapshot = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(snapshot.meta.last_log_id, Some(log_id(1, 30)));
        assert!(snapshot.snapshot.path.is_file());
        assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(1, 41)));
        sm.close().await.unwrap();
    }
    assert_checked_clean(dir.path(), "snapshot file").await;
    // Not closed this time: a crash, so the state is rebuilt from the file.
    assert_a_crash_restores_the_snapshot_at_30(dir.path()).await;
}

/// What a crash in the middle of a build, a transfer or an install leaves (partial files, a half
/// filled spare data tree) is removed at the next open, and the state is the one from before.
#[tokio::test]
async fn an_interrupted_install_leaves_the_old_state_and_is_tidied_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (_log, mut sm) = open(dir.path(), 1).unwrap();
        apply(&mut sm, vec![put(1, "a", "1"), put(2, "b", "2")]).await;
        build_snapshot(&mut sm).await;
        let spare = sm.inner.db.open_tree(sm.inner.spare_tree_name()).unwrap();
        spare.insert(b"half", b"loaded".to_vec()).unwrap();
        let snapshots = super::snapshot::dir_of(dir.path());
        for leftover in ["x.partial", "y.receiving", "1-1-9-0-0.snap"] {
            std::fs::write(snapshots.join(leftover), b"left behind").unwrap();
        }
        sm.inner.db.flush().unwrap();
    }
    let (_log, mut sm) = reopen(dir.path(), 1).await.unwrap();
    assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(1, 2)));
    assert_eq!(sm.get(b"b").unwrap().unwrap().value, b"2");
    assert_eq!(sm.get(b"half").unwrap(), None);
    let names: Vec<_> = sm
        .inner
        .db
        .tree_names()
        .into_iter()
        .map(|n| n.to_vec())
        .collect();
    assert!(
        !names.contains(&sm.inner.spare_tree_name().as_bytes().to_vec()),
        "the spare tree is dropped"
    );
    let files = std::fs::read_dir(super::snapshot::dir_of(dir.path()))
        .unwrap()
        .count();
    assert_eq!(files, 1, "only the current snapshot's file is left");
    assert!(sm.get_current_snapshot().await.unwrap().is_some());
}

/// An install fills the spare tree and switches to it in one step: a reader never sees part of the
/// new state, and reads go on while the install runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_see_the_old_state_or_the_new_one_during_an_install() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    const KEYS: u64 = 20_000;
    let value = |tag: &str| tag.repeat(50);
    let src_dir = tempfile::tempdir().unwrap();
    let (_l, mut src) = open(src_dir.path(), 1).unwrap();
    apply(
        &mut src,
        (1..=KEYS)
            .map(|i| put(i, &format!("k{i:06}"), &value("n")))
            .collect(),
    )
    .await;
    let snap = build_snapshot(&mut src).await;

    let dst_dir = tempfile::tempdir().unwrap();
    let (_l2, mut dst) = open(dst_dir.path(), 2).unwrap();
    apply(
        &mut dst,
        (1..=KEYS / 2)
            .map(|i| put(i, &format!("k{i:06}"), &value("o")))
            .collect(),
    )
    .await;
    let done = Arc::new(AtomicBool::new(false));
    let reader = tokio::task::spawn_blocking({
        let (dst, done) = (dst.clone(), done.clone());
        move || {
            let mut scans = 0u64;
            while !done.load(Ordering::Relaxed) && scans < 1_000_000 {
                let (all, _) = dst.scan(b"", b"", usize::MAX, usize::MAX, 0).unwrap();
                let old = all.len() as u64 == KEYS / 2
                    && all.iter().all(|kv| kv.value == value("o").as_bytes());
                let new = all.len() as u64 == KEYS
                    && all.iter().all(|kv| kv.value == value("n").as_bytes());
                assert!(old || new, "a scan saw {} keys of a mixed state", all.len());
                scans += 1;
            }
            scans
        }
    });
    dst.install_snapshot(&snap.meta, snap.snapshot)
        .await
        .unwrap();
    done.store(true, Ordering::Relaxed);
    let scans = reader.await.unwrap();
    assert!(scans > 0);
    assert_eq!(
        dst.get(b"k020000").unwrap().unwrap().value,
        value("n").as_bytes()
    );
    assert_eq!(dump(&dst), dump(&src));
}

/// The snapshot file is the only copy of the state behind the purged log: a missing file is
/// corruption found at open (the node stops and is rebuilt from its peers), after a crash and after a
/// clean stop alike, not an I/O error the first time a follower needs the snapshot.
#[tokio::test]
async fn a_missing_snapshot_file_is_reported_as_corruption() {
    for clean in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        {
            let (_log, mut sm) = open(dir.path(), 1).unwrap();
            apply(&mut sm, vec![put(1, "a", "1")]).await;
            build_snapshot(&mut sm).await;
            if clean {
                sm.close().await.unwrap();
            }
        }
        std::fs::remove_dir_all(super::snapshot::dir_of(dir.path())).unwrap();
        let e = reopen(dir.path(), 1).await.err().expect("refused");
        assert!(
            matches!(e, StoreError::Corrupt { .. }),
            "clean {clean}: {e}"
        );
        assert!(e.to_string().contains("snapshot file"), "{e}");
    }
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|entry| entry.metadata().ok())
                .map(|meta| meta.len())
                .sum()
        })
        .unwrap_or(0)
}

/// sled keeps a value too large for its log pages in a file of its own (a blob), and 0.34 removed
/// a replaced blob only once the log segment holding its replacement was retired, which writes of
/// small blob pointers take a very long time to fill; a restart in between forgot it altogether.
/// Overwriting large values grew a node's disk to over a hundred times the live data. The patched
/// copy in vendor/sled removes a replaced blob once its replacement is durable, and an open
/// removes the blobs no page refers to.
#[test]
fn overwritten_large_values_leave_no_blobs_behind() {
    const KEYS: usize = 8;
    const VALUE: usize = 160 * 1024;
    const ROUNDS: usize = 50;
    let live = (KEYS * VALUE) as u64;
    let dir = tempfile::tempdir().unwrap();
    let blobs = dir.path().join("sled").join("blobs");
    {
        let db = super::sled_config(dir.path()).open().unwrap();
        let tree = db.open_tree("sm_data").unwrap();
        let mut largest = 0;
        for round in 0..ROUNDS {
            for key in 0..KEYS {
                let value = vec![(round * KEYS + key) as u8; VALUE];
                tree.insert((key as u32).to_be_bytes(), value).unwrap();
                db.flush().unwrap();
            }
            largest = largest.max(dir_bytes(&blobs));
        }
        eprintln!(
            "written {} B, live {live} B, blobs at most {largest} B",
            ROUNDS * KEYS * VALUE
        );
        assert!(
            largest <= 16 * live,
            "blobs grew to {largest} B for {live} B of live values"
        );
    }
    let db = super::sled_config(dir.path()).open().unwrap();
    let after_open = dir_bytes(&blobs);
    eprintln!("blobs after reopening: {after_open} B");
    assert!(
        after_open <= 3 * live,
        "{after_open} B of blobs after reopening, for {live} B of live values"
    );
    let tree = db.open_tree("sm_data").unwrap();
    for key in 0..KEYS {
        let value = tree.get((key as u32).to_be_bytes()).unwrap().unwrap();
        assert_eq!(value.len(), VALUE);
        assert_eq!(value[0], ((ROUNDS - 1) * KEYS + key) as u8);
    }
}

fn lease_entry(index: u64, op: crate::types::LeaseOp) -> crate::types::Entry {
    Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Normal(Command::Lease(op)),
    }
}

fn leased_put(index: u64, key: &str, lease: u64) -> crate::types::Entry {
    Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Normal(Command::PutWithLease {
            key: key.into(),
            value: b"v".to_vec(),
            prev_kv: false,
            lease,
        }),
    }
}

/// The lease table follows the state it belongs to: kept by a clean stop, rebuilt with the state
/// from the snapshot after a crash (leases granted after it are granted again by the replayed log,
/// never found already there), and carried by a snapshot into an install elsewhere.
#[tokio::test]
async fn leases_follow_the_state_through_crashes_clean_stops_and_installs() {
    use crate::types::LeaseOp;
    let ids = |sm: &StateMachineStore| sm.leases().read().keys().copied().collect::<Vec<_>>();
    let keys = |sm: &StateMachineStore, id: u64| {
        sm.leases().read()[&id]
            .keys
            .iter()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect::<Vec<_>>()
    };
    // Granted, no snapshot, crash: the grant goes with the state and applies again.
    let dir = tempfile::tempdir().unwrap();
    {
        let (_log, mut sm) = open(dir.path(), 1).unwrap();
        apply(
            &mut sm,
            vec![lease_entry(
                1,
                LeaseOp::Grant {
                    id: 0,
                    ttl_ms: 5000,
                },
            )],
        )
        .await;
        assert_eq!(ids(&sm), vec![1]);
    }
    let (_log, mut sm) = reopen(dir.path(), 1).await.unwrap();
    assert!(ids(&sm).is_empty());
    apply(
        &mut sm,
        vec![lease_entry(
            1,
            LeaseOp::Grant {
                id: 0,
                ttl_ms: 5000,
            },
        )],
    )
    .await;
    assert_eq!(ids(&sm), vec![1]);
    drop((_log, sm));

    let dir = tempfile::tempdir().unwrap();
    let snapshot = {
        let (_log, mut sm) = open(dir.path(), 1).unwrap();
        apply(
            &mut sm,
            vec![
                lease_entry(
                    1,
                    LeaseOp::Grant {
                        id: 7,
                        ttl_ms: 5000,
                    },
                ),
                leased_put(2, "a", 7),
                leased_put(3, "b", 7),
                lease_entry(
                    4,
                    LeaseOp::Checkpoint {
                        term: 1,
                        remaining: vec![(
                            crate::types::LeaseRef {
                                id: 7,
                                granted_at: 1,
                            },
                            1200,
                        )],
                    },
                ),
            ],
        )
        .await;
        let snapshot = build_snapshot(&mut sm).await;
        apply(
            &mut sm,
            vec![
                lease_entry(
                    5,
                    LeaseOp::Grant {
                        id: 8,
                        ttl_ms: 5000,
                    },
                ),
                leased_put(6, "c", 8),
            ],
        )
        .await;
        snapshot
    };
    let (log, mut sm) = reopen(dir.path(), 1).await.unwrap();
    assert_eq!(ids(&sm), vec![7], "back at the snapshot");
    assert_eq!(keys(&sm, 7), vec!["a", "b"]);
    assert_eq!(sm.leases().read()[&7].record.checkpoint_ms, Some(1200));
    assert_eq!(sm.get(b"a").unwrap().unwrap().lease, 7);
    apply(
        &mut sm,
        vec![
            lease_entry(
                5,
                LeaseOp::Grant {
                    id: 8,
                    ttl_ms: 5000,
                },
            ),
            leased_put(6, "c", 8),
            lease_entry(
                7,
                LeaseOp::Expire {
                    term: 1,
                    leases: vec![crate::types::LeaseRef {
                        id: 7,
                        granted_at: 1,
                    }],
                },
            ),
        ],
    )
    .await;
    assert_eq!(ids(&sm), vec![8]);
    assert_eq!(sm.get(b"a").unwrap(), None);
    sm.close().await.unwrap();
    drop((log, sm));
    let (_log, sm) = reopen(dir.path(), 1).await.unwrap();
    assert_eq!(ids(&sm), vec![8], "a clean stop keeps the table");
    assert_eq!(keys(&sm, 8), vec!["c"]);

    // The snapshot taken while lease 7 held a and b installs them elsewhere, replacing lease 8.
    let other = tempfile::tempdir().unwrap();
    let (_log2, mut target) = open(other.path(), 2).unwrap();
    apply(
        &mut target,
        vec![lease_entry(1, LeaseOp::Grant { id: 9, ttl_ms: 100 })],
    )
    .await;
    target
        .install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .unwrap();
    assert_eq!(ids(&target), vec![7]);
    assert_eq!(keys(&target, 7), vec!["a", "b"]);
}

/// An expiry or checkpoint counts only in an entry of the term that decided it and only for the
/// grant it names: a stale decision (a leader that lost office, an id granted again) does nothing.
#[tokio::test]
async fn stale_lease_decisions_change_nothing() {
    use crate::types::{LeaseOp, LeaseRef};
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(dir.path(), 1).unwrap();
    let at = |term: u64, index: u64, op: LeaseOp| Entry {
        log_id: openraft::testing::log_id::<TypeConfig>(term, 1, index),
        payload: EntryPayload::Normal(Command::Lease(op)),
    };
    let first = LeaseRef {
        id: 5,
        granted_at: 1,
    };
    apply(
        &mut sm,
        vec![
            at(
                1,
                1,
                LeaseOp::Grant {
                    id: 5,
                    ttl_ms: 9000,
                },
            ),
            leased_put(2, "k", 5),
            // Decided in term 1, appended in term 2: ignored.
            at(
                2,
                3,
                LeaseOp::Expire {
                    term: 1,
                    leases: vec![first],
                },
            ),
            at(
                2,
                4,
                LeaseOp::Checkpoint {
                    term: 1,
                    remaining: vec![(first, 10)],
                },
            ),
        ],
    )
    .await;
    assert_eq!(sm.leases().read()[&5].record.checkpoint_ms, None);
    assert!(sm.get(b"k").unwrap().is_some());
    // Revoked and granted again: the expiry of the first grant leaves the second alone.
    apply(
        &mut sm,
        vec![
            at(2, 5, LeaseOp::Revoke { id: 5 }),
            at(
                2,
                6,
                LeaseOp::Grant {
                    id: 5,
                    ttl_ms: 9000,
                },
            ),
            at(
                2,
                7,
                LeaseOp::Expire {
                    term: 2,
                    leases: vec![first],
                },
            ),
        ],
    )
    .await;
    assert_eq!(sm.leases().read()[&5].record.granted_at, 6);
    apply(
        &mut sm,
        vec![at(
            2,
            8,
            LeaseOp::Expire {
                term: 2,
                leases: vec![LeaseRef {
                    id: 5,
                    granted_at: 6,
                }],
            },
        )],
    )
    .await;
    assert!(sm.leases().read().is_empty());
}
