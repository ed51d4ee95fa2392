//! Data directories written by the last raftkv that stored format 2 and the last that stored format
//! 3 open with this one: migrated to format 4 once, at the first start, with every key and revision
//! intact, and not again after. The fixtures and how they were made: tests/fixtures/README.md.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{bin, channel, eventually, get, put, req};
use raftkv::pb::v1 as pb;
use raftkv::pb::v1::kv_client::KvClient;
use tokio::time::Instant;

/// The fixture's `--peers`, as it was made. Its membership records these addresses; the node here
/// listens on free ports instead, and a one-node cluster never dials its own recorded addresses.
const FIXTURE_PEERS: &str = "1=127.0.0.1:47001/127.0.0.1:47101";
/// Logged once by the last step of every migration, whatever format it started from.
const MIGRATED: &str = "migrated the data directory from storage format 3 to 4";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

struct Node {
    dir: tempfile::TempDir,
    listen: String,
    peer_listen: String,
    child: Option<Child>,
}

impl Node {
    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("n1")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("n1.log")
    }

    fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("log file");
        let child = Command::new(bin())
            .args(["server", "--id", "1", "--listen", &self.listen])
            .args(["--peer-listen", &self.peer_listen, "--peers", FIXTURE_PEERS])
            .arg("--data-dir")
            .arg(self.data_dir())
            .env("RAFTKV_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("spawn raftkv");
        self.child = Some(child);
    }

    /// SIGTERM, as an operator stops a node, and a bounded wait for its clean exit.
    async fn stop(&mut self) {
        let mut child = self.child.take().expect("running");
        let term = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(term.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        while child.try_wait().expect("wait").is_none() {
            assert!(Instant::now() < deadline, "no exit 15 s after SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let status = child.wait().expect("wait");
        assert!(status.success(), "stopped with {status}");
    }

    fn crash(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("wait");
    }

    fn kv(&self) -> KvClient<tonic::transport::Channel> {
        KvClient::new(channel(&self.listen))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- node log ---\n{}", self.log_text());
        }
    }
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
        })
        .collect()
}

/// Every expected key, read one by one and by a scan, strongly.
async fn assert_holds(node: &Node, kvs: &[pb::KeyValue]) {
    let mut kv = node.kv();
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

async fn migrated_once_keeping_every_key(format: u32) {
    let old_format = format!("storage format {format}");
    let dir = tempfile::tempdir().expect("tempdir");
    let untar = Command::new("tar")
        .arg("-xzf")
        .arg(fixture(&format!("format{format}-1node.tar.gz")))
        .arg("-C")
        .arg(dir.path())
        .status()
        .expect("tar");
    assert!(untar.success(), "unpacking the fixture");
    let port = || portpicker::pick_unused_port().expect("free port");
    let mut node = Node {
        dir,
        listen: format!("127.0.0.1:{}", port()),
        peer_listen: format!("127.0.0.1:{}", port()),
        child: None,
    };
    let mut kvs = expected(format);
    assert!(kvs.len() > 30, "the fixture holds its keys");

    // Checked as it is, and left so.
    let (code, text) = check(&node.data_dir());
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains(&old_format), "{text}");

    node.start();
    assert_holds(&node, &kvs).await;
    assert_eq!(node.log_text().matches(MIGRATED).count(), 1);

    let mut kv = node.kv();
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
    });
    kvs.sort_by(|a, b| a.key.cmp(&b.key));

    // A clean restart opens format 4 as it is; so does one after a crash, which rebuilds the state
    // from the migrated snapshot and re-applies the log after it.
    node.stop().await;
    let (code, text) = check(&node.data_dir());
    assert_eq!(code, Some(0), "{text}");
    assert!(!text.contains(&old_format), "{text}");
    assert!(text.contains("raft-log: vote"), "{text}");
    node.start();
    assert_holds(&node, &kvs).await;
    node.crash();
    node.start();
    assert_holds(&node, &kvs).await;
    let log = node.log_text();
    assert_eq!(log.matches("raftkv node serving").count(), 3, "{log}");
    assert_eq!(log.matches(MIGRATED).count(), 1, "migrated only once");
}
