//! The durable view, on a real directory: a file per inode holding its content as of its last
//! fsync, and one namespace file holding every directory's entries as of its last directory fsync.
//!
//! The layout is the filesystem's own rather than a mirror of the tree: a mirror would have to
//! replay renames and unlinks in the order they became durable, and keep somewhere the synced data
//! of files whose names are not durable yet; an inode store has neither problem. `export` turns it
//! back into an ordinary tree for a post-mortem.
//!
//! Nothing here fsyncs the backing directory: the power cut being simulated is the mount's, not the
//! host's.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Dir,
}

/// A directory entry: the inode it names, what it is, and its permission bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub ino: u64,
    pub kind: Kind,
    pub perm: u16,
}

/// Every directory's durable entries, by the directory's inode.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Namespace {
    pub next_ino: u64,
    pub dirs: BTreeMap<u64, BTreeMap<String, Entry>>,
}

const NAMESPACE: &str = "namespace.json";
const DATA: &str = "data";

pub struct Store {
    root: PathBuf,
}

impl Store {
    /// The store in `root`, made if it does not exist.
    pub fn open(root: &Path) -> io::Result<Store> {
        fs::create_dir_all(root.join(DATA))?;
        Ok(Store {
            root: root.to_path_buf(),
        })
    }

    pub fn load_namespace(&self) -> io::Result<Namespace> {
        match fs::read(self.root.join(NAMESPACE)) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(io::Error::other),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Namespace::default()),
            Err(e) => Err(e),
        }
    }

    /// Replaces the namespace file whole (a rename, so a crash of this process leaves one or the
    /// other).
    pub fn save_namespace(&self, ns: &Namespace) -> io::Result<()> {
        let tmp = self.root.join(format!("{NAMESPACE}.tmp"));
        fs::write(&tmp, serde_json::to_vec(ns).map_err(io::Error::other)?)?;
        fs::rename(&tmp, self.root.join(NAMESPACE))
    }

    fn data_path(&self, ino: u64) -> PathBuf {
        self.root.join(DATA).join(ino.to_string())
    }

    /// The durable copy of `ino`, made empty if it has none yet.
    pub fn open_data(&self, ino: u64) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.data_path(ino))
    }

    pub fn data_len(&self, ino: u64) -> io::Result<u64> {
        match fs::metadata(self.data_path(ino)) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }

    pub fn remove_data(&self, ino: u64) -> io::Result<()> {
        match fs::remove_file(self.data_path(ino)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Removes the durable copies of inodes the namespace no longer reaches.
    pub fn remove_data_except(&self, live: &HashSet<u64>) -> io::Result<()> {
        for entry in fs::read_dir(self.root.join(DATA))? {
            let entry = entry?;
            let ino = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u64>().ok());
            if ino.is_none_or(|ino| !live.contains(&ino)) {
                fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }
}

/// Writes the durable tree in `store_root` out as an ordinary directory tree under `dest`: what a
/// machine would find on its disk after a power cut (for reading a failed run's data offline).
pub fn export(store_root: &Path, dest: &Path) -> io::Result<()> {
    let store = Store::open(store_root)?;
    let ns = store.load_namespace()?;
    let mut stack = vec![(crate::state::ROOT, dest.to_path_buf())];
    let mut seen = HashSet::new();
    while let Some((dir, path)) = stack.pop() {
        if !seen.insert(dir) {
            continue;
        }
        fs::create_dir_all(&path)?;
        for (name, entry) in ns.dirs.get(&dir).into_iter().flatten() {
            let target = path.join(name);
            match entry.kind {
                Kind::Dir => stack.push((entry.ino, target)),
                Kind::File => {
                    let src = store.data_path(entry.ino);
                    if src.exists() {
                        fs::copy(&src, &target)?;
                    } else {
                        File::create(&target)?;
                    }
                }
            }
        }
    }
    Ok(())
}
