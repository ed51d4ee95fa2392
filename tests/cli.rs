//! The `raftkv` CLI as a user runs it, against real nodes: a closed pipe, a client-side timeout,
//! binary keys and values, and `raftkv txn`. Also what a strong read without a quorum returns, as
//! the README's error table documents it.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Cluster, bin, eventually, req};
use raftkv::pb::v1 as pb;

fn cli(endpoints: &str, args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .args(args)
        .args(["--endpoints", endpoints])
        .stdin(Stdio::null())
        .output()
        .expect("run the CLI")
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn ready(cluster: &Cluster) -> String {
    let client = cluster.client();
    eventually(Duration::from_secs(10), "first put", || {
        client.put(b"ready".to_vec(), b"1".to_vec(), false)
    })
    .await;
    cluster.endpoints().join(",")
}

/// `raftkv scan | head -1`: the reader goes away; the CLI exits quietly instead of panicking (101).
#[tokio::test]
async fn a_closed_pipe_ends_the_cli_quietly() {
    let cluster = Cluster::start(1, &[]);
    let endpoints = ready(&cluster).await;
    let client = cluster.client();
    for i in 0..200 {
        client
            .put(format!("p{i:03}").into_bytes(), vec![b'v'; 1000], false)
            .await
            .expect("put");
    }
    for args in [
        &["scan", "p"][..],
        &["scan", "p", "--json"],
        &["get", "p000"],
    ] {
        let mut child = Command::new(bin())
            .args(args)
            .args(["--endpoints", &endpoints])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the CLI");
        // Close the read end before the CLI writes anything.
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("wait");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
    }
}

/// A server that accepts connections and never answers: the CLI's own timeout fires.
#[tokio::test]
async fn a_client_side_timeout_is_reported_as_deadline_exceeded() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let holder = std::thread::spawn(move || {
        // Holds the accepted sockets open, silent, until the test ends.
        let mut held = Vec::new();
        for s in listener.incoming().take(4) {
            match s {
                Ok(s) => held.push(s),
                Err(_) => break,
            }
        }
        std::thread::sleep(Duration::from_secs(5));
    });
    let out = cli(&addr, &["get", "k", "--timeout-ms", "300"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("DEADLINE_EXCEEDED"), "{err}");
    assert!(!err.contains("Cancelled"), "{err}");
    drop(holder);
}

#[tokio::test]
async fn binary_keys_and_values_in_hex_and_base64() {
    let cluster = Cluster::start(1, &[]);
    let endpoints = ready(&cluster).await;
    let out = cli(&endpoints, &["put", "--hex", "00ff", "80fe01"]);
    assert!(out.status.success(), "{out:?}");
    let kv = cluster
        .kv(1)
        .get(req(
            pb::GetRequest {
                key: vec![0x00, 0xff],
                consistency: 0,
                min_revision: 0,
            },
            Duration::from_secs(5),
        ))
        .await
        .expect("get")
        .into_inner()
        .kv
        .expect("the hex key was written as bytes");
    assert_eq!(kv.value, [0x80, 0xfe, 0x01]);

    let out = cli(&endpoints, &["get", "--hex", "00ff"]);
    assert_eq!(stdout(&out).trim(), "80fe01", "{out:?}");
    let out = cli(&endpoints, &["get", "--base64", "AP8="]);
    assert_eq!(stdout(&out).trim(), "gP4B", "{out:?}");
    let out = cli(&endpoints, &["get", "--base64", "--json", "AP8="]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        (json["key"].as_str(), json["value"].as_str()),
        (Some("AP8="), Some("gP4B"))
    );
    let out = cli(&endpoints, &["scan", "--hex", "00", "01"]);
    assert_eq!(stdout(&out), "00ff\t80fe01\n", "{out:?}");
    let out = cli(&endpoints, &["delete", "--hex", "00ff"]);
    assert!(stdout(&out).starts_with("DELETED"), "{out:?}");

    let out = cli(&endpoints, &["get", "--hex", "zz"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not hex"),
        "{out:?}"
    );
    let out = cli(&endpoints, &["get", "--hex", "--base64", "00"]);
    assert!(
        !out.status.success(),
        "--hex and --base64 together are refused"
    );
}

#[tokio::test]
async fn txn_from_flags_and_from_a_file() {
    let cluster = Cluster::start(3, &[]);
    let endpoints = ready(&cluster).await;
    let create = [
        "txn",
        "--compare",
        r#"mod("lock") = 0"#,
        "--success",
        "put lock alice",
        "--success",
        "get lock",
        "--failure",
        "get lock",
    ];
    let out = cli(&endpoints, &create);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("SUCCESS revision="), "{text}");
    assert_eq!(&lines[1..], ["OK", "lock\talice"], "{text}");

    // The same txn again: the key exists, so the failure branch runs (exit 1).
    let mut bob = create;
    bob[4] = "put lock bob";
    let out = cli(&endpoints, &bob);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        stdout(&out).lines().skip(1).collect::<Vec<_>>(),
        ["lock\talice"]
    );

    // A compare-and-swap from a JSON file, with --json output.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("txn.json");
    let mut f = std::fs::File::create(&path).expect("create");
    write!(
        f,
        r#"{{"compare": [{{"key": "lock", "target": "value", "result": "=", "operand": "alice"}},
                        "version(lock) = 1"],
            "success": [{{"put": {{"key": "lock", "value": "carol", "prev_kv": true}}}}, "del other"],
            "failure": []}}"#
    )
    .expect("write");
    drop(f);
    let out = cli(
        &endpoints,
        &["txn", "--json", "--file", path.to_str().expect("path")],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["succeeded"], true, "{json}");
    assert_eq!(
        json["results"][0]["put"]["prev_kv"]["value"], "alice",
        "{json}"
    );
    assert_eq!(json["results"][1]["delete"]["deleted"], false, "{json}");
    let out = cli(&endpoints, &["get", "lock"]);
    assert_eq!(stdout(&out).trim(), "carol");

    // Malformed input is refused by the CLI before anything is sent.
    for bad in [
        &["txn", "--compare", "mod(lock) >= 1"][..],
        &["txn", "--success", "put lock"],
        &["txn", "--file", "/nonexistent/txn.json"],
    ] {
        let out = cli(&endpoints, bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {out:?}");
    }
    let out = cli(&endpoints, &["get", "lock"]);
    assert_eq!(stdout(&out).trim(), "carol");
}

