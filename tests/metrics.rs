//! The `--metrics-listen` endpoint of real nodes: what `/metrics` exports and whether it follows
//! the cluster, `/livez` and `/readyz` as a cluster loses its quorum, and that the port stays
//! bounded against clients that misbehave.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::http::{cluster_with_metrics, get, samples};
use tokio::time::Instant;

const SECOND: Duration = Duration::from_secs(1);

/// Metrics every node exports once it has served a write, whatever its role.
const ALWAYS: &[&str] = &[
    "raftkv_server_has_leader",
    "raftkv_server_is_leader",
    "raftkv_server_is_learner",
    "raftkv_server_term",
    "raftkv_server_leader_changes_seen_total",
    "raftkv_server_proposals_committed_total",
    "raftkv_server_proposals_applied_total",
    "raftkv_server_ready",
    "raftkv_server_info",
    "raftkv_disk_log_fsync_duration_seconds_bucket",
    "raftkv_disk_apply_duration_seconds_bucket",
    "raftkv_storage_db_size_bytes",
    "raftkv_storage_log_size_bytes",
    "raftkv_storage_fs_available_bytes",
    "raftkv_storage_fs_size_bytes",
    "raftkv_snapshot_last_index",
    "raftkv_snapshot_size_bytes",
    "raftkv_lease_active",
    "raftkv_lease_renewed_total",
    "raftkv_lease_expired_total",
    "raftkv_watch_streams",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "process_open_fds",
];

/// Metrics the leader exports once it has replicated and answered writes.
const ON_THE_LEADER: &[&str] = &[
    "raftkv_server_proposals_pending",
    "raftkv_network_peer_round_trip_time_seconds_bucket",
    "grpc_server_handled_total",
    "grpc_server_handling_seconds_bucket",
];

/// The value of the one series named `name` (no labels), if it is there.
fn value(samples: &BTreeMap<String, f64>, name: &str) -> Option<f64> {
    samples.get(name).copied()
}

/// The names of the series in a scrape.
fn names(samples: &BTreeMap<String, f64>) -> Vec<String> {
    samples
        .keys()
        .map(|k| k.split('{').next().unwrap_or_default().to_owned())
        .collect()
}

