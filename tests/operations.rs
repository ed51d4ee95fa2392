//! docs/operations.md as a script: every `sh` block of it, top to bottom, run by bash against a
//! cluster of `scripts/cluster.sh` on ports and a data root of the test's own. A command the guide
//! shows that stops working fails this test, and so does a guide whose steps no longer leave the
//! cluster it says they leave.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::bin;

const GUIDE: &str = "docs/operations.md";
/// Node ids the guide uses (it adds 4, 5 and 6 to the first three).
const MAX_NODE: u16 = 6;

/// The `sh` blocks of a Markdown file, in order.
fn sh_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(current.is_none(), "{GUIDE}: an sh block is not closed");
    blocks
}

/// The test's metrics ports (`RAFTKV_METRICS_PORT_BASE`) sit this far above its port base.
const METRICS_OFFSET: u16 = 200;

/// A port base whose client, peer and metrics ports for every node the guide uses are free now.
fn free_port_base() -> u16 {
    let free = |port: u16| TcpListener::bind(("127.0.0.1", port)).is_ok();
    for _ in 0..200 {
        let base = portpicker::pick_unused_port().expect("a free port") / 1000 * 1000;
        if !(2000..=64000).contains(&base) {
            continue;
        }
        if (1..=MAX_NODE)
            .all(|n| free(base + n) && free(base + 100 + n) && free(base + METRICS_OFFSET + n))
        {
            return base;
        }
    }
    panic!("no free port range for the guide's cluster");
}

/// Stops the script's cluster however the test ends, so no node outlives it.
struct StopOnDrop<'a> {
    env: &'a [(String, String)],
    repo: &'a Path,
}

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(self.repo.join("scripts/cluster.sh"))
            .arg("stop")
            .envs(self.env.iter().cloned())
            .stdin(Stdio::null())
            .status();
    }
}

#[test]
fn every_command_of_the_operations_guide_runs() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let guide = std::fs::read_to_string(repo.join(GUIDE)).expect("read the guide");
    let blocks = sh_blocks(&guide);
    assert!(blocks.len() >= 6, "{GUIDE} has {} sh blocks", blocks.len());
    let script = blocks.concat();
    let base = free_port_base();
    // The guide curls node N's metrics at the default 127.0.0.1:900N; here they are at the test's
    // base + METRICS_OFFSET + N (a multiple of ten plus N, so the default's last digit carries over).
    let metrics_base = base + METRICS_OFFSET;
    let script = script.replace("127.0.0.1:900", &format!("127.0.0.1:{}", metrics_base / 10));
    for verb in [
        "cluster.sh add",
        "cluster.sh remove",
        "move-leader",
        "restart",
        "snapshot save",
        "snapshot status",
        "cluster.sh restore",
    ] {
        assert!(script.contains(verb), "the guide no longer shows `{verb}`");
    }

    let data = tempfile::tempdir().expect("temp dir");
    let bin = PathBuf::from(bin());
    let bin_dir = bin.parent().expect("the binary's directory");
    let endpoints: Vec<String> = (1..=MAX_NODE)
        .map(|n| format!("127.0.0.1:{}", base + n))
        .collect();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let env: Vec<(String, String)> = [
        ("RAFTKV_DATA_DIR", data.path().display().to_string()),
        ("RAFTKV_PORT_BASE", base.to_string()),
        ("RAFTKV_METRICS_PORT_BASE", metrics_base.to_string()),
        ("RAFTKV_BIN", bin.display().to_string()),
        ("RAFTKV_ENDPOINTS", endpoints.join(",")),
        ("RAFTKV_TLS", "0".to_string()),
        ("RAFTKV_LOG", "info,openraft=warn".to_string()),
        ("PATH", path),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let _stop = StopOnDrop {
        env: &env,
        repo: &repo,
    };

    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(&repo)
        .envs(env.iter().cloned())
        .stdin(Stdio::null())
        .output()
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let logs: String = (1..=MAX_NODE)
        .filter_map(|n| std::fs::read_to_string(data.path().join(format!("n{n}.log"))).ok())
        .map(|log| {
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        })
        .collect::<Vec<_>>()
        .join("\n---\n");
    assert!(
        out.status.success(),
        "the guide's commands failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- node logs\n{logs}",
        out.status
    );
    println!("{stdout}");
    // What the guide says its steps leave: node 2 replaced by 4, 5 and 6 added and removed again,
    // node 3 made leader, and the writes made along the way read back after the restarts.
    assert!(
        stdout.contains("hello"),
        "greeting not read back:\n{stdout}"
    );
    for n in [2, 5, 6] {
        assert!(
            data.path().join(format!("n{n}.removed")).exists(),
            "node {n} is not marked removed:\n{stdout}"
        );
    }
    assert!(
        data.path().join("n4").is_dir(),
        "node 4 has no data:\n{stdout}"
    );
}
