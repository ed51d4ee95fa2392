//! The cluster under test: real `raftkv server` processes, each with its own sled directory and log
//! file, started, killed, paused and restarted from outside, the way an operator or a power cut would.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::Context;
use tonic::transport::Channel;

use super::net::Net;
use raftkv_client::pb::v1::StatusRequest;
use raftkv_client::pb::v1::cluster_client::ClusterClient;
use raftkv_client::pb::v1::kv_client::KvClient;

/// The harness' view of one node process.
struct Proc {
    child: Option<Child>,
    paused: bool,
    /// Exits the harness did not cause, with how the process ended.
    unexpected_exits: Vec<String>,
}

pub struct Nodes {
    pub n: u64,
    bin: PathBuf,
    dir: PathBuf,
    extra_args: Vec<String>,
    /// With `--tls`: the `raftkv certs` directory every node takes its certificates from.
    tls_dir: Option<PathBuf>,
    procs: Vec<Proc>,
    channels: Vec<Channel>,
}

/// What one node said about itself.
#[derive(Debug, Clone)]
pub struct NodeStatus {
    pub id: u64,
    pub role: String,
    pub term: u64,
    pub leader_id: u64,
    pub applied_index: u64,
    pub commit_index: u64,
}

impl Nodes {
    pub fn new(
        net: &Net,
        n: u64,
        bin: &Path,
        dir: &Path,
        extra_args: Vec<String>,
        tls_dir: Option<PathBuf>,
    ) -> anyhow::Result<Nodes> {
        let tls = tls_dir
            .as_deref()
            .map(raftkv::tls::client_config_from_dir)
            .transpose()?;
        let mut channels = Vec::new();
        for id in 1..=n {
            channels.push(raftkv_client::endpoint(&net.addr(id), tls.as_ref())?.connect_lazy());
        }
        Ok(Nodes {
            n,
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            extra_args,
            tls_dir,
            procs: (0..n)
                .map(|_| Proc {
                    child: None,
                    paused: false,
                    unexpected_exits: Vec::new(),
                })
                .collect(),
            channels,
        })
    }

    pub fn ids(&self) -> impl Iterator<Item = u64> + use<> {
        1..=self.n
    }

    pub fn kv(&self, id: u64) -> KvClient<Channel> {
        KvClient::new(self.channels[(id - 1) as usize].clone())
    }

