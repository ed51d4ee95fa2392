//! What a node tells its operators: Prometheus metrics and the HTTP health endpoints beside them.
//!
//! The layers record through the `metrics` facade (`metrics::counter!` and friends) under the names
//! in [`names`]; without `--metrics-listen` no recorder is installed and every record is a no-op.
//! With it, [`install`] sets up the Prometheus recorder once per process and [`http::serve`]
//! answers `/metrics`, `/livez` and `/readyz`.
//!
//! Names follow etcd's (`etcd_server_has_leader` becomes `raftkv_server_has_leader`) and
//! Prometheus' conventions (counters end in `_total`, durations are histograms in seconds), so the
//! dashboards and habits of etcd operators carry over.
//!
//! - [`names`]: every metric's name, in one place, with what it means.
//! - [`grpc`]: `grpc_server_*` for every public call, as a tower layer.
//! - [`http`]: the endpoint.

pub mod grpc;
pub mod http;
pub mod names;

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Histogram buckets for durations: from a fast fsync on an SSD to a stalled disk or network.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048,
    4.096, 8.192,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder and describes every metric (both once per
/// process: tests run several nodes in one), and returns what renders the scrape.
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        .install_recorder()?;
    names::describe();
    Ok(HANDLE.get_or_init(|| handle).clone())
}
