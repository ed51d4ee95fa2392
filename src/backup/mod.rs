//! Backups: consistent copies of a cluster's state taken while it serves, and new clusters made from
//! them (etcd's `snapshot save` and `etcdutl snapshot restore`).
//!
//! - [`format`]: the backup file, a header that says what it is and a checksummed image;
//! - [`export`]: taking one on a running node, at a read index the leader confirmed;
//! - [`save`]: the client writing a `Maintenance.Snapshot` stream to a file;
//! - [`restore`]: a data directory for a member of a new cluster, from a file;
//! - [`schedule`]: the leader's own backups every `--backup-interval`.
//!
//! Not to be confused with Raft snapshots (`store::snapshot`), which a node takes to purge its log
//! and sends to catch up a follower: a backup uses the same image, but belongs to nobody's log and
//! carries the cluster's identity in its header.

pub mod export;
pub mod format;
pub mod restore;
pub mod save;
pub mod schedule;
