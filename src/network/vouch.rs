//! Admitting a member this node has not heard of yet, on the word of members it knows.
//!
//! A node admits peer messages only from the members its own log names (see `service::admits`). A
//! voter that was down while a node joined, and comes back once the newcomer leads, knows only the
//! old members: it would refuse the new leader as "not a member", never receive the log entry that
//! names it, and so refuse it forever. Admitting unknown senders outright would undo the protection
//! (any process that reaches the peer port with the cluster id could disturb the cluster under a
//! fresh id), so the node asks the members it does know (`Raft.Members`) whether the sender is one;
//! when any of them says so, it admits the sender for a while, long enough for the log to catch up
//! and name it. A stranger nobody vouches for stays refused, and the asks are rate-limited and
//! bounded (one per sender a second, a bounded queue and table), so a flood of forged ids costs
//! small calls at a bounded rate, not one per message. Such a flood can crowd out a genuine ask
//! until it stops; against a forger who reaches the peer port, peer TLS is the defence.
//!
//! Trusting one member's word is enough: this is about who may disturb the node, not about Raft's
//! safety, which holds whichever genuine members' messages arrive. A stale member could vouch for a
//! node removed since; that node is then refused by the rest as a removed member, as before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use openraft::async_runtime::watch::WatchReceiver;
use tokio::sync::mpsc;

use super::{PeerChannels, Purpose};
use crate::pb::internal::MembersRequest;
use crate::store::Raft;
use crate::sync::lock;
use crate::types::NodeId;

/// How long a vouched-for sender is admitted without asking again: a few catch-up rounds.
const VOUCHED_FOR: Duration = Duration::from_secs(60);
/// How often one unknown sender may be asked about.
const ASK_EVERY: Duration = Duration::from_secs(1);
/// How long one member gets to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// Unknown senders remembered at once (asked about or vouched for); beyond it new ones are refused
/// without asking until older entries expire.
const MAX_TRACKED: usize = 64;
/// Asks waiting for the background task.
const MAX_QUEUED: usize = 16;

#[derive(Default)]
struct State {
    /// Until when each vouched-for sender is admitted.
    vouched: HashMap<NodeId, Instant>,
    /// Unknown senders asked about: `None` while the ask waits or runs, then when it was answered.
    asked: HashMap<NodeId, Option<Instant>>,
}

impl State {
    fn forget_expired(&mut self, now: Instant) {
        self.vouched.retain(|_, until| *until > now);
        self.asked
            .retain(|_, at| at.is_none_or(|at| now.duration_since(at) < ASK_EVERY));
    }
}

/// The senders members have vouched for, and the queue of senders to ask about.
#[derive(Clone)]
pub struct Vouches {
    state: Arc<Mutex<State>>,
    asks: mpsc::Sender<NodeId>,
}

impl Vouches {
    /// Starts the task that asks members about unknown senders; it ends when every clone is dropped.
    pub fn start(raft: Raft, channels: PeerChannels, me: NodeId) -> Vouches {
        let state = Arc::new(Mutex::new(State::default()));
        let (asks, rx) = mpsc::channel(MAX_QUEUED);
        tokio::spawn(run(rx, state.clone(), raft, channels, me));
        Vouches { state, asks }
    }

    /// Whether a member vouched for `id` recently.
    pub fn vouched(&self, id: NodeId) -> bool {
        lock(&self.state)
            .vouched
            .get(&id)
            .is_some_and(|until| *until > Instant::now())
    }

    /// Asks the known members about `id` in the background, unless it was asked about within
    /// [`ASK_EVERY`] or too many senders are tracked already. The message that prompted it is refused
    /// all the same; its sender retries, and is admitted once vouched for.
    pub fn ask(&self, id: NodeId) {
        let now = Instant::now();
        let mut state = lock(&self.state);
        state.forget_expired(now);
        if state.asked.contains_key(&id) || state.asked.len() + state.vouched.len() >= MAX_TRACKED {
            return;
        }
        if self.asks.try_send(id).is_ok() {
            state.asked.insert(id, None);
        }
    }
}

async fn run(
    mut rx: mpsc::Receiver<NodeId>,
    state: Arc<Mutex<State>>,
    raft: Raft,
    channels: PeerChannels,
    me: NodeId,
) {
    while let Some(id) = rx.recv().await {
        let known: Vec<(NodeId, String)> = {
            let metrics = raft.metrics();
            let m = metrics.borrow_watched();
            let mut known: Vec<(NodeId, String)> = m
                .membership_config
                .membership()
                .nodes()
                .chain(m.committed_membership_config.membership().nodes())
                .filter(|(peer, _)| **peer != me && **peer != id)
                .map(|(peer, member)| (*peer, channels.route(*peer, &member.peer_addr).to_string()))
                .collect();
            known.sort();
            known.dedup();
            known
        };
        // All asked at once, done at the first yes: a member that is down (likely, when this node
        // missed changes) costs its timeout only when nobody else says yes.
        let mut pending: FuturesUnordered<_> = known
            .iter()
            .map(|(peer, addr)| {
                let channels = &channels;
                async move { (*peer, ask(channels, addr, id).await) }
            })
            .collect();
        let mut by = None;
        let mut answers = Vec::new();
        while let Some((peer, answer)) = pending.next().await {
            if matches!(answer, Ok(true)) {
                by = Some(peer);
                break;
            }
            answers.push((peer, answer));
        }
        drop(pending);
        let mut state = lock(&state);
        state.asked.insert(id, Some(Instant::now()));
        match by {
            Some(peer) => {
                tracing::info!(
                    id,
                    vouched_by = peer,
                    "admitting a member this node's log does not name yet, on the word of members it knows"
                );
                state.vouched.insert(id, Instant::now() + VOUCHED_FOR);
            }
            None => tracing::debug!(id, ?answers, "no member vouched for an unknown sender"),
        }
    }
}

/// Whether the member at `addr` says `id` is a member (and not removed).
async fn ask(channels: &PeerChannels, addr: &str, id: NodeId) -> Result<bool, String> {
    let mut client = channels
        .client(addr, Purpose::Raft)
        .map_err(|e| format!("bad address {addr}: {e}"))?;
    let answer = client
        .members(crate::grpc::request(MembersRequest { id }, ASK_TIMEOUT))
        .await
        .map_err(|s| format!("{addr}: {}", s.message()))?
        .into_inner();
    Ok(answer.member && !answer.retired)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn asks_are_rate_limited_and_bounded() {
        let (asks, mut rx) = mpsc::channel(MAX_QUEUED);
        let v = Vouches {
            state: Arc::default(),
            asks,
        };
        v.ask(7);
        v.ask(7);
        assert_eq!(rx.try_recv().ok(), Some(7));
        assert!(rx.try_recv().is_err(), "asked twice within the interval");
        assert!(!v.vouched(7));
        // A flood of fresh ids: the queue bounds what is sent, the table what is remembered.
        for id in 100..1_000 {
            v.ask(id);
        }
        let mut sent = 0;
        while rx.try_recv().is_ok() {
            sent += 1;
        }
        assert_eq!(sent, MAX_QUEUED);
        assert!(lock(&v.state).asked.len() <= MAX_TRACKED);
        lock(&v.state)
            .vouched
            .insert(9, Instant::now() + Duration::from_secs(5));
        assert!(v.vouched(9));
        lock(&v.state).vouched.insert(10, Instant::now());
        assert!(!v.vouched(10), "an expired vouch admits nobody");
    }
}
