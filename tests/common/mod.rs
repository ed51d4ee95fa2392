//! What the integration tests share: the process cluster of `raftkv-testkit` (the release binary,
//! loopback sockets on free ports, data directories under a temp dir, logs printed when a test
//! fails) with every action unwrapped, the clients that speak to a node's peer port in a member's
//! name, and small request helpers.

#![allow(dead_code)]

pub mod http;

use std::path::{Path, PathBuf};
use std::time::Duration;

use raftkv::pb::internal::raft_client::RaftClient;
use raftkv::pb::v1 as pb;
use tokio::time::Instant;
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;

pub type PeerRpc = RaftClient<InterceptedService<Channel, raftkv::network::identity::PeerIdentity>>;
pub type ForwardRpc = raftkv::pb::internal::forward_client::ForwardClient<
    InterceptedService<Channel, raftkv::network::identity::PeerIdentity>,
>;

/// The cluster under test: [`raftkv_testkit::Cluster`], whose every action a test unwraps here so a
/// failure panics with the reason (and the testkit prints the nodes' logs when it does).
pub struct Cluster {
    kit: raftkv_testkit::Cluster,
}

impl std::ops::Deref for Cluster {
    type Target = raftkv_testkit::Cluster;
    fn deref(&self) -> &raftkv_testkit::Cluster {
        &self.kit
    }
}

impl std::ops::DerefMut for Cluster {
    fn deref_mut(&mut self) -> &mut raftkv_testkit::Cluster {
        &mut self.kit
    }
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

/// How long a node may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

impl Cluster {
    /// Starts `n` nodes (ids 1..=n) on loopback with the given extra server flags.
    pub fn start(n: u64, extra: &[&str]) -> Cluster {
        Cluster::start_with_env(n, extra, &[])
    }

    /// Starts `n` nodes with extra server flags and environment variables.
    pub fn start_with_env(n: u64, extra: &[&str], env: &[(&str, &str)]) -> Cluster {
        let builder = env
            .iter()
            .fold(Cluster::builder(n, extra), |b, (k, v)| b.env(*k, *v));
        Cluster::started(builder)
    }

    /// Starts `n` nodes with TLS on both ports (certificates made for the test, in `tls/` of the
    /// cluster's directory); the harness' own clients dial with the set's client certificate.
    pub fn start_tls(n: u64, extra: &[&str]) -> Cluster {
        Cluster::started(Cluster::builder(n, extra).tls_generate("raftkv test"))
    }

    /// `n` nodes of the binary under test on loopback, with extra server flags, for a test to set up
    /// further.
    pub fn builder(n: u64, extra: &[&str]) -> raftkv_testkit::Builder {
        raftkv_testkit::Cluster::builder(bin())
            .nodes(raftkv_testkit::loopback(n).expect("free ports"))
            .args(extra.iter().copied())
    }

    /// The cluster, every node started.
    pub fn started(builder: raftkv_testkit::Builder) -> Cluster {
        Cluster {
            kit: builder.start().expect("start the cluster"),
        }
    }

    /// The cluster with no node started yet (its data directories may be laid out first).
    pub fn unstarted(builder: raftkv_testkit::Builder) -> Cluster {
        Cluster {
            kit: builder.build().expect("set up the cluster"),
        }
    }

    /// The cluster id its nodes derive at bootstrap (the default `--cluster-token`).
    pub fn cluster_id(&self) -> raftkv::network::identity::ClusterId {
        let members = self
            .ids()
            .into_iter()
            .map(|id| {
                let member = raftkv::types::Member::new(self.addr(id), self.peer_addr(id));
                (id, member)
            })
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

    pub fn client(&self) -> raftkv_client::Client {
        let tls = self.client_tls().cloned();
        raftkv_client::Client::with_tls(&self.endpoints(), Duration::from_secs(10), tls)
            .expect("client")
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self, id: u64) {
        self.kit.kill(id).expect("kill");
    }

    pub fn restart(&mut self, id: u64) {
        self.kit.restart(id).expect("restart");
    }

    /// SIGTERM, as an operator stops a node, and wait (bounded) for a clean exit.
    pub async fn stop(&mut self, id: u64) {
        let status = self.kit.stop(id, STOP_TIMEOUT).await.expect("stop");
        assert!(status.success(), "node {id} stopped with {status}");
    }

    /// Starts a node that is down (after `stop` or `kill`) on its data.
    pub fn start_again(&mut self, id: u64) {
        self.kit.start(id).expect("start");
    }

    /// Deletes a stopped node's data directory, as if its disk were replaced.
    pub fn wipe(&mut self, id: u64) {
        self.kit
            .wipe(id)
            .expect("wipe a node only while it is down");
    }

    pub fn pause(&mut self, id: u64) {
        self.kit.pause(id).expect("SIGSTOP");
    }

    pub fn resume(&mut self, id: u64) {
        assert!(self.is_running(id), "node {id} is not running");
        self.kit.resume(id).expect("SIGCONT");
    }

    /// Waits (bounded) for a node to exit on its own and returns how it ended.
    pub async fn wait_exit(&mut self, id: u64, timeout: Duration) -> std::process::ExitStatus {
        self.kit.wait_exit(id, timeout).await.expect("exit")
    }

    /// Waits until every node in `among` reports the same leader, itself one of `among`.
    pub async fn wait_leader(&self, among: &[u64], timeout: Duration) -> u64 {
        match self.kit.wait_leader(among, timeout).await {
            Ok(leader) => leader,
            Err(e) => panic!("{e}"),
        }
    }

    /// Waits until node `id` has purged its log past `index`, so a node behind it can only catch up
    /// by snapshot.
    pub async fn wait_purged(&self, id: u64, index: u64, timeout: Duration) {
        eventually(timeout, "the log is purged", || async {
            match self.status(id).await {
                Some(s) if s.first_log_index > index => Ok(()),
                _ => Err(tonic::Status::unavailable("not yet")),
            }
        })
        .await;
    }

    /// Waits until node `id` has applied at least `index`.
    pub async fn wait_applied(&self, id: u64, index: u64, timeout: Duration) -> pb::StatusResponse {
        match self.kit.wait_applied(id, index, timeout).await {
            Ok(status) => status,
            Err(e) => panic!("{e}"),
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
        lease: 0,
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