/// What the README's error table says about a node without a quorum: a strong read that cannot reach
/// a quorum or a leader is UNAVAILABLE with a message that says so, on the old leader and on a
/// follower alike, through tonic, `raftkv_client` and the CLI; an eventual read still answers from
/// the node's own state. A write is UNAVAILABLE once the leader's lease has lapsed (refused before it
/// is proposed); one proposed just before may only be DEADLINE_EXCEEDED (its fate is unknown).
#[tokio::test]
async fn a_node_without_a_quorum_answers_unavailable() {
    // The surviving node is once the old leader, once a follower.
    for keep_leader in [true, false] {
        let mut cluster = Cluster::start(3, &[]);
        let leader = cluster
            .wait_leader(&[1, 2, 3], Duration::from_secs(10))
            .await;
        ready(&cluster).await;
        let keep = if keep_leader {
            leader
        } else {
            [1, 2, 3]
                .into_iter()
                .find(|&i| i != leader)
                .expect("a follower")
        };
        for id in [1, 2, 3].into_iter().filter(|&i| i != keep) {
            cluster.kill(id);
        }
        check_no_quorum(&cluster, keep).await;
    }
}

/// Says whether a refusal names the missing quorum or leader.
fn says_no_quorum(message: &str) -> bool {
    message.contains("no quorum") || message.contains("no usable leader")
}

