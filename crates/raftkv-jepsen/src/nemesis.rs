//! The nemesis: faults injected from outside the nodes, one at a time, each healed before the next.
//!
//! The schedule alternates healthy and faulty periods (Jepsen's flip-flop). Fault kinds are taken in
//! shuffled rounds, so every requested kind fires within the first round and short runs still cover
//! them all. Leader-targeted faults ask the nodes who leads at that moment.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::history::History;
use super::net::{Grudge, Net};
use super::nodes::Nodes;
use super::workload::{self, Shared};

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
}

/// Where Debian's libfaketime keeps the multi-threaded preload library.
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

pub const ALL: [Fault; 9] = [
    Fault::PartitionLeader,
    Fault::PartitionHalves,
    Fault::PartitionBridge,
    Fault::PartitionOneWay,
    Fault::Kill,
    Fault::Pause,
    Fault::PauseReads,
    Fault::CrashAll,
    Fault::Clock,
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
                format!("unknown fault {s:?}; one of: all, {}", names.join(", "))
            })
    }
}

pub struct Schedule {
    /// Healthy time between faults (uniform in this range).
    pub healthy: (Duration, Duration),
    /// How long a fault stays installed.
    pub hold: (Duration, Duration),
}

/// Runs faults until `until`, then heals everything. Returns how many times each kind was installed.
pub async fn run(
    faults: Vec<Fault>,
    schedule: Schedule,
    seed: u64,
    net: &Net,
    nodes: &tokio::sync::Mutex<Nodes>,
    shared: Arc<Shared>,
    until: tokio::time::Instant,
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
        nodes.lock().await.reap_unexpected(net)?;
        if round.is_empty() {
            round = faults.clone();
            round.shuffle(&mut rng);
        }
        let Some(fault) = round.pop() else {
            break;
        };
        flip = !flip;
        let hold = between(&mut rng, schedule.hold);
        let leader = nodes.lock().await.leader().await;
        inject(fault, flip, hold, leader, &mut rng, net, nodes, &shared).await?;
        *fired.entry(fault).or_default() += 1;
    }
    Ok(fired)
}

/// Strong reads the pause-reads fault queues on the stopped leader, and how long before SIGCONT.
const QUEUED_READS: usize = 8;
const QUEUED_READS_LEAD: Duration = Duration::from_millis(300);

fn between(rng: &mut StdRng, (lo, hi): (Duration, Duration)) -> Duration {
    if hi <= lo {
        return lo;
    }
    Duration::from_millis(rng.random_range(lo.as_millis() as u64..=hi.as_millis() as u64))
}

/// Both directions of every link between the two groups.
fn split(a: &[u64], b: &[u64]) -> Grudge {
    let mut g = Grudge::new();
    for &x in a {
        for &y in b {
            g.insert((x, y));
            g.insert((y, x));
        }
    }
    g
}

