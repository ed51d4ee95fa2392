//! Running a node as a process: bind both listeners, start the node, mount every gRPC service (the
//! public ones from `api` on `--listen`; Raft and forwarding, behind the peer identity check, on
//! `--peer-listen`), and stop cleanly on SIGTERM/SIGINT: no new requests, a leader hands its leadership
//! over, the last answers go out (see `node::drain`), then Raft stops.
//!
//! If Raft stops on its own (a storage error is fatal by design), the process exits non-zero so a
//! supervisor notices, rather than serving stale reads from a node that can no longer make progress.
//! Corrupt storage (see `store::integrity`) ends it the same way, with its own exit status, after a
//! moment in which health says NOT_SERVING and every read is refused.

use std::process::ExitCode;
use std::time::Duration;

use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;

use crate::config::ServerArgs;
use crate::limits::MAX_PEER_MESSAGE_BYTES;
use crate::listener::{ConnectionLimits, bounded_server, limited_incoming};
use crate::network::identity::Identify;
use crate::node::Node;
use crate::node::forward::ForwardService;
use crate::pb::internal::forward_server::ForwardServer;
use crate::pb::internal::raft_server::RaftServer;
use crate::tls::ServerTls;
/// How long a node with corrupt storage keeps its port open, answering health NOT_SERVING, before it
/// exits: long enough for a probe to see why, short enough that nothing waits on it.
const CORRUPT_GRACE: std::time::Duration = std::time::Duration::from_secs(1);
/// The exit status when storage is corrupt: the data directory must be wiped (see the README).
pub const EXIT_CORRUPT: u8 = 3;
/// How long a graceful stop may take: the handover and the requests in flight. A request waits at
/// most `--request-timeout-ms` (5 s by default) for a leader or a quorum, so this lets the usual
/// ones finish and caps the rest.
const DRAIN_FOR: Duration = Duration::from_secs(5);

