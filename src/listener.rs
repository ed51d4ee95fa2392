//! Accepting TCP connections within bounds: at most so many at a time, and none that lingers without
//! ever making a request.
//!
//! Without a bound, idle connections exhausted a node's file descriptors; it then refused every client
//! and logged nothing. A connection over the limit is closed at once; one inside it that has not sent
//! its first HTTP/2 request within the handshake timeout is closed too, so connections that only hold
//! a slot cannot lock real clients out for long. [`limited_incoming`] wraps any listener, so a second
//! listener (peers) gets the same bounds with a limit of its own.
//!
//! With TLS the listener does the TLS handshake itself, inside the same deadline, and watches for the
//! first request in the decrypted stream: on ciphertext it could not see one. Handshakes run side by
//! side in the accept stream (each holding its slot), so a client that stalls its handshake delays
//! no one else's.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::{Stream, StreamExt};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::either::Either;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::tls::ServerTls;

/// File descriptors kept free of client connections: the database, the log, peer connections and
/// whatever else the process opens must not fail because clients took every descriptor.
pub const RESERVED_FDS: u64 = 256;

/// How often a refusal or an accept error is logged at most.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// When accepting fails for lack of descriptors or memory, the next try waits this long, so the loop
/// does not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// Connections open at once; beyond it new ones are closed as they arrive.
    pub max_connections: usize,
    /// How long a connection may stay open before it sends its first request (with TLS, the
    /// handshake included).
    pub handshake_timeout: Duration,
}

/// Accepted connections, each holding one of `limits.max_connections` slots until it closes. `name`
/// says which listener a log line is about. With `tls`, a connection is yielded once its TLS
/// handshake has completed; one whose handshake fails or outlasts the handshake timeout is closed
/// (a rate-limited WARN) and its slot freed. Accept errors are logged here (rate-limited) and never
/// yielded: tonic only traces them, and an error the stream returned at once on every poll (out of
/// descriptors) would spin its accept loop.
pub fn limited_incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
    name: &'static str,
    tls: Option<Arc<ServerTls>>,
) -> impl Stream<Item = io::Result<LimitedConnection>> + Send + 'static {
    let state = Incoming {
        accepting: Accepting {
            listener,
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            name,
            refused: RateLimited::default(),
            errors: RateLimited::default(),
        },
        tls,
        handshakes: FuturesUnordered::new(),
        failed_handshakes: RateLimited::default(),
    };
    futures::stream::unfold(state, |mut s| async move {
        let conn = s.next().await;
        Some((Ok(conn), s))
    })
}

type Handshake =
    Pin<Box<dyn Future<Output = Result<LimitedConnection, (io::Error, TcpConnectInfo)>> + Send>>;

struct Incoming {
    accepting: Accepting,
    tls: Option<Arc<ServerTls>>,
    /// TLS handshakes under way; at most one per slot, since each holds its slot.
    handshakes: FuturesUnordered<Handshake>,
    failed_handshakes: RateLimited,
}

impl Incoming {
    async fn next(&mut self) -> LimitedConnection {
        loop {
            tokio::select! {
                (stream, slot, accepted) = self.accepting.accept() => {
                    let deadline = accepted + self.accepting.limits.handshake_timeout;
                    match &self.tls {
                        None => return LimitedConnection::new(Either::Left(stream), slot, deadline, None),
                        Some(tls) => self.handshakes.push(Box::pin(handshake(tls.acceptor(), stream, slot, deadline))),
                    }
                }
                Some(done) = self.handshakes.next(), if !self.handshakes.is_empty() => match done {
                    Ok(conn) => return conn,
                    Err((e, info)) => {
                        if let Some(suppressed) = self.failed_handshakes.due() {
                            tracing::warn!(
                                listener = self.accepting.name,
                                peer = ?info.remote_addr,
                                error = %e,
                                failed_since_last_report = suppressed,
                                "TLS handshake failed; connection closed"
                            );
                        }
                    }
                },
            }
        }
    }
}

/// The server side of a TLS handshake, cut off at `deadline`. On failure the stream and its slot are
/// dropped here, which closes the connection and frees the slot.
async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    slot: OwnedSemaphorePermit,
    deadline: tokio::time::Instant,
) -> Result<LimitedConnection, (io::Error, TcpConnectInfo)> {
    let info = stream.connect_info();
    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            let certs = tls
                .get_ref()
                .1
                .peer_certificates()
                .map(|certs| Arc::new(certs.to_vec()));
            Ok(LimitedConnection::new(
                Either::Right(Box::new(tls)),
                slot,
                deadline,
                certs,
            ))
        }
        Ok(Err(e)) => Err((e, info)),
        Err(_) => Err((
            io::Error::new(
                io::ErrorKind::TimedOut,
                "no TLS handshake within the handshake timeout",
            ),
            info,
        )),
    }
}

