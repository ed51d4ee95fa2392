//! When a failed call is safe to send again: the rule the client's retries, a follower's forwarding
//! and the fault harness's classification of outcomes all rest on.
//!
//! The answer comes from the error's type, never its text: tonic keeps the transport error it turned
//! into a status as the status' [`source`](std::error::Error::source), so the chain says what failed
//! (the connect, the HTTP/2 stream, the socket) however a tonic or hyper release words it.

use std::error::Error;

use crate::NODE_ID_HEADER;

/// True when `status` is a raftkv node's own `UNAVAILABLE` (the node says it did not propose the
/// request) or the request never reached a server ([`certainly_not_sent`]). Any other failure of a
/// write leaves its fate unknown: it may have been applied.
pub fn certainly_not_proposed(status: &tonic::Status) -> bool {
    (status.code() == tonic::Code::Unavailable && status.metadata().contains_key(NODE_ID_HEADER))
        || certainly_not_sent(status)
}

/// True when the transport failed before the request could reach a server's handler: the connection
/// (TCP or TLS) was never made, or the server refused the HTTP/2 stream unprocessed. A connection
/// that breaks once the request is on its way is not such a failure, whatever it is called.
///
/// The status code is not consulted: tonic codes a refused stream `UNAVAILABLE` or `UNKNOWN`
/// depending on its enabled features, and the cause is what decides.
pub fn certainly_not_sent(status: &tonic::Status) -> bool {
    let mut cause = status.source();
    while let Some(e) = cause {
        if before_sending(e) {
            return true;
        }
        cause = e.source();
    }
    false
}

fn before_sending(e: &(dyn Error + 'static)) -> bool {
    // tonic wraps whatever failed while it made the connection (TCP connect, TLS handshake); the
    // request is only written once a connection is up.
    if e.is::<tonic::ConnectError>() {
        return true;
    }
    if let Some(io) = e.downcast_ref::<std::io::Error>() {
        return io.kind() == std::io::ErrorKind::ConnectionRefused;
    }
    // HTTP/2 says a stream refused this way was closed before any processing (RFC 9113, 8.7).
    if let Some(h2) = e.downcast_ref::<h2::Error>() {
        return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
    }
    false
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use tokio::net::TcpListener;
    use tokio::sync::oneshot;
    use tonic::metadata::MetadataValue;

    use super::*;
    use crate::pb::v1::GetRequest;
    use crate::pb::v1::kv_client::KvClient;

    async fn get(addr: SocketAddr) -> tonic::Status {
        let channel = crate::endpoint(&addr.to_string(), None)
            .expect("endpoint")
            .connect_lazy();
        let mut request = tonic::Request::new(GetRequest::default());
        request.set_timeout(Duration::from_secs(10));
        KvClient::new(channel)
            .get(request)
            .await
            .expect_err("no server answers")
    }

    /// A loopback HTTP/2 server that hands each request's stream to `on_request` and tells the test
    /// the request arrived.
    async fn h2_server(
        on_request: impl Fn(h2::server::SendResponse<bytes::Bytes>) -> bool + Send + 'static,
    ) -> (SocketAddr, oneshot::Receiver<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (arrived, rx) = oneshot::channel();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut conn = h2::server::handshake(tcp).await.expect("h2 handshake");
            let mut arrived = Some(arrived);
            while let Some(Ok((_request, respond))) = conn.accept().await {
                if let Some(a) = arrived.take() {
                    let _ = a.send(());
                }
                if !on_request(respond) {
                    // Dropping the connection closes the socket with the call unanswered.
                    return;
                }
            }
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn a_refused_connection_is_certainly_not_sent() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let status = get(addr).await;
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(certainly_not_sent(&status), "{status:?}");
        assert!(certainly_not_proposed(&status), "{status:?}");
    }

    #[tokio::test]
    async fn a_connection_dropped_mid_call_is_not() {
        let (addr, arrived) = h2_server(|_respond| false).await;
        let status = get(addr).await;
        arrived.await.expect("the request reached the server");
        assert!(!certainly_not_sent(&status), "{status:?}");
        assert!(!certainly_not_proposed(&status), "{status:?}");
    }

    #[tokio::test]
    async fn a_stream_the_server_refused_unprocessed_is_certainly_not_sent() {
        let (addr, arrived) = h2_server(|mut respond| {
            respond.send_reset(h2::Reason::REFUSED_STREAM);
            true
        })
        .await;
        let status = get(addr).await;
        arrived.await.expect("the request reached the server");
        assert!(certainly_not_sent(&status), "{status:?}");
        assert!(certainly_not_proposed(&status), "{status:?}");
    }

    #[test]
    fn a_nodes_own_unavailable_is_not_proposed_and_text_alone_proves_nothing() {
        let mut own = tonic::Status::unavailable("not the leader");
        own.metadata_mut()
            .insert(NODE_ID_HEADER, MetadataValue::from(2u64));
        assert!(certainly_not_proposed(&own));
        assert!(!certainly_not_sent(&own));
        // The words a connect failure uses, without one behind them (a proxy, a hand-made status).
        let words = tonic::Status::unavailable(
            "error trying to connect: tcp connect error: Connection refused (os error 111)",
        );
        assert!(!certainly_not_proposed(&words));
        let mut other = tonic::Status::unknown("not the leader");
        other
            .metadata_mut()
            .insert(NODE_ID_HEADER, MetadataValue::from(2u64));
        assert!(!certainly_not_proposed(&other));
    }
}
