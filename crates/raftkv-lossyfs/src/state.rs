//! What the filesystem holds, and what of it a power cut would keep.
//!
//! Two views of everything are kept. The *durable* view is what a disk would hold after a power cut:
//! each file's content as of its last `fsync`, and each directory's entries as of its last directory
//! `fsync`. It lives in the backing directory ([`crate::store`]). The *current* view is what the
//! processes using the mount see: the durable view plus every write, truncation, create, rename and
//! unlink since, held in memory. `fsync` copies one file's current content into the durable view,
//! a directory `fsync` copies one directory's entries; nothing else does (no timer, no writeback),
//! except the memory bound below. This is strict POSIX, the harshest behaviour a real filesystem may
//! show: ext4 in its default mode keeps more (its journal commits renames in order, and every few
//! seconds), never less, so a program that survives this survives ext4.
//!
//! A power cut is then simply forgetting the current view: the next mount loads the durable one.
//!
//! Unsynced data is bounded ([`DIRTY_LIMIT`]): past it, the file holding the most is written back
//! as a kernel's writeback would, which a real disk may also do (unsynced data *may* survive).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::time::SystemTime;

use crate::store::{Entry, Kind, Namespace, Store};

/// Unsynced bytes held in memory before the largest holder is written back.
pub const DIRTY_LIMIT: u64 = 256 << 20;

/// The root directory's inode, as FUSE numbers it.
pub const ROOT: u64 = 1;

/// Why an operation failed, as an errno the kernel passes on to the caller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("invalid argument")]
    Invalid,
    #[error("file name too long")]
    NameTooLong,
    #[error("operation not supported")]
    Unsupported,
    /// The power was cut: nothing more is served.
    #[error("the power was cut")]
    Cut,
    #[error("backing store: {0}")]
    Io(#[from] io::Error),
}

impl Error {
    pub fn errno(&self) -> i32 {
        match self {
            Error::NotFound => libc_errno::ENOENT,
            Error::Exists => libc_errno::EEXIST,
            Error::NotDir => libc_errno::ENOTDIR,
            Error::IsDir => libc_errno::EISDIR,
            Error::NotEmpty => libc_errno::ENOTEMPTY,
            Error::Invalid => libc_errno::EINVAL,
            Error::NameTooLong => libc_errno::ENAMETOOLONG,
            Error::Unsupported => libc_errno::EOPNOTSUPP,
            Error::Cut | Error::Io(_) => libc_errno::EIO,
        }
    }
}

/// The errno values used here (rustix spells them as its own type; FUSE wants the numbers).
mod libc_errno {
    use rustix::io::Errno;
    pub const ENOENT: i32 = Errno::NOENT.raw_os_error();
    pub const EEXIST: i32 = Errno::EXIST.raw_os_error();
    pub const ENOTDIR: i32 = Errno::NOTDIR.raw_os_error();
    pub const EISDIR: i32 = Errno::ISDIR.raw_os_error();
    pub const ENOTEMPTY: i32 = Errno::NOTEMPTY.raw_os_error();
    pub const EINVAL: i32 = Errno::INVAL.raw_os_error();
    pub const ENAMETOOLONG: i32 = Errno::NAMETOOLONG.raw_os_error();
    pub const EOPNOTSUPP: i32 = Errno::OPNOTSUPP.raw_os_error();
    pub const EIO: i32 = Errno::IO.raw_os_error();
}

pub type Result<T> = std::result::Result<T, Error>;

/// What `stat` says of an inode.
#[derive(Debug, Clone, Copy)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub perm: u16,
    pub mtime: SystemTime,
}

/// One file's content: the durable part in the store, the rest here.
#[derive(Default)]
struct Content {
    /// The current size.
    size: u64,
    /// The size of the durable copy.
    synced_size: u64,
    /// The durable copy's bytes from here on are not part of the current content (a truncation
    /// since the last fsync): they read as zeros, or as whatever was written over them since.
    durable_below: u64,
    /// Writes since the last fsync: non-overlapping extents by offset.
    dirty: BTreeMap<u64, Vec<u8>>,
    dirty_bytes: u64,
    /// The durable copy, opened on first use.
    file: Option<File>,
}

