//! The network the nodes of a fault test talk over, and how the nemesis cuts it.
//!
//! Two modes, chosen at start-up:
//!
//! * **netns** (root): every node runs in its own network namespace with a veth on a private bridge, as
//!   separate hosts would. A partition is Jepsen's "grudge": `iptables -A INPUT -s <peer> -j DROP` inside
//!   the namespace of the node that must stop hearing that peer. Packets really vanish, so TCP stalls and
//!   gRPC deadlines fire exactly as on a real network. The harness sits on the bridge and is never in a
//!   grudge, so clients and the nemesis keep reaching every node (Jepsen does not partition clients).
//! * **proxy** (no root): nodes listen on loopback and reach each other through one TCP proxy per
//!   directed link (`raftkv server --dial`). Cutting a direction stops the proxy moving bytes that way,
//!   which to TCP looks like a blackholed path: the sender's window fills and its deadlines fire.
//!
//! A cut is directional: `(from, to)` means `to` no longer hears `from`. Symmetric partitions cut both
//! directions; "one-way" faults cut one.
//!
//! Node ids are network slots too: node `id` always has the same address, namespace and proxy links.
//! The membership nemesis starts nodes with fresh ids during the run, so the network has room for
//! more ids than the initial cluster ([`Net::max_id`]): in netns mode a node's namespace is made when
//! it is first needed ([`Net::prepare`]); in proxy mode every link between every pair of possible ids
//! is made at the start, because each node is told its routes (`--dial`) when it starts and a node
//! already running could not learn a route to a newcomer.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use raftkv_testkit::{NodeSpec, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Directed links that are cut: `(from, to)` = `to` drops what `from` sends. Node ids are 1-based.
pub type Grudge = BTreeSet<(u64, u64)>;

/// The ports every node listens on inside its own namespace: clients, and peers.
const NETNS_PORT: u16 = 7000;
const NETNS_PEER_PORT: u16 = 7100;
/// The highest node id a netns run can host: node `id` is at `10.77.s.<id>`, and `.254` is the
/// harness.
const NETNS_MAX_ID: u64 = 250;
/// The most ids a proxy run can host: it makes `ids * (ids - 1)` link listeners up front.
const PROXY_MAX_IDS: u64 = 14;

pub enum Net {
    Netns(Netns),
    Proxy(Proxy),
}

impl Net {
    /// Builds the network for `n` nodes, with room for up to `extra` more ids (fewer in proxy mode,
    /// see [`Net::max_id`]), in the requested mode (`auto`: netns when root and `ip` and `iptables`
    /// exist, else proxy).
    pub async fn create(mode: &str, n: u64, extra: u64) -> anyhow::Result<Net> {
        let mode = match mode {
            "auto" if netns_possible() => "netns",
            "auto" => "proxy",
            other => other,
        };
        match mode {
            "netns" => {
                let max_id = (n + extra).min(NETNS_MAX_ID);
                Ok(Net::Netns(Netns::create(n, max_id).await?))
            }
            "proxy" => Ok(Net::Proxy(
                Proxy::create((n + extra).min(PROXY_MAX_IDS.max(n))).await?,
            )),
            other => bail!("unknown network mode {other:?} (auto, netns or proxy)"),
        }
    }

    /// The highest node id this network has a place for: the membership nemesis stops growing the
    /// cluster once its fresh ids run out.
    pub fn max_id(&self) -> u64 {
        match self {
            Net::Netns(ns) => ns.max_id,
            Net::Proxy(p) => p.n,
        }
    }

