//! Results: throughput, HDR latency percentiles, errors by status code; as text or JSON; plus the
//! progress display while a run lasts.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use super::{BenchArgs, BenchError, Consistency, Shared, Tally, Target, Workload};

/// Latencies in microseconds.
#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub target: Target,
    pub workload: Workload,
    pub consistency: Consistency,
    pub clients: usize,
    pub connections: usize,
    pub endpoints: Vec<String>,
    pub key_space: u64,
    pub value_size: usize,
    pub elapsed_s: f64,
    /// Successful requests.
    pub ops: u64,
    pub ops_per_s: f64,
    pub latency_us: Latency,
    /// Failed requests by gRPC status code.
    pub errors: BTreeMap<String, u64>,
    /// Compare-and-swap requests whose compare failed (they count as successful requests).
    pub cas_failed: u64,
}

impl Report {
    pub(super) fn new(args: &BenchArgs, tally: &Tally, elapsed: Duration) -> Self {
        let h = &tally.hist;
        let ops = h.len();
        let secs = elapsed.as_secs_f64().max(1e-9);
        let q = |q: f64| if ops == 0 { 0 } else { h.value_at_quantile(q) };
        Report {
            target: args.target,
            workload: args.workload,
            consistency: args.consistency,
            clients: args.clients,
            connections: args.connections,
            endpoints: args.endpoints.clone(),
            key_space: args.key_space,
            value_size: args.value_size,
            elapsed_s: secs,
            ops,
            ops_per_s: ops as f64 / secs,
            latency_us: Latency {
                p50: q(0.5),
                p90: q(0.9),
                p99: q(0.99),
                p999: q(0.999),
                max: if ops == 0 { 0 } else { h.max() },
                mean: if ops == 0 { 0.0 } else { h.mean() },
            },
            errors: tally.errors.clone(),
            cas_failed: tally.cas_failed,
        }
    }

    /// Prints the text report, and writes JSON where asked (`-`: JSON on stdout instead of text).
    pub(super) fn emit(&self, json: Option<&Path>) -> Result<(), BenchError> {
        let out_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| BenchError::Output { path, source }
        };
        let text = serde_json::to_string_pretty(self).map_err(|e| BenchError::Output {
            path: PathBuf::from("-"),
            source: e.into(),
        })?;
        match json {
            Some(p) if p == Path::new("-") => {
                println!("{text}");
            }
            Some(p) => {
                std::fs::File::create(p)
                    .and_then(|mut f| writeln!(f, "{text}"))
                    .map_err(out_err(p))?;
                print!("{self}");
            }
            None => print!("{self}"),
        }
        Ok(())
    }
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match (self.workload, self.consistency) {
            (Workload::Get | Workload::Mix, Consistency::Eventual) => {
                format!("{:?} (eventual)", self.workload)
            }
            (Workload::Get | Workload::Mix, Consistency::Strong) => {
                format!("{:?} (strong)", self.workload)
            }
            (w, _) => format!("{w:?}"),
        };
        writeln!(
            f,
            "{:?} {what}: {} clients, {} connections over {} endpoints, {} keys, {} B values",
            self.target,
            self.clients,
            self.connections,
            self.endpoints.len(),
            self.key_space,
            self.value_size
        )?;
        writeln!(
            f,
            "  throughput  {:.1} ops/s ({} ops in {:.2} s)",
            self.ops_per_s, self.ops, self.elapsed_s
        )?;
        let l = &self.latency_us;
        writeln!(
            f,
            "  latency ms  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  mean {:.2}",
            ms(l.p50),
            ms(l.p90),
            ms(l.p99),
            ms(l.p999),
            ms(l.max),
            l.mean / 1000.0
        )?;
        if self.errors.is_empty() {
            writeln!(f, "  errors      none")?;
        } else {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(c, n)| format!("{c}: {n}"))
                .collect();
            writeln!(f, "  errors      {}", list.join(", "))?;
        }
        if self.workload == Workload::Txn {
            writeln!(f, "  cas failed  {}", self.cas_failed)?;
        }
        Ok(())
    }
}

/// A progress bar on a terminal, updated four times a second; nothing when stderr is not a terminal.
pub(super) struct Progress {
    bar: Option<ProgressBar>,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    pub(super) fn start(args: &BenchArgs, shared: Arc<Shared>) -> Self {
        if args.quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            return Self {
                bar: None,
                ticker: None,
            };
        }
        let (len, by_ops) = match args.total {
            Some(t) => (t, true),
            None => (args.duration.as_millis() as u64, false),
        };
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        let template = "{spinner} [{elapsed_precise}] {wide_bar} {msg}";
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        let b = bar.clone();
        let ticker = tokio::spawn(async move {
            let begin = tokio::time::Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            let mut last = (begin, 0u64);
            loop {
                tick.tick().await;
                let done = shared.finished.load(Ordering::Relaxed);
                let now = tokio::time::Instant::now();
                let rate = (done - last.1) as f64 / (now - last.0).as_secs_f64().max(1e-3);
                last = (now, done);
                b.set_position(if by_ops {
                    done
                } else {
                    (now - begin).as_millis() as u64
                });
                b.set_message(format!("{done} ops, {rate:.0} ops/s"));
            }
        });
        Self {
            bar: Some(bar),
            ticker: Some(ticker),
        }
    }

    pub(super) fn finish(self) {
        if let Some(t) = self.ticker {
            t.abort();
        }
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}
