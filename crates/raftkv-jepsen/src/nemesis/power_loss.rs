//! Cut the power: the nodes lose what their filesystem held unsynced, then restart on what survived.
//!
//! A SIGKILL keeps everything the process wrote (the kernel holds it); only a power cut tests what
//! the node fsynced. The cuts take turns: all nodes (a quorum losing its page cache together: every
//! acknowledged write must have been fsynced on a quorum, or it is gone), one node (alternately the
//! leader), a minority. The nodes of one cut are frozen first so that the cut falls at one instant
//! for all of them.

use std::time::Duration;

use super::Strike;

pub(super) async fn inject(s: &Strike<'_>) -> anyhow::Result<()> {
    let minority = (s.members.len() - 1) / 2;
    let (targets, what) = match s.nth % 3 {
        0 => (s.members.clone(), "all nodes".to_string()),
        1 => (vec![s.target()], s.target_note()),
        _ => {
            let ids = s.ids[..minority.max(1)].to_vec();
            let what = format!("a minority (nodes {ids:?})");
            (ids, what)
        }
    };
    let ix = s
        .history()
        .fault_started(s.fault.name(), format!("power cut on {what}"));
    let lost = s.nodes.lock().await.power_cut(&targets)?;
    let lost_note: Vec<String> = lost
        .iter()
        .map(|(id, bytes)| format!("node {id} lost {bytes} unsynced bytes"))
        .collect();
    tracing::info!(fault = %s.fault, %what, lost = %lost_note.join(", "), "nemesis: power cut");
    // Down briefly: what matters is what the restart finds.
    tokio::time::sleep(s.hold.min(Duration::from_secs(1))).await;
    {
        let mut nodes = s.nodes.lock().await;
        for &id in &targets {
            nodes.start(id)?;
        }
    }
    tokio::time::sleep(s.hold.saturating_sub(Duration::from_secs(1))).await;
    s.history().fault_ended_with(ix, lost_note.join(", "));
    Ok(())
}
