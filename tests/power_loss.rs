//! raftkv on a filesystem that loses what was not fsynced: every node's data directory is a
//! `raftkv-lossyfs` mount, and a power cut drops whatever the node had not made durable. A SIGKILL
//! loses nothing the kernel was handed, so only this finds a missing fsync.
//!
//! Mounting needs root and `/dev/fuse`; without them the tests say so and pass without testing
//! (`RAFTKV_REQUIRE_FUSE=1`, which `scripts/test.sh` sets where mounting works, makes that a
//! failure). The fault harness's `power-loss` nemesis is the randomized version of these.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Cluster, get, put, req};
use raftkv::pb::v1 as pb;
use raftkv_lossyfs::Mount;

const SECOND: Duration = Duration::from_secs(1);

/// Each node's data directory on a mount of its own store. Fields drop in order: the mounts before
/// the directory holding their stores.
struct Disks {
    mounts: BTreeMap<u64, Mount>,
    stores: tempfile::TempDir,
}

impl Disks {
    fn mount(c: &Cluster) -> Disks {
        let stores = tempfile::tempdir().unwrap();
        let mut mounts = BTreeMap::new();
        for id in c.ids() {
            let data = c.data_dir(id);
            std::fs::create_dir_all(&data).unwrap();
            let mount = Mount::new(&stores.path().join(format!("n{id}")), &data).unwrap();
            mounts.insert(id, mount);
        }
        Disks { mounts, stores }
    }

    /// The power cut on `ids` at one instant: frozen, unsynced data dropped, killed, mounted
    /// again on what survived, started.
    fn power_cut(&mut self, c: &mut Cluster, ids: &[u64]) {
        for &id in ids {
            c.pause(id);
        }
        for &id in ids {
            self.mounts[&id].cut();
        }
        for &id in ids {
            c.kill(id);
            let mount = self.mounts.remove(&id).unwrap();
            let data = mount.mountpoint().to_path_buf();
            mount.power_cut().unwrap();
            let store = self.stores.path().join(format!("n{id}"));
            self.mounts.insert(id, Mount::new(&store, &data).unwrap());
        }
        for &id in ids {
            c.start_again(id);
        }
    }
}

async fn put_keys(c: &Cluster, leader: u64, range: std::ops::Range<u32>) {
    for i in range {
        c.kv(leader)
            .put(req(put(&format!("k{i}"), &format!("v{i}")), 5 * SECOND))
            .await
            .expect("an acknowledged write");
    }
}

async fn assert_keys(c: &Cluster, node: u64, range: std::ops::Range<u32>) {
    for i in range {
        let got = c
            .kv(node)
            .get(req(
                get(&format!("k{i}"), pb::Consistency::Strong),
                5 * SECOND,
            ))
            .await
            .expect("a strong read")
            .into_inner();
        assert_eq!(
            got.kv.map(|kv| kv.value),
            Some(format!("v{i}").into_bytes()),
            "k{i} was acknowledged before the power cut"
        );
    }
}

/// Snapshots every 50 entries and a short log tail: the cut also finds snapshot files, their
/// renames and the purges behind them mid-way.
const ARGS: &[&str] = &["--snapshot-every=50", "--keep-logs=20"];

/// Three nodes started, each on a mount of its own. Bound as `let (disks, c)`, the cluster drops
/// first (its nodes are killed) and the disks after, even when a test fails half-way.
fn started_on_disks() -> (Disks, Cluster) {
    let mut c = Cluster::unstarted(Cluster::builder(3, ARGS));
    let disks = Disks::mount(&c);
    for id in c.ids() {
        c.start_again(id);
    }
    (disks, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_power_cut_of_every_node() {
    if !raftkv_lossyfs::available_for("acknowledged_writes_survive_a_power_cut_of_every_node") {
        return;
    }
    let (mut disks, mut c) = started_on_disks();
    let leader = c.wait_leader(&c.ids(), 20 * SECOND).await;
    put_keys(&c, leader, 0..150).await;

    // Right after the writes, with the node's first start only moments ago: the directories it
    // made then must be as durable as the log inside them.
    let ids = c.ids();
    disks.power_cut(&mut c, &ids);
    let leader = c.wait_leader(&c.ids(), 30 * SECOND).await;
    for id in c.ids() {
        assert_keys(&c, id, 0..150).await;
    }
    put_keys(&c, leader, 150..300).await;
    disks.power_cut(&mut c, &ids);
    let leader = c.wait_leader(&c.ids(), 30 * SECOND).await;
    assert_keys(&c, leader, 0..300).await;
    for id in c.ids() {
        c.kill(id);
    }
}

/// A follower that loses its page cache must come back as the member it was (its vote and log
/// intact), not as a fresh node: a fresh node could vote twice in one term.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_power_is_cut_comes_back_with_its_log() {
    if !raftkv_lossyfs::available_for("a_node_whose_power_is_cut_comes_back_with_its_log") {
        return;
    }
    let (mut disks, mut c) = started_on_disks();
    let leader = c.wait_leader(&c.ids(), 20 * SECOND).await;
    put_keys(&c, leader, 0..100).await;
    let follower = c.ids().into_iter().find(|&i| i != leader).unwrap();
    disks.power_cut(&mut c, &[follower]);
    c.wait_leader(&c.ids(), 30 * SECOND).await;
    let log = std::fs::read_to_string(c.log_path(follower)).unwrap();
    let fresh_starts = log.matches("fresh data directory").count()
        + log.matches("bootstrapped a new cluster").count();
    assert_eq!(
        fresh_starts, 1,
        "only the first start of node {follower} finds a fresh data directory"
    );
    assert_keys(&c, follower, 0..100).await;
    for id in c.ids() {
        c.kill(id);
    }
}
