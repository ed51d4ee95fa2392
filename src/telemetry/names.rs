//! Every metric a node exports, by name, and the help text a scrape carries for it.
//!
//! docs/alerts.yml names these; a test checks that every name it uses is exported.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// 1 while this node knows a leader (itself included), else 0.
pub const HAS_LEADER: &str = "raftkv_server_has_leader";
/// 1 while this node leads.
pub const IS_LEADER: &str = "raftkv_server_is_leader";
/// 1 while this node is a learner (a member that does not vote).
pub const IS_LEARNER: &str = "raftkv_server_is_learner";
/// The Raft term this node is in.
pub const TERM: &str = "raftkv_server_term";
/// How many times this node has seen the leader change since it started.
pub const LEADER_CHANGES: &str = "raftkv_server_leader_changes_seen_total";
/// The index of the last log entry this node knows to be committed.
pub const PROPOSALS_COMMITTED: &str = "raftkv_server_proposals_committed_total";
/// The index of the last log entry this node has applied.
pub const PROPOSALS_APPLIED: &str = "raftkv_server_proposals_applied_total";
/// Writes proposed on this leader and not yet answered.
pub const PROPOSALS_PENDING: &str = "raftkv_server_proposals_pending";
/// Writes this leader proposed that failed or whose outcome it could not learn in time.
pub const PROPOSALS_FAILED: &str = "raftkv_server_proposals_failed_total";
/// 1 while this node passes its readiness check (`/readyz`, the `raftkv.v1.KV` health status).
pub const READY: &str = "raftkv_server_ready";
/// Always 1, labelled with the node's id, cluster id and version.
pub const INFO: &str = "raftkv_server_info";
/// How long each fsync of the Raft log took.
pub const LOG_FSYNC: &str = "raftkv_disk_log_fsync_duration_seconds";
/// How long applying each batch of committed entries to the state machine took.
pub const APPLY: &str = "raftkv_disk_apply_duration_seconds";
/// From sending an append to a peer to its answer, labelled `to`: a network round trip plus the
/// peer's own fsync.
pub const PEER_RTT: &str = "raftkv_network_peer_round_trip_time_seconds";
/// Requests to a peer that failed or went unanswered, labelled `to`.
pub const PEER_SENT_FAILURES: &str = "raftkv_network_peer_sent_failures_total";
/// Bytes the state machine's database (sled) takes on disk.
pub const DB_SIZE: &str = "raftkv_storage_db_size_bytes";
/// Bytes the Raft log takes on disk.
pub const LOG_SIZE: &str = "raftkv_storage_log_size_bytes";
/// Bytes the snapshot files take on disk.
pub const SNAPSHOT_SIZE: &str = "raftkv_snapshot_size_bytes";
/// Size of the filesystem holding the data directory.
pub const FS_SIZE: &str = "raftkv_storage_fs_size_bytes";
/// Bytes still free for this process on the filesystem holding the data directory.
pub const FS_AVAILABLE: &str = "raftkv_storage_fs_available_bytes";
/// The last log index the latest snapshot covers.
pub const SNAPSHOT_INDEX: &str = "raftkv_snapshot_last_index";
/// The log index up to which the log has been purged behind a snapshot.
pub const PURGED_INDEX: &str = "raftkv_snapshot_purged_index";
/// When this node last wrote a scheduled backup (Unix seconds); exported only with `--backup-dir`,
/// 0 until the first one.
pub const BACKUP_LAST_SUCCESS: &str = "raftkv_backup_last_success_timestamp_seconds";
/// The `--backup-interval`, so an alert can say "older than two intervals" without knowing it.
pub const BACKUP_INTERVAL: &str = "raftkv_backup_interval_seconds";
/// Scheduled backups that failed.
pub const BACKUP_FAILURES: &str = "raftkv_backup_failures_total";
/// Leases this replica holds (granted, not yet ended).
pub const LEASES: &str = "raftkv_lease_active";
/// Keep-alives this node answered as the leader that extended a lease.
pub const LEASE_RENEWED: &str = "raftkv_lease_renewed_total";
/// Leases this node, as the leader, ended because their TTL passed.
pub const LEASE_EXPIRED: &str = "raftkv_lease_expired_total";
/// Watch streams this node serves now.
pub const WATCHES: &str = "raftkv_watch_streams";
/// Public gRPC calls answered, labelled `grpc_service`, `grpc_method`, `grpc_code`.
pub const GRPC_HANDLED: &str = "grpc_server_handled_total";
/// Public gRPC calls started, labelled `grpc_service`, `grpc_method`.
pub const GRPC_STARTED: &str = "grpc_server_started_total";
/// How long public gRPC calls took to answer (to the response headers for a stream).
pub const GRPC_HANDLING: &str = "grpc_server_handling_seconds";

