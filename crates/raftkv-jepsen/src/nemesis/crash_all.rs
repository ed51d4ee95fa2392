//! SIGKILL every node at once and restart them all.

use std::time::Duration;

use super::Strike;

pub(super) async fn inject(s: &Strike<'_>) -> anyhow::Result<()> {
    let Strike {
        fault,
        hold,
        ref members,
        nodes,
        ..
    } = *s;
    let history = s.history();
    let ix = history.fault_started(fault.name(), "SIGKILL every node".into());
    tracing::info!(%fault, "nemesis: crash all");
    {
        let mut nodes = nodes.lock().await;
        for &id in members {
            nodes.kill(id)?;
        }
    }
    // Short: the point is the restart, and every second down is a second without traffic.
    tokio::time::sleep(hold.min(Duration::from_secs(1))).await;
    {
        let mut nodes = nodes.lock().await;
        for &id in members {
            nodes.start(id)?;
        }
    }
    history.fault_ended(ix);
    Ok(())
}
