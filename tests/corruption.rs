//! Corruption is detected, not served: a node started on damaged data stops (health NOT_SERVING, an
//! ERROR naming its data directory, a non-zero exit) without answering a read from it, `raftkv check`
//! finds the damage offline, and the node rejoins by snapshot once its directory is wiped.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Cluster, req};
use raftkv::pb::v1 as pb;
use tokio::time::Instant;

const SECOND: Duration = Duration::from_secs(1);
/// `server::EXIT_CORRUPT`.
const EXIT_CORRUPT: i32 = 3;

/// `raftkv check --data-dir DIR`: its exit code and what it printed.
fn check(dir: &Path) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_raftkv"))
        .args(["check", "--data-dir"])
        .arg(dir)
        .output()
        .expect("run raftkv check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// XORs bytes spread over the middle half of the largest file under the sled directory (where a
/// node that has restarted once keeps data that sled reads back lazily, checking CRCs).
fn flip_bytes(dir: &Path) -> PathBuf {
    fn files(dir: &Path, out: &mut Vec<(u64, PathBuf)>) {
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

fn key(i: usize) -> Vec<u8> {
    format!("key{i:05}").into_bytes()
}

fn value(i: usize) -> Vec<u8> {
    format!("{i:0>1000}").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_corrupt_data_stops_and_rejoins_once_wiped() {
    const KEYS: usize = 2000;
    // Snapshots and a short log behind them, so the wiped node can only come back by snapshot.
    let mut c = Cluster::start(3, &["--snapshot-every", "500", "--keep-logs", "100"]);
    let leader = c.wait_leader(&c.ids(), 20 * SECOND).await;
    let victim = c.ids().into_iter().find(|&i| i != leader).unwrap();
    let client = c.client();
    let mut last = 0;
    for i in 0..KEYS {
        last = client
            .put(key(i), value(i), false)
            .await
            .unwrap()
            .header
            .unwrap()
            .revision;
    }
    c.wait_applied(victim, last, 30 * SECOND).await;
    c.stop(victim).await;
    // Once more, so that sled's own snapshot (written when it recovers at open) covers the data: sled
    // then reads it back lazily, as on any node that has restarted since it was written.
    c.start_again(victim);
    c.wait_applied(victim, last, 30 * SECOND).await;
    c.stop(victim).await;

    let data_dir = c.data_dir(victim);
    let (code, out) = check(&data_dir);
    assert_eq!(code, Some(0), "a clean directory checks clean:\n{out}");
    assert!(out.contains("clean"), "{out}");

    let flipped = flip_bytes(&data_dir);
    let (code, out) = check(&data_dir);
    assert_eq!(
        code,
        Some(1),
        "raftkv check must find bytes flipped in {}:\n{out}",
        flipped.display()
    );
    assert!(out.contains("CORRUPT"), "{out}");

    let log_path = c.log_path(victim);
    let log_before = std::fs::metadata(&log_path).unwrap().len() as usize;
    c.start_again(victim);
    // Until it exits, whatever it answers is right: an error, never a wrong or missing value.
    let mut kv = c.kv(victim);
    let deadline = Instant::now() + 30 * SECOND;
    let mut answered = 0usize;
    let mut refused = 0usize;
    let mut i = 0usize;
    while c.alive(victim) && Instant::now() < deadline {
        i = (i + 37) % KEYS;
        let r = kv
            .get(req(
                pb::GetRequest {
                    key: key(i),
                    consistency: pb::Consistency::Eventual as i32,
                    min_revision: 0,
                },
                SECOND,
            ))
            .await;
        match r {
            Ok(r) => {
                let kv = r.into_inner().kv;
                assert_eq!(
                    kv.map(|kv| kv.value),
                    Some(value(i)),
                    "node {victim} answered key {i} wrongly from corrupt data"
                );
                answered += 1;
            }
            Err(_) => refused += 1,
        }
    }
    let status = c.wait_exit(victim, 5 * SECOND).await;
    assert_eq!(
        status.code(),
        Some(EXIT_CORRUPT),
        "node {victim} on corrupt data must exit with the corruption status ({answered} reads \
         answered correctly, {refused} refused)"
    );
    let log = std::fs::read_to_string(&log_path).unwrap();
    let log = &log[log_before..];
    // sled may log its own ERROR about the damage first; raftkv's line must name the directory.
    let dir = data_dir.display().to_string();
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("corrupt") && l.contains(&dir)),
        "no ERROR line about corruption names the data directory {dir}:\n{log}"
    );

    c.wipe(victim);
    c.start_again(victim);
    let status = c.wait_applied(victim, last, 60 * SECOND).await;
    assert!(
        status.snapshot_index > 0,
        "the wiped node was restored from a snapshot: {status:?}"
    );
    let got = c
        .kv(victim)
        .get(req(
            pb::GetRequest {
                key: key(KEYS - 1),
                consistency: pb::Consistency::Eventual as i32,
                min_revision: 0,
            },
            5 * SECOND,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.kv.map(|kv| kv.value), Some(value(KEYS - 1)));
}

/// `raftkv check` refuses a directory a running node holds, saying so, instead of reading it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_a_directory_in_use() {
    let c = Cluster::start(1, &[]);
    c.wait_leader(&c.ids(), 20 * SECOND).await;
    let (code, out) = check(&c.data_dir(1));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("in use"), "{out}");
}