pub async fn run(args: ServerArgs) -> anyhow::Result<ExitCode> {
    args.check_limits()?;
    // Before anything binds: a node with broken TLS files must not come up in plaintext.
    let public_tls = args
        .public_tls()?
        .map(crate::tls::ServerTls::new)
        .transpose()?;
    let peer_tls = args
        .peer_tls()?
        .map(|tls| crate::tls::ServerTls::new(tls.server))
        .transpose()?;
    // Before anything opens files: the database and connections share the limit.
    let fd_limit = match crate::listener::raise_fd_limit() {
        Ok(limit) => Some(limit),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the open-file limit");
            None
        }
    };
    let handshake_timeout = Duration::from_millis(args.handshake_timeout_ms);
    let peer_connections = ConnectionLimits {
        max_connections: usize::try_from(args.max_peer_connections).unwrap_or(usize::MAX),
        handshake_timeout,
    };
    let wanted = usize::try_from(args.max_connections).unwrap_or(usize::MAX);
    let connections = ConnectionLimits {
        // Peers' descriptors are set aside first: clients get what is left.
        max_connections: fd_limit.map_or(wanted, |limit| {
            crate::listener::fit_to_fd_limit(
                wanted,
                limit.saturating_sub(args.max_peer_connections),
            )
        }),
        handshake_timeout,
    };
    let listener = TcpListener::bind(&args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let peer_listener = TcpListener::bind(&args.peer_listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for peers on {}: {e}", args.peer_listen))?;
    // Bound before the node starts, so that a taken port fails the start rather than the metrics.
    let metrics = match &args.metrics_listen {
        None => None,
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen for metrics on {addr}: {e}"))?;
            Some((listener, crate::telemetry::install()?))
        }
    };
    if let Some(dir) = &args.backup_dir {
        crate::backup::schedule::prepare_dir(dir).map_err(|e| {
            anyhow::anyhow!(
                "--backup-dir {}: cannot write backups there: {e}",
                dir.display()
            )
        })?;
    }
    let readiness = crate::api::health::Readiness::default();
    let node = match Node::start(&args).await {
        Ok(node) => node,
        // Already logged as an ERROR naming the directory, where corruption was first found.
        Err(e)
            if matches!(
                e.downcast_ref::<crate::store::StoreError>(),
                Some(crate::store::StoreError::Corrupt { .. })
            ) =>
        {
            eprintln!("error: {e:#}");
            return Ok(ExitCode::from(EXIT_CORRUPT));
        }
        Err(e) => return Err(e),
    };
    // Taken over before the node says it serves, so no SIGHUP after that line ends the process.
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| anyhow::anyhow!("cannot handle SIGHUP: {e}"))?;
    let me = args.member();
    if let Some(listed) = args.peers().get(&args.id).filter(|listed| **listed != me) {
        // The membership records what --peers says; the flags only change where this node listens.
        tracing::warn!(
            listed = %listed,
            advertised = %me,
            "this node's --advertise or --peer-advertise differs from its --peers entry; peers and \
             clients are told the --peers addresses"
        );
    }
    tracing::info!(
        id = args.id,
        cluster = %node.cluster(),
        listen = %args.listen,
        peer_listen = %args.peer_listen,
        advertise = %me.addr,
        peer_advertise = %me.peer_addr,
        data_dir = %args.data_dir.display(),
        max_connections = connections.max_connections,
        max_peer_connections = peer_connections.max_connections,
        fd_limit,
        tls = public_tls.is_some(),
        client_cert_auth = args.client_cert_auth,
        peer_tls = peer_tls.is_some(),
        "raftkv node serving"
    );
    // Aborted when dropped, at return.
    let mut reload = tokio::task::JoinSet::new();
    if let Some((listener, handle)) = metrics {
        let endpoint =
            crate::telemetry::http::Endpoint::new(handle, readiness.clone(), args.data_dir.clone());
        metrics::gauge!(crate::telemetry::names::INFO,
            "id" => args.id.to_string(),
            "cluster_id" => node.cluster().to_string(),
            "version" => env!("CARGO_PKG_VERSION"))
        .set(1.0);
        reload.spawn(async move {
            if let Err(e) = crate::telemetry::http::serve(listener, endpoint).await {
                tracing::error!(error = %e, "the metrics endpoint stopped");
            }
        });
    }
    if let Some(dir) = &args.backup_dir {
        reload.spawn(crate::backup::schedule::run(
            Arc::downgrade(&node),
            dir.clone(),
            args.backup_interval,
            args.backup_keep,
        ));
    }
    reload.spawn(reload_tls_on_sighup(
        hup,
        public_tls.iter().chain(&peer_tls).cloned().collect(),
    ));
    // --join: becomes a member once it serves (the leader must reach it to send it the log).
    let mut join = tokio::task::JoinSet::new();
    if !args.join.is_empty() {
        join.spawn(crate::node::join::become_member(node.clone(), args.clone()));
    }
    let joined = async {
        match join.join_next().await {
            Some(Ok(result)) => result.map_err(|e| e.to_string()),
            Some(Err(e)) => Err(format!("the join task failed: {e}")),
            None => std::future::pending().await,
        }
    };

    let fatal = node.stopped();
    let signals = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => Ok::<_, std::io::Error>("SIGTERM"),
            r = tokio::signal::ctrl_c() => r.map(|_| "SIGINT"),
        }
    };
    // Boxed so it can be dropped below: that stops accepting and ends the health probe before Raft
    // shuts down. Connections already open finish on their own tasks.
    let mut serve = Box::pin(async {
        tokio::try_join!(
            serve_public(
                node.clone(),
                Port {
                    listener,
                    connections,
                    max_concurrent_streams: args.max_concurrent_streams,
                    tls: public_tls,
                },
                readiness,
            ),
            serve_peers(
                node.clone(),
                Port {
                    listener: peer_listener,
                    connections: peer_connections,
                    max_concurrent_streams: args.max_concurrent_streams,
                    tls: peer_tls,
                },
            ),
        )
        .map(|_| ())
    });

    let integrity = node.integrity().clone();
    let mut corrupt = false;
    let mut graceful = false;
    let mut fatal = std::pin::pin!(fatal);
    let mut signals = std::pin::pin!(signals);
    let mut joined = std::pin::pin!(joined);
    let mut join_pending = !args.join.is_empty();
    let code = loop {
        tokio::select! {
            biased;
            what = integrity.tripped() => {
                tracing::error!(
                    data_dir = %args.data_dir.display(),
                    corrupt = %what,
                    "storage is corrupt; stopping so that this node can be rebuilt from its peers"
                );
                corrupt = true;
                break ExitCode::from(EXIT_CORRUPT);
            }
            r = &mut serve => {
                r?;
                break ExitCode::SUCCESS;
            }
            reason = &mut fatal => {
                tracing::error!(%reason, "raft stopped; exiting");
                // A storage error that was corruption has already been reported as such.
                corrupt = integrity.corrupt().is_some();
                break ExitCode::from(if corrupt { EXIT_CORRUPT } else { 1 });
            }
            sig = &mut signals => {
                tracing::info!(signal = sig.unwrap_or("signal"), "shutting down");
                graceful = true;
                break ExitCode::SUCCESS;
            }
            r = &mut joined, if join_pending => match r {
                Ok(()) => join_pending = false,
                Err(why) => {
                    tracing::error!(%why, "could not join the cluster; exiting");
                    break ExitCode::from(1);
                }
            },
        }
    };
    if corrupt {
        // Raft first, so this node stops voting and replicating on damaged data; bounded, since a
        // store that cannot be read may not let it finish cleanly.
        node.stop_raft(Some(Duration::from_secs(5))).await;
        tokio::select! {
            _ = &mut serve => {}
            _ = tokio::time::sleep(CORRUPT_GRACE) => {}
        }
        // No clean-shutdown marker: the state is not to be trusted.
        return Ok(code);
    }
    if graceful {
        // Still serving meanwhile: refusals must reach clients, and in-flight answers go out.
        let started = std::time::Instant::now();
        tokio::select! {
            _ = node.drain(DRAIN_FOR) => {}
            _ = &mut serve => {}
        }
        tracing::info!(took_ms = started.elapsed().as_millis() as u64, "drained");
    }
    drop(serve);
    node.stop_raft(None).await;
    node.close().await;
    Ok(code)
}

