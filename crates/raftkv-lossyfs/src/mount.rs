//! A mounted filesystem and the harness's controls over it: the power cut and the clean unmount.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::fs::LossyFs;
use crate::state::State;
use crate::store::Store;

/// How long an unmount waits for the kernel to let go of the old mount before it stops waiting.
const RELEASE_WAIT: Duration = Duration::from_secs(10);

/// Why a mount could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("FUSE is not available here: {0}")]
    Unavailable(String),
    #[error("loading the store in {path}: {source}")]
    Store {
        path: PathBuf,
        source: crate::state::Error,
    },
    #[error("mounting on {path}: {source}")]
    Mount { path: PathBuf, source: io::Error },
}

/// Whether this process can mount: root, and a `/dev/fuse` it can open. The reason when not, for a
/// test to print before it skips.
pub fn available() -> Result<(), String> {
    if !rustix::process::geteuid().is_root() {
        return Err("mounting FUSE needs root (the pure-Rust mount calls mount(2))".into());
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map(|_| ())
        .map_err(|e| format!("/dev/fuse: {e}"))
}

/// For tests that need a mount: whether one can be made here. When not, the test prints
/// `SKIPPED <test>: <why>` and should return; with `RAFTKV_REQUIRE_FUSE=1` (which `scripts/test.sh`
/// sets wherever mounting works) this panics instead, so a machine that can run the test never
/// skips it.
pub fn available_for(test: &str) -> bool {
    match available() {
        Ok(()) => true,
        Err(why) => {
            assert!(
                std::env::var("RAFTKV_REQUIRE_FUSE").as_deref() != Ok("1"),
                "RAFTKV_REQUIRE_FUSE=1 but {why}"
            );
            println!("SKIPPED {test}: {why}");
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}

/// One mount of a store. Dropping it unmounts cleanly (everything becomes durable, as at an
/// orderly shutdown); [`Mount::power_cut`] is the other way to end it.
pub struct Mount {
    state: Arc<Mutex<State>>,
    session: Option<Session>,
    mountpoint: PathBuf,
}

/// The thread serving the mount, and the handle that unmounts it. fuser's own handle unmounts
/// again when dropped, which after a lazy unmount could hit a newer mount on the same path; holding
/// the unmounter ourselves means the mount is unmounted exactly once, here.
struct Session {
    thread: std::thread::JoinHandle<io::Result<()>>,
    unmounter: fuser::SessionUnmounter,
}

impl Mount {
    /// Mounts the durable view in `store` (a directory, made if missing) on `mountpoint` (an
    /// existing directory).
    pub fn new(store: &Path, mountpoint: &Path) -> Result<Mount, MountError> {
        available().map_err(MountError::Unavailable)?;
        let loaded = Store::open(store)
            .map_err(crate::state::Error::from)
            .and_then(State::load)
            .map_err(|source| MountError::Store {
                path: store.to_path_buf(),
                source,
            })?;
        let state = Arc::new(Mutex::new(loaded));
        let fs = LossyFs::new(state.clone(), store.to_path_buf());
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("raftkv-lossyfs".into()),
            fuser::MountOption::Subtype("lossyfs".into()),
        ];
        let mount_error = |source| MountError::Mount {
            path: mountpoint.to_path_buf(),
            source,
        };
        let mut session = fuser::Session::new(fs, mountpoint, &config).map_err(mount_error)?;
        let unmounter = session.unmount_callable();
        let thread = std::thread::Builder::new()
            .name("lossyfs".into())
            .spawn(move || session.run())
            .map_err(mount_error)?;
        Ok(Mount {
            state,
            session: Some(Session { thread, unmounter }),
            mountpoint: mountpoint.to_path_buf(),
        })
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Bytes written and not yet fsynced: what a power cut now would lose.
    pub fn unsynced_bytes(&self) -> u64 {
        self.lock().dirty_bytes()
    }

    /// The power cut: everything not fsynced is gone, and every request from here on fails with
    /// EIO until the mount is gone. Stop (SIGSTOP) the processes using it first, so the cut falls
    /// at one instant for them, and kill them before the next mount.
    pub fn cut(&self) {
        self.lock().cut();
    }

    /// [`Mount::cut`], then unmounts. Returns the bytes the cut lost.
    pub fn power_cut(mut self) -> io::Result<u64> {
        let lost = self.unsynced_bytes();
        self.cut();
        // Nothing is left to wait for: the state is gone, and a copy of the mount in another
        // mount namespace (a node started under `ip netns exec` holds one of every mount made
        // before it started) keeps the old session alive until that namespace ends.
        self.release(false)?;
        Ok(lost)
    }

    /// An orderly unmount: everything written becomes durable first.
    pub fn unmount(mut self) -> io::Result<()> {
        let synced = self.lock().sync_all();
        self.release(true)?;
        synced.map_err(io::Error::other)
    }

    /// Serves until the mount is unmounted from outside (`umount`), which counts as orderly.
    pub fn wait(mut self) -> io::Result<()> {
        if let Some(session) = self.session.take() {
            session
                .thread
                .join()
                .map_err(|_| io::Error::other("the lossyfs thread panicked"))??;
        }
        self.lock().sync_all().map_err(io::Error::other)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Unmounts and, with `wait`, waits (bounded) for the serving thread to end. A mount still busy
    /// (a process that has not let go of a file) is detached instead, and goes when the last file
    /// closes.
    fn release(&mut self, wait: bool) -> io::Result<()> {
        let Some(mut session) = self.session.take() else {
            return Ok(());
        };
        if let Err(e) = session.unmounter.unmount() {
            tracing::debug!(mountpoint = %self.mountpoint.display(), error = %e, "lossyfs: unmount failed; detaching");
            rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::DETACH)
                .map_err(io::Error::from)?;
        }
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done_tx.send(session.thread.join());
        });
        if !wait {
            return Ok(());
        }
        match done_rx.recv_timeout(RELEASE_WAIT) {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(io::Error::other("the lossyfs thread panicked")),
            Err(_) => {
                tracing::warn!(mountpoint = %self.mountpoint.display(), "lossyfs: a detached mount is still in use; not waiting for it");
                Ok(())
            }
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.session.is_some() {
            let synced = self.lock().sync_all();
            if let Err(e) = synced.map_err(io::Error::other).and(self.release(true)) {
                tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e, "lossyfs: unmount failed");
            }
        }
    }
}
