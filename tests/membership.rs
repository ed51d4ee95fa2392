//! Membership changes and graceful stops on real processes: a node that joins and catches up by
//! snapshot, the rules every change keeps (learner first, a live quorum, ids never reused), a
//! removed node that goes quiet, leadership moved on request, and a rolling restart under load that
//! fails no request.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Cluster, eventually, get, put, req};
use raftkv::pb::v1 as pb;
use raftkv_client::Client;
use tokio::time::Instant;
use tonic::Code;

const SECOND: Duration = Duration::from_secs(1);

/// Polls node `id`'s Status until `ok` holds, failing with the last one after `timeout`.
async fn status_until(
    c: &Cluster,
    id: u64,
    timeout: Duration,
    what: &str,
    ok: impl Fn(&pb::StatusResponse) -> bool,
) -> pb::StatusResponse {
    eventually(timeout, what, || async {
        match c.status(id).await {
            Some(s) if ok(&s) => Ok(s),
            s => Err(tonic::Status::failed_precondition(format!(
                "node {id}: {s:?}"
            ))),
        }
    })
    .await
}

fn ids(members: &[pb::Member], learner: bool) -> Vec<u64> {
    members
        .iter()
        .filter(|m| m.learner == learner)
        .map(|m| m.id)
        .collect()
}

/// The code of a call that must fail.
fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> (Code, String) {
    match r {
        Ok(v) => panic!("expected a refusal, got {v:?}"),
        Err(s) => (s.code(), s.message().to_string()),
    }
}

/// Writes `n` keys named `prefix` and a number, retrying each until it is acknowledged; returns
/// the last one's revision.
async fn put_all(client: &Client, prefix: &str, n: usize) -> u64 {
    let mut last = 0;
    for i in 0..n {
        let r = eventually(10 * SECOND, "put", || {
            client.put(format!("{prefix}{i:03}").into_bytes(), b"v".to_vec(), false)
        })
        .await;
        last = r.header.unwrap().revision;
    }
    last
}

/// Starts node `id` with `--join` through `via` and waits until it is a voter that has applied
/// `last`, having caught up by snapshot (the log it needed was purged).
async fn join_by_snapshot(c: &mut Cluster, id: u64, via: &[u64], last: u64) -> pb::StatusResponse {
    let mut spec = raftkv_testkit::NodeSpec::loopback(id).expect("ports");
    let addrs: Vec<String> = via.iter().map(|v| c.addr(*v)).collect();
    spec.args = vec![format!("--join={}", addrs.join(","))];
    c.add_node(spec).expect("add the node to the harness");
    c.start_again(id);
    let s = status_until(c, id, 30 * SECOND, "the joined node is a voter", |s| {
        s.voters.iter().any(|m| m.id == id) && s.applied_index >= last
    })
    .await;
    assert!(
        s.snapshot_index > 0,
        "node {id} caught up by snapshot: {s:?}"
    );
    s
}

/// A fourth node started with `--join` on a cluster whose log has moved past its start: it learns
/// the cluster id, is added as a learner, catches up by snapshot, is promoted, and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_with_join_catches_up_by_snapshot_and_becomes_a_voter() {
    let mut c = Cluster::start(3, &["--snapshot-every", "50", "--keep-logs", "10"]);
    let leader = c.wait_leader(&c.ids(), 20 * SECOND).await;
    let client = c.client();
    let mut last = 0;
    // openraft purges in batches of 256 entries: past that, the start of the log is gone.
    for i in 0..400 {
        let r = client
            .put(
                format!("k{i:03}").into_bytes(),
                format!("v{i}").into_bytes(),
                false,
            )
            .await
            .expect("put");
        last = r.header.unwrap().revision;
    }
    status_until(&c, leader, 20 * SECOND, "the leader purged its log", |s| {
        s.first_log_index > 1
    })
    .await;

    let s = join_by_snapshot(&mut c, 4, &[2, 1], last).await;
    assert_eq!(s.cluster_id, c.status(1).await.unwrap().cluster_id);

    let members = c
        .cluster_client(leader)
        .member_list(req(pb::MemberListRequest {}, 5 * SECOND))
        .await
        .expect("MemberList")
        .into_inner()
        .members;
    assert_eq!(ids(&members, false), vec![1, 2, 3, 4], "{members:?}");
    let four = members.iter().find(|m| m.id == 4).unwrap();
    assert_eq!(four.address, c.addr(4));
    assert_eq!(four.peer_address, c.peer_addr(4));
    assert!(four.matched_index >= last, "{four:?}");

    for consistency in [pb::Consistency::Eventual, pb::Consistency::Strong] {
        let got = c
            .kv(4)
            .get(req(get("k399", consistency), 5 * SECOND))
            .await
            .expect("node 4 serves")
            .into_inner();
        assert_eq!(got.kv.unwrap().value, b"v399");
    }
    // A voter now: a write needs it or another of the four for a quorum of three.
    c.kill(1);
    c.kill(2);
    let w = c.kv(4).put(req(put("after", "two down"), 2 * SECOND)).await;
    assert!(w.is_err(), "two of four voters down: no quorum, yet {w:?}");
    c.start_again(2);
    c.kv(4)
        .put(req(put("after", "quorum back"), 20 * SECOND))
        .await
        .expect("three of four voters: a quorum");

    // A restart of the joined node starts from its own data (no second join).
    c.stop(4).await;
    c.start_again(4);
    status_until(&c, 4, 20 * SECOND, "node 4 back as a voter", |s| {
        s.role == "follower" || s.role == "leader"
    })
    .await;
}

