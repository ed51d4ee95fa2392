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
    match raftkv_jepsen::run(cli.args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
