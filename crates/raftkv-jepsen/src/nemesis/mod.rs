//! The nemesis: faults injected from outside the nodes, one at a time, each healed before the next.
//!
//! The schedule alternates healthy and faulty periods (Jepsen's flip-flop). Fault kinds are taken in
//! shuffled rounds, so every requested kind fires within the first round and short runs still cover
//! them all. Leader-targeted faults ask the nodes who leads at that moment, and every fault strikes
//! the members of the moment (the membership nemesis changes them). Each fault kind is a module of its
//! own; this one schedules them.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::history::History;
use super::net::Net;
use super::nodes::Nodes;
use super::workload::Shared;

mod clock;
mod crash_all;
mod kill;
pub mod membership;
mod partition;
mod pause;
mod pause_reads;
mod power_loss;

pub use clock::LIBFAKETIME;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// The leader alone on one side: it must stop serving strong reads and writes.
    PartitionLeader,
    /// A random minority against the majority.
    PartitionHalves,
    /// Two halves that cannot talk, with one node that talks to both.
    PartitionBridge,
    /// One-way loss: the leader stops hearing the others, or the others stop hearing the leader.
    PartitionOneWay,
    /// SIGKILL one node (the leader or a random one, alternately), restart it on the same data, at once
    /// or after the hold.
    Kill,
    /// SIGSTOP one node (alternately the leader), then SIGCONT: a leader that wakes up must not serve
    /// what it believed before it slept.
    Pause,
    /// SIGSTOP the leader under load, let the others elect a new leader and take writes, queue strong
    /// reads on the stopped node just before SIGCONT: it wakes up believing it still leads, with
    /// acknowledgements from before the pause unread in its sockets, and must not answer those reads
    /// from its old state. Pauses in [`Fault::Pause`] are mostly longer than a client's deadline, so
    /// their reads give up before the node wakes; these are sent to be answered after it does.
    PauseReads,
    /// SIGKILL every node at once and restart them all: nothing acknowledged may be lost.
    CrashAll,
    /// Restart one node (alternately the leader) under libfaketime with its clock shifted by minutes
    /// and running at 0.5x to 2x speed (`Instant` too), then restart it with the true clock. Raft's
    /// timers and anything lease-like run on that clock.
    Clock,
    /// Add a brand-new node (fresh id) or remove a voter (the leader or a follower, in turn), keeping
    /// the cluster between its size and size + 2 voters; see [`membership`].
    Membership,
    /// Cut the power of all nodes, of one (alternately the leader), or of a minority, in turn: each
    /// loses everything its filesystem holds that was not fsynced, then restarts on what survived.
    /// The first cut is of all nodes, a quorum losing its page cache together.
    PowerLoss,
}

pub const ALL: [Fault; 11] = [
    Fault::PartitionLeader,
    Fault::PartitionHalves,
    Fault::PartitionBridge,
    Fault::PartitionOneWay,
    Fault::Kill,
    Fault::Pause,
    Fault::PauseReads,
    Fault::CrashAll,
    Fault::Clock,
    Fault::Membership,
    Fault::PowerLoss,
];

/// The partition kinds, which `partition` names together.
pub const PARTITIONS: [Fault; 4] = [
    Fault::PartitionLeader,
    Fault::PartitionHalves,
    Fault::PartitionBridge,
    Fault::PartitionOneWay,
];

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::PartitionLeader => "partition-leader",
            Fault::PartitionHalves => "partition-halves",
            Fault::PartitionBridge => "partition-bridge",
            Fault::PartitionOneWay => "partition-one-way",
            Fault::Kill => "kill",
            Fault::Pause => "pause",
            Fault::PauseReads => "pause-reads",
            Fault::CrashAll => "crash-all",
            Fault::Clock => "clock",
            Fault::Membership => "membership",
            Fault::PowerLoss => "power-loss",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ALL.iter()
            .copied()
            .find(|f| f.name() == s || f.name().trim_start_matches("partition-") == s)
            .ok_or_else(|| {
                let names: Vec<_> = ALL.iter().map(|f| f.name()).collect();
                format!(
                    "unknown fault {s:?}; one of: all, partition, {}",
                    names.join(", ")
                )
            })
    }
}

pub struct Schedule {
    /// Healthy time between faults (uniform in this range).
    pub healthy: (Duration, Duration),
    /// How long a fault stays installed.
    pub hold: (Duration, Duration),
}