struct Accepting {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    limits: ConnectionLimits,
    name: &'static str,
    refused: RateLimited,
    errors: RateLimited,
}

impl Accepting {
    /// The next connection inside the limit, its slot and when it was accepted. Cancel-safe: a
    /// connection is accepted only in the poll that returns it.
    async fn accept(&mut self) -> (TcpStream, OwnedSemaphorePermit, tokio::time::Instant) {
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    if let Some(suppressed) = self.errors.due() {
                        tracing::warn!(listener = self.name, error = %e, suppressed, "accepting a connection failed");
                    }
                    if is_resource_error(&e) {
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    }
                    continue;
                }
            };
            match self.slots.clone().try_acquire_owned() {
                Ok(permit) => {
                    // Sockets from an incoming stream keep Nagle's algorithm unless it is turned off
                    // here; with it, a small response waits for the peer's delayed ACK (see docs/measurements.md).
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "TCP_NODELAY");
                    }
                    return (stream, permit, tokio::time::Instant::now());
                }
                Err(_) => {
                    drop(stream);
                    if let Some(suppressed) = self.refused.due() {
                        tracing::warn!(
                            listener = self.name,
                            limit = self.limits.max_connections,
                            %peer,
                            refused_since_last_report = suppressed,
                            "connection limit reached; closing new connections until some close"
                        );
                    }
                }
            }
        }
    }
}

fn is_resource_error(e: &io::Error) -> bool {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM: the condition outlasts one retry.
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

/// Logs the first event and then at most one per [`LOG_EVERY`], counting the ones it skipped.
#[derive(Default)]
struct RateLimited {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    /// Some(number skipped since the last line) when a line is due.
    fn due(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|at| now.duration_since(at) < LOG_EVERY)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// A connection, plaintext or TLS, that holds a slot until it is dropped, and fails its reads once
/// the handshake timeout passes before the client's first request.
pub struct LimitedConnection {
    stream: Either<TcpStream, Box<tokio_rustls::server::TlsStream<TcpStream>>>,
    info: ConnectionInfo,
    _slot: OwnedSemaphorePermit,
    /// Until the first request: its deadline, and where the reader is in the (decrypted) byte stream.
    handshake: Option<(Pin<Box<tokio::time::Sleep>>, FirstRequest)>,
}

/// What a request handler can learn about its connection (a request extension).
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    pub tcp: TcpConnectInfo,
    /// The client's certificate chain, leaf first, when it showed one over TLS; the TLS layer has
    /// verified it against the listener's CA.
    pub peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

impl LimitedConnection {
    fn new(
        stream: Either<TcpStream, Box<tokio_rustls::server::TlsStream<TcpStream>>>,
        slot: OwnedSemaphorePermit,
        deadline: tokio::time::Instant,
        peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    ) -> Self {
        let tcp = match &stream {
            Either::Left(tcp) => tcp.connect_info(),
            Either::Right(tls) => tls.get_ref().0.connect_info(),
        };
        LimitedConnection {
            stream,
            info: ConnectionInfo { tcp, peer_certs },
            _slot: slot,
            handshake: Some((
                Box::pin(tokio::time::sleep_until(deadline)),
                FirstRequest::default(),
            )),
        }
    }
}

impl Connected for LimitedConnection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}

impl AsyncRead for LimitedConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Checked before every read, not only when the peer is quiet: a client that keeps sending
        // frames other than a request (pings, settings) must not hold its slot past the deadline.
        if let Some((deadline, _)) = this.handshake.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no request within the handshake timeout",
            )));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let (Some((_, first)), Poll::Ready(Ok(()))) = (this.handshake.as_mut(), &polled)
            && first.feed(&buf.filled()[before..])
        {
            this.handshake = None;
        }
        polled
    }
}

impl AsyncWrite for LimitedConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        AsyncWrite::is_write_vectored(&self.stream)
    }
}

/// Follows the client's side of an HTTP/2 connection just far enough to see its first request: the
/// 24-byte connection preface, then frames (a 9-byte header whose first three bytes are the payload
/// length and fourth the type) until a HEADERS frame. hyper parses and validates the same bytes; this
/// only skips over them. Written here because neither hyper nor tonic offers a timeout for a
/// connection that never makes a request.
#[derive(Default)]
struct FirstRequest {
    preface_left: Option<usize>,
    header: [u8; 9],
    header_len: usize,
    payload_left: usize,
}

const PREFACE_LEN: usize = 24;
const HEADERS_FRAME: u8 = 0x1;

