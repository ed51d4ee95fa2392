//! The public API in process: a real node (its own sled directory, Raft, the layers server.rs mounts)
//! on a loopback listener, called through the generated client, as grpcurl or the CLI would.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;

use crate::listener::ConnectionLimits;
use crate::node::Node;
use crate::pb::v1 as pb;
use crate::pb::v1::cluster_client::ClusterClient;
use crate::pb::v1::kv_client::KvClient;

struct Served {
    node: Arc<Node>,
    kv: KvClient<Channel>,
    cluster: ClusterClient<Channel>,
    _server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

/// Node 1 of `peers` (its peer port unused), serving the public API. With `leader`, waits until it
/// has elected itself.
async fn serve(peers: &str, extra: &[&str], leader: bool) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let args = crate::config::test_args(dir.path(), peers, extra);
    let node = Node::start(&args).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let port = crate::server::Port {
        listener,
        connections: ConnectionLimits {
            max_connections: 16,
            handshake_timeout: Duration::from_secs(5),
        },
        max_concurrent_streams: 16,
        tls: None,
    };
    let server = tokio::spawn({
        let node = node.clone();
        async move {
            let _ = crate::server::serve_public(node, port, Default::default()).await;
        }
    });
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    if leader {
        let until = Instant::now() + Duration::from_secs(10);
        while node.status().header.leader_id != 1 {
            assert!(Instant::now() < until, "no leader within 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Served {
        node,
        kv: KvClient::new(channel.clone()),
        cluster: ClusterClient::new(channel),
        _server: server,
        _dir: dir,
    }
}

const ALONE: &str = "1=127.0.0.1:1/127.0.0.1:2";

fn req<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    crate::grpc::request(message, timeout)
}

fn put(key: &str, value: &[u8]) -> pb::PutRequest {
    pb::PutRequest {
        key: key.into(),
        value: value.to_vec(),
        prev_kv: true,
        lease: 0,
    }
}

fn get(key: &str, consistency: pb::Consistency, min_revision: u64) -> pb::GetRequest {
    pb::GetRequest {
        key: key.into(),
        consistency: consistency as i32,
        min_revision,
    }
}

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_is_read_back_at_its_revision_with_either_consistency() {
    let mut s = serve(ALONE, &[], true).await;
    let first =
        s.kv.put(req(put("k", b"v1"), SECOND))
            .await
            .unwrap()
            .into_inner();
    let second =
        s.kv.put(req(put("k", b"v2"), SECOND))
            .await
            .unwrap()
            .into_inner();
    let revision = second.header.unwrap().revision;
    assert!(revision > first.header.unwrap().revision);
    assert_eq!(second.prev_kv.unwrap().value, b"v1");
    for consistency in [pb::Consistency::Strong, pb::Consistency::Eventual] {
        let got =
            s.kv.get(req(get("k", consistency, revision), SECOND))
                .await
                .unwrap()
                .into_inner();
        let kv = got.kv.expect("the key is there");
        assert_eq!(kv.value, b"v2", "{consistency:?}");
        assert_eq!(kv.mod_revision, revision);
        assert_eq!(kv.version, 2);
        assert_eq!(got.header.unwrap().node_id, 1);
    }
    let status = s
        .cluster
        .status(req(pb::StatusRequest {}, SECOND))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.role, "leader");
    assert_eq!(status.voters.len(), 1);
    assert!(status.applied_index >= revision);
    assert_eq!(status.cluster_id, s.node.cluster().to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_with_the_code_that_says_so() {
    let mut s = serve(
        ALONE,
        &["--max-value-bytes", "1000", "--max-response-bytes", "6000"],
        true,
    )
    .await;
    let refused = |r: Result<_, tonic::Status>| -> tonic::Status { r.expect_err("refused") };

    let empty = refused(s.kv.put(req(put("", b"v"), SECOND)).await.map(|_| ()));
    assert_eq!(empty.code(), Code::InvalidArgument, "{empty:?}");
    assert_eq!(empty.metadata().get("raftkv-node-id").unwrap(), "1");

    let big = refused(
        s.kv.put(req(put("k", &[0; 1001]), SECOND))
            .await
            .map(|_| ()),
    );
    assert_eq!(big.code(), Code::InvalidArgument, "{big:?}");
    assert!(big.message().contains("--max-value-bytes"), "{big:?}");

    let mut unknown = get("k", pb::Consistency::Strong, 0);
    unknown.consistency = 42;
    let unknown = refused(s.kv.get(req(unknown, SECOND)).await.map(|_| ()));
    assert_eq!(unknown.code(), Code::InvalidArgument, "{unknown:?}");

    let backwards = pb::ScanRequest {
        start: b"b".to_vec(),
        end: b"a".to_vec(),
        ..Default::default()
    };
    let backwards = refused(s.kv.scan(req(backwards, SECOND)).await.map(|_| ()));
    assert_eq!(backwards.code(), Code::InvalidArgument, "{backwards:?}");

    // A txn whose results would not fit in a response is refused before it is proposed.
    s.kv.put(req(put("wide", &[7; 1000]), SECOND))
        .await
        .unwrap();
    let gets = (0..8)
        .map(|_| pb::Op {
            op: Some(pb::op::Op::Get(get("wide", pb::Consistency::Strong, 0))),
        })
        .collect();
    let txn = pb::TxnRequest {
        compare: vec![],
        success: gets,
        failure: vec![],
    };
    let wide = refused(s.kv.txn(req(txn, SECOND)).await.map(|_| ()));
    assert_eq!(wide.code(), Code::ResourceExhausted, "{wide:?}");

    // A revision the cluster has not reached: the read waits for it until its deadline.
    let future = get("k", pb::Consistency::Eventual, 1_000_000);
    let late = refused(
        s.kv.get(req(future, Duration::from_millis(300)))
            .await
            .map(|_| ()),
    );
    assert_eq!(late.code(), Code::DeadlineExceeded, "{late:?}");
}

/// A node whose only peer is missing never has a leader: a write is refused as not proposed (safe to
/// retry) before its deadline, a strong read likewise, and an eventual read is served anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_leader_writes_and_strong_reads_are_unavailable_and_eventual_reads_served() {
    let mut s = serve(
        "1=127.0.0.1:1/127.0.0.1:2,2=127.0.0.1:3/127.0.0.1:4",
        &[],
        false,
    )
    .await;
    let timeout = Duration::from_millis(800);
    let started = Instant::now();
    let write =
        s.kv.put(req(put("k", b"v"), timeout))
            .await
            .expect_err("refused");
    assert_eq!(write.code(), Code::Unavailable, "{write:?}");
    assert!(
        started.elapsed() < timeout,
        "answered before the client's deadline"
    );
    assert!(write.message().contains("no leader"), "{write:?}");
    let strong =
        s.kv.get(req(get("k", pb::Consistency::Strong, 0), timeout))
            .await
            .expect_err("refused");
    assert_eq!(strong.code(), Code::Unavailable, "{strong:?}");
    let eventual =
        s.kv.get(req(get("k", pb::Consistency::Eventual, 0), timeout))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(eventual.kv, None);
}
