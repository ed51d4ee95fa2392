//! Taking a backup on a running node: a consistent image (see `Node::export_state`), hashed, under a
//! header that says what it is. Both the `Maintenance.Snapshot` stream and the scheduled backups
//! start here.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::time::SystemTime;

use tokio::time::Instant;

use super::format::{self, FORMAT_VERSION, Header};
use crate::node::{Error, Node};

/// A backup ready to be sent or written: the header's bytes, then the image, an open file already
/// removed from the directory (so nothing is left behind however the caller ends).
pub struct Prepared {
    pub header: Header,
    pub header_bytes: Vec<u8>,
    pub image: File,
}

impl Prepared {
    /// Bytes of the whole backup file.
    pub fn len(&self) -> u64 {
        self.header_bytes.len() as u64 + self.header.image_bytes
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Takes a backup of `node`'s state at a read index the leader confirms before `deadline`.
pub async fn prepare(node: &Node, deadline: Instant) -> Result<Prepared, Error> {
    let mut exported = node.export_state(deadline).await?;
    let image = exported.file.try_clone()?;
    let hashed = tokio::task::spawn_blocking(move || {
        let mut image = image;
        let (sha, bytes) = format::hash_image(&mut image)?;
        image.seek(SeekFrom::Start(0))?;
        Ok::<_, std::io::Error>((sha, bytes))
    })
    .await
    .map_err(|e| Error::Internal(format!("hashing the backup image: {e}")))?;
    let (sha256, image_bytes) =
        hashed.map_err(|e| Error::Storage(format!("reading the backup image: {e}")))?;
    let log_id = exported.meta.last_log_id.as_ref();
    let header = Header {
        format_version: FORMAT_VERSION,
        cluster_id: node.cluster().to_string(),
        revision: log_id.map_or(0, |l| l.index),
        term: log_id.map_or(0, |l| l.leader_id.term),
        leader_id: log_id.map_or(0, |l| l.leader_id.node_id),
        members: format::members_of(&exported.meta),
        keys: exported.pairs,
        image_bytes,
        sha256,
        taken_on: node.id(),
        taken_at_unix: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        raftkv_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let header_bytes = format::encode_header(&header)
        .map_err(|e| Error::Internal(format!("encoding the backup header: {e}")))?;
    exported.file.seek(SeekFrom::Start(0))?;
    Ok(Prepared {
        header,
        header_bytes,
        image: exported.file,
    })
}
