//! The standard gRPC health service, answering what a load balancer or a readiness probe needs to know.
//!
//! - The empty service name speaks for the process: SERVING while it runs. A liveness probe must not
//!   restart a node only because it is cut off from the others; restarting would not reconnect it.
//! - `raftkv.v1.KV` speaks for writes and strong reads through this node: SERVING while this node can
//!   make a strong read, NOT_SERVING while it cannot (no quorum, no leader it can reach, or applying
//!   too far behind). Eventual reads still work when it is NOT_SERVING.
//!
//! The KV status is not inferred from Raft metrics: a follower on the minority side of a partition keeps
//! reporting its old leader for a while. Instead a probe makes the same read-index round a strong read
//! makes, once a second, as etcd's `/health` makes a linearizable read. With the read lease a leader
//! answers it locally, and a follower shares one round trip with its other strong reads.
//!
//! Corrupt storage turns both statuses NOT_SERVING at once and for good: the process is about to exit
//! (see server.rs) and must be rebuilt, not restarted on the same data.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::api::kv::KvService;
use crate::node::Node;
use crate::pb::v1::kv_server::KvServer;

/// How often the KV status is re-checked, so how stale it can be.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long one check may take before the node counts as unable to serve.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// One named check of the readiness the probe keeps, as `/readyz?verbose` lists it.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    /// Why it fails; None while it passes.
    pub failure: Option<String>,
}

/// The latest readiness verdict, shared with the metrics port's `/readyz` so that both answer
/// from the same probe. Not ready until the first probe has passed.
#[derive(Debug, Clone)]
pub struct Readiness(Arc<Mutex<Vec<Check>>>);

impl Default for Readiness {
    fn default() -> Readiness {
        Readiness(Arc::new(Mutex::new(vec![
            Check {
                name: "storage",
                failure: None,
            },
            Check {
                name: "linearizable_read",
                failure: Some("not probed yet".into()),
            },
        ])))
    }
}

impl Readiness {
    pub fn checks(&self) -> Vec<Check> {
        crate::sync::lock(&self.0).clone()
    }

    fn set(&self, name: &'static str, failure: Option<String>) {
        let mut checks = crate::sync::lock(&self.0);
        if let Some(check) = checks.iter_mut().find(|c| c.name == name) {
            check.failure = failure;
        }
        let ready = checks.iter().all(|c| c.failure.is_none());
        metrics::gauge!(crate::telemetry::names::READY).set(if ready { 1.0 } else { 0.0 });
    }
}

/// Keeps the KV status current for as long as the server runs; the caller aborts it on shutdown.
pub(super) async fn keep_reporting(
    node: Arc<Node>,
    reporter: HealthReporter,
    readiness: Readiness,
) {
    let mut ticker = tokio::time::interval(PROBE_EVERY);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // What `serve` set before starting this task.
    let mut reported = ServingStatus::NotServing;
    // The first change, to SERVING as the cluster comes up, is startup rather than news.
    let mut started = false;
    let integrity = node.integrity().clone();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            what = integrity.tripped() => {
                reporter.set_service_status("", ServingStatus::NotServing).await;
                reporter
                    .set_service_status(
                        <KvServer<KvService> as tonic::server::NamedService>::NAME,
                        ServingStatus::NotServing,
                    )
                    .await;
                readiness.set("storage", Some(format!("corrupt: {what}")));
                tracing::info!(reason = %what, "health NOT_SERVING: storage is corrupt");
                return;
            }
        }
        let (status, why) = match node.linearize(Instant::now() + PROBE_TIMEOUT).await {
            Ok(()) => (ServingStatus::Serving, String::new()),
            Err(e) => (ServingStatus::NotServing, e.to_string()),
        };
        readiness.set(
            "linearizable_read",
            (status != ServingStatus::Serving).then(|| why.clone()),
        );
        if status == reported {
            continue;
        }
        reporter
            .set_service_status(
                <KvServer<KvService> as tonic::server::NamedService>::NAME,
                status,
            )
            .await;
        if started {
            tracing::info!(?status, reason = %why, "raftkv.v1.KV health changed");
        }
        started = true;
        reported = status;
    }
}
