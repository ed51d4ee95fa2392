//! Forwarding from a follower to the leader: client writes, in batches, and read-index requests; and
//! the leader's service that answers both (`raftkv.internal.v1.Forward`, on the peer port).
//!
//! Clients spread over all nodes, so two thirds of writes arrive at followers. Forwarded one call per
//! write, each costs the leader a request to parse, a task and a response to send, on a leader that is
//! CPU-bound under write load. Instead a follower queues forwarded writes and sends whatever has queued as
//! one `ProposeBatch` call. At most [`MAX_BATCHES_IN_FLIGHT`] batches are outstanding: under load writes queue
//! behind them and batches grow by themselves, while a lone write finds a free slot and goes at once,
//! so nothing waits on a timer.
//!
//! Each write keeps its own outcome: the leader answers every write of a batch separately, with the
//! status it would have given that write alone, and a batch that fails as a whole gives every write
//! in it the same failure. The leader's answers are typed ([`Error`] travels encoded), so a follower
//! tells a leader's refusal (not proposed: retry) from a write of unknown fate without reading status
//! codes; a failed call is "not proposed" only when the transport shows it never left this node, or
//! when the leader refused the whole call at its identity or membership check, which comes before
//! any write in it is looked at.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use super::{Error, Node};
use crate::codec;
use crate::grpc;
use crate::limits::MAX_PEER_MESSAGE_BYTES;
use crate::network::identity::{Refusals, sent_by};
use crate::network::{PeerChannels, certainly_not_sent};
use crate::pb::internal::forward_server::Forward;
use crate::pb::internal::{
    ForwardedWrite, LeaseTimeRequest, LeaseTimeResponse, MembershipChangeRequest,
    MembershipChangeResponse, ProposeBatchRequest, ProposeBatchResponse, ReadIndexRequest,
    ReadIndexResponse, WriteOutcome,
};
use crate::types::{Applied, Command, NodeId};

/// Batches outstanding at once. More overlap hides the round trip; fewer make larger batches.
const MAX_BATCHES_IN_FLIGHT: usize = 4;
const MAX_BATCH_WRITES: usize = 256;
/// Half the peer message limit: a batch of the largest requests still fits with room to spare.
const MAX_BATCH_BYTES: usize = MAX_PEER_MESSAGE_BYTES / 2;

/// Why a forwarded write has no result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardError {
    /// The leader's own verdict on the write.
    Leader(Error),
    /// The batch certainly never reached the leader (see `network::certainly_not_sent`).
    NotSent(String),
    /// The batch may have reached the leader, and no answer came back: the write's fate is unknown.
    /// `deadline`: because time ran out.
    Lost { deadline: bool, why: String },
}

impl ForwardError {
    /// A call that failed as a whole, classified by what the transport shows.
    fn from_status(status: &Status) -> Self {
        let why = status.message().to_string();
        if certainly_not_sent(status) {
            return ForwardError::NotSent(why);
        }
        // A whole call refused by the leader's identity or membership check (this node was
        // removed, or belongs to another cluster): refused before any write in it was looked at.
        // Every other verdict comes back per write, inside the answer.
        if matches!(
            status.code(),
            tonic::Code::PermissionDenied | tonic::Code::FailedPrecondition
        ) {
            return ForwardError::NotSent(format!("refused by the leader: {why}"));
        }
        let deadline = matches!(
            status.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        );
        ForwardError::Lost { deadline, why }
    }
}

type Reply = oneshot::Sender<Result<Applied, ForwardError>>;
struct Job {
    leader: NodeId,
    addr: String,
    command: Vec<u8>,
    deadline: Instant,
    reply: Reply,
}

/// A cheap handle to this node's forwarding task.
#[derive(Clone)]
pub struct Forwarder {
    jobs: mpsc::UnboundedSender<Job>,
}

