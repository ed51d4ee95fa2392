//! The cluster under test: real `raftkv server` processes run by `raftkv-testkit` (each with its own
//! data directory and log file in the run's output directory), started, killed, paused and restarted
//! from outside, the way an operator or a power cut would. What is the fault harness's own: where the
//! network puts each node, which nodes are in the cluster now (the membership nemesis adds and
//! removes them), the nodes that exited without the harness causing it, which fail a run, and, for
//! the power-loss fault, the filesystem under each data directory that loses what was not fsynced.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use raftkv_lossyfs::Mount;
use raftkv_testkit::{Cluster, NodeSpec};

use super::net::Net;

/// The deadline of the harness's Status calls: short, because a node that does not answer in time is
/// as good as down to a client.
const STATUS_TIMEOUT: Duration = Duration::from_millis(300);

pub struct Nodes {
    cluster: Cluster,
    /// Exits the harness did not cause, with how the process ended.
    unexpected_exits: Vec<String>,
    /// The nodes the harness runs as part of the cluster: every node it started and has not retired.
    /// Faults strike these, and the final checks require these; `Cluster::ids` also lists retired
    /// ones, whose logs still count.
    members: BTreeSet<u64>,
    /// Nodes removed from the cluster and stopped for good (their ids are never used again).
    retired: BTreeSet<u64>,
    /// With the power-loss fault: where each node's durable data lives, and its mount.
    power: Option<Power>,
}

/// Every node's data directory is a mount of a store of its own under `stores`.
struct Power {
    stores: PathBuf,
    mounts: BTreeMap<u64, Mount>,
}

impl std::ops::Deref for Nodes {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl std::ops::DerefMut for Nodes {
    fn deref_mut(&mut self) -> &mut Cluster {
        &mut self.cluster
    }
}

/// What a node logs when it starts on an empty data directory (`node/mod.rs`).
const FRESH_START_LINES: [&str; 2] = ["bootstrapped a new cluster", "fresh data directory"];

/// Waits (briefly) until every thread of `pid` is stopped, as `/proc` shows it.
fn wait_stopped(pid: u32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return;
        };
        let all_stopped = tasks.flatten().all(|task| {
            std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
                // The state follows the command name in parentheses.
                stat.rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
            })
        });
        if all_stopped {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    tracing::warn!(
        pid,
        "a node did not stop within 2 s of SIGSTOP; cutting anyway"
    );
}

impl Nodes {
    /// `n` nodes of `bin` on `net`, their data and logs in `dir`, started by the caller. With `tls`,
    /// both ports use certificates made in `dir/tls` (for these nodes only: the membership fault,
    /// which adds nodes, is not run with TLS).
    pub fn new(
        net: &Net,
        n: u64,
        bin: &Path,
        dir: &Path,
        extra_args: Vec<String>,
        tls: bool,
        power_loss: bool,
    ) -> anyhow::Result<Nodes> {
        let log_filter = std::env::var("RAFTKV_JEPSEN_NODE_LOG")
            .unwrap_or_else(|_| "info,openraft=error".into());
        let mut builder = Cluster::builder(bin)
            .dir(dir)
            .nodes((1..=n).map(|id| net.node(id)).collect())
            .args(extra_args)
            .log_filter(log_filter)
            .status_timeout(STATUS_TIMEOUT)
            .shared_channels();
        if tls {
            builder = builder.tls_generate("raftkv jepsen");
        }
        Ok(Nodes {
            cluster: builder.build()?,
            unexpected_exits: Vec::new(),
            members: (1..=n).collect(),
            retired: BTreeSet::new(),
            power: power_loss.then(|| Power {
                stores: dir.join("lossyfs"),
                mounts: BTreeMap::new(),
            }),
        })
    }

    /// Starts node `id`, first mounting its data directory when the run has power cuts.
    pub fn start(&mut self, id: u64) -> anyhow::Result<()> {
        self.start_with_env(id, &[])
    }

    /// [`Nodes::start`] with environment variables for this start (the clock fault's).
    pub fn start_with_env(&mut self, id: u64, env: &[(&str, &str)]) -> anyhow::Result<()> {
        self.mount(id)?;
        self.cluster.start_with_env(id, env)?;
        Ok(())
    }

    fn mount(&mut self, id: u64) -> anyhow::Result<()> {
        let data = self.cluster.data_dir(id);
        let Some(power) = &mut self.power else {
            return Ok(());
        };
        if power.mounts.contains_key(&id) {
            return Ok(());
        }
        std::fs::create_dir_all(&data)?;
        let store = power.stores.join(format!("n{id}"));
        power.mounts.insert(id, Mount::new(&store, &data)?);
        Ok(())
    }

