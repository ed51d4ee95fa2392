//! The cluster: how it is set up ([`Builder`]), and every node's process and client channel.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use raftkv_client::pb::v1::cluster_client::ClusterClient;
use raftkv_client::pb::v1::kv_client::KvClient;
use raftkv_client::pb::v1::{StatusRequest, StatusResponse};
use tokio::time::Instant;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::{Error, NodeSpec};

/// How often a wait asks the nodes again, and how often a stopping node is checked for its exit.
const POLL: Duration = Duration::from_millis(50);
const EXIT_POLL: Duration = Duration::from_millis(20);
/// How much longer than its gRPC deadline a Status call may take before it is given up: the deadline
/// covers the call, and this covers a connection attempt to a node that is frozen or cut off.
const STATUS_SLACK: Duration = Duration::from_millis(100);
/// The lines of each node's log printed when a thread panics with the cluster in hand.
const DUMP_LINES: usize = 60;

enum Dir {
    /// Removed with the cluster.
    Temp(tempfile::TempDir),
    /// The caller's, kept.
    Kept(PathBuf),
}

impl Dir {
    fn path(&self) -> &Path {
        match self {
            Dir::Temp(t) => t.path(),
            Dir::Kept(p) => p,
        }
    }
}

enum Tls {
    Off,
    /// A `raftkv certs` directory that already exists.
    Dir(PathBuf),
    /// Made at build time in `tls/` of the cluster's directory, with this subject.
    Generate(String),
}

/// The settings of a cluster before any node starts. See [`Cluster::builder`].
pub struct Builder {
    bin: PathBuf,
    dir: Option<PathBuf>,
    nodes: Vec<NodeSpec>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log_filter: String,
    tls: Tls,
    peers: Option<String>,
    status_timeout: Duration,
    shared_channels: bool,
}

impl Builder {
    /// The nodes (by default none: a cluster needs at least one).
    pub fn nodes(mut self, nodes: Vec<NodeSpec>) -> Builder {
        self.nodes = nodes;
        self
    }

    /// Where data directories and logs go, kept after the cluster (by default a temporary directory
    /// that is removed with it).
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Builder {
        self.dir = Some(dir.into());
        self
    }

