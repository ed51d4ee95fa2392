//! After the faults: the final phase on the healed cluster, every check, and the verdict.
//!
//! A run passes only if every check passes *and* it exercised what it claims to: each requested fault
//! kind fired, and reads, writes and CASes each succeeded at least once. A run that proved nothing is
//! "unknown", never a pass. The nodes checked are the members at the end: a node the membership
//! nemesis removed is stopped and need not converge, but what it answered while it ran is in the
//! history and checked like the rest.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::checker::{self, Verdict};
use super::history::Outcome;
use super::nemesis::Fault;
use super::nodes::Nodes;
use super::workload::{SET_PREFIX, Shared};
use raftkv_client::pb::v1 as pb;

pub struct Inputs<'a> {
    pub nodes: &'a Nodes,
    pub shared: &'a Shared,
    pub faults: &'a [Fault],
    pub fired: BTreeMap<Fault, u64>,
    /// What the membership nemesis did: changes made, refused, timed out.
    pub membership: BTreeMap<String, u64>,
    /// Members that were not as they should be after the final heal (a node that never joined).
    pub unsettled: Vec<String>,
    pub net_mode: &'static str,
    pub seed: u64,
    pub main_phase: Duration,
    pub check_budget: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Pass,
    Unknown,
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Unknown => "UNKNOWN",
            Status::Fail => "FAIL",
        }
    }
}

/// One named check and what it found.
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
}

pub struct Report {
    pub net_mode: &'static str,
    pub seed: u64,
    pub main_phase: Duration,
    /// (f, outcome) -> count.
    pub ops: BTreeMap<(String, Outcome), u64>,
    pub fired: BTreeMap<Fault, u64>,
    pub membership: BTreeMap<String, u64>,
    /// The members at the end, and the nodes removed during the run.
    pub members: Vec<u64>,
    pub retired: Vec<u64>,
    pub checks: Vec<Check>,
    pub check_time: Duration,
}

impl Report {
    pub fn status(&self) -> Status {
        self.checks
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(Status::Unknown)
    }

    pub fn exit_code(&self) -> u8 {
        match self.status() {
            Status::Pass => 0,
            Status::Fail => 1,
            Status::Unknown => 2,
        }
    }

    pub fn print(&self) {
        println!();
        println!(
            "main phase {:.1} s, network mode {}, seed {}",
            self.main_phase.as_secs_f64(),
            self.net_mode,
            self.seed
        );
        println!("operations:");
        let fs: BTreeSet<&String> = self.ops.keys().map(|(f, _)| f).collect();
        println!("  {:<14} {:>8} {:>8} {:>8}", "op", "ok", "fail", "info");
        for f in fs {
            let n = |o| self.ops.get(&(f.clone(), o)).copied().unwrap_or(0);
            println!(
                "  {:<14} {:>8} {:>8} {:>8}",
                f,
                n(Outcome::Ok),
                n(Outcome::Fail),
                n(Outcome::Info)
            );
        }
        println!("faults injected:");
        for (f, n) in &self.fired {
            println!("  {:<20} {n}", f.name());
        }
        if !self.membership.is_empty() || !self.retired.is_empty() {
            println!("membership changes:");
            for (what, n) in &self.membership {
                println!("  {what:<42} {n}");
            }
            println!(
                "  members at the end {:?}, removed during the run {:?}",
                self.members, self.retired
            );
        }
        println!(
            "checks (checking took {:.2} s):",
            self.check_time.as_secs_f64()
        );
        for c in &self.checks {
            println!("  [{:<7}] {:<16} {}", c.status.label(), c.name, c.detail);
        }
        println!("verdict: {}", self.status().label());
    }

    pub fn json(&self) -> serde_json::Value {
        let ops: Vec<_> = self
            .ops
            .iter()
            .map(|((f, o), n)| serde_json::json!({"f": f, "outcome": o, "count": n}))
            .collect();
        let faults: serde_json::Map<String, serde_json::Value> = self
            .fired
            .iter()
            .map(|(f, n)| (f.name().to_string(), serde_json::json!(n)))
            .collect();
        let checks: Vec<_> = self
            .checks
            .iter()
            .map(|c| serde_json::json!({"name": c.name, "status": c.status.label(), "detail": c.detail}))
            .collect();
        serde_json::json!({
            "verdict": self.status().label(),
            "seed": self.seed,
            "network_mode": self.net_mode,
            "main_phase_secs": self.main_phase.as_secs_f64(),
            "check_secs": self.check_time.as_secs_f64(),
            "ops": ops,
            "faults": faults,
            "membership": self.membership,
            "members": self.members,
            "retired": self.retired,
            "checks": checks,
        })
    }
}

