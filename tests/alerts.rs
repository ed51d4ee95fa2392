//! docs/alerts.yml is loaded as it is by operators, so it must hold up against both tools that read
//! it: Prometheus (promtool checks the rules and runs docs/alerts_test.yml, where each alert fires on
//! a bad series and stays quiet on a healthy one) and raftkv (a node must export every metric the
//! rules name, or an alert watches a series that never exists and stays silent forever).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tokio::time::Instant;

const SECOND: Duration = Duration::from_secs(1);
const RULES: &str = "docs/alerts.yml";
const RULE_TESTS: &str = "docs/alerts_test.yml";
/// PromQL keywords followed by a list of label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
/// Prefixes of the metric names the rules take from raftkv (`up` is Prometheus' own).
const PREFIXES: &[&str] = &["raftkv_", "grpc_", "process_"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs promtool; a machine without it fails the test rather than skipping what it checks.
fn promtool(args: &[&str]) -> std::process::Output {
    match Command::new("promtool")
        .args(args)
        .current_dir(repo())
        .output()
    {
        Ok(out) => out,
        Err(e) => panic!(
            "cannot run promtool ({e}): run scripts/test.sh --install-only, which installs it \
             (Debian's prometheus package)"
        ),
    }
}

#[test]
fn the_rules_pass_promtool_and_their_unit_tests() {
    for args in [["check", "rules", RULES], ["test", "rules", RULE_TESTS]] {
        let out = promtool(&args);
        assert!(
            out.status.success(),
            "promtool {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The PromQL expressions of a rule file: every `expr:` value, on its line or as a block below it.
fn expressions(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut exprs = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let indent = line.len() - line.trim_start().len();
        i += 1;
        let Some(value) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        if value.starts_with('|') || value.starts_with('>') {
            let mut block = String::new();
            while i < lines.len() {
                let next = lines[i];
                let next_indent = next.len() - next.trim_start().len();
                if !next.trim().is_empty() && next_indent <= indent {
                    break;
                }
                block.push_str(next);
                block.push('\n');
                i += 1;
            }
            exprs.push(block);
        } else {
            exprs.push(value.trim_matches(|c| c == '\'' || c == '"').to_owned());
        }
    }
    exprs
}

/// `expr` without what names labels rather than metrics: selectors' `{...}`, string literals, and
/// the label lists of `by`, `without`, `on`, `ignoring` and `group_left`/`group_right`.
fn without_labels(expr: &str) -> String {
    let mut out = String::new();
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' => {
                let mut quote = None;
                for c in chars.by_ref() {
                    match (quote, c) {
                        (None, '}') => break,
                        (None, '"' | '\'') => quote = Some(c),
                        (Some(q), c) if c == q => quote = None,
                        _ => {}
                    }
                }
                out.push(' ');
            }
            '"' | '\'' => {
                for d in chars.by_ref() {
                    if d == c {
                        break;
                    }
                }
                out.push(' ');
            }
            _ => out.push(c),
        }
    }
    let mut kept = String::new();
    let mut rest = out.as_str();
    while let Some(open) = rest.find('(') {
        let before = &rest[..open];
        let word = before
            .trim_end()
            .rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .next()
            .unwrap_or_default();
        let close = rest[open..].find(')').map_or(rest.len(), |c| open + c + 1);
        if LABEL_LISTS.contains(&word) {
            kept.push_str(before);
            kept.push(' ');
            rest = &rest[close..];
        } else {
            kept.push_str(&rest[..=open]);
            rest = &rest[open + 1..];
        }
    }
    kept.push_str(rest);
    kept
}

/// The metric names with one of [`PREFIXES`] that `expr` reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    without_labels(expr)
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| PREFIXES.iter().any(|p| t.starts_with(p)))
        .map(str::to_owned)
        .collect()
}