async fn check_no_quorum(cluster: &Cluster, id: u64) {
    let timeout = Duration::from_millis(1500);
    // Until the read lease runs out, the old leader may still serve a strong read on the quorum's
    // last acknowledgement, and rightly so (no one else can have been elected yet): the first
    // failure is the answer under test.
    let started = tokio::time::Instant::now();
    let err = loop {
        match cluster
            .kv(id)
            .get(req(common::get("ready", pb::Consistency::Strong), timeout))
            .await
        {
            Ok(_) => assert!(
                started.elapsed() < Duration::from_secs(5),
                "node {id} still serves strong reads without a quorum"
            ),
            Err(e) => break e,
        }
    };
    eprintln!(
        "node {id}, strong read: {:?}: {}",
        err.code(),
        err.message()
    );
    assert_eq!(err.code(), tonic::Code::Unavailable, "node {id}: {err:?}");
    assert!(says_no_quorum(err.message()), "node {id}: {err:?}");
    assert!(
        err.metadata().get("raftkv-node-id").is_some(),
        "node {id}: raftkv's own answer, not the transport's: {err:?}"
    );

    let client = raftkv_client::Client::new(&[cluster.addr(id)], timeout).expect("client");
    let err = client
        .get(b"ready".to_vec(), pb::Consistency::Strong, 0)
        .await
        .expect_err("a strong read without a quorum");
    assert_eq!(err.code(), tonic::Code::Unavailable, "node {id}: {err:?}");
    assert!(says_no_quorum(err.message()), "node {id}: {err:?}");

    let r = cluster
        .kv(id)
        .get(req(
            common::get("ready", pb::Consistency::Eventual),
            timeout,
        ))
        .await
        .expect("an eventual read needs no quorum");
    assert!(r.into_inner().kv.is_some());

    let out = cli(&cluster.addr(id), &["get", "ready", "--timeout-ms", "1500"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("node {id}, raftkv get: {}", stderr.trim());
    assert!(stderr.contains("UNAVAILABLE"), "node {id}: {stderr}");
    assert!(says_no_quorum(&stderr), "node {id}: {stderr}");
    assert_eq!(out.status.code(), Some(2), "node {id}: {stderr}");

    // A write proposed while the old leader's lease still held waits for a quorum that never comes
    // and may yet be applied; once the lease has lapsed, every write is refused unproposed.
    let started = tokio::time::Instant::now();
    let err = loop {
        let err = cluster
            .kv(id)
            .put(req(common::put("ready", "2"), timeout))
            .await
            .expect_err("a write without a quorum");
        match err.code() {
            tonic::Code::Unavailable => break err,
            tonic::Code::DeadlineExceeded => assert!(
                started.elapsed() < Duration::from_secs(5),
                "node {id}: writes still proposed without a quorum: {err:?}"
            ),
            _ => panic!("node {id}: {err:?}"),
        }
    };
    eprintln!("node {id}, write: {:?}: {}", err.code(), err.message());
    assert!(says_no_quorum(err.message()), "node {id}: {err:?}");
}

/// `raftkv jepsen` and `raftkv bench` run the tools beside the binary with every argument, `--help`
/// included, and say how to build a tool that is missing.
#[test]
fn jepsen_and_bench_run_the_sibling_binaries() {
    for (verb, flag) in [("jepsen", "--register-clients"), ("bench", "--connections")] {
        let out = Command::new(bin())
            .args([verb, "--help"])
            .output()
            .expect("run the CLI");
        assert!(out.status.success(), "raftkv {verb} --help: {out:?}");
        assert!(stdout(&out).contains(flag), "{}", stdout(&out));
    }
    let alone = tempfile::tempdir().expect("tempdir");
    let copy = alone.path().join("raftkv");
    std::fs::copy(bin(), &copy).expect("copy the binary");
    let out = Command::new(&copy)
        .args(["jepsen", "--time=1"])
        .output()
        .expect("run the copy");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("raftkv-jepsen not found") && err.contains("cargo build --release"),
        "{err}"
    );
}

/// `raftkv watch`: the changes from a past revision, then live ones, one line each.
#[tokio::test(flavor = "multi_thread")]
async fn watch_prints_each_change_as_a_line() {
    use std::io::BufRead;
    let cluster = Cluster::start(3, &[]);
    let endpoints = ready(&cluster).await;
    let client = cluster.client();
    let put_at = |value: &'static str| {
        let client = &client;
        async move {
            let r = client.put(b"app/a".to_vec(), value.into(), false).await;
            r.unwrap().header.unwrap().revision
        }
    };
    let first = put_at("1").await;
    client
        .put(b"other".to_vec(), b"x".to_vec(), false)
        .await
        .unwrap();
    let mut child = Command::new(bin())
        .args(["watch", "app/", "--prefix", "--prev-kv", "--from-revision"])
        .arg(first.to_string())
        .args(["--endpoints", &endpoints])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the CLI");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = || {
        rx.recv_timeout(Duration::from_secs(10))
            .expect("a line from raftkv watch")
    };
    assert_eq!(next(), format!("PUT app/a 1 revision={first}"));
    let second = put_at("2").await;
    assert_eq!(next(), format!("PUT app/a 2 revision={second} prev=1"));
    let gone = client
        .delete(b"app/a".to_vec(), false)
        .await
        .unwrap()
        .header
        .unwrap()
        .revision;
    assert_eq!(next(), format!("DELETE app/a revision={gone} prev=2"));
    child.kill().unwrap();
    let _ = child.wait();
}