/// Scrapes `addr` until `ok` holds for the scrape or the deadline passes; the last scrape either way.
async fn scrape_until(
    addr: &str,
    timeout: Duration,
    ok: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> (bool, BTreeMap<String, f64>) {
    let deadline = Instant::now() + timeout;
    loop {
        let scraped = match get(addr, "/metrics") {
            Ok((200, body)) => samples(&body),
            _ => BTreeMap::new(),
        };
        if ok(&scraped) || Instant::now() >= deadline {
            return (ok(&scraped), scraped);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_cluster_and_readyz_its_quorum() {
    let (mut c, metrics) = cluster_with_metrics(|_| Vec::new());
    let leader = c.wait_leader(&c.ids(), 20 * SECOND).await;
    let client = c.client();
    for i in 0..20 {
        common::eventually(10 * SECOND, "put", || {
            client.put(format!("k{i}").into_bytes(), b"v".to_vec(), false)
        })
        .await;
    }

    for (&id, addr) in &metrics {
        let wanted: Vec<&str> = if id == leader {
            ALWAYS.iter().chain(ON_THE_LEADER).copied().collect()
        } else {
            ALWAYS.to_vec()
        };
        let (ok, scraped) = scrape_until(addr, 10 * SECOND, |s| {
            let present = names(s);
            wanted.iter().all(|w| present.iter().any(|p| p == w))
                && value(s, "raftkv_server_proposals_applied_total").unwrap_or(0.0) >= 20.0
                && value(s, "raftkv_server_has_leader") == Some(1.0)
                && value(s, "raftkv_server_ready") == Some(1.0)
        })
        .await;
        let present = names(&scraped);
        let missing: Vec<_> = wanted
            .iter()
            .filter(|w| !present.iter().any(|p| p == *w))
            .collect();
        assert!(
            ok,
            "node {id}: missing {missing:?} or not caught up: {scraped:#?}"
        );
        let is_leader = value(&scraped, "raftkv_server_is_leader");
        assert_eq!(
            is_leader,
            Some(if id == leader { 1.0 } else { 0.0 }),
            "node {id}"
        );
        assert!(value(&scraped, "raftkv_storage_db_size_bytes").unwrap_or(0.0) > 0.0);
        assert!(value(&scraped, "process_resident_memory_bytes").unwrap_or(0.0) > 0.0);
        let status = c.status(id).await.expect("status");
        assert_eq!(
            value(&scraped, "raftkv_server_term"),
            Some(status.term as f64),
            "node {id}: the term metric is not the node's term"
        );
        if id == leader {
            let puts: f64 = scraped
                .iter()
                .filter(|(k, _)| {
                    k.starts_with("grpc_server_handled_total{")
                        && k.contains("grpc_method=\"Put\"")
                        && k.contains("grpc_code=\"OK\"")
                })
                .map(|(_, v)| v)
                .sum();
            assert!(puts >= 1.0, "no Put counted on the leader: {scraped:#?}");
            for follower in c.ids().into_iter().filter(|f| *f != leader) {
                let series = format!(
                    "raftkv_network_peer_round_trip_time_seconds_count{{to=\"{follower}\"}}"
                );
                assert!(
                    scraped.get(&series).copied().unwrap_or(0.0) > 0.0,
                    "no round trips to {follower} timed: {scraped:#?}"
                );
            }
        }
        let (code, body) = get(addr, "/livez").expect("livez");
        assert_eq!((code, body.as_str()), (200, "ok\n"));
        let (code, body) = get(addr, "/readyz?verbose").expect("readyz");
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("[+]linearizable_read ok"), "{body}");
        assert!(body.contains("[+]storage ok"), "{body}");
    }

    // Without a quorum the last node is alive but not ready, and says why.
    let survivor = c.ids().into_iter().find(|id| *id != leader).unwrap();
    for id in c.ids().into_iter().filter(|id| *id != survivor) {
        c.kill(id);
    }
    let addr = &metrics[&survivor];
    let deadline = Instant::now() + 15 * SECOND;
    let (code, body) = loop {
        let (code, body) = get(addr, "/readyz?verbose").expect("readyz");
        if code != 200 || Instant::now() >= deadline {
            break (code, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(code, 503, "still ready without a quorum: {body}");
    assert!(body.contains("[-]linearizable_read failed"), "{body}");
    let (code, body) = get(addr, "/readyz").expect("readyz");
    assert_eq!(code, 503, "{body}");
    assert_eq!(get(addr, "/livez").expect("livez").0, 200);
    let (ok, scraped) = scrape_until(addr, 10 * SECOND, |s| {
        value(s, "raftkv_server_ready") == Some(0.0)
            && value(s, "raftkv_server_has_leader") == Some(0.0)
            && s.iter()
                .any(|(k, v)| k.starts_with("raftkv_network_peer_sent_failures_total{") && *v > 0.0)
    })
    .await;
    assert!(
        ok,
        "no failed sends, or still ready or with a leader: {scraped:#?}"
    );
}

/// Garbage, unknown paths and connections that only hold a slot: each is answered or closed, the
/// node stays up, and the port serves again once they are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_port_survives_bad_clients() {
    let (mut c, metrics) = cluster_with_metrics(|_| Vec::new());
    c.wait_leader(&c.ids(), 20 * SECOND).await;
    let addr = metrics[&1].clone();

    assert_eq!(get(&addr, "/no-such-page").expect("404").0, 404);
    let mut garbage = TcpStream::connect(&addr).expect("connect");
    garbage.set_read_timeout(Some(5 * SECOND)).unwrap();
    let _ = garbage.write_all(&[0xff; 4096]);
    let mut answer = Vec::new();
    let _ = garbage.read_to_end(&mut answer);
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );

    // More idle connections than the port takes: the node stays up, and once they close it serves.
    let idle: Vec<TcpStream> = (0..100)
        .filter_map(|_| TcpStream::connect(&addr).ok())
        .collect();
    assert!(!idle.is_empty());
    assert!(c.alive(1), "node 1 died");
    drop(idle);
    let deadline = Instant::now() + 10 * SECOND;
    loop {
        match get(&addr, "/livez") {
            Ok((200, _)) => break,
            other if Instant::now() >= deadline => panic!("livez after the flood: {other:?}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(c.alive(1), "node 1 died");
}
