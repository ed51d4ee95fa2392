//! `raftkv.v1.Lease` on a real cluster: keys that live while their lease is kept alive (through a
//! follower too) and go, in one revision that watches see, once keep-alives stop, never before the
//! TTL after the last acknowledged one; revocation; clear statuses for bad requests; a lease that
//! survives leader kills while kept alive and, unrenewed, still expires while leaders keep changing
//! (the checkpointed countdown); leases across SIGKILL of every node and across a snapshot install.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Cluster, eventually, put};
use raftkv::pb::v1 as pb;
use raftkv::pb::v1::lease_client::LeaseClient;
use raftkv::pb::v1::watch_client::WatchClient;
use tokio::time::Instant;
use tonic::Code;

const SECOND: Duration = Duration::from_secs(1);

fn lease_client(c: &Cluster, id: u64) -> LeaseClient<tonic::transport::Channel> {
    LeaseClient::new(c.channel(id))
}

fn leased(key: &str, value: &str, lease: u64) -> pb::PutRequest {
    pb::PutRequest {
        lease,
        ..put(key, value)
    }
}

async fn grant(
    c: &Cluster,
    node: u64,
    ttl_ms: u64,
    id: u64,
) -> Result<pb::LeaseGrantResponse, tonic::Status> {
    lease_client(c, node)
        .grant(pb::LeaseGrantRequest { ttl_ms, id })
        .await
        .map(|r| r.into_inner())
}

/// The key on node `id`, read strongly: `None` once it is gone.
async fn strong_get(
    c: &Cluster,
    id: u64,
    key: &str,
) -> Result<Option<pb::KeyValue>, tonic::Status> {
    c.kv(id)
        .get(common::get(key, pb::Consistency::Strong))
        .await
        .map(|r| r.into_inner().kv)
}

