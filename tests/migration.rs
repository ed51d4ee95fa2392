//! Data directories written by the last raftkv that stored each older format (2 to 5) open with
//! this one: migrated to the current format once, at the first start, with every key and revision
//! intact, and not again after; and a migrated node's watch history starts after what it had. The fixtures and how they were made: tests/fixtures/README.md.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Cluster, bin, eventually, get, put, req};
use raftkv::pb::v1 as pb;

/// The fixture's `--peers`, as it was made. Its membership records these addresses; the node here
/// listens on free ports instead, and a one-node cluster never dials its own recorded addresses.
const FIXTURE_PEERS: &str = "1=127.0.0.1:47001/127.0.0.1:47101";
/// Logged once by the last step of every migration, whatever format it started from.
const MIGRATED: &str = "migrated the data directory from storage format 6 to 7";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// `raftkv check` on the node's stopped directory: its exit status and output.
fn check(dir: &Path) -> (Option<i32>, String) {
    let out = Command::new(bin())
        .args(["check", "--data-dir"])
        .arg(dir)
        .output()
        .expect("raftkv check");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

/// What a strong scan of the fixture returned on the binary that made it, just before it stopped.
fn expected(format: u32) -> Vec<pb::KeyValue> {
    let text = std::fs::read_to_string(fixture(&format!("format{format}-1node.scan.json")))
        .expect("scan file");
    let json: serde_json::Value = serde_json::from_str(&text).expect("scan JSON");
    let field = |kv: &serde_json::Value, name: &str| kv[name].clone();
    json["kvs"]
        .as_array()
        .expect("kvs")
        .iter()
        .map(|kv| pb::KeyValue {
            key: field(kv, "key").as_str().expect("key").into(),
            value: field(kv, "value").as_str().expect("value").into(),
            create_revision: field(kv, "create_revision").as_u64().expect("create"),
            mod_revision: field(kv, "mod_revision").as_u64().expect("mod"),
            version: field(kv, "version").as_u64().expect("version"),
            lease: 0,
        })
        .collect()
}

/// Every expected key, read one by one and by a scan, strongly.
async fn assert_holds(node: &Cluster, kvs: &[pb::KeyValue]) {
    let mut kv = node.kv(1);
    for want in kvs {
        let key = String::from_utf8_lossy(&want.key).into_owned();
        let got = eventually(Duration::from_secs(10), "strong get", || {
            let mut kv = kv.clone();
            let key = key.clone();
            async move {
                kv.get(req(
                    get(&key, pb::Consistency::Strong),
                    Duration::from_secs(2),
                ))
                .await
            }
        })
        .await
        .into_inner();
        assert_eq!(got.kv.as_ref(), Some(want), "key {key}");
    }
    let scan = kv
        .scan(req(
            pb::ScanRequest {
                consistency: pb::Consistency::Strong as i32,
                ..Default::default()
            },
            Duration::from_secs(5),
        ))
        .await
        .expect("strong scan")
        .into_inner();
    assert_eq!(scan.kvs, kvs, "the whole key space");
}

#[tokio::test]
async fn a_format_2_directory_from_an_older_release_is_migrated_once_and_keeps_every_key() {
    migrated_once_keeping_every_key(2).await;
}

#[tokio::test]
async fn a_format_3_directory_from_the_previous_release_is_migrated_once_and_keeps_every_key() {
    migrated_once_keeping_every_key(3).await;
}

#[tokio::test]
async fn a_format_4_directory_from_the_previous_release_is_migrated_once_and_keeps_every_key() {
    migrated_once_keeping_every_key(4).await;
}

#[tokio::test]
async fn a_format_5_directory_from_the_previous_release_is_migrated_once_and_keeps_every_key() {
    migrated_once_keeping_every_key(5).await;
}

#[tokio::test]
async fn a_format_6_directory_from_the_previous_release_is_migrated_once_and_keeps_every_key() {
    migrated_once_keeping_every_key(6).await;
}

async fn migrated_once_keeping_every_key(format: u32) {
    let old_format = format!("storage format {format}");
    let mut node = Cluster::unstarted(Cluster::builder(1, &[]).peers(FIXTURE_PEERS));
    let untar = Command::new("tar")
        .arg("-xzf")
        .arg(fixture(&format!("format{format}-1node.tar.gz")))
        .arg("-C")
        .arg(node.dir())
        .status()
        .expect("tar");
    assert!(untar.success(), "unpacking the fixture");
    std::fs::rename(node.dir().join("n1"), node.data_dir(1)).expect("the fixture's n1");
    let log_text = |node: &Cluster| std::fs::read_to_string(node.log_path(1)).unwrap_or_default();
    let mut kvs = expected(format);
    assert!(kvs.len() > 30, "the fixture holds its keys");

    // Checked as it is, and left so.
    let (code, text) = check(&node.data_dir(1));
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains(&old_format), "{text}");

    node.start_again(1);
    assert_holds(&node, &kvs).await;
    assert_eq!(log_text(&node).matches(MIGRATED).count(), 1);

    let mut kv = node.kv(1);
    let written = kv
        .put(req(put("after-migration", "yes"), Duration::from_secs(5)))
        .await
        .expect("a new write")
        .into_inner();
    let revision = written.header.expect("header").revision;
    let newest = kvs.iter().map(|k| k.mod_revision).max().unwrap_or(0);
    assert!(revision > newest, "revision {revision} after {newest}");
    kvs.push(pb::KeyValue {
        key: b"after-migration".to_vec(),
        value: b"yes".to_vec(),
        create_revision: revision,
        mod_revision: revision,
        version: 1,
        lease: 0,
    });
    kvs.sort_by(|a, b| a.key.cmp(&b.key));

    // Before format 6 there was no history: it starts after what the node had applied, and a
    // watch from before is told so. From format 6 on, the history is kept: a watch from the
    // fixture's newest write sees that revision first.
    let mut watch = raftkv::pb::v1::watch_client::WatchClient::new(node.channel(1));
    let watch_from = if format < 6 {
        let from_before = pb::WatchRequest {
            start_revision: 1,
            ..Default::default()
        };
        let refused = match watch.watch(from_before).await {
            Ok(stream) => stream.into_inner().message().await.map(|_| ()),
            Err(status) => Err(status),
        };
        let refused = refused.expect_err("the history starts after the migration");
        assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");
        revision
    } else {
        newest
    };
    let from_new = pb::WatchRequest {
        start_revision: watch_from,
        ..Default::default()
    };
    let mut stream = watch.watch(from_new).await.expect("watch").into_inner();
    let mut events = Vec::new();
    while events.is_empty() {
        events = stream
            .message()
            .await
            .expect("message")
            .expect("open")
            .events;
    }
    assert_eq!(
        events[0].kv.as_ref().map(|kv| kv.mod_revision),
        Some(watch_from)
    );

    // A clean restart opens the current format as it is; so does one after a crash, which rebuilds the state
    // from the migrated snapshot and re-applies the log after it.
    node.stop(1).await;
    let (code, text) = check(&node.data_dir(1));
    assert_eq!(code, Some(0), "{text}");
    assert!(!text.contains(&old_format), "{text}");
    assert!(text.contains("raft-log: vote"), "{text}");
    assert!(text.contains("snapshot file"), "{text}");
    node.start_again(1);
    assert_holds(&node, &kvs).await;
    node.kill(1);
    node.start_again(1);
    assert_holds(&node, &kvs).await;
    let log = log_text(&node);
    assert_eq!(log.matches("raftkv node serving").count(), 3, "{log}");
    assert_eq!(log.matches(MIGRATED).count(), 1, "migrated only once");
}
