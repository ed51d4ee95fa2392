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
    let filter = std::env::var("RAFTKV_LOG")
        .ok()
        .and_then(|s| tracing_subscriber::EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info,h2=warn,tower=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    match raftkv_bench::run(cli.args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
