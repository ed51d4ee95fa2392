//! A cluster of real `raftkv` processes for integration tests: the release binary, loopback sockets on
//! free ports, and sled directories under a temp dir. Dropping the cluster SIGKILLs every node. When a
//! test fails, the nodes' logs are printed so the failure can be read without rerunning it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use raftkv::pb::internal::raft_client::RaftClient;
use raftkv::pb::v1 as pb;
use raftkv::pb::v1::cluster_client::ClusterClient;
use raftkv::pb::v1::kv_client::KvClient;
use tokio::time::Instant;
use tonic::codegen::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig};

pub type PeerRpc = RaftClient<InterceptedService<Channel, raftkv::network::identity::PeerIdentity>>;
pub type ForwardRpc = raftkv::pb::internal::forward_client::ForwardClient<
    InterceptedService<Channel, raftkv::network::identity::PeerIdentity>,
>;

pub struct Node {
    pub id: u64,
    pub addr: String,
    /// Its `--peer-listen` address, where only Raft traffic is served.
    pub peer_addr: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    peers: String,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    /// With TLS on both ports: the `raftkv certs` directory, and how this harness dials the nodes
    /// (the set's CA and its client certificate).
    tls: Option<(PathBuf, ClientTlsConfig)>,
}

/// A CA, node certificates for ids 1..=`nodes` (valid for 127.0.0.1) and a client certificate, made
/// with rcgen (`raftkv::tls::generate`) and written to `dir`.
pub fn make_certs(dir: &Path, subject: &str, nodes: u64) -> PathBuf {
    let ids: Vec<u64> = (1..=nodes).collect();
    raftkv::tls::generate(subject, &["127.0.0.1".to_string()], &ids)
        .expect("generate certificates")
        .write(dir)
        .expect("write certificates");
    dir.to_path_buf()
}

impl Cluster {
    /// Starts `n` nodes (ids 1..=n) with the given extra server flags.
    pub fn start(n: u64, extra: &[&str]) -> Cluster {
        Cluster::start_with_env(n, extra, &[])
    }

    /// Starts `n` nodes with extra server flags and environment variables.
    pub fn start_with_env(n: u64, extra: &[&str], env: &[(&str, &str)]) -> Cluster {
        Cluster::build(n, extra, env, false)
    }

    /// Starts `n` nodes with TLS on both ports (certificates made for the test, in `tls/` of the
    /// cluster's directory); the harness' own clients dial with the set's client certificate.
    pub fn start_tls(n: u64, extra: &[&str]) -> Cluster {
        Cluster::build(n, extra, &[], true)
    }