/// A node other than the leader.
async fn follower(c: &Cluster) -> u64 {
    let leader = c.wait_leader(&[1, 2, 3], 10 * SECOND).await;
    if leader == 1 { 2 } else { 1 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leased_key_lives_while_kept_alive_and_goes_no_sooner_than_its_ttl_after() {
    let c = Cluster::start(3, &[]);
    let node = follower(&c).await;
    let ttl = 2 * SECOND;
    let lease = eventually(10 * SECOND, "grant", || grant(&c, node, 2000, 0)).await;
    assert_eq!(lease.ttl_ms, 2000);
    let id = lease.id;
    assert_ne!(id, 0);
    let mut kv = c.kv(node);
    let r1 = kv.put(leased("svc/a", "1", id)).await.unwrap().into_inner();
    kv.put(leased("svc/b", "2", id)).await.unwrap();
    let from = r1.header.unwrap().revision;
    let got = strong_get(&c, node, "svc/a").await.unwrap().unwrap();
    assert_eq!(got.lease, id);
    let ttl_keys = lease_client(&c, node)
        .time_to_live(pb::LeaseTimeToLiveRequest { id, keys: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ttl_keys.granted_ttl_ms, 2000);
    assert!(
        ttl_keys.ttl_ms > 0 && ttl_keys.ttl_ms <= 2000,
        "{ttl_keys:?}"
    );
    assert_eq!(ttl_keys.keys, vec![b"svc/a".to_vec(), b"svc/b".to_vec()]);
    let mut watch = WatchClient::new(c.channel(3))
        .watch(pb::WatchRequest {
            start: b"svc/".to_vec(),
            end: b"svc0".to_vec(),
            start_revision: from,
            prev_kv: false,
            progress_notify_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();

    // Kept alive over a stream to a follower for well past the TTL.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut responses = lease_client(&c, node)
        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut last_sent = Instant::now();
    let kept_until = Instant::now() + 3 * ttl;
    while Instant::now() < kept_until {
        let sent = Instant::now();
        tx.send(pb::LeaseKeepAliveRequest { id }).await.unwrap();
        let r = responses.message().await.unwrap().unwrap();
        assert_eq!((r.id, r.ttl_ms), (id, 2000));
        last_sent = sent;
        assert!(strong_get(&c, node, "svc/a").await.unwrap().is_some());
        tokio::time::sleep(ttl / 4).await;
    }
    // Then silence: present until the TTL after the last acknowledged keep-alive, gone soon after.
    let gone_at = loop {
        let present = strong_get(&c, node, "svc/a").await.unwrap().is_some();
        let answered = Instant::now();
        if !present {
            break answered;
        }
        assert!(
            answered < last_sent + ttl + 3 * SECOND,
            "the lease outlived its TTL"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        gone_at >= last_sent + ttl,
        "expired {:?} before its TTL ran out",
        last_sent + ttl - gone_at
    );
    assert!(strong_get(&c, node, "svc/b").await.unwrap().is_none());
    // One DELETE per key, at one revision, after the puts.
    let mut deletes = Vec::new();
    while deletes.len() < 2 {
        let r = tokio::time::timeout(10 * SECOND, watch.message())
            .await
            .expect("the watch sees the expiry")
            .unwrap()
            .unwrap();
        for e in r.events {
            if e.r#type == pb::EventType::Delete as i32 {
                let kv = e.kv.unwrap();
                deletes.push((kv.key, kv.mod_revision));
            }
        }
    }
    assert_eq!(deletes[0].1, deletes[1].1, "{deletes:?}");
    assert_eq!(
        deletes.iter().map(|d| d.0.clone()).collect::<Vec<_>>(),
        vec![b"svc/a".to_vec(), b"svc/b".to_vec()]
    );
    // The stream says the lease is gone; the unary calls say NOT_FOUND.
    tx.send(pb::LeaseKeepAliveRequest { id }).await.unwrap();
    let r = responses.message().await.unwrap().unwrap();
    assert_eq!(r.ttl_ms, 0);
    let once = lease_client(&c, node)
        .keep_alive_once(pb::LeaseKeepAliveRequest { id })
        .await
        .unwrap_err();
    assert_eq!(once.code(), Code::NotFound, "{once:?}");
    let ttl_gone = lease_client(&c, 3)
        .time_to_live(pb::LeaseTimeToLiveRequest { id, keys: false })
        .await
        .unwrap_err();
    assert_eq!(ttl_gone.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_deletes_the_keys_and_bad_requests_get_clear_statuses() {
    let c = Cluster::start(3, &["--max-lease-ttl-ms", "60000"]);
    c.wait_leader(&[1, 2, 3], 10 * SECOND).await;
    for bad in [0, 60_001] {
        let e = grant(&c, 1, bad, 0).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "ttl {bad}: {e:?}");
    }
    // Below the minimum is raised to it, as etcd does.
    let short = eventually(10 * SECOND, "grant", || grant(&c, 2, 10, 0)).await;
    assert_eq!(short.ttl_ms, 1000);
    let lease = grant(&c, 2, 30_000, 42).await.unwrap();
    assert_eq!(lease.id, 42);
    let again = grant(&c, 3, 30_000, 42).await.unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");

    let mut kv = c.kv(1);
    let missing = kv.put(leased("k/none", "v", 12345)).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    assert!(strong_get(&c, 1, "k/none").await.unwrap().is_none());
    // A txn naming a missing lease writes none of its ops.
    let txn = pb::TxnRequest {
        compare: vec![],
        success: vec![
            pb::Op {
                op: Some(pb::op::Op::Put(put("k/plain", "v"))),
            },
            pb::Op {
                op: Some(pb::op::Op::Put(leased("k/none", "v", 12345))),
            },
        ],
        failure: vec![],
    };
    assert_eq!(kv.txn(txn).await.unwrap_err().code(), Code::NotFound);
    assert!(strong_get(&c, 1, "k/plain").await.unwrap().is_none());

    kv.put(leased("k/1", "v", 42)).await.unwrap();
    kv.put(leased("k/2", "v", 42)).await.unwrap();
    // Overwritten without a lease, a key leaves it.
    kv.put(leased("k/3", "v", 42)).await.unwrap();
    kv.put(put("k/3", "kept")).await.unwrap();
    // A compare on the lease.
    let guarded = |lease: u64| pb::TxnRequest {
        compare: vec![pb::Compare {
            key: b"k/1".to_vec(),
            result: pb::CompareResult::Equal as i32,
            target: Some(pb::compare::Target::Lease(lease)),
        }],
        success: vec![],
        failure: vec![],
    };
    assert!(kv.txn(guarded(42)).await.unwrap().into_inner().succeeded);
    assert!(!kv.txn(guarded(0)).await.unwrap().into_inner().succeeded);
    let ids = lease_client(&c, 3)
        .leases(pb::LeaseLeasesRequest {})
        .await
        .unwrap()
        .into_inner()
        .ids;
    assert!(ids.contains(&42) && ids.contains(&short.id), "{ids:?}");

    lease_client(&c, 3)
        .revoke(pb::LeaseRevokeRequest { id: 42 })
        .await
        .unwrap();
    assert!(strong_get(&c, 2, "k/1").await.unwrap().is_none());
    assert!(strong_get(&c, 2, "k/2").await.unwrap().is_none());
    let kept = strong_get(&c, 2, "k/3").await.unwrap().unwrap();
    assert_eq!((kept.value.as_slice(), kept.lease), (&b"kept"[..], 0));
    let twice = lease_client(&c, 1)
        .revoke(pb::LeaseRevokeRequest { id: 42 })
        .await
        .unwrap_err();
    assert_eq!(twice.code(), Code::NotFound);
    let unknown = lease_client(&c, 1)
        .keep_alive_once(pb::LeaseKeepAliveRequest { id: 777 })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

/// Kills the leader every `every`, restarting the one killed before, until `until`; checks `alive`
/// between kills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_repeated_failovers_a_kept_lease_lives_and_an_unrenewed_one_still_expires() {
    let mut c = Cluster::start(3, &[]);
    c.wait_leader(&[1, 2, 3], 10 * SECOND).await;
    let client = Arc::new(c.client());
    let kept = client.lease_grant(3 * SECOND, 0).await.unwrap();
    let kept_alive = client.keep_alive(kept.id, Duration::from_millis(kept.ttl_ms));
    client
        .put_with_lease(b"kept".to_vec(), b"v".to_vec(), kept.id)
        .await
        .unwrap();
    let unrenewed_ttl = 6 * SECOND;
    let granted = Instant::now();
    let unrenewed = client.lease_grant(unrenewed_ttl, 0).await.unwrap();
    client
        .put_with_lease(b"unrenewed".to_vec(), b"v".to_vec(), unrenewed.id)
        .await
        .unwrap();
    // A leader lives about 4 s: longer than half the unrenewed TTL, so each can checkpoint it, and
    // short enough that a new leader restarting every countdown would keep it alive for good.
    let mut down: Option<u64> = None;
    let mut unrenewed_gone = None;
    let stop = granted + 20 * SECOND;
    while Instant::now() < stop {
        let up: Vec<u64> = [1, 2, 3].into_iter().filter(|n| Some(*n) != down).collect();
        let leader = c.wait_leader(&up, 20 * SECOND).await;
        let next_kill = Instant::now() + 4 * SECOND;
        while Instant::now() < next_kill {
            let node = up[0];
            if unrenewed_gone.is_none()
                && let Ok(None) = strong_get(&c, node, "unrenewed").await
            {
                unrenewed_gone = Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let Some(d) = down.take() {
            c.start_again(d);
        }
        c.kill(leader);
        down = Some(leader);
        assert!(!kept_alive.is_lost(), "the kept lease was lost");
    }
    if let Some(d) = down.take() {
        c.start_again(d);
    }
    let leader = c.wait_leader(&[1, 2, 3], 20 * SECOND).await;
    let gone = unrenewed_gone.expect("the unrenewed lease outlived 20 s of leader changes");
    assert!(gone >= granted + unrenewed_ttl, "expired early");
    assert!(
        gone < granted + unrenewed_ttl + 8 * SECOND,
        "the unrenewed lease took {:?} to expire",
        gone - granted
    );
    assert!(!kept_alive.is_lost());
    let still = eventually(10 * SECOND, "read the kept key", || {
        strong_get(&c, leader, "kept")
    })
    .await;
    assert_eq!(still.map(|kv| kv.lease), Some(kept.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_survive_a_crash_of_every_node_and_a_snapshot_install() {
    let mut c = Cluster::start(3, &["--snapshot-every", "20", "--keep-logs", "5"]);
    c.wait_leader(&[1, 2, 3], 10 * SECOND).await;
    let client = c.client();
    let lease = client.lease_grant(60 * SECOND, 0).await.unwrap();
    for key in ["a", "b"] {
        client
            .put_with_lease(format!("crash/{key}").into_bytes(), b"v".to_vec(), lease.id)
            .await
            .unwrap();
    }
    for id in [1, 2, 3] {
        c.kill(id);
    }
    for id in [1, 2, 3] {
        c.start_again(id);
    }
    c.wait_leader(&[1, 2, 3], 20 * SECOND).await;
    let ttl = eventually(20 * SECOND, "lease after the crash", || {
        client.lease_time_to_live(lease.id, true)
    })
    .await;
    assert_eq!(ttl.keys, vec![b"crash/a".to_vec(), b"crash/b".to_vec()]);

    // Node 3 misses the grant of a second lease and comes back by snapshot.
    c.pause(3);
    let leader = c.wait_leader(&[1, 2], 10 * SECOND).await;
    let second = client.lease_grant(60 * SECOND, 0).await.unwrap();
    let mut last = 0;
    for i in 0..300 {
        let r = client
            .put_with_lease(
                format!("snap/{i:03}").into_bytes(),
                b"v".to_vec(),
                second.id,
            )
            .await
            .unwrap();
        last = r.header.unwrap().revision;
    }
    c.wait_purged(leader, second.header.unwrap().revision, 20 * SECOND)
        .await;
    c.resume(3);
    let status = c.wait_applied(3, last, 20 * SECOND).await;
    assert!(status.snapshot_index > second.header.unwrap().revision);
    // Node 3's own table has the lease and its keys from the snapshot; revoking it empties them.
    let on_3 = lease_client(&c, 3)
        .time_to_live(pb::LeaseTimeToLiveRequest {
            id: second.id,
            keys: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(on_3.keys.len(), 300);
    let revoked = client.lease_revoke(second.id).await.unwrap();
    c.wait_applied(3, revoked.header.unwrap().revision, 10 * SECOND)
        .await;
    let left = c
        .kv(3)
        .scan(pb::ScanRequest {
            start: b"snap/".to_vec(),
            end: b"snap0".to_vec(),
            limit: 0,
            consistency: pb::Consistency::Eventual as i32,
            min_revision: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        left.kvs.is_empty(),
        "{} keys left on node 3",
        left.kvs.len()
    );
    assert_eq!(
        strong_get(&c, 3, "crash/a")
            .await
            .unwrap()
            .map(|kv| kv.lease),
        Some(lease.id)
    );
}
