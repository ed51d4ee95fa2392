//! `raftkv.v1.Watch` on a real cluster: events in revision order, none missing or repeated, whole
//! revisions per response; resumed on another node, after a restart and after a crash; the
//! window's end (OUT_OF_RANGE with the oldest revision in a trailer) for a start too old, for a
//! watcher that falls behind and for a node that installed a snapshot; progress notifications;
//! serving without a quorum; the bound on streams.

mod common;

use std::time::Duration;

use common::{Cluster, eventually, put};
use raftkv::pb::v1 as pb;
use raftkv::pb::v1::watch_client::WatchClient;
use tokio::time::Instant;

const SECOND: Duration = Duration::from_secs(1);

fn watch_client(c: &Cluster, id: u64) -> WatchClient<tonic::transport::Channel> {
    WatchClient::new(c.channel(id)).max_decoding_message_size(64 << 20)
}

fn range(start: &str, end: &str, from: u64) -> pb::WatchRequest {
    pb::WatchRequest {
        start: start.into(),
        end: end.into(),
        start_revision: from,
        prev_kv: true,
        progress_notify_ms: 0,
    }
}

/// One event as the tests compare them: (revision, type, key, value, previous value).
type Seen = (u64, i32, String, String, Option<String>);

fn seen(e: &pb::Event) -> Seen {
    let kv = e.kv.clone().unwrap_or_default();
    (
        kv.mod_revision,
        e.r#type,
        String::from_utf8_lossy(&kv.key).into_owned(),
        String::from_utf8_lossy(&kv.value).into_owned(),
        e.prev_kv
            .as_ref()
            .map(|p| String::from_utf8_lossy(&p.value).into_owned()),
    )
}

/// Opens a watch on node `id` and reads until the stream is complete through `through`; returns
/// the events and the revisions of the responses that carried events.
async fn collect(
    c: &Cluster,
    id: u64,
    request: pb::WatchRequest,
    through: u64,
) -> Result<(Vec<Seen>, Vec<Vec<u64>>), tonic::Status> {
    let mut stream = watch_client(c, id).watch(request).await?.into_inner();
    let deadline = Instant::now() + 20 * SECOND;
    let (mut events, mut responses) = (Vec::new(), Vec::new());
    loop {
        let next = tokio::time::timeout_at(deadline, stream.message()).await;
        let response = next
            .unwrap_or_else(|_| panic!("node {id}: the watch did not reach {through} in time"))?
            .expect("the stream does not end on its own");
        if !response.events.is_empty() {
            responses.push(
                response
                    .events
                    .iter()
                    .map(|e| e.kv.as_ref().map_or(0, |kv| kv.mod_revision))
                    .collect(),
            );
        }
        events.extend(response.events.iter().map(seen));
        if response.header.map_or(0, |h| h.revision) >= through {
            return Ok((events, responses));
        }
    }
}

/// Writes `key` and returns the revision of the write.
async fn put_at(
    client: &raftkv_client::Client,
    key: impl Into<Vec<u8>>,
    value: impl Into<Vec<u8>>,
) -> u64 {
    let r = client.put(key.into(), value.into(), false).await.unwrap();
    r.header.unwrap().revision
}

/// Reads `stream` until it ends with a status (passing each response to `each`), within 20 s.
async fn final_status(
    stream: &mut tonic::Streaming<pb::WatchResponse>,
    what: &str,
    mut each: impl FnMut(&pb::WatchResponse),
) -> tonic::Status {
    let deadline = Instant::now() + 20 * SECOND;
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Err(_) => panic!("{what}"),
            Ok(Err(status)) => return status,
            Ok(Ok(Some(r))) => each(&r),
            Ok(Ok(None)) => panic!("the stream ended without a status"),
        }
    }
}