/// Runs faults until `until`, then heals everything. Returns how many times each kind was installed;
/// `membership` keeps what the membership nemesis did and has to settle.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    faults: Vec<Fault>,
    schedule: Schedule,
    seed: u64,
    net: &Net,
    nodes: &tokio::sync::Mutex<Nodes>,
    shared: Arc<Shared>,
    until: tokio::time::Instant,
    membership: &mut membership::State,
) -> anyhow::Result<BTreeMap<Fault, u64>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut fired: BTreeMap<Fault, u64> = faults.iter().map(|f| (*f, 0)).collect();
    let mut round: Vec<Fault> = Vec::new();
    let mut flip = false;
    loop {
        let healthy = between(&mut rng, schedule.healthy);
        if tokio::time::Instant::now() + healthy >= until {
            break;
        }
        tokio::time::sleep(healthy).await;
        nodes.lock().await.reap_unexpected()?;
        if round.is_empty() {
            round = faults.clone();
            round.shuffle(&mut rng);
        }
        let Some(fault) = round.pop() else {
            break;
        };
        flip = !flip;
        let hold = between(&mut rng, schedule.hold);
        let leader = nodes.lock().await.current_leader().await;
        let nth = fired.get(&fault).copied().unwrap_or(0);
        let strike = Strike::new(
            fault, flip, nth, hold, leader, &mut rng, net, nodes, &shared,
        )
        .await;
        match fault {
            Fault::Membership => membership::inject(&strike, membership, &mut rng).await?,
            _ => inject(&strike, &mut rng).await?,
        }
        *fired.entry(fault).or_default() += 1;
    }
    Ok(fired)
}

fn between(rng: &mut StdRng, (lo, hi): (Duration, Duration)) -> Duration {
    if hi <= lo {
        return lo;
    }
    Duration::from_millis(rng.random_range(lo.as_millis() as u64..=hi.as_millis() as u64))
}

/// What every fault kind is given: the fault, where it may strike and what it acts on.
struct Strike<'a> {
    fault: Fault,
    /// Alternates from one fault to the next: whether a fault that may target the leader does.
    flip: bool,
    /// How many faults of this kind came before (a kind that takes turns between variants).
    nth: u64,
    hold: Duration,
    /// The members the harness runs now, in id order.
    members: Vec<u64>,
    /// The same, shuffled.
    ids: Vec<u64>,
    /// The leader, or a random node when no leader is known right now.
    target_leader: u64,
    /// How the history names `target_leader`.
    leader_note: String,
    net: &'a Net,
    nodes: &'a tokio::sync::Mutex<Nodes>,
    shared: &'a Arc<Shared>,
}

impl<'a> Strike<'a> {
    #[allow(clippy::too_many_arguments)]
    async fn new(
        fault: Fault,
        flip: bool,
        nth: u64,
        hold: Duration,
        leader: Option<u64>,
        rng: &mut StdRng,
        net: &'a Net,
        nodes: &'a tokio::sync::Mutex<Nodes>,
        shared: &'a Arc<Shared>,
    ) -> Strike<'a> {
        let members = nodes.lock().await.members();
        let mut ids = members.clone();
        ids.shuffle(rng);
        let target_leader = leader.unwrap_or(ids[0]);
        let leader_note = if leader.is_some() {
            format!("leader {target_leader}")
        } else {
            format!("no leader known; node {target_leader}")
        };
        Strike {
            fault,
            flip,
            nth,
            hold,
            members,
            ids,
            target_leader,
            leader_note,
            net,
            nodes,
            shared,
        }
    }

    fn history(&self) -> &History {
        &self.shared.history
    }

    /// Every member but `x`.
    fn others(&self, x: u64) -> Vec<u64> {
        self.members.iter().copied().filter(|&i| i != x).collect()
    }

    /// Alternately the leader and a random node.
    fn target(&self) -> u64 {
        if self.flip {
            self.target_leader
        } else {
            self.ids[0]
        }
    }

    /// How the history names [`Strike::target`].
    fn target_note(&self) -> String {
        if self.flip {
            self.leader_note.clone()
        } else {
            format!("node {}", self.target())
        }
    }
}

async fn inject(strike: &Strike<'_>, rng: &mut StdRng) -> anyhow::Result<()> {
    match strike.fault {
        Fault::PartitionLeader
        | Fault::PartitionHalves
        | Fault::PartitionBridge
        | Fault::PartitionOneWay => partition::inject(strike).await,
        Fault::Kill => kill::inject(strike, rng).await,
        Fault::Pause => pause::inject(strike).await,
        Fault::PauseReads => pause_reads::inject(strike).await,
        Fault::Clock => clock::inject(strike, rng).await,
        Fault::CrashAll => crash_all::inject(strike).await,
        Fault::PowerLoss => power_loss::inject(strike).await,
        Fault::Membership => anyhow::bail!("the membership fault has its own state"),
    }
}