struct Inode {
    kind: Kind,
    perm: u16,
    mtime: SystemTime,
    content: Content,
    /// References the kernel holds (lookups not yet forgotten) and open handles: an inode with
    /// either is kept even when no directory names it.
    lookups: u64,
    opens: u64,
}

impl Inode {
    fn new(kind: Kind, perm: u16) -> Inode {
        Inode {
            kind,
            perm,
            mtime: SystemTime::now(),
            content: Content {
                durable_below: u64::MAX,
                ..Content::default()
            },
            lookups: 0,
            opens: 0,
        }
    }
}

/// The whole filesystem: both views and the store behind the durable one.
pub struct State {
    store: Store,
    inodes: HashMap<u64, Inode>,
    /// The current view's directories.
    current: HashMap<u64, BTreeMap<String, Entry>>,
    /// The durable view's directories (mirrors the store's namespace file).
    durable: HashMap<u64, BTreeMap<String, Entry>>,
    next_ino: u64,
    dirty_total: u64,
    /// Inodes that may have lost their last reference; collected after each operation.
    maybe_unused: HashSet<u64>,
    cut: bool,
}

impl State {
    /// The durable view in `store`, as the current one too: what a machine sees after a (re)boot.
    pub fn load(store: Store) -> Result<State> {
        let ns = store.load_namespace()?;
        let mut inodes = HashMap::new();
        inodes.insert(ROOT, Inode::new(Kind::Dir, 0o755));
        // Only what the root reaches is there: an entry in a directory that was itself never
        // durably named is gone with it.
        let mut stack = vec![ROOT];
        let mut reachable: BTreeMap<u64, BTreeMap<String, Entry>> = BTreeMap::new();
        while let Some(dir) = stack.pop() {
            let entries = ns.dirs.get(&dir).cloned().unwrap_or_default();
            for entry in entries.values() {
                if inodes.contains_key(&entry.ino) {
                    continue;
                }
                let mut inode = Inode::new(entry.kind, entry.perm);
                if entry.kind == Kind::Dir {
                    stack.push(entry.ino);
                } else {
                    let len = store.data_len(entry.ino)?;
                    inode.content.size = len;
                    inode.content.synced_size = len;
                }
                inodes.insert(entry.ino, inode);
            }
            reachable.insert(dir, entries);
        }
        let live: HashSet<u64> = inodes.keys().copied().collect();
        store.remove_data_except(&live)?;
        let durable: HashMap<u64, BTreeMap<String, Entry>> = reachable.into_iter().collect();
        let next_ino = live.iter().max().copied().unwrap_or(ROOT).max(ns.next_ino) + 1;
        let state = State {
            store,
            inodes,
            current: durable.clone(),
            durable,
            next_ino,
            dirty_total: 0,
            maybe_unused: HashSet::new(),
            cut: false,
        };
        Ok(state)
    }

    /// The power cut: from now on every operation fails, and nothing unsynced reaches the store.
    pub fn cut(&mut self) {
        self.cut = true;
        self.inodes.clear();
        self.current.clear();
        self.dirty_total = 0;
    }

    /// A clean shutdown: everything current becomes durable, as an unmount or a `sync` would.
    pub fn sync_all(&mut self) -> Result<()> {
        self.live()?;
        let files: Vec<u64> = self
            .inodes
            .iter()
            .filter(|(_, i)| i.kind == Kind::File)
            .map(|(ino, _)| *ino)
            .collect();
        for ino in files {
            self.fsync(ino)?;
        }
        let dirs: Vec<u64> = self.current.keys().copied().collect();
        for dir in dirs {
            self.durable
                .insert(dir, self.current.get(&dir).cloned().unwrap_or_default());
        }
        self.persist_namespace()?;
        self.collect()
    }

