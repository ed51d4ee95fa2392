//! The fault tests (`raftkv jepsen`) as part of the test suite: a short run of every fault kind that
//! must pass, membership changes among partitions and kills, power cuts, the no-root proxy mode, and
//! two deliberately broken setups the checkers must catch (a client passing eventual reads off as
//! strong, a node acknowledging appends before their fsync).
//!
//! Each test runs `raftkv jepsen` (which runs the raftkv-jepsen binary beside it), and that starts its
//! own cluster of release binaries, so what CI checks is exactly what `scripts/jepsen.sh` runs for
//! longer.

use std::path::Path;
use std::process::Command;

struct Outcome {
    code: Option<i32>,
    stdout: String,
    summary: serde_json::Value,
}

fn jepsen(out: &Path, args: &[&str]) -> Outcome {
    let output = Command::new(env!("CARGO_BIN_EXE_raftkv"))
        .arg("jepsen")
        .arg(format!("--out={}", out.display()))
        .args(args)
        .env("RAFTKV_LOG", "warn")
        .output()
        .expect("run raftkv jepsen");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}\n--- stderr (tail) ---");
    for line in stderr
        .lines()
        .rev()
        .take(40)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        println!("{line}");
    }
    let summary = std::fs::read(out.join("summary.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    Outcome {
        code: output.status.code(),
        stdout,
        summary,
    }
}

/// Results stay in `target/tmp/jepsen-<name>` (history, summary, node logs) so a failure in CI or on a
/// laptop can be studied after the fact; the harness deletes the data directories of a passing run.
fn assert_passed(run: &Outcome) {
    assert_eq!(
        run.code,
        Some(0),
        "the fault test did not pass:\n{}",
        run.stdout
    );
}

fn results_dir(name: &str) -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("jepsen-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn check_status<'a>(summary: &'a serde_json::Value, name: &str) -> &'a str {
    summary["checks"]
        .as_array()
        .and_then(|checks| checks.iter().find(|c| c["name"] == name))
        .and_then(|c| c["status"].as_str())
        .unwrap_or("missing")
}

/// About two minutes of faults, every kind several times, in the best network mode this machine allows
/// (netns as root, else the proxy). Everything must hold.
#[test]
fn every_fault_kind_keeps_the_store_correct() {
    let dir = results_dir("every_fault_kind");
    let run = jepsen(
        &dir,
        &[
            "--time=120",
            "--nemesis=all",
            "--healthy=1-2",
            "--hold=2-3.5",
        ],
    );
    assert_passed(&run);
    assert_eq!(run.summary["verdict"], "PASS");
    let faults = run.summary["faults"]
        .as_object()
        .expect("faults in summary");
    // power-loss is in `all` only where FUSE can be mounted (the power-loss tests below say so).
    let kinds = if raftkv_lossyfs::available().is_ok() {
        11
    } else {
        10
    };
    assert_eq!(
        faults.len(),
        kinds,
        "every fault kind is reported: {faults:?}"
    );
    for (name, n) in faults {
        assert!(
            n.as_u64().unwrap_or(0) >= 2,
            "fault {name} fired only {n} time(s)"
        );
    }
    assert!(dir.join("history.jsonl").exists());
}

/// A leader paused under load wakes up with its followers' answers from before the pause still unread,
/// while strong reads queued during the pause wait for it; whole-cluster restarts in between give it
/// fresh replication streams. openraft alpha.37 credited such a stale answer with the send time of a
/// request made after the wake-up, so the deposed leader answered those reads from its old state
/// (about one run in four of this length on the unpatched release; see vendor/README.md).
#[test]
fn paused_leader_with_queued_reads_stays_linearizable() {
    let dir = results_dir("pause_reads");
    let run = jepsen(
        &dir,
        &[
            "--time=60",
            "--nemesis=pause-reads,crash-all",
            "--healthy=0.5-1",
            "--hold=1.5-2.5",
        ],
    );
    assert_passed(&run);
    assert_eq!(check_status(&run.summary, "linearizable"), "PASS");
    let pauses = run.summary["faults"]["pause-reads"].as_u64().unwrap_or(0);
    assert!(pauses >= 5, "pause-reads fired only {pauses} time(s)");
}

/// Nodes added (fresh ids, by `--join` and by `MemberAdd`) and removed (the leader and followers)
/// while partitions and kills come and go, some of them during a change: the clients follow the
/// membership, the removed nodes' answers are checked with the rest, and the members at the end
/// converge.
#[test]
fn membership_changes_among_partitions_and_kills_keep_the_store_correct() {
    let dir = results_dir("membership");
    let run = jepsen(
        &dir,
        &[
            "--time=60",
            "--seed=1515",
            "--nemesis=membership,partition,kill",
            "--healthy=0.5-1",
            "--hold=1.5-2.5",
        ],
    );
    assert_passed(&run);
    let changes = run.summary["membership"]
        .as_object()
        .expect("membership in summary");
    let made = |kind: &str| -> u64 {
        changes
            .iter()
            .filter(|(k, _)| k.starts_with(kind))
            .map(|(_, n)| n.as_u64().unwrap_or(0))
            .sum()
    };
    assert!(made("grown") >= 1, "no node was added: {changes:?}");
    // A removal made while another member is down or cut off may be refused, which is an outcome
    // too; one that neither happened nor was refused means the nemesis never tried.
    assert!(
        made("shrunk") + made("refused") >= 1,
        "no removal was attempted: {changes:?}"
    );
}