/// One bound port and how it is served.
pub(crate) struct Port {
    pub listener: TcpListener,
    pub connections: ConnectionLimits,
    pub max_concurrent_streams: u32,
    pub tls: Option<Arc<ServerTls>>,
}

/// Serves the public services (see `api`) until the listener fails or the caller drops the future (how
/// a node stops: see [`run`]).
pub(crate) async fn serve_public(
    node: Arc<Node>,
    port: Port,
    readiness: crate::api::health::Readiness,
) -> anyhow::Result<()> {
    let (routes, health_probe) = crate::api::services(node.clone(), readiness).await?;
    // A JoinSet aborts its tasks when dropped: the probe stops with the server, also when the server's
    // future is dropped rather than finished.
    let mut background = tokio::task::JoinSet::new();
    background.spawn(health_probe);
    let served = bounded_server(port.max_concurrent_streams)
        .layer(crate::telemetry::grpc::GrpcMetricsLayer)
        .layer(crate::api::AnswerByDeadlineLayer::new(node.id()))
        .layer(tower::util::MapResponseLayer::new(
            crate::api::oversize_is_resource_exhausted,
        ))
        .add_routes(routes)
        .serve_with_incoming(limited_incoming(
            port.listener,
            port.connections,
            "public",
            port.tls,
        ))
        .await;
    background.abort_all();
    Ok(served?)
}

/// Serves Raft and forwarding to peers, every request behind the peer identity check (see
/// `network::identity`), until the listener fails or the caller drops the future.
async fn serve_peers(node: Arc<Node>, port: Port) -> anyhow::Result<()> {
    let raft = node.raft_service();
    let refusals = raft.refusals();
    let identify = Identify::new(node.cluster(), refusals.clone());
    let raft = RaftServer::new(raft)
        .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES);
    let forward = ForwardServer::new(ForwardService::new(node, refusals))
        .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES);
    bounded_server(port.max_concurrent_streams)
        .add_service(InterceptedService::new(raft, identify.clone()))
        .add_service(InterceptedService::new(forward, identify))
        .serve_with_incoming(limited_incoming(
            port.listener,
            port.connections,
            "peer",
            port.tls,
        ))
        .await?;
    Ok(())
}

/// SIGHUP reads every listener's TLS files again, so certificates can be rotated without a restart:
/// new connections get the new ones, open connections keep theirs. A reload that fails (a file
/// half written, a key that does not match) keeps the old configuration and says why.
/// Handled without TLS too: its default action ends the process, and an operator's habitual SIGHUP
/// (log rotation, a config reload) must not take a node down.
async fn reload_tls_on_sighup(
    mut hup: tokio::signal::unix::Signal,
    listeners: Vec<Arc<ServerTls>>,
) {
    while hup.recv().await.is_some() {
        if listeners.is_empty() {
            tracing::info!("SIGHUP: no TLS certificates to reload");
        }
        for tls in &listeners {
            match tls.reload() {
                Ok(()) => tracing::info!(
                    cert = %tls.files().cert.display(),
                    "reloaded TLS certificates"
                ),
                Err(e) => tracing::warn!(
                    error = %e,
                    "TLS reload failed; the previous certificates stay in use"
                ),
            }
        }
    }
}
