//! `raftkv snapshot save`: the client's half of `Maintenance.Snapshot`, writing the stream to a file
//! as it arrives.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use super::format::{self, Header};
use crate::pb::v1 as pb;

#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{}", crate_status(.0))]
    Status(tonic::Status),
    #[error("the stream ended with {remaining} bytes still to come: the backup is incomplete")]
    Cut { remaining: u64 },
    #[error("the node's pieces do not add up to what it announced: the backup is not what it said")]
    TooLong,
    #[error("the node sent no backup")]
    Empty,
    #[error("the saved file does not check: {0}")]
    Check(#[from] format::BackupError),
}

fn crate_status(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// Writes the stream into `path` (through `path.partial`, renamed once whole, checked and fsynced),
/// returning the checked header. Nothing is left under `path` unless the whole backup checks.
pub async fn to_file(
    mut stream: tonic::Streaming<pb::SnapshotResponse>,
    path: &Path,
) -> Result<Header, SaveError> {
    let partial = PathBuf::from(format!("{}.partial", path.display()));
    let result = receive(&mut stream, &partial).await;
    let result = match result {
        Ok(()) => {
            let (partial, path) = (partial.clone(), path.to_path_buf());
            tokio::task::spawn_blocking(move || {
                let (header, _) =
                    format::verify(BufReader::with_capacity(1 << 20, File::open(&partial)?))?;
                std::fs::rename(&partial, &path)?;
                // A bare file name lives in the working directory.
                let dir = match path.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d,
                    _ => std::path::Path::new("."),
                };
                File::open(dir)?.sync_all()?;
                Ok::<_, SaveError>(header)
            })
            .await
            .map_err(std::io::Error::other)?
        }
        Err(e) => Err(e),
    };
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

async fn receive(
    stream: &mut tonic::Streaming<pb::SnapshotResponse>,
    partial: &Path,
) -> Result<(), SaveError> {
    let mut out = BufWriter::with_capacity(1 << 20, File::create(partial)?);
    let mut remaining: Option<u64> = None;
    while let Some(piece) = stream.message().await.map_err(SaveError::Status)? {
        // Each piece must account for itself: what was left before it, less what it carries, is
        // what it says is left. So a node cannot send more than it announced (filling this disk).
        let carried = piece.blob.len() as u64;
        if remaining.is_some_and(|r| r.checked_sub(carried) != Some(piece.remaining_bytes)) {
            return Err(SaveError::TooLong);
        }
        out.write_all(&piece.blob)?;
        remaining = Some(piece.remaining_bytes);
    }
    match remaining {
        Some(0) => {}
        Some(remaining) => return Err(SaveError::Cut { remaining }),
        None => return Err(SaveError::Empty),
    }
    out.flush()?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}
