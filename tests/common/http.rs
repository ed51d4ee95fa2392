//! The metrics endpoint as Prometheus sees it: a plain HTTP/1.0 GET and the text format's samples.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One HTTP/1.0 GET: the status code and the body. Errors (a refused or closed connection) as Err.
pub fn get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {answer:?}")))?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The samples of a scrape, `name{labels}` to value.
pub fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// A started three-node cluster whose nodes serve metrics, each on a free port, with `extra(id)`
/// after `--metrics-listen`; returns the cluster and each node's metrics address.
pub fn cluster_with_metrics(
    extra: impl Fn(u64) -> Vec<String>,
) -> (super::Cluster, BTreeMap<u64, String>) {
    let mut specs = raftkv_testkit::loopback(3).expect("free ports");
    let mut metrics = BTreeMap::new();
    for spec in &mut specs {
        let addr = format!(
            "127.0.0.1:{}",
            raftkv_testkit::free_port().expect("free port")
        );
        spec.args = vec!["--metrics-listen".into(), addr.clone()];
        spec.args.extend(extra(spec.id));
        metrics.insert(spec.id, addr);
    }
    let builder = raftkv_testkit::Cluster::builder(super::bin()).nodes(specs);
    (super::Cluster::started(builder), metrics)
}
