//! Stopping without failing anyone (SIGTERM, SIGINT): the node stops taking requests, lets the ones
//! it holds finish, and a leader hands its leadership to the most caught-up voter first.
//!
//! Stopping a leader outright costs the cluster an election (a whole election timeout with no
//! leader), and any write it had proposed but not yet answered ends with an unknown outcome for its
//! client. A handover instead costs a round trip or two: the leader waits until the writes it
//! proposed are committed, asks the successor to campaign (`MoveLeader`'s path), and goes on serving
//! as a follower until its last request is answered. A refused request is UNAVAILABLE, which every
//! client may retry elsewhere.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Error, LeaderHint, Node};

/// The requests a node is serving, and whether it still takes new ones.
#[derive(Default)]
pub(super) struct Requests {
    in_flight: AtomicUsize,
    draining: AtomicBool,
    idle: Notify,
    /// Cancelled when the drain begins: long-lived streams (watches) end then, rather than hold the
    /// process until it exits under them.
    stopping: tokio_util::sync::CancellationToken,
}

/// Held for as long as a request is served (see [`Node::admit_request`]).
pub struct InFlight(Arc<Requests>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Requests {
    async fn idle(&self, deadline: Instant) -> bool {
        loop {
            // Registered before the count is read, so a request that ends in between still wakes it.
            let idle = self.idle.notified();
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return false;
            }
        }
    }
}

impl Node {
    /// Admits a client request (or one a peer forwards), or says why this node no longer serves:
    /// it was removed from the cluster, or it is shutting down. Hold the answer while serving.
    pub fn admit_request(&self) -> Result<InFlight, Error> {
        self.check_member()?;
        // Counted before the check, so a drain that finds no request in flight has made every later
        // one see it draining.
        self.requests.in_flight.fetch_add(1, Ordering::SeqCst);
        let admitted = InFlight(self.requests.clone());
        if self.requests.draining.load(Ordering::SeqCst) {
            let hint = self.hint();
            // Never point a client back here.
            let hint = if hint.id == Some(self.id) {
                LeaderHint::default()
            } else {
                hint
            };
            return Err(Error::not_leader(
                format!("node {} is shutting down", self.id),
                hint,
            ));
        }
        Ok(admitted)
    }

    /// Cancelled once this node stops serving (see [`Node::drain`]).
    pub fn stopping(&self) -> tokio_util::sync::CancellationToken {
        self.requests.stopping.clone()
    }

    /// Stops taking requests, hands leadership over when this node leads, and waits for what it
    /// serves to finish; all within `within`. Raft still runs afterwards: the caller stops it.
    pub async fn drain(&self, within: Duration) {
        let deadline = Instant::now() + within;
        self.requests.draining.store(true, Ordering::SeqCst);
        self.requests.stopping.cancel();
        if self.view().leader == Some(self.id) {
            // Writes proposed here are answered here once committed: a handover before that would
            // leave their clients with an unknown outcome.
            if !self.requests.idle(deadline).await {
                tracing::warn!("requests still in flight; handing leadership over anyway");
            }
            match self.best_successor() {
                Some(to) => {
                    // Its own deadline, well inside the drain's: a successor that does not take
                    // over soon will not, and the rest of the drain still has to run.
                    let handover =
                        Instant::now() + deadline.saturating_duration_since(Instant::now()) / 2;
                    if let Err(e) = self.move_leader(to, handover).await {
                        tracing::warn!(to, error = %e, "leadership handover failed; the others elect a leader after this node stops");
                    }
                }
                None => tracing::warn!(
                    "no live voter to hand leadership to; the others elect a leader after this node stops"
                ),
            }
        }
        if !self.requests.idle(deadline).await {
            tracing::warn!(
                in_flight = self.requests.in_flight.load(Ordering::SeqCst),
                "stopping with requests still in flight"
            );
        }
    }
}
