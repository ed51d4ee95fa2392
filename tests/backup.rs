//! Backup and restore on real processes: `raftkv snapshot save` from a follower while writes go on,
//! `snapshot status`, a restore into a fresh 3-node cluster that holds every write acknowledged
//! before the save (value and revisions) and nothing the backup could not hold, tampered and cut
//! files refused, and the leader's scheduled backups (`--backup-dir`).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Cluster, bin, eventually};
use raftkv::pb::v1 as pb;
use tokio::time::Instant;

const SECOND: Duration = Duration::from_secs(1);

fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run the CLI")
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `raftkv snapshot restore FILE --data-dir DIR --id ID --peers PEERS`.
fn restore(file: &str, dir: &str, id: &str, peers: &str) -> Output {
    run(&[
        "snapshot",
        "restore",
        file,
        "--data-dir",
        dir,
        "--id",
        id,
        "--peers",
        peers,
    ])
}

/// `raftkv snapshot status FILE --json`, which must check.
fn status_json(file: &Path) -> serde_json::Value {
    let out = run(&["snapshot", "status", file.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "snapshot status: {}", text(&out));
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

/// A write acknowledged to the test, with the revision it was given.
type Acked = BTreeMap<String, (String, u64)>;

/// Puts `key-N` keys until `stop`, recording each acknowledgement (bounded in count and time).
async fn write_until(
    client: raftkv_client::Client,
    prefix: &'static str,
    stop: Arc<AtomicBool>,
) -> Acked {
    let mut acked = Acked::new();
    let deadline = Instant::now() + 60 * SECOND;
    for i in 0..20_000u64 {
        if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
            break;
        }
        let (key, value) = (format!("{prefix}-{i:05}"), format!("v{i}"));
        if let Ok(r) = client
            .put(key.clone().into_bytes(), value.clone().into_bytes(), false)
            .await
        {
            acked.insert(key, (value, r.header.map_or(0, |h| h.revision)));
        }
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_load_restores_every_acknowledged_write_into_a_new_cluster() {
    let old = Cluster::start(3, &[]);
    let leader = old.wait_leader(&old.ids(), 20 * SECOND).await;
    let follower = old.ids().into_iter().find(|id| *id != leader).unwrap();
    let client = old.client();
    eventually(10 * SECOND, "first put", || {
        client.put(b"first".to_vec(), b"1".to_vec(), false)
    })
    .await;
    // Values that make the image span several frames and pieces of the stream.
    let big = "x".repeat(900 << 10);
    for i in 0..4 {
        client
            .put(
                format!("big{i}").into_bytes(),
                big.clone().into_bytes(),
                false,
            )
            .await
            .expect("big put");
    }

    let stop = Arc::new(AtomicBool::new(false));
    let before = tokio::spawn(write_until(old.client(), "before", stop.clone()));
    tokio::time::sleep(SECOND).await;
    stop.store(true, Ordering::SeqCst);
    let before = before.await.unwrap();
    assert!(
        before.len() > 10,
        "the load wrote too little: {}",
        before.len()
    );

    // The save runs while another writer keeps going, from a follower: its read index comes from
    // the leader.
    let stop = Arc::new(AtomicBool::new(false));
    let during = tokio::spawn(write_until(old.client(), "during", stop.clone()));
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("backup.rkv");
    let save = {
        let (file, endpoint) = (file.clone(), old.addr(follower));
        tokio::task::spawn_blocking(move || {
            run(&[
                "snapshot",
                "save",
                file.to_str().unwrap(),
                "--endpoints",
                &endpoint,
            ])
        })
        .await
        .unwrap()
    };
    tokio::time::sleep(SECOND / 2).await;
    stop.store(true, Ordering::SeqCst);
    let during = during.await.unwrap();
    assert!(save.status.success(), "snapshot save: {}", text(&save));
    assert!(
        String::from_utf8_lossy(&save.stdout).contains("Snapshot saved at"),
        "{}",
        text(&save)
    );
    assert!(
        !during.is_empty(),
        "no write went on during the save: the test shows nothing"
    );

    let header = status_json(&file);
    let revision = header["revision"].as_u64().unwrap();
    assert_eq!(header["format_version"], 1);
    assert_eq!(header["cluster_id"], old.cluster_id().to_string());
    assert_eq!(header["taken_on"].as_u64(), Some(follower));
    assert_eq!(header["members"].as_array().unwrap().len(), 3);
    let acked_before = before.values().map(|(_, r)| *r).max().unwrap();
    assert!(
        revision >= acked_before,
        "the backup at revision {revision} misses writes acknowledged before the save (up to {acked_before})"
    );

    // A fresh cluster, every member restored from the same file.
    let mut new = Cluster::unstarted(Cluster::builder(3, &[]));
    let peers: Vec<String> = new
        .ids()
        .into_iter()
        .map(|id| format!("{id}={}/{}", new.addr(id), new.peer_addr(id)))
        .collect();
    let peers = peers.join(",");
    let mut new_ids = std::collections::BTreeSet::new();
    for id in new.ids() {
        let dir = new.data_dir(id);
        let out = restore(
            file.to_str().unwrap(),
            dir.to_str().unwrap(),
            &id.to_string(),
            &peers,
        );
        assert!(out.status.success(), "restore of node {id}: {}", text(&out));
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        let cluster = said
            .split("new cluster ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("restore names no cluster: {said}"))
            .to_string();
        new_ids.insert(cluster);
    }
    assert_eq!(
        new_ids.len(),
        1,
        "members restored from one file differ: {new_ids:?}"
    );
    assert!(
        !new_ids.contains(&old.cluster_id().to_string()),
        "a restored cluster must have a new id"
    );
    for id in new.ids() {
        new.start_again(id);
    }
    new.wait_leader(&new.ids(), 20 * SECOND).await;
    let restored = new.client();
    // Every write acknowledged before the save is there, with its value and revisions.
    for (key, (value, rev)) in &before {
        let got = eventually(10 * SECOND, "a strong get", || {
            restored.get(key.clone().into_bytes(), pb::Consistency::Strong, 0)
        })
        .await;
        let kv = got
            .kv
            .unwrap_or_else(|| panic!("{key}, acknowledged before the save, is missing"));
        assert_eq!(kv.value, value.as_bytes(), "{key}");
        assert_eq!((kv.mod_revision, kv.create_revision), (*rev, *rev), "{key}");
    }
    for i in 0..4 {
        let got = restored
            .get(format!("big{i}").into_bytes(), pb::Consistency::Strong, 0)
            .await
            .unwrap();
        assert_eq!(got.kv.map(|kv| kv.value.len()), Some(big.len()));
    }
    // Writes that went on during the save are there exactly when the backup's revision covers them.
    for (key, (value, rev)) in &during {
        let got = restored
            .get(key.clone().into_bytes(), pb::Consistency::Strong, 0)
            .await
            .unwrap();
        match got.kv {
            Some(kv) => {
                assert!(
                    *rev <= revision,
                    "{key} at {rev} is past the backup's {revision}"
                );
                assert_eq!(
                    (kv.value.as_slice(), kv.mod_revision),
                    (value.as_bytes(), *rev)
                );
            }
            None => assert!(*rev > revision, "{key} at {rev} <= {revision} is missing"),
        }
    }
    // Revisions continue above the backup's.
    let put = restored
        .put(b"after".to_vec(), b"1".to_vec(), false)
        .await
        .unwrap();
    let after = put.header.unwrap().revision;
    assert!(
        after > revision,
        "a new write at {after}, the backup at {revision}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_cut_and_foreign_files_are_refused() {
    let c = Cluster::start(1, &[]);
    let client = c.client();
    for i in 0..50 {
        eventually(10 * SECOND, "put", || {
            client.put(format!("k{i}").into_bytes(), b"value".to_vec(), false)
        })
        .await;
    }
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("good.rkv");
    let out = run(&[
        "snapshot",
        "save",
        file.to_str().unwrap(),
        "--endpoints",
        &c.addr(1),
    ]);
    assert!(out.status.success(), "save: {}", text(&out));
    let good = std::fs::read(&file).unwrap();
    status_json(&file);

    let header_len = 12 + u32::from_le_bytes(good[8..12].try_into().unwrap()) as usize;
    let mut flipped = good.clone();
    let at = header_len + (good.len() - header_len) / 2;
    flipped[at] ^= 0x20;
    let mut wrong_count = String::from_utf8_lossy(&good[12..header_len]).into_owned();
    wrong_count = wrong_count.replace("\"keys\":50", "\"keys\":49");
    let mut relabelled = good[..8].to_vec();
    relabelled.extend_from_slice(&(wrong_count.len() as u32).to_le_bytes());
    relabelled.extend_from_slice(wrong_count.as_bytes());
    relabelled.extend_from_slice(&good[header_len..]);
    let cases: [(&str, Vec<u8>, &str); 5] = [
        ("flipped", flipped, "corrupt"),
        (
            "cut",
            good[..good.len() - 100].to_vec(),
            "corrupt or truncated",
        ),
        (
            "header-only",
            good[..header_len].to_vec(),
            "corrupt or truncated",
        ),
        ("relabelled", relabelled, "49 keys"),
        (
            "foreign",
            b"PK\x03\x04 not a backup at all".to_vec(),
            "not a raftkv backup",
        ),
    ];
    for (name, bytes, says) in cases {
        let path = work.path().join(format!("{name}.rkv"));
        std::fs::write(&path, &bytes).unwrap();
        let status = run(&["snapshot", "status", path.to_str().unwrap()]);
        assert_eq!(status.status.code(), Some(1), "{name}: {}", text(&status));
        assert!(text(&status).contains(says), "{name}: {}", text(&status));
        let dir = work.path().join(format!("{name}-data"));
        let refused = restore(
            path.to_str().unwrap(),
            dir.to_str().unwrap(),
            "1",
            "1=127.0.0.1:1/127.0.0.1:2",
        );
        assert_eq!(refused.status.code(), Some(1), "{name}: {}", text(&refused));
        assert!(
            !dir.exists(),
            "{name}: a refused restore left {}",
            dir.display()
        );
    }
    // Never over an existing directory.
    let refused = restore(
        file.to_str().unwrap(),
        c.data_dir(1).to_str().unwrap(),
        "1",
        "1=127.0.0.1:1/127.0.0.1:2",
    );
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("is not empty"),
        "{}",
        text(&refused)
    );
}

/// The backup files in `dir`, by name.
fn backups(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.ends_with(".rkvbackup"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_writes_scheduled_backups_keeps_the_newest_and_skips_when_idle() {
    let work = tempfile::tempdir().unwrap();
    let mut specs = raftkv_testkit::loopback(3).expect("free ports");
    for spec in &mut specs {
        let dir = work.path().join(format!("backups-{}", spec.id));
        spec.args = vec![
            "--backup-dir".into(),
            dir.to_str().unwrap().into(),
            "--backup-interval".into(),
            "1s".into(),
            "--backup-keep".into(),
            "2".into(),
        ];
    }
    let c = Cluster::started(raftkv_testkit::Cluster::builder(bin()).nodes(specs));
    let leader = c.wait_leader(&c.ids(), 20 * SECOND).await;
    let client = c.client();
    let dir = work.path().join(format!("backups-{leader}"));
    // Writes across several intervals: more backups than are kept.
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + 30 * SECOND;
    for i in 0..200 {
        if seen.len() >= 4 || Instant::now() > deadline {
            break;
        }
        client
            .put(format!("k{i}").into_bytes(), b"v".to_vec(), false)
            .await
            .expect("put");
        seen.extend(backups(&dir));
        tokio::time::sleep(SECOND / 4).await;
    }
    assert!(seen.len() >= 4, "the leader wrote {seen:?} in 30 s");
    let applied = c.status(leader).await.expect("status").applied_index;
    let kept = eventually(10 * SECOND, "a backup of the last write", || {
        let kept = backups(&dir);
        let newest = kept.last().map(|n| status_json(&dir.join(n)));
        async move {
            match newest {
                Some(h) if h["revision"].as_u64() == Some(applied) => Ok(kept),
                other => Err(tonic::Status::unavailable(format!("{other:?}"))),
            }
        }
    })
    .await;
    assert_eq!(kept.len(), 2, "--backup-keep 2 keeps two: {kept:?}");
    for name in &kept {
        status_json(&dir.join(name));
    }
    // Idle: three intervals pass without a new file.
    tokio::time::sleep(3 * SECOND).await;
    assert_eq!(
        backups(&dir),
        kept,
        "a backup was written with nothing changed"
    );
    // Followers write none.
    for id in c.ids().into_iter().filter(|id| *id != leader) {
        let theirs = backups(&work.path().join(format!("backups-{id}")));
        assert!(theirs.is_empty(), "follower {id} wrote {theirs:?}");
    }
}

/// A tmpfs mounted for one test, unmounted when it ends.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    /// None (and a line saying why) without root: only root mounts.
    fn mount(size: &str) -> Option<Tmpfs> {
        if !rustix::process::geteuid().is_root() {
            println!(
                "SKIPPED: mounting a small tmpfs needs root; the disk-room check is not tested"
            );
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "mount a tmpfs: {status:?}");
        Some(Tmpfs(dir))
    }

    fn available(&self) -> u64 {
        let fs = rustix::fs::statvfs(self.0.path()).unwrap();
        fs.f_bavail * fs.f_frsize
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

/// A backup image is written on the node's own disk before it is streamed: it is refused with
/// RESOURCE_EXHAUSTED, before anything is written, while the image would leave the filesystem with
/// less than its headroom (a twentieth, at least 64 MiB), and taken once there is room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_that_would_fill_the_nodes_disk_is_refused() {
    let Some(fs) = Tmpfs::mount("512m") else {
        return;
    };
    let c = Cluster::started(Cluster::builder(1, &[]).dir(fs.0.path().join("cluster")));
    let client = c.client();
    for i in 0..50 {
        eventually(10 * SECOND, "put", || {
            client.put(format!("k{i}").into_bytes(), b"value".to_vec(), false)
        })
        .await;
    }
    // Leave about 40 MiB free: less than the 64 MiB headroom.
    let ballast = fs.0.path().join("ballast");
    {
        use std::io::Write;
        let mut out = std::fs::File::create(&ballast).unwrap();
        let chunk = vec![1u8; 1 << 20];
        while fs.available() > 40 << 20 {
            out.write_all(&chunk).unwrap();
        }
        out.sync_all().unwrap();
    }
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("backup.rkv");
    let save = || {
        run(&[
            "snapshot",
            "save",
            file.to_str().unwrap(),
            "--endpoints",
            &c.addr(1),
        ])
    };
    let refused = save();
    assert!(
        !refused.status.success(),
        "saved on a full disk: {}",
        text(&refused)
    );
    let why = text(&refused);
    assert!(why.contains("not enough free disk"), "{why}");
    assert!(!file.exists(), "a refused save leaves no file");

    std::fs::remove_file(&ballast).unwrap();
    let saved = save();
    assert!(saved.status.success(), "save with room: {}", text(&saved));
    assert_eq!(status_json(&file)["keys"], 50);
}
