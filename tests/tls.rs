//! TLS on both ports, against real `raftkv server` processes: the CLI and grpcurl reach a TLS
//! cluster with the CA, plaintext and certificate-less clients are refused where they must be, and
//! the peer port admits no one without a certificate from the nodes' CA, nor a node in another's
//! name. The certificates are made for each test with rcgen (`raftkv::tls::generate`).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Cluster, bin, eventually, get, put, req};
use raftkv::pb::internal::Payload;
use raftkv::pb::v1 as pb;
use raftkv::tls::files;
use raftkv::types::{TypeConfig, Vote, VoteRequest};
use tonic::transport::ClientTlsConfig;

const SECOND: Duration = Duration::from_secs(1);

/// Runs the CLI (`raftkv ARGS`), returning its output.
fn cli(args: &[String]) -> std::process::Output {
    Command::new(bin())
        .args(args)
        .env_remove("RAFTKV_CACERT")
        .env_remove("RAFTKV_CERT")
        .env_remove("RAFTKV_KEY")
        .output()
        .expect("run the CLI")
}

fn args(verb: &[&str], endpoints: &str, tls: &[(&str, &Path)]) -> Vec<String> {
    let mut v: Vec<String> = verb.iter().map(|s| s.to_string()).collect();
    v.extend(["--endpoints".to_string(), endpoints.to_string()]);
    v.extend(["--timeout-ms".to_string(), "3000".to_string()]);
    for (flag, path) in tls {
        v.push(flag.to_string());
        v.push(path.display().to_string());
    }
    v
}

fn text(out: &std::process::Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The CLI ran and the call failed (exit 2, `error: ...`), rather than its arguments being refused.
fn assert_refused(out: &std::process::Output, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(2) && stderr.starts_with("error: ") && !stderr.contains("Usage:"),
        "{what}: {}",
        text(out)
    );
}

async fn ready(cluster: &Cluster) -> u64 {
    let leader = cluster.wait_leader(&cluster.ids(), 20 * SECOND).await;
    let kv = cluster.kv(leader);
    eventually(10 * SECOND, "first TLS write", || {
        let mut kv = kv.clone();
        async move { kv.put(req(put("ready", "1"), SECOND)).await }
    })
    .await;
    leader
}

fn log_of(cluster: &Cluster, id: u64) -> String {
    std::fs::read_to_string(cluster.log_path(id)).unwrap_or_default()
}

