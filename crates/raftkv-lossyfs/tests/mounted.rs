//! The filesystem through the kernel: real mounts, real system calls, a power cut and a remount.
//!
//! Mounting needs root and `/dev/fuse`. Without them each test says so and passes without testing;
//! `RAFTKV_REQUIRE_FUSE=1` (set by `scripts/test.sh` wherever mounting is possible) makes that a
//! failure instead, so a machine that can run them never skips them.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use raftkv_lossyfs::Mount;

/// Fields drop in order: the mount goes before the temporary directory it lives in.
struct Disk {
    mount: Option<Mount>,
    store: PathBuf,
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl Disk {
    /// A fresh store mounted on a fresh directory, or `None` (after saying why) where FUSE cannot
    /// be mounted.
    fn new(test: &str) -> Option<Disk> {
        if !raftkv_lossyfs::available_for(test) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let mount = Mount::new(&store, &mnt).unwrap();
        Some(Disk {
            _dir: dir,
            store,
            mnt,
            mount: Some(mount),
        })
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// Loses everything not fsynced, and mounts what survived.
    fn power_cut(&mut self) {
        if let Some(m) = self.mount.take() {
            m.power_cut().unwrap();
        }
        self.mount = Some(Mount::new(&self.store, &self.mnt).unwrap());
    }

    /// An orderly unmount and a mount again.
    fn remount(&mut self) {
        if let Some(m) = self.mount.take() {
            m.unmount().unwrap();
        }
        self.mount = Some(Mount::new(&self.store, &self.mnt).unwrap());
    }
}

fn sync_dir(path: &Path) {
    File::open(path).unwrap().sync_all().unwrap();
}

fn read(path: &Path) -> Option<Vec<u8>> {
    match fs::read(path) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("reading {}: {e}", path.display()),
    }
}

#[test]
fn fsynced_data_survives_a_power_cut_and_unsynced_data_does_not() {
    let Some(mut disk) = Disk::new("fsynced_data_survives") else {
        return;
    };
    let mut f = File::create(disk.path("f")).unwrap();
    f.write_all(b"durable").unwrap();
    f.sync_data().unwrap();
    f.write_all(b" and not").unwrap();
    drop(f);
    // Never synced at all, data or name.
    fs::write(disk.path("g"), b"gone").unwrap();
    sync_dir(&disk.mnt);
    fs::write(disk.path("h"), b"name not synced").unwrap();
    assert_eq!(read(&disk.path("f")).unwrap(), b"durable and not");
    assert!(disk.mount.as_ref().unwrap().unsynced_bytes() > 0);

    disk.power_cut();
    assert_eq!(read(&disk.path("f")).unwrap(), b"durable");
    // g's name was synced with the directory, its data never: an empty file, as on ext4.
    assert_eq!(read(&disk.path("g")).unwrap(), b"");
    assert_eq!(read(&disk.path("h")), None);
}

#[test]
fn a_rename_is_undone_unless_its_directory_is_synced() {
    let Some(mut disk) = Disk::new("a_rename_is_undone") else {
        return;
    };
    fs::create_dir(disk.path("d")).unwrap();
    sync_dir(&disk.mnt);
    for (name, body) in [("d/cur", "old"), ("d/next", "new")] {
        let mut f = File::create(disk.path(name)).unwrap();
        f.write_all(body.as_bytes()).unwrap();
        f.sync_all().unwrap();
    }
    sync_dir(&disk.path("d"));
    fs::rename(disk.path("d/next"), disk.path("d/cur")).unwrap();
    assert_eq!(read(&disk.path("d/cur")).unwrap(), b"new");
    disk.power_cut();
    assert_eq!(read(&disk.path("d/cur")).unwrap(), b"old");
    assert_eq!(read(&disk.path("d/next")).unwrap(), b"new");

    fs::rename(disk.path("d/next"), disk.path("d/cur")).unwrap();
    sync_dir(&disk.path("d"));
    disk.power_cut();
    assert_eq!(read(&disk.path("d/cur")).unwrap(), b"new");
    assert_eq!(read(&disk.path("d/next")), None);
    // An unlink not synced is undone too.
    fs::remove_file(disk.path("d/cur")).unwrap();
    disk.power_cut();
    assert_eq!(read(&disk.path("d/cur")).unwrap(), b"new");
}

#[test]
fn truncation_and_holes_read_as_posix_says() {
    let Some(mut disk) = Disk::new("truncation_and_holes") else {
        return;
    };
    let path = disk.path("t");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    sync_dir(&disk.mnt);
    f.write_all_at(&[1u8; 8192], 0).unwrap();
    f.sync_all().unwrap();
    // Shrink, then grow past the old end: the cut-off bytes read as zeros, not as the old data.
    f.set_len(100).unwrap();
    f.write_all_at(b"end", 10_000).unwrap();
    let mut buf = vec![0u8; 10_003];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf[..100].iter().all(|&b| b == 1));
    assert!(
        buf[100..10_000].iter().all(|&b| b == 0),
        "a hole reads as zeros"
    );
    assert_eq!(&buf[10_000..], b"end");
    assert_eq!(f.metadata().unwrap().len(), 10_003);
    drop(f);
    disk.power_cut();
    // The truncation was never synced: the old content is back whole.
    let back = read(&path).unwrap();
    assert_eq!(back, vec![1u8; 8192]);