    /// Server flags every node gets.
    pub fn args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Builder {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// An environment variable every start of every node gets (after `RAFTKV_LOG`, so it may
    /// override the filter).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Builder {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The nodes' `RAFTKV_LOG` (by default `info,openraft=warn`).
    pub fn log_filter(mut self, filter: impl Into<String>) -> Builder {
        self.log_filter = filter.into();
        self
    }

    /// TLS on both ports from an existing `raftkv certs` directory; the harness's own channels dial
    /// with its client certificate.
    pub fn tls_dir(mut self, dir: impl Into<PathBuf>) -> Builder {
        self.tls = Tls::Dir(dir.into());
        self
    }

    /// TLS on both ports from certificates made for this cluster (in `tls/` of its directory, valid
    /// for loopback and every node's host), with `subject` naming their CAs.
    pub fn tls_generate(mut self, subject: impl Into<String>) -> Builder {
        self.tls = Tls::Generate(subject.into());
        self
    }

    /// A `--peers` of the caller's instead of one made from the nodes' addresses (a data directory
    /// made elsewhere records other addresses).
    pub fn peers(mut self, peers: impl Into<String>) -> Builder {
        self.peers = Some(peers.into());
        self
    }

    /// The deadline of the harness's Status calls (by default 500 ms).
    pub fn status_timeout(mut self, timeout: Duration) -> Builder {
        self.status_timeout = timeout;
        self
    }

    /// One channel per node for every call of the harness and its clients (the fault harness: a
    /// poll must not wait for a handshake). By default each call opens its own connection, as a new
    /// client would, so a test of connection limits counts only the connections it makes itself.
    pub fn shared_channels(mut self) -> Builder {
        self.shared_channels = true;
        self
    }

    /// Makes the directory, the certificates and the endpoints; starts no node.
    pub fn build(self) -> Result<Cluster, Error> {
        let dir = match &self.dir {
            Some(path) => {
                std::fs::create_dir_all(path).map_err(|source| Error::Io {
                    what: format!("creating {}", path.display()),
                    source,
                })?;
                Dir::Kept(path.clone())
            }
            None => Dir::Temp(tempfile::tempdir().map_err(|source| Error::Io {
                what: "creating a temporary directory".into(),
                source,
            })?),
        };
        let tls_dir = match &self.tls {
            Tls::Off => None,
            Tls::Dir(path) => Some(path.clone()),
            Tls::Generate(subject) => {
                let path = dir.path().join("tls");
                let ids: Vec<u64> = self.nodes.iter().map(|n| n.id).collect();
                raftkv::tls::generate(subject, &cert_hosts(&self.nodes), &ids)
                    .and_then(|certs| certs.write(&path))
                    .map_err(|e| Error::Tls(Box::new(e)))?;
                Some(path)
            }
        };
        let tls = match tls_dir {
            Some(path) => {
                let client = raftkv::tls::client_config_from_dir(&path)
                    .map_err(|e| Error::Tls(Box::new(e)))?;
                Some((path, client))
            }
            None => None,
        };
        let peers = self.peers.clone().unwrap_or_else(|| {
            self.nodes
                .iter()
                .map(|n| format!("{}={}/{}", n.id, n.addr, n.peer_addr))
                .collect::<Vec<_>>()
                .join(",")
        });
        let mut nodes = Vec::new();
        for spec in self.nodes {
            nodes.push(Node::new(
                spec,
                dir.path(),
                tls.as_ref().map(|(_, c)| c),
                self.shared_channels,
            )?);
        }
        Ok(Cluster {
            dir,
            bin: self.bin,
            nodes,
            shared_channels: self.shared_channels,
            peers,
            args: self.args,
            env: self.env,
            log_filter: self.log_filter,
            tls,
            status_timeout: self.status_timeout,
        })
    }

    /// [`Builder::build`], then starts every node.
    pub fn start(self) -> Result<Cluster, Error> {
        let mut cluster = self.build()?;
        for id in cluster.ids() {
            cluster.start(id)?;
        }
        Ok(cluster)
    }
}

/// Loopback and every host the nodes listen on, for the certificates' names.
fn cert_hosts(nodes: &[NodeSpec]) -> Vec<String> {
    let mut hosts: Vec<String> = ["127.0.0.1", "localhost"].map(String::from).into();
    for addr in nodes.iter().flat_map(|n| [&n.addr, &n.peer_addr]) {
        if let Some((host, _)) = addr.rsplit_once(':')
            && !hosts.iter().any(|h| h == host)
        {
            hosts.push(host.to_string());
        }
    }
    hosts
}

/// One node: how it is reached, and its process while it runs.
struct Node {
    spec: NodeSpec,
    data_dir: PathBuf,
    log: PathBuf,
    endpoint: Endpoint,
    /// With [`Builder::shared_channels`].
    shared: Option<Channel>,
    child: Option<Child>,
    /// SIGSTOPped by [`Cluster::pause`] and not yet continued.
    paused: bool,
}

impl Node {
    fn new(
        spec: NodeSpec,
        dir: &Path,
        tls: Option<&ClientTlsConfig>,
        shared_channels: bool,
    ) -> Result<Node, Error> {
        let endpoint =
            raftkv_client::endpoint(&spec.addr, tls).map_err(|source| Error::Endpoint {
                addr: spec.addr.clone(),
                source,
            })?;
        let shared = shared_channels.then(|| endpoint.connect_lazy());
        Ok(Node {
            data_dir: dir.join(format!("n{}.data", spec.id)),
            log: dir.join(format!("n{}.log", spec.id)),
            spec,
            endpoint,
            shared,
            child: None,
            paused: false,
        })
    }
}

pub struct Cluster {
    dir: Dir,
    bin: PathBuf,
    nodes: Vec<Node>,
    peers: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log_filter: String,
    /// With TLS: the `raftkv certs` directory, and how the harness dials the nodes.
    tls: Option<(PathBuf, ClientTlsConfig)>,
    status_timeout: Duration,
    shared_channels: bool,
}

impl Cluster {
    /// A cluster of `bin`'s servers, set up by the returned builder.
    pub fn builder(bin: impl Into<PathBuf>) -> Builder {
        Builder {
            bin: bin.into(),
            dir: None,
            nodes: Vec::new(),
            args: Vec::new(),
            env: Vec::new(),
            log_filter: "info,openraft=warn".into(),
            tls: Tls::Off,
            peers: None,
            status_timeout: Duration::from_millis(500),
            shared_channels: false,
        }
    }

