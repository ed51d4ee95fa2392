//! A snapshot once the log has grown by `--snapshot-log-bytes` since the last one.
//!
//! openraft's snapshot policy counts entries (`--snapshot-every`), and the log is purged only behind
//! a snapshot. With large values the count alone lets the log hold gigabytes before it is reached,
//! for a state machine a fraction of that size. So this task also watches the bytes the log store
//! has appended and asks openraft for a snapshot once they pass the limit, the way TiKV bounds its
//! Raft log by size as well as by count. Each node decides for itself, as it does for the count.

use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;

use crate::store::{LogStore, Raft};

/// How often the appended bytes are looked at: a snapshot is at most this late.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// A snapshot that was asked for and has not shown in the metrics after this long (openraft
/// ignores a request while one is being built, and a failed build is only logged) is asked for again.
const ASK_AGAIN_AFTER: Duration = Duration::from_secs(10);

/// Runs until Raft stops. `limit` is in the log store's measure (see `store::log::WalEntry`).
pub(crate) async fn snapshot_by_log_bytes(raft: Raft, log: LogStore, limit: u64) {
    let mut seen_snapshot = last_snapshot(&raft);
    let mut since = log.appended_bytes();
    let mut asked: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let snapshot = last_snapshot(&raft);
        if snapshot != seen_snapshot {
            // A snapshot, by either policy: the log behind it can go, so count again from here.
            seen_snapshot = snapshot;
            since = log.appended_bytes();
            asked = None;
            continue;
        }
        let grown = log.appended_bytes().saturating_sub(since);
        if grown < limit || asked.is_some_and(|at| at.elapsed() < ASK_AGAIN_AFTER) {
            continue;
        }
        tracing::debug!(
            grown,
            limit,
            "the log has grown past --snapshot-log-bytes; snapshotting"
        );
        if raft.trigger().snapshot().await.is_err() {
            // Fatal: Raft has stopped, and this node with it.
            return;
        }
        asked = Some(tokio::time::Instant::now());
    }
}

fn last_snapshot(raft: &Raft) -> Option<crate::types::LogId> {
    raft.metrics().borrow_watched().snapshot
}
