//! Network partitions: the leader alone, a minority against a majority, two halves joined by one
//! bridge node, and one-way loss to or from the leader.

use super::super::net::Grudge;
use super::{Fault, Strike};

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

pub(super) async fn inject(s: &Strike<'_>) -> anyhow::Result<()> {
    let Strike {
        fault,
        flip,
        hold,
        ref ids,
        target_leader,
        ref leader_note,
        net,
        ..
    } = *s;
    let history = s.history();
    let n = s.members.len() as u64;
    let others = |x: u64| s.others(x);
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
    Ok(())
}
