//! Bounded responses and bounded waiting, on real processes: a scan stops at `--max-response-bytes`
//! and the CLI pages through the rest, a txn whose results would not fit is refused before it is
//! proposed, an oversized `limit` is refused, and reads parked on `min_revision` are capped.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Cluster, bin, eventually, req};
use prost::Message;
use raftkv::pb::v1 as pb;

const CAP: usize = 256 * 1024;
const VALUE: usize = 10 * 1024;
const PAIRS: usize = 300;

fn value(i: usize) -> Vec<u8> {
    let mut v = format!("{i:05}").into_bytes();
    v.resize(VALUE, b'x');
    v
}

async fn fill(cluster: &Cluster) {
    let client = cluster.client();
    for i in 0..PAIRS {
        client
            .put(format!("k{i:05}").into_bytes(), value(i), false)
            .await
            .expect("put");
    }
}

fn cli(cluster: &Cluster, args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .args(args)
        .arg("--endpoints")
        .arg(cluster.endpoints().join(","))
        .stdin(Stdio::null())
        .output()
        .expect("run the CLI")
}

#[tokio::test]
async fn a_scan_stops_at_the_byte_cap_and_the_cli_pages_through_the_rest() {
    let cluster = Cluster::start(
        3,
        &[
            "--max-response-bytes",
            &CAP.to_string(),
            "--max-value-bytes",
            "65536",
        ],
    );
    cluster
        .wait_leader(&[1, 2, 3], Duration::from_secs(10))
        .await;
    fill(&cluster).await;

    let t = Duration::from_secs(5);
    let scan = pb::ScanRequest {
        start: b"k".to_vec(),
        end: vec![],
        limit: 0,
        consistency: pb::Consistency::Strong as i32,
        min_revision: 0,
    };
    let r = cluster
        .kv(1)
        .scan(req(scan.clone(), t))
        .await
        .expect("scan")
        .into_inner();
    let bytes = r.encoded_len();
    assert!(
        bytes < CAP,
        "a scan response of {bytes} bytes passed the cap"
    );
    assert!(r.more, "the cap cut the scan short, so more must be set");
    // 300 x 10 KiB is about 3 MiB: the default limit (1000) would return them all without the cap.
    assert!(
        !r.kvs.is_empty() && r.kvs.len() < PAIRS,
        "{} pairs in one capped response",
        r.kvs.len()
    );
    assert!(
        bytes > CAP / 2,
        "the cap should be used, not undershot: {bytes}"
    );

    // The CLI pages: every pair, in order, once.
    let out = cli(&cluster, &["scan", "k"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let keys: Vec<&str> = text
        .lines()
        .map(|l| l.split('\t').next().unwrap_or(""))
        .collect();
    let want: Vec<String> = (0..PAIRS).map(|i| format!("k{i:05}")).collect();
    assert_eq!(keys, want, "the CLI's scan is not every key once, in order");
    for (i, line) in text.lines().enumerate() {
        let value = line.split('\t').nth(1).unwrap_or("");
        assert_eq!(value.len(), VALUE, "line {i}");
        assert!(value.starts_with(&format!("{i:05}")), "line {i}");
    }

    // --limit across pages, and --json.
    let out = cli(&cluster, &["scan", "k", "--limit", "250", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        json["kvs"].as_array().map(Vec::len),
        Some(250),
        "{json:.200}"
    );
    assert_eq!(json["more"], true);
    assert_eq!(json["kvs"][249]["key"], "k00249");
    let out = cli(
        &cluster,
        &["scan", "k", "--json", "--consistency", "eventual"],
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["kvs"].as_array().map(Vec::len), Some(PAIRS));
    assert_eq!(json["more"], false);

    // A limit above the maximum is refused, not clamped.
    let mut too_many = scan.clone();
    too_many.limit = 10_001;
    let err = cluster
        .kv(2)
        .scan(req(too_many, t))
        .await
        .expect_err("limit above the maximum");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("10000"), "{err:?}");
    let mut at_max = scan;
    at_max.limit = 10_000;
    cluster
        .kv(2)
        .scan(req(at_max, t))
        .await
        .expect("the maximum itself is fine");
}

/// A value larger than the byte budget left after the first pair still comes back, one per page.
#[tokio::test]
async fn values_near_the_cap_still_make_progress() {
    let cluster = Cluster::start(
        1,
        &[
            "--max-response-bytes",
            "200000",
            "--max-value-bytes",
            "150000",
        ],
    );
    let client = cluster.client();
    for i in 0..3 {
        eventually(Duration::from_secs(10), "put", || {
            client.put(format!("big{i}").into_bytes(), vec![b'v'; 150_000], false)
        })
        .await;
    }
    let out = cli(&cluster, &["scan", "big"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
}

#[tokio::test]
async fn a_txn_whose_results_would_pass_the_cap_is_refused_before_it_is_proposed() {
    let cluster = Cluster::start(
        3,
        &[
            "--max-response-bytes",
            &CAP.to_string(),
            "--max-value-bytes",
            "65536",
        ],
    );
    cluster
        .wait_leader(&[1, 2, 3], Duration::from_secs(10))
        .await;
    fill(&cluster).await;
    let gets = |n: usize| -> Vec<pb::Op> {
        (0..n)
            .map(|i| pb::Op {
                op: Some(pb::op::Op::Get(pb::GetRequest {
                    key: format!("k{i:05}").into_bytes(),
                    consistency: 0,
                    min_revision: 0,
                })),
            })
            .collect()
    };
    let marker = pb::Op {
        op: Some(pb::op::Op::Put(common::put("marker", "written"))),
    };
    let mut success = gets(100);
    success.push(marker.clone());
    let t = Duration::from_secs(5);
    for id in [1, 2, 3] {
        let err = cluster
            .kv(id)
            .txn(req(
                pb::TxnRequest {
                    compare: vec![],
                    success: success.clone(),
                    failure: vec![],
                },
                t,
            ))
            .await
            .expect_err("100 gets of 10 KiB do not fit in 256 KiB");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        assert!(err.message().contains("max-response-bytes"), "{err:?}");
    }
    let absent = cluster
        .kv(1)
        .get(req(common::get("marker", pb::Consistency::Strong), t))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(absent.kv, None, "a refused txn must not have been applied");

    let mut small = gets(10);
    small.push(marker);
    let r = cluster
        .kv(2)
        .txn(req(
            pb::TxnRequest {
                compare: vec![],
                success: small,
                failure: vec![],
            },
            t,
        ))
        .await
        .expect("10 gets fit")
        .into_inner();
    assert_eq!(r.results.len(), 11);
}

#[test]
fn a_response_cap_that_cannot_hold_the_largest_pair_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = |_| portpicker::pick_unused_port().expect("port");
    let (addr, peer_addr) = (
        format!("127.0.0.1:{}", port(0)),
        format!("127.0.0.1:{}", port(1)),
    );
    let out = Command::new(bin())
        .args(["server", "--id", "1", "--listen", &addr])
        .args(["--peer-listen", &peer_addr])
        .arg("--peers")
        .arg(format!("1={addr}/{peer_addr}"))
        .arg("--data-dir")
        .arg(dir.path().join("n1"))
        .args(["--max-response-bytes", "1048576"])
        .stdin(Stdio::null())
        .output()
        .expect("run the server");
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--max-response-bytes 1048576") && err.contains("--max-value-bytes"),
        "{err}"
    );
}

/// Reads parked on a revision the node has not reached are capped (RESOURCE_EXHAUSTED beyond the
/// cap), and the ones within it still end at their deadline.
#[tokio::test]
async fn reads_waiting_for_a_revision_are_capped() {
    let cluster = Cluster::start(1, &["--max-apply-waiters", "20"]);
    let client = cluster.client();
    eventually(Duration::from_secs(10), "put", || {
        client.put(b"a".to_vec(), b"1".to_vec(), false)
    })
    .await;
    let mut tasks = Vec::new();
    for _ in 0..60 {
        let mut kv = cluster.kv(1);
        tasks.push(tokio::spawn(async move {
            let get = pb::GetRequest {
                key: b"a".to_vec(),
                consistency: pb::Consistency::Eventual as i32,
                min_revision: 1_000_000,
            };
            kv.get(req(get, Duration::from_millis(1500))).await
        }));
    }
    let (mut full, mut deadline) = (0, 0);
    for t in tasks {
        match t.await.expect("task") {
            Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                assert!(s.message().contains("max-apply-waiters"), "{s:?}");
                full += 1;
            }
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
                ) =>
            {
                deadline += 1
            }
            other => panic!("a read of an unreached revision ended with {other:?}"),
        }
    }
    assert!(full >= 40, "{full} refused, {deadline} timed out");
    assert!(deadline >= 1, "{full} refused, {deadline} timed out");
    // Once they are gone, waiting works again, and a reached revision is served.
    let get = pb::GetRequest {
        key: b"a".to_vec(),
        consistency: pb::Consistency::Eventual as i32,
        min_revision: 1,
    };
    let r = cluster
        .kv(1)
        .get(req(get, Duration::from_secs(2)))
        .await
        .expect("a reached revision");
    assert!(r.into_inner().kv.is_some());
}