/// Gives every metric its help text and unit, once the recorder is installed.
pub(super) fn describe() {
    describe_gauge!(
        HAS_LEADER,
        "Whether this node knows a leader (1) or not (0)."
    );
    describe_gauge!(IS_LEADER, "Whether this node is the leader (1) or not (0).");
    describe_gauge!(IS_LEARNER, "Whether this node is a learner (1) or not (0).");
    describe_gauge!(TERM, "The Raft term this node is in.");
    describe_counter!(
        LEADER_CHANGES,
        "Leader changes this node has seen since it started."
    );
    describe_counter!(
        PROPOSALS_COMMITTED,
        "The last log index this node knows to be committed."
    );
    describe_counter!(PROPOSALS_APPLIED, "The last log index this node applied.");
    describe_gauge!(
        PROPOSALS_PENDING,
        "Writes proposed on this leader and not yet answered."
    );
    describe_counter!(
        PROPOSALS_FAILED,
        "Writes proposed on this leader that failed or timed out."
    );
    describe_gauge!(READY, "Whether this node passes its readiness check.");
    describe_gauge!(INFO, "This node's id, cluster id and version, as labels.");
    describe_histogram!(LOG_FSYNC, Unit::Seconds, "Raft log fsync duration.");
    describe_histogram!(
        APPLY,
        Unit::Seconds,
        "Time to apply one batch of committed entries."
    );
    describe_histogram!(
        PEER_RTT,
        Unit::Seconds,
        "Time from sending an append to a peer to its answer."
    );
    describe_counter!(
        PEER_SENT_FAILURES,
        "Requests to a peer that failed or went unanswered."
    );
    describe_gauge!(DB_SIZE, Unit::Bytes, "State machine database size on disk.");
    describe_gauge!(LOG_SIZE, Unit::Bytes, "Raft log size on disk.");
    describe_gauge!(SNAPSHOT_SIZE, Unit::Bytes, "Snapshot files' size on disk.");
    describe_gauge!(
        FS_SIZE,
        Unit::Bytes,
        "Size of the data directory's filesystem."
    );
    describe_gauge!(
        FS_AVAILABLE,
        Unit::Bytes,
        "Free bytes on the data directory's filesystem."
    );
    describe_gauge!(SNAPSHOT_INDEX, "Last log index the latest snapshot covers.");
    describe_gauge!(PURGED_INDEX, "Log index the log is purged up to.");
    describe_gauge!(
        BACKUP_LAST_SUCCESS,
        Unit::Seconds,
        "When the last scheduled backup was written (Unix time)."
    );
    describe_gauge!(
        BACKUP_INTERVAL,
        Unit::Seconds,
        "How often scheduled backups are taken."
    );
    describe_counter!(BACKUP_FAILURES, "Scheduled backups that failed.");
    describe_gauge!(LEASES, "Leases this replica holds.");
    describe_counter!(
        LEASE_RENEWED,
        "Keep-alives this leader answered that extended a lease."
    );
    describe_counter!(LEASE_EXPIRED, "Leases this leader ended at their TTL.");
    describe_gauge!(WATCHES, "Watch streams this node serves.");
    describe_counter!(GRPC_HANDLED, "Public gRPC calls answered, by status code.");
    describe_counter!(GRPC_STARTED, "Public gRPC calls started.");
    describe_histogram!(
        GRPC_HANDLING,
        Unit::Seconds,
        "Time to answer a public gRPC call."
    );
}