fn pass(name: &'static str, detail: String) -> Check {
    Check {
        name,
        status: Status::Pass,
        detail,
    }
}

fn check(name: &'static str, ok: bool, detail: String) -> Check {
    Check {
        name,
        status: if ok { Status::Pass } else { Status::Fail },
        detail,
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn request<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r
}

pub async fn verify(input: Inputs<'_>, out: &std::path::Path) -> anyhow::Result<Report> {
    let Inputs {
        nodes,
        shared,
        faults,
        fired,
        membership,
        unsettled,
        net_mode,
        seed,
        main_phase,
        check_budget,
    } = input;
    let mut checks = Vec::new();
    let check_start = Instant::now();

    // Recovery and the final phase: every node must serve a write and a strong read again.
    let leader = nodes.wait_stable(Duration::from_secs(30)).await;
    checks.push(check(
        "recovery",
        leader.is_some(),
        match leader {
            Some(l) => format!("all nodes agree on leader {l} after the heal"),
            None => "no agreed leader within 30 s of the heal".into(),
        },
    ));
    if faults.contains(&Fault::Membership) {
        checks.push(check(
            "membership",
            unsettled.is_empty(),
            if unsettled.is_empty() {
                format!(
                    "every node the harness runs is a member: {:?} (removed: {:?})",
                    nodes.members(),
                    nodes.retired()
                )
            } else {
                unsettled.join("; ")
            },
        ));
    }
    checks.push(final_ops(nodes).await);

    // Linearizability of the register, per key.
    let register_ops = lock(&shared.register_ops).clone();
    let lin_start = Instant::now();
    let report =
        tokio::task::spawn_blocking(move || checker::check(&register_ops, check_budget)).await?;
    let keys = report.per_key.len();
    let lin = match &report.verdict {
        Verdict::Linearizable => pass(
            "linearizable",
            format!(
                "{keys} register keys, all linearizable ({:.2} s)",
                lin_start.elapsed().as_secs_f64()
            ),
        ),
        Verdict::NotLinearizable { key, explanation } => {
            let bad: Vec<_> = report
                .per_key
                .iter()
                .filter(|(_, v)| matches!(v, checker::KeyVerdict::NotLinearizable { .. }))
                .map(|(k, _)| k.clone())
                .collect();
            let _ = std::fs::write(out.join("anomaly.txt"), explanation);
            Check {
                name: "linearizable",
                status: Status::Fail,
                detail: format!(
                    "NOT linearizable: {} of {keys} keys ({bad:?}); first {key}: {explanation}",
                    bad.len()
                ),
            }
        }
        Verdict::Unknown { key, reason } => Check {
            name: "linearizable",
            status: Status::Unknown,
            detail: format!("could not decide key {key}: {reason}"),
        },
    };
    checks.push(lin);

    checks.push(set_check(nodes, shared, leader).await);

    let anomalies = lock(&shared.anomalies).clone();
    checks.push(check(
        "eventual-reads",
        anomalies.is_empty(),
        if anomalies.is_empty() {
            format!(
                "{} eventual reads ({} with min_revision): no phantom values, none older than asked",
                shared.eventual_reads.load(Ordering::Relaxed),
                shared.min_revision_reads.load(Ordering::Relaxed)
            )
        } else {
            format!("{} anomalies, first: {}", anomalies.len(), anomalies[0])
        },
    ));

    checks.push(convergence(nodes).await);

    let mut crashed = nodes.unexpected_exits();
    crashed.extend(nodes.panics());
    crashed.extend(nodes.fresh_restarts());
    checks.push(check(
        "node-health",
        crashed.is_empty(),
        if crashed.is_empty() {
            "no panics, no exits the nemesis did not cause, no restart on an empty data directory"
                .into()
        } else {
            crashed.join("; ")
        },
    ));

    // Coverage: a run that never fired a fault, or never completed an operation kind, proved nothing.
    let missing: Vec<&str> = faults
        .iter()
        .filter(|f| fired.get(f).copied().unwrap_or(0) == 0)
        .map(|f| f.name())
        .collect();
    let ops = count_ops(shared);
    let no_ok: Vec<&str> = ["read", "write", "cas", "add"]
        .into_iter()
        .filter(|f| ops.get(&(f.to_string(), Outcome::Ok)).copied().unwrap_or(0) == 0)
        .collect();
    // A membership fault that was refused or timed out every time changed nothing.
    let changed = |kind: &str| {
        membership
            .iter()
            .filter(|(k, _)| k.starts_with(kind))
            .map(|(_, n)| n)
            .sum::<u64>()
    };
    let no_change =
        faults.contains(&Fault::Membership) && changed("grown") + changed("shrunk") == 0;
    let covered = missing.is_empty() && no_ok.is_empty() && !no_change;
    checks.push(Check {
        name: "coverage",
        status: if covered {
            Status::Pass
        } else {
            Status::Unknown
        },
        detail: if covered {
            format!(
                "every requested fault fired ({} in all); every operation kind succeeded",
                fired.values().sum::<u64>()
            )
        } else {
            format!(
                "faults that never fired: {missing:?}; operation kinds with no ok: {no_ok:?}{}",
                if no_change {
                    "; no membership change was made"
                } else {
                    ""
                }
            )
        },
    });

    Ok(Report {
        net_mode,
        seed,
        main_phase,
        ops,
        fired,
        membership,
        members: nodes.members(),
        retired: nodes.retired(),
        checks,
        check_time: check_start.elapsed(),
    })
}

fn count_ops(shared: &Shared) -> BTreeMap<(String, Outcome), u64> {
    let mut ops = BTreeMap::new();
    for op in shared.history.ops() {
        *ops.entry((op.f.to_string(), op.outcome)).or_default() += 1;
    }
    ops
}

/// Retries `attempt` until it succeeds or 15 s pass: after a heal, channels reconnect with backoff and
/// a node may still be catching up.
async fn until_ok<T, F, Fut>(mut attempt: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn final_ops(nodes: &Nodes) -> Check {
    let mut failures = Vec::new();
    for id in nodes.members() {
        let key = format!("final/{id}").into_bytes();
        let value = format!("final-{id}").into_bytes();
        let write = until_ok(|| {
            let mut kv = nodes.kv(id);
            let req = pb::PutRequest {
                key: key.clone(),
                value: value.clone(),
                prev_kv: false,
                lease: 0,
            };
            async move {
                kv.put(request(req, Duration::from_secs(2)))
                    .await
                    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
            }
        })
        .await;
        if let Err(e) = write {
            failures.push(format!("write via node {id}: {e}"));
            continue;
        }
        let read = until_ok(|| {
            let mut kv = nodes.kv(id);
            let req = pb::GetRequest {
                key: key.clone(),
                consistency: pb::Consistency::Strong as i32,
                min_revision: 0,
            };
            async move {
                kv.get(request(req, Duration::from_secs(2)))
                    .await
                    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
            }
        })
        .await;
        match read {
            Ok(r) if r.get_ref().kv.as_ref().map(|kv| &kv.value) == Some(&value) => {}
            Ok(r) => failures.push(format!(
                "strong read via node {id} after its own write returned {:?}",
                r.get_ref().kv
            )),
            Err(e) => failures.push(format!("strong read via node {id}: {e}")),
        }
    }
    check(
        "final-ops",
        failures.is_empty(),
        if failures.is_empty() {
            format!(
                "a write and a strong read succeeded through each of the {} nodes",
                nodes.members().len()
            )
        } else {
            failures.join("; ")
        },
    )
}

/// Every pair in `[start, end)` as one node sees it, page by page.
async fn scan_all(
    nodes: &Nodes,
    id: u64,
    start: &[u8],
    end: &[u8],
    consistency: pb::Consistency,
    min_revision: u64,
) -> Result<Vec<pb::KeyValue>, String> {
    let mut all = Vec::new();
    let mut from = start.to_vec();
    loop {
        let req = pb::ScanRequest {
            start: from.clone(),
            end: end.to_vec(),
            limit: 10_000,
            consistency: consistency as i32,
            min_revision,
        };
        let r = nodes
            .kv(id)
            .scan(request(req, Duration::from_secs(5)))
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        let more = r.more;
        if let Some(last) = r.kvs.last() {
            from = last.key.clone();
            from.push(0);
        }
        all.extend(r.kvs);
        if !more {
            return Ok(all);
        }
    }
}

/// Every acknowledged add is present; nothing is present that was never attempted, and every element
/// holds the value it was written with.
async fn set_check(nodes: &Nodes, shared: &Shared, leader: Option<u64>) -> Check {
    // Node 1 may have been removed (the membership nemesis), so without a leader: the first member.
    let via = leader
        .or_else(|| nodes.members().first().copied())
        .unwrap_or(1);
    let end = {
        let mut e = SET_PREFIX.as_bytes().to_vec();
        if let Some(last) = e.last_mut() {
            *last += 1;
        }
        e
    };
    let scanned = until_ok(|| {
        scan_all(
            nodes,
            via,
            SET_PREFIX.as_bytes(),
            &end,
            pb::Consistency::Strong,
            0,
        )
    })
    .await;
    let kvs = match scanned {
        Ok(kvs) => kvs,
        Err(e) => {
            return Check {
                name: "set",
                status: Status::Unknown,
                detail: format!("final strong scan failed: {e}"),
            };
        }
    };
    let attempted = lock(&shared.set_attempted).clone();
    let acked = lock(&shared.set_acked).clone();
    let mut present = BTreeSet::new();
    let mut unexpected = Vec::new();
    for kv in &kvs {
        let key = String::from_utf8_lossy(&kv.key);
        let e: Option<u64> = key
            .strip_prefix(SET_PREFIX)
            .and_then(|s| s.parse().ok())
            .filter(|e| attempted.contains(e))
            .filter(|e| kv.value == e.to_string().into_bytes());
        match e {
            Some(e) => {
                present.insert(e);
            }
            None => unexpected.push(key.into_owned()),
        }
    }
    let lost: Vec<u64> = acked.difference(&present).copied().collect();
    let recovered = present.difference(&acked).count();
    check(
        "set",
        lost.is_empty() && unexpected.is_empty(),
        format!(
            "{} acknowledged adds, {} present at the end; lost {} {}; unexpected {} {}; {} unacknowledged \
             adds took effect",
            acked.len(),
            present.len(),
            lost.len(),
            if lost.is_empty() {
                String::new()
            } else {
                format!("{:?}", &lost[..lost.len().min(10)])
            },
            unexpected.len(),
            if unexpected.is_empty() {
                String::new()
            } else {
                format!("{:?}", &unexpected[..unexpected.len().min(10)])
            },
            recovered
        ),
    )
}

/// After the heal every member must hold exactly the same data at the same revision.
async fn convergence(nodes: &Nodes) -> Check {
    let members = nodes.members();
    let result = until_ok(|| async {
        let statuses: Vec<_> = nodes
            .statuses_of(&members)
            .await
            .into_iter()
            .flatten()
            .collect();
        if statuses.len() != members.len() {
            return Err("not every node answers Status".to_string());
        }
        let target = statuses.iter().map(|s| s.commit_index).max().unwrap_or(0);
        let mut first: Option<(u64, Vec<pb::KeyValue>)> = None;
        for &id in &members {
            let kvs = scan_all(nodes, id, b"", b"", pb::Consistency::Eventual, target).await?;
            match &first {
                None => first = Some((id, kvs)),
                Some((fid, fkvs)) if *fkvs != kvs => {
                    return Err(format!(
                        "node {id} holds {} pairs, node {fid} holds {}; they differ",
                        kvs.len(),
                        fkvs.len()
                    ));
                }
                Some(_) => {}
            }
        }
        Ok((target, first.map_or(0, |(_, kvs)| kvs.len())))
    })
    .await;
    match result {
        Ok((revision, pairs)) => pass(
            "convergence",
            format!(
                "all {} nodes hold the same {pairs} pairs at revision {revision}",
                members.len()
            ),
        ),
        Err(e) => check("convergence", false, e),
    }
}
