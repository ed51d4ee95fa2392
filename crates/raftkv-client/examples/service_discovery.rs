//! Service discovery: each instance registers itself under `services/NAME/` with a lease, and every
//! instance watches that prefix to keep the list of live instances. An instance that dies stops
//! renewing its lease, and its key goes within the TTL; one that stops cleanly revokes it at once.
//!
//! ```sh
//! scripts/cluster.sh start
//! cargo run -p raftkv-client --example service_discovery -- api 10.0.0.1:8080 &
//! cargo run -p raftkv-client --example service_discovery -- api 10.0.0.2:8080
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use raftkv_client::pb::v1 as pb;
use raftkv_client::{Client, WatchOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(service), Some(address)) = (args.next(), args.next()) else {
        eprintln!("usage: service_discovery SERVICE ADDRESS [ENDPOINTS]");
        std::process::exit(2);
    };
    let endpoints: Vec<String> = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003".into())
        .split(',')
        .map(str::to_string)
        .collect();
    let client = Arc::new(Client::new(&endpoints, Duration::from_secs(5))?);
    let prefix = format!("services/{service}/");

    // Register: a key that lives as long as this process keeps its lease alive.
    let lease = client.lease_grant(Duration::from_secs(5), 0).await?;
    let mut alive = client.keep_alive(lease.id, Duration::from_millis(lease.ttl_ms));
    let me = format!("{prefix}{address}");
    client
        .put_with_lease(
            me.clone().into_bytes(),
            address.clone().into_bytes(),
            lease.id,
        )
        .await?;

    // Discover: the instances now, then every change after the revision they were read at.
    let now = client
        .scan(pb::ScanRequest {
            start: prefix.clone().into_bytes(),
            end: raftkv_client::prefix_end(prefix.as_bytes()),
            limit: 0,
            consistency: pb::Consistency::Strong as i32,
            min_revision: 0,
        })
        .await?;
    let mut live: BTreeMap<Vec<u8>, Vec<u8>> =
        now.kvs.into_iter().map(|kv| (kv.key, kv.value)).collect();
    print_live(&live);
    let from = now.header.map_or(0, |h| h.revision) + 1;
    let mut watch = client.watch(WatchOptions::prefix(prefix).from_revision(from));
    loop {
        tokio::select! {
            lost = alive.lost() => {
                eprintln!("registration lost: {lost}");
                std::process::exit(1);
            }
            _ = tokio::signal::ctrl_c() => {
                client.lease_revoke(lease.id).await?;
                return Ok(());
            }
            response = watch.next() => {
                let Some(response) = response else { return Ok(()) };
                for event in response?.events {
                    let kv = event.kv.unwrap_or_default();
                    if event.r#type == pb::EventType::Delete as i32 {
                        live.remove(&kv.key);
                    } else {
                        live.insert(kv.key, kv.value);
                    }
                }
                print_live(&live);
            }
        }
    }
}

fn print_live(live: &BTreeMap<Vec<u8>, Vec<u8>>) {
    let instances: Vec<String> = live
        .values()
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    println!("live: {}", instances.join(", "));
}
