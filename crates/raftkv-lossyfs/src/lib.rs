//! raftkv-lossyfs: a FUSE filesystem that loses what was not fsynced, for the fault harness's
//! power-loss fault.
//!
//! A SIGKILL loses nothing the process wrote: the kernel keeps its page cache. A power cut loses
//! everything not fsynced, and that is where replicated stores lose acknowledged writes (Jepsen's
//! lazyfs found etcd#14140 this way). This filesystem holds every write, truncation and directory
//! change in memory until the fsync that makes it durable, and a power cut forgets them.
//!
//! - [`state`]: what is current, what is durable, and what an fsync moves between them.
//! - [`store`]: the durable view on a real directory, and `export` of it as an ordinary tree.
//! - [`fs`]: the FUSE requests, answered from the state.
//! - [`mount`]: a mounted store, the power cut, the clean unmount.

pub mod fs;
pub mod mount;
pub mod state;
pub mod store;

pub use mount::{Mount, MountError, available, available_for};
pub use store::export;
