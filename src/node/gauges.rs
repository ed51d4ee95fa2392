//! The node's Raft state as metrics: whether it has a leader in touch, leads, its term, how far
//! it has committed and applied, and its snapshot and purge points.
//!
//! Polled, not watched: openraft's metrics channel changes several times per write, and waking a
//! task for every change costs a leader a share of a core (see `Node::stopped`). So a leader change
//! is counted when a poll sees another leader than the last one did; two changes between polls
//! count as one.

use std::sync::Weak;
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;

use super::Node;
use crate::telemetry::names;

/// How often the gauges are brought up to date, so how stale a scrape can be.
const POLL: Duration = Duration::from_millis(100);

/// Runs while the node lives.
pub(super) async fn publish(node: Weak<Node>) {
    let mut ticker = tokio::time::interval(POLL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_leader = None;
    // A counter is exported from its first increment; from 0 at start, so that rate() and the
    // alert on it (docs/alerts.yml) count the first failure too instead of seeing a new series.
    metrics::counter!(names::PROPOSALS_FAILED).increment(0);
    metrics::counter!(names::LEASE_RENEWED).increment(0);
    metrics::counter!(names::LEASE_EXPIRED).increment(0);
    loop {
        ticker.tick().await;
        let Some(node) = node.upgrade() else { return };
        // When this follower last heard from its leader (the vote is refreshed by each heartbeat);
        // asked before the metrics are borrowed, since it waits for Raft's core.
        let vote_touched = node
            .raft
            .with_raft_state(|state| state.vote_last_modified())
            .await
            .ok()
            .flatten();
        let metrics = node.raft.metrics();
        let m = metrics.borrow_watched();
        let leader = m.current_leader;
        if leader.is_some() && leader != last_leader {
            metrics::counter!(names::LEADER_CHANGES).increment(1);
            last_leader = leader;
        }
        // A leader is "had" while it is in touch: openraft keeps naming a leader that is gone until
        // another is elected, which without a quorum is never.
        let in_touch = Duration::from_millis(node.raft.config().election_timeout_max) * 2;
        let has_leader = match leader {
            None => false,
            Some(id) if id == node.id => {
                recent(m.last_quorum_acked.as_ref().map(|t| **t), in_touch)
            }
            Some(_) => recent(vote_touched, in_touch),
        };
        let flag = |on: bool| if on { 1.0 } else { 0.0 };
        metrics::gauge!(names::HAS_LEADER).set(flag(has_leader));
        metrics::gauge!(names::IS_LEADER).set(flag(leader == Some(node.id)));
        metrics::gauge!(names::IS_LEARNER).set(flag(m.state == openraft::ServerState::Learner));
        metrics::gauge!(names::TERM).set(m.current_term as f64);
        let index = |id: Option<&crate::types::LogId>| id.map_or(0, |l| l.index);
        metrics::counter!(names::PROPOSALS_COMMITTED).absolute(index(m.local_committed.as_ref()));
        metrics::counter!(names::PROPOSALS_APPLIED).absolute(index(m.last_applied.as_ref()));
        metrics::gauge!(names::SNAPSHOT_INDEX).set(index(m.snapshot.as_ref()) as f64);
        metrics::gauge!(names::PURGED_INDEX).set(index(m.purged.as_ref()) as f64);
        drop(m);
        metrics::gauge!(names::LEASES).set(node.leases().len() as f64);
        metrics::gauge!(names::WATCHES).set(node.watches_served() as f64);
    }
}

fn recent<I: openraft::Instant>(at: Option<I>, within: Duration) -> bool {
    at.is_some_and(|at| at.elapsed() < within)
}
