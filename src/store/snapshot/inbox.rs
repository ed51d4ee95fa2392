//! Where a follower writes a snapshot while it arrives from the leader: chunk by chunk into a file in
//! the snapshot directory, bounded in size, fsynced and checked whole before openraft sees it.
//!
//! A transfer that fails half way (cut connection, refused size, bad bytes) deletes its partial file;
//! one that a crash interrupts leaves it for the next open to remove (see `tidy`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::AsyncWriteExt;

use super::file::{self, FileError};
use crate::types::{SnapshotData, SnapshotMeta};

/// How many transfers may be written at once. A new leader may start one while its predecessor's
/// is still timing out; more than that is no leader's doing.
const MAX_CONCURRENT: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("snapshot exceeds {cap} bytes (--max-snapshot-bytes)")]
    TooLarge { cap: u64 },
    #[error("{MAX_CONCURRENT} snapshot transfers are already being received")]
    Busy,
    #[error("the received snapshot is not one: {0}")]
    Malformed(String),
    #[error("the snapshot's header is for {header:?}, its file for {file:?}")]
    Mismatch { header: String, file: String },
    #[error("writing the received snapshot: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Clone)]
pub struct Inbox {
    dir: PathBuf,
    cap: u64,
    slots: Arc<tokio::sync::Semaphore>,
}

impl Inbox {
    /// Received snapshots go to `data_dir`'s snapshot directory, at most `cap` bytes each.
    pub fn new(data_dir: &Path, cap: u64) -> Self {
        Inbox {
            dir: super::dir_of(data_dir),
            cap,
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT)),
        }
    }

    /// Starts receiving one snapshot.
    pub async fn begin(&self) -> Result<Incoming, InboxError> {
        let slot = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| InboxError::Busy)?;
        tokio::fs::create_dir_all(&self.dir).await?;
        let path = self
            .dir
            .join(format!("{}.receiving", super::new_name(&empty_meta())));
        let file = tokio::fs::File::create(&path).await?;
        Ok(Incoming {
            file: Some(tokio::io::BufWriter::with_capacity(1 << 20, file)),
            path,
            written: 0,
            cap: self.cap,
            _slot: slot,
        })
    }
}

fn empty_meta() -> SnapshotMeta {
    SnapshotMeta {
        last_log_id: None,
        last_membership: Default::default(),
    }
}

/// One snapshot being received. Dropped before [`Incoming::finish`], it deletes its file.
pub struct Incoming {
    file: Option<tokio::io::BufWriter<tokio::fs::File>>,
    path: PathBuf,
    written: u64,
    cap: u64,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Incoming {
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), InboxError> {
        if self.written + chunk.len() as u64 > self.cap {
            return Err(InboxError::TooLarge { cap: self.cap });
        }
        let Some(file) = self.file.as_mut() else {
            return Err(InboxError::Io(std::io::Error::other("already finished")));
        };
        file.write_all(chunk).await?;
        self.written += chunk.len() as u64;
        Ok(())
    }

    /// fsyncs the file and reads it through (see `file::verify`); it must be a snapshot of `meta`,
    /// which the leader's header announced. The result is what openraft installs.
    pub async fn finish(mut self, meta: &SnapshotMeta) -> Result<SnapshotData, InboxError> {
        let Some(mut file) = self.file.take() else {
            return Err(InboxError::Io(std::io::Error::other("already finished")));
        };
        file.flush().await?;
        let handle = file.into_inner().into_std().await;
        let path = self.path.clone();
        let verified = tokio::task::spawn_blocking(move || {
            handle.sync_all()?;
            let reader = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(&path)?);
            file::verify(reader).map(|(meta, _)| (meta, handle))
        })
        .await
        .map_err(|e| InboxError::Io(std::io::Error::other(e)))?;
        let (found, handle) = verified.map_err(|e| match e {
            FileError::Io(e) => InboxError::Io(e),
            FileError::Malformed(what) => InboxError::Malformed(what),
        })?;
        if &found != meta {
            return Err(InboxError::Mismatch {
                header: format!("{:?}", meta.last_log_id),
                file: format!("{:?}", found.last_log_id),
            });
        }
        let len = self.written;
        // Handed over: openraft's install renames it into place.
        let path = std::mem::take(&mut self.path);
        Ok(SnapshotData {
            file: handle,
            path,
            len,
        })
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            super::remove_quietly(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::snapshot::test_meta as meta;

    fn image(meta: &SnapshotMeta) -> Vec<u8> {
        file::Writer::new(Vec::new(), meta)
            .unwrap()
            .finish()
            .unwrap()
            .0
    }

    fn files(dir: &Path) -> usize {
        std::fs::read_dir(super::super::dir_of(dir)).map_or(0, |d| d.count())
    }

    #[tokio::test]
    async fn a_received_snapshot_is_checked_and_bounded_and_failures_leave_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = Inbox::new(dir.path(), 1 << 20);
        let bytes = image(&meta(3));

        let mut ok = inbox.begin().await.unwrap();
        for chunk in bytes.chunks(7) {
            ok.write(chunk).await.unwrap();
        }
        let data = ok.finish(&meta(3)).await.unwrap();
        assert_eq!(data.len, bytes.len() as u64);
        assert!(data.path.exists());
        std::fs::remove_file(&data.path).unwrap();

        let mut wrong = inbox.begin().await.unwrap();
        wrong.write(&bytes).await.unwrap();
        assert!(matches!(
            wrong.finish(&meta(4)).await,
            Err(InboxError::Mismatch { .. })
        ));

        let mut cut = inbox.begin().await.unwrap();
        cut.write(&bytes[..bytes.len() - 1]).await.unwrap();
        assert!(matches!(
            cut.finish(&meta(3)).await,
            Err(InboxError::Malformed(_))
        ));

        let mut big = inbox.begin().await.unwrap();
        big.write(&vec![0; 1 << 19]).await.unwrap();
        assert!(matches!(
            big.write(&vec![0; (1 << 19) + 1]).await,
            Err(InboxError::TooLarge { .. })
        ));
        drop(big);

        let _a = inbox.begin().await.unwrap();
        let _b = inbox.begin().await.unwrap();
        assert!(matches!(inbox.begin().await, Err(InboxError::Busy)));
        drop((_a, _b));
        assert_eq!(
            files(dir.path()),
            0,
            "every failed or abandoned transfer removed its file"
        );
    }
}