    /// Unsynced bytes held now.
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_total
    }

    fn live(&self) -> Result<()> {
        if self.cut { Err(Error::Cut) } else { Ok(()) }
    }

    fn inode(&self, ino: u64) -> Result<&Inode> {
        self.live()?;
        self.inodes.get(&ino).ok_or(Error::NotFound)
    }

    fn inode_mut(&mut self, ino: u64) -> Result<&mut Inode> {
        self.live()?;
        self.inodes.get_mut(&ino).ok_or(Error::NotFound)
    }

    fn dir(&self, ino: u64) -> Result<&BTreeMap<String, Entry>> {
        match self.inode(ino)?.kind {
            Kind::Dir => Ok(self.current.get(&ino).unwrap_or(&EMPTY)),
            Kind::File => Err(Error::NotDir),
        }
    }

    pub fn attr(&self, ino: u64) -> Result<Attr> {
        let inode = self.inode(ino)?;
        Ok(Attr {
            ino,
            kind: inode.kind,
            size: match inode.kind {
                Kind::File => inode.content.size,
                Kind::Dir => 0,
            },
            perm: inode.perm,
            mtime: inode.mtime,
        })
    }

    /// The entry `name` in `parent`; counts a kernel reference when `remember`.
    pub fn lookup(&mut self, parent: u64, name: &str, remember: bool) -> Result<Attr> {
        let ino = self.dir(parent)?.get(name).ok_or(Error::NotFound)?.ino;
        if remember {
            self.inode_mut(ino)?.lookups += 1;
        }
        self.attr(ino)
    }

    pub fn forget(&mut self, ino: u64, n: u64) {
        if let Some(inode) = self.inodes.get_mut(&ino) {
            inode.lookups = inode.lookups.saturating_sub(n);
            self.maybe_unused.insert(ino);
            let _ = self.collect();
        }
    }

    pub fn open(&mut self, ino: u64) -> Result<()> {
        self.inode_mut(ino)?.opens += 1;
        Ok(())
    }

    pub fn release(&mut self, ino: u64) -> Result<()> {
        let inode = self.inode_mut(ino)?;
        inode.opens = inode.opens.saturating_sub(1);
        self.maybe_unused.insert(ino);
        self.collect()
    }

    /// Entries of a directory in name order, with their inode and kind.
    pub fn entries(&self, dir: u64) -> Result<Vec<(String, u64, Kind)>> {
        Ok(self
            .dir(dir)?
            .iter()
            .map(|(name, e)| (name.clone(), e.ino, e.kind))
            .collect())
    }

    /// A new file or directory named `name` in `parent`, counted as looked up (the kernel keeps
    /// the entry it is given).
    pub fn create(&mut self, parent: u64, name: &str, kind: Kind, perm: u16) -> Result<Attr> {
        check_name(name)?;
        if self.dir(parent)?.contains_key(name) {
            return Err(Error::Exists);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let mut inode = Inode::new(kind, perm & 0o7777);
        inode.lookups = 1;
        self.inodes.insert(ino, inode);
        if kind == Kind::Dir {
            self.current.insert(ino, BTreeMap::new());
        }
        self.current.entry(parent).or_default().insert(
            name.to_string(),
            Entry {
                ino,
                kind,
                perm: perm & 0o7777,
            },
        );
        self.touch(parent);
        self.attr(ino)
    }

    /// unlink (`dir` false) or rmdir (`dir` true).
    pub fn remove(&mut self, parent: u64, name: &str, dir: bool) -> Result<()> {
        let entry = *self.dir(parent)?.get(name).ok_or(Error::NotFound)?;
        match (entry.kind, dir) {
            (Kind::Dir, false) => return Err(Error::IsDir),
            (Kind::File, true) => return Err(Error::NotDir),
            (Kind::Dir, true) if !self.dir(entry.ino)?.is_empty() => return Err(Error::NotEmpty),
            _ => {}
        }
        if let Some(d) = self.current.get_mut(&parent) {
            d.remove(name);
        }
        self.touch(parent);
        self.maybe_unused.insert(entry.ino);
        self.collect()
    }

    /// rename(2) without flags, or with RENAME_NOREPLACE (`noreplace`).
    pub fn rename(
        &mut self,
        parent: u64,
        name: &str,
        new_parent: u64,
        new_name: &str,
        noreplace: bool,
    ) -> Result<()> {
        check_name(new_name)?;
        let entry = *self.dir(parent)?.get(name).ok_or(Error::NotFound)?;
        if let Some(old) = self.dir(new_parent)?.get(new_name).copied() {
            if old.ino == entry.ino {
                return Ok(());
            }
            if noreplace {
                return Err(Error::Exists);
            }
            match (entry.kind, old.kind) {
                (Kind::File, Kind::Dir) => return Err(Error::IsDir),
                (Kind::Dir, Kind::File) => return Err(Error::NotDir),
                (Kind::Dir, Kind::Dir) if !self.dir(old.ino)?.is_empty() => {
                    return Err(Error::NotEmpty);
                }
                _ => {}
            }
            self.maybe_unused.insert(old.ino);
        }
        if entry.kind == Kind::Dir && self.is_within(new_parent, entry.ino) {
            return Err(Error::Invalid);
        }
        if let Some(d) = self.current.get_mut(&parent) {
            d.remove(name);
        }
        self.current
            .entry(new_parent)
            .or_default()
            .insert(new_name.to_string(), entry);
        self.touch(parent);
        self.touch(new_parent);
        self.collect()
    }

    /// Whether directory `dir` is `ancestor` or lies below it (a directory cannot move into itself).
    fn is_within(&self, dir: u64, ancestor: u64) -> bool {
        let mut stack = vec![ancestor];
        let mut seen = HashSet::new();
        while let Some(d) = stack.pop() {
            if d == dir {
                return true;
            }
            if !seen.insert(d) {
                continue;
            }
            if let Some(entries) = self.current.get(&d) {
                stack.extend(
                    entries
                        .values()
                        .filter(|e| e.kind == Kind::Dir)
                        .map(|e| e.ino),
                );
            }
        }
        false
    }

    /// chmod: the bits live in the entries that name the inode (as a directory fsync saves them).
    pub fn set_perm(&mut self, ino: u64, perm: u16) -> Result<()> {
        self.inode_mut(ino)?.perm = perm & 0o7777;
        for entry in self.current.values_mut().flat_map(|d| d.values_mut()) {
            if entry.ino == ino {
                entry.perm = perm & 0o7777;
            }
        }
        Ok(())
    }

    fn touch(&mut self, ino: u64) {
        if let Some(inode) = self.inodes.get_mut(&ino) {
            inode.mtime = SystemTime::now();
        }
    }

    /// Reads `len` bytes at `offset` of the current content (short at the end of the file).
    pub fn read(&mut self, ino: u64, offset: u64, len: u32) -> Result<Vec<u8>> {
        self.live()?;
        let store = &self.store;
        let inode = self.inodes.get_mut(&ino).ok_or(Error::NotFound)?;
        if inode.kind == Kind::Dir {
            return Err(Error::IsDir);
        }
        let c = &mut inode.content;
        let end = offset.saturating_add(u64::from(len)).min(c.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; (end - offset) as usize];
        // The durable copy, where it still stands for the current content.
        let durable_end = end.min(c.synced_size).min(c.durable_below);
        if offset < durable_end {
            let file = open_data(store, ino, &mut c.file)?;
            read_exact_at(file, &mut buf[..(durable_end - offset) as usize], offset)?;
        }
        // Then everything written since, over it.
        let first = c
            .dirty
            .range(..offset)
            .next_back()
            .map(|(k, _)| *k)
            .unwrap_or(offset);
        for (&start, data) in c.dirty.range(first..end) {
            let stop = start + data.len() as u64;
            let from = start.max(offset);
            let to = stop.min(end);
            if from < to {
                buf[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&data[(from - start) as usize..(to - start) as usize]);
            }
        }
        Ok(buf)
    }

    /// Writes `data` at `offset` into the current content only.
    pub fn write(&mut self, ino: u64, offset: u64, data: &[u8]) -> Result<()> {
        let inode = self.inode_mut(ino)?;
        if inode.kind == Kind::Dir {
            return Err(Error::IsDir);
        }
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or(Error::Invalid)?;
        if data.is_empty() {
            return Ok(());
        }
        let c = &mut inode.content;
        let before = c.dirty_bytes;
        cut_out(&mut c.dirty, offset, end, &mut c.dirty_bytes);
        // Appending to the extent that ends here keeps sequential writers at one extent.
        let joined = match c.dirty.range_mut(..offset).next_back() {
            Some((&start, prev)) if start + prev.len() as u64 == offset => {
                prev.extend_from_slice(data);
                true
            }
            _ => false,
        };
        if !joined {
            c.dirty.insert(offset, data.to_vec());
        }
        c.dirty_bytes += data.len() as u64;
        c.size = c.size.max(end);
        let after = c.dirty_bytes;
        inode.mtime = SystemTime::now();
        self.dirty_total = self.dirty_total - before + after;
        self.bound_dirty()
    }

    /// Truncates or extends the current content to `size`.
    pub fn set_size(&mut self, ino: u64, size: u64) -> Result<()> {
        let inode = self.inode_mut(ino)?;
        if inode.kind == Kind::Dir {
            return Err(Error::IsDir);
        }
        let c = &mut inode.content;
        let before = c.dirty_bytes;
        if size < c.size {
            cut_out(&mut c.dirty, size, u64::MAX, &mut c.dirty_bytes);
            c.durable_below = c.durable_below.min(size);
        }
        c.size = size;
        let after = c.dirty_bytes;
        inode.mtime = SystemTime::now();
        self.dirty_total = self.dirty_total - before + after;
        Ok(())
    }

    /// fsync / fdatasync of a file: its current content becomes its durable content. A directory's
    /// fsync is [`State::fsync_dir`].
    pub fn fsync(&mut self, ino: u64) -> Result<()> {
        self.live()?;
        let store = &self.store;
        let inode = self.inodes.get_mut(&ino).ok_or(Error::NotFound)?;
        if inode.kind == Kind::Dir {
            return Ok(());
        }
        let c = &mut inode.content;
        let unchanged = c.dirty.is_empty() && c.size == c.synced_size && c.durable_below >= c.size;
        if unchanged {
            return Ok(());
        }
        let file = open_data(store, ino, &mut c.file)?;
        if c.durable_below < c.synced_size {
            file.set_len(c.durable_below)?;
        }
        for (&start, data) in &c.dirty {
            file.write_all_at(data, start)?;
        }
        file.set_len(c.size)?;
        c.synced_size = c.size;
        c.durable_below = u64::MAX;
        self.dirty_total -= c.dirty_bytes;
        c.dirty.clear();
        c.dirty_bytes = 0;
        Ok(())
    }

    /// fsync of a directory: its current entries become its durable entries. Nothing else does:
    /// the files it names keep their own durable content, and a directory below it that was never
    /// synced durably stays empty.
    pub fn fsync_dir(&mut self, ino: u64) -> Result<()> {
        let entries = self.dir(ino)?.clone();
        let old = self.durable.insert(ino, entries);
        if let Some(old) = old {
            self.maybe_unused.extend(old.values().map(|e| e.ino));
        }
        self.persist_namespace()?;
        self.collect()
    }

    fn persist_namespace(&self) -> Result<()> {
        let ns = Namespace {
            next_ino: self.next_ino,
            dirs: self.durable.iter().map(|(k, v)| (*k, v.clone())).collect(),
        };
        self.store.save_namespace(&ns)?;
        Ok(())
    }

    /// Past [`DIRTY_LIMIT`], writes back the file holding the most unsynced data.
    fn bound_dirty(&mut self) -> Result<()> {
        while self.dirty_total > DIRTY_LIMIT {
            let Some(ino) = self
                .inodes
                .iter()
                .filter(|(_, i)| i.content.dirty_bytes > 0)
                .max_by_key(|(_, i)| i.content.dirty_bytes)
                .map(|(ino, _)| *ino)
            else {
                debug_assert!(false, "dirty_total counts bytes no inode holds");
                break;
            };
            tracing::debug!(ino, "unsynced data over the bound: written back");
            self.fsync(ino)?;
        }
        Ok(())
    }

    /// Drops inodes nothing refers to: no name in either view, no kernel reference, no open handle.
    /// A file still named by the durable view keeps its durable copy (a power cut brings it back)
    /// but not its unsynced data once no current name or handle can reach it.
    fn collect(&mut self) -> Result<()> {
        if self.maybe_unused.is_empty() || self.cut {
            return Ok(());
        }
        let named_now: HashSet<u64> = self
            .current
            .values()
            .flat_map(|d| d.values().map(|e| e.ino))
            .chain([ROOT])
            .collect();
        let named_durably: HashSet<u64> = self
            .durable
            .values()
            .flat_map(|d| d.values().map(|e| e.ino))
            .collect();
        for ino in std::mem::take(&mut self.maybe_unused) {
            let Some(inode) = self.inodes.get(&ino) else {
                continue;
            };
            if inode.lookups > 0 || inode.opens > 0 || named_now.contains(&ino) {
                continue;
            }
            if named_durably.contains(&ino) {
                // Unreachable now, but not after a power cut: keep the durable copy only.
                if let Some(inode) = self.inodes.get_mut(&ino) {
                    self.dirty_total -= inode.content.dirty_bytes;
                    inode.content = Content {
                        size: inode.content.synced_size,
                        synced_size: inode.content.synced_size,
                        durable_below: u64::MAX,
                        ..Content::default()
                    };
                }
                continue;
            }
            if let Some(inode) = self.inodes.remove(&ino) {
                self.dirty_total -= inode.content.dirty_bytes;
                if inode.kind == Kind::Dir {
                    self.current.remove(&ino);
                } else {
                    self.store.remove_data(ino)?;
                }
            }
        }
        Ok(())
    }
}

