//! `raftkv jepsen` (the `raftkv-jepsen` binary): a Jepsen-style fault test of the real release binary.
//!
//! It starts a fresh cluster of separate `raftkv server` processes, runs concurrent clients on every node
//! while the [`nemesis`] partitions, kills and pauses nodes from outside and adds and removes members,
//! records every operation in a
//! [`history`], and then checks it: linearizability per register key ([`checker`]), no lost or invented
//! set elements, no phantom or too-old eventual reads, replicas that converge after the heal, operations
//! that work again after the heal, and no node that crashed on its own. Exit status: 0 pass, 1 anomaly,
//! 2 unknown (the run proved nothing: a fault kind never fired, the checker ran out of budget, or the
//! harness itself failed).

pub mod checker;
pub mod history;
pub mod nemesis;
pub mod net;
pub mod nodes;
pub mod verify;
pub mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use history::History;
use nemesis::Fault;
use net::Net;
use nodes::Nodes;
use workload::{Settings, Shared};

#[derive(clap::Args, Debug, Clone)]
pub struct JepsenArgs {
    /// Cluster size.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(3..=9))]
    pub nodes: u64,
    /// Seconds of the main phase, during which faults come and go.
    #[arg(long, default_value_t = 60)]
    pub time: u64,
    /// Fault kinds, comma-separated: all, partition (the four partition kinds), partition-leader,
    /// partition-halves, partition-bridge, partition-one-way, kill, pause, pause-reads, crash-all,
    /// clock (needs libfaketime), membership (not with --tls), power-loss (needs root and
    /// /dev/fuse: every data directory is then on a filesystem that loses what was not fsynced).
    #[arg(long, default_value = "all", value_delimiter = ',')]
    pub nemesis: Vec<String>,
    /// How partitions are made: netns (root: a network namespace per node, iptables), proxy (a TCP proxy
    /// per link, no root needed), or auto (netns when possible).
    #[arg(long, default_value = "auto")]
    pub net: String,
    /// Fixes fault choices, targets and the operation mix (not timing). Random when absent.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Register clients (read/write/cas), spread over the nodes. Keep per-key concurrency <= 10: the
    /// checker's cost grows quickly with it.
    #[arg(long, default_value_t = 6)]
    pub register_clients: u64,
    /// Set clients (adds of fresh keys through random nodes).
    #[arg(long, default_value_t = 2)]
    pub set_clients: u64,
    /// Eventual readers (random nodes, half of the reads with min_revision).
    #[arg(long, default_value_t = 2)]
    pub eventual_clients: u64,
    /// Register operations per key before the clients move to a fresh key.
    #[arg(long, default_value_t = 150)]
    pub ops_per_key: u64,
    /// Deadline of each client request.
    #[arg(long, default_value_t = 1000)]
    pub request_timeout_ms: u64,
    /// Each client sleeps up to this long between operations.
    #[arg(long, default_value_t = 20)]
    pub stagger_ms: u64,
    /// Healthy seconds between faults, MIN-MAX.
    #[arg(long, default_value = "1.5-3")]
    pub healthy: String,
    /// Seconds a fault stays installed, MIN-MAX.
    #[arg(long, default_value = "2.5-4.5")]
    pub hold: String,
    /// Time the linearizability checker may spend, in seconds, before it says "unknown".
    #[arg(long, default_value_t = 120)]
    pub check_budget: u64,
    /// Where the history, the summary and the node logs go (default: a new directory under $TMPDIR).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The raftkv binary to test (default: the `raftkv` next to this binary).
    #[arg(long)]
    pub bin: Option<PathBuf>,
    /// Extra `raftkv server` arguments for every node, e.g. `--node-arg=--heartbeat-ms=30`.
    #[arg(long = "node-arg", allow_hyphen_values = true)]
    pub node_args: Vec<String>,
    /// Keep the nodes' data directories even when the run passes.
    #[arg(long)]
    pub keep_data: bool,
    /// Run the whole cluster over TLS, clients and peers: certificates made with `raftkv certs`
    /// logic go into `tls/` in the output directory.
    #[arg(long)]
    pub tls: bool,
    /// Harness self-test: send register reads as EVENTUAL but check them as linearizable. With
    /// partitions this must be reported as NOT linearizable; if it passes, the harness is blind.
    #[arg(long)]
    pub unsafe_eventual_as_strong: bool,
}

