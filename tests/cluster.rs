//! Cluster behaviour on real processes: replication, consistency levels, failover, recovery and
//! input validation, each asserted against the running release binary.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{Cluster, eventually, get, put, req};
use raftkv::pb::v1 as pb;
use raftkv::types::{Vote, VoteRequest, VoteResponse};
use tokio::time::Instant;

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_write_is_readable_strongly_everywhere() {
    let c = Cluster::start(3, &[]);
    let leader = c.wait_leader(&c.ids(), 20 * SECOND).await;
    let follower = c.ids().into_iter().find(|&i| i != leader).unwrap();

    let resp = c
        .kv(follower)
        .put(req(put("color", "blue"), 5 * SECOND))
        .await
        .expect("a follower forwards writes")
        .into_inner();
    let header = resp.header.unwrap();
    assert!(header.revision > 0);
    assert_eq!(header.node_id, follower);
    assert_eq!(header.leader_id, leader);

    for id in c.ids() {
        let got = c
            .kv(id)
            .get(req(get("color", pb::Consistency::Strong), 5 * SECOND))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            got.kv.expect("written key").value,
            b"blue",
            "strong read on node {id}"
        );
        assert!(
            got.header.unwrap().revision >= header.revision,
            "a strong read reflects the write"
        );
    }

    // min_revision: an eventual read that asks for the write's revision cannot miss it.
    for id in c.ids() {
        let mut g = get("color", pb::Consistency::Eventual);
        g.min_revision = header.revision;
        let got = c.kv(id).get(req(g, 5 * SECOND)).await.unwrap().into_inner();
        assert_eq!(got.kv.unwrap().value, b"blue");
    }
    // A revision nobody has reached fails by its deadline instead of hanging.
    let mut g = get("color", pb::Consistency::Eventual);
    g.min_revision = header.revision + 1_000_000;
    let started = Instant::now();
    let err = c.kv(follower).get(req(g, SECOND)).await.unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Unavailable
        ),
        "{err:?}"
    );
    assert!(
        started.elapsed() < 5 * SECOND,
        "must not hang past the deadline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_node_serves_eventual_reads_but_not_strong_ones() {
    let mut c = Cluster::start(3, &[]);
    let leader = c.wait_leader(&c.ids(), 20 * SECOND).await;
    let isolated = c.ids().into_iter().find(|&i| i != leader).unwrap();
    let w = c
        .kv(leader)
        .put(req(put("k", "v1"), 5 * SECOND))
        .await
        .unwrap()
        .into_inner();
    let rev = w.header.unwrap().revision;
    c.wait_applied(isolated, rev, 10 * SECOND).await;

    // Freeze every other node: the isolated one can reach no quorum.
    let others: Vec<u64> = c.ids().into_iter().filter(|&i| i != isolated).collect();
    for &o in &others {
        c.pause(o);
    }
    let got = c
        .kv(isolated)
        .get(req(get("k", pb::Consistency::Eventual), 2 * SECOND))
        .await
        .expect("eventual reads need no quorum")
        .into_inner();
    assert_eq!(got.kv.unwrap().value, b"v1");

    let started = Instant::now();
    let err = c
        .kv(isolated)
        .get(req(get("k", pb::Consistency::Strong), 2 * SECOND))
        .await
        .expect_err("a strong read without a quorum must fail");
    assert!(
        matches!(
            err.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
        ),
        "{err:?}"
    );
    assert!(
        started.elapsed() < 6 * SECOND,
        "bounded by the deadline, took {:?}",
        started.elapsed()
    );
    let err = c
        .kv(isolated)
        .put(req(put("k", "v2"), 2 * SECOND))
        .await
        .expect_err("a write without a quorum must fail");
    assert!(
        matches!(
            err.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
        ),
        "{err:?}"
    );

    for &o in &others {
        c.resume(o);
    }
    let got = eventually(20 * SECOND, "strong read after healing", || {
        let mut kv = c.kv(isolated);
        async move {
            kv.get(req(get("k", pb::Consistency::Strong), 2 * SECOND))
                .await
        }
    })
    .await
    .into_inner();
    // The write during isolation may or may not have been applied (its outcome was unknown), but the
    // value is one of the two that were written.
    let v = got.kv.unwrap().value;
    assert!(v == b"v1" || v == b"v2", "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_elects_another_and_writes_continue() {
    let mut c = Cluster::start(3, &[]);
    let old = c.wait_leader(&c.ids(), 20 * SECOND).await;
    c.kv(old)
        .put(req(put("before", "1"), 5 * SECOND))
        .await
        .unwrap();
    c.kill(old);

    let survivors: Vec<u64> = c.ids().into_iter().filter(|&i| i != old).collect();
    // The survivor rides through the election inside one call (no client-side retry).
    let r = c
        .kv(survivors[0])
        .put(req(put("after", "2"), 10 * SECOND))
        .await
        .expect("a surviving node accepts writes after failover")
        .into_inner();
    let new = r.header.unwrap().leader_id;
    assert!(
        new != old && survivors.contains(&new),
        "new leader {new}, old {old}"
    );
    for &s in &survivors {
        let got = c
            .kv(s)
            .get(req(get("before", pb::Consistency::Strong), 5 * SECOND))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            got.kv.unwrap().value,
            b"1",
            "acknowledged before the crash, readable after"
        );
    }
}

