//! SIGSTOP one node, then SIGCONT.

use super::Strike;

pub(super) async fn inject(s: &Strike<'_>) -> anyhow::Result<()> {
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
    Ok(())
}
