//! The `raftkv` binary: a server and a small client for people and scripts.

use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use raftkv::cli::{Encoding, TxnFile, key_after, parse_compare, parse_op};
use raftkv::config::ServerArgs;
use raftkv::pb::v1 as pb;
use raftkv_client::Client;

#[derive(Parser)]
#[command(name = "raftkv", version, about = "A Raft-replicated key-value store")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct ClientArgs {
    /// Nodes to talk to; any node serves any request.
    #[arg(
        long,
        env = "RAFTKV_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003",
        global = true
    )]
    endpoints: Vec<String>,
    /// Give up on a request after this long (retries on leader change included).
    #[arg(long, default_value_t = 5000, global = true)]
    timeout_ms: u64,
    /// Print responses as JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Keys and values, typed and printed (also in --json), are hex.
    #[arg(long, global = true, conflicts_with = "base64")]
    hex: bool,
    /// Keys and values, typed and printed (also in --json), are base64 (standard alphabet, padded).
    #[arg(long, global = true)]
    base64: bool,
    #[command(flatten)]
    tls: raftkv::tls::ClientTlsArgs,
}

impl ClientArgs {
    fn encoding(&self) -> Encoding {
        match (self.hex, self.base64) {
            (true, _) => Encoding::Hex,
            (_, true) => Encoding::Base64,
            _ => Encoding::Text,
        }
    }
}

#[derive(Copy, Clone, ValueEnum)]
enum ConsistencyArg {
    Strong,
    Eventual,
}