/// Ids are never reused, also by a leader whose log never held the removal: one that joined later
/// and learnt the state from a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_caught_up_by_snapshot_still_refuses_a_removed_id() {
    let mut c = Cluster::start(3, &["--snapshot-every", "50", "--keep-logs", "10"]);
    c.wait_leader(&c.ids(), 20 * SECOND).await;
    let client = c.client();
    let (addr3, peer3) = (c.addr(3), c.peer_addr(3));
    let left = client
        .member_remove(3)
        .await
        .expect("remove node 3")
        .members;
    assert_eq!(ids(&left, false), vec![1, 2]);
    c.kill(3);
    // Past openraft's purge batch of 256 entries, so the removal is only in snapshots.
    let last = put_all(&client, "k", 400).await;
    for id in [1, 2] {
        status_until(&c, id, 20 * SECOND, "the log purged", |s| {
            s.first_log_index > 1
        })
        .await;
    }
    join_by_snapshot(&mut c, 4, &[1, 2], last).await;
    client
        .move_leader(4)
        .await
        .expect("move the leadership to 4");
    assert_eq!(c.wait_leader(&[1, 2, 4], 10 * SECOND).await, 4);
    let (code_, why) = code(
        client
            .member_add(pb::MemberAddRequest {
                id: 3,
                address: addr3,
                learner: true,
                peer_address: peer3,
            })
            .await,
    );
    assert_eq!(code_, Code::FailedPrecondition, "{why}");
    assert!(why.contains("never reused"), "{why}");
}

/// A voter that was down while a node was added, and comes back once the new node leads, only knows
/// the old members: it must still follow the new leader (found by the membership nemesis: it refused
/// it as "not a member" for good, and never caught up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_that_missed_a_change_follows_the_leader_added_meanwhile() {
    let mut c = Cluster::start(3, &[]);
    c.wait_leader(&c.ids(), 20 * SECOND).await;
    let client = c.client();
    put_all(&client, "a", 20).await;
    c.kill(3);
    let mut spec = raftkv_testkit::NodeSpec::loopback(4).expect("ports");
    spec.args = vec![format!("--join={},{}", c.addr(1), c.addr(2))];
    c.add_node(spec).expect("add node 4 to the harness");
    c.start_again(4);
    status_until(&c, 4, 30 * SECOND, "node 4 is a voter", |s| {
        s.voters.iter().any(|m| m.id == 4)
    })
    .await;
    c.client()
        .move_leader(4)
        .await
        .expect("move the leadership to 4");
    c.start_again(3);
    let last = put_all(&client, "b", 20).await;
    let s = status_until(&c, 3, 20 * SECOND, "node 3 follows node 4", |s| {
        s.leader_id == 4 && s.applied_index >= last
    })
    .await;
    assert!(s.voters.iter().any(|m| m.id == 4), "{s:?}");
}

