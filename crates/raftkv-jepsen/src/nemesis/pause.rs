//! SIGSTOP one node, then SIGCONT.

use super::Strike;

pub(super) async fn inject(s: &Strike<'_>) -> anyhow::Result<()> {
    let target = s.target();
    let detail = format!("SIGSTOP {}", s.target_note());
    let ix = s.history().fault_started(s.fault.name(), detail.clone());
    tracing::info!(fault = %s.fault, %detail, hold = ?s.hold, "nemesis: pause");
    s.nodes.lock().await.pause(target)?;
    tokio::time::sleep(s.hold).await;
    s.nodes.lock().await.resume(target)?;
    s.history().fault_ended(ix);
    Ok(())
}
