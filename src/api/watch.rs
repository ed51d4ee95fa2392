//! `raftkv.v1.Watch`: a change feed over a key range, from this node's own applied history.
//!
//! Each stream is a task of its own that reads the history from the revision it has reached up to
//! what the node has applied, sends whole revisions, and waits for the next apply when it has caught
//! up. It never holds anything apply needs: a slow client only makes its own task wait on a bounded
//! channel, and if the window moves past it, its stream ends with OUT_OF_RANGE (see
//! `store::history`). A node without a leader keeps streaming what it applies, like an eventual read.
//!
//! The first response of every stream has no events: its header's revision is where the stream
//! starts (the revision before the first it can send), so a client resumes from `revision + 1`
//! even if the stream breaks before any event.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::kv::header;
use super::status;
use crate::limits::{Invalid, Limits, RESPONSE_OVERHEAD_BYTES};
use crate::node::{Error, Node};
use crate::pb::v1 as pb;
use crate::store::history::{Change, Compacted, History, Read};

/// Responses a stream buffers before its task waits for the client.
const STREAM_BUFFER: usize = 2;
/// Records one read of the history looks at, so a watch of a rare key shares the thread fairly.
const RECORDS_PER_READ: usize = 4096;
/// The most often a client may ask for progress notifications.
pub const MIN_PROGRESS_MS: u64 = 10;

pub struct WatchService {
    pub node: Arc<Node>,
}

/// What one stream watches.
struct Watched {
    start: Vec<u8>,
    end: Vec<u8>,
    prev_kv: bool,
    progress: Option<Duration>,
}

impl Watched {
    fn keeps(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && (self.end.is_empty() || key < self.end.as_slice())
    }
}

fn validate(limits: &Limits, req: &pb::WatchRequest) -> Result<Watched, Invalid> {
    if req.start.len() > limits.max_key_bytes || req.end.len() > limits.max_key_bytes {
        return Err(Invalid(format!(
            "watch bounds are limited to {} bytes",
            limits.max_key_bytes
        )));
    }
    if !req.end.is_empty() && req.end <= req.start {
        return Err(Invalid(
            "watch end must be after its start (empty: no upper bound)".into(),
        ));
    }
    let progress = match req.progress_notify_ms {
        0 => None,
        ms if ms < MIN_PROGRESS_MS => {
            return Err(Invalid(format!(
                "progress_notify_ms {ms} is below the minimum {MIN_PROGRESS_MS}"
            )));
        }
        ms => Some(Duration::from_millis(ms)),
    };
    Ok(Watched {
        start: req.start.clone(),
        end: req.end.clone(),
        prev_kv: req.prev_kv,
        progress,
    })
}

type Sender = mpsc::Sender<Result<pb::WatchResponse, Status>>;