impl Forwarder {
    /// Starts the batching task; it ends when every handle is dropped.
    pub fn start(channels: PeerChannels) -> Self {
        // Unbounded, yet bounded by its senders: every job is a client request holding one of the
        // connection's bounded streams until the job's reply or deadline.
        let (jobs, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(channels, rx));
        Self { jobs }
    }

    /// Proposes `cmd` through the leader `leader` at `addr`.
    pub async fn write(
        &self,
        leader: NodeId,
        addr: &str,
        cmd: &Command,
        deadline: Instant,
    ) -> Result<Applied, ForwardError> {
        let command = codec::encode(cmd)
            .map_err(|e| ForwardError::Leader(Error::Internal(format!("encode: {e}"))))?;
        let (reply, answer) = oneshot::channel();
        let job = Job {
            leader,
            addr: addr.to_string(),
            command,
            deadline,
            reply,
        };
        if self.jobs.send(job).is_err() {
            // Nothing was sent anywhere: certainly not proposed.
            return Err(ForwardError::NotSent("forwarding stopped".into()));
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(result)) => result,
            // The batch may be in flight: whether it was applied is unknown.
            Ok(Err(_)) => Err(ForwardError::Lost {
                deadline: false,
                why: "forwarding ended with the write in flight".into(),
            }),
            Err(_) => Err(ForwardError::Lost {
                deadline: true,
                why: "not confirmed by the leader before the deadline".into(),
            }),
        }
    }
}

async fn run(channels: PeerChannels, mut rx: mpsc::UnboundedReceiver<Job>) {
    let slots = Arc::new(Semaphore::new(MAX_BATCHES_IN_FLIGHT));
    let mut pending: VecDeque<Job> = VecDeque::new();
    loop {
        if pending.is_empty() {
            match rx.recv().await {
                Some(job) => pending.push_back(job),
                None => return,
            }
        }
        // Waiting for a slot is what lets a batch grow.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        while let Ok(job) = rx.try_recv() {
            pending.push_back(job);
        }
        let batch = take_batch(&mut pending);
        if let Some(first) = batch.first() {
            let (leader, addr) = (first.leader, first.addr.clone());
            tokio::spawn(send_batch(channels.clone(), leader, addr, batch, slot));
        }
    }
}

/// Takes the writes for the first queued write's leader, up to the batch limits, and drops writes whose
/// caller has given up (past its deadline: never sent, so never applied).
fn take_batch(pending: &mut VecDeque<Job>) -> Vec<Job> {
    let mut batch: Vec<Job> = Vec::new();
    let mut rest = VecDeque::new();
    let mut bytes = 0;
    while let Some(job) = pending.pop_front() {
        if job.reply.is_closed() {
            continue;
        }
        let fits = match batch.first() {
            None => true,
            Some(first) => {
                job.addr == first.addr
                    && job.leader == first.leader
                    && batch.len() < MAX_BATCH_WRITES
                    && bytes + job.command.len() <= MAX_BATCH_BYTES
            }
        };
        if fits {
            bytes += job.command.len();
            batch.push(job);
        } else {
            rest.push_back(job);
        }
    }
    *pending = rest;
    batch
}

async fn send_batch(
    channels: PeerChannels,
    leader: NodeId,
    addr: String,
    batch: Vec<Job>,
    _slot: OwnedSemaphorePermit,
) {
    let now = Instant::now();
    let timeout = batch
        .iter()
        .map(|j| j.deadline.saturating_duration_since(now))
        .max()
        .unwrap_or_default();
    let mut replies = Vec::with_capacity(batch.len());
    let mut writes = Vec::with_capacity(batch.len());
    for job in batch {
        writes.push(ForwardedWrite {
            command: job.command,
            timeout_ms: u64::try_from(job.deadline.saturating_duration_since(now).as_millis())
                .unwrap_or(u64::MAX),
        });
        replies.push(job.reply);
    }
    let result = match channels.forward_client(&addr) {
        Err(e) => Err(ForwardError::NotSent(format!(
            "bad leader address {addr}: {e}"
        ))),
        Ok(mut client) => client
            .propose_batch(grpc::request(ProposeBatchRequest { writes }, timeout))
            .await
            .map(|r| r.into_inner().outcomes)
            .map_err(|status| ForwardError::from_status(&status)),
    };
    match result {
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
        Ok(outcomes) if outcomes.len() != replies.len() => {
            tracing::error!(
                leader,
                sent = replies.len(),
                answered = outcomes.len(),
                "leader answered a forwarded batch with the wrong number of outcomes"
            );
            let e = ForwardError::Lost {
                deadline: false,
                why: "the leader's answer to a forwarded batch did not match it".into(),
            };
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
        Ok(outcomes) => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(from_outcome(&outcome));
            }
        }
    }
}

