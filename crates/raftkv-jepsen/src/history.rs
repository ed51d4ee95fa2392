//! The record of a fault test: every client operation and every fault, on one monotonic clock.
//!
//! All processes run on this host, so a single `Instant` orders everything without clock-sync error.
//! An operation's invoke time is taken just before its request is sent and its completion time just
//! after the answer arrives, so the real interval lies inside the recorded one.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

/// What the client learned: `ok` (it happened, with this result), `fail` (it certainly did not
/// happen), `info` (it may or may not have happened, at any time after its invocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Fail,
    Info,
}

/// One client operation, as one JSON line of `history.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct OpRecord {
    /// The logical client. A client whose operation ended `info` continues under a new process id, as
    /// in Jepsen: it can never learn that op's fate, so it must not look sequential with it.
    pub process: u64,
    /// `read`, `write`, `cas` (register), `add` (set), `eventual-read`.
    pub f: &'static str,
    pub key: String,
    /// For reads the value observed; for writes the value written; for cas `[expected, new]`.
    pub value: serde_json::Value,
    pub invoke_ns: u64,
    pub complete_ns: Option<u64>,
    pub outcome: Outcome,
    /// The node the request was sent to.
    pub node: u64,
    /// The revision in the response header (write: the entry's index; read: the node's applied index).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One fault, from installation to heal.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    pub process: &'static str,
    pub fault: String,
    pub detail: String,
    pub start_ns: u64,
    pub end_ns: Option<u64>,
    /// How it went, for faults that can be refused or time out (membership changes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
}

pub struct History {
    start: Instant,
    ops: Mutex<Vec<OpRecord>>,
    faults: Mutex<Vec<FaultRecord>>,
}

impl History {
    pub fn new() -> History {
        History {
            start: Instant::now(),
            ops: Mutex::default(),
            faults: Mutex::default(),
        }
    }

    pub fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    pub fn push(&self, op: OpRecord) {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).push(op);
    }

    /// Records the start of a fault and returns its index, for [`History::fault_ended`].
    pub fn fault_started(&self, fault: &str, detail: String) -> usize {
        let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        faults.push(FaultRecord {
            process: "nemesis",
            fault: fault.to_string(),
            detail,
            start_ns: self.now(),
            end_ns: None,
            outcome: None,
        });
        faults.len() - 1
    }

    pub fn fault_ended(&self, index: usize) {
        let now = self.now();
        if let Some(f) = self
            .faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(index)
        {
            f.end_ns = Some(now);
        }
    }

    /// [`History::fault_ended`], with what came of the fault.
    pub fn fault_ended_with(&self, index: usize, outcome: String) {
        self.fault_ended(index);
        if let Some(f) = self
            .faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(index)
        {
            f.outcome = Some(outcome);
        }
    }

    pub fn ops(&self) -> Vec<OpRecord> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn faults(&self) -> Vec<FaultRecord> {
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Writes operations and faults as JSON lines, in invocation order.
    pub fn write_jsonl(&self, path: &Path) -> anyhow::Result<()> {
        let mut ops = self.ops();
        ops.sort_by_key(|o| o.invoke_ns);
        let faults = self.faults();
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        let mut fi = faults.iter().peekable();
        for op in &ops {
            while let Some(f) = fi.next_if(|f| f.start_ns <= op.invoke_ns) {
                serde_json::to_writer(&mut out, f)?;
                out.write_all(b"\n")?;
            }
            serde_json::to_writer(&mut out, op)?;
            out.write_all(b"\n")?;
        }
        for f in fi {
            serde_json::to_writer(&mut out, f)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
        Ok(())
    }
}

impl Default for History {
    fn default() -> Self {
        History::new()
    }
}