/// Every rule of a membership change, each seen refused and then allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_keep_their_rules() {
    let mut c = Cluster::start(3, &[]);
    c.wait_leader(&c.ids(), 20 * SECOND).await;
    let spec = raftkv_testkit::NodeSpec::loopback(4).expect("ports");
    let (addr4, peer4) = (spec.addr.clone(), spec.peer_addr.clone());
    let client = c.client();

    // A learner first, through a follower (forwarded to the leader); the node is not running yet.
    let added = client
        .member_add(pb::MemberAddRequest {
            id: 4,
            address: addr4.clone(),
            learner: true,
            peer_address: peer4.clone(),
        })
        .await
        .expect("add a learner")
        .members;
    assert_eq!(ids(&added, true), vec![4]);
    // The same add again is no change.
    client
        .member_add(pb::MemberAddRequest {
            id: 4,
            address: addr4.clone(),
            learner: true,
            peer_address: peer4.clone(),
        })
        .await
        .expect("adding the same learner again");
    let (code_, why) = code(client.member_promote(4).await);
    assert_eq!(code_, Code::FailedPrecondition, "{why}");
    assert!(why.contains("not caught up"), "{why}");
    let (code_, why) = code(client.move_leader(4).await);
    assert_eq!(code_, Code::FailedPrecondition, "{why}");
    let (code_, why) = code(client.move_leader(9).await);
    assert_eq!(code_, Code::NotFound, "{why}");
    let (code_, why) = code(
        client
            .member_add(pb::MemberAddRequest {
                id: 5,
                address: addr4.clone(),
                learner: true,
                peer_address: String::new(),
            })
            .await,
    );
    assert_eq!(code_, Code::FailedPrecondition, "a shared address: {why}");
    let (code_, why) = code(
        client
            .member_add(pb::MemberAddRequest {
                id: 4,
                address: "127.0.0.1:1".into(),
                learner: true,
                peer_address: "127.0.0.1:2".into(),
            })
            .await,
    );
    assert_eq!(code_, Code::FailedPrecondition, "id 4 elsewhere: {why}");

    // Started now (the operator's path: added first, then started to join), it catches up, and
    // promotes itself.
    let mut spec = spec;
    spec.args = vec![format!("--join={}", c.addr(1))];
    c.add_node(spec).expect("harness");
    c.start_again(4);
    status_until(&c, 4, 30 * SECOND, "node 4 promoted", |s| {
        s.voters.iter().any(|m| m.id == 4)
    })
    .await;

    // Leadership moves on request, here to the new voter.
    client.move_leader(4).await.expect("move the leadership");
    assert_eq!(c.wait_leader(&c.ids(), 10 * SECOND).await, 4);

    // Removing the leader itself: it hands over first, and the change is made by its successor.
    let left = client
        .member_remove(4)
        .await
        .expect("remove node 4")
        .members;
    assert_eq!(ids(&left, false), vec![1, 2, 3]);
    status_until(&c, 4, 10 * SECOND, "node 4 knows it was removed", |s| {
        s.role == "removed"
    })
    .await;
    let (code_, why) = code(
        c.kv(4)
            .get(req(get("k", pb::Consistency::Eventual), 2 * SECOND))
            .await,
    );
    assert_eq!(code_, Code::FailedPrecondition, "{why}");
    assert!(why.contains("removed from the cluster"), "{why}");
    // Quiet: no campaign of its own moves the others' term.
    let leader = c.wait_leader(&[1, 2, 3], 10 * SECOND).await;
    let term = c.status(leader).await.unwrap().term;
    let watch_until = Instant::now() + 2 * SECOND;
    while Instant::now() < watch_until {
        let s = c.status(leader).await.unwrap();
        assert_eq!(
            (s.term, s.leader_id),
            (term, leader),
            "node 4 disturbed the cluster"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its id is never given out again; removing it again is no change.
    let (code_, why) = code(
        client
            .member_add(pb::MemberAddRequest {
                id: 4,
                address: addr4.clone(),
                learner: true,
                peer_address: peer4.clone(),
            })
            .await,
    );
    assert_eq!(code_, Code::FailedPrecondition, "{why}");
    assert!(why.contains("never reused"), "{why}");
    client.member_remove(4).await.expect("removing it again");
    c.kill(4);

    // A removal must leave a live quorum.
    let victim = if leader == 3 { 2 } else { 3 };
    let other = 6 - leader - victim;
    c.kill(victim);
    // A voter counts as down once the leader has not heard from it for two election timeouts:
    // that window has to pass (no state to poll shows it).
    tokio::time::sleep(SECOND).await;
    let (code_, why) = code(client.member_remove(other).await);
    assert_eq!(code_, Code::FailedPrecondition, "{why}");
    assert!(why.contains("quorum"), "{why}");
    // Removing the dead one leaves two live voters.
    let left = client
        .member_remove(victim)
        .await
        .expect("remove the dead voter")
        .members;
    assert_eq!(ids(&left, false).len(), 2);
    client
        .member_remove(other)
        .await
        .expect("down to one voter");
    let (code_, why) = code(client.member_remove(leader).await);
    assert_eq!(code_, Code::FailedPrecondition, "{why}");
    assert!(why.contains("last voter"), "{why}");
    client
        .put(b"alone".to_vec(), b"still writes".to_vec(), false)
        .await
        .expect("a one-voter cluster writes");
}

/// What one client of the rolling restart saw.
#[derive(Default)]
struct Tally {
    ok: u64,
    failed: Vec<String>,
    /// When each acknowledged write was answered.
    acked: Vec<Instant>,
}

/// Every node of a 3-node cluster is stopped with SIGTERM and started again in turn, leaders
/// included, under steady writes and strong reads: no request fails or ends with an unknown
/// outcome, and every acknowledged write is there afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_fails_no_request() {
    let mut c = Cluster::start(3, &[]);
    c.wait_leader(&c.ids(), 20 * SECOND).await;
    let stop = Arc::new(AtomicBool::new(false));
    let endpoints = c.endpoints();
    let mut load = Vec::new();
    for worker in 0..6u64 {
        let stop = stop.clone();
        let client = Client::new(&endpoints, 10 * SECOND).expect("client");
        load.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut i = 0u64;
            // Bounded in count and time: the restarts take well under a minute.
            let give_up = Instant::now() + 120 * SECOND;
            while !stop.load(Ordering::Relaxed) && Instant::now() < give_up && i < 1_000_000 {
                i += 1;
                let key = format!("w{worker}-{i}");
                let outcome = if worker % 3 == 2 {
                    client
                        .get(key.into_bytes(), pb::Consistency::Strong, 0)
                        .await
                        .map(|_| ())
                } else {
                    client
                        .put(key.into_bytes(), b"v".to_vec(), false)
                        .await
                        .map(|_| tally.acked.push(Instant::now()))
                };
                match outcome {
                    Ok(()) => tally.ok += 1,
                    Err(s) => tally
                        .failed
                        .push(format!("{:?}: {}", s.code(), s.message())),
                }
            }
            (worker, i, tally)
        }));
    }

    let mut restarted = Vec::new();
    while restarted.len() < 3 {
        // The current leader if it has not been restarted yet, else the next node that has not.
        let leader = c.wait_leader(&c.ids(), 20 * SECOND).await;
        let id = if restarted.contains(&leader) {
            *c.ids().iter().find(|i| !restarted.contains(*i)).unwrap()
        } else {
            leader
        };
        tokio::time::sleep(SECOND).await;
        c.stop(id).await;
        c.start_again(id);
        c.wait_ready(id, 30 * SECOND)
            .await
            .expect("restarted node ready");
        restarted.push(id);
    }
    tokio::time::sleep(SECOND).await;
    stop.store(true, Ordering::Relaxed);

    let mut failed = Vec::new();
    let mut acked = Vec::new();
    let mut ok = 0;
    let mut writes = Vec::new();
    for task in load {
        let (worker, n, tally) = task.await.expect("load task");
        ok += tally.ok;
        failed.extend(tally.failed);
        acked.extend(tally.acked.iter().copied());
        if worker % 3 != 2 {
            writes.push((worker, n, tally.acked.len()));
        }
    }
    acked.sort();
    let gap = acked
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    println!(
        "rolling restart of {restarted:?}: {ok} requests answered, {} failed, longest gap between \
         acknowledged writes {gap:?}",
        failed.len()
    );
    assert!(failed.is_empty(), "failed or unknown: {failed:?}");
    assert!(ok > 100, "the load ran: {ok} requests");

    // Every acknowledged write is there (each writer's writes succeeded in order, none failed).
    let client = c.client();
    for (worker, n, acked) in writes {
        for i in [1, acked as u64] {
            if i == 0 || i > n {
                continue;
            }
            let key = format!("w{worker}-{i}");
            let got = client
                .get(key.clone().into_bytes(), pb::Consistency::Strong, 0)
                .await
                .expect("read back");
            assert!(got.kv.is_some(), "acknowledged write {key} is missing");
        }
    }
}
