//! The `raftkv` binary: a server and a small client for people and scripts.

use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use raftkv::client::Client;
use raftkv::config::ServerArgs;
use raftkv::pb::v1 as pb;

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
    /// Give up after this long (retries on leader change included).
    #[arg(long, default_value_t = 5000, global = true)]
    timeout_ms: u64,
    /// Print responses as JSON.
    #[arg(long, global = true)]
    json: bool,
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
    Server(ServerArgs),
    /// Write a key.
    Put {
        key: String,
        value: String,
        #[arg(long)]
        prev_kv: bool,
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
    /// List keys in [START, END) in key order (END empty: to the last key).
    Scan {
        #[arg(default_value = "")]
        start: String,
        #[arg(default_value = "")]
        end: String,
        #[arg(long, default_value_t = 0)]
        limit: u32,
        #[arg(long, value_enum, default_value = "strong")]
        consistency: ConsistencyArg,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Load a raftkv (or etcd) cluster and report throughput and latency.
    Bench(Box<raftkv::bench::BenchArgs>),
    /// Show every node's role, term, leader and indexes.
    Status {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Fault test: start a fresh cluster, inject partitions, crashes and pauses under load, check the
    /// history (exit 0 pass, 1 anomaly, 2 unknown).
    Jepsen(raftkv::jepsen::JepsenArgs),
    /// Verify a stopped node's data directory (exit 0 clean, 1 corrupt, 2 could not check).
    Check(raftkv::store::integrity::CheckArgs),
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RAFTKV_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,openraft=warn,sled=warn,h2=warn,tower=warn")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for people: logs redirected to files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let result = match cli.command {
        Command::Server(args) => raftkv::server::run(args).await,
        Command::Jepsen(args) => raftkv::jepsen::run(args).await,
        Command::Bench(args) => raftkv::bench::run(*args).await.map_err(Into::into),
        Command::Check(args) => Ok(raftkv::store::integrity::run_check(&args)),
        other => run_client(other).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn kv_json(kv: &pb::KeyValue) -> serde_json::Value {
    serde_json::json!({
        "key": text(&kv.key),
        "value": text(&kv.value),
        "create_revision": kv.create_revision,
        "mod_revision": kv.mod_revision,
        "version": kv.version,
    })
}

fn client(args: &ClientArgs) -> anyhow::Result<Client> {
    Client::new(&args.endpoints, Duration::from_millis(args.timeout_ms))
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

async fn run_client(command: Command) -> anyhow::Result<std::process::ExitCode> {
    use std::process::ExitCode;
    match command {
        Command::Server(_) | Command::Jepsen(_) | Command::Bench(_) | Command::Check(_) => {
            unreachable!("handled by main")
        }
        Command::Put {
            key,
            value,
            prev_kv,
            client: args,
        } => {
            let r = client(&args)?
                .put(key.into_bytes(), value.into_bytes(), prev_kv)
                .await
                .map_err(status_error)?;
            let revision = r.header.map_or(0, |h| h.revision);
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"revision": revision, "prev_kv": r.prev_kv.as_ref().map(kv_json)})
                );
            } else {
                println!("OK revision={revision}");
                if let Some(prev) = r.prev_kv {
                    println!("{}", text(&prev.value));
                }
            }
        }
        Command::Get {
            key,
            consistency,
            min_revision,
            client: args,
        } => {
            let r = client(&args)?
                .get(key.into_bytes(), consistency.into(), min_revision)
                .await
                .map_err(status_error)?;
            if args.json {
                println!("{}", r.kv.as_ref().map_or(serde_json::Value::Null, kv_json));
            }
            match r.kv {
                Some(kv) if !args.json => println!("{}", text(&kv.value)),
                Some(_) => {}
                None => return Ok(ExitCode::from(1)),
            }
        }
        Command::Delete { key, client: args } => {
            let r = client(&args)?
                .delete(key.into_bytes(), false)
                .await
                .map_err(status_error)?;
            let revision = r.header.map_or(0, |h| h.revision);
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"deleted": r.deleted, "revision": revision})
                );
            } else {
                println!(
                    "{} revision={revision}",
                    if r.deleted { "DELETED" } else { "NOT FOUND" }
                );
            }
        }
        Command::Scan {
            start,
            end,
            limit,
            consistency,
            client: args,
        } => {
            let req = pb::ScanRequest {
                start: start.into_bytes(),
                end: end.into_bytes(),
                limit,
                consistency: pb::Consistency::from(consistency) as i32,
                min_revision: 0,
            };
            let r = client(&args)?.scan(req).await.map_err(status_error)?;
            if args.json {
                let kvs: Vec<_> = r.kvs.iter().map(kv_json).collect();
                println!("{}", serde_json::json!({"kvs": kvs, "more": r.more}));
            } else {
                for kv in &r.kvs {
                    println!("{}\t{}", text(&kv.key), text(&kv.value));
                }
                if r.more {
                    println!("... (more; raise --limit or scan from the last key)");
                }
            }
        }
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
                println!("{}", serde_json::Value::Array(rows));
                any_ok = statuses.iter().any(|(_, r)| r.is_ok());
            } else {
                println!(
                    "{:<22} {:>4} {:<10} {:>6} {:>7} {:>10} {:>10}",
                    "ENDPOINT", "ID", "ROLE", "TERM", "LEADER", "COMMIT", "APPLIED"
                );
                for (addr, r) in &statuses {
                    match r {
                        Ok(s) => {
                            any_ok = true;
                            println!(
                                "{:<22} {:>4} {:<10} {:>6} {:>7} {:>10} {:>10}",
                                addr,
                                s.id,
                                s.role,
                                s.term,
                                s.leader_id,
                                s.commit_index,
                                s.applied_index
                            );
                        }
                        Err(e) => println!("{addr:<22} unreachable: {}", e.message()),
                    }
                }
            }
            if !any_ok {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