#[tonic::async_trait]
impl pb::watch_server::Watch for WatchService {
    type WatchStream = ReceiverStream<Result<pb::WatchResponse, Status>>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let node = self.node.clone();
        let req = request.into_inner();
        let watched = validate(node.limits(), &req).map_err(|e| status::invalid(node.id(), e))?;
        let permit = node.admit_watch().map_err(|e| status::of(node.id(), e))?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(async move {
            let _permit = permit;
            let id = node.id();
            if let Err(e) = stream(&node, watched, req.start_revision, &tx).await {
                // Fails only when the client has gone, and then nobody hears it.
                let _ = tx.send(Err(status::of(id, e))).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Streams until the client goes (Ok) or the watch must end (the error says why).
async fn stream(
    node: &Node,
    watched: Watched,
    start_revision: u64,
    tx: &Sender,
) -> Result<(), Error> {
    let history = node.history();
    let stopping = node.stopping();
    let mut applied = history.applied();
    // Everything up to `cursor - 1` has been sent (or had nothing for this watch).
    let mut cursor = match start_revision {
        0 => *applied.borrow_and_update() + 1,
        r => r,
    };
    let budget = node
        .limits()
        .max_response_bytes
        .saturating_sub(RESPONSE_OVERHEAD_BYTES)
        .max(1);
    // Refused before anything is sent when the window is already past it.
    let oldest = history.start();
    if cursor < oldest {
        return Err(compacted(cursor, oldest));
    }
    // The first response says where the stream starts, so that a client that asked for "from now
    // on" knows the revision to resume from, whatever happens before the first event.
    send(node, tx, cursor - 1, Vec::new()).await?;
    let mut next_progress = watched.progress.map(|p| Instant::now() + p);
    loop {
        let through = *applied.borrow_and_update();
        if cursor <= through {
            let read = read(history, &watched, cursor, through, budget)?;
            let through = read.through;
            let events: Vec<pb::Event> = read
                .revisions
                .into_iter()
                .flat_map(|r| {
                    let revision = r.revision;
                    r.changes
                        .into_iter()
                        .map(move |c| event(c, revision, watched.prev_kv))
                })
                .collect();
            cursor = through + 1;
            if !events.is_empty() {
                send(node, tx, through, events).await?;
                next_progress = watched.progress.map(|p| Instant::now() + p);
            }
            if tx.is_closed() {
                return Ok(());
            }
            // A backlog with nothing for this watch is read without sending; let other tasks run
            // between reads.
            tokio::task::yield_now().await;
            continue;
        }
        let progress_due = async {
            match next_progress {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = applied.changed() => {
                if changed.is_err() {
                    return Err(Error::Stopped(format!("node {} closed its store", node.id())));
                }
            }
            _ = progress_due => {
                send(node, tx, cursor - 1, Vec::new()).await?;
                next_progress = watched.progress.map(|p| Instant::now() + p);
            }
            _ = tx.closed() => return Ok(()),
            _ = stopping.cancelled() => {
                return Err(Error::not_leader(
                    format!("node {} is shutting down; resume the watch on another node", node.id()),
                    Default::default(),
                ));
            }
        }
    }
}

fn read(
    history: &History,
    watched: &Watched,
    from: u64,
    through: u64,
    budget: usize,
) -> Result<Read, Error> {
    match history.read(
        from,
        through,
        |k| watched.keeps(k),
        budget,
        RECORDS_PER_READ,
    )? {
        Ok(read) => Ok(read),
        Err(Compacted { asked, oldest }) => Err(compacted(asked, oldest)),
    }
}

fn compacted(asked: u64, oldest: u64) -> Error {
    Error::Compacted {
        reason: format!(
            "revision {asked} is older than this node's watch history, which starts at {oldest}: \
             read the current state and watch from its revision + 1, or from {oldest}"
        ),
        oldest,
    }
}

/// Sends one response; an error only when the client has gone.
async fn send(node: &Node, tx: &Sender, through: u64, events: Vec<pb::Event>) -> Result<(), Error> {
    let response = pb::WatchResponse {
        header: Some(header(node.header(Some(through)))),
        events,
    };
    tx.send(Ok(response))
        .await
        .map_err(|_| Error::Internal("the watcher has gone".into()))
}

fn event(change: Change, revision: u64, with_prev: bool) -> pb::Event {
    let to_pb = |v: crate::store::state_machine::StoredValue| pb::KeyValue {
        key: change.key.clone(),
        value: v.value,
        create_revision: v.create_revision,
        mod_revision: v.mod_revision,
        version: v.version,
        lease: v.lease,
    };
    let prev_kv = if with_prev {
        change.prev.clone().map(to_pb)
    } else {
        None
    };
    match change.kv.clone() {
        Some(kv) => pb::Event {
            r#type: pb::EventType::Put as i32,
            kv: Some(to_pb(kv)),
            prev_kv,
        },
        None => pb::Event {
            r#type: pb::EventType::Delete as i32,
            kv: Some(pb::KeyValue {
                key: change.key.clone(),
                mod_revision: revision,
                ..Default::default()
            }),
            prev_kv,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked() {
        let limits = Limits {
            max_key_bytes: crate::limits::MAX_KEY_BYTES,
            max_value_bytes: 8,
            max_request_bytes: 1 << 20,
            max_txn_ops: 8,
            default_scan_limit: 1,
            max_scan_limit: 1,
            max_response_bytes: 1 << 20,
        };
        let req = |start: &str, end: &str, ms: u64| pb::WatchRequest {
            start: start.into(),
            end: end.into(),
            progress_notify_ms: ms,
            ..Default::default()
        };
        assert!(validate(&limits, &req("a", "", 0)).is_ok());
        assert!(validate(&limits, &req("", "", 0)).is_ok(), "everything");
        assert!(validate(&limits, &req("b", "a", 0)).is_err());
        assert!(
            validate(&limits, &req("a", "a", 0)).is_err(),
            "an empty range"
        );
        assert!(validate(&limits, &req("a", "", 1)).is_err());
        let w = validate(&limits, &req("b", "d", 500)).unwrap();
        assert_eq!(w.progress, Some(Duration::from_millis(500)));
        assert!(w.keeps(b"b") && w.keeps(b"c\xff") && !w.keeps(b"d") && !w.keeps(b"a"));
    }
}
