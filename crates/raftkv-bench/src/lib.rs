//! `raftkv bench` (the `raftkv-bench` binary): closed-loop load against raftkv or etcd, through the same client machinery.
//!
//! Each of `--clients` tasks sends one request, waits for the answer, records its latency and sends the
//! next (closed loop, like etcd's `benchmark` tool). Clients share `--connections` HTTP/2 connections,
//! and connection `i` goes to endpoint `i mod len(endpoints)`, for both systems alike: that is what etcd's
//! clientv3 balancer does, and in both systems a follower forwards writes and asks the leader for a read
//! index. The same tonic/hyper stack carries both, so neither system gets a cheaper client.

mod driver;
#[cfg(feature = "etcd")]
mod etcd;
mod raftkv;
pub mod report;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tonic::transport::ClientTlsConfig;

use driver::{Conn, OpError};
use report::Report;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("invalid arguments: {0}")]
    Args(String),
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    #[error(
        "this raftkv-bench was built without etcd support; rebuild it with \
         `cargo build --release -p raftkv-bench --features etcd` (needs protoc on PATH; \
         scripts/bench-vs-etcd.sh does both)"
    )]
    EtcdDisabled,
    #[error("prefill failed: {0}")]
    Prefill(String),
    #[error("no leader found among {0:?}")]
    NoLeader(Vec<String>),
    #[error("no write succeeded within {0:?}")]
    ProbeTimeout(Duration),
    #[error("writing {path}: {source}")]
    Output {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("histogram: {0}")]
    Histogram(String),
    #[error(transparent)]
    Tls(#[from] ::raftkv::tls::TlsError),
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Writes of random keys.
    Put,
    /// Reads of random (prefilled) keys, at --consistency.
    Get,
    /// Compare-and-swap: if the key holds the value this client last saw, write a new one, else read it.
    Txn,
    /// --read-percent gets (at --consistency), the rest puts.
    Mix,
    /// Print the endpoint of the current leader (for scripts).
    Leader,
    /// Write until one write succeeds and print the milliseconds since --since-unix-ns (failover timing).
    Probe,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Raftkv,
    Etcd,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// Linearizable: raftkv STRONG, etcd's default (linearizable) range.
    Strong,
    /// Served from the local node: raftkv EVENTUAL, etcd `serializable`.
    Eventual,
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// What to run.
    #[arg(value_enum)]
    pub workload: Workload,
    /// Which system the endpoints belong to.
    #[arg(long, value_enum, default_value = "raftkv")]
    pub target: Target,
    /// Nodes to spread connections over (HOST:PORT).
    #[arg(
        long,
        env = "RAFTKV_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003"
    )]
    pub endpoints: Vec<String>,
    /// Concurrent closed-loop clients.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// HTTP/2 connections the clients share (at most one per client is useful).
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// How long to measure (e.g. 500ms, 10s, 2m); ignored when --total is given.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Stop after this many requests instead of after --duration.
    #[arg(long)]
    pub total: Option<u64>,
    /// Keys are drawn uniformly from this many.
    #[arg(long, default_value_t = 10_000)]
    pub key_space: u64,
    /// Bytes per written value.
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// Read consistency for get and mix.
    #[arg(long, value_enum, default_value = "strong")]
    pub consistency: Consistency,
    /// Share of reads in the mix workload.
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub read_percent: u8,
    /// Skip writing every key once before a get, txn or mix run.
    #[arg(long)]
    pub no_prefill: bool,
    /// Per-request deadline.
    #[arg(long, default_value_t = 5_000)]
    pub timeout_ms: u64,
    /// Also write the result as JSON to this file (`-` for stdout, replacing the text report).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// For `probe`: when the clock started (e.g. `date +%s%N` just before killing the leader).
    #[arg(long)]
    pub since_unix_ns: Option<u128>,
    /// TLS to raftkv nodes (`--cacert`, `--cert`, `--key`, as for the CLI).
    #[command(flatten)]
    pub tls: ::raftkv::tls::ClientTlsArgs,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 10s or 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("unknown unit {unit:?} in {s:?} (ms, s, m)")),
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("{s:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub async fn run(args: BenchArgs) -> Result<ExitCode, BenchError> {
    if args.endpoints.is_empty() {
        return Err(BenchError::Args("no endpoints".into()));
    }
    #[cfg(not(feature = "etcd"))]
    if args.target == Target::Etcd {
        return Err(BenchError::EtcdDisabled);
    }
    let tls = args.tls.config()?;
    if tls.is_some() && args.target == Target::Etcd {
        return Err(BenchError::Args(
            "--cacert, --cert and --key are for raftkv targets".into(),
        ));
    }
    match args.workload {
        Workload::Leader => {
            let leader =
                driver::leader(args.target, &args.endpoints, args.timeout(), tls.as_ref()).await?;
            println!("{leader}");
            Ok(ExitCode::SUCCESS)
        }
        Workload::Probe => probe(&args, tls.as_ref()).await,
        _ => {
            let report = load(&args, tls.as_ref()).await?;
            report.emit(args.json.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

impl BenchArgs {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    fn validate(&self) -> Result<(), BenchError> {
        if self.clients == 0 || self.connections == 0 || self.key_space == 0 {
            return Err(BenchError::Args(
                "--clients, --connections and --key-space must be at least 1".into(),
            ));
        }
        if self.total == Some(0) {
            return Err(BenchError::Args("--total must be at least 1".into()));
        }
        Ok(())
    }
}

/// Fixed-width keys, so every request has the same size whatever key it names.
fn key_name(n: u64) -> Vec<u8> {
    format!("bench/{n:010}").into_bytes()
}

/// Distinct values of `size` bytes: a counter in the first 8 bytes over random filler.
fn value_with(filler: &[u8], stamp: u64) -> Vec<u8> {
    let mut v = filler.to_vec();
    let n = v.len().min(8);
    v[..n].copy_from_slice(&stamp.to_le_bytes()[..n]);
    v
}

/// What every client shares while the load runs.
struct Shared {
    args: BenchArgs,
    keys: Vec<Vec<u8>>,
    filler: Vec<u8>,
    /// Requests started so far (bounded by --total).
    started: AtomicU64,
    /// Requests answered so far (successes and errors), for the progress display.
    finished: AtomicU64,
    stop: AtomicBool,
    deadline: Instant,
}

impl Shared {
    fn next_op(&self) -> bool {
        if self.stop.load(Ordering::Relaxed) {
            return false;
        }
        match self.args.total {
            Some(total) => self.started.fetch_add(1, Ordering::Relaxed) < total,
            None => Instant::now() < self.deadline,
        }
    }
}

/// One client's tally, merged into the report at the end.
struct Tally {
    hist: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    cas_failed: u64,
}

impl Tally {
    fn new() -> Result<Self, BenchError> {
        Ok(Self {
            // 1 µs .. 60 s at 3 significant digits.
            hist: Histogram::new_with_bounds(1, 60_000_000, 3)
                .map_err(|e| BenchError::Histogram(e.to_string()))?,
            errors: BTreeMap::new(),
            cas_failed: 0,
        })
    }

    fn record(&mut self, started: Instant, result: Result<(), OpError>) {
        match result {
            Ok(()) => {
                let us = started.elapsed().as_micros().max(1) as u64;
                self.hist.saturating_record(us);
            }
            Err(e) => *self.errors.entry(e.code).or_default() += 1,
        }
    }
}

async fn load(args: &BenchArgs, tls: Option<&ClientTlsConfig>) -> Result<Report, BenchError> {
    args.validate()?;
    let conns = driver::connect(
        args.target,
        &args.endpoints,
        args.connections,
        args.timeout(),
        tls,
    )
    .await?;
    let mut rng = StdRng::from_os_rng();
    let filler: Vec<u8> = (0..args.value_size)
        .map(|_| rng.random_range(b'a'..=b'z'))
        .collect();
    let keys: Vec<Vec<u8>> = (0..args.key_space).map(key_name).collect();
    let needs_data = matches!(args.workload, Workload::Get | Workload::Txn | Workload::Mix);
    if needs_data && !args.no_prefill {
        prefill(&conns, &keys, &filler, args.clients, args.quiet).await?;
    }

    let measure = args.total.map_or(args.duration, |_| Duration::ZERO);
    let shared = Arc::new(Shared {
        args: args.clone(),
        keys,
        filler,
        started: AtomicU64::new(0),
        finished: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        deadline: Instant::now() + measure,
    });
    let progress = report::Progress::start(args, shared.clone());
    let begin = Instant::now();
    let mut tasks = Vec::with_capacity(args.clients);
    for id in 0..args.clients {
        let conn = conns[id % conns.len()].clone();
        tasks.push(tokio::spawn(client(shared.clone(), conn, id)));
    }
    let mut total = Tally::new()?;
    for task in tasks {
        match task.await {
            Ok(Ok(t)) => {
                total
                    .hist
                    .add(&t.hist)
                    .map_err(|e| BenchError::Histogram(e.to_string()))?;
                for (code, n) in t.errors {
                    *total.errors.entry(code).or_default() += n;
                }
                total.cas_failed += t.cas_failed;
            }
            Ok(Err(e)) => return Err(e),
            Err(e) => *total.errors.entry(format!("client task: {e}")).or_default() += 1,
        }
    }
    let elapsed = begin.elapsed();
    progress.finish();
    Ok(Report::new(args, &total, elapsed))
}

/// Writes every key once, so reads find data and compare-and-swap has a value to compare with.
async fn prefill(
    conns: &[Conn],
    keys: &[Vec<u8>],
    filler: &[u8],
    clients: usize,
    quiet: bool,
) -> Result<(), BenchError> {
    if !quiet {
        eprintln!("prefilling {} keys...", keys.len());
    }
    let next = Arc::new(AtomicU64::new(0));
    let keys = Arc::new(keys.to_vec());
    let mut tasks = Vec::new();
    for id in 0..clients.min(keys.len()) {
        let mut conn = conns[id % conns.len()].clone();
        let next = next.clone();
        let keys = keys.clone();
        let value = filler.to_vec();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(key) = keys.get(i) else {
                    return Ok::<(), BenchError>(());
                };
                // A prefill write that fails is retried once; twice means the cluster is not healthy.
                if conn.put(key.clone(), value.clone()).await.is_err() {
                    conn.put(key.clone(), value.clone())
                        .await
                        .map_err(|e| BenchError::Prefill(format!("{}: {}", e.code, e.message)))?;
                }
            }
        }));
    }
    for task in tasks {
        task.await
            .map_err(|e| BenchError::Prefill(e.to_string()))??;
    }
    Ok(())
}