    /// Makes node `id`'s place on the network, if it has none yet (its namespace, in netns mode).
    pub async fn prepare(&self, id: u64) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1..=self.max_id()).contains(&id),
            "node id {id} is beyond this network's {} ids",
            self.max_id()
        );
        match self {
            Net::Netns(ns) => ns.add(id).await,
            Net::Proxy(_) => Ok(()),
        }
    }

    pub fn mode(&self) -> &'static str {
        match self {
            Net::Netns(_) => "netns (a network namespace per node, iptables DROP)",
            Net::Proxy(_) => "proxy (a TCP proxy per directed link, on loopback)",
        }
    }

    /// The address the harness (and every peer, in netns mode) reaches node `id` at.
    fn addr(&self, id: u64) -> String {
        match self {
            Net::Netns(ns) => format!("{}:{NETNS_PORT}", ns.ip(id)),
            Net::Proxy(p) => format!("127.0.0.1:{}", p.ports[(id - 1) as usize]),
        }
    }

    /// Where node `id` listens for its peers.
    fn peer_addr(&self, id: u64) -> String {
        match self {
            Net::Netns(ns) => format!("{}:{NETNS_PEER_PORT}", ns.ip(id)),
            Net::Proxy(p) => format!("127.0.0.1:{}", p.peer_ports[(id - 1) as usize]),
        }
    }

    /// Where node `id` listens and how it is launched on this network. In proxy mode its routes
    /// cover every id the network has room for, members or not yet.
    pub fn node(&self, id: u64) -> NodeSpec {
        let (wrapper, args) = match self {
            // `ip netns exec` enters the namespace and then execs, so the child's pid is the node's
            // own: SIGKILL and SIGSTOP reach raftkv, not a wrapper.
            Net::Netns(ns) => (
                ["ip", "netns", "exec", &ns.ns(id)].map(String::from).into(),
                Vec::new(),
            ),
            Net::Proxy(p) => {
                let routes: Vec<String> = (1..=p.n)
                    .filter(|&j| j != id)
                    .map(|j| format!("{j}=127.0.0.1:{}", p.link_port(id, j)))
                    .collect();
                (Vec::new(), vec![format!("--dial={}", routes.join(","))])
            }
        };
        NodeSpec {
            id,
            addr: self.addr(id),
            peer_addr: self.peer_addr(id),
            wrapper,
            args,
        }
    }

    pub async fn cut(&self, grudge: &Grudge) -> anyhow::Result<()> {
        match self {
            Net::Netns(ns) => ns.cut(grudge).await,
            Net::Proxy(p) => {
                p.set_cuts(grudge.clone());
                Ok(())
            }
        }
    }

    pub async fn heal(&self) -> anyhow::Result<()> {
        match self {
            Net::Netns(ns) => ns.heal().await,
            Net::Proxy(p) => {
                p.set_cuts(Grudge::new());
                Ok(())
            }
        }
    }
}

fn netns_possible() -> bool {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let have = |tool: &str| {
        std::process::Command::new(tool)
            .arg("-V")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok()
    };
    root && have("ip") && have("iptables")
}