    pub fn log_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("n{id}.log"))
    }

    /// Starts node `id` on its data directory (fresh or not). Its output is appended to its log file, so
    /// a restarted node's log continues where the last one stopped.
    pub fn start(&mut self, net: &Net, id: u64) -> anyhow::Result<()> {
        self.start_with_env(net, id, &[])
    }

    /// Starts node `id` with extra environment variables (the clock fault's `LD_PRELOAD` of
    /// libfaketime; `ip netns exec` passes them on).
    pub fn start_with_env(
        &mut self,
        net: &Net,
        id: u64,
        env: &[(&str, String)],
    ) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(id))?;
        let mut cmd = net.command(&self.bin, id, self.n);
        cmd.arg(format!(
            "--data-dir={}",
            self.dir.join(format!("n{id}.data")).display()
        ))
        .args(&self.extra_args)
        .args(
            self.tls_dir
                .as_deref()
                .map(|dir| raftkv::tls::node_server_args(dir, id))
                .unwrap_or_default(),
        )
        .env(
            "RAFTKV_LOG",
            std::env::var("RAFTKV_JEPSEN_NODE_LOG")
                .unwrap_or_else(|_| "info,openraft=error".into()),
        )
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting node {id} ({:?})", cmd))?;
        let p = &mut self.procs[(id - 1) as usize];
        p.child = Some(child);
        p.paused = false;
        Ok(())
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.procs[(id - 1) as usize].child.is_some()
    }

    fn signal(&self, id: u64, sig: &str) -> anyhow::Result<()> {
        let Some(child) = &self.procs[(id - 1) as usize].child else {
            return Ok(());
        };
        let status = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(child.id().to_string())
            .status()
            .context("running kill")?;
        anyhow::ensure!(status.success(), "kill -{sig} node {id} failed");
        Ok(())
    }

    /// SIGKILL: no flush, no goodbye. Only what the node had made durable survives.
    pub fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        self.resume(id)?;
        let p = &mut self.procs[(id - 1) as usize];
        if let Some(mut child) = p.child.take() {
            // Child::kill sends SIGKILL; reaping it keeps the pid from being reused under us.
            let _ = child.kill();
            let _ = child.wait();
        }
        Ok(())
    }

    pub fn pause(&mut self, id: u64) -> anyhow::Result<()> {
        if self.is_running(id) {
            self.signal(id, "STOP")?;
            self.procs[(id - 1) as usize].paused = true;
        }
        Ok(())
    }

    pub fn resume(&mut self, id: u64) -> anyhow::Result<()> {
        if self.procs[(id - 1) as usize].paused {
            self.signal(id, "CONT")?;
            self.procs[(id - 1) as usize].paused = false;
        }
        Ok(())
    }

    /// Notes every node that exited without the harness killing it (a crash or a panic); such a node is
    /// restarted so the run goes on, but the run fails.
    pub fn reap_unexpected(&mut self, net: &Net) -> anyhow::Result<()> {
        for id in 1..=self.n {
            let p = &mut self.procs[(id - 1) as usize];
            let exited = match p.child.as_mut() {
                Some(child) => child.try_wait()?,
                None => None,
            };
            if let Some(status) = exited {
                p.child = None;
                // The last lines say why (a startup error, a panic message).
                let text = std::fs::read_to_string(self.dir.join(format!("n{id}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(3).collect();
                let why = tail.into_iter().rev().collect::<Vec<_>>().join(" | ");
                p.unexpected_exits
                    .push(format!("node {id} exited ({status}): {why}"));
                tracing::error!(node = id, %status, %why, "node exited unexpectedly; restarting it");
                self.start(net, id)?;
            }
        }
        Ok(())
    }

    pub fn unexpected_exits(&self) -> Vec<String> {
        self.procs
            .iter()
            .flat_map(|p| p.unexpected_exits.iter().cloned())
            .collect()
    }

    /// Lines of the node logs that report a panic.
    pub fn panics(&self) -> Vec<String> {
        let mut found = Vec::new();
        for id in 1..=self.n {
            let text = std::fs::read_to_string(self.log_path(id)).unwrap_or_default();
            for line in text.lines().filter(|l| l.contains("panicked at")) {
                found.push(format!("node {id}: {line}"));
            }
        }
        found
    }

    pub async fn status(&self, id: u64) -> Option<NodeStatus> {
        let mut client = ClusterClient::new(self.channels[(id - 1) as usize].clone());
        let mut req = tonic::Request::new(StatusRequest {});
        req.set_timeout(Duration::from_millis(300));
        let fut = client.status(req);
        let s = tokio::time::timeout(Duration::from_millis(400), fut)
            .await
            .ok()?
            .ok()?
            .into_inner();
        Some(NodeStatus {
            id: s.id,
            role: s.role,
            term: s.term,
            leader_id: s.leader_id,
            applied_index: s.applied_index,
            commit_index: s.commit_index,
        })
    }

    pub async fn statuses(&self) -> Vec<NodeStatus> {
        let all = futures::future::join_all(self.ids().map(|id| self.status(id))).await;
        all.into_iter().flatten().collect()
    }

    /// The node that says it leads, at the highest term any node reports.
    pub async fn leader(&self) -> Option<u64> {
        self.statuses()
            .await
            .into_iter()
            .filter(|s| s.role == "leader")
            .max_by_key(|s| s.term)
            .map(|s| s.id)
    }

    /// Waits until every node answers and all agree on one leader that calls itself leader.
    pub async fn wait_stable(&self, deadline: Duration) -> Option<u64> {
        let until = tokio::time::Instant::now() + deadline;
        while tokio::time::Instant::now() < until {
            let all = self.statuses().await;
            if all.len() as u64 == self.n {
                let leader = all[0].leader_id;
                let agreed = leader != 0 && all.iter().all(|s| s.leader_id == leader);
                let claims = all.iter().any(|s| s.id == leader && s.role == "leader");
                if agreed && claims {
                    return Some(leader);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// Kills every process; used at the end and on error paths.
    pub fn stop_all(&mut self) {
        for id in 1..=self.n {
            let _ = self.kill(id);
        }
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        self.stop_all();
    }
}