    fn build(n: u64, extra: &[&str], env: &[(&str, &str)], tls: bool) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = tls.then(|| {
            let certs = make_certs(&dir.path().join("tls"), "raftkv test", n);
            let client = raftkv::tls::client_config_from_dir(&certs).expect("client TLS");
            (certs, client)
        });
        let nodes: Vec<Node> = (1..=n)
            .map(|id| {
                let port = portpicker::pick_unused_port().expect("free port");
                let peer_port = portpicker::pick_unused_port().expect("free port");
                Node {
                    id,
                    addr: format!("127.0.0.1:{port}"),
                    peer_addr: format!("127.0.0.1:{peer_port}"),
                    data_dir: dir.path().join(format!("n{id}")),
                    log: dir.path().join(format!("n{id}.log")),
                    child: None,
                }
            })
            .collect();
        let peers = nodes
            .iter()
            .map(|n| format!("{}={}/{}", n.id, n.addr, n.peer_addr))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Cluster {
            dir,
            nodes,
            peers,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            tls,
        };
        for id in 1..=n {
            cluster.spawn(id);
        }
        cluster
    }

    fn node(&self, id: u64) -> &Node {
        &self.nodes[(id - 1) as usize]
    }

    fn node_mut(&mut self, id: u64) -> &mut Node {
        &mut self.nodes[(id - 1) as usize]
    }

    fn spawn(&mut self, id: u64) {
        let peers = self.peers.clone();
        let mut extra = self.extra.clone();
        if let Some((certs, _)) = &self.tls {
            extra.extend(raftkv::tls::node_server_args(certs, id));
        }
        let env = self.env.clone();
        let node = self.node_mut(id);
        assert!(node.child.is_none(), "node {id} is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("log file");
        let child = Command::new(bin())
            .args([
                "server",
                "--id",
                &id.to_string(),
                "--listen",
                &node.addr,
                "--peer-listen",
                &node.peer_addr,
                "--peers",
                &peers,
            ])
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(&extra)
            .env("RAFTKV_LOG", "info,openraft=warn")
            .envs(env)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("spawn raftkv");
        node.child = Some(child);
    }

    /// The node's process id while it runs.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.node(id).child.as_ref().map(|c| c.id())
    }

    /// The node's log file (stdout and stderr).
    pub fn log_path(&self, id: u64) -> PathBuf {
        self.node(id).log.clone()
    }

    pub fn addr(&self, id: u64) -> String {
        self.node(id).addr.clone()
    }

    pub fn peer_addr(&self, id: u64) -> String {
        self.node(id).peer_addr.clone()
    }

    /// The cluster id its nodes derive at bootstrap (the default `--cluster-token`).
    pub fn cluster_id(&self) -> raftkv::network::identity::ClusterId {
        let members = self
            .nodes
            .iter()
            .map(|n| (n.id, raftkv::types::Member::new(&n.addr, &n.peer_addr)))
            .collect();
        raftkv::network::identity::ClusterId::derive("raftkv", &members)
    }

    /// A client of node `id`'s peer port whose requests say they come from node `from` of this cluster.
    pub fn peer_client(&self, id: u64, from: u64) -> PeerRpc {
        self.peer_client_on(channel(&self.peer_addr(id)), from)
    }

    /// [`Cluster::peer_client`] on a channel of the caller's (TLS, say) to a peer port.
    pub fn peer_client_on(&self, channel: Channel, from: u64) -> PeerRpc {
        RaftClient::with_interceptor(
            channel,
            raftkv::network::identity::PeerIdentity {
                cluster: self.cluster_id(),
                node: from,
            },
        )
    }

    /// A client of node `id`'s Forward service (forwarded writes, read index) in node `from`'s name.
    pub fn forward_client(&self, id: u64, from: u64) -> ForwardRpc {
        raftkv::pb::internal::forward_client::ForwardClient::with_interceptor(
            channel(&self.peer_addr(id)),
            raftkv::network::identity::PeerIdentity {
                cluster: self.cluster_id(),
                node: from,
            },
        )
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.node_mut(id).child.take() {
            let _ = signal(child.id(), "CONT");
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self, id: u64) {
        self.kill(id);
        self.spawn(id);
    }

    /// SIGTERM, as an operator stops a node, and wait (bounded) for a clean exit.
    pub async fn stop(&mut self, id: u64) {
        let mut child = self.node_mut(id).child.take().expect("running");
        assert!(signal(child.id(), "TERM"), "SIGTERM node {id}");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match child.try_wait().expect("wait") {
                Some(status) => {
                    assert!(status.success(), "node {id} stopped with {status}");
                    return;
                }
                None if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                None => {
                    let _ = child.kill();
                    panic!("node {id} did not stop within 15 s of SIGTERM");
                }
            }
        }
    }

    /// Starts a node that is down (after `stop` or `kill`) on its data.
    pub fn start_again(&mut self, id: u64) {
        self.spawn(id);
    }

    /// Deletes a stopped node's data directory, as if its disk were replaced.
    pub fn wipe(&mut self, id: u64) {
        assert!(
            self.node(id).child.is_none(),
            "wipe a node only while it is down"
        );
        std::fs::remove_dir_all(&self.node(id).data_dir).expect("wipe data dir");
    }

    pub fn pause(&self, id: u64) {
        let pid = self.node(id).child.as_ref().expect("running").id();
        assert!(signal(pid, "STOP"), "SIGSTOP node {id}");
    }

    pub fn resume(&self, id: u64) {
        let pid = self.node(id).child.as_ref().expect("running").id();
        assert!(signal(pid, "CONT"), "SIGCONT node {id}");
    }

    /// Waits (bounded) for a node to exit on its own and returns how it ended.
    pub async fn wait_exit(&mut self, id: u64, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.node_mut(id).child.as_mut().expect("running");
            if let Some(status) = child.try_wait().expect("wait") {
                self.node_mut(id).child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} still running after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// True if the node's process is still running (it has not crashed).
    pub fn alive(&mut self, id: u64) -> bool {
        match self.node_mut(id).child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The `raftkv certs` directory of a cluster started with [`Cluster::start_tls`].
    pub fn tls_dir(&self) -> Option<&Path> {
        self.tls.as_ref().map(|(dir, _)| dir.as_path())
    }

    /// A channel to node `id`'s public port, over TLS for a TLS cluster.
    pub fn public_channel(&self, id: u64) -> Channel {
        let tls = self.tls.as_ref().map(|(_, client)| client);
        raftkv::network::endpoint(&self.addr(id), tls)
            .expect("endpoint")
            .connect_lazy()
    }

    pub fn kv(&self, id: u64) -> KvClient<Channel> {
        KvClient::new(self.public_channel(id))
    }

    pub fn cluster_client(&self, id: u64) -> ClusterClient<Channel> {
        ClusterClient::new(self.public_channel(id))
    }

    pub fn client(&self) -> raftkv_client::Client {
        let tls = self.tls.as_ref().map(|(_, client)| client.clone());
        raftkv_client::Client::with_tls(&self.endpoints(), Duration::from_secs(10), tls)
            .expect("client")
    }

    pub async fn status(&self, id: u64) -> Option<pb::StatusResponse> {
        self.cluster_client(id)
            .status(req(pb::StatusRequest {}, Duration::from_millis(500)))
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    /// Waits until every node in `among` reports the same leader, itself one of `among`.
    pub async fn wait_leader(&self, among: &[u64], timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let mut leaders = Vec::new();
            for &id in among {
                leaders.push(self.status(id).await.map(|s| s.leader_id));
            }
            if let Some(Some(l)) = leaders.first()
                && among.contains(l)
                && leaders.iter().all(|x| *x == Some(*l))
            {
                return *l;
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader among {among:?} within {timeout:?}: {leaders:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until node `id` has applied at least `index`.
    pub async fn wait_applied(&self, id: u64, index: u64, timeout: Duration) -> pb::StatusResponse {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status(id).await;
            if let Some(s) = &s
                && s.applied_index >= index
            {
                return s.clone();
            }
            assert!(
                Instant::now() < deadline,
                "node {id} did not apply {index} within {timeout:?}: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn dump_logs(&self) {
        for n in &self.nodes {
            let text = std::fs::read_to_string(&n.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            eprintln!("----- node {} log (last {} lines) -----", n.id, tail.len());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for id in self.ids() {
            self.kill(id);
        }
    }
}

/// The binary under test: this build's, unless `RAFTKV_TEST_BIN` names another (to show that a new
/// test fails on an older build).
pub fn bin() -> String {
    std::env::var("RAFTKV_TEST_BIN")
        .ok()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_raftkv").to_string())
}

fn signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// CPU time (user + system) a process has used so far, from /proc.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // Linux's USER_HZ is 100 on every platform raftkv runs on.
    Duration::from_millis(ticks * 10)
}

pub fn channel(addr: &str) -> Channel {
    raftkv::network::endpoint(addr, None)
        .expect("endpoint")
        .connect_lazy()
}

pub fn req<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r
}

pub fn put(key: &str, value: &str) -> pb::PutRequest {
    pb::PutRequest {
        key: key.into(),
        value: value.into(),
        prev_kv: false,
    }
}

pub fn get(key: &str, consistency: pb::Consistency) -> pb::GetRequest {
    pb::GetRequest {
        key: key.into(),
        consistency: consistency as i32,
        min_revision: 0,
    }
}

/// Retries `f` until it succeeds or `timeout` passes (for the moments right after a start or failover).
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{what}: still failing after {timeout:?}: {e:?}"),
        }
    }
}
