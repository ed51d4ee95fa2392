//! gRPC's deadline convention, on both ports: a caller's deadline arrives as the `grpc-timeout` header,
//! and every call this node makes carries one.

use std::time::Duration;

use tonic::metadata::MetadataMap;

const GRPC_TIMEOUT_HEADER: &str = "grpc-timeout";

/// The client's deadline from the `grpc-timeout` header (e.g. `500m`, `5S`), if it sent one.
pub fn timeout_of(metadata: &MetadataMap) -> Option<Duration> {
    parse_grpc_timeout(metadata.get(GRPC_TIMEOUT_HEADER)?.to_str().ok()?)
}

/// The same, from the HTTP/2 headers of a call that has not reached tonic yet (a tower layer).
pub fn timeout_in(headers: &http::HeaderMap) -> Option<Duration> {
    parse_grpc_timeout(headers.get(GRPC_TIMEOUT_HEADER)?.to_str().ok()?)
}

fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A request that tells the callee how long the caller waits, so the callee can answer (or give up)
/// in time rather than work on for nobody.
pub fn request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeouts() {
        let mut md = MetadataMap::new();
        assert_eq!(timeout_of(&md), None);
        for (v, want) in [
            ("500m", Duration::from_millis(500)),
            ("5S", Duration::from_secs(5)),
            ("2M", Duration::from_secs(120)),
            ("100u", Duration::from_micros(100)),
        ] {
            md.insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(timeout_of(&md), Some(want), "{v}");
        }
        md.insert("grpc-timeout", "5x".parse().unwrap());
        assert_eq!(timeout_of(&md), None);
    }
}
