//! SIGKILL one node and restart it on the same data.

use std::time::Duration;

use rand::Rng;
use rand::rngs::StdRng;

use super::Strike;

pub(super) async fn inject(s: &Strike<'_>, rng: &mut StdRng) -> anyhow::Result<()> {
    let Strike {
        fault,
        flip,
        hold,
        ref leader_note,
        nodes,
        ..
    } = *s;
    let history = s.history();
    let target = s.target();
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
    nodes.lock().await.start(target)?;
    tokio::time::sleep(hold - down).await;
    history.fault_ended(ix);
    Ok(())
}