static EMPTY: BTreeMap<String, Entry> = BTreeMap::new();

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(Error::Invalid);
    }
    if name.len() > NAME_MAX {
        return Err(Error::NameTooLong);
    }
    Ok(())
}

/// The longest name a directory entry may have, as on ext4.
pub const NAME_MAX: usize = 255;

/// Removes `[from, to)` from the extents, splitting any that straddle an end.
fn cut_out(dirty: &mut BTreeMap<u64, Vec<u8>>, from: u64, to: u64, bytes: &mut u64) {
    let first = dirty
        .range(..from)
        .next_back()
        .filter(|(s, d)| *s + d.len() as u64 > from)
        .map(|(s, _)| *s)
        .unwrap_or(from);
    let hit: Vec<u64> = dirty.range(first..to).map(|(k, _)| *k).collect();
    for start in hit {
        let Some(data) = dirty.remove(&start) else {
            continue;
        };
        *bytes -= data.len() as u64;
        let stop = start + data.len() as u64;
        if start < from {
            let left = data[..(from - start) as usize].to_vec();
            *bytes += left.len() as u64;
            dirty.insert(start, left);
        }
        if stop > to {
            let right = data[(to - start) as usize..].to_vec();
            *bytes += right.len() as u64;
            dirty.insert(to, right);
        }
    }
}