/// `raftkv lease`: grant, put --lease, ttl --keys, list, keep-alive until the lease is revoked
/// (status 1, and why), and NOT_FOUND afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn lease_verbs_grant_attach_inspect_keep_alive_and_revoke() {
    let cluster = Cluster::start(3, &[]);
    let endpoints = ready(&cluster).await;
    let grant = cli(&endpoints, &["lease", "grant", "20s", "--json"]);
    assert!(grant.status.success(), "{grant:?}");
    let granted: serde_json::Value = serde_json::from_slice(&grant.stdout).expect("json");
    assert_eq!(granted["ttl_ms"], 20000);
    let id = granted["id"].as_u64().expect("id").to_string();
    let put = cli(&endpoints, &["put", "svc/a", "up", "--lease", &id]);
    assert!(put.status.success(), "{put:?}");
    let get = cli(&endpoints, &["get", "svc/a", "--json"]);
    let got: serde_json::Value = serde_json::from_slice(&get.stdout).expect("json");
    assert_eq!(
        got["lease"].as_u64().map(|l| l.to_string()),
        Some(id.clone())
    );
    let ttl = stdout(&cli(&endpoints, &["lease", "ttl", &id, "--keys"]));
    assert!(
        ttl.contains("of 20000 ms") && ttl.lines().any(|l| l == "svc/a"),
        "{ttl}"
    );
    let list = stdout(&cli(&endpoints, &["lease", "list"]));
    assert!(list.lines().any(|l| l == id), "{list}");
    let missing = cli(&endpoints, &["put", "svc/b", "up", "--lease", "999999"]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("NOT_FOUND"),
        "{missing:?}"
    );

    let mut keeper = Command::new(bin())
        .args(["lease", "keep-alive", &id, "--endpoints", &endpoints])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the CLI");
    // Revoked only once it is keeping the lease alive.
    let out = keeper.stdout.take().unwrap();
    let rest = tokio::task::spawn_blocking(move || {
        use std::io::{BufRead, Read};
        let mut reader = std::io::BufReader::new(out);
        let mut first = String::new();
        reader.read_line(&mut first).expect("read");
        assert!(first.starts_with("keeping lease"), "{first:?}");
        let mut rest = String::new();
        reader.read_to_string(&mut rest).expect("read");
        rest
    });
    let revoke = cli(&endpoints, &["lease", "revoke", &id]);
    assert!(revoke.status.success(), "{revoke:?}");
    let rest = rest.await.unwrap();
    let ended = tokio::task::spawn_blocking(move || keeper.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ended.status.code(), Some(1), "{ended:?}");
    assert!(rest.contains("expired or was revoked"), "{rest:?}");
    let gone = cli(&endpoints, &["get", "svc/a"]);
    assert_eq!(gone.status.code(), Some(1));
    let ttl_gone = cli(&endpoints, &["lease", "ttl", &id]);
    assert!(String::from_utf8_lossy(&ttl_gone.stderr).contains("NOT_FOUND"));
}

/// `raftkv lock`: two holders of one lock run their commands one after the other, never together,
/// each with its own, increasing fencing token.
#[tokio::test(flavor = "multi_thread")]
async fn lock_runs_commands_one_at_a_time() {
    let cluster = Cluster::start(3, &[]);
    let endpoints = ready(&cluster).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let script = format!(
        "echo start $RAFTKV_LOCK_REVISION >> {0}; sleep 1; echo end >> {0}",
        log.display()
    );
    let spawn = || {
        Command::new(bin())
            .args([
                "lock",
                "job",
                "--endpoints",
                &endpoints,
                "--",
                "sh",
                "-c",
                &script,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the CLI")
    };
    let (a, b) = (spawn(), spawn());
    let wait =
        |child: std::process::Child| tokio::task::spawn_blocking(move || child.wait_with_output());
    let (a, b) = (wait(a), wait(b));
    for out in [a.await.unwrap().unwrap(), b.await.unwrap().unwrap()] {
        assert!(out.status.success(), "{out:?}");
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(
        lines[0].starts_with("start ") && lines[1] == "end",
        "{text}"
    );
    assert!(
        lines[2].starts_with("start ") && lines[3] == "end",
        "{text}"
    );
    let token = |line: &str| line["start ".len()..].parse::<u64>().expect("a token");
    assert!(token(lines[0]) < token(lines[2]), "{text}");
    // Unlocked: the lock key is gone.
    assert_eq!(
        cli(&endpoints, &["get", "locks/job"]).status.code(),
        Some(1)
    );
}
