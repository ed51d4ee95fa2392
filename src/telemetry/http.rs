//! The HTTP endpoint of `--metrics-listen`: `/metrics` for Prometheus, `/livez` and `/readyz` for
//! orchestrators (the names and the `?verbose` listing are Kubernetes' and etcd's).
//!
//! - `/livez` is the process: 200 while it runs, as the empty gRPC health service. Do not restart
//!   a node because it is cut off from the others: that would not reconnect it.
//! - `/readyz` is the `raftkv.v1.KV` health status: 200 while this node can serve writes and strong
//!   reads, 503 with the failing checks otherwise.
//! - `/metrics` samples what is read rather than recorded (disk use, the process) at each scrape.
//!
//! The port is plain HTTP/1 and bounded like the others: a few connections at a time, each closed
//! after a while, so scrapers cannot hold it and nothing else can exhaust it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use futures::{Stream, StreamExt};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tonic::transport::server::Connected;

use super::names;
use crate::api::health::Readiness;
use crate::listener::{ConnectionLimits, LimitedConnection, limited_incoming};

/// Scrapers and probes at once; more are closed as they arrive (and retried by their clients).
const MAX_CONNECTIONS: usize = 64;
/// How long one connection may stay open: long enough for any scrape, short enough that a client
/// that opens connections and sends nothing frees its slots soon.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// What the endpoint answers from.
#[derive(Clone)]
pub struct Endpoint {
    pub handle: PrometheusHandle,
    pub readiness: Readiness,
    pub data_dir: PathBuf,
    process: Arc<metrics_process::Collector>,
}

impl Endpoint {
    pub fn new(handle: PrometheusHandle, readiness: Readiness, data_dir: PathBuf) -> Endpoint {
        let process = metrics_process::Collector::default();
        process.describe();
        Endpoint {
            handle,
            readiness,
            data_dir,
            process: Arc::new(process),
        }
    }
}

/// Serves the endpoint until the listener fails or the caller drops the future.
pub async fn serve(listener: TcpListener, endpoint: Endpoint) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    let limits = ConnectionLimits {
        max_connections: MAX_CONNECTIONS,
        handshake_timeout: CONNECTION_LIFETIME,
    };
    let incoming = Incoming {
        connections: Box::pin(limited_incoming(listener, limits, "metrics", None)),
        local,
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(endpoint);
    axum::serve(incoming, app).await
}

async fn metrics(State(endpoint): State<Endpoint>) -> impl IntoResponse {
    let sampled = endpoint.clone();
    // Walks directories: off the async threads.
    let _ = tokio::task::spawn_blocking(move || sample(&sampled)).await;
    endpoint.handle.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        endpoint.handle.render(),
    )
}

#[derive(serde::Deserialize)]
struct ReadyzQuery {
    verbose: Option<String>,
}

async fn readyz(
    State(endpoint): State<Endpoint>,
    Query(query): Query<ReadyzQuery>,
) -> impl IntoResponse {
    let checks = endpoint.readiness.checks();
    let ready = checks.iter().all(|c| c.failure.is_none());
    let mut body = String::new();
    if query.verbose.is_some() {
        for check in &checks {
            match &check.failure {
                None => body.push_str(&format!("[+]{} ok\n", check.name)),
                Some(why) => body.push_str(&format!("[-]{} failed: {why}\n", check.name)),
            }
        }
    } else {
        for check in checks.iter().filter(|c| c.failure.is_some()) {
            body.push_str(&format!(
                "[-]{} failed: {}\n",
                check.name,
                check.failure.as_deref().unwrap_or_default()
            ));
        }
    }
    body.push_str(if ready { "ok\n" } else { "not ready\n" });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}

/// What a scrape reads off the machine rather than from what the node recorded.
fn sample(endpoint: &Endpoint) {
    endpoint.process.collect();
    let dir = &endpoint.data_dir;
    metrics::gauge!(names::DB_SIZE).set(dir_bytes(&dir.join("sled")) as f64);
    metrics::gauge!(names::LOG_SIZE).set(dir_bytes(&dir.join("raft-log")) as f64);
    metrics::gauge!(names::SNAPSHOT_SIZE).set(dir_bytes(&dir.join("snapshots")) as f64);
    if let Ok(fs) = rustix::fs::statvfs(dir.as_path()) {
        let block = fs.f_frsize;
        metrics::gauge!(names::FS_SIZE).set(fs.f_blocks.saturating_mul(block) as f64);
        metrics::gauge!(names::FS_AVAILABLE).set(fs.f_bavail.saturating_mul(block) as f64);
    }
}

/// The bytes the files under `dir` take (their lengths; sparse files count in full). A file that
/// goes away during the walk is skipped.
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0u64;
    let mut pending = vec![dir.to_path_buf()];
    // Bounded: the data directory holds a handful of levels; a link loop cannot send this round.
    let mut visited = 0usize;
    while let Some(dir) = pending.pop() {
        visited += 1;
        if visited > 10_000 {
            break;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => pending.push(entry.path()),
                Ok(t) if t.is_file() => {
                    total += entry.metadata().map(|m| m.len()).unwrap_or(0);
                }
                _ => {}
            }
        }
    }
    total
}

/// The bounded connections of [`limited_incoming`], as axum accepts them.
struct Incoming {
    connections: std::pin::Pin<Box<dyn Stream<Item = std::io::Result<LimitedConnection>> + Send>>,
    local: std::net::SocketAddr,
}

impl axum::serve::Listener for Incoming {
    type Io = LimitedConnection;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (LimitedConnection, std::net::SocketAddr) {
        // The stream never ends and never yields an error (it logs accept errors and retries).
        while let Some(next) = self.connections.next().await {
            if let Ok(conn) = next {
                let from = conn.connect_info().tcp.remote_addr().unwrap_or(self.local);
                return (conn, from);
            }
        }
        std::future::pending().await
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        Ok(self.local)
    }
}