/// A read waiting for a revision is woken when that revision is applied, not at its deadline.
#[tokio::test]
async fn a_read_waiting_for_a_revision_is_woken_when_it_is_applied() {
    let cluster = Cluster::start(1, &[]);
    let client = cluster.client();
    let first = eventually(Duration::from_secs(10), "put", || {
        client.put(b"a".to_vec(), b"1".to_vec(), false)
    })
    .await;
    let next = first.header.expect("header").revision + 1;
    let mut kv = cluster.kv(1);
    let started = tokio::time::Instant::now();
    let waiting = tokio::spawn(async move {
        let get = pb::GetRequest {
            key: b"a".to_vec(),
            consistency: pb::Consistency::Eventual as i32,
            min_revision: next,
        };
        kv.get(req(get, Duration::from_secs(20))).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    client
        .put(b"a".to_vec(), b"2".to_vec(), false)
        .await
        .expect("put");
    let r = waiting.await.expect("task").expect("woken").into_inner();
    assert_eq!(r.kv.expect("kv").value, b"2");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "woken only near the deadline"
    );
}

/// What thousands of reads parked on an unreached revision cost the node while writes go on. A
/// measurement, not a pass/fail bound (run with `--run-ignored only`; `RAFTKV_TEST_BIN` compares
/// builds); the cap and the wake-up are tested above.
#[tokio::test]
#[ignore]
async fn measure_the_cpu_of_parked_min_revision_reads() {
    let cluster = Cluster::start(3, &[]);
    let leader = cluster
        .wait_leader(&[1, 2, 3], Duration::from_secs(10))
        .await;
    let client = cluster.client();
    client
        .put(b"a".to_vec(), b"1".to_vec(), false)
        .await
        .expect("put");
    let (connections, per_connection) = (30, 100);
    let window = Duration::from_secs(4);
    let pid = cluster.pid(leader).expect("running");
    let write_for = |window: Duration| {
        let client = &client;
        async move {
            let started = tokio::time::Instant::now();
            let mut writes = 0;
            while started.elapsed() < window {
                client
                    .put(b"w".to_vec(), b"x".to_vec(), false)
                    .await
                    .expect("put");
                writes += 1;
            }
            writes
        }
    };
    let before = common::cpu_time(pid);
    let alone = write_for(window).await;
    let used_alone = common::cpu_time(pid) - before;
    eprintln!("leader CPU over {window:?} with {alone} writes and no parked reads: {used_alone:?}");
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let kv = cluster.kv(leader);
        for _ in 0..per_connection {
            let mut kv = kv.clone();
            tasks.push(tokio::spawn(async move {
                let get = pb::GetRequest {
                    key: b"a".to_vec(),
                    consistency: pb::Consistency::Eventual as i32,
                    min_revision: 1_000_000_000,
                };
                kv.get(req(get, window + Duration::from_secs(1))).await
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = common::cpu_time(pid);
    let writes = write_for(window).await;
    let used = common::cpu_time(pid) - before;
    let mut outcomes = std::collections::BTreeMap::new();
    for t in tasks {
        let code = match t.await.expect("task") {
            Ok(_) => "ok".to_string(),
            Err(s) => format!("{:?}", s.code()),
        };
        *outcomes.entry(code).or_insert(0) += 1;
    }
    eprintln!(
        "leader CPU over {window:?} with {} parked reads and {writes} writes: {used:?} ({:.0} % of a core); outcomes {outcomes:?}",
        connections * per_connection,
        used.as_secs_f64() / window.as_secs_f64() * 100.0
    );
}