/// A leader killed and restarted at once must not resume its old term as leader: it knows only what it
/// had applied, not what it had committed, so its read index could lag writes that strong reads
/// elsewhere already returned (openraft's `enable_leader_restore`, which raftkv turns off). Found by
/// `raftkv jepsen` as a stale strong read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_leader_does_not_resume_its_old_term() {
    let mut c = Cluster::start(3, &[]);
    let leader = c.wait_leader(&c.ids(), 20 * SECOND).await;
    c.kv(leader)
        .put(req(put("k", "v"), 5 * SECOND))
        .await
        .unwrap();
    let term = c.status(leader).await.expect("leader status").term;
    c.kill(leader);
    c.restart(leader);
    // Watch the restarted node from its first answer until a leader is elected again.
    let deadline = tokio::time::Instant::now() + 10 * SECOND;
    let mut answered = false;
    while tokio::time::Instant::now() < deadline {
        if let Some(s) = c.status(leader).await {
            answered = true;
            assert!(
                !(s.role == "leader" && s.term == term),
                "node {leader} came back as leader of its old term {term}"
            );
            if s.leader_id != 0 && s.term > term {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no new term after the leader restarted (answered: {answered})");
}

/// A vote or pre-vote in member 1's name at term 1 with an empty log (a stranger's id is refused before
/// it is weighed): no node grants it, and nothing changes on a node that weighs it (its term is higher). Returns the answer and, if the node refused it
/// because of its vote hold, the milliseconds the hold has left. `None` while the node is not listening.
async fn vote_probe(
    cluster: &Cluster,
    id: u64,
    pre_vote: bool,
) -> Option<(VoteResponse, Option<u64>)> {
    use raftkv::pb::internal::Payload;
    let mut client = cluster.peer_client(id, 1);
    let probe = VoteRequest::new(Vote::new(1, 1), None);
    let request = req(
        Payload {
            data: raftkv::codec::encode(&probe).unwrap(),
        },
        2 * SECOND,
    );
    let response = if pre_vote {
        client.pre_vote(request).await
    } else {
        client.vote(request).await
    };
    let response = match response {
        Ok(response) => response,
        Err(status) if status.code() == tonic::Code::Unavailable => return None,
        Err(status) => panic!("a vote probe must get an answer, not {status:?}"),
    };
    let held = response
        .metadata()
        .get(raftkv::network::service::VOTE_HELD_HEADER)
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let answer: VoteResponse = raftkv::codec::decode(&response.get_ref().data).unwrap();
    assert!(
        !answer.vote_granted,
        "a stranger's vote was granted: {answer:?}"
    );
    Some((answer, held))
}

/// The first answer a node gives to [`vote_probe`], within `timeout`.
async fn first_vote_answer(
    cluster: &Cluster,
    id: u64,
    timeout: Duration,
) -> (VoteResponse, Option<u64>) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(answer) = vote_probe(cluster, id, true).await {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("node {id} never answered a pre-vote within {timeout:?}");
}

/// With leased strong reads the leader counts on each node that acknowledged it not to help elect
/// anyone, itself included, for election-max-ms; openraft keeps that promise in memory, so a node that
/// restarts must neither vote nor campaign for that long. Whatever its own `--read-lease-ms`: the
/// leader's lease is the one that counts on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_holds_its_vote_while_a_read_lease_may_count_on_it() {
    // A long election timeout makes the hold long enough to watch from a test.
    let slow = ["--election-min-ms", "1500", "--election-max-ms", "3000"];
    let mut c = Cluster::start(3, &slow);
    c.wait_leader(&c.ids(), 30 * SECOND).await;
    let (_, held) = first_vote_answer(&c, 2, 5 * SECOND).await;
    assert_eq!(held, None, "a settled node weighs votes");
    let term = c.status(2).await.expect("status").term;

    c.restart(2);
    let (refusal, held) = first_vote_answer(&c, 2, 10 * SECOND).await;
    assert!(
        held.is_some(),
        "a restarted node weighed a pre-vote at once"
    );
    let (_, held) = vote_probe(&c, 2, false).await.expect("answers");
    assert!(held.is_some(), "a restarted node weighed a vote at once");
    // The refusal carries the node's own vote, so a candidate behind it learns the term it missed.
    assert!(
        refusal.vote.leader_id.term >= term && refusal.last_log_id.is_some(),
        "the refusal hides what the node knows (term {term} before the restart): {refusal:?}"
    );
    // And the hold ends.
    let deadline = Instant::now() + 10 * SECOND;
    loop {
        let (answer, held) = first_vote_answer(&c, 2, 5 * SECOND).await;
        if held.is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "vote still held 10 s after restart: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Its own campaign waits too. A single voter elects itself as soon as it campaigns, so it must
    // not lead before election-max-ms (3 s) after its restart; its own lease setting changes nothing.
    let mut solo = Cluster::start(1, &[&slow[..], &["--read-lease-ms", "0"]].concat());
    solo.wait_leader(&[1], 30 * SECOND).await;
    let restarted = Instant::now();
    solo.restart(1);
    let (first, held) = first_vote_answer(&solo, 1, 10 * SECOND).await;
    assert!(held.is_some(), "{first:?}");
    solo.wait_leader(&[1], 30 * SECOND).await;
    assert!(
        restarted.elapsed() >= Duration::from_millis(2900),
        "a restarted node campaigned {:?} after its restart, inside its vote hold",
        restarted.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_catches_up() {
    let mut c = Cluster::start(3, &[]);
    let leader = c.wait_leader(&c.ids(), 20 * SECOND).await;
    let lagger = c.ids().into_iter().find(|&i| i != leader).unwrap();
    c.kill(lagger);
    let client = c.client();
    let mut last = 0;
    for i in 0..50 {
        let r = client
            .put(
                format!("key{i:03}").into_bytes(),
                format!("v{i}").into_bytes(),
                false,
            )
            .await
            .unwrap();
        last = r.header.unwrap().revision;
    }
    c.restart(lagger);
    c.wait_applied(lagger, last, 20 * SECOND).await;
    let scan = c
        .kv(lagger)
        .scan(req(
            pb::ScanRequest {
                start: b"key".to_vec(),
                end: b"kez".to_vec(),
                limit: 0,
                consistency: pb::Consistency::Eventual as i32,
                min_revision: last,
            },
            5 * SECOND,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(scan.kvs.len(), 50);
    assert_eq!(scan.kvs[7].value, b"v7");
}

/// A node stopped with SIGTERM trusts its applied state on restart and serves it at once, even with
/// no quorum to learn anything from. After a SIGKILL it cannot trust it (the state machine is not
/// flushed on its own), so it restarts from its last snapshot (here none) and re-applies its own log up
/// to the commit point it had saved: again without needing a quorum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_keeps_the_applied_state_and_a_crash_replays_it() {
    let mut c = Cluster::start(3, &[]);
    let leader = c.wait_leader(&c.ids(), 20 * SECOND).await;
    let node = c.ids().into_iter().find(|&i| i != leader).unwrap();
    let others: Vec<u64> = c.ids().into_iter().filter(|&i| i != node).collect();
    // Through the leader-following client: the pauses below may move leadership.
    let write = |c: &Cluster, key: &str, value: &str| {
        let client = c.client();
        let (key, value) = (key.as_bytes().to_vec(), value.as_bytes().to_vec());
        async move {
            client
                .put(key, value, false)
                .await
                .unwrap()
                .header
                .unwrap()
                .revision
        }
    };
    let eventual_get = |c: &Cluster| {
        let mut kv = c.kv(node);
        async move {
            kv.get(req(get("k", pb::Consistency::Eventual), SECOND))
                .await
        }
    };

    let rev = write(&c, "k", "v1").await;
    c.wait_applied(node, rev, 10 * SECOND).await;
    c.stop(node).await;
    for &o in &others {
        c.pause(o);
    }
    c.start_again(node);
    let got = eventually(20 * SECOND, "eventual read after a clean restart", || {
        eventual_get(&c)
    })
    .await
    .into_inner();
    assert_eq!(
        got.kv.map(|kv| kv.value),
        Some(b"v1".to_vec()),
        "a cleanly stopped node keeps what it had applied"
    );
    for &o in &others {
        c.resume(o);
    }

    // A few writes after the one that matters, so that log flushes on the node carry its commit point
    // past it (the commit point is saved with the next flush, not on its own).
    c.wait_leader(&c.ids(), 20 * SECOND).await;
    write(&c, "k", "v2").await;
    let mut last = 0;
    for i in 0..3 {
        last = write(&c, &format!("after{i}"), "x").await;
    }
    c.wait_applied(node, last, 10 * SECOND).await;
    for &o in &others {
        c.pause(o);
    }
    c.kill(node);
    c.start_again(node);
    let got = eventually(20 * SECOND, "eventual read after a crash", || {
        eventual_get(&c)
    })
    .await
    .into_inner();
    assert_eq!(
        got.kv.map(|kv| kv.value),
        Some(b"v2".to_vec()),
        "a crashed node re-applies its own log up to its saved commit point before serving"
    );
    for &o in &others {
        c.resume(o);
    }
}

/// Polls node `id`'s Status for up to ten seconds until `ok` holds, and fails with the last one.
async fn status_until(c: &Cluster, id: u64, what: &str, ok: impl Fn(&pb::StatusResponse) -> bool) {
    eventually(10 * SECOND, what, || async {
        match c.status(id).await {
            Some(s) if ok(&s) => Ok(()),
            s => Err(tonic::Status::failed_precondition(format!(
                "node {id}: {s:?}"
            ))),
        }
    })
    .await
}

/// Large values bring a snapshot (and so a purge) by the log's size long before the entry count
/// would: here the count never does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_values_bring_a_snapshot_by_log_size() {
    let c = Cluster::start(
        3,
        &[
            "--snapshot-every",
            "1000000",
            "--snapshot-log-bytes",
            "1048576",
        ],
    );
    c.wait_leader(&c.ids(), 20 * SECOND).await;
    let client = c.client();
    let mut last = 0;
    // 2.5 MiB of values, over two and a half times the limit.
    for i in 0..40 {
        let r = client
            .put(
                format!("big{i:02}").into_bytes(),
                vec![b'v'; 64 * 1024],
                false,
            )
            .await
            .unwrap();
        last = r.header.unwrap().revision;
    }
    for id in c.ids() {
        c.wait_applied(id, last, 30 * SECOND).await;
        status_until(&c, id, "a snapshot taken by log size", |s| {
            s.snapshot_index > 0
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_node_catches_up_by_snapshot() {
    // Snapshot often and keep few logs behind it, so a wiped node cannot be fed from the log. openraft
    // purges in batches of 256 entries (config.rs), so the log must grow past that before any purge.
    // Without `allow_log_reversion` the leader's replication to the wiped node stalls (release build)
    // and the node never catches up here.
    let mut c = Cluster::start(3, &["--snapshot-every", "20", "--keep-logs", "5"]);
    let leader = c.wait_leader(&c.ids(), 20 * SECOND).await;
    let victim = c.ids().into_iter().find(|&i| i != leader).unwrap();
    let client = c.client();
    let mut last = 0;
    for i in 0..300 {
        let r = client
            .put(format!("s{i:03}").into_bytes(), vec![b'x'; 100], false)
            .await
            .unwrap();
        last = r.header.unwrap().revision;
    }
    client.delete(b"s000".to_vec(), false).await.unwrap();
    // Whichever survivor leads must have purged the start of its log; otherwise the wiped node could
    // be replayed from index 0 and this test would not reach snapshot install at all (it once passed
    // that way, only because the wiped node then built a snapshot of its own in time).
    for id in c.ids().into_iter().filter(|&i| i != victim) {
        status_until(&c, id, "a survivor purged its log behind a snapshot", |s| {
            s.first_log_index > 1
        })
        .await;
    }
    c.kill(victim);
    c.wipe(victim);
    c.restart(victim);
    let status = c.wait_applied(victim, last + 1, 30 * SECOND).await;
    assert!(
        status.snapshot_index > 0,
        "the wiped node was restored from a snapshot: {status:?}"
    );
    let scan = c
        .kv(victim)
        .scan(req(
            pb::ScanRequest {
                start: b"s".to_vec(),
                end: b"t".to_vec(),
                limit: 1000,
                consistency: pb::Consistency::Eventual as i32,
                min_revision: 0,
            },
            5 * SECOND,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(scan.kvs.len(), 299, "every key but the deleted one");
    assert_eq!(scan.kvs[0].key, b"s001");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_whole_cluster_loses_no_acknowledged_write() {
    let mut c = Cluster::start(3, &[]);
    c.wait_leader(&c.ids(), 20 * SECOND).await;
    let acked = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let endpoints = c.endpoints();
        let acked = acked.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let client = raftkv_client::Client::new(&endpoints, 2 * SECOND).unwrap();
            for i in 0..100_000u64 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let key = format!("w{w}-{i}");
                match client
                    .put(key.clone().into_bytes(), key.clone().into_bytes(), false)
                    .await
                {
                    Ok(_) => {
                        acked.lock().unwrap().insert(key, ());
                    }
                    Err(_) => break, // the cluster is gone
                }
            }
        }));
    }
    // Let writes flow, then kill everything at once, mid-stream.
    let deadline = Instant::now() + 10 * SECOND;
    while acked.lock().unwrap().len() < 300 {
        assert!(
            Instant::now() < deadline,
            "writes are not being acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for id in c.ids() {
        c.kill(id);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let acked: Vec<String> = acked.lock().unwrap().keys().cloned().collect();
    for id in c.ids() {
        c.restart(id);
    }
    c.wait_leader(&c.ids(), 20 * SECOND).await;
    let client = c.client();
    let mut missing = Vec::new();
    for key in &acked {
        let got = client
            .get(key.clone().into_bytes(), pb::Consistency::Strong, 0)
            .await
            .unwrap();
        if got.kv.map(|kv| kv.value) != Some(key.clone().into_bytes()) {
            missing.push(key.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged writes lost: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(10)]
    );
    // `apply` does not flush, so each node recovered its state machine at some older `last_applied`
    // (or one ahead of its own log) and re-applied from there. Every node, read locally, must end up
    // with every acknowledged write, at the same revision as the others.
    let leader = c.wait_leader(&c.ids(), 20 * SECOND).await;
    let commit = c.status(leader).await.expect("leader status").commit_index;
    let mut revisions: BTreeMap<String, u64> = BTreeMap::new();
    for id in c.ids() {
        c.wait_applied(id, commit, 20 * SECOND).await;
        let mut kv = c.kv(id);
        for key in &acked {
            let got = kv
                .get(req(get(key, pb::Consistency::Eventual), 5 * SECOND))
                .await
                .unwrap()
                .into_inner()
                .kv
                .unwrap_or_else(|| panic!("node {id} lost acknowledged {key} after re-applying"));
            assert_eq!(got.value, key.as_bytes(), "node {id}, key {key}");
            let rev = *revisions.entry(key.clone()).or_insert(got.mod_revision);
            assert_eq!(
                rev, got.mod_revision,
                "node {id} re-applied {key} at another revision"
            );
        }
    }
}

fn create_if_absent(key: &str, value: &str) -> pb::TxnRequest {
    pb::TxnRequest {
        compare: vec![pb::Compare {
            key: key.into(),
            result: pb::CompareResult::Equal as i32,
            target: Some(pb::compare::Target::Version(0)),
        }],
        success: vec![pb::Op {
            op: Some(pb::op::Op::Put(put(key, value))),
        }],
        failure: vec![pb::Op {
            op: Some(pb::op::Op::Get(get(key, pb::Consistency::Strong))),
        }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_compare_and_swap_admits_exactly_one_winner() {
    let c = Cluster::start(3, &[]);
    c.wait_leader(&c.ids(), 20 * SECOND).await;

    // 12 concurrent create-if-absent attempts, spread over every node.
    let mut tasks = Vec::new();
    for i in 0..12u64 {
        let mut kv = c.kv(1 + i % 3);
        tasks.push(tokio::spawn(async move {
            let r = kv
                .txn(req(
                    create_if_absent("lock", &format!("owner{i}")),
                    10 * SECOND,
                ))
                .await
                .unwrap()
                .into_inner();
            (i, r)
        }));
    }
    let mut winners = Vec::new();
    let mut seen_by_losers = Vec::new();
    for t in tasks {
        let (i, r) = t.await.unwrap();
        if r.succeeded {
            winners.push(format!("owner{i}"));
        } else {
            let Some(pb::op_result::Result::Get(g)) = r.results[0].result.clone() else {
                panic!("failure branch returns the get: {r:?}")
            };
            seen_by_losers.push(String::from_utf8(g.kv.unwrap().value).unwrap());
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "exactly one create-if-absent wins: {winners:?}"
    );
    assert!(
        seen_by_losers.iter().all(|v| *v == winners[0]),
        "losers see the winner"
    );

    // Increment a counter with read + CAS on mod_revision; every success is exactly one increment.
    c.kv(1)
        .put(req(put("counter", "0"), 5 * SECOND))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..6u64 {
        let mut kv = c.kv(1 + i % 3);
        tasks.push(tokio::spawn(async move {
            let mut wins = 0u64;
            for _ in 0..200 {
                if wins == 5 {
                    break;
                }
                let cur = kv
                    .get(req(get("counter", pb::Consistency::Strong), 5 * SECOND))
                    .await
                    .unwrap()
                    .into_inner()
                    .kv
                    .unwrap();
                let n: u64 = String::from_utf8(cur.value).unwrap().parse().unwrap();
                let txn = pb::TxnRequest {
                    compare: vec![pb::Compare {
                        key: b"counter".to_vec(),
                        result: pb::CompareResult::Equal as i32,
                        target: Some(pb::compare::Target::ModRevision(cur.mod_revision)),
                    }],
                    success: vec![pb::Op {
                        op: Some(pb::op::Op::Put(put("counter", &(n + 1).to_string()))),
                    }],
                    failure: vec![],
                };
                if kv
                    .txn(req(txn, 5 * SECOND))
                    .await
                    .unwrap()
                    .into_inner()
                    .succeeded
                {
                    wins += 1;
                }
            }
            wins
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 30, "every client eventually wins 5 times");
    let final_value = c
        .kv(2)
        .get(req(get("counter", pb::Consistency::Strong), 5 * SECOND))
        .await
        .unwrap()
        .into_inner()
        .kv
        .unwrap();
    assert_eq!(final_value.value, b"30", "no lost or doubled increment");
    assert_eq!(final_value.version, 31);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_clear_statuses_and_never_crash_a_node() {
    let mut c = Cluster::start(3, &[]);
    c.wait_leader(&c.ids(), 20 * SECOND).await;
    let mut kv = c.kv(2);
    let code = |r: Result<tonic::Response<_>, tonic::Status>| -> (tonic::Code, String) {
        match r {
            Ok(_) => (tonic::Code::Ok, String::new()),
            Err(s) => (s.code(), s.message().to_string()),
        }
    };
    let t = 5 * SECOND;

    let (c1, m1) = code(
        kv.put(req(put("", "v"), t))
            .await
            .map(|_| tonic::Response::new(())),
    );
    assert_eq!(c1, tonic::Code::InvalidArgument, "{m1}");
    assert!(m1.contains("empty"), "{m1}");

    let long_key = "k".repeat(4097);
    let (c2, m2) = code(
        kv.put(req(put(&long_key, "v"), t))
            .await
            .map(|_| tonic::Response::new(())),
    );
    assert_eq!(c2, tonic::Code::InvalidArgument);
    assert!(m2.contains("4096"), "names the limit: {m2}");
    let ok_key = "k".repeat(4096);
    kv.put(req(put(&ok_key, "v"), t))
        .await
        .expect("a 4096-byte key is fine");

    let big = pb::PutRequest {
        key: b"big".to_vec(),
        value: vec![0; 1024 * 1024 + 1],
        prev_kv: false,
        lease: 0,
    };
    let (c3, m3) = code(kv.put(req(big, t)).await.map(|_| tonic::Response::new(())));
    assert_eq!(c3, tonic::Code::InvalidArgument, "{m3}");

    let huge = pb::PutRequest {
        key: b"huge".to_vec(),
        value: vec![0; 5 * 1024 * 1024],
        prev_kv: false,
        lease: 0,
    };
    let (c4, m4) = code(kv.put(req(huge, t)).await.map(|_| tonic::Response::new(())));
    assert_eq!(c4, tonic::Code::ResourceExhausted, "{m4}");

    let bad_scan = pb::ScanRequest {
        start: b"b".to_vec(),
        end: b"a".to_vec(),
        limit: 0,
        consistency: 0,
        min_revision: 0,
    };
    let (c5, _) = code(
        kv.scan(req(bad_scan, t))
            .await
            .map(|_| tonic::Response::new(())),
    );
    assert_eq!(c5, tonic::Code::InvalidArgument);

    let too_many = pb::TxnRequest {
        compare: vec![],
        success: (0..129)
            .map(|i| pb::Op {
                op: Some(pb::op::Op::Put(put(&format!("t{i}"), "v"))),
            })
            .collect(),
        failure: vec![],
    };
    let (c6, m6) = code(
        kv.txn(req(too_many, t))
            .await
            .map(|_| tonic::Response::new(())),
    );
    assert_eq!(c6, tonic::Code::InvalidArgument);
    assert!(m6.contains("128"), "{m6}");

    let empty_op = pb::TxnRequest {
        compare: vec![],
        success: vec![pb::Op { op: None }],
        failure: vec![],
    };
    let (c7, _) = code(
        kv.txn(req(empty_op, t))
            .await
            .map(|_| tonic::Response::new(())),
    );
    assert_eq!(c7, tonic::Code::InvalidArgument);

    let mut bad_consistency = get("x", pb::Consistency::Strong);
    bad_consistency.consistency = 42;
    let (c8, _) = code(
        kv.get(req(bad_consistency, t))
            .await
            .map(|_| tonic::Response::new(())),
    );
    assert_eq!(c8, tonic::Code::InvalidArgument);

    // Nothing above reached the log or hurt a node.
    for id in c.ids() {
        assert!(c.alive(id), "node {id} is still running");
    }
    let got = kv
        .get(req(get("big", pb::Consistency::Strong), t))
        .await
        .unwrap()
        .into_inner();
    assert!(got.kv.is_none(), "rejected writes were not applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_carries_a_leader_hint() {
    let mut c = Cluster::start(3, &[]);
    let leader = c.wait_leader(&c.ids(), 20 * SECOND).await;
    let follower = c.ids().into_iter().find(|&i| i != leader).unwrap();
    // Pause every other node: the follower still remembers the leader, cannot reach it, and must say
    // whom it last knew within the deadline.
    for id in c.ids().into_iter().filter(|&i| i != follower) {
        c.pause(id);
    }
    let err = c
        .kv(follower)
        .put(req(put("x", "y"), 2 * SECOND))
        .await
        .expect_err("no quorum");
    for id in c.ids().into_iter().filter(|&i| i != follower) {
        c.resume(id);
    }
    // A forward that timed out may have been applied (UNKNOWN/DEADLINE_EXCEEDED); one that never left
    // must be UNAVAILABLE. Either way the message says what happened.
    match err.code() {
        tonic::Code::Unavailable => {
            assert!(err.message().contains("leader"), "{err:?}");
        }
        tonic::Code::DeadlineExceeded | tonic::Code::Unknown => {}
        other => panic!("unexpected {other:?}: {err:?}"),
    }
    assert!(err.metadata().get("raftkv-node-id").is_some(), "{err:?}");
}

async fn health(addr: &str, service: &str) -> Result<i32, tonic::Status> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let request = HealthCheckRequest {
        service: service.to_string(),
    };
    let mut client = HealthClient::new(common::channel(addr));
    Ok(client
        .check(req(request, Duration::from_secs(2)))
        .await?
        .into_inner()
        .status)
}

async fn wait_health(
    addr: &str,
    service: &str,
    want: tonic_health::ServingStatus,
    within: Duration,
) {
    let want = tonic_health::pb::health_check_response::ServingStatus::from(want) as i32;
    let what = format!("{addr} health of {service:?} to become {want}");
    eventually(within, &what, || async {
        match health(addr, service).await? {
            s if s == want => Ok(()),
            s => Err(tonic::Status::failed_precondition(format!("status {s}"))),
        }
    })
    .await
}

/// `raftkv.v1.KV` health says whether strong reads and writes can be served through the node: a follower
/// left without a quorum (which still names its old leader for a while) turns NOT_SERVING while the
/// process itself stays SERVING (a liveness probe must not restart it), and it turns SERVING again once
/// the quorum is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_health_follows_the_quorum() {
    use tonic_health::ServingStatus::{NotServing, Serving};
    const KV: &str = "raftkv.v1.KV";
    let mut cluster = Cluster::start(3, &[]);
    let leader = cluster
        .wait_leader(&[1, 2, 3], Duration::from_secs(20))
        .await;
    for id in cluster.ids() {
        wait_health(&cluster.addr(id), KV, Serving, Duration::from_secs(10)).await;
    }

    let followers: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|&id| id != leader)
        .collect();
    let (survivor, gone) = (followers[0], [leader, followers[1]]);
    for id in gone {
        cluster.kill(id);
    }
    let at = cluster.addr(survivor);
    wait_health(&at, KV, NotServing, Duration::from_secs(10)).await;
    wait_health(&at, "", Serving, Duration::from_secs(1)).await;
    // Eventual reads still work there; that is why the process stays up.
    let mut kv = cluster.kv(survivor);
    kv.get(req(
        get("absent", pb::Consistency::Eventual),
        Duration::from_secs(2),
    ))
    .await
    .expect("eventual read without a quorum");

    for id in gone {
        cluster.start_again(id);
    }
    wait_health(&at, KV, Serving, Duration::from_secs(20)).await;
}

/// A call whose deadline passes before raftkv's handler can answer (here: its request body never
/// comes, so no handler runs) ends in DEADLINE_EXCEEDED from the node, not in the `CANCELLED:
/// Timeout expired` that tonic's server answers on its own when the client's `grpc-timeout` runs out.
/// A bare HTTP/2 client, because tonic's client enforces the same header itself and would answer
/// first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_passes_in_the_server_is_deadline_exceeded() {
    let c = Cluster::start(1, &[]);
    eventually(10 * SECOND, "first put", || async {
        c.kv(1).put(req(put("k", "v"), 2 * SECOND)).await
    })
    .await;
    let tcp = tokio::net::TcpStream::connect(c.addr(1)).await.unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(connection);
    let mut h2 = h2.ready().await.expect("h2 ready");
    let request = http::Request::post(format!("http://{}/raftkv.v1.KV/Get", c.addr(1)))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "300m")
        .body(())
        .unwrap();
    let started = Instant::now();
    // The body stays open and empty: the handler waits for a message that never comes.
    let (response, _body) = h2.send_request(request, false).expect("send");
    let response = tokio::time::timeout(5 * SECOND, response)
        .await
        .expect("an answer by the deadline, not a hang")
        .expect("a response");
    let elapsed = started.elapsed();
    let (parts, mut body) = response.into_parts();
    // Trailers-only (the status in the headers), or headers followed by trailers.
    let trailers = match parts.headers.get("grpc-status") {
        Some(_) => parts.headers,
        None => tokio::time::timeout(5 * SECOND, body.trailers())
            .await
            .expect("trailers in time")
            .expect("trailers")
            .expect("a status in the trailers"),
    };
    let status = trailers.get("grpc-status").and_then(|v| v.to_str().ok());
    let message = trailers.get("grpc-message").and_then(|v| v.to_str().ok());
    assert_eq!(
        status,
        Some("4"),
        "want DEADLINE_EXCEEDED (4), got {status:?}: {message:?}"
    );
    assert!(
        trailers.contains_key("raftkv-node-id"),
        "the node's own answer: {trailers:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < 3 * SECOND,
        "answered after {elapsed:?} for a 300 ms deadline"
    );
}