/// The leader's answer for one write of a batch. One that does not decode came from a leader that
/// did answer, so the write may have been applied.
fn from_outcome(outcome: &WriteOutcome) -> Result<Applied, ForwardError> {
    match codec::decode::<Result<Applied, Error>>(&outcome.result) {
        Ok(result) => result.map_err(ForwardError::Leader),
        Err(e) => Err(ForwardError::Lost {
            deadline: false,
            why: format!("undecodable answer from the leader: {e}"),
        }),
    }
}

/// The leader's half: the outcome of one forwarded write, as [`from_outcome`] reads it.
fn to_outcome(result: &Result<Applied, Error>) -> WriteOutcome {
    let result = codec::encode(result).unwrap_or_else(|e| {
        // Encoding an owned value into a Vec fails only on a bug; the follower reads it as unknown.
        tracing::error!(error = %e, "cannot encode a forwarded write's outcome");
        Vec::new()
    });
    WriteOutcome { result }
}

/// Asks the leader at `addr` for a read index. The error says why there is none, for the reads'
/// refusal message: any failure is a reason to look for a leader again.
pub async fn read_index(
    channels: &PeerChannels,
    addr: &str,
    deadline: Instant,
) -> Result<u64, String> {
    let mut client = channels
        .forward_client(addr)
        .map_err(|e| format!("bad leader address {addr}: {e}"))?;
    let timeout = deadline.saturating_duration_since(Instant::now());
    let response = client
        .read_index(grpc::request(ReadIndexRequest {}, timeout))
        .await
        .map_err(|s| format!("leader at {addr}: {}", s.message()))?;
    match codec::decode::<Result<u64, Error>>(&response.into_inner().result) {
        Ok(Ok(index)) => Ok(index),
        Ok(Err(e)) => Err(format!("leader at {addr}: {e}")),
        Err(e) => Err(format!("leader at {addr}: undecodable answer: {e}")),
    }
}

/// Asks the leader at `addr` to renew lease `id` or to say how long it has left (see `node::lease`).
/// A keep-alive does nothing until it is answered, so every failure to hear back is `NotLeader`:
/// the caller may ask again, at whichever node leads.
pub async fn lease_time(
    channels: &PeerChannels,
    addr: &str,
    id: u64,
    renew: bool,
    deadline: Instant,
) -> Result<Option<Duration>, Error> {
    let unreachable = |why: String| Error::not_leader(why, super::LeaderHint::default());
    let mut client = channels
        .forward_client(addr)
        .map_err(|e| unreachable(format!("bad leader address {addr}: {e}")))?;
    let timeout = deadline.saturating_duration_since(Instant::now());
    let request = LeaseTimeRequest {
        id,
        renew,
        timeout_ms: timeout.as_millis() as u64,
    };
    let response = client
        .lease_time(grpc::request(request, timeout))
        .await
        .map_err(|s| unreachable(format!("leader at {addr}: {}", s.message())))?;
    match codec::decode::<Result<Option<u64>, Error>>(&response.into_inner().result) {
        Ok(result) => result.map(|ms| ms.map(Duration::from_millis)),
        Err(e) => Err(unreachable(format!(
            "leader at {addr}: undecodable answer: {e}"
        ))),
    }
}

