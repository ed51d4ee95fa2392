//! The leader's half of leases: each lease's deadline on the leader's own monotonic clock, keep-alives,
//! and the expiries and checkpoints it writes into the log.
//!
//! Only the leader in office reads a clock. It holds a deadline per lease in memory; a keep-alive
//! moves the deadline and writes nothing, so keep-alives cost no log entry. When a deadline passes,
//! the leader proposes `LeaseOp::Expire` and the apply deletes the lease's keys on every replica.
//!
//! # Never early
//! A keep-alive is answered only after this leader confirmed with a quorum that it still leads (the
//! same check a strong read makes), so every keep-alive any leader acknowledged happened before the
//! next leader took office. A new leader starts each countdown when it takes office (once it has
//! applied an entry of its own term, so it knows every lease committed before): from the lease's
//! checkpoint if it has one, from the full TTL if not. Either way no lease ends before the TTL has
//! passed since the last keep-alive any leader acknowledged.
//!
//! # Not forever
//! A new leader that restarted every countdown at the full TTL (as etcd does by default) would keep
//! a lease that nobody renews alive for as long as leaders keep changing. So the leader checkpoints:
//! a lease that has gone without a keep-alive for half its TTL (or the checkpoint interval, if
//! longer) has its remaining time written to the log (`LeaseOp::Checkpoint`), and again every
//! interval after that. A new leader resumes from there.
//!
//! A new leader checkpoints the leases it inherits after one interval already: what it was given
//! covers every keep-alive acknowledged before it took office, so leaders that each serve a little
//! longer than the interval still wear an unrenewed lease down.
//!
//! A checkpoint is a promise to the next leader that the lease has at most that long left, so a
//! keep-alive after one first clears it through the log (`LeaseOp::Clear`) before it is
//! acknowledged. Leases renewed more often than every half TTL are never checkpointed, so for them a
//! keep-alive stays free. Checkpoints and clears are proposed one at a time (`proposals`), each
//! computed just before it is proposed, so a clear is always after the checkpoint it clears, and
//! a checkpoint never carries a deadline from before a keep-alive it follows.
//!
//! Expiries and checkpoints name the grant (`LeaseRef`) and the term they were decided in, and the
//! apply ignores them otherwise (see `store::state_machine`): a leader that lost office, or a lease
//! ended and granted again under the same id, cannot make a stale decision stick.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use openraft::ServerState;
use openraft::async_runtime::watch::WatchReceiver;
use tokio::time::Instant;

use super::{Error, Node};
use crate::limits::MAX_LEASES_PER_ENTRY;
use crate::store::leases::Table;
use crate::sync::lock;
use crate::telemetry::names;
use crate::types::{Command, LeaseOp, LeaseRef};

/// How often the leader looks for deadlines that passed, and so how late past its TTL a lease may
/// end (plus the time to commit the expiry).
const TICK: Duration = Duration::from_millis(50);
/// How long the leader's own proposals (expiries, checkpoints) may take before the next tick tries
/// again.
const PROPOSAL_TIMEOUT: Duration = Duration::from_secs(2);

/// The lease settings of this node (`--min-lease-ttl-ms` and the others).
#[derive(Debug, Clone, Copy)]
pub struct LeaseSettings {
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    pub max_leases: usize,
    pub checkpoint_interval: Duration,
}

/// One lease as the leader in office times it.
#[derive(Debug, Clone)]
struct Deadline {
    /// Which grant of the id this times.
    granted_at: u64,
    at: Instant,
    granted: Duration,
    /// The last keep-alive, or when this leader started timing the lease.
    renewed: Instant,
    last_checkpoint: Option<Instant>,
    /// A checkpoint below the full TTL is committed or on its way: a keep-alive must clear it first.
    checkpointed: bool,
    /// An expiry has been proposed: keep-alives are refused from now on.
    expiring: bool,
}

/// The deadlines of the term this node leads in, if it leads.
#[derive(Default)]
struct Office {
    term: Option<u64>,
    leases: HashMap<u64, Deadline>,
}

/// Deadlines and the settings; one per node, used only while it leads.
pub struct LeaseClock {
    settings: LeaseSettings,
    office: Mutex<Office>,
    /// Held while a checkpoint or a clear is decided, proposed and committed (see the module
    /// comment); never while `office` is.
    proposals: tokio::sync::Mutex<()>,
}