async fn sh(args: &[&str]) -> anyhow::Result<()> {
    let out = tokio::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .await
        .with_context(|| format!("running {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Namespaces `kvj<pid>-n<i>` on bridge `kvj<pid>-br`, subnet `10.77.<s>.0/24` (node i at `.i`, the
/// harness at `.254`). The pid in every name keeps concurrent runs apart, and `Drop` removes it all.
pub struct Netns {
    prefix: String,
    subnet: u8,
    max_id: u64,
    /// The nodes whose namespace exists.
    made: Mutex<BTreeSet<u64>>,
    /// The nodes whose namespace holds DROP rules now: a heal flushes only those, so that a run with
    /// many namespaces does not spend a second per heal on empty tables.
    cut_in: Mutex<BTreeSet<u64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Netns {
    async fn create(n: u64, max_id: u64) -> anyhow::Result<Netns> {
        let pid = std::process::id();
        let prefix = format!("kvj{}", pid % 100_000);
        let used = tokio::process::Command::new("ip")
            .args(["-o", "-4", "addr"])
            .output()
            .await
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let subnet = (0..200u32)
            .map(|k| ((pid + k) % 200 + 20) as u8)
            .find(|s| !used.contains(&format!("10.77.{s}.")))
            .context("no free 10.77.x.0/24 subnet")?;
        let ns = Netns {
            prefix,
            subnet,
            max_id,
            made: Mutex::default(),
            cut_in: Mutex::default(),
        };
        ns.teardown_blocking();
        let br = ns.bridge();
        let gw = format!("10.77.{subnet}.254/24");
        sh(&["ip", "link", "add", &br, "type", "bridge"]).await?;
        sh(&["ip", "addr", "add", &gw, "dev", &br]).await?;
        sh(&["ip", "link", "set", &br, "up"]).await?;
        for id in 1..=n {
            ns.add(id).await?;
        }
        Ok(ns)
    }

    /// Node `id`'s namespace and veth on the bridge, unless they exist.
    async fn add(&self, id: u64) -> anyhow::Result<()> {
        if lock(&self.made).contains(&id) {
            return Ok(());
        }
        let name = self.ns(id);
        let veth = format!("{}-v{id}", self.prefix);
        let ip = format!("{}/24", self.ip(id));
        let br = self.bridge();
        // Recorded first, so that teardown removes a namespace that is only half made.
        lock(&self.made).insert(id);
        sh(&["ip", "netns", "add", &name]).await?;
        sh(&[
            "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &name,
        ])
        .await?;
        sh(&["ip", "link", "set", &veth, "master", &br, "up"]).await?;
        sh(&["ip", "-n", &name, "addr", "add", &ip, "dev", "eth0"]).await?;
        sh(&["ip", "-n", &name, "link", "set", "eth0", "up"]).await?;
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]).await?;
        Ok(())
    }

    fn bridge(&self) -> String {
        format!("{}-br", self.prefix)
    }

    fn ns(&self, id: u64) -> String {
        format!("{}-n{id}", self.prefix)
    }

    fn ip(&self, id: u64) -> String {
        format!("10.77.{}.{id}", self.subnet)
    }

    async fn cut(&self, grudge: &Grudge) -> anyhow::Result<()> {
        self.heal().await?;
        for (from, to) in grudge {
            anyhow::ensure!(
                lock(&self.made).contains(to),
                "node {to} has no namespace to cut in"
            );
            lock(&self.cut_in).insert(*to);
            let (ns, src) = (self.ns(*to), self.ip(*from));
            sh(&[
                "ip", "netns", "exec", &ns, "iptables", "-w", "-A", "INPUT", "-s", &src, "-j",
                "DROP",
            ])
            .await?;
        }
        Ok(())
    }

    async fn heal(&self) -> anyhow::Result<()> {
        let cut_in = std::mem::take(&mut *lock(&self.cut_in));
        for id in cut_in {
            let ns = self.ns(id);
            sh(&["ip", "netns", "exec", &ns, "iptables", "-w", "-F", "INPUT"]).await?;
        }
        Ok(())
    }

    /// Best effort, and safe to repeat: deleting a namespace also deletes its end of the veth pair.
    fn teardown_blocking(&self) {
        let quiet = |args: &[&str]| {
            let _ = std::process::Command::new(args[0])
                .args(&args[1..])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        };
        // Also what an earlier run with the same pid prefix may have left behind.
        let listed = std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let mine = format!("{}-n", self.prefix);
        let mut names: BTreeSet<String> = listed
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|name| {
                name.strip_prefix(&mine)
                    .is_some_and(|id| id.parse::<u64>().is_ok())
            })
            .map(String::from)
            .collect();
        names.extend(lock(&self.made).iter().map(|&id| self.ns(id)));
        for name in names {
            quiet(&["ip", "netns", "del", &name]);
        }
        quiet(&["ip", "link", "del", &self.bridge()]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.teardown_blocking();
    }
}

/// One listener per directed link `a -> b` (node a's connections to node b's peer port). Bytes from a
/// to b move only while `(a, b)` is not cut; replies from b to a only while `(b, a)` is not cut.
pub struct Proxy {
    ports: Vec<u16>,
    peer_ports: Vec<u16>,
    /// `link_ports[(a-1)*n + (b-1)]`.
    link_ports: Vec<u16>,
    n: u64,
    cuts: Arc<Mutex<Grudge>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    async fn create(n: u64) -> anyhow::Result<Proxy> {
        let (mut ports, mut peer_ports) = (Vec::new(), Vec::new());
        for _ in 0..n {
            ports.push(free_port()?);
            peer_ports.push(free_port()?);
        }
        let cuts: Arc<Mutex<Grudge>> = Arc::default();
        let mut link_ports = vec![0u16; (n * n) as usize];
        let mut tasks = Vec::new();
        for a in 1..=n {
            for b in 1..=n {
                if a == b {
                    continue;
                }
                let listener = TcpListener::bind("127.0.0.1:0").await?;
                link_ports[((a - 1) * n + (b - 1)) as usize] = listener.local_addr()?.port();
                let target: SocketAddr =
                    format!("127.0.0.1:{}", peer_ports[(b - 1) as usize]).parse()?;
                tasks.push(tokio::spawn(serve_link(
                    listener,
                    target,
                    a,
                    b,
                    cuts.clone(),
                )));
            }
        }
        Ok(Proxy {
            ports,
            peer_ports,
            link_ports,
            n,
            cuts,
            tasks,
        })
    }

    fn link_port(&self, a: u64, b: u64) -> u16 {
        self.link_ports[((a - 1) * self.n + (b - 1)) as usize]
    }

    fn set_cuts(&self, grudge: Grudge) {
        *self.cuts.lock().unwrap_or_else(|p| p.into_inner()) = grudge;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn serve_link(
    listener: TcpListener,
    target: SocketAddr,
    a: u64,
    b: u64,
    cuts: Arc<Mutex<Grudge>>,
) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            // Out of file descriptors or similar: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let cuts = cuts.clone();
        tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect(target).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (ir, iw) = inbound.into_split();
            let (or, ow) = outbound.into_split();
            let up = pump(ir, ow, (a, b), cuts.clone());
            let down = pump(or, iw, (b, a), cuts);
            // When either direction ends, drop both: a half-open proxied connection helps nobody.
            tokio::select! {
                _ = up => {}
                _ = down => {}
            }
        });
    }
}

/// Copies bytes while the direction is open. While it is cut the pump neither reads nor writes, so the
/// bytes wait in kernel buffers (as unacknowledged segments wait behind a dead link) and flow again after
/// the heal, unless a deadline or keep-alive gave up on the connection first.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: (u64, u64),
    cuts: Arc<Mutex<Grudge>>,
) {
    let is_cut = || cuts.lock().map(|c| c.contains(&link)).unwrap_or(false);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while is_cut() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while is_cut() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
