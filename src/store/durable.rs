//! sled writes that must survive a power cut, not only a crash of the process.
//!
//! sled 0.34's `flush` on Linux ends with `sync_file_range`, which writes the pages out but neither
//! flushes the drive's cache nor commits the file's metadata (its size grows as sled appends), and
//! it never syncs its blob files at all: values larger than a fraction of a segment, the stored
//! snapshot among them, live in files under `blobs/` that sled writes and leaves to the kernel. Its
//! background thread `fsync`s the main file about once per `flush_every_ms`, not the blobs.
//!
//! The log engine fsyncs for real, so a purge behind a snapshot is durable the moment openraft hears
//! of it. The snapshot it relies on must be at least as durable, or a power cut could leave a
//! purged log and no snapshot to stand for it. So every point where sled's state is relied on
//! (a stored or installed snapshot, the clean-shutdown marker) goes through [`flush`], which adds
//! an `fsync` of sled's files and directories to sled's own flush. An `fsync` on any descriptor of a
//! file makes that file's data and metadata durable, whoever wrote them.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// sled's flush, then an `fsync` of its main file, its blob files and the directories holding them.
pub(crate) async fn flush(db: &sled::Db, data_dir: &Path) -> io::Result<()> {
    db.flush_async().await.map_err(super::io_err)?;
    let sled_dir = data_dir.join("sled");
    tokio::task::spawn_blocking(move || sync_files(&sled_dir))
        .await
        .map_err(io::Error::other)?
}

/// [`flush`] for code that runs outside the runtime's async context (open, migration).
pub(crate) fn flush_blocking(db: &sled::Db, data_dir: &Path) -> io::Result<()> {
    db.flush().map_err(super::io_err)?;
    sync_files(&data_dir.join("sled"))
}

/// Makes the data directory's own layout durable: the directories the stores live in, and the data
/// directory's name in its parent. A power cut otherwise takes a directory entry that was never
/// fsynced with it, whatever was fsynced inside it: a node would come back without its log and
/// vote, or with no data directory at all, and start as a fresh member. Run on every open, so a
/// directory made by an older version is covered too; it costs a few fsyncs at start.
pub(crate) fn sync_layout(data_dir: &Path) -> io::Result<()> {
    for dir in ["sled", super::log::LOG_DIR, super::snapshot::SNAPSHOT_DIR] {
        let path = data_dir.join(dir);
        if path.is_dir() {
            File::open(&path)?.sync_all()?;
        }
    }
    File::open(data_dir)?.sync_all()?;
    let parent = match data_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

fn sync_files(sled_dir: &Path) -> io::Result<()> {
    File::open(sled_dir.join("db"))?.sync_all()?;
    // sled writes its configuration once, at creation, and never syncs it; one it cannot read
    // back stops the node from opening its database.
    let conf = sled_dir.join("conf");
    if conf.exists() {
        File::open(&conf)?.sync_all()?;
    }
    let blobs = sled_dir.join("blobs");
    if blobs.is_dir() {
        let files: Vec<PathBuf> = std::fs::read_dir(&blobs)?
            .map(|entry| entry.map(|e| e.path()))
            .collect::<io::Result<_>>()?;
        for path in files {
            match File::open(&path) {
                Ok(file) => file.sync_all()?,
                // sled removed an old blob meanwhile: nothing left to make durable.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        File::open(&blobs)?.sync_all()?;
    }
    File::open(sled_dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn flushes_a_directory_with_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::sled_config(dir.path()).open().unwrap();
        // Big enough to be a blob file.
        db.insert(b"big", vec![7u8; 1 << 20]).unwrap();
        flush(&db, dir.path()).await.unwrap();
        let blobs = std::fs::read_dir(dir.path().join("sled/blobs"))
            .unwrap()
            .count();
        assert!(
            blobs >= 1,
            "the value did not become a blob; the test covers nothing"
        );
        flush_blocking(&db, dir.path()).unwrap();
    }
}