impl Deadline {
    /// Starts timing a lease: from its checkpoint or its full TTL. `inherited`: found on taking
    /// office, so it may be checkpointed after one interval (see the module comment).
    fn start(lease: &crate::store::leases::Lease, now: Instant, inherited: bool) -> Self {
        let granted = Duration::from_millis(lease.record.granted_ms);
        let left = lease
            .record
            .checkpoint_ms
            .map_or(granted, Duration::from_millis);
        let renewed = if inherited {
            now.checked_sub(granted / 2).unwrap_or(now)
        } else {
            now
        };
        Deadline {
            granted_at: lease.record.granted_at,
            at: now + left,
            granted,
            renewed,
            last_checkpoint: None,
            checkpointed: lease.record.checkpoint_ms.is_some(),
            expiring: false,
        }
    }

    fn lease(&self, id: u64) -> LeaseRef {
        LeaseRef {
            id,
            granted_at: self.granted_at,
        }
    }
}

impl LeaseClock {
    pub fn new(settings: LeaseSettings) -> Self {
        LeaseClock {
            settings,
            office: Mutex::new(Office::default()),
            proposals: tokio::sync::Mutex::new(()),
        }
    }

    pub fn settings(&self) -> &LeaseSettings {
        &self.settings
    }

    /// Brings the deadlines in line with the term this node leads (if any) and the applied table:
    /// starts timing the leases of a new term and newly granted ones, and forgets ended ones.
    fn sync(&self, term: Option<u64>, table: &Table, now: Instant) {
        let mut office = lock(&self.office);
        let inherited = office.term != term;
        if inherited {
            office.term = term;
            office.leases.clear();
        }
        if term.is_none() {
            return;
        }
        office.leases.retain(|id, d| {
            table
                .get(id)
                .is_some_and(|l| l.record.granted_at == d.granted_at)
        });
        for (id, lease) in table {
            office
                .leases
                .entry(*id)
                .or_insert_with(|| Deadline::start(lease, now, inherited));
        }
    }

    /// [`LeaseClock::sync`] for one lease, for a keep-alive: the office must be `term`'s already.
    fn sync_one(&self, id: u64, lease: Option<&crate::store::leases::Lease>, now: Instant) {
        let mut office = lock(&self.office);
        match lease {
            None => {
                office.leases.remove(&id);
            }
            Some(lease) => {
                let stale = office
                    .leases
                    .get(&id)
                    .is_some_and(|d| d.granted_at != lease.record.granted_at);
                if stale {
                    office.leases.remove(&id);
                }
                office
                    .leases
                    .entry(id)
                    .or_insert_with(|| Deadline::start(lease, now, false));
            }
        }
    }

    /// The leases whose deadline has passed, marked as expiring.
    fn due(&self, now: Instant) -> Vec<LeaseRef> {
        let mut office = lock(&self.office);
        let mut due = Vec::new();
        for (id, d) in office.leases.iter_mut() {
            if !d.expiring && d.at <= now {
                d.expiring = true;
                due.push(d.lease(*id));
            }
        }
        due.sort_unstable();
        due
    }

    /// Proposals that failed leave their leases to the next tick.
    fn not_expired(&self, leases: &[LeaseRef]) {
        let mut office = lock(&self.office);
        for lease in leases {
            if let Some(d) = office.leases.get_mut(&lease.id) {
                d.expiring = false;
            }
        }
    }

    /// Up to `max` leases to checkpoint now, with their remaining time, marked as checkpointed.
    fn checkpoints(&self, now: Instant, max: usize) -> Vec<(LeaseRef, u64)> {
        let interval = self.settings.checkpoint_interval;
        let mut office = lock(&self.office);
        let mut out = Vec::new();
        for (id, d) in office.leases.iter_mut() {
            let quiet = now.saturating_duration_since(d.renewed);
            let since_last = d
                .last_checkpoint
                .map_or(Duration::MAX, |t| now.saturating_duration_since(t));
            if out.len() == max {
                break;
            }
            if d.expiring || quiet < interval.max(d.granted / 2) || since_last < interval {
                continue;
            }
            let left = d.at.saturating_duration_since(now);
            // Rounded up, and at least 1 ms: a checkpoint never shortens the lease.
            let left_ms = (left.as_micros().div_ceil(1000) as u64).max(1);
            d.checkpointed = true;
            d.last_checkpoint = Some(now);
            out.push((d.lease(*id), left_ms));
        }
        out.sort_unstable();
        out
    }
}

/// What a keep-alive finds before it may extend a deadline.
enum Renewal {
    /// No such lease (never granted, ended, or expiring).
    Gone,
    /// Extended: the TTL the caller now has.
    Renewed(Duration),
    /// A checkpoint stands: clear it through the log first.
    Clear(LeaseRef),
}

