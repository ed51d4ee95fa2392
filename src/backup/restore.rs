//! `raftkv snapshot restore`: a data directory for one member of a new cluster, made from a backup.
//!
//! Every member of the new cluster is restored from the same file with the same `--peers`, and each
//! then starts with `raftkv server` as usual. The directory holds the backup's state as an installed
//! snapshot at the backup's log id, so revisions go on above the backup's, and no Raft log: openraft
//! starts from the snapshot as it does on a node whose log was purged behind one. The membership is
//! `--peers` (all voters), and the cluster id is new, derived from the file and `--peers`, so every
//! member gets the same id and none can ever talk to the cluster the backup came from (peers check
//! each other's cluster id on every message).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::format::{self, Header};
use crate::network::identity::ClusterId;
use crate::types::{Member, NodeId};

/// `raftkv snapshot restore FILE --data-dir DIR --id N --peers ...`.
#[derive(clap::Args, Debug, Clone)]
pub struct RestoreArgs {
    /// The backup file (`raftkv snapshot save`, or a scheduled backup).
    pub file: PathBuf,
    /// The data directory to create for this member (it must not exist, or be empty).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// This member's id in the new cluster (one of --peers).
    #[arg(long)]
    pub id: NodeId,
    /// The new cluster's members, as `raftkv server --peers` takes them; the same on every member.
    #[arg(long, value_parser = crate::config::parse_peers)]
    pub peers: BTreeMap<NodeId, Member>,
    /// Mixed into the new cluster id (as `raftkv server --cluster-token`), so two clusters restored
    /// from the same file with the same --peers get different ids.
    #[arg(long, default_value = "raftkv")]
    pub cluster_token: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{0}")]
    Backup(#[from] format::BackupError),
    #[error("--id {0} is not one of --peers")]
    NotInPeers(NodeId),
    #[error("{} is not empty: restore writes a new data directory, never over one", .0.display())]
    NotEmpty(PathBuf),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
}

/// What a restore wrote.
#[derive(Debug)]
pub struct Restored {
    pub header: Header,
    pub cluster: ClusterId,
    pub keys: u64,
}

pub async fn run(args: &RestoreArgs) -> Result<Restored, RestoreError> {
    if !args.peers.contains_key(&args.id) {
        return Err(RestoreError::NotInPeers(args.id));
    }
    // Checked whole before anything is written: a bad file leaves no directory behind. Opened once,
    // so what is installed is the file that checked, even if the path is replaced meanwhile.
    let path = args.file.clone();
    let (header, image_meta, file) = tokio::task::spawn_blocking(move || {
        let mut file = File::open(&path).map_err(|e| {
            format::BackupError::Io(std::io::Error::new(
                e.kind(),
                format!("{}: {e}", path.display()),
            ))
        })?;
        let (header, meta) = format::verify(BufReader::with_capacity(1 << 20, &mut file))?;
        file.seek(SeekFrom::Start(0))?;
        Ok::<_, format::BackupError>((header, meta, file))
    })
    .await
    .map_err(std::io::Error::other)??;
    empty_or_absent(&args.data_dir)?;
    std::fs::create_dir_all(&args.data_dir)?;

    let old = ClusterId::parse(&header.cluster_id);
    let token = format!(
        "{}\0restored-from\0{}\0{}\0{}",
        args.cluster_token, header.cluster_id, header.revision, header.sha256
    );
    let cluster = ClusterId::derive(&token, &args.peers);
    if Some(cluster) == old {
        // Two different inputs of SHA-256 agreeing on 64 bits: never expected, and never allowed.
        return Err(RestoreError::Io(std::io::Error::other(
            "the new cluster id equals the old one; pass another --cluster-token",
        )));
    }

    let mut input = BufReader::with_capacity(1 << 20, file);
    format::read_header(&mut input)?;
    let created = crate::store::create_from_image(
        &args.data_dir,
        args.id,
        cluster.0,
        input,
        image_meta.last_log_id,
        &args.peers,
    )
    .await;
    let keys = match created {
        Ok(keys) => keys,
        Err(e) => {
            // Half a directory would start as an empty cluster under the new id: none at all.
            let _ = std::fs::remove_dir_all(&args.data_dir);
            return Err(e.into());
        }
    };
    Ok(Restored {
        header,
        cluster,
        keys,
    })
}

fn empty_or_absent(dir: &Path) -> Result<(), RestoreError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => match entries.next() {
            None => Ok(()),
            Some(_) => Err(RestoreError::NotEmpty(dir.to_path_buf())),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RestoreError::Io(e)),
    }
}
