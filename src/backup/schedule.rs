//! Scheduled backups (`--backup-dir`): the store's own nightly job, so that a team that forgets to set
//! one up still has last night's copy.
//!
//! Only the leader writes them: every node would write the same state, and the leader is the one
//! node whose copy needs no round trip for its read index. A node that becomes leader picks up the
//! schedule from the newest file in its own directory. A backup is skipped when the state has not
//! moved since the newest one (its revision is the applied index), and the newest one then counts as
//! current: `raftkv_backup_last_success_timestamp_seconds` says how fresh the newest copy is, not how
//! recently a file was written.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::time::{Duration, SystemTime};

use super::export;
use crate::node::Node;
use crate::telemetry::names;

/// Files this node wrote end so; anything else in the directory is left alone.
const SUFFIX: &str = ".rkvbackup";
/// How often a follower looks whether it has become the leader, and how soon a failed backup is
/// tried again.
const RECHECK: Duration = Duration::from_secs(1);
const RETRY: Duration = Duration::from_secs(60);

/// A backup file in the directory, as its name describes it. Ordered by revision first: the newest
/// state is the one to keep, whatever the clocks of the nodes that wrote them said.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Written {
    revision: u64,
    taken_at_unix: u64,
    name: String,
}

fn name_of(cluster: &str, node: u64, taken_at_unix: u64, revision: u64) -> String {
    format!("raftkv-{cluster}-n{node}-{taken_at_unix}-r{revision}{SUFFIX}")
}

/// Parses what [`name_of`] writes, for `cluster` only: a directory shared with another cluster (a
/// restored one, say) must not have its files counted or pruned.
fn parse_name(name: &str, cluster: &str) -> Option<Written> {
    let stem = name
        .strip_prefix("raftkv-")?
        .strip_prefix(cluster)?
        .strip_prefix("-n")?
        .strip_suffix(SUFFIX)?;
    let mut parts = stem.splitn(3, '-');
    parts.next()?.parse::<u64>().ok()?;
    let taken_at_unix = parts.next()?.parse().ok()?;
    let revision = parts.next()?.strip_prefix('r')?.parse().ok()?;
    Some(Written {
        revision,
        taken_at_unix,
        name: name.to_string(),
    })
}

/// This cluster's backups in `dir`, oldest first.
fn list(dir: &Path, cluster: &str) -> io::Result<Vec<Written>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        if let Some(w) = name.to_str().and_then(|n| parse_name(n, cluster)) {
            found.push(w);
        }
    }
    found.sort();
    Ok(found)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Checks `dir` can hold backups before the node starts serving: a typo in the flag fails the start
/// rather than the first backup an hour later.
pub fn prepare_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(".raftkv-write-test");
    File::create(&probe)?.sync_all()?;
    std::fs::remove_file(&probe)
}

/// Runs for as long as the node does.
pub async fn run(node: Weak<Node>, dir: PathBuf, interval: Duration, keep: u32) {
    metrics::gauge!(names::BACKUP_INTERVAL).set(interval.as_secs_f64());
    let failures = metrics::counter!(names::BACKUP_FAILURES);
    let last_success = metrics::gauge!(names::BACKUP_LAST_SUCCESS);
    let Some(cluster) = node.upgrade().map(|n| n.cluster().to_string()) else {
        return;
    };
    let mut newest = match list(&dir, &cluster) {
        Ok(found) => found.last().cloned(),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot list the backup directory");
            None
        }
    };
    let mut fresh_as_of = newest.as_ref().map_or(0, |w| w.taken_at_unix);
    last_success.set(fresh_as_of as f64);
    loop {
        let due = fresh_as_of.saturating_add(interval.as_secs());
        let wait = Duration::from_secs(due.saturating_sub(now_unix())).min(RECHECK);
        tokio::time::sleep(wait).await;
        let Some(node) = node.upgrade() else { return };
        if now_unix() < due || node.role() != "leader" || node.removed() {
            continue;
        }
        if newest
            .as_ref()
            .is_some_and(|w| w.revision == node.applied_index())
        {
            fresh_as_of = now_unix();
            last_success.set(fresh_as_of as f64);
            tracing::debug!("scheduled backup skipped: nothing changed since the newest one");
            continue;
        }
        match take(&node, &dir, keep).await {
            Ok(written) => {
                tracing::info!(file = %dir.join(&written.name).display(), revision = written.revision,
                    "scheduled backup written");
                fresh_as_of = written.taken_at_unix;
                last_success.set(fresh_as_of as f64);
                newest = Some(written);
            }
            Err(e) => {
                failures.increment(1);
                tracing::warn!(dir = %dir.display(), error = %e, retry_in_secs = RETRY.as_secs(),
                    "scheduled backup failed");
                // Tried again after RETRY, not at once: a full disk stays full for a while.
                fresh_as_of = now_unix()
                    .saturating_sub(interval.as_secs())
                    .saturating_add(RETRY.as_secs());
            }
        }
    }
}

/// Writes one backup into `dir` (fsynced, under its final name only once whole) and removes the
/// oldest beyond `keep`.
async fn take(node: &Node, dir: &Path, keep: u32) -> anyhow::Result<Written> {
    let prepared = export::prepare(node, node.deadline(None)).await?;
    let header = prepared.header.clone();
    let (dir, me) = (dir.to_path_buf(), node.id());
    let written = tokio::task::spawn_blocking(move || {
        let name = name_of(
            &header.cluster_id,
            me,
            header.taken_at_unix,
            header.revision,
        );
        let partial = dir.join(format!("{name}.partial"));
        let written = write_file(&partial, &dir.join(&name), &prepared);
        if written.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        written?;
        let mut all = list(&dir, &header.cluster_id)?;
        all.retain(|w| w.name != name);
        let extra = (all.len() + 1).saturating_sub(keep as usize);
        for old in &all[..extra.min(all.len())] {
            match std::fs::remove_file(dir.join(&old.name)) {
                // Another node pruning the same shared directory got there first.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                other => other?,
            }
        }
        io::Result::Ok(Written {
            revision: header.revision,
            taken_at_unix: header.taken_at_unix,
            name,
        })
    })
    .await??;
    Ok(written)
}

/// Writes the backup to `partial`, fsyncs it, renames it to `path` and fsyncs the directory: the
/// new file is durable under its final name before any older one is deleted.
fn write_file(partial: &Path, path: &Path, prepared: &export::Prepared) -> io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(partial)?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    super::format::write(&mut out, &prepared.header_bytes, &prepared.image)?;
    out.flush()?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(partial, path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_back_and_sort_by_revision() {
        let a = parse_name(&name_of("00ab", 1, 200, 5), "00ab").unwrap();
        let b = parse_name(&name_of("00ab", 2, 100, 7), "00ab").unwrap();
        assert_eq!((a.taken_at_unix, a.revision), (200, 5));
        assert!(a < b, "a later revision is newer, whatever the clock said");
        assert_eq!(parse_name(&name_of("00ab", 1, 1, 2), "00cd"), None);
        assert_eq!(
            parse_name("raftkv-00ab-n1-1-r2.rkvbackup.partial", "00ab"),
            None
        );
        assert_eq!(parse_name("notes.txt", "00ab"), None);
    }
}