fn parse_range(s: &str) -> anyhow::Result<(Duration, Duration)> {
    let (lo, hi) = s.split_once('-').unwrap_or((s, s));
    let secs = |x: &str| -> anyhow::Result<Duration> {
        let v: f64 = x
            .trim()
            .parse()
            .with_context(|| format!("{x:?} is not seconds"))?;
        anyhow::ensure!((0.0..3600.0).contains(&v), "{v} s is out of range");
        Ok(Duration::from_secs_f64(v))
    };
    let (lo, hi) = (secs(lo)?, secs(hi)?);
    anyhow::ensure!(lo <= hi, "range {s:?} is backwards");
    Ok((lo, hi))
}

/// The requested fault kinds. `all` leaves out `clock` when libfaketime is missing, `membership`
/// with `--tls`, and `power-loss` where FUSE cannot be mounted, and says so; asking for one of those
/// by name then is an error rather than a silently weaker run. A joining node (`--join`) asks the cluster to add it over the public port, and
/// the harness's certificates are made for the initial nodes only, so membership needs plaintext.
fn parse_faults(names: &[String], tls: bool) -> anyhow::Result<Vec<Fault>> {
    parse_faults_with(names, tls, raftkv_lossyfs::available())
}

fn parse_faults_with(
    names: &[String],
    tls: bool,
    fuse: Result<(), String>,
) -> anyhow::Result<Vec<Fault>> {
    let have_faketime = std::path::Path::new(nemesis::LIBFAKETIME).exists();
    let mut faults = Vec::new();
    for name in names.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        if name == "all" {
            faults.extend(nemesis::ALL);
            if !have_faketime {
                faults.retain(|f| *f != Fault::Clock);
                println!(
                    "clock fault left out: {} is missing (apt-get install libfaketime)",
                    nemesis::LIBFAKETIME
                );
            }
            if tls {
                faults.retain(|f| *f != Fault::Membership);
                println!("membership fault left out: it needs a plaintext cluster (no --tls)");
            }
            if let Err(why) = &fuse {
                faults.retain(|f| *f != Fault::PowerLoss);
                println!("power-loss fault left out: {why}");
            }
        } else if name == "partition" {
            faults.extend(nemesis::PARTITIONS);
        } else if name != "none" {
            let fault = name.parse::<Fault>().map_err(anyhow::Error::msg)?;
            anyhow::ensure!(
                fault != Fault::Clock || have_faketime,
                "the clock fault needs {} (apt-get install libfaketime)",
                nemesis::LIBFAKETIME
            );
            anyhow::ensure!(
                fault != Fault::Membership || !tls,
                "the membership fault needs a plaintext cluster (no --tls)"
            );
            if let (Fault::PowerLoss, Err(why)) = (fault, &fuse) {
                anyhow::bail!("the power-loss fault cannot run here: {why}");
            }
            faults.push(fault);
        }
    }
    faults.sort();
    faults.dedup();
    Ok(faults)
}

/// Fresh ids a run with the membership fault can hand out: about one grow in every 2 * 10 faults, so
/// this covers hours of faults in netns mode.
const MEMBERSHIP_IDS: u64 = 60;