/// Sends a membership change to the leader at `addr` (see `node::membership`); one call per change,
/// as changes are rare.
pub async fn change_membership(
    channels: &PeerChannels,
    addr: &str,
    change: &super::membership::Change,
    deadline: Instant,
) -> Result<Vec<super::membership::MemberInfo>, ForwardError> {
    let encoded = codec::encode(change)
        .map_err(|e| ForwardError::Leader(Error::Internal(format!("encode: {e}"))))?;
    let mut client = channels
        .forward_client(addr)
        .map_err(|e| ForwardError::NotSent(format!("bad leader address {addr}: {e}")))?;
    let timeout = deadline.saturating_duration_since(Instant::now());
    let request = MembershipChangeRequest {
        change: encoded,
        timeout_ms: timeout.as_millis() as u64,
    };
    let response = client
        .change_membership(grpc::request(request, timeout))
        .await
        .map_err(|s| ForwardError::from_status(&s))?;
    match codec::decode::<Result<Vec<super::membership::MemberInfo>, Error>>(
        &response.into_inner().result,
    ) {
        Ok(result) => result.map_err(ForwardError::Leader),
        Err(e) => Err(ForwardError::Lost {
            deadline: false,
            why: format!("undecodable answer from the leader at {addr}: {e}"),
        }),
    }
}

/// The leader's side of forwarding: answers followers' read-index requests and forwarded batches.
/// Callers pass the peer identity check first (`network::identity::Identify`, mounted by server.rs).
pub struct ForwardService {
    node: Arc<Node>,
    refusals: Arc<Refusals>,
}

impl ForwardService {
    pub fn new(node: Arc<Node>, refusals: Arc<Refusals>) -> Self {
        ForwardService { node, refusals }
    }

    /// PERMISSION_DENIED unless the sender is a member (see `Node::admits`).
    fn admit<T>(&self, rpc: &'static str, request: &Request<T>) -> Result<(), Status> {
        let from = sent_by(request)?;
        if self.node.admits(from) {
            return Ok(());
        }
        self.refusals.note(rpc, from, "not a member");
        Err(Status::permission_denied(format!(
            "node {from} is not a member of this cluster"
        )))
    }

    /// One forwarded write, under the same rules as a write that arrives on the public API: the
    /// follower has checked it already, but anyone who reaches the peer port can send this.
    async fn propose(&self, write: ForwardedWrite) -> Result<Applied, Error> {
        let _in_flight = self.node.admit_request()?;
        let deadline = self
            .node
            .deadline(Some(Duration::from_millis(write.timeout_ms)));
        let cmd = codec::decode::<Command>(&write.command)
            .map_err(|e| Error::Invalid(format!("undecodable forwarded write: {e}")))?;
        crate::limits::command(self.node.limits(), &cmd)?;
        self.node.admit_forwarded_lease_op(&cmd)?;
        self.node.propose_as_leader(cmd, deadline).await
    }
}

