//! A lock around a piece of work: take `locks/NAME`, do the work while the lock's lease is kept
//! alive, stop at once if the lease is lost, then unlock. The lock's revision is the fencing token
//! to hand to whatever the work writes to.
//!
//! ```sh
//! scripts/cluster.sh start
//! cargo run -p raftkv-client --example lock -- nightly-report &
//! cargo run -p raftkv-client --example lock -- nightly-report   # waits for the first
//! ```

use std::sync::Arc;
use std::time::Duration;

use raftkv_client::Client;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let name = std::env::args().nth(1).unwrap_or_else(|| "example".into());
    let endpoints: Vec<String> = ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]
        .map(String::from)
        .to_vec();
    let client = Arc::new(Client::new(&endpoints, Duration::from_secs(5))?);
    let mut lock = client
        .lock(format!("locks/{name}").into_bytes(), Duration::from_secs(5))
        .await?;
    println!("holding locks/{name}, fencing token {}", lock.revision());
    tokio::select! {
        lost = lock.lost() => {
            eprintln!("lost the lock ({lost}): stopping the work");
            std::process::exit(1);
        }
        _ = work() => {}
    }
    lock.unlock().await?;
    println!("released locks/{name}");
    Ok(())
}

/// Stands for the work the lock protects.
async fn work() {
    tokio::time::sleep(Duration::from_secs(3)).await;
}