impl From<ConsistencyArg> for pb::Consistency {
    fn from(c: ConsistencyArg) -> Self {
        match c {
            ConsistencyArg::Strong => pb::Consistency::Strong,
            ConsistencyArg::Eventual => pb::Consistency::Eventual,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Server(Box<ServerArgs>),
    /// Write a key.
    Put {
        key: String,
        value: String,
        #[arg(long)]
        prev_kv: bool,
        /// Attach the key to lease ID: it is deleted when the lease ends.
        #[arg(long, value_name = "ID", default_value_t = 0)]
        lease: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Read a key (exit status 1 when it is absent).
    Get {
        key: String,
        #[arg(long, value_enum, default_value = "strong")]
        consistency: ConsistencyArg,
        /// Wait until the serving node has applied this revision.
        #[arg(long, default_value_t = 0)]
        min_revision: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete a key.
    Delete {
        key: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List keys in [START, END) in key order (END empty: to the last key), fetched page by page.
    Scan {
        #[arg(default_value = "")]
        start: String,
        #[arg(default_value = "")]
        end: String,
        /// Stop after this many pairs (0: the whole range).
        #[arg(long, default_value_t = 0)]
        limit: u64,
        #[arg(long, value_enum, default_value = "strong")]
        consistency: ConsistencyArg,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print every change to KEY (with --prefix: to every key under it) as it happens, one line per
    /// event, until interrupted. Resumes on another node on its own if the one serving it goes away.
    Watch {
        key: String,
        /// Watch every key that starts with KEY.
        #[arg(long)]
        prefix: bool,
        /// Start with the changes made at this revision and after (0: from now on).
        #[arg(long, default_value_t = 0)]
        from_revision: u64,
        /// Print each event's previous value too.
        #[arg(long)]
        prev_kv: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Run a transaction: if every --compare holds, the --success requests run, else the --failure
    /// ones, atomically (exit status 1 when the failure branch ran).
    Txn {
        /// A guard, `TARGET(KEY) OP OPERAND`: TARGET value, version, mod or create; OP =, !=, > or <
        /// (e.g. `mod("k") = 0`, `value(k) = old`). Repeatable; all must hold.
        #[arg(long = "compare", short = 'c', value_name = "COMPARE")]
        compare: Vec<String>,
        /// A request to run if the compares hold: `put KEY VALUE`, `get KEY` or `del KEY`
        /// (`--prev-kv` after put or del). Repeatable, run in order.
        #[arg(
            long = "success",
            short = 's',
            value_name = "REQUEST",
            allow_hyphen_values = true
        )]
        success: Vec<String>,
        /// A request to run if a compare fails (same form as --success). Repeatable.
        #[arg(
            long = "failure",
            short = 'f',
            value_name = "REQUEST",
            allow_hyphen_values = true
        )]
        failure: Vec<String>,
        /// Read the txn from a JSON file (`-`: standard input) instead: {"compare": [...],
        /// "success": [...], "failure": [...]}, each entry the same text as the flags or an object
        /// (see the README).
        #[arg(long, conflicts_with_all = ["compare", "success", "failure"])]
        file: Option<std::path::PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Load a raftkv (or etcd) cluster and report throughput and latency (runs raftkv-bench).
    #[command(disable_help_flag = true)]
    Bench {
        /// Passed to raftkv-bench as they are (`raftkv bench --help` shows them).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Show every node's role, term, leader and indexes.
    Status {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Grant, keep alive, revoke, inspect and list leases.
    Lease {
        #[command(subcommand)]
        command: LeaseCommand,
    },
    /// Run COMMAND while holding the lock NAME (the key `locks/NAME`, on a lease kept alive meanwhile):
    /// waits while another holder has it; exits with COMMAND's status, or 1 after killing COMMAND
    /// if the lock's lease is lost. COMMAND gets the fencing token in `RAFTKV_LOCK_REVISION`.
    Lock {
        name: String,
        /// The lock's lease TTL: how long the lock outlives a holder that died.
        #[arg(long, value_parser = parse_ttl, default_value = "10s")]
        ttl: Duration,
        #[command(flatten)]
        client: ClientArgs,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// List, add, promote or remove members.
    Member {
        #[command(subcommand)]
        command: MemberCommand,
    },
    /// Hand the leadership to voter ID; returns once it leads.
    MoveLeader {
        id: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Back up the cluster to a file, check a backup, or make a new cluster from one.
    Snapshot {
        #[command(subcommand)]
        command: SnapshotCommand,
    },
    /// Fault test: start a fresh cluster, inject partitions, crashes and pauses under load, check the
    /// history (exit 0 pass, 1 anomaly, 2 unknown). Runs raftkv-jepsen.
    #[command(disable_help_flag = true)]
    Jepsen {
        /// Passed to raftkv-jepsen as they are (`raftkv jepsen --help` shows them).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Verify a stopped node's data directory (exit 0 clean, 1 corrupt, 2 could not check).
    Check(raftkv::store::integrity::CheckArgs),
    /// Make a CA, a certificate per node (server and client auth, for both ports) and a client
    /// certificate for the CLI, as PEM files (keys readable by their owner only).
    Certs(raftkv::tls::CertsArgs),
}

#[derive(Subcommand)]
enum LeaseCommand {
    /// Grant a lease of TTL (`10s`, `500ms`, `2m`; a bare number is seconds); prints its id.
    Grant {
        #[arg(value_parser = parse_ttl)]
        ttl: Duration,
        /// The id to grant (0: the cluster picks one).
        #[arg(long, default_value_t = 0)]
        id: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Keep lease ID alive until interrupted; exit status 1 once it is lost.
    KeepAlive {
        id: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// End lease ID now, deleting its keys.
    Revoke {
        id: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Lease ID's remaining and granted TTL, and with --keys its keys.
    Ttl {
        id: u64,
        #[arg(long)]
        keys: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The ids of every lease.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `10s`, `500ms`, `2m`, `1h`, or a bare number of seconds, as etcdctl takes it.
fn parse_ttl(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a TTL (10s, 500ms, 2m, 1h)"))?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is too long"))
}

#[derive(Subcommand)]
enum MemberCommand {
    /// The members, with the leader's view of how far each has the log.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Add node ID, reached by clients at ADDR: a voter once it has caught up (it must be running,
    /// or started with --join meanwhile), or a learner with --learner.
    Add {
        id: u64,
        addr: String,
        #[arg(long)]
        learner: bool,
        /// Where peers reach the node's Raft port (default: ADDR).
        #[arg(long)]
        peer_addr: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Make learner ID a voter (refused until it has caught up).
    Promote {
        id: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove member ID (refused if the voters left would have no live quorum).
    Remove {
        id: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Stream a consistent copy of the state from a node into FILE: it holds every write
    /// acknowledged before the call. Writes go on meanwhile.
    Save {
        file: std::path::PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print a backup's header and check it whole: checksum, every frame, the key count (exit 1 if
    /// it does not check).
    Status {
        file: std::path::PathBuf,
        /// Print the header as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a data directory for member --id of a new cluster from FILE (run once per member,
    /// with the same FILE and --peers), then start each with `raftkv server`.
    Restore(raftkv::backup::restore::RestoreArgs),
}

/// Replaces this process with the tool `name` found next to this binary (so signals and the exit
/// status are the tool's own); returns only if that failed.
fn exec_sibling(name: &str, args: Vec<std::ffi::OsString>) -> std::process::ExitCode {
    use std::os::unix::process::CommandExt as _;
    let path = match std::env::current_exe() {
        Ok(exe) => exe.with_file_name(name),
        Err(e) => {
            eprintln!("error: locating the raftkv binary to find {name} beside it: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let e = std::process::Command::new(&path).args(args).exec();
    if e.kind() == std::io::ErrorKind::NotFound {
        eprintln!(
            "error: {} not found: `raftkv {}` runs it from beside raftkv; build it with \
             `cargo build --release`",
            path.display(),
            name.trim_start_matches("raftkv-"),
        );
    } else {
        eprintln!("error: running {}: {e}", path.display());
    }
    std::process::ExitCode::from(2)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Jepsen { args } => exec_sibling("raftkv-jepsen", args),
        Command::Bench { args } => exec_sibling("raftkv-bench", args),
        command => run(command),
    }
}

#[tokio::main]
async fn run(command: Command) -> std::process::ExitCode {
    raftkv::cli::init_tracing();
    let result = match command {
        Command::Server(args) => raftkv::server::run(*args).await,
        Command::Check(args) => Ok(raftkv::store::integrity::run_check(&args)),
        Command::Certs(args) => raftkv::tls::run_certs(&args),
        Command::Snapshot {
            command: SnapshotCommand::Status { file, json },
        } => snapshot_status(&file, json),
        Command::Snapshot {
            command: SnapshotCommand::Restore(args),
        } => snapshot_restore(&args).await,
        other => run_client(other).await,
    };
    match result {
        Ok(code) => code,
        // The reader went away (`raftkv scan | head -1`): what it wanted, it got.
        Err(e) if is_broken_pipe(&e) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The largest `--file` a txn is read from: far above any txn a server accepts.
const MAX_TXN_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Pairs asked for per scan page; the server may return fewer (its byte cap) and says `more`.
const SCAN_PAGE: u64 = 1000;

/// A key's lease is shown only when it has one.
fn kv_json(kv: &pb::KeyValue, enc: Encoding) -> serde_json::Value {
    let mut json = serde_json::json!({
        "key": enc.encode(&kv.key),
        "value": enc.encode(&kv.value),
        "create_revision": kv.create_revision,
        "mod_revision": kv.mod_revision,
        "version": kv.version,
    });
    if kv.lease != 0 {
        json["lease"] = kv.lease.into();
    }
    json
}

/// One watch event as `raftkv watch` prints it.
fn event_line(event: &pb::Event, enc: Encoding, json: bool) -> String {
    let kind = match pb::EventType::try_from(event.r#type) {
        Ok(pb::EventType::Put) => "PUT",
        Ok(pb::EventType::Delete) => "DELETE",
        Err(_) => "UNKNOWN",
    };
    let kv = event.kv.clone().unwrap_or_default();
    if json {
        let prev = event.prev_kv.as_ref().map(|p| kv_json(p, enc));
        return serde_json::json!({
            "type": kind,
            "revision": kv.mod_revision,
            "kv": kv_json(&kv, enc),
            "prev_kv": prev,
        })
        .to_string();
    }
    let mut line = match kind {
        "PUT" => format!(
            "PUT {} {} revision={}",
            enc.encode(&kv.key),
            enc.encode(&kv.value),
            kv.mod_revision
        ),
        _ => format!(
            "{kind} {} revision={}",
            enc.encode(&kv.key),
            kv.mod_revision
        ),
    };
    if let Some(prev) = &event.prev_kv {
        line.push_str(&format!(" prev={}", enc.encode(&prev.value)));
    }
    line
}

fn client(args: &ClientArgs) -> anyhow::Result<Client> {
    Ok(Client::with_tls(
        &args.endpoints,
        Duration::from_millis(args.timeout_ms),
        args.tls.config()?,
    )?)
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    let s = raftkv_client::own_timeout_is_deadline_exceeded(s);
    anyhow::anyhow!("{}: {}", code_name(s.code()), s.message())
}

/// gRPC's names for status codes, as grpcurl and the README spell them.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

fn decode(enc: Encoding, s: &str, what: &str) -> anyhow::Result<Vec<u8>> {
    enc.decode(s).map_err(|e| anyhow::anyhow!("{what}: {e}"))
}

async fn run_client(command: Command) -> anyhow::Result<std::process::ExitCode> {
    use std::io::Write;
    use std::process::ExitCode;
    // Written with `?`, not println!: a closed pipe is an error to stop on, not a panic.
    let mut out = std::io::BufWriter::new(std::io::stdout());
    let code = match command {
        Command::Server(_)
        | Command::Jepsen { .. }
        | Command::Bench { .. }
        | Command::Check(_)
        | Command::Certs(_)
        | Command::Snapshot {
            command: SnapshotCommand::Status { .. } | SnapshotCommand::Restore(_),
        } => {
            unreachable!("handled by main")
        }
        Command::Snapshot {
            command: SnapshotCommand::Save { file, client: args },
        } => {
            let stream = client(&args)?.snapshot().await.map_err(status_error)?;
            let header = match raftkv::backup::save::to_file(stream, &file).await {
                Ok(header) => header,
                Err(raftkv::backup::save::SaveError::Status(s)) => return Err(status_error(s)),
                Err(e) => return Err(anyhow::anyhow!("{}: {e}", file.display())),
            };
            if args.json {
                writeln!(out, "{}", serde_json::to_value(&header)?)?;
            } else {
                writeln!(
                    out,
                    "Snapshot saved at {}: revision {}, {} keys, {} bytes, sha256 {}",
                    file.display(),
                    header.revision,
                    header.keys,
                    header.image_bytes,
                    header.sha256
                )?;
            }
            ExitCode::SUCCESS
        }
        Command::Put {
            key,
            value,
            prev_kv,
            lease,
            client: args,
        } => {
            let enc = args.encoding();
            let r = client(&args)?
                .put_request(pb::PutRequest {
                    key: decode(enc, &key, "key")?,
                    value: decode(enc, &value, "value")?,
                    prev_kv,
                    lease,
                })
                .await
                .map_err(status_error)?;
            let revision = r.header.map_or(0, |h| h.revision);
            if args.json {
                let prev = r.prev_kv.as_ref().map(|kv| kv_json(kv, enc));
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"revision": revision, "prev_kv": prev})
                )?;
            } else {
                writeln!(out, "OK revision={revision}")?;
                if let Some(prev) = r.prev_kv {
                    writeln!(out, "{}", enc.encode(&prev.value))?;
                }
            }
            ExitCode::SUCCESS
        }
        Command::Get {
            key,
            consistency,
            min_revision,
            client: args,
        } => {
            let enc = args.encoding();
            let r = client(&args)?
                .get(decode(enc, &key, "key")?, consistency.into(), min_revision)
                .await
                .map_err(status_error)?;
            if args.json {
                let kv =
                    r.kv.as_ref()
                        .map_or(serde_json::Value::Null, |kv| kv_json(kv, enc));
                writeln!(out, "{kv}")?;
            }
            match r.kv {
                Some(kv) if !args.json => {
                    writeln!(out, "{}", enc.encode(&kv.value))?;
                    ExitCode::SUCCESS
                }
                Some(_) => ExitCode::SUCCESS,
                None => ExitCode::from(1),
            }
        }
        Command::Delete { key, client: args } => {
            let enc = args.encoding();
            let r = client(&args)?
                .delete(decode(enc, &key, "key")?, false)
                .await
                .map_err(status_error)?;
            let revision = r.header.map_or(0, |h| h.revision);
            if args.json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"deleted": r.deleted, "revision": revision})
                )?;
            } else {
                writeln!(
                    out,
                    "{} revision={revision}",
                    if r.deleted { "DELETED" } else { "NOT FOUND" }
                )?;
            }
            ExitCode::SUCCESS
        }
        Command::Scan {
            start,
            end,
            limit,
            consistency,
            client: args,
        } => {
            scan(&mut out, &args, start, end, limit, consistency).await?;
            ExitCode::SUCCESS
        }
        Command::Watch {
            key,
            prefix,
            from_revision,
            prev_kv,
            client: args,
        } => {
            let enc = args.encoding();
            let key = decode(enc, &key, "key")?;
            let mut options = if prefix {
                raftkv_client::WatchOptions::prefix(key)
            } else {
                raftkv_client::WatchOptions::key(key)
            }
            .from_revision(from_revision);
            options.prev_kv = prev_kv;
            let mut watch = client(&args)?.watch(options);
            while let Some(response) = watch.next().await {
                for event in response?.events {
                    writeln!(out, "{}", event_line(&event, enc, args.json))?;
                }
                out.flush()?;
            }
            ExitCode::SUCCESS
        }
        Command::Txn {
            compare,
            success,
            failure,
            file,
            client: args,
        } => txn(&mut out, &args, compare, success, failure, file).await?,
        Command::Status { client: args } => {
            let statuses = client(&args)?.statuses().await;
            let mut any_ok = false;
            if args.json {
                let rows: Vec<_> = statuses
                    .iter()
                    .map(|(addr, r)| match r {
                        Ok(s) => serde_json::json!({"endpoint": addr, "id": s.id, "role": s.role, "term": s.term,
                            "leader_id": s.leader_id, "commit_index": s.commit_index, "applied_index": s.applied_index}),
                        Err(e) => serde_json::json!({"endpoint": addr, "error": e.message()}),
                    })
                    .collect();
                writeln!(out, "{}", serde_json::Value::Array(rows))?;
                any_ok = statuses.iter().any(|(_, r)| r.is_ok());
            } else {
                writeln!(
                    out,
                    "{:<22} {:>4} {:<10} {:>6} {:>7} {:>10} {:>10}",
                    "ENDPOINT", "ID", "ROLE", "TERM", "LEADER", "COMMIT", "APPLIED"
                )?;
                for (addr, r) in &statuses {
                    match r {
                        Ok(s) => {
                            any_ok = true;
                            writeln!(
                                out,
                                "{:<22} {:>4} {:<10} {:>6} {:>7} {:>10} {:>10}",
                                addr,
                                s.id,
                                s.role,
                                s.term,
                                s.leader_id,
                                s.commit_index,
                                s.applied_index
                            )?;
                        }
                        Err(e) => writeln!(out, "{addr:<22} unreachable: {}", e.message())?,
                    }
                }
            }
            if any_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Command::Member { command } => member(&mut out, command).await?,
        Command::Lease { command } => lease(&mut out, command).await?,
        Command::Lock {
            name,
            ttl,
            client: args,
            command,
        } => lock(&mut out, &args, &name, ttl, &command).await?,
        Command::MoveLeader { id, client: args } => {
            let r = client(&args)?.move_leader(id).await.map_err(status_error)?;
            let leader = r.header.map_or(0, |h| h.leader_id);
            if args.json {
                writeln!(out, "{}", serde_json::json!({"leader_id": leader}))?;
            } else {
                writeln!(out, "OK leader={leader}")?;
            }
            ExitCode::SUCCESS
        }
    };
    out.flush()?;
    Ok(code)
}

/// `raftkv snapshot status FILE`: the header, once the whole file has checked.
fn snapshot_status(file: &std::path::Path, json: bool) -> anyhow::Result<std::process::ExitCode> {
    use std::io::Write;
    let opened =
        std::fs::File::open(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let header =
        match raftkv::backup::format::verify(std::io::BufReader::with_capacity(1 << 20, opened)) {
            Ok((header, _)) => header,
            Err(raftkv::backup::format::BackupError::Io(e)) => {
                return Err(anyhow::anyhow!("{}: {e}", file.display()));
            }
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                return Ok(std::process::ExitCode::from(1));
            }
        };
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_value(&header)?)?;
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let h = &header;
    writeln!(out, "file:           {}", file.display())?;
    writeln!(out, "format version: {}", h.format_version)?;
    writeln!(out, "cluster id:     {}", h.cluster_id)?;
    writeln!(out, "revision:       {}", h.revision)?;
    writeln!(out, "term:           {}", h.term)?;
    writeln!(out, "keys:           {}", h.keys)?;
    writeln!(out, "image bytes:    {}", h.image_bytes)?;
    writeln!(out, "sha256:         {} (checked)", h.sha256)?;
    writeln!(
        out,
        "taken on node:  {} at {} (Unix time), raftkv {}",
        h.taken_on, h.taken_at_unix, h.raftkv_version
    )?;
    for m in &h.members {
        writeln!(
            out,
            "member:         {} {} {} peer {}",
            m.id,
            if m.learner { "learner" } else { "voter" },
            m.address,
            m.peer_address
        )?;
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// `raftkv snapshot restore FILE ...`.
async fn snapshot_restore(
    args: &raftkv::backup::restore::RestoreArgs,
) -> anyhow::Result<std::process::ExitCode> {
    match raftkv::backup::restore::run(args).await {
        Ok(r) => {
            println!(
                "restored {} keys at revision {} into {} as node {} of new cluster {} (from cluster {})",
                r.keys,
                r.header.revision,
                args.data_dir.display(),
                args.id,
                r.cluster,
                r.header.cluster_id
            );
            Ok(std::process::ExitCode::SUCCESS)
        }
        Err(raftkv::backup::restore::RestoreError::Backup(e)) => {
            eprintln!("error: {}: {e}", args.file.display());
            Ok(std::process::ExitCode::from(1))
        }
        Err(e) => Err(e.into()),
    }
}

/// `raftkv member ...`: one call, then the members as it leaves them.
/// `raftkv lock`: COMMAND runs only while this process holds the lock.
async fn lock(
    out: &mut impl std::io::Write,
    args: &ClientArgs,
    name: &str,
    ttl: Duration,
    command: &[String],
) -> anyhow::Result<std::process::ExitCode> {
    let client = Arc::new(client(args)?);
    let key = format!("locks/{name}").into_bytes();
    let mut held = client.lock(key, ttl).await?;
    writeln!(
        out,
        "holding lock {name} (fencing token {})",
        held.revision()
    )?;
    out.flush()?;
    let mut child = tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .env("RAFTKV_LOCK_REVISION", held.revision().to_string())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot run {}: {e}", command[0]))?;
    let code = tokio::select! {
        status = child.wait() => {
            let status = status?;
            std::process::ExitCode::from(status.code().map_or(1, |c| c.clamp(0, 255) as u8))
        }
        lost = held.lost() => {
            child.kill().await.ok();
            writeln!(out, "lock {name} lost ({lost}): {} was killed", command[0])?;
            return Ok(std::process::ExitCode::FAILURE);
        }
    };
    held.unlock().await.map_err(status_error)?;
    Ok(code)
}

async fn lease(
    out: &mut impl std::io::Write,
    command: LeaseCommand,
) -> anyhow::Result<std::process::ExitCode> {
    use std::process::ExitCode;
    match command {
        LeaseCommand::Grant {
            ttl,
            id,
            client: args,
        } => {
            let r = client(&args)?
                .lease_grant(ttl, id)
                .await
                .map_err(status_error)?;
            if args.json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"id": r.id, "ttl_ms": r.ttl_ms})
                )?;
            } else {
                writeln!(out, "lease {} granted with TTL {} ms", r.id, r.ttl_ms)?;
            }
        }
        LeaseCommand::KeepAlive { id, client: args } => {
            let client = Arc::new(client(&args)?);
            let ttl = client
                .lease_time_to_live(id, false)
                .await
                .map_err(status_error)?;
            let mut alive = client.keep_alive(id, Duration::from_millis(ttl.granted_ttl_ms));
            writeln!(
                out,
                "keeping lease {id} alive (TTL {} ms)",
                ttl.granted_ttl_ms
            )?;
            out.flush()?;
            let lost = alive.lost().await;
            writeln!(out, "lease {id} lost: {lost}")?;
            return Ok(ExitCode::FAILURE);
        }
        LeaseCommand::Revoke { id, client: args } => {
            client(&args)?
                .lease_revoke(id)
                .await
                .map_err(status_error)?;
            if !args.json {
                writeln!(out, "lease {id} revoked")?;
            }
        }
        LeaseCommand::Ttl {
            id,
            keys,
            client: args,
        } => {
            let r = client(&args)?
                .lease_time_to_live(id, keys)
                .await
                .map_err(status_error)?;
            let enc = args.encoding();
            let keys: Vec<String> = r.keys.iter().map(|k| enc.encode(k)).collect();
            if args.json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"id": r.id, "ttl_ms": r.ttl_ms,
                        "granted_ttl_ms": r.granted_ttl_ms, "keys": keys})
                )?;
            } else {
                writeln!(
                    out,
                    "lease {} has {} ms left of {} ms",
                    r.id, r.ttl_ms, r.granted_ttl_ms
                )?;
                for key in keys {
                    writeln!(out, "{key}")?;
                }
            }
        }
        LeaseCommand::List { client: args } => {
            let r = client(&args)?.lease_list().await.map_err(status_error)?;
            if args.json {
                writeln!(out, "{}", serde_json::json!({"ids": r.ids}))?;
            } else {
                for id in r.ids {
                    writeln!(out, "{id}")?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn member(
    out: &mut impl std::io::Write,
    command: MemberCommand,
) -> anyhow::Result<std::process::ExitCode> {
    let (members, args) = match command {
        MemberCommand::List { client: args } => {
            let r = client(&args)?.member_list().await.map_err(status_error)?;
            (r.members, args)
        }
        MemberCommand::Add {
            id,
            addr,
            learner,
            peer_addr,
            client: args,
        } => {
            let req = pb::MemberAddRequest {
                id,
                address: addr,
                learner,
                peer_address: peer_addr.unwrap_or_default(),
            };
            let r = client(&args)?.member_add(req).await.map_err(status_error)?;
            (r.members, args)
        }
        MemberCommand::Promote { id, client: args } => {
            let r = client(&args)?
                .member_promote(id)
                .await
                .map_err(status_error)?;
            (r.members, args)
        }
        MemberCommand::Remove { id, client: args } => {
            let r = client(&args)?
                .member_remove(id)
                .await
                .map_err(status_error)?;
            (r.members, args)
        }
    };
    if args.json {
        let rows: Vec<_> = members
            .iter()
            .map(|m| {
                serde_json::json!({"id": m.id, "address": m.address, "peer_address": m.peer_address,
                    "learner": m.learner, "matched_index": m.matched_index})
            })
            .collect();
        writeln!(out, "{}", serde_json::Value::Array(rows))?;
    } else {
        writeln!(
            out,
            "{:>4} {:<8} {:<22} {:<22} {:>10}",
            "ID", "ROLE", "ADDRESS", "PEER ADDRESS", "MATCHED"
        )?;
        for m in &members {
            writeln!(
                out,
                "{:>4} {:<8} {:<22} {:<22} {:>10}",
                m.id,
                if m.learner { "learner" } else { "voter" },
                m.address,
                m.peer_address,
                m.matched_index
            )?;
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Pages through `[start, end)`: each page starts just after the last key of the one before, and
/// asks for at least the revision the first page saw, so an eventual scan never steps back in time.
/// Each page is a read of its own (there is no snapshot across pages), as with etcdctl's paging.
/// Pairs are printed as they arrive, so memory stays at one page.
async fn scan(
    out: &mut impl std::io::Write,
    args: &ClientArgs,
    start: String,
    end: String,
    limit: u64,
    consistency: ConsistencyArg,
) -> anyhow::Result<()> {
    let enc = args.encoding();
    let mut start = decode(enc, &start, "start")?;
    let end = decode(enc, &end, "end")?;
    let client = client(args)?;
    let mut left = limit;
    let mut min_revision = 0;
    let mut first = true;
    if args.json {
        write!(out, "{{\"kvs\":[")?;
    }
    let more = loop {
        let page = if limit == 0 {
            SCAN_PAGE
        } else {
            left.min(SCAN_PAGE)
        };
        let req = pb::ScanRequest {
            start: start.clone(),
            end: end.clone(),
            limit: page as u32,
            consistency: pb::Consistency::from(consistency) as i32,
            min_revision,
        };
        let r = client.scan(req).await.map_err(status_error)?;
        min_revision = min_revision.max(r.header.map_or(0, |h| h.revision));
        for kv in &r.kvs {
            if args.json {
                let sep = if std::mem::take(&mut first) { "" } else { "," };
                write!(out, "{sep}{}", kv_json(kv, enc))?;
            } else {
                writeln!(out, "{}\t{}", enc.encode(&kv.key), enc.encode(&kv.value))?;
            }
        }
        if limit > 0 {
            left = left.saturating_sub(r.kvs.len() as u64);
            if left == 0 {
                break r.more;
            }
        }
        match r.kvs.last() {
            Some(last) if r.more => start = key_after(&last.key),
            _ => break false,
        }
    };
    if args.json {
        writeln!(out, "],\"more\":{more}}}")?;
    } else if more {
        eprintln!("(more pairs in the range: --limit {limit} reached)");
    }
    Ok(())
}

async fn txn(
    out: &mut impl std::io::Write,
    args: &ClientArgs,
    compare: Vec<String>,
    success: Vec<String>,
    failure: Vec<String>,
    file: Option<std::path::PathBuf>,
) -> anyhow::Result<std::process::ExitCode> {
    use std::io::Read;
    let enc = args.encoding();
    let bad = |e: String| anyhow::anyhow!("{e}");
    let req = match file {
        Some(path) => {
            let mut text = String::new();
            let what = path.display().to_string();
            if what == "-" {
                std::io::stdin()
                    .take(MAX_TXN_FILE_BYTES)
                    .read_to_string(&mut text)?;
            } else {
                std::fs::File::open(&path)
                    .map_err(|e| anyhow::anyhow!("{what}: {e}"))?
                    .take(MAX_TXN_FILE_BYTES)
                    .read_to_string(&mut text)?;
            }
            let spec: TxnFile =
                serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
            spec.into_request(enc).map_err(bad)?
        }
        None => pb::TxnRequest {
            compare: compare
                .iter()
                .map(|c| parse_compare(c, enc))
                .collect::<Result<_, _>>()
                .map_err(bad)?,
            success: success
                .iter()
                .map(|o| parse_op(o, enc))
                .collect::<Result<_, _>>()
                .map_err(bad)?,
            failure: failure
                .iter()
                .map(|o| parse_op(o, enc))
                .collect::<Result<_, _>>()
                .map_err(bad)?,
        },
    };
    let r = client(args)?.txn(req).await.map_err(status_error)?;
    let revision = r.header.map_or(0, |h| h.revision);
    use pb::op_result::Result as R;
    if args.json {
        let results: Vec<_> = r
            .results
            .iter()
            .map(|res| match &res.result {
                Some(R::Put(p)) => serde_json::json!({"put": {
                    "prev_kv": p.prev_kv.as_ref().map(|kv| kv_json(kv, enc))}}),
                Some(R::Delete(d)) => serde_json::json!({"delete": {"deleted": d.deleted,
                    "prev_kv": d.prev_kv.as_ref().map(|kv| kv_json(kv, enc))}}),
                Some(R::Get(g)) => serde_json::json!({"get": {
                    "kv": g.kv.as_ref().map(|kv| kv_json(kv, enc))}}),
                None => serde_json::Value::Null,
            })
            .collect();
        writeln!(
            out,
            "{}",
            serde_json::json!({"succeeded": r.succeeded, "revision": revision, "results": results})
        )?;
    } else {
        let verdict = if r.succeeded { "SUCCESS" } else { "FAILURE" };
        writeln!(out, "{verdict} revision={revision}")?;
        for res in &r.results {
            match &res.result {
                Some(R::Put(p)) => {
                    writeln!(out, "OK")?;
                    if let Some(prev) = &p.prev_kv {
                        writeln!(out, "{}", enc.encode(&prev.value))?;
                    }
                }
                Some(R::Delete(d)) => {
                    writeln!(out, "{}", if d.deleted { "DELETED" } else { "NOT FOUND" })?;
                    if let Some(prev) = &d.prev_kv {
                        writeln!(out, "{}", enc.encode(&prev.value))?;
                    }
                }
                Some(R::Get(g)) => match &g.kv {
                    Some(kv) => {
                        writeln!(out, "{}\t{}", enc.encode(&kv.key), enc.encode(&kv.value))?
                    }
                    None => writeln!(out, "NOT FOUND")?,
                },
                None => writeln!(out, "(empty result)")?,
            }
        }
    }
    Ok(if r.succeeded {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    })
}
