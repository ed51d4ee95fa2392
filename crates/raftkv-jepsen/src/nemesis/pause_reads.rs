//! SIGSTOP the leader, queue strong reads on it, SIGCONT: it must not answer them from its old state.

use std::time::Duration;

use super::super::workload;
use super::Strike;

/// Strong reads the pause-reads fault queues on the stopped leader, and how long before SIGCONT.
const QUEUED_READS: usize = 8;
const QUEUED_READS_LEAD: Duration = Duration::from_millis(300);

pub(super) async fn inject(s: &Strike<'_>) -> anyhow::Result<()> {
    let Strike {
        fault,
        hold,
        target_leader,
        ref leader_note,
        nodes,
        shared,
        ..
    } = *s;
    let history = s.history();
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
    Ok(())
}
