//! `grpc_server_handled_total` and `grpc_server_handling_seconds` for every call on the public port,
//! with go-grpc-prometheus' labels (`grpc_service`, `grpc_method`, `grpc_code` spelled as Go spells
//! codes), so etcd's alert rules and dashboards read them as they are.
//!
//! The labels come from the request path, which any client chooses: a path is labelled only when it
//! names a public service and the call was not `UNIMPLEMENTED`, so a client inventing paths adds
//! one series (`unknown`), not one per path. A call's code is read where tonic puts a failure (the
//! response headers, "trailers-only"); a stream that fails after it started counts as `OK`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tower::{Layer, Service};

use super::names;

/// The services the public port serves; any other path is `unknown`.
const PUBLIC_SERVICES: &[&str] = &[
    "raftkv.v1.KV",
    "raftkv.v1.Cluster",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Counts and times every call of the service it wraps.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcMetricsLayer;

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics { inner }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S, B, RB> Service<http::Request<B>> for GrpcMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let started = Instant::now();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let result = answer.await;
            let code = match &result {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .unwrap_or(0),
                // The service failed below gRPC (tonic maps such errors to UNKNOWN).
                Err(_) => 2,
            };
            let (service, method) = labels(&path, code);
            let code = go_name(code);
            metrics::counter!(names::GRPC_HANDLED,
                "grpc_service" => service, "grpc_method" => method.clone(), "grpc_code" => code)
            .increment(1);
            metrics::histogram!(names::GRPC_HANDLING,
                "grpc_service" => service, "grpc_method" => method)
            .record(started.elapsed().as_secs_f64());
            result
        })
    }
}

/// `/raftkv.v1.KV/Put` as (`raftkv.v1.KV`, `Put`), bounded as the module says.
fn labels(path: &str, code: i32) -> (&'static str, String) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let service = parts.next().unwrap_or_default();
    let method = parts.next().unwrap_or_default();
    match PUBLIC_SERVICES.iter().find(|known| **known == service) {
        Some(known) if code != 12 && !method.is_empty() && !method.contains('/') => {
            (known, method.to_owned())
        }
        Some(known) => (known, "unknown".to_owned()),
        None => ("unknown", "unknown".to_owned()),
    }
}

/// A gRPC code as grpc-go prints it (and so as etcd's rules match it).
fn go_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "Canceled",
        2 => "Unknown",
        3 => "InvalidArgument",
        4 => "DeadlineExceeded",
        5 => "NotFound",
        6 => "AlreadyExists",
        7 => "PermissionDenied",
        8 => "ResourceExhausted",
        9 => "FailedPrecondition",
        10 => "Aborted",
        11 => "OutOfRange",
        12 => "Unimplemented",
        13 => "Internal",
        14 => "Unavailable",
        15 => "DataLoss",
        16 => "Unauthenticated",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded_to_public_services_and_real_methods() {
        assert_eq!(
            labels("/raftkv.v1.KV/Put", 0),
            ("raftkv.v1.KV", "Put".to_owned())
        );
        assert_eq!(
            labels("/raftkv.v1.KV/Made-Up", 12),
            ("raftkv.v1.KV", "unknown".to_owned())
        );
        assert_eq!(
            labels("/raftkv.internal.v1.Raft/Vote", 12),
            ("unknown", "unknown".to_owned())
        );
        assert_eq!(labels("/", 12), ("unknown", "unknown".to_owned()));
        assert_eq!(go_name(9), "FailedPrecondition");
        assert_eq!(go_name(99), "Unknown");
    }
}