/// The no-root fallback: partitions made by the harness' own TCP proxies.
#[test]
fn proxy_mode_partitions_keep_the_store_correct() {
    let dir = results_dir("proxy_mode");
    let run = jepsen(
        &dir,
        &[
            "--net=proxy",
            "--time=25",
            "--nemesis=partition-leader,partition-one-way,partition-bridge",
            "--healthy=1-2",
            "--hold=2-3",
        ],
    );
    assert!(run.stdout.contains("network mode: proxy"), "{}", run.stdout);
    assert_passed(&run);
}

/// Power cuts, in turn of every node at once, of one and of a minority: each node loses what its
/// filesystem held unsynced and restarts on what survived. Nothing acknowledged may be lost.
#[test]
fn power_cuts_keep_every_acknowledged_write() {
    if !raftkv_lossyfs::available_for("power_cuts_keep_every_acknowledged_write") {
        return;
    }
    let dir = results_dir("power_loss");
    let run = jepsen(
        &dir,
        &[
            "--time=40",
            "--nemesis=power-loss",
            "--healthy=1-2",
            "--hold=2-3",
        ],
    );
    assert_passed(&run);
    let cuts = run.summary["faults"]["power-loss"].as_u64().unwrap_or(0);
    assert!(cuts >= 3, "power cuts of all, one and a minority: {cuts}");
}

/// A node that acknowledges log appends before their fsync (`--unsafe-ack-before-fsync`, a lying
/// disk) loses acknowledged writes when every node's power goes at once. If the harness passed
/// this, a power cut would prove nothing.
#[test]
fn acknowledging_before_fsync_is_caught_by_a_power_cut() {
    if !raftkv_lossyfs::available_for("acknowledging_before_fsync_is_caught_by_a_power_cut") {
        return;
    }
    let dir = results_dir("ack_before_fsync");
    let run = jepsen(
        &dir,
        &[
            "--time=30",
            "--nemesis=power-loss",
            "--healthy=1-2",
            "--hold=2-3",
            "--node-arg=--unsafe-ack-before-fsync",
        ],
    );
    assert_eq!(
        run.code,
        Some(1),
        "a power cut did not show the writes acknowledged before their fsync:\n{}",
        run.stdout
    );
    let lost = check_status(&run.summary, "set") == "FAIL"
        || check_status(&run.summary, "linearizable") == "FAIL";
    assert!(
        lost,
        "the anomaly is lost writes, not something else:\n{}",
        run.stdout
    );
}

/// The control of the test above: the same lying nodes under SIGKILLs alone. Their records are in
/// the kernel's hands before they are acknowledged, and a SIGKILL keeps what the kernel holds, so
/// this must pass: what the power cut caught was the filesystem's doing, not the process's death.
#[test]
fn acknowledging_before_fsync_survives_sigkills() {
    let dir = results_dir("ack_before_fsync_sigkill");
    let run = jepsen(
        &dir,
        &[
            "--time=25",
            "--nemesis=crash-all,kill",
            "--healthy=1-2",
            "--hold=2-3",
            "--node-arg=--unsafe-ack-before-fsync",
        ],
    );
    assert_passed(&run);
}

/// Eventual reads checked as if they were strong are stale on a partitioned (or merely lagging) node.
/// If the harness passed this, it could not see a stale read at all.
#[test]
fn eventual_reads_passed_off_as_strong_are_caught() {
    let dir = results_dir("eventual_as_strong");
    let run = jepsen(
        &dir,
        &[
            "--time=15",
            "--nemesis=partition-leader",
            "--healthy=1-2",
            "--hold=3-4",
            "--unsafe-eventual-as-strong",
        ],
    );
    assert_eq!(
        run.code,
        Some(1),
        "the checker missed stale reads:\n{}",
        run.stdout
    );
    assert_eq!(check_status(&run.summary, "linearizable"), "FAIL");
    assert!(run.stdout.contains("NOT linearizable"), "{}", run.stdout);
    // Only the deliberately broken reads are wrong: the rest of the store still checks out.
    for name in ["set", "convergence", "node-health", "final-ops"] {
        assert_eq!(
            check_status(&run.summary, name),
            "PASS",
            "{name}: {}",
            run.stdout
        );
    }
}