/// The CLI with `--cacert` writes and strongly reads; without it (plaintext) it is refused, and the
/// node says why in its log; grpcurl reaches the same cluster with `-cacert`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_serves_the_cli_and_grpcurl_and_refuses_plaintext() {
    let cluster = Cluster::start_tls(3, &[]);
    ready(&cluster).await;
    let certs = cluster.tls_dir().expect("TLS").to_path_buf();
    let ca = certs.join(files::CA);
    let endpoints = cluster.endpoints().join(",");

    let out = cli(&args(&["put", "k", "v"], &endpoints, &[("--cacert", &ca)]));
    assert!(out.status.success(), "put over TLS: {}", text(&out));
    let out = cli(&args(
        &["get", "k", "--consistency", "strong"],
        &endpoints,
        &[("--cacert", &ca)],
    ));
    assert!(out.status.success(), "strong get over TLS: {}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "v");

    // Plaintext against a TLS port: refused, and logged (rate-limited) by the node.
    let out = cli(&args(&["get", "k"], &cluster.addr(1), &[]));
    assert_refused(&out, "plaintext get");
    let mut plain = raftkv::pb::v1::kv_client::KvClient::new(common::channel(&cluster.addr(2)));
    let refused = plain
        .get(req(get("k", pb::Consistency::Eventual), SECOND))
        .await;
    assert!(refused.is_err(), "a plaintext gRPC client was served");
    for id in [1, 2] {
        let deadline = tokio::time::Instant::now() + 5 * SECOND;
        while !log_of(&cluster, id).contains("TLS handshake failed") {
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {id} did not log the refused plaintext client"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // grpcurl 1.8.6 (scripts/test.sh --install-only) with -cacert, through server reflection.
    let ca_arg = ca.display().to_string();
    let grpcurl = |extra: &[&str]| {
        let mut c = Command::new("grpcurl");
        c.args(["-cacert", &ca_arg, "-max-time", "5"]).args(extra);
        c.output().unwrap_or_else(|e| {
            panic!("cannot run grpcurl ({e}); scripts/test.sh --install-only installs it")
        })
    };
    let out = grpcurl(&[
        "-d",
        r#"{"key": "Zw==", "value": "aA=="}"#,
        &cluster.addr(1),
        "raftkv.v1.KV/Put",
    ]);
    assert!(out.status.success(), "grpcurl put: {}", text(&out));
    let out = grpcurl(&[
        "-d",
        r#"{"key": "Zw==", "consistency": "CONSISTENCY_STRONG"}"#,
        &cluster.addr(3),
        "raftkv.v1.KV/Get",
    ]);
    assert!(out.status.success(), "grpcurl get: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(r#""value": "aA==""#),
        "grpcurl get: {}",
        text(&out)
    );
    let out = Command::new("grpcurl")
        .args(["-plaintext", "-max-time", "5", &cluster.addr(1), "list"])
        .output()
        .expect("grpcurl");
    assert!(!out.status.success(), "grpcurl -plaintext: {}", text(&out));
}

/// With `--client-cert-auth`, the handshake needs a client certificate from the client CA: none,
/// or one from another CA, is refused; the set's client certificate works, for the CLI and grpcurl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cert_auth_admits_only_clients_with_a_certificate_from_the_client_ca() {
    let cluster = Cluster::start_tls(3, &["--client-cert-auth"]);
    ready(&cluster).await;
    let certs = cluster.tls_dir().expect("TLS").to_path_buf();
    let stranger = tempfile::tempdir().unwrap();
    let other = common::make_certs(stranger.path(), "another", 1);
    let ca = certs.join(files::CA);
    let endpoints = cluster.endpoints().join(",");

    let out = cli(&args(&["put", "a", "1"], &endpoints, &[("--cacert", &ca)]));
    assert!(
        !out.status.success(),
        "no client certificate: {}",
        text(&out)
    );
    let foreign = [
        ("--cacert", ca.as_path()),
        ("--cert", &other.join(files::CLIENT)),
        ("--key", &other.join(files::CLIENT_KEY)),
    ];
    let out = cli(&args(&["put", "a", "1"], &endpoints, &foreign));
    assert_refused(&out, "a certificate from another CA");
    let ours = [
        ("--cacert", ca.as_path()),
        ("--cert", &certs.join(files::CLIENT)),
        ("--key", &certs.join(files::CLIENT_KEY)),
    ];
    let out = cli(&args(&["put", "a", "1"], &endpoints, &ours));
    assert!(
        out.status.success(),
        "our client certificate: {}",
        text(&out)
    );
    let out = cli(&args(&["get", "a"], &endpoints, &ours));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");

    let (ca_arg, cert_arg, key_arg) = (
        ca.display().to_string(),
        certs.join(files::CLIENT).display().to_string(),
        certs.join(files::CLIENT_KEY).display().to_string(),
    );
    let out = Command::new("grpcurl")
        .args(["-cacert", &ca_arg, "-cert", &cert_arg, "-key", &key_arg])
        .args(["-max-time", "5", "-d", r#"{"key": "YQ=="}"#])
        .args([&cluster.addr(2), "raftkv.v1.KV/Get"])
        .output()
        .expect("grpcurl (scripts/test.sh --install-only installs it)");
    assert!(out.status.success(), "grpcurl with a cert: {}", text(&out));
    let out = Command::new("grpcurl")
        .args(["-cacert", &ca_arg, "-max-time", "5"])
        .args([&cluster.addr(2), "list"])
        .output()
        .expect("grpcurl");
    assert!(
        !out.status.success(),
        "grpcurl without a cert: {}",
        text(&out)
    );
}

/// A higher-term vote in member `claimed`'s name, with a log longer than anyone's: what a node would
/// grant if it reached openraft.
fn vote_as(claimed: u64, term: u64) -> Payload {
    let vote = VoteRequest {
        vote: Vote::new(term, claimed),
        last_log_id: Some(openraft::testing::log_id::<TypeConfig>(
            term, claimed, 1_000_000,
        )),
        leadership_transfer: false,
    };
    Payload {
        data: raftkv::codec::encode(&vote).unwrap(),
    }
}

async fn terms(cluster: &Cluster) -> Vec<u64> {
    let mut terms = Vec::new();
    for id in cluster.ids() {
        terms.push(cluster.status(id).await.expect("status").term);
    }
    terms
}

fn client_tls(ca: &Path, cert: &Path, key: &Path) -> ClientTlsConfig {
    raftkv::tls::client_config(ca, Some((cert, key))).expect("client TLS")
}

/// The peer port admits only certificates from the nodes' CA, and a node's certificate only in its
/// own name: plaintext, a certificate from another CA, the CLI's client certificate and node 2's
/// certificate claiming node 3 are all refused, and no node's term moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_port_refuses_peers_without_a_valid_certificate_and_the_term_stays() {
    let cluster = Cluster::start_tls(3, &[]);
    let leader = ready(&cluster).await;
    let certs = cluster.tls_dir().expect("TLS").to_path_buf();
    let stranger = tempfile::tempdir().unwrap();
    let other = common::make_certs(stranger.path(), "another", 3);
    let ca = certs.join(files::CA);
    let before = terms(&cluster).await;
    let term = before.iter().copied().max().unwrap();

    let foreign = client_tls(
        &ca,
        &other.join(files::node(2)),
        &other.join(files::node_key(2)),
    );
    let cli_cert = client_tls(
        &ca,
        &certs.join(files::CLIENT),
        &certs.join(files::CLIENT_KEY),
    );
    let node2 = client_tls(
        &ca,
        &certs.join(files::node(2)),
        &certs.join(files::node_key(2)),
    );
    for target in cluster.ids().into_iter().filter(|&id| id != 2) {
        let addr = cluster.peer_addr(target);
        let over = |tls: &ClientTlsConfig| {
            raftkv::network::endpoint(&addr, Some(tls))
                .unwrap()
                .connect_lazy()
        };
        let cases = [
            ("plaintext", common::channel(&addr), 2),
            ("a certificate from another CA", over(&foreign), 2),
            ("the CLI's client certificate", over(&cli_cert), 2),
        ];
        for (what, channel, claimed) in cases {
            let r = cluster
                .peer_client_on(channel, claimed)
                .vote(req(vote_as(claimed, term + 100), SECOND))
                .await;
            assert!(
                r.is_err(),
                "{what} on node {target}'s peer port was answered"
            );
        }
        // Node 2's own certificate, in node 3's (or 1's) name.
        let claimed = if target == 3 { 1 } else { 3 };
        let r = cluster
            .peer_client_on(over(&node2), claimed)
            .vote(req(vote_as(claimed, term + 100), SECOND))
            .await;
        let status = r.expect_err("node 2's certificate spoke for another node");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    }
    let deadline = tokio::time::Instant::now() + 5 * SECOND;
    while !log_of(&cluster, 1).contains("TLS handshake failed") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node 1 did not log the refused handshakes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The cluster still works, over peer TLS, and nobody's term moved.
    let mut kv = cluster.kv(leader);
    kv.put(req(put("after", "1"), 5 * SECOND))
        .await
        .expect("write after the forgeries");
    let after = terms(&cluster).await;
    assert_eq!(before, after, "a refused peer moved a term");
    assert!(after.iter().all(|t| *t == term), "{after:?}");
}