impl LeaseClock {
    /// Extends lease `id` unless a checkpoint stands; `Err` when `term` is no longer the office.
    fn renew(&self, term: u64, id: u64, now: Instant) -> Result<Renewal, ()> {
        let mut office = lock(&self.office);
        if office.term != Some(term) {
            return Err(());
        }
        Ok(match office.leases.get_mut(&id) {
            None => Renewal::Gone,
            Some(d) if d.expiring || d.at <= now => Renewal::Gone,
            Some(d) if d.checkpointed => {
                // No new checkpoint of it while this one is cleared.
                d.renewed = now;
                Renewal::Clear(d.lease(id))
            }
            Some(d) => {
                d.at = now + d.granted;
                d.renewed = now;
                metrics::counter!(names::LEASE_RENEWED).increment(1);
                Renewal::Renewed(d.granted)
            }
        })
    }

    /// After a clear of `lease` committed (with `proposals` held since before it was proposed).
    fn cleared(&self, lease: LeaseRef) {
        let mut office = lock(&self.office);
        if let Some(d) = office.leases.get_mut(&lease.id)
            && d.granted_at == lease.granted_at
        {
            d.checkpointed = false;
        }
    }
}

impl Node {
    /// The term this node leads in and has applied an entry of, if any: only then does it know
    /// every lease committed before it took office.
    fn lease_office(&self) -> Option<u64> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        let in_office = m.state == ServerState::Leader
            && m.current_leader == Some(self.id)
            && m.last_applied
                .as_ref()
                .is_some_and(|l| l.leader_id.term == m.current_term);
        in_office.then_some(m.current_term)
    }

    /// Renews lease `id` (`renew`) or reads its remaining time, here if this node leads and at the
    /// leader if not. `None`: no such lease.
    pub async fn lease_time(
        &self,
        id: u64,
        renew: bool,
        deadline: Instant,
    ) -> Result<Option<Duration>, Error> {
        self.check_member()?;
        loop {
            let view = self.view();
            let attempt = match view.leader {
                Some(leader) if leader == self.id => {
                    self.lease_time_as_leader(id, renew, deadline).await
                }
                Some(_) => match view.leader_dial {
                    Some(addr) => {
                        super::forward::lease_time(&self.channels, &addr, id, renew, deadline).await
                    }
                    None => Err(Error::not_leader("leader address unknown", self.hint())),
                },
                None => {
                    self.await_leader(None, deadline, "no leader").await?;
                    continue;
                }
            };
            match attempt {
                // A keep-alive has no effect until it is answered, so it can be retried anywhere.
                Err(Error::NotLeader { reason, .. }) => {
                    self.await_leader(view.leader, deadline, &reason).await?;
                }
                other => return other,
            }
        }
    }

    /// A forwarded write is a client's, so it may grant and revoke but never decide time: expiries,
    /// checkpoints and clears come only from this node's own clock. A grant meets this leader's
    /// lease settings, as one arriving on its public port would.
    pub fn admit_forwarded_lease_op(&self, cmd: &Command) -> Result<(), Error> {
        let Command::Lease(op) = cmd else {
            return Ok(());
        };
        let settings = self.lease_clock.settings();
        match op {
            LeaseOp::Grant { ttl_ms, .. } => {
                let (min, max) = (
                    settings.min_ttl.as_millis() as u64,
                    settings.max_ttl.as_millis() as u64,
                );
                if !(min..=max).contains(ttl_ms) {
                    return Err(Error::Invalid(format!(
                        "a forwarded grant of {ttl_ms} ms is outside {min}..={max} ms"
                    )));
                }
                if self.sm.leases().read().len() >= settings.max_leases {
                    return Err(Error::Exhausted(format!(
                        "{} leases exist (--max-leases); revoke some or let them expire",
                        settings.max_leases
                    )));
                }
                Ok(())
            }
            LeaseOp::Revoke { .. } => Ok(()),
            LeaseOp::Expire { .. } | LeaseOp::Checkpoint { .. } | LeaseOp::Clear { .. } => Err(
                Error::Invalid("lease expiries and checkpoints are the leader's own".into()),
            ),
        }
    }

    /// [`Node::lease_time`] on the leader; refused with `NotLeader` anywhere else.
    pub async fn lease_time_as_leader(
        &self,
        id: u64,
        renew: bool,
        deadline: Instant,
    ) -> Result<Option<Duration>, Error> {
        let lost = || Error::not_leader("lost leadership", self.hint());
        let Some(term) = self.lease_office() else {
            return Err(Error::not_leader(
                "not the leader in office (leases are timed by the leader once it has applied an entry of its term)",
                self.hint(),
            ));
        };
        // Still the leader now: no later leader can have taken office yet (see the module comment).
        self.read_index(deadline).await?;
        let clock = &self.lease_clock;
        let table = self.sm.leases().read();
        if lock(&clock.office).term != Some(term) {
            clock.sync(Some(term), &table, Instant::now());
        } else {
            clock.sync_one(id, table.get(&id), Instant::now());
        }
        drop(table);
        if !renew {
            let office = lock(&clock.office);
            if office.term != Some(term) {
                return Err(lost());
            }
            return Ok(office
                .leases
                .get(&id)
                .filter(|d| !d.expiring)
                .map(|d| d.at.saturating_duration_since(Instant::now())));
        }
        match clock.renew(term, id, Instant::now()).map_err(|()| lost())? {
            Renewal::Gone => return Ok(None),
            Renewal::Renewed(ttl) => return Ok(Some(ttl)),
            Renewal::Clear(_) => {}
        }
        // A checkpoint stands: clear it, then extend, with no checkpoint decided in between.
        let _serial = tokio::time::timeout_at(deadline, clock.proposals.lock())
            .await
            .map_err(|_| Error::Deadline("a lease checkpoint is still being committed".into()))?;
        loop {
            match clock.renew(term, id, Instant::now()).map_err(|()| lost())? {
                Renewal::Gone => return Ok(None),
                Renewal::Renewed(ttl) => return Ok(Some(ttl)),
                Renewal::Clear(lease) => {
                    let clear = Command::Lease(LeaseOp::Clear { lease });
                    self.propose_as_leader(clear, deadline).await?;
                    clock.cleared(lease);
                }
            }
        }
    }
}

