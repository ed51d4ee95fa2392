//! SIGKILL one node and restart it on the same data.

use std::time::Duration;

use rand::Rng;
use rand::rngs::StdRng;

use super::Strike;

pub(super) async fn inject(s: &Strike<'_>, rng: &mut StdRng) -> anyhow::Result<()> {
    let target = s.target();
    // Half the time the node comes straight back, before anyone has replaced it: a leader
    // must not pick up its old term as if nothing had happened.
    let down = if rng.random_bool(0.5) {
        Duration::ZERO
    } else {
        s.hold
    };
    let detail = format!(
        "SIGKILL {}, restart after {:.1} s",
        s.target_note(),
        down.as_secs_f64()
    );
    let ix = s.history().fault_started(s.fault.name(), detail.clone());
    tracing::info!(fault = %s.fault, %detail, "nemesis: kill");
    s.nodes.lock().await.kill(target)?;
    tokio::time::sleep(down).await;
    s.nodes.lock().await.start(target)?;
    tokio::time::sleep(s.hold - down).await;
    s.history().fault_ended(ix);
    Ok(())
}
