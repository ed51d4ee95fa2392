use std::time::Duration;

use tonic::transport::{ClientTlsConfig, Endpoint};

/// How long a TLS handshake with a node may take before the connection attempt fails.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The connection settings every connection to a raftkv node uses. With `tls` the address is dialed
/// over https (whatever scheme it was written with), and the server's certificate must be valid for
/// the address' host.
pub fn endpoint(
    addr: &str,
    tls: Option<&ClientTlsConfig>,
) -> Result<Endpoint, tonic::transport::Error> {
    let uri = match (addr.split_once("://"), tls) {
        (Some((_, rest)), Some(_)) => format!("https://{rest}"),
        (Some(_), None) => addr.to_string(),
        (None, Some(_)) => format!("https://{addr}"),
        (None, None) => format!("http://{addr}"),
    };
    let mut endpoint = Endpoint::from_shared(uri)?;
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.clone().timeout(TLS_HANDSHAKE_TIMEOUT))?;
    }
    Ok(endpoint
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5)))
}
