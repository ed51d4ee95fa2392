//! Forwarding client writes from a follower to the leader, in batches.
//!
//! Clients spread over all nodes, so two thirds of writes arrive at followers. Forwarded one call per
//! write, each costs the leader a request to parse, a task and a response to send, on a leader that is
//! CPU-bound under write load. Instead a follower queues forwarded writes and sends whatever has queued as
//! one `ProposeBatch` call. At most [`MAX_IN_FLIGHT`] batches are outstanding: under load writes queue
//! behind them and batches grow by themselves, while a lone write finds a free slot and goes at once,
//! so nothing waits on a timer.
//!
//! Each write keeps its own outcome: the leader answers every write of a batch separately, with the
//! status it would have given that write alone, and a batch that fails as a whole gives every write
//! in it the same failure, which `Node::write` classifies as before (not proposed: retry; otherwise
//! unknown or deadline exceeded).

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tonic::metadata::MetadataValue;

use crate::api::error::{ApiError, LeaderHint, NODE_ID_HEADER};
use crate::codec;
use crate::network::{MAX_PEER_MESSAGE_BYTES, PeerChannels, Purpose};
use crate::node::Applied;
use crate::pb::internal::{ForwardedWrite, ProposeBatchRequest, WriteOutcome};
use crate::types::{Command, NodeId};

/// Batches outstanding at once. More overlap hides the round trip; fewer make larger batches.
const MAX_IN_FLIGHT: usize = 4;
const MAX_BATCH_WRITES: usize = 256;
/// Half the peer message limit: a batch of the largest requests still fits with room to spare.
const MAX_BATCH_BYTES: usize = MAX_PEER_MESSAGE_BYTES / 2;

type Reply = oneshot::Sender<Result<Applied, tonic::Status>>;

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
    id: NodeId,
    jobs: mpsc::UnboundedSender<Job>,
}

impl Forwarder {
    /// Starts the batching task; it ends when every handle is dropped.
    pub fn start(id: NodeId, channels: PeerChannels) -> Self {
        let (jobs, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(channels, rx));
        Self { id, jobs }
    }

    /// Proposes `cmd` through the leader `leader` at `addr`. The error is a status as if the leader had
    /// been called directly, so `certainly_not_proposed` and `forwarded_failure` apply unchanged.
    pub async fn write(
        &self,
        leader: NodeId,
        addr: &str,
        cmd: &Command,
        deadline: Instant,
    ) -> Result<Applied, tonic::Status> {
        let command = codec::encode(cmd).map_err(|e| tonic::Status::internal(e.to_string()))?;
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
            return Err(
                ApiError::unavailable("forwarding stopped", LeaderHint::default())
                    .into_status(self.id),
            );
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(result)) => result,
            // The batch may be in flight: whether it was applied is unknown.
            Ok(Err(_)) => Err(tonic::Status::unknown(
                "forwarding ended with the write in flight",
            )),
            Err(_) => Err(tonic::Status::deadline_exceeded(
                "not confirmed by the leader before the deadline",
            )),
        }
    }
}

async fn run(channels: PeerChannels, mut rx: mpsc::UnboundedReceiver<Job>) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
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
    let result = match channels.client(&addr, Purpose::Client) {
        Err(e) => Err(tonic::Status::unavailable(format!(
            "bad leader address {addr}: {e}"
        ))),
        Ok(mut client) => {
            let mut request = tonic::Request::new(ProposeBatchRequest { writes });
            request.set_timeout(timeout);
            client
                .propose_batch(request)
                .await
                .map(|r| r.into_inner().outcomes)
        }
    };
    match result {
        Err(status) => {
            for reply in replies {
                let _ = reply.send(Err(status.clone()));
            }
        }
        Ok(outcomes) if outcomes.len() != replies.len() => {
            tracing::error!(
                leader,
                sent = replies.len(),
                answered = outcomes.len(),
                "leader answered a forwarded batch with the wrong number of outcomes"
            );
            for reply in replies {
                let _ = reply.send(Err(tonic::Status::unknown(
                    "the leader's answer to a forwarded batch did not match it",
                )));
            }
        }
        Ok(outcomes) => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(from_outcome(leader, outcome));
            }
        }
    }
}

/// The leader's answer for one write of a batch, as the status a direct call would have returned,
/// including the header that marks it as a raftkv node's own verdict.
fn from_outcome(leader: NodeId, outcome: WriteOutcome) -> Result<Applied, tonic::Status> {
    if outcome.code == 0 {
        return codec::decode(&outcome.applied).map_err(|e| tonic::Status::unknown(e.to_string()));
    }
    let mut status = tonic::Status::new(tonic::Code::from_i32(outcome.code), outcome.message);
    status
        .metadata_mut()
        .insert(NODE_ID_HEADER, MetadataValue::from(leader));
    Err(status)
}

/// The leader's half: the outcome of one forwarded write, as [`from_outcome`] reads it.
pub fn to_outcome(result: Result<Applied, tonic::Status>) -> WriteOutcome {
    match result.and_then(|a| codec::encode(&a).map_err(|e| tonic::Status::internal(e.to_string())))
    {
        Ok(applied) => WriteOutcome {
            code: 0,
            message: String::new(),
            applied,
        },
        Err(status) => WriteOutcome {
            code: status.code() as i32,
            message: status.message().to_string(),
            applied: Vec::new(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(leader: NodeId, addr: &str) -> (Job, oneshot::Receiver<Result<Applied, tonic::Status>>) {
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
    fn outcomes_round_trip_with_the_leaders_verdict() {
        let status = tonic::Status::unavailable("not the leader");
        let back = from_outcome(3, to_outcome(Err(status)));
        let Err(back) = back else {
            panic!("an error outcome came back as success");
        };
        assert_eq!(back.code(), tonic::Code::Unavailable);
        assert!(crate::api::error::certainly_not_proposed(&back));
        let unknown = from_outcome(3, to_outcome(Err(tonic::Status::unknown("x"))));
        assert!(matches!(unknown, Err(s) if s.code() == tonic::Code::Unknown));
    }
}
