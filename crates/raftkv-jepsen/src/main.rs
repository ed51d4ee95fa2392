//! The `raftkv-jepsen` binary; `raftkv jepsen ARGS` runs it with the same arguments.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "raftkv jepsen",
    version,
    about = "Fault test: start a fresh cluster, inject partitions, crashes and pauses under load, check \
             the history (exit 0 pass, 1 anomaly, 2 unknown)"
)]
struct Cli {
    #[command(flatten)]
    args: raftkv_jepsen::JepsenArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    raftkv::cli::init_tracing();
    raftkv::cli::tool_exit(raftkv_jepsen::run(cli.args).await)
}