#[allow(clippy::too_many_arguments)]
async fn inject(
    fault: Fault,
    flip: bool,
    hold: Duration,
    leader: Option<u64>,
    rng: &mut StdRng,
    net: &Net,
    nodes: &tokio::sync::Mutex<Nodes>,
    shared: &Arc<Shared>,
) -> anyhow::Result<()> {
    let history: &History = &shared.history;
    let n = nodes.lock().await.n;
    let mut ids: Vec<u64> = (1..=n).collect();
    ids.shuffle(rng);
    // Leader-targeted faults fall back to a random node when no leader is known right now.
    let target_leader = leader.unwrap_or(ids[0]);
    let leader_note = if leader.is_some() {
        format!("leader {target_leader}")
    } else {
        format!("no leader known; node {target_leader}")
    };
    let others = |x: u64| -> Vec<u64> { (1..=n).filter(|&i| i != x).collect() };
    match fault {
        Fault::PartitionLeader
        | Fault::PartitionHalves
        | Fault::PartitionBridge
        | Fault::PartitionOneWay => {
            let (grudge, detail) = match fault {
                Fault::PartitionLeader => (
                    split(&[target_leader], &others(target_leader)),
                    format!("isolate {leader_note}"),
                ),
                Fault::PartitionHalves => {
                    let minority = &ids[..((n - 1) / 2) as usize];
                    let majority = &ids[((n - 1) / 2) as usize..];
                    (
                        split(minority, majority),
                        format!("minority {minority:?} | majority {majority:?}"),
                    )
                }
                Fault::PartitionBridge => {
                    // The bridge node talks to everyone; the rest split into two halves that cannot
                    // talk to each other. Alternately the bridge is the leader.
                    let bridge = if flip { target_leader } else { ids[0] };
                    let rest = others(bridge);
                    let (left, right) = rest.split_at(rest.len() / 2);
                    (
                        split(left, right),
                        format!("{left:?} | bridge {bridge} | {right:?}"),
                    )
                }
                _ => {
                    let mut g = Grudge::new();
                    for o in others(target_leader) {
                        if flip {
                            g.insert((o, target_leader));
                        } else {
                            g.insert((target_leader, o));
                        }
                    }
                    let what = if flip {
                        "cannot hear the others"
                    } else {
                        "is not heard by the others"
                    };
                    (g, format!("{leader_note} {what}"))
                }
            };
            let ix = history.fault_started(fault.name(), detail.clone());
            tracing::info!(%fault, %detail, ?hold, "nemesis: partition");
            net.cut(&grudge).await?;
            tokio::time::sleep(hold).await;
            net.heal().await?;
            history.fault_ended(ix);
        }
        Fault::Kill => {
            let target = if flip { target_leader } else { ids[0] };
            let detail = if flip {
                format!("SIGKILL {leader_note}")
            } else {
                format!("SIGKILL node {target}")
            };
            // Half the time the node comes straight back, before anyone has replaced it: a leader
            // must not pick up its old term as if nothing had happened.
            let down = if rng.random_bool(0.5) {
                Duration::ZERO
            } else {
                hold
            };
            let detail = format!("{detail}, restart after {:.1} s", down.as_secs_f64());
            let ix = history.fault_started(fault.name(), detail.clone());
            tracing::info!(%fault, %detail, "nemesis: kill");
            nodes.lock().await.kill(target)?;
            tokio::time::sleep(down).await;
            nodes.lock().await.start(net, target)?;
            tokio::time::sleep(hold - down).await;
            history.fault_ended(ix);
        }
        Fault::Pause => {
            let target = if flip { target_leader } else { ids[0] };
            let detail = if flip {
                format!("SIGSTOP {leader_note}")
            } else {
                format!("SIGSTOP node {target}")
            };
            let ix = history.fault_started(fault.name(), detail.clone());
            tracing::info!(%fault, %detail, ?hold, "nemesis: pause");
            nodes.lock().await.pause(target)?;
            tokio::time::sleep(hold).await;
            nodes.lock().await.resume(target)?;
            history.fault_ended(ix);
        }
        Fault::PauseReads => {
            let detail = format!("SIGSTOP {leader_note}, strong reads queued on it before SIGCONT");
            let ix = history.fault_started(fault.name(), detail.clone());
            tracing::info!(%fault, %detail, ?hold, "nemesis: pause with queued reads");
            nodes.lock().await.pause(target_leader)?;
            // Long enough for the others to elect a leader (about 300-400 ms) and for the register
            // clients to write through it; the reads go out last, so they are answered after SIGCONT
            // well within their deadline.
            let queue_for = QUEUED_READS_LEAD.min(hold / 2);
            tokio::time::sleep(hold - queue_for).await;
            let reads = workload::queued_reads(shared.clone(), target_leader, QUEUED_READS);
            tokio::time::sleep(queue_for).await;
            nodes.lock().await.resume(target_leader)?;
            for read in reads {
                let _ = read.await;
            }
            history.fault_ended(ix);
        }
        Fault::Clock => {
            let target = if flip { target_leader } else { ids[0] };
            // Alternately slow and fast, and shifted back or forward by up to five minutes.
            let rate: f64 = if rng.random_bool(0.5) {
                rng.random_range(0.5..0.8)
            } else {
                rng.random_range(1.25..2.0)
            };
            let offset: i64 = rng.random_range(-300..=300);
            let faketime = format!("{offset:+}s x{rate:.2}");
            let who = if flip {
                leader_note.clone()
            } else {
                format!("node {target}")
            };
            let detail = format!("restart {who} with FAKETIME={faketime:?}");
            let ix = history.fault_started(fault.name(), detail.clone());
            tracing::info!(%fault, %detail, ?hold, "nemesis: clock");
            {
                let mut nodes = nodes.lock().await;
                nodes.kill(target)?;
                nodes.start_with_env(
                    net,
                    target,
                    &[("LD_PRELOAD", LIBFAKETIME.into()), ("FAKETIME", faketime)],
                )?;
            }
            tokio::time::sleep(hold).await;
            {
                let mut nodes = nodes.lock().await;
                nodes.kill(target)?;
                nodes.start(net, target)?;
            }
            history.fault_ended(ix);
        }
        Fault::CrashAll => {
            let ix = history.fault_started(fault.name(), "SIGKILL every node".into());
            tracing::info!(%fault, "nemesis: crash all");
            {
                let mut nodes = nodes.lock().await;
                for id in 1..=n {
                    nodes.kill(id)?;
                }
            }
            // Short: the point is the restart, and every second down is a second without traffic.
            tokio::time::sleep(hold.min(Duration::from_secs(1))).await;
            {
                let mut nodes = nodes.lock().await;
                for id in 1..=n {
                    nodes.start(net, id)?;
                }
            }
            history.fault_ended(ix);
        }
    }
    Ok(())
}