    // Synced, it stays: O_TRUNC reaches the filesystem as a truncation.
    let mut f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.write_all(b"short").unwrap();
    f.sync_all().unwrap();
    drop(f);
    disk.power_cut();
    assert_eq!(read(&path).unwrap(), b"short");
    // Appends land at the end the kernel knows.
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(b"+more").unwrap();
    drop(f);
    assert_eq!(read(&path).unwrap(), b"short+more");
}

#[test]
fn an_orderly_unmount_keeps_everything() {
    let Some(mut disk) = Disk::new("an_orderly_unmount") else {
        return;
    };
    fs::create_dir_all(disk.path("a/b")).unwrap();
    fs::write(disk.path("a/b/c"), b"kept").unwrap();
    disk.remount();
    assert_eq!(read(&disk.path("a/b/c")).unwrap(), b"kept");
    // And the store reads back as an ordinary tree.
    disk.mount.take().unwrap().unmount().unwrap();
    let out = tempfile::tempdir().unwrap();
    raftkv_lossyfs::export(&disk.store, out.path()).unwrap();
    let mut s = String::new();
    File::open(out.path().join("a/b/c"))
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    assert_eq!(s, "kept");
}

#[test]
fn sled_runs_on_it_and_keeps_what_it_fsynced() {
    let Some(mut disk) = Disk::new("sled_runs_on_it") else {
        return;
    };
    let path = disk.path("db");
    {
        let db = sled::Config::new()
            .path(&path)
            .flush_every_ms(None)
            .open()
            .unwrap();
        for i in 0u32..2000 {
            db.insert(i.to_be_bytes(), vec![7u8; 100 + (i % 300) as usize])
                .unwrap();
        }
        // A value large enough to go to a blob file.
        db.insert(b"big", vec![9u8; 4 << 20]).unwrap();
        db.flush().unwrap();
        // sled's flush ends in sync_file_range, which never reaches a filesystem: the fsyncs that
        // make it durable are the caller's (raftkv's store::durable does the same).
        for f in ["db", "conf"] {
            File::open(path.join(f)).unwrap().sync_all().unwrap();
        }
        for entry in fs::read_dir(path.join("blobs")).unwrap() {
            File::open(entry.unwrap().path())
                .unwrap()
                .sync_all()
                .unwrap();
        }
        sync_dir(&path.join("blobs"));
        sync_dir(&path);
        sync_dir(&disk.mnt);
        db.insert(b"after", b"unsynced".to_vec()).unwrap();
        // The power goes before sled closes: its closing flush finds nothing to write to. (A file
        // left open on the mount past the end of this process would hang its exit: the kernel
        // would ask this process's own, dead, filesystem thread to flush it.)
        disk.mount.as_ref().unwrap().cut();
        drop(db);
    }
    disk.power_cut();
    let db = sled::Config::new().path(&path).open().unwrap();
    assert_eq!(db.len(), 2001);
    assert_eq!(db.get(b"big").unwrap().unwrap().len(), 4 << 20);
    assert_eq!(db.get(b"after").unwrap(), None);
}