/// Every name the rule file reads from a node.
fn names_in_rules() -> BTreeSet<String> {
    let yaml = std::fs::read_to_string(repo().join(RULES)).expect("read the rules");
    let exprs = expressions(&yaml);
    assert!(
        exprs.len() >= 10,
        "{RULES}: found only {} expressions: {exprs:#?}",
        exprs.len()
    );
    exprs.iter().flat_map(|e| metric_names(e)).collect()
}

#[test]
fn names_are_read_from_expressions_and_not_labels() {
    let names = metric_names(
        r#"100 * sum without (grpc_code) (rate(grpc_server_handled_total{grpc_service=~"raftkv\\..+", grpc_code="x"}[5m]))
           / on (instance) group_left (grpc_method) histogram_quantile(0.99, rate(raftkv_disk_log_fsync_duration_seconds_bucket[5m]))"#,
    );
    let want: BTreeSet<String> = [
        "grpc_server_handled_total",
        "raftkv_disk_log_fsync_duration_seconds_bucket",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(names, want);
    let exprs = expressions(
        "- alert: A\n  expr: up == 0\n  for: 1m\n- alert: B\n  expr: |\n    raftkv_a\n      and\n    raftkv_b\n  for: 1m\n",
    );
    assert_eq!(exprs.len(), 2, "{exprs:?}");
    assert_eq!(metric_names(&exprs[1]).len(), 2, "{exprs:?}");
}

/// One GET of `/metrics`: the body when the answer is 200.
fn scrape(addr: &str) -> std::io::Result<String> {
    match common::http::get(addr, "/metrics")? {
        (200, body) => Ok(body),
        (code, body) => Err(std::io::Error::other(format!("{code}: {body}"))),
    }
}

fn series_names(samples: &BTreeMap<String, f64>) -> BTreeSet<String> {
    samples
        .keys()
        .map(|k| k.split('{').next().unwrap_or_default().to_owned())
        .collect()
}

/// Some metrics only a leader has (round trips to its peers), so a name counts as exported when any
/// node of a running cluster exports it; scheduled backups are on, as the backup alert assumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_rules_read_is_exported() {
    let wanted = names_in_rules();
    for known in [
        "raftkv_server_has_leader",
        "raftkv_disk_log_fsync_duration_seconds_bucket",
        "grpc_server_handled_total",
        "raftkv_backup_last_success_timestamp_seconds",
    ] {
        assert!(
            wanted.contains(known),
            "{RULES}: {known} not among the names read: {wanted:?}"
        );
    }

    let backups = tempfile::tempdir().expect("temp dir");
    let (c, metrics) = common::http::cluster_with_metrics(|id| {
        let dir = backups.path().join(format!("n{id}"));
        [
            "--backup-dir",
            &dir.display().to_string(),
            "--backup-interval",
            "1h",
        ]
        .map(String::from)
        .into()
    });
    c.wait_leader(&c.ids(), 20 * SECOND).await;
    let client = c.client();
    for i in 0..10 {
        common::eventually(10 * SECOND, "put", || {
            client.put(format!("k{i}").into_bytes(), b"v".to_vec(), false)
        })
        .await;
    }

    let deadline = Instant::now() + 15 * SECOND;
    let (exported, scrapes) = loop {
        let scrapes: BTreeMap<u64, BTreeMap<String, f64>> = metrics
            .iter()
            .map(|(id, addr)| {
                (
                    *id,
                    scrape(addr)
                        .map(|b| common::http::samples(&b))
                        .unwrap_or_default(),
                )
            })
            .collect();
        let exported: BTreeSet<String> = scrapes.values().flat_map(series_names).collect();
        if wanted.is_subset(&exported) || Instant::now() >= deadline {
            break (exported, scrapes);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let missing: Vec<&String> = wanted.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "{RULES} reads metrics no node exports: {missing:?}\n(the nodes export {exported:?})"
    );
    // The backup rule compares the interval with ages in seconds.
    for (id, scraped) in &scrapes {
        if let Some(interval) = scraped.get("raftkv_backup_interval_seconds") {
            assert_eq!(*interval, 3600.0, "node {id}: --backup-interval 1h");
        }
    }
}