    /// The power cut on `ids` at one instant: each is frozen (SIGSTOP) first, then everything its
    /// filesystem holds unsynced is dropped, then it is SIGKILLed and its data directory mounted
    /// again from what survived. The nodes are left down; returns the bytes each lost.
    pub fn power_cut(&mut self, ids: &[u64]) -> anyhow::Result<Vec<(u64, u64)>> {
        anyhow::ensure!(
            self.power.is_some(),
            "the power-loss fault needs the nodes on lossyfs mounts"
        );
        for &id in ids {
            if self.cluster.is_running(id) {
                self.cluster.pause(id)?;
            }
        }
        // SIGSTOP is only queued by kill(2): a thread still running when its disk goes would see
        // errors no real power cut produces.
        for &id in ids {
            if let Some(pid) = self.cluster.pid(id) {
                wait_stopped(pid);
            }
        }
        let mut lost = Vec::new();
        let mut cut = Vec::new();
        if let Some(power) = &mut self.power {
            for &id in ids {
                if let Some(mount) = power.mounts.remove(&id) {
                    lost.push((id, mount.unsynced_bytes()));
                    mount.cut();
                    cut.push(mount);
                }
            }
        }
        for &id in ids {
            self.cluster.kill(id)?;
        }
        for mount in cut {
            mount.power_cut()?;
        }
        for &id in ids {
            self.mount(id)?;
        }
        Ok(lost)
    }

    /// Unmounts every node's data directory in order (the nodes are down): what they wrote becomes
    /// durable. With `export`, each store is then written out as an ordinary tree into the node's
    /// data directory, for reading a failed run's data; otherwise the stores are removed.
    pub fn unmount_all(&mut self, export: bool) -> anyhow::Result<()> {
        let Some(power) = &mut self.power else {
            return Ok(());
        };
        for (id, mount) in std::mem::take(&mut power.mounts) {
            let data = mount.mountpoint().to_path_buf();
            mount.unmount()?;
            let store = power.stores.join(format!("n{id}"));
            if export {
                raftkv_lossyfs::export(&store, &data)?;
            }
        }
        if !export {
            let _ = std::fs::remove_dir_all(&power.stores);
        }
        Ok(())
    }

    /// The nodes in the cluster now, in id order (see [`Nodes::members`]'s field).
    pub fn members(&self) -> Vec<u64> {
        self.members.iter().copied().collect()
    }

    pub fn is_member(&self, id: u64) -> bool {
        self.members.contains(&id)
    }

    pub fn retired(&self) -> Vec<u64> {
        self.retired.iter().copied().collect()
    }

    /// A node with a fresh id, not yet started; from now on it is a member the final checks require.
    pub fn add_member(&mut self, spec: NodeSpec) -> anyhow::Result<()> {
        let id = spec.id;
        anyhow::ensure!(!self.retired.contains(&id), "node id {id} was retired");
        self.cluster.add_node(spec)?;
        self.members.insert(id);
        Ok(())
    }

    /// A node that was removed from the cluster: it no longer counts as a member. The caller has
    /// stopped it or is about to.
    pub fn retire(&mut self, id: u64) {
        self.members.remove(&id);
        self.retired.insert(id);
    }

    /// The member that says it leads, at the highest term any member reports.
    pub async fn current_leader(&self) -> Option<u64> {
        self.statuses_of(&self.members())
            .await
            .into_iter()
            .flatten()
            .filter(|s| s.role == "leader")
            .max_by_key(|s| s.term)
            .map(|s| s.id)
    }

    /// Notes every node that exited without the harness killing it (a crash or a panic); such a node is
    /// restarted (unless it was retired) so the run goes on, but the run fails.
    pub fn reap_unexpected(&mut self) -> anyhow::Result<()> {
        for id in self.ids() {
            if let Some(status) = self.cluster.exited(id)? {
                // The last lines say why (a startup error, a panic message).
                let why = self.log_tail(id, 3).join(" | ");
                self.unexpected_exits
                    .push(format!("node {id} exited ({status}): {why}"));
                tracing::error!(node = id, %status, %why, "node exited unexpectedly");
                if self.members.contains(&id) {
                    self.start(id)?;
                }
            }
        }
        Ok(())
    }

    pub fn unexpected_exits(&self) -> Vec<String> {
        self.unexpected_exits.clone()
    }

    /// Nodes that started on an empty data directory more than once: after a power cut that means
    /// the disk lost everything, the vote included, and the node came back as a new member (which
    /// starts without complaint, so no exit would show it). The harness never wipes a node.
    pub fn fresh_restarts(&self) -> Vec<String> {
        let mut found = Vec::new();
        for id in self.ids() {
            let text = std::fs::read_to_string(self.log_path(id)).unwrap_or_default();
            let fresh = FRESH_START_LINES
                .iter()
                .map(|line| text.matches(line).count())
                .sum::<usize>();
            if fresh > 1 {
                found.push(format!(
                    "node {id} started on an empty data directory {fresh} times"
                ));
            }
        }
        found
    }

    /// Lines of the node logs that report a panic.
    pub fn panics(&self) -> Vec<String> {
        let mut found = Vec::new();
        for id in self.ids() {
            let text = std::fs::read_to_string(self.log_path(id)).unwrap_or_default();
            for line in text.lines().filter(|l| l.contains("panicked at")) {
                found.push(format!("node {id}: {line}"));
            }
        }
        found
    }

    /// Waits until every member answers and all agree on one leader that calls itself leader.
    pub async fn wait_stable(&self, deadline: Duration) -> Option<u64> {
        self.wait_leader(&self.members(), deadline).await.ok()
    }
}