impl FirstRequest {
    /// Takes the next bytes the client sent; true once they include the start of a request.
    fn feed(&mut self, mut bytes: &[u8]) -> bool {
        let preface_left = self.preface_left.get_or_insert(PREFACE_LEN);
        let skip = (*preface_left).min(bytes.len());
        *preface_left -= skip;
        bytes = &bytes[skip..];
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let skip = self.payload_left.min(bytes.len());
                self.payload_left -= skip;
                bytes = &bytes[skip..];
                continue;
            }
            let take = (9 - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&bytes[..take]);
            self.header_len += take;
            bytes = &bytes[take..];
            if self.header_len == 9 {
                if self.header[3] == HEADERS_FRAME {
                    return true;
                }
                self.payload_left = (usize::from(self.header[0]) << 16)
                    | (usize::from(self.header[1]) << 8)
                    | usize::from(self.header[2]);
                self.header_len = 0;
            }
        }
        false
    }
}

/// Raises the soft limit on open files to the hard limit, so the connection limit and not the
/// default soft limit (often 1024) is what bounds clients. Returns the soft limit now in force.
pub fn raise_fd_limit() -> io::Result<u64> {
    let (soft, hard) = rlimit::Resource::NOFILE.get()?;
    let now = rlimit::increase_nofile_limit(u64::MAX)?;
    if now != soft {
        tracing::info!(from = soft, to = now, hard, "raised the open-file limit");
    }
    Ok(now)
}

/// `wanted` connections, lowered (with a WARN) if the descriptor limit could not hold them plus
/// [`RESERVED_FDS`].
pub fn fit_to_fd_limit(wanted: usize, fd_limit: u64) -> usize {
    let room = fd_limit.saturating_sub(RESERVED_FDS).max(16);
    if wanted as u64 > room {
        tracing::warn!(
            wanted,
            fd_limit,
            using = room,
            "--max-connections does not fit in the open-file limit; lowering it"
        );
        return room as usize;
    }
    wanted
}

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

