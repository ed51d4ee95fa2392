//! The replication stream's client against peers that misbehave in ways a healthy raftkv never does:
//! one that stops answering (a paused process), one that stops reading, and one that hangs up early.
//! Each test serves a stand-in peer on a loopback port.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use openraft::error::RPCError;
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

use super::PeerChannels;
use super::client::{NetworkFactory, PeerClient};
use crate::codec;
use crate::pb::internal::raft_server::{Raft as RaftRpc, RaftServer};
use crate::pb::internal::{Payload, SnapshotChunk};
use crate::types::{LogId, TypeConfig, Vote};

#[derive(Clone, Copy)]
enum Peer {
    /// Opens the stream, reads requests, never answers.
    Silent,
    /// Opens the stream and never reads it, so HTTP/2 flow control stops the sender.
    Deaf,
    /// Reads the first request, then ends the stream without answering it.
    Quitter,
}

fn not_here<T>() -> Result<T, Status> {
    Err(Status::unimplemented("not part of this stand-in"))
}

#[tonic::async_trait]
impl RaftRpc for Peer {
    async fn append_entries(&self, _: Request<Payload>) -> Result<Response<Payload>, Status> {
        let data = codec::encode(&AppendEntriesResponse::<TypeConfig>::Success)
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(Payload { data }))
    }

    type StreamAppendStream = Pin<Box<dyn Stream<Item = Result<Payload, Status>> + Send>>;

    async fn stream_append(
        &self,
        request: Request<Streaming<Payload>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        match self {
            Peer::Deaf => {
                let unread = request.into_inner();
                let never = futures::stream::pending().map(move |answer| {
                    let _keep_open = &unread;
                    answer
                });
                Ok(Response::new(Box::pin(never)))
            }
            Peer::Quitter => {
                let mut requests = request.into_inner();
                let _first = requests.next().await;
                Ok(Response::new(Box::pin(futures::stream::empty())))
            }
            Peer::Silent => {
                // Keeps reading so the requests are delivered, and answers nothing.
                let drained = request
                    .into_inner()
                    .filter_map(|_| futures::future::ready(None));
                Ok(Response::new(Box::pin(drained)))
            }
        }
    }

    async fn vote(&self, _: Request<Payload>) -> Result<Response<Payload>, Status> {
        not_here()
    }

    async fn pre_vote(&self, _: Request<Payload>) -> Result<Response<Payload>, Status> {
        not_here()
    }

    async fn transfer_leader(&self, _: Request<Payload>) -> Result<Response<Payload>, Status> {
        not_here()
    }

    async fn install_snapshot(
        &self,
        _: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<Payload>, Status> {
        not_here()
    }

    async fn members(
        &self,
        _: Request<crate::pb::internal::MembersRequest>,
    ) -> Result<Response<crate::pb::internal::MembersResponse>, Status> {
        not_here()
    }
}

/// Serves `peer` on a free loopback port and returns a client of it, as node 1 would hold for node 2.
async fn client_of(peer: Peer) -> PeerClient {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RaftServer::new(peer))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let mut factory = NetworkFactory {
        id: 1,
        channels: PeerChannels::new(
            super::identity::PeerIdentity {
                cluster: super::identity::ClusterId(7),
                node: 1,
            },
            None,
            Default::default(),
        ),
        removal: Default::default(),
    };
    factory
        .new_client(2, &crate::types::Member::new("unused", addr))
        .await
}

/// An entry-less request after log index 5: the follower's answer is that index.
fn heartbeat() -> AppendEntriesRequest<TypeConfig> {
    let last: LogId = openraft::testing::log_id::<TypeConfig>(1, 1, 5);
    AppendEntriesRequest {
        vote: Vote::new_committed(1, 1),
        prev_log_id: Some(last),
        leader_commit: Some(last),
        entries: Vec::new(),
    }
}

/// One request, then the stream stays open, as openraft's does while it waits for new entries.
fn one_request() -> impl Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static {
    futures::stream::iter([heartbeat()]).chain(futures::stream::pending())
}

#[tokio::test]
async fn an_unanswered_replication_stream_times_out() {
    let mut client = client_of(Peer::Silent).await;
    let option = RPCOption::new(Duration::from_millis(50));
    // The network's own budget; openraft's hard limit is a quarter above it.
    let ttl = option.soft_ttl();
    let started = Instant::now();
    let mut answers = client
        .stream_append(one_request(), option)
        .await
        .expect("the silent peer accepts the stream");
    let first = tokio::time::timeout(Duration::from_secs(5), answers.next())
        .await
        .expect("a silent follower is given up on well before HTTP/2 keepalive would");
    assert!(
        matches!(first, Some(Err(RPCError::Timeout(_)))),
        "{first:?}"
    );
    let waited = started.elapsed();
    assert!(waited >= ttl, "gave up after {waited:?}, before the ttl");
    assert!(
        answers.next().await.is_none(),
        "the stream ends after the timeout"
    );
}

/// Sets its flag when dropped, to tell when openraft's request generator is let go.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_follower_that_stops_reading_is_let_go_and_leaves_other_calls_alone() {
    let mut client = client_of(Peer::Deaf).await;
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = DropFlag(dropped.clone());
    // Far more than flow control lets through, then the stream stays open like openraft's.
    let input = futures::stream::iter(std::iter::repeat_with(heartbeat).take(200_000))
        .chain(futures::stream::pending())
        .map(move |request| {
            let _held_by_the_input = &flag;
            request
        });
    let option = RPCOption::new(Duration::from_millis(100));
    let mut answers = client
        .stream_append(input, option.clone())
        .await
        .expect("the deaf peer accepts the stream");
    let first = tokio::time::timeout(Duration::from_secs(5), answers.next())
        .await
        .expect("a follower that reads nothing is given up on");
    assert!(
        matches!(first, Some(Err(RPCError::Timeout(_)))),
        "{first:?}"
    );
    drop(answers);
    let deadline = Instant::now() + Duration::from_secs(2);
    while !dropped.load(Ordering::SeqCst) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        dropped.load(Ordering::SeqCst),
        "the request generator outlived its session; openraft's next session would wait for its lock"
    );
    let unary = client
        .append_entries(heartbeat(), RPCOption::new(Duration::from_secs(1)))
        .await;
    assert!(
        unary.is_ok(),
        "a stuck stream must not stall the peer's other calls: {:?}",
        unary.err()
    );
}

#[tokio::test]
async fn a_stream_ended_with_requests_unanswered_is_an_error() {
    let mut client = client_of(Peer::Quitter).await;
    let mut answers = client
        .stream_append(one_request(), RPCOption::new(Duration::from_secs(1)))
        .await
        .expect("the peer accepts the stream");
    let first = tokio::time::timeout(Duration::from_secs(5), answers.next())
        .await
        .expect("the end of the stream arrives");
    assert!(
        matches!(first, Some(Err(RPCError::Network(_)))),
        "an unanswered request must not pass for a clean end: {first:?}"
    );
}