/// Writes a mix of puts, deletes and a two-key txn; returns what every watcher of `w/` must see.
async fn writes(c: &Cluster) -> Vec<Seen> {
    let client = c.client();
    let mut expect = Vec::new();
    let put_rev = |r: pb::PutResponse| r.header.unwrap().revision;
    let r = client
        .put(b"w/a".to_vec(), b"1".to_vec(), false)
        .await
        .unwrap();
    expect.push((put_rev(r), 0, "w/a".into(), "1".into(), None));
    let r = client
        .put(b"w/b".to_vec(), b"2".to_vec(), false)
        .await
        .unwrap();
    expect.push((put_rev(r), 0, "w/b".into(), "2".into(), None));
    // Outside the watched range.
    client
        .put(b"x".to_vec(), b"-".to_vec(), false)
        .await
        .unwrap();
    let r = client
        .put(b"w/a".to_vec(), b"3".to_vec(), false)
        .await
        .unwrap();
    expect.push((put_rev(r), 0, "w/a".into(), "3".into(), Some("1".into())));
    let txn = pb::TxnRequest {
        compare: vec![],
        success: vec![
            pb::Op {
                op: Some(pb::op::Op::Put(put("w/c", "4"))),
            },
            pb::Op {
                op: Some(pb::op::Op::Delete(pb::DeleteRequest {
                    key: "w/b".into(),
                    prev_kv: false,
                })),
            },
        ],
        failure: vec![],
    };
    let r = client.txn(txn).await.unwrap();
    let rev = r.header.unwrap().revision;
    expect.push((rev, 0, "w/c".into(), "4".into(), None));
    expect.push((rev, 1, "w/b".into(), String::new(), Some("2".into())));
    // Deleting a key that is not there changes nothing, and is no event.
    client.delete(b"w/zz".to_vec(), false).await.unwrap();
    let r = client.delete(b"w/a".to_vec(), false).await.unwrap();
    expect.push((
        r.header.unwrap().revision,
        1,
        "w/a".into(),
        String::new(),
        Some("3".into()),
    ));
    expect
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_streams_every_change_once_in_order_and_resumes_anywhere() {
    let c = Cluster::start(3, &[]);
    c.wait_leader(&[1, 2, 3], 10 * SECOND).await;
    let first = put_at(&c.client(), b"before".to_vec(), b"0".to_vec()).await;
    // A live watch from now on, opened before the writes.
    let mut live = watch_client(&c, 3)
        .watch(range("w/", "w0", 0))
        .await
        .unwrap()
        .into_inner();
    let opened = live.message().await.unwrap().expect("the first response");
    assert!(
        opened.events.is_empty(),
        "the first response only says where the stream starts"
    );
    let start = opened.header.unwrap().revision;
    assert!(start >= first, "{start} < {first}");

    let expect = writes(&c).await;
    let last = expect.last().unwrap().0;
    let txn_rev = expect[3].0;
    for id in [1, 2, 3] {
        let (events, responses) = collect(&c, id, range("w/", "w0", first), last)
            .await
            .unwrap();
        assert_eq!(events, expect, "node {id} from revision {first}");
        for revisions in &responses {
            if revisions.contains(&txn_rev) {
                assert_eq!(
                    revisions.iter().filter(|r| **r == txn_rev).count(),
                    2,
                    "node {id}: a txn's events come in one response"
                );
            }
        }
    }
    // Resumed from the middle, on another node: exactly the rest.
    let (events, _) = collect(&c, 2, range("w/", "w0", expect[2].0), last)
        .await
        .unwrap();
    assert_eq!(events, expect[2..].to_vec());

    let mut got = Vec::new();
    while got.len() < expect.len() {
        let r = tokio::time::timeout(10 * SECOND, live.message())
            .await
            .expect("live events in time")
            .unwrap()
            .unwrap();
        got.extend(r.events.iter().map(seen));
    }
    assert_eq!(got, expect, "the live watch");

    // One key only, without previous values.
    let mut only_c = range("w/c", "w/c\0", first);
    only_c.prev_kv = false;
    let (events, _) = collect(&c, 1, only_c, last).await.unwrap();
    assert_eq!(events, vec![(txn_rev, 0, "w/c".into(), "4".into(), None)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_survives_a_clean_restart_and_a_crash() {
    let mut c = Cluster::start(3, &[]);
    c.wait_leader(&[1, 2, 3], 10 * SECOND).await;
    let expect = writes(&c).await;
    let (first, last) = (expect[0].0, expect.last().unwrap().0);
    c.wait_applied(2, last, 10 * SECOND).await;
    c.stop(2).await;
    c.start_again(2);
    c.wait_applied(2, last, 20 * SECOND).await;
    let (events, _) = collect(&c, 2, range("w/", "w0", first), last)
        .await
        .unwrap();
    assert_eq!(events, expect, "after a clean restart");
    c.kill(2);
    c.start_again(2);
    c.wait_applied(2, last, 20 * SECOND).await;
    let (events, _) = collect(&c, 2, range("w/", "w0", first), last)
        .await
        .unwrap();
    assert_eq!(events, expect, "after a SIGKILL");
}

fn compact_revision(status: &tonic::Status) -> u64 {
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    status
        .metadata()
        .get("raftkv-compact-revision")
        .unwrap_or_else(|| panic!("no raftkv-compact-revision on {status:?}"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_older_than_the_window_ends_the_watch_with_out_of_range() {
    let c = Cluster::start(3, &["--watch-history-revisions", "5"]);
    c.wait_leader(&[1, 2, 3], 10 * SECOND).await;
    let client = c.client();
    let mut revisions = Vec::new();
    for i in 0..12 {
        let r = client
            .put(format!("k{i}").into_bytes(), b"v".to_vec(), false)
            .await
            .unwrap();
        revisions.push(r.header.unwrap().revision);
    }
    let last = *revisions.last().unwrap();
    c.wait_applied(1, last, 10 * SECOND).await;
    let err = collect(&c, 1, range("", "", revisions[0]), last)
        .await
        .expect_err("revision 1 is gone");
    let oldest = compact_revision(&err);
    assert_eq!(oldest, revisions[7], "the last five puts are kept");
    let (events, _) = collect(&c, 1, range("", "", oldest), last).await.unwrap();
    let got: Vec<u64> = events.iter().map(|e| e.0).collect();
    assert_eq!(got, revisions[7..].to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_falls_behind_the_window_is_told_and_writes_go_on() {
    let c = Cluster::start(3, &["--watch-history-revisions", "20"]);
    c.wait_leader(&[1, 2, 3], 10 * SECOND).await;
    let client = c.client();
    let mut slow = watch_client(&c, 2)
        .watch(range("", "", 0))
        .await
        .unwrap()
        .into_inner();
    // Never read while the writes go on: responses of 16 KiB fill the connection's window.
    let big = vec![b'x'; 16 * 1024];
    let mut last = 0;
    for i in 0..200u32 {
        let r = tokio::time::timeout(
            10 * SECOND,
            client.put(format!("big{}", i % 7).into_bytes(), big.clone(), false),
        )
        .await
        .expect("a watcher that does not read never holds up a write")
        .unwrap();
        last = r.header.unwrap().revision;
    }
    c.wait_applied(2, last, 10 * SECOND).await;
    let mut next = 0;
    let status = final_status(
        &mut slow,
        "the slow watcher was never told it fell behind",
        |r| {
            for e in &r.events {
                let rev = e.kv.as_ref().unwrap().mod_revision;
                assert!(rev >= next, "events in order, none repeated");
                next = rev + 1;
            }
        },
    )
    .await;
    let oldest = compact_revision(&status);
    assert!(
        oldest > next,
        "the window moved past the watcher: {oldest} <= {next}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_install_ends_the_watches_it_skipped() {
    let mut c = Cluster::start(3, &["--snapshot-every", "20", "--keep-logs", "5"]);
    c.wait_leader(&[1, 2, 3], 10 * SECOND).await;
    let client = c.client();
    let first = put_at(&client, b"s0".to_vec(), b"v".to_vec()).await;
    c.wait_applied(3, first, 10 * SECOND).await;
    let mut watch = watch_client(&c, 3)
        .watch(range("", "", first))
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while events.is_empty() {
        events.extend(watch.message().await.unwrap().unwrap().events);
    }
    // Node 3 misses enough of the log that the leader can only send it a snapshot.
    c.pause(3);
    let leader = c.wait_leader(&[1, 2], 10 * SECOND).await;
    // openraft purges in batches of 256 entries: more than that behind the snapshot.
    let mut last = 0;
    for i in 0..400 {
        last = put_at(&client, format!("s{i}").into_bytes(), b"v".to_vec()).await;
    }
    c.wait_purged(leader, first + 1, 20 * SECOND).await;
    c.resume(3);
    let status = c.wait_applied(3, last, 20 * SECOND).await;
    assert!(status.snapshot_index > first);
    let status = final_status(
        &mut watch,
        "the watch went on silently past the install",
        |_| {},
    )
    .await;
    let oldest = compact_revision(&status);
    assert!(oldest > first + 1, "{oldest}");
    // Watched again from there, node 3 streams what it applied after the snapshot.
    let (events, _) = collect(&c, 3, range("", "", oldest), last).await.unwrap();
    assert!(events.iter().all(|e| e.0 >= oldest));
    assert_eq!(events.last().map(|e| e.0), Some(last));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_reports_come_without_changes_and_without_a_quorum() {
    let mut c = Cluster::start(3, &["--max-watches", "2"]);
    c.wait_leader(&[1, 2, 3], 10 * SECOND).await;
    let expect = writes(&c).await;
    let last = expect.last().unwrap().0;
    c.wait_applied(1, last, 10 * SECOND).await;
    let mut quiet = range("nothing/", "nothing0", 0);
    quiet.progress_notify_ms = 100;
    let mut stream = watch_client(&c, 1).watch(quiet).await.unwrap().into_inner();
    let started = Instant::now();
    let mut reports = 0;
    while reports < 4 {
        let r = tokio::time::timeout(5 * SECOND, stream.message())
            .await
            .expect("a progress report in time")
            .unwrap()
            .unwrap();
        assert!(r.events.is_empty());
        assert!(r.header.unwrap().revision >= last);
        reports += 1;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "reports are paced"
    );

    // A second stream fills --max-watches; a third is refused.
    let _second = watch_client(&c, 1)
        .watch(range("", "", 0))
        .await
        .unwrap()
        .into_inner();
    let refused = watch_client(&c, 1)
        .watch(range("", "", 0))
        .await
        .expect_err("over --max-watches");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    let bad = watch_client(&c, 2).watch(range("b", "a", 0)).await;
    assert_eq!(bad.unwrap_err().code(), tonic::Code::InvalidArgument);

    // Alone, node 1 has no quorum (once its read lease has run out, strong reads fail), and still
    // streams what it has.
    c.kill(2);
    c.kill(3);
    drop(_second);
    let deadline = Instant::now() + 10 * SECOND;
    loop {
        let strong = c
            .kv(1)
            .get(common::req(
                common::get("w/a", pb::Consistency::Strong),
                Duration::from_millis(300),
            ))
            .await;
        if strong.is_err() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 1 alone still serves strong reads"
        );
    }
    let first = expect[0].0;
    let (events, _) = eventually(10 * SECOND, "a watch slot frees", || {
        collect(&c, 1, range("w/", "w0", first), last)
    })
    .await;
    assert_eq!(events, expect);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_resumes_a_watch_across_a_node_that_stops() {
    let mut c = Cluster::start(3, &[]);
    c.wait_leader(&[1, 2, 3], 10 * SECOND).await;
    let client = c.client();
    let mut watch = client.watch(raftkv_client::WatchOptions::prefix("r/"));
    // The first response says where it starts; after that, count every event.
    let opened = tokio::time::timeout(10 * SECOND, watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(opened.events.is_empty());
    let mut written = Vec::new();
    let mut got = Vec::new();
    for round in 0..3u64 {
        for i in 0..20u64 {
            let r = client
                .put(format!("r/{round}-{i}").into_bytes(), b"v".to_vec(), false)
                .await
                .unwrap();
            written.push(r.header.unwrap().revision);
        }
        // Whichever node serves the watch, one of them stops (and comes back) between rounds.
        let victim = round % 3 + 1;
        c.stop(victim).await;
        c.start_again(victim);
        c.wait_leader(&[1, 2, 3], 20 * SECOND).await;
    }
    while got.len() < written.len() {
        let r = tokio::time::timeout(20 * SECOND, watch.next())
            .await
            .expect("events keep coming")
            .unwrap()
            .unwrap();
        got.extend(r.events.iter().map(|e| e.kv.as_ref().unwrap().mod_revision));
    }
    assert_eq!(
        got, written,
        "every write once, in order, across the restarts"
    );
}