/// The leader's timer: expiries and checkpoints, every tick while this node leads. Ends with the node.
pub(super) async fn run(node: Weak<Node>) {
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(node) = node.upgrade() else { return };
        tick(&node).await;
    }
}

async fn tick(node: &Arc<Node>) {
    let term = node.lease_office();
    let clock = &node.lease_clock;
    clock.sync(term, &node.sm.leases().read(), Instant::now());
    let Some(term) = term else { return };
    let still = || node.lease_office() == Some(term);
    let due = clock.due(Instant::now());
    for leases in due.chunks(MAX_LEASES_PER_ENTRY) {
        if !still() {
            return;
        }
        let expire = Command::Lease(LeaseOp::Expire {
            term,
            leases: leases.to_vec(),
        });
        let deadline = Instant::now() + PROPOSAL_TIMEOUT;
        match node.propose_as_leader(expire, deadline).await {
            Ok(_) => {
                metrics::counter!(names::LEASE_EXPIRED).increment(leases.len() as u64);
                tracing::debug!(leases = leases.len(), "expired leases");
            }
            Err(e) => {
                clock.not_expired(leases);
                tracing::debug!(error = %e, "lease expiry not committed; retried at the next tick");
            }
        }
    }
    // One entry at a time, each decided just before it is proposed (see the module comment).
    loop {
        if !still() {
            return;
        }
        let _serial = clock.proposals.lock().await;
        let remaining = clock.checkpoints(Instant::now(), MAX_LEASES_PER_ENTRY);
        if remaining.is_empty() {
            return;
        }
        let full = remaining.len() == MAX_LEASES_PER_ENTRY;
        let cmd = Command::Lease(LeaseOp::Checkpoint { term, remaining });
        let deadline = Instant::now() + PROPOSAL_TIMEOUT;
        // A failed checkpoint leaves its leases marked checkpointed, which only makes their next
        // keep-alive clear it: safe either way.
        if let Err(e) = node.propose_as_leader(cmd, deadline).await {
            tracing::debug!(error = %e, "lease checkpoint not committed");
            return;
        }
        if !full {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::leases::{Lease, LeaseRecord};

    fn table(entries: &[(u64, u64, Option<u64>)]) -> Table {
        entries
            .iter()
            .map(|&(id, granted_ms, checkpoint_ms)| {
                (
                    id,
                    Lease {
                        record: LeaseRecord {
                            granted_at: id,
                            granted_ms,
                            checkpoint_ms,
                        },
                        keys: Default::default(),
                    },
                )
            })
            .collect()
    }

    fn clock() -> LeaseClock {
        LeaseClock::new(LeaseSettings {
            min_ttl: Duration::from_millis(1),
            max_ttl: Duration::from_secs(3600),
            max_leases: 10,
            checkpoint_interval: Duration::from_millis(1000),
        })
    }

    fn r(id: u64) -> LeaseRef {
        LeaseRef { id, granted_at: id }
    }

    #[test]
    fn a_new_term_resumes_from_the_checkpoint_and_times_new_leases_from_now() {
        let c = clock();
        let t0 = Instant::now();
        c.sync(
            Some(3),
            &table(&[(1, 10_000, Some(2_000)), (2, 10_000, None)]),
            t0,
        );
        let at = |id| lock(&c.office).leases[&id].at;
        assert_eq!(at(1), t0 + Duration::from_millis(2_000));
        assert_eq!(at(2), t0 + Duration::from_millis(10_000));
        assert!(lock(&c.office).leases[&1].checkpointed);
        assert!(c.due(t0 + Duration::from_millis(1_999)).is_empty());
        assert_eq!(c.due(t0 + Duration::from_millis(2_000)), vec![r(1)]);
        // Marked: not proposed twice.
        assert!(c.due(t0 + Duration::from_millis(3_000)).is_empty());
        c.not_expired(&[r(1)]);
        assert_eq!(c.due(t0 + Duration::from_millis(3_000)), vec![r(1)]);
        // Ended leases are forgotten; a lost office forgets all.
        c.sync(Some(3), &table(&[(2, 10_000, None)]), t0);
        assert_eq!(lock(&c.office).leases.len(), 1);
        c.sync(None, &table(&[(2, 10_000, None)]), t0);
        assert!(lock(&c.office).leases.is_empty());
    }

    #[test]
    fn an_id_granted_again_is_a_new_lease() {
        let c = clock();
        let t0 = Instant::now();
        c.sync(Some(1), &table(&[(5, 1_000, None)]), t0);
        assert_eq!(c.due(t0 + Duration::from_millis(1_000)), vec![r(5)]);
        // Ended and granted again (another revision) before the expiry applied: timed afresh.
        let mut again = table(&[(5, 1_000, None)]);
        again.get_mut(&5).unwrap().record.granted_at = 9;
        let t1 = t0 + Duration::from_millis(1_500);
        c.sync(Some(1), &again, t1);
        let d = lock(&c.office).leases[&5].clone();
        assert_eq!(
            (d.granted_at, d.expiring, d.at),
            (9, false, t1 + Duration::from_millis(1_000))
        );
    }

    #[test]
    fn only_quiet_leases_are_checkpointed_and_never_shortened() {
        let c = clock();
        let t0 = Instant::now();
        c.sync(Some(1), &table(&[]), t0);
        // Granted in this term: timed from now.
        c.sync(Some(1), &table(&[(1, 10_000, None), (2, 1_000, None)]), t0);
        // Lease 1 needs half its TTL of quiet; lease 2 the interval.
        assert!(
            c.checkpoints(t0 + Duration::from_millis(999), 10)
                .is_empty()
        );
        assert_eq!(
            c.checkpoints(t0 + Duration::from_millis(1_000), 10),
            vec![(r(2), 1)]
        );
        c.sync(Some(1), &table(&[(1, 10_000, None)]), t0);
        assert!(
            c.checkpoints(t0 + Duration::from_millis(4_999), 10)
                .is_empty()
        );
        assert_eq!(
            c.checkpoints(t0 + Duration::from_millis(5_000), 10),
            vec![(r(1), 5_000)]
        );
        // Not again within the interval.
        assert!(
            c.checkpoints(t0 + Duration::from_millis(5_500), 10)
                .is_empty()
        );
        assert_eq!(
            c.checkpoints(t0 + Duration::from_micros(6_000_500), 10),
            vec![(r(1), 4_000)]
        );
    }

    #[test]
    fn a_new_leader_checkpoints_what_it_inherits_at_once() {
        let c = clock();
        let t0 = Instant::now();
        c.sync(Some(4), &table(&[(1, 60_000, None), (2, 60_000, None)]), t0);
        // Already half a TTL quiet as far as the checkpoint rule goes; at most `max` per entry.
        let mut both = [c.checkpoints(t0, 1), c.checkpoints(t0, 1)].concat();
        both.sort_unstable();
        assert_eq!(both, vec![(r(1), 60_000), (r(2), 60_000)]);
        assert!(c.checkpoints(t0, 1).is_empty());
    }
}