/// A tonic server with the HTTP/2 bounds every raftkv listener uses (public and peer alike).
pub fn bounded_server(max_concurrent_streams: u32) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(Some(max_concurrent_streams))
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESET_STREAMS))
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            0,
            0,
            0,
            0,
            1,
        ];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn the_first_request_is_seen_after_the_preface_and_other_frames() {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(0x4, &[0; 12])); // SETTINGS
        bytes.extend(frame(0x8, &[0; 4])); // WINDOW_UPDATE
        let headers = frame(HEADERS_FRAME, &[0; 30]);
        let request_at = bytes.len();
        bytes.extend(headers);
        // Whole, and one byte at a time: a request is seen only once its frame header is complete.
        let mut whole = FirstRequest::default();
        assert!(whole.feed(&bytes));
        let mut split = FirstRequest::default();
        for (i, b) in bytes.iter().enumerate() {
            let seen = split.feed(std::slice::from_ref(b));
            assert_eq!(seen, i == request_at + 8, "byte {i}");
            if seen {
                break;
            }
        }
    }

    #[test]
    fn a_connection_without_a_request_is_not_taken_for_one() {
        let mut f = FirstRequest::default();
        assert!(!f.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert!(!f.feed(&frame(0x4, &[0; 6])));
        // A payload that looks like a HEADERS frame header is skipped as payload.
        assert!(!f.feed(&frame(0x6, &[0, 0, 0, HEADERS_FRAME, 0, 0, 0, 0])));
        assert!(!f.feed(&[]));
    }

    /// A client that keeps sending frames other than a request (here PINGs, back to back, so the
    /// server's reads never wait) is cut off at the handshake deadline like a silent one; before, the
    /// deadline was checked only while a read waited, so such a client held its slot for good.
    #[tokio::test]
    async fn a_client_that_chatters_without_a_request_is_cut_off_at_the_deadline() {
        use futures::StreamExt;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ConnectionLimits {
            max_connections: 4,
            handshake_timeout: Duration::from_millis(200),
        };
        let mut incoming = Box::pin(limited_incoming(listener, limits, "test", None));
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut server = incoming.next().await.unwrap().unwrap();
        let chatter = tokio::spawn(async move {
            let _ = client.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
            let pings: Vec<u8> = (0..64).flat_map(|_| frame(0x6, &[0; 8])).collect();
            for _ in 0..100_000 {
                if client.write_all(&pings).await.is_err() {
                    return;
                }
            }
            // Still connected, so an end of stream can only be the server's doing (a fast machine
            // gets through the pings before the deadline).
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(client);
        });
        let started = std::time::Instant::now();
        let mut buf = [0u8; 1024];
        let ended = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match server.read(&mut buf).await {
                    Ok(0) => return Ok(()),
                    Ok(_) => continue,
                    Err(e) => return Err(e),
                }
            }
        })
        .await
        .expect("the connection is cut off well before the chatter ends");
        assert_eq!(ended.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(1));
        chatter.abort();
    }

    /// A TLS listener on loopback with certificates made for the test, driven by a task of its own
    /// (handshakes advance only while the stream is polled), with what it yields sent to `rx`.
    async fn tls_listener(
        limits: ConnectionLimits,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::mpsc::Receiver<LimitedConnection>,
        tokio_rustls::TlsConnector,
        tempfile::TempDir,
    ) {
        use crate::tls::{ServerTls, ServerTlsFiles, files};
        let dir = tempfile::tempdir().unwrap();
        crate::tls::generate("test", &["127.0.0.1".into()], &[1])
            .unwrap()
            .write(dir.path())
            .unwrap();
        let tls = ServerTls::new(ServerTlsFiles {
            cert: dir.path().join(files::node(1)),
            key: dir.path().join(files::node_key(1)),
            client_ca: None,
            require_client_cert: false,
        })
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(limited_incoming(listener, limits, "test", Some(tls)));
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(Ok(conn)) = incoming.next().await {
                if tx.send(conn).await.is_err() {
                    break;
                }
            }
        });
        let (roots, _) = crate::tls::load_roots(&dir.path().join(files::CA)).unwrap();
        let client = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        (
            addr,
            rx,
            tokio_rustls::TlsConnector::from(Arc::new(client)),
            dir,
        )
    }

    /// A client that opens a TCP connection to a TLS listener and never starts its handshake is
    /// closed at the handshake deadline, and never reaches the server.
    #[tokio::test]
    async fn a_tls_client_that_never_completes_its_handshake_is_cut_off_at_the_deadline() {
        use tokio::io::AsyncReadExt;
        let limits = ConnectionLimits {
            max_connections: 4,
            handshake_timeout: Duration::from_millis(200),
        };
        let (addr, mut served, _, _dir) = tls_listener(limits).await;
        let started = std::time::Instant::now();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(2), client.read(&mut buf))
            .await
            .expect("the server closes the connection well within 2 s")
            .unwrap_or(0);
        assert_eq!(n, 0, "the server sent something to a silent client");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(150) && took < Duration::from_secs(1),
            "closed after {took:?}, not at the 200 ms deadline"
        );
        assert!(
            served.try_recv().is_err(),
            "a connection without TLS was served"
        );
    }

    /// A failed handshake (here a plaintext HTTP/2 client on a TLS port) closes the connection and
    /// frees its slot: with room for one connection, a proper TLS client gets in right after.
    #[tokio::test]
    async fn a_failed_tls_handshake_frees_the_connection_slot() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let limits = ConnectionLimits {
            max_connections: 1,
            handshake_timeout: Duration::from_secs(10),
        };
        let (addr, mut served, connector, _dir) = tls_listener(limits).await;
        let mut plain = TcpStream::connect(addr).await.unwrap();
        plain
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        // rustls answers the garbage with an alert and the server closes: read to the end.
        tokio::time::timeout(Duration::from_secs(2), async {
            while let Ok(n) = plain.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await
        .expect("the failed handshake closes the connection long before its deadline");
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = tokio::time::timeout(Duration::from_secs(2), connector.connect(name, tcp))
            .await
            .expect("the handshake finishes: the slot was freed")
            .expect("TLS handshake");
        let conn = tokio::time::timeout(Duration::from_secs(2), served.recv())
            .await
            .expect("the TLS connection is served")
            .expect("the listener runs");
        assert!(conn.connect_info().peer_certs.is_none());
        tls.write_all(b"PRI").await.unwrap();
    }

    #[test]
    fn the_limit_leaves_room_for_the_process_itself() {
        assert_eq!(fit_to_fd_limit(100, 100_000), 100);
        assert_eq!(fit_to_fd_limit(4096, 1024), 1024 - RESERVED_FDS as usize);
        assert_eq!(fit_to_fd_limit(4096, 10), 16);
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_and_idle_ones_reaped() {
        use futures::StreamExt;
        use tokio::io::AsyncReadExt;

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ConnectionLimits {
            max_connections: 2,
            handshake_timeout: Duration::from_millis(200),
        };
        let mut incoming = Box::pin(limited_incoming(listener, limits, "test", None));
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(incoming.next().await.unwrap().unwrap());
        }
        // The third is closed as soon as the stream is polled again; the server side of the first
        // two times out for lack of a request.
        let poll_more = tokio::time::timeout(Duration::from_millis(300), incoming.next()).await;
        assert!(poll_more.is_err(), "nothing more was accepted");
        let mut buf = [0u8; 8];
        let n = tokio::time::timeout(Duration::from_secs(2), clients[2].read(&mut buf))
            .await
            .expect("the third connection is closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
        for conn in &mut held {
            let err = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf))
                .await
                .expect("the read ends")
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        }
        drop(held);
        // Slots are free again.
        let _again = TcpStream::connect(addr).await.unwrap();
        let conn = tokio::time::timeout(Duration::from_secs(2), incoming.next()).await;
        assert!(matches!(conn, Ok(Some(Ok(_)))));
    }
}
