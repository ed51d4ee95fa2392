//! `raftkv bench` against a real three-node cluster: every workload runs, reports requests and no
//! errors, and writes JSON that says what it measured. No speed is asserted: the machine is shared.

mod common;

use std::process::Command;
use std::time::Duration;

use common::Cluster;

const SECOND: Duration = Duration::from_secs(1);

fn bench(cluster: &Cluster, args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_raftkv"))
        .arg("bench")
        .args(args)
        .args([
            "--endpoints",
            &cluster.endpoints().join(","),
            "--clients",
            "8",
            "--connections",
            "3",
            "--key-space",
            "200",
            "--value-size",
            "64",
            "--quiet",
            "--json",
            "-",
        ])
        .output()
        .expect("run raftkv bench");
    assert!(
        out.status.success(),
        "raftkv bench {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bench {args:?} printed invalid JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_workload_runs_without_errors_and_reports_json() {
    let c = Cluster::start(3, &[]);
    c.wait_leader(&c.ids(), 20 * SECOND).await;
    for args in [
        &["put", "--duration", "2s"][..],
        &["get", "--duration", "1s"],
        &["get", "--consistency", "eventual", "--duration", "1s"],
        &["txn", "--duration", "1s"],
        &["mix", "--read-percent", "50", "--total", "300"],
    ] {
        let r = bench(&c, args);
        assert_eq!(r["workload"], args[0], "{r}");
        assert_eq!(r["target"], "raftkv");
        let ops = r["ops"].as_u64().expect("ops");
        assert!(ops > 0, "{args:?} did no work: {r}");
        assert_eq!(
            r["errors"].as_object().map(|e| e.len()),
            Some(0),
            "{args:?}: {r}"
        );
        let lat = &r["latency_us"];
        for q in ["p50", "p90", "p99", "p999", "max"] {
            assert!(lat[q].as_u64().is_some_and(|v| v > 0), "{q} in {r}");
        }
        assert!(lat["p50"].as_u64() <= lat["p99"].as_u64(), "{r}");
        assert!(lat["p99"].as_u64() <= lat["max"].as_u64(), "{r}");
        if args[0] == "txn" {
            // Clients own disjoint keys, so on a healthy cluster every compare holds.
            assert_eq!(r["cas_failed"], 0, "{r}");
        }
        if args.contains(&"--total") {
            assert_eq!(ops, 300, "--total is exact: {r}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_and_probe_helpers_work() {
    let c = Cluster::start(3, &[]);
    let leader = c.wait_leader(&c.ids(), 20 * SECOND).await;
    let out = Command::new(env!("CARGO_BIN_EXE_raftkv"))
        .args(["bench", "leader", "--endpoints", &c.endpoints().join(",")])
        .output()
        .expect("run raftkv bench leader");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), c.addr(leader));

    let out = Command::new(env!("CARGO_BIN_EXE_raftkv"))
        .args(["bench", "probe", "--endpoints", &c.endpoints().join(",")])
        .output()
        .expect("run raftkv bench probe");
    assert!(out.status.success());
    let ms: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("probe prints milliseconds");
    assert!(ms >= 0.0);
}