    /// Node `id`. Ids are the caller's own, so an unknown one is a bug in the caller.
    fn node(&self, id: u64) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.spec.id == id)
            .unwrap_or_else(|| panic!("node {id} is not in this cluster"))
    }

    fn node_mut(&mut self, id: u64) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.spec.id == id)
            .unwrap_or_else(|| panic!("node {id} is not in this cluster"))
    }

    /// Adds node `spec` to the harness, not yet started. It starts with the cluster's flags like the
    /// others (`--peers` included) and its own: give it `--join` to join the running cluster, or add
    /// it with `MemberAdd` first. With TLS, the certificates must already cover its id.
    pub fn add_node(&mut self, spec: NodeSpec) -> Result<(), Error> {
        if self.nodes.iter().any(|n| n.spec.id == spec.id) {
            return Err(Error::Exists(spec.id));
        }
        let node = Node::new(
            spec,
            self.dir.path(),
            self.tls.as_ref().map(|(_, c)| c),
            self.shared_channels,
        )?;
        self.nodes.push(node);
        Ok(())
    }

    /// The directory that holds the data directories and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.spec.id).collect()
    }

    /// How many nodes the cluster has.
    pub fn size(&self) -> u64 {
        self.nodes.len() as u64
    }

    pub fn spec(&self, id: u64) -> &NodeSpec {
        &self.node(id).spec
    }

    pub fn addr(&self, id: u64) -> String {
        self.node(id).spec.addr.clone()
    }

    pub fn peer_addr(&self, id: u64) -> String {
        self.node(id).spec.peer_addr.clone()
    }

    /// Every node's client address, in id order.
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.spec.addr.clone()).collect()
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.node(id).data_dir.clone()
    }

    /// The node's log file (its stdout and stderr, over all its starts).
    pub fn log_path(&self, id: u64) -> PathBuf {
        self.node(id).log.clone()
    }

    /// The last `lines` lines of the node's log (none if it has no log yet).
    pub fn log_tail(&self, id: u64, lines: usize) -> Vec<String> {
        let text = std::fs::read_to_string(&self.node(id).log).unwrap_or_default();
        let mut tail: Vec<String> = text.lines().rev().take(lines).map(String::from).collect();
        tail.reverse();
        tail
    }

    /// The `raftkv certs` directory, with TLS.
    pub fn tls_dir(&self) -> Option<&Path> {
        self.tls.as_ref().map(|(dir, _)| dir.as_path())
    }

    /// How a client dials the nodes, with TLS.
    pub fn client_tls(&self) -> Option<&ClientTlsConfig> {
        self.tls.as_ref().map(|(_, client)| client)
    }

    /// A channel to node `id`'s client port (over TLS with TLS): a new connection, or the shared one
    /// with [`Builder::shared_channels`]. It connects on first use, and again after the node restarts.
    pub fn channel(&self, id: u64) -> Channel {
        let node = self.node(id);
        match &node.shared {
            Some(channel) => channel.clone(),
            None => node.endpoint.connect_lazy(),
        }
    }

    pub fn kv(&self, id: u64) -> KvClient<Channel> {
        KvClient::new(self.channel(id))
    }

    pub fn cluster_client(&self, id: u64) -> ClusterClient<Channel> {
        ClusterClient::new(self.channel(id))
    }

    /// The node's process id while it runs.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.node(id).child.as_ref().map(|c| c.id())
    }

    /// True from a start until the harness kills, stops or reaps the node (a crashed node that has
    /// not been reaped still counts; see [`Cluster::exited`]).
    pub fn is_running(&self, id: u64) -> bool {
        self.node(id).child.is_some()
    }

    /// True if the node's process runs and has not exited (it has not crashed). A node that has
    /// exited is not reaped here, so [`Cluster::wait_exit`] still tells how it ended.
    pub fn alive(&mut self, id: u64) -> bool {
        match self.node_mut(id).child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// How the node ended, if it exited on its own since it was started; the node then counts as down.
    pub fn exited(&mut self, id: u64) -> Result<Option<ExitStatus>, Error> {
        let node = self.node_mut(id);
        let Some(child) = node.child.as_mut() else {
            return Ok(None);
        };
        let status = child.try_wait().map_err(|source| Error::Io {
            what: format!("waiting for node {id}"),
            source,
        })?;
        if status.is_some() {
            node.child = None;
            node.paused = false;
        }
        Ok(status)
    }

    /// Starts node `id` (down, fresh or not) on its data directory.
    pub fn start(&mut self, id: u64) -> Result<(), Error> {
        self.start_with_env(id, &[])
    }

    /// Starts node `id` with environment variables for this start only (the clock fault's
    /// `LD_PRELOAD` of libfaketime; `ip netns exec` passes them on).
    pub fn start_with_env(&mut self, id: u64, env: &[(&str, &str)]) -> Result<(), Error> {
        if self.is_running(id) {
            return Err(Error::AlreadyRunning(id));
        }
        let node = self.node(id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(|source| Error::Io {
                what: format!("opening {}", node.log.display()),
                source,
            })?;
        let log_err = log.try_clone().map_err(|source| Error::Io {
            what: format!("opening {}", node.log.display()),
            source,
        })?;
        let mut cmd = match node.spec.wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.arg("server")
            .arg(format!("--id={id}"))
            .arg(format!("--listen={}", node.spec.addr))
            .arg(format!("--peer-listen={}", node.spec.peer_addr))
            .arg(format!("--peers={}", self.peers))
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(&node.spec.args)
            .args(&self.args)
            .args(
                self.tls_dir()
                    .map(|dir| raftkv::tls::node_server_args(dir, id))
                    .unwrap_or_default(),
            )
            .env("RAFTKV_LOG", &self.log_filter)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(env.iter().map(|(k, v)| (OsStr::new(k), OsStr::new(v))))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            id,
            command: format!("{cmd:?}"),
            source,
        })?;
        let node = self.node_mut(id);
        node.child = Some(child);
        node.paused = false;
        Ok(())
    }

    /// SIGKILL, then reap (so the pid is not reused under the harness): no flush, no goodbye, only
    /// what the node had made durable survives. A node that is down is left alone.
    pub fn kill(&mut self, id: u64) -> Result<(), Error> {
        let node = self.node_mut(id);
        node.paused = false;
        if let Some(mut child) = node.child.take() {
            // Child::kill sends SIGKILL, which also ends a stopped process.
            child.kill().map_err(|source| Error::Io {
                what: format!("SIGKILL node {id}"),
                source,
            })?;
            child.wait().map_err(|source| Error::Io {
                what: format!("reaping node {id}"),
                source,
            })?;
        }
        Ok(())
    }

    /// SIGKILLs every node, going on past failures; the first is returned.
    pub fn kill_all(&mut self) -> Result<(), Error> {
        let mut first = Ok(());
        for id in self.ids() {
            if let Err(e) = self.kill(id)
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        first
    }

    /// SIGKILL and start again on the same data.
    pub fn restart(&mut self, id: u64) -> Result<(), Error> {
        self.kill(id)?;
        self.start(id)
    }

    /// SIGTERM, as an operator stops a node, and a wait for its exit; after `timeout` it is SIGKILLed
    /// and this fails. Returns how it exited (a clean stop is a success).
    pub async fn stop(&mut self, id: u64, timeout: Duration) -> Result<ExitStatus, Error> {
        self.resume(id)?;
        let pid = self.pid(id).ok_or(Error::NotRunning(id))?;
        signal(id, pid, "TERM")?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited(id)? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                self.kill(id)?;
                return Err(Error::StopTimeout { id, timeout });
            }
            tokio::time::sleep(EXIT_POLL).await;
        }
    }

    /// Waits for a node to exit on its own and returns how it ended.
    pub async fn wait_exit(&mut self, id: u64, timeout: Duration) -> Result<ExitStatus, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_running(id) {
                return Err(Error::NotRunning(id));
            }
            if let Some(status) = self.exited(id)? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(Error::StillRunning { id, timeout });
            }
            tokio::time::sleep(EXIT_POLL).await;
        }
    }

    /// Deletes a down node's data directory, as if its disk were replaced.
    pub fn wipe(&mut self, id: u64) -> Result<(), Error> {
        if self.is_running(id) {
            return Err(Error::AlreadyRunning(id));
        }
        let dir = &self.node(id).data_dir;
        std::fs::remove_dir_all(dir).map_err(|source| Error::Io {
            what: format!("removing {}", dir.display()),
            source,
        })
    }

    /// SIGSTOP: the process freezes with its sockets open, as a stalled machine or a long pause would.
    pub fn pause(&mut self, id: u64) -> Result<(), Error> {
        let pid = self.pid(id).ok_or(Error::NotRunning(id))?;
        signal(id, pid, "STOP")?;
        self.node_mut(id).paused = true;
        Ok(())
    }

    /// SIGCONT a node that [`Cluster::pause`] stopped; any other node is left alone.
    pub fn resume(&mut self, id: u64) -> Result<(), Error> {
        let node = self.node(id);
        if let (true, Some(pid)) = (node.paused, self.pid(id)) {
            signal(id, pid, "CONT")?;
        }
        self.node_mut(id).paused = false;
        Ok(())
    }

    /// What node `id` says about itself, or `None` if it does not answer within the Status deadline.
    pub async fn status(&self, id: u64) -> Option<StatusResponse> {
        let mut client = self.cluster_client(id);
        let mut req = tonic::Request::new(StatusRequest {});
        req.set_timeout(self.status_timeout);
        tokio::time::timeout(self.status_timeout + STATUS_SLACK, client.status(req))
            .await
            .ok()?
            .ok()
            .map(|r| r.into_inner())
    }

    /// The Status of every node in `ids` (asked at once), `None` for each that does not answer.
    pub async fn statuses_of(&self, ids: &[u64]) -> Vec<Option<StatusResponse>> {
        futures::future::join_all(ids.iter().map(|&id| self.status(id))).await
    }

    /// The Status of every node that answers.
    pub async fn statuses(&self) -> Vec<StatusResponse> {
        let all = self.statuses_of(&self.ids()).await;
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

    /// Waits until every node in `among` answers and names the same leader, itself one of `among`
    /// and saying that it leads.
    pub async fn wait_leader(&self, among: &[u64], timeout: Duration) -> Result<u64, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let all = self.statuses_of(among).await;
            if let Some(Some(first)) = all.first() {
                let leader = first.leader_id;
                let agreed = all
                    .iter()
                    .all(|s| s.as_ref().is_some_and(|s| s.leader_id == leader));
                let claims = all
                    .iter()
                    .flatten()
                    .any(|s| s.id == leader && s.role == "leader");
                if agreed && claims && among.contains(&leader) {
                    return Ok(leader);
                }
            }
            if Instant::now() >= deadline {
                let last: Vec<Option<u64>> = all
                    .iter()
                    .map(|s| s.as_ref().map(|s| s.leader_id))
                    .collect();
                return Err(Error::NoLeader {
                    among: among.to_vec(),
                    timeout,
                    last: format!("leaders named {last:?}"),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until node `id`'s Status satisfies `reached` (`what` names the condition in the error).
    pub async fn wait_status(
        &self,
        id: u64,
        timeout: Duration,
        what: &str,
        reached: impl Fn(&StatusResponse) -> bool,
    ) -> Result<StatusResponse, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status(id).await;
            if let Some(s) = status.as_ref().filter(|s| reached(s)) {
                return Ok(s.clone());
            }
            if Instant::now() >= deadline {
                return Err(Error::NotReached {
                    id,
                    what: what.into(),
                    timeout,
                    last: format!("{status:?}"),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until node `id` answers Status.
    pub async fn wait_ready(&self, id: u64, timeout: Duration) -> Result<StatusResponse, Error> {
        self.wait_status(id, timeout, "an answer to Status", |_| true)
            .await
    }

    /// Waits until node `id` has applied at least `index`.
    pub async fn wait_applied(
        &self,
        id: u64,
        index: u64,
        timeout: Duration,
    ) -> Result<StatusResponse, Error> {
        self.wait_status(id, timeout, &format!("applied index {index}"), |s| {
            s.applied_index >= index
        })
        .await
    }

    /// Prints the tail of every node's log to stderr.
    pub fn dump_logs(&self, lines: usize) {
        for id in self.ids() {
            let tail = self.log_tail(id, lines);
            eprintln!("----- node {id} log (last {} lines) -----", tail.len());
            for line in tail {
                eprintln!("{line}");
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs(DUMP_LINES);
        }
        let _ = self.kill_all();
    }
}

/// Sends `sig` with the `kill` command (procps), as an operator would.
fn signal(id: u64, pid: u32, sig: &'static str) -> Result<(), Error> {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .map_err(|source| Error::Io {
            what: "running kill".into(),
            source,
        })?;
    if !status.success() {
        return Err(Error::Signal {
            id,
            pid,
            signal: sig,
        });
    }
    Ok(())
}
