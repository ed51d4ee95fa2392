//! `raftkv.v1.Maintenance`: backups, streamed (see `backup` for what the file holds).
//!
//! The image is taken to a file of the node's own before the first byte goes out, so a slow client
//! never holds up the node's snapshot work, only its own stream; the stream then reads the file a
//! piece at a time. Memory per stream is a couple of pieces; streams at once are capped; a client
//! that stops reading, or reads too slowly on the whole, is dropped, freeing the file.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::status;
use crate::backup::export;
use crate::node::{Error, Node};
use crate::pb::v1 as pb;
use crate::pb::v1::maintenance_server::Maintenance;

/// Bytes of the file per message: far below every client's default message limit (4 MiB).
const PIECE: usize = 1 << 20;
/// Backups one node streams at once; each holds a file the size of the state until it ends.
const MAX_STREAMS: usize = 2;
/// A client that takes no piece for this long is given up on.
const STALLED: Duration = Duration::from_secs(60);
/// And one that reads slower than this on the whole: a stream holds a permit and a file the size of
/// the state for as long as it lasts.
const MIN_BYTES_PER_SEC: u64 = 1 << 20;

pub struct MaintenanceService {
    node: Arc<Node>,
    streams: Arc<Semaphore>,
}

impl MaintenanceService {
    pub fn new(node: Arc<Node>) -> Self {
        MaintenanceService {
            node,
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
        }
    }
}

type Pieces = Pin<Box<dyn Stream<Item = Result<pb::SnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    type SnapshotStream = Pieces;

    async fn snapshot(
        &self,
        request: Request<pb::SnapshotRequest>,
    ) -> Result<Response<Pieces>, Status> {
        let node = &self.node;
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            status::of(
                node.id(),
                Error::Exhausted(format!(
                    "this node is already streaming {MAX_STREAMS} backups; try again when one ends"
                )),
            )
        })?;
        let prepared = async {
            // Admitted as any request (refused while the node drains or once removed), but not
            // counted in flight: a drain must not wait, and keep the leadership, for as long as an
            // image takes to write. A stream cut by the node's exit ends without its last piece,
            // which `snapshot save` refuses.
            drop(node.admit_request()?);
            let deadline = node.deadline(crate::grpc::timeout_of(request.metadata()));
            export::prepare(node, deadline).await
        }
        .await
        .map_err(|e| status::of(node.id(), e))?;
        let header = super::kv::header(node.header(Some(prepared.header.revision)));
        tracing::info!(
            revision = prepared.header.revision,
            keys = prepared.header.keys,
            bytes = prepared.len(),
            "streaming a backup"
        );
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = send(prepared, header, &tx).await {
                tracing::warn!(error = %e, "a backup stream ended early");
                let _ = tx.try_send(Err(Status::internal(format!(
                    "the backup stream failed: {e}"
                ))));
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Sends the header bytes, then the image, a piece at a time.
async fn send(
    prepared: export::Prepared,
    header: pb::ResponseHeader,
    tx: &mpsc::Sender<Result<pb::SnapshotResponse, Status>>,
) -> std::io::Result<()> {
    let total = prepared.len();
    let ends_by =
        tokio::time::Instant::now() + STALLED + Duration::from_secs(total / MIN_BYTES_PER_SEC);
    let mut sent = 0u64;
    let mut image = tokio::fs::File::from_std(prepared.image);
    let mut pending = prepared.header_bytes;
    loop {
        while pending.len() < PIECE {
            let want = PIECE - pending.len();
            let before = pending.len();
            (&mut image)
                .take(want as u64)
                .read_to_end(&mut pending)
                .await?;
            if pending.len() == before {
                break;
            }
        }
        if pending.is_empty() && sent == total {
            return Ok(());
        }
        if pending.is_empty() {
            return Err(std::io::Error::other(format!(
                "the image ended {} bytes early",
                total - sent
            )));
        }
        sent += pending.len() as u64;
        let piece = pb::SnapshotResponse {
            header: Some(header),
            blob: std::mem::take(&mut pending),
            remaining_bytes: total.saturating_sub(sent),
        };
        let now = tokio::time::Instant::now();
        if now >= ends_by {
            return Err(std::io::Error::other(format!(
                "the client read {sent} of {total} bytes too slowly (under {MIN_BYTES_PER_SEC} bytes/s)"
            )));
        }
        match tx.send_timeout(Ok(piece), STALLED.min(ends_by - now)).await {
            Ok(()) => {}
            // The client went away or stopped reading: nothing to tell it.
            Err(_) => return Ok(()),
        }
        if sent >= total {
            return Ok(());
        }
    }
}