fn open_data<'a>(store: &Store, ino: u64, slot: &'a mut Option<File>) -> io::Result<&'a File> {
    if slot.is_none() {
        *slot = Some(store.open_data(ino)?);
    }
    slot.as_ref()
        .ok_or_else(|| io::Error::other("data file not open"))
}

fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, offset)? {
            // The durable copy is shorter than recorded (someone changed the store): zeros.
            0 => {
                buf.fill(0);
                return Ok(());
            }
            n => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn fresh(dir: &std::path::Path) -> State {
        State::load(Store::open(dir).unwrap()).unwrap()
    }

    /// The state a reboot would find: everything in memory forgotten, the store loaded again.
    fn reboot(state: &mut State, dir: &std::path::Path) {
        state.cut();
        *state = fresh(dir);
    }

    fn content(state: &mut State, ino: u64) -> Vec<u8> {
        let size = state.attr(ino).unwrap().size;
        state.read(ino, 0, size as u32).unwrap()
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, Vec<u8>),
        SetSize(u64),
        Fsync,
        Cut,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..3000, proptest::collection::vec(any::<u8>(), 0..700))
                .prop_map(|(o, d)| Op::Write(o, d)),
            1 => (0u64..3500).prop_map(Op::SetSize),
            1 => Just(Op::Fsync),
            1 => Just(Op::Cut),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Against a model of two byte vectors: what reads see is every write and truncation so
        /// far; what a reboot brings back is the content at the last fsync.
        #[test]
        fn a_file_reads_its_writes_and_a_cut_goes_back_to_the_last_fsync(
            ops in proptest::collection::vec(op(), 1..40)
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut state = fresh(dir.path());
            let ino = state.create(ROOT, "f", Kind::File, 0o644).unwrap().ino;
            state.fsync_dir(ROOT).unwrap();
            let (mut current, mut durable) = (Vec::new(), Vec::new());
            for op in ops {
                match op {
                    Op::Write(off, data) => {
                        state.write(ino, off, &data).unwrap();
                        if !data.is_empty() {
                            let end = off as usize + data.len();
                            if current.len() < end {
                                current.resize(end, 0);
                            }
                            current[off as usize..end].copy_from_slice(&data);
                        }
                    }
                    Op::SetSize(n) => {
                        state.set_size(ino, n).unwrap();
                        current.resize(n as usize, 0);
                    }
                    Op::Fsync => {
                        state.fsync(ino).unwrap();
                        durable = current.clone();
                    }
                    Op::Cut => {
                        reboot(&mut state, dir.path());
                        current = durable.clone();
                    }
                }
                prop_assert_eq!(content(&mut state, ino), current.clone());
                // A read anywhere inside agrees with the model too.
                let from = current.len() / 3;
                let got = state.read(ino, from as u64, 100).unwrap();
                let want = &current[from..current.len().min(from + 100)];
                prop_assert_eq!(&got[..], want);
            }
            let dirty: u64 = state.inodes.values().map(|i| i.content.dirty_bytes).sum();
            prop_assert_eq!(state.dirty_bytes(), dirty);
        }
    }

    #[test]
    fn a_name_is_durable_only_after_its_directory_is_synced() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = fresh(dir.path());
        let a = state.create(ROOT, "a", Kind::File, 0o644).unwrap().ino;
        state.write(a, 0, b"synced data").unwrap();
        state.fsync(a).unwrap();
        reboot(&mut state, dir.path());
        assert!(matches!(
            state.lookup(ROOT, "a", false),
            Err(Error::NotFound)
        ));

        let a = state.create(ROOT, "a", Kind::File, 0o644).unwrap().ino;
        state.write(a, 0, b"old").unwrap();
        state.fsync(a).unwrap();
        state.fsync_dir(ROOT).unwrap();
        // A rename over it, the new file synced, the directory not: the old file comes back.
        let tmp = state.create(ROOT, "a.tmp", Kind::File, 0o644).unwrap().ino;
        state.write(tmp, 0, b"new").unwrap();
        state.fsync(tmp).unwrap();
        state.rename(ROOT, "a.tmp", ROOT, "a", false).unwrap();
        state.remove(ROOT, "gone", false).unwrap_err();
        let now = state.lookup(ROOT, "a", false).unwrap().ino;
        assert_eq!(content(&mut state, now), b"new");
        reboot(&mut state, dir.path());
        let back = state.lookup(ROOT, "a", false).unwrap().ino;
        assert_eq!(content(&mut state, back), b"old");
        assert!(state.lookup(ROOT, "a.tmp", false).is_err());

        // Synced, the rename stays, and the replaced file's durable copy is collected.
        let tmp = state.create(ROOT, "a.tmp", Kind::File, 0o644).unwrap().ino;
        state.write(tmp, 0, b"new").unwrap();
        state.fsync(tmp).unwrap();
        state.rename(ROOT, "a.tmp", ROOT, "a", false).unwrap();
        state.fsync_dir(ROOT).unwrap();
        reboot(&mut state, dir.path());
        let back = state.lookup(ROOT, "a", false).unwrap().ino;
        assert_eq!(content(&mut state, back), b"new");
        let files = std::fs::read_dir(dir.path().join("data")).unwrap().count();
        assert_eq!(files, 1, "only the live file's durable copy is left");
    }

    #[test]
    fn an_unsynced_unlink_and_a_directory_below_an_unsynced_one_are_undone() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = fresh(dir.path());
        let f = state.create(ROOT, "f", Kind::File, 0o644).unwrap().ino;
        state.write(f, 0, b"kept").unwrap();
        state.fsync(f).unwrap();
        let d = state.create(ROOT, "d", Kind::Dir, 0o755).unwrap().ino;
        state.fsync_dir(ROOT).unwrap();
        // d/e/x with d and e synced, but e's entry in d is durable only through d's fsync.
        let e = state.create(d, "e", Kind::Dir, 0o755).unwrap().ino;
        let x = state.create(e, "x", Kind::File, 0o644).unwrap().ino;
        state.fsync(x).unwrap();
        state.fsync_dir(e).unwrap();
        state.remove(ROOT, "f", false).unwrap();
        reboot(&mut state, dir.path());
        let f = state.lookup(ROOT, "f", false).unwrap().ino;
        assert_eq!(content(&mut state, f), b"kept");
        let d = state.lookup(ROOT, "d", false).unwrap().ino;
        assert!(
            state.entries(d).unwrap().is_empty(),
            "e was never named durably"
        );
        // A non-empty directory is not removed, and not moved into itself.
        let e = state.create(d, "e", Kind::Dir, 0o755).unwrap().ino;
        state.create(e, "x", Kind::File, 0o644).unwrap();
        assert!(matches!(state.remove(d, "e", true), Err(Error::NotEmpty)));
        assert!(matches!(
            state.rename(ROOT, "d", e, "d2", false),
            Err(Error::Invalid)
        ));
    }

    #[test]
    fn unsynced_data_over_the_bound_is_written_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = fresh(dir.path());
        let f = state.create(ROOT, "f", Kind::File, 0o644).unwrap().ino;
        let chunk = vec![7u8; 16 << 20];
        for i in 0..(DIRTY_LIMIT / chunk.len() as u64 + 2) {
            state.write(f, i * chunk.len() as u64, &chunk).unwrap();
            assert!(state.dirty_bytes() <= DIRTY_LIMIT);
        }
    }

    #[test]
    fn after_a_cut_every_operation_fails() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = fresh(dir.path());
        let f = state.create(ROOT, "f", Kind::File, 0o644).unwrap().ino;
        state.cut();
        assert!(matches!(state.write(f, 0, b"x"), Err(Error::Cut)));
        assert!(matches!(state.fsync(f), Err(Error::Cut)));
        assert!(matches!(state.fsync_dir(ROOT), Err(Error::Cut)));
        assert!(matches!(state.read(f, 0, 1), Err(Error::Cut)));
    }
}