/// Runs a whole fault test and returns the process exit code (0 pass, 1 anomaly, 2 unknown).
pub async fn run(args: JepsenArgs) -> anyhow::Result<std::process::ExitCode> {
    let faults = parse_faults(&args.nemesis, args.tls)?;
    let healthy = parse_range(&args.healthy)?;
    let hold = parse_range(&args.hold)?;
    let seed = args.seed.unwrap_or_else(rand::random);
    let bin = match &args.bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()
            .context("locating the raftkv binary")?
            .with_file_name("raftkv"),
    };
    let out = match &args.out {
        Some(dir) => dir.clone(),
        None => {
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            std::env::temp_dir().join(format!("raftkv-jepsen-{stamp}-{seed}"))
        }
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    // Room for the fresh ids the membership nemesis hands out (proxy mode has less; the nemesis stops
    // growing the cluster when they run out).
    let extra = if faults.contains(&Fault::Membership) {
        MEMBERSHIP_IDS
    } else {
        0
    };
    let net = Net::create(&args.net, args.nodes, extra).await?;
    println!(
        "raftkv jepsen: {} nodes, {} s of faults [{}], seed {seed}",
        args.nodes,
        args.time,
        faults
            .iter()
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("network mode: {}", net.mode());
    println!("output: {}", out.display());

    let mut node_args = args.node_args.clone();
    // Small snapshots and log tails, so ordinary runs also exercise snapshot building and install.
    if !node_args.iter().any(|a| a.starts_with("--snapshot-every")) {
        node_args.push("--snapshot-every=300".into());
    }
    if !node_args.iter().any(|a| a.starts_with("--keep-logs")) {
        node_args.push("--keep-logs=100".into());
    }
    let power_loss = faults.contains(&Fault::PowerLoss);
    if power_loss {
        println!(
            "power loss: every data directory on lossyfs (stores in {})",
            out.join("lossyfs").display()
        );
    }
    let mut nodes = Nodes::new(
        &net, args.nodes, &bin, &out, node_args, args.tls, power_loss,
    )?;
    if let Some(dir) = nodes.tls_dir() {
        println!("TLS: clients and peers, certificates in {}", dir.display());
    }
    for id in 1..=args.nodes {
        nodes.start(id)?;
    }
    let nodes = tokio::sync::Mutex::new(nodes);
    let report = drive(&args, &faults, healthy, hold, seed, &net, &nodes, &out).await;
    let _ = nodes.lock().await.kill_all();
    // A failed run keeps its data, written out of the stores as ordinary directories.
    let keep = args.keep_data || report.as_ref().map_or(true, |r| r.exit_code() != 0);
    if let Err(e) = nodes.lock().await.unmount_all(keep) {
        println!("unmounting the lossyfs data directories failed: {e:#}");
    }
    let report = report?;
    report.print();
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_vec_pretty(&report.json())?,
    )?;
    println!("history: {}", out.join("history.jsonl").display());
    let code = report.exit_code();
    if code == 0 && !args.keep_data {
        let nodes = nodes.lock().await;
        for id in nodes.ids() {
            let _ = std::fs::remove_dir_all(nodes.data_dir(id));
        }
    }
    Ok(std::process::ExitCode::from(code))
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    args: &JepsenArgs,
    faults: &[Fault],
    healthy: (Duration, Duration),
    hold: (Duration, Duration),
    seed: u64,
    net: &Net,
    nodes: &tokio::sync::Mutex<Nodes>,
    out: &std::path::Path,
) -> anyhow::Result<verify::Report> {
    let started = std::time::Instant::now();
    let leader = nodes
        .lock()
        .await
        .wait_stable(Duration::from_secs(30))
        .await;
    anyhow::ensure!(
        leader.is_some(),
        "the cluster did not elect a leader within 30 s of starting; see the node logs in {}",
        out.display()
    );

    let history = Arc::new(History::new());
    let clients = {
        let nodes = nodes.lock().await;
        nodes
            .members()
            .into_iter()
            .map(|id| (id, nodes.kv(id)))
            .collect()
    };
    let shared = Arc::new(Shared::new(
        history.clone(),
        clients,
        Settings {
            request_timeout: Duration::from_millis(args.request_timeout_ms),
            ops_per_key: args.ops_per_key,
            stagger: Duration::from_millis(args.stagger_ms),
            eventual_as_strong: args.unsafe_eventual_as_strong,
        },
    ));
    let mut workers = Vec::new();
    for i in 0..args.register_clients {
        let s = seed.wrapping_add(1000 + i);
        workers.push(tokio::spawn(workload::register_client(
            shared.clone(),
            i,
            s,
        )));
    }
    for i in 0..args.set_clients {
        let s = seed.wrapping_add(2000 + i);
        workers.push(tokio::spawn(workload::set_client(shared.clone(), s)));
    }
    for i in 0..args.eventual_clients {
        let s = seed.wrapping_add(3000 + i);
        workers.push(tokio::spawn(workload::eventual_client(shared.clone(), s)));
    }

    let until = tokio::time::Instant::now() + Duration::from_secs(args.time);
    let mut membership = nemesis::membership::State::new(args.nodes, faults);
    let fired = if faults.is_empty() {
        tokio::time::sleep_until(until).await;
        BTreeMap::new()
    } else {
        nemesis::run(
            faults.to_vec(),
            nemesis::Schedule { healthy, hold },
            seed,
            net,
            nodes,
            shared.clone(),
            until,
            &mut membership,
        )
        .await?
    };
    tokio::time::sleep_until(until).await;
    shared.stop();
    for w in workers {
        let _ = w.await;
    }
    let main_phase = started.elapsed();

    // Heal everything: links, paused and dead nodes.
    net.heal().await?;
    {
        let mut nodes = nodes.lock().await;
        for id in nodes.members() {
            nodes.resume(id)?;
            if !nodes.is_running(id) {
                nodes.start(id)?;
            }
        }
        nodes.reap_unexpected()?;
    }
    // Removals that had not gone through when the faults ended, and nodes still joining.
    let unsettled = if faults.contains(&Fault::Membership) {
        nemesis::membership::settle(nodes, &shared, &mut membership).await?
    } else {
        Vec::new()
    };
    history.write_jsonl(&out.join("history.jsonl"))?;
    let nodes = nodes.lock().await;
    verify::verify(
        verify::Inputs {
            nodes: &nodes,
            shared: &shared,
            faults,
            fired,
            membership: membership.stats.clone(),
            unsettled,
            net_mode: net.mode(),
            seed,
            main_phase,
            check_budget: Duration::from_secs(args.check_budget),
        },
        out,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn partition_names_the_four_partition_kinds() {
        let faults = parse_faults(&names(&["membership", "partition", "kill"]), false).unwrap();
        let mut want = nemesis::PARTITIONS.to_vec();
        want.extend([Fault::Kill, Fault::Membership]);
        want.sort();
        assert_eq!(faults, want);
    }

    #[test]
    fn power_loss_needs_fuse() {
        let no = || Err("no /dev/fuse".to_string());
        assert!(
            !parse_faults_with(&names(&["all"]), false, no())
                .unwrap()
                .contains(&Fault::PowerLoss)
        );
        assert!(
            parse_faults_with(&names(&["all"]), false, Ok(()))
                .unwrap()
                .contains(&Fault::PowerLoss)
        );
        assert!(parse_faults_with(&names(&["power-loss"]), false, no()).is_err());
    }

    #[test]
    fn all_has_membership_except_with_tls() {
        assert!(
            parse_faults(&names(&["all"]), false)
                .unwrap()
                .contains(&Fault::Membership)
        );
        assert!(
            !parse_faults(&names(&["all"]), true)
                .unwrap()
                .contains(&Fault::Membership)
        );
        assert_eq!(
            parse_faults(&names(&["membership"]), false).unwrap(),
            vec![Fault::Membership]
        );
        assert!(parse_faults(&names(&["membership"]), true).is_err());
    }
}