async fn client(shared: Arc<Shared>, mut conn: Conn, id: usize) -> Result<Tally, BenchError> {
    let args = &shared.args;
    let mut rng = StdRng::seed_from_u64(0x5eed ^ id as u64);
    let mut tally = Tally::new()?;
    let strong = args.consistency == Consistency::Strong;
    let space = shared.keys.len() as u64;
    // Compare-and-swap clients own disjoint keys (k ≡ id mod clients), so a failed compare means a lost
    // update, not contention between benchmark clients. The prefill wrote `filler` everywhere.
    let owned = space
        .saturating_sub(id as u64)
        .div_ceil(args.clients as u64);
    let mut expected: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut stamp = (id as u64) << 40;
    while shared.next_op() {
        let started = Instant::now();
        let result = match args.workload {
            Workload::Put => {
                let key = shared.keys[rng.random_range(0..space) as usize].clone();
                stamp += 1;
                conn.put(key, value_with(&shared.filler, stamp)).await
            }
            Workload::Get => {
                let key = shared.keys[rng.random_range(0..space) as usize].clone();
                conn.get(key, strong).await
            }
            Workload::Mix => {
                let key = shared.keys[rng.random_range(0..space) as usize].clone();
                if rng.random_range(0..100u8) < args.read_percent {
                    conn.get(key, strong).await
                } else {
                    stamp += 1;
                    conn.put(key, value_with(&shared.filler, stamp)).await
                }
            }
            Workload::Txn => {
                let k = if owned > 0 {
                    id as u64 + rng.random_range(0..owned) * args.clients as u64
                } else {
                    rng.random_range(0..space)
                };
                let key = shared.keys[k as usize].clone();
                let expect = expected
                    .get(&k)
                    .cloned()
                    .unwrap_or_else(|| shared.filler.clone());
                stamp += 1;
                let next = value_with(&shared.filler, stamp);
                match conn.cas(key, expect, next.clone()).await {
                    Ok(outcome) => {
                        if outcome.succeeded {
                            expected.insert(k, next);
                        } else {
                            tally.cas_failed += 1;
                            match outcome.current {
                                Some(v) => expected.insert(k, v),
                                None => expected.remove(&k),
                            };
                        }
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            Workload::Leader | Workload::Probe => return Ok(tally),
        };
        tally.record(started, result);
        shared.finished.fetch_add(1, Ordering::Relaxed);
    }
    Ok(tally)
}

/// Times a failover from the outside: writes through the given (surviving) endpoints, round-robin, until
/// one succeeds, and prints the milliseconds since `--since-unix-ns`. A failed or slow attempt is
/// abandoned after --timeout-ms and the next endpoint is tried at once.
async fn probe(args: &BenchArgs, tls: Option<&ClientTlsConfig>) -> Result<ExitCode, BenchError> {
    let since = args.since_unix_ns.unwrap_or_else(unix_ns);
    let conns = driver::connect(
        args.target,
        &args.endpoints,
        args.endpoints.len(),
        args.timeout(),
        tls,
    )
    .await?;
    let give_up = Duration::from_secs(30);
    let begin = Instant::now();
    let mut attempt = 0usize;
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    while begin.elapsed() < give_up {
        let mut conn = conns[attempt % conns.len()].clone();
        attempt += 1;
        match conn
            .put(
                b"bench/failover-probe".to_vec(),
                unix_ns().to_string().into(),
            )
            .await
        {
            Ok(()) => {
                let ms = unix_ns().saturating_sub(since) as f64 / 1e6;
                tracing::debug!(attempt, ?failures, "first successful write");
                println!("{ms:.1}");
                return Ok(ExitCode::SUCCESS);
            }
            Err(e) => {
                *failures.entry(e.code).or_default() += 1;
                // Connection refused returns at once; do not spin on it.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }
    Err(BenchError::ProbeTimeout(give_up))
}

fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        for bad in ["", "s", "-1s", "0s", "1h", "1.2.3s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn keys_are_fixed_width_and_values_distinct() {
        assert_eq!(key_name(7).len(), key_name(9_999_999).len());
        let filler = vec![b'x'; 16];
        assert_ne!(value_with(&filler, 1), value_with(&filler, 2));
        assert_eq!(value_with(&filler, 1).len(), 16);
        assert_eq!(value_with(&[b'x'; 3], 1).len(), 3);
    }
}
