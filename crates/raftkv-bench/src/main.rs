//! The `raftkv-bench` binary; `raftkv bench ARGS` runs it with the same arguments.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "raftkv bench",
    version,
    about = "Load a raftkv (or etcd) cluster and report throughput and latency"
)]
struct Cli {
    #[command(flatten)]
    args: raftkv_bench::BenchArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    raftkv::cli::init_tracing();
    raftkv::cli::tool_exit(raftkv_bench::run(cli.args).await)
}
