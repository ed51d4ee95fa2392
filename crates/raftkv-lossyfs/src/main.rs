//! `raftkv-lossyfs`: mounts a store by hand, to try a program on it or read a failed run's data.
//!
//! `mount STORE MOUNTPOINT` serves until the mountpoint is unmounted (`umount MOUNTPOINT`: an
//! orderly unmount, everything becomes durable) or the process is killed (a power cut: what was not
//! fsynced is gone). `export STORE DIR` writes the durable tree out as ordinary files.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(about = "A FUSE filesystem that loses what was not fsynced")]
enum Cli {
    /// Mount STORE on MOUNTPOINT in the foreground.
    Mount { store: PathBuf, mountpoint: PathBuf },
    /// Write STORE's durable tree out under DIR.
    Export { store: PathBuf, dir: PathBuf },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    match Cli::parse() {
        Cli::Mount { store, mountpoint } => {
            let mount = raftkv_lossyfs::Mount::new(&store, &mountpoint)?;
            println!("mounted {} on {}", store.display(), mountpoint.display());
            mount.wait()?;
        }
        Cli::Export { store, dir } => raftkv_lossyfs::export(&store, &dir)?,
    }
    Ok(())
}