#[tonic::async_trait]
impl Forward for ForwardService {
    async fn read_index(
        &self,
        request: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        self.admit("ReadIndex", &request)?;
        let deadline = self.node.deadline(grpc::timeout_of(request.metadata()));
        let result = match self.node.admit_request() {
            Ok(_in_flight) => self.node.read_index(deadline).await,
            Err(e) => Err(e),
        };
        let result = codec::encode(&result).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(ReadIndexResponse { result }))
    }

    async fn propose_batch(
        &self,
        request: Request<ProposeBatchRequest>,
    ) -> Result<Response<ProposeBatchResponse>, Status> {
        self.admit("ProposeBatch", &request)?;
        // Proposed concurrently, as if each had arrived on its own call; each keeps its own deadline.
        let writes = request.into_inner().writes;
        let outcomes = futures::future::join_all(
            writes
                .into_iter()
                .map(|w| async move { to_outcome(&self.propose(w).await) }),
        )
        .await;
        Ok(Response::new(ProposeBatchResponse { outcomes }))
    }

    async fn change_membership(
        &self,
        request: Request<MembershipChangeRequest>,
    ) -> Result<Response<MembershipChangeResponse>, Status> {
        self.admit("ChangeMembership", &request)?;
        let request = request.into_inner();
        let result = match codec::decode::<super::membership::Change>(&request.change) {
            Ok(change) => {
                let timeout = Duration::from_millis(request.timeout_ms);
                let deadline = self.node.deadline(Some(timeout));
                match self.node.admit_request() {
                    Ok(_in_flight) => self.node.change_as_leader(change, deadline).await,
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(Error::Invalid(format!(
                "undecodable membership change: {e}"
            ))),
        };
        let result = codec::encode(&result).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(MembershipChangeResponse { result }))
    }

    async fn lease_time(
        &self,
        request: Request<LeaseTimeRequest>,
    ) -> Result<Response<LeaseTimeResponse>, Status> {
        self.admit("LeaseTime", &request)?;
        let request = request.into_inner();
        let deadline = self
            .node
            .deadline(Some(Duration::from_millis(request.timeout_ms)));
        let result = match self.node.admit_request() {
            Ok(_in_flight) => self
                .node
                .lease_time_as_leader(request.id, request.renew, deadline)
                .await
                .map(|left| left.map(|d| d.as_millis() as u64)),
            Err(e) => Err(e),
        };
        let result = codec::encode(&result).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(LeaseTimeResponse { result }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(leader: NodeId, addr: &str) -> (Job, oneshot::Receiver<Result<Applied, ForwardError>>) {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            leader,
            addr: addr.to_string(),
            command: vec![0; 8],
            deadline: Instant::now(),
            reply,
        };
        (job, rx)
    }

    #[test]
    fn a_batch_is_one_leader_and_skips_abandoned_writes() {
        let (a1, _r1) = job(1, "a");
        let (b1, _r2) = job(2, "b");
        let (a2, r3) = job(1, "a");
        let (a3, _r4) = job(1, "a");
        drop(r3); // its caller gave up
        let mut pending: VecDeque<Job> = [a1, b1, a2, a3].into_iter().collect();
        let batch = take_batch(&mut pending);
        assert_eq!(batch.len(), 2);
        assert!(batch.iter().all(|j| j.leader == 1 && j.addr == "a"));
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].leader, 2);
        assert_eq!(take_batch(&mut pending).len(), 1);
        assert!(pending.is_empty());
    }

    #[test]
    fn outcomes_carry_the_leaders_verdict() {
        let refused = Error::not_leader("not the leader", super::super::LeaderHint::default());
        let back = from_outcome(&to_outcome(&Err(refused.clone())));
        assert_eq!(back, Err(ForwardError::Leader(refused)));
        let applied = Applied {
            revision: 7,
            response: crate::types::CommandResponse::None,
        };
        let back = from_outcome(&to_outcome(&Ok(applied.clone())));
        assert_eq!(back, Ok(applied));
        let garbage = WriteOutcome {
            result: vec![1, 9, 9],
        };
        assert!(matches!(
            from_outcome(&garbage),
            Err(ForwardError::Lost {
                deadline: false,
                ..
            })
        ));
    }

    #[test]
    fn a_call_refused_by_the_leaders_checks_was_not_proposed() {
        for code in [
            tonic::Code::PermissionDenied,
            tonic::Code::FailedPrecondition,
        ] {
            let refused = ForwardError::from_status(&Status::new(code, "not a member"));
            assert!(matches!(refused, ForwardError::NotSent(_)), "{code:?}");
        }
        let cut = ForwardError::from_status(&Status::unknown("connection reset"));
        assert!(matches!(
            cut,
            ForwardError::Lost {
                deadline: false,
                ..
            }
        ));
        let late = ForwardError::from_status(&Status::deadline_exceeded("late"));
        assert!(matches!(late, ForwardError::Lost { deadline: true, .. }));
    }
}
