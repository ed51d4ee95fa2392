//! TLS for the public port, the peer port and every raftkv client, with rustls on ring (no C
//! toolchain), and the certificates `raftkv certs` makes.
//!
//! The server side is a rustls `ServerConfig` that raftkv's own listener applies
//! (`listener::limited_incoming`), not tonic's `Server::tls_config`: the listener watches the
//! decrypted byte stream for a client's first request, which it could not do on ciphertext, and it
//! must bound the handshake by the same deadline. The client side is tonic's `ClientTlsConfig`,
//! built from files that are parsed here first, so that a bad file is named at start rather than
//! reported as a vague connection error on the first call.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tonic::transport::{ClientTlsConfig, Identity};

use crate::types::NodeId;

/// A PEM file larger than this is not a certificate chain, key or CA bundle anyone meant to give;
/// refusing it keeps a mistyped path (a database, a log) from being read into memory.
pub const MAX_PEM_BYTES: u64 = 4 * 1024 * 1024;

/// ALPN: gRPC is HTTP/2 only, and clients (tonic's, grpcurl's) refuse a server that does not say so.
const ALPN_H2: &[u8] = b"h2";

/// How a node certificate from `raftkv certs` names its node: a URI subject alternative name. Host
/// name checks ignore URI names, so the same certificate still verifies as a server for its hosts.
pub const NODE_URI_PREFIX: &str = "raftkv://node/";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: larger than {MAX_PEM_BYTES} bytes, so not a PEM certificate or key", path.display())]
    TooLarge { path: PathBuf },
    #[error("{}: not valid PEM: {reason}", path.display())]
    Pem { path: PathBuf, reason: String },
    #[error("{}: no {what} in it (expected a PEM block such as `-----BEGIN {what}-----`)", path.display())]
    Missing { path: PathBuf, what: &'static str },
    #[error("{}: not a usable CA certificate: {source}", path.display())]
    BadCa {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("{} and {}: {source}", cert.display(), key.display())]
    BadIdentity {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("client certificate verification with CA {}: {reason}", path.display())]
    Verifier { path: PathBuf, reason: String },
    /// Flags that only make sense together, given apart.
    #[error("{0}")]
    Incomplete(String),
    #[error("client TLS settings: {0}")]
    Client(#[from] tonic::transport::Error),
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("{}: already exists; pick another --out or remove the old certificates first", path.display())]
    Exists { path: PathBuf },
}

/// The whole file, bounded by [`MAX_PEM_BYTES`].
fn read_pem_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    let read = |source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(read)?
        .take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(TlsError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

fn pem_error(path: &Path, e: rustls_pki_types::pem::Error) -> TlsError {
    TlsError::Pem {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Every certificate in a PEM file (a chain: the leaf first), and the file's bytes.
pub fn load_certs(path: &Path) -> Result<(Vec<CertificateDer<'static>>, Vec<u8>), TlsError> {
    let pem = read_pem_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::Missing {
            path: path.to_path_buf(),
            what: "CERTIFICATE",
        });
    }
    Ok((certs, pem))
}

/// The first private key in a PEM file (PKCS#8, PKCS#1 or SEC1), and the file's bytes.
pub fn load_key(path: &Path) -> Result<(PrivateKeyDer<'static>, Vec<u8>), TlsError> {
    let pem = read_pem_file(path)?;
    match PrivateKeyDer::from_pem_slice(&pem) {
        Ok(key) => Ok((key, pem)),
        Err(rustls_pki_types::pem::Error::NoItemsFound) => Err(TlsError::Missing {
            path: path.to_path_buf(),
            what: "PRIVATE KEY",
        }),
        Err(e) => Err(pem_error(path, e)),
    }
}

/// A CA bundle: every certificate in it is trusted, and each must be one webpki can use as an
/// anchor, so a file with one good and one broken certificate is refused rather than half used.
pub fn load_roots(path: &Path) -> Result<(RootCertStore, Vec<u8>), TlsError> {
    let (certs, pem) = load_certs(path)?;
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|source| TlsError::BadCa {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok((roots, pem))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Where a TLS listener's certificate, key and client CA come from, and whether clients must show a
/// certificate that CA signed.
#[derive(Clone, Debug)]
pub struct ServerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    pub require_client_cert: bool,
}

impl ServerTlsFiles {
    /// The rustls configuration these files describe. A client CA without `require_client_cert`
    /// verifies a certificate a client chooses to show but lets clients without one in.
    pub fn load(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let (certs, _) = load_certs(&self.cert)?;
        let (key, _) = load_key(&self.key)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::BadIdentity {
                cert: self.cert.clone(),
                key: self.key.clone(),
                source,
            })?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let (roots, _) = load_roots(ca)?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
                let verifier = if self.require_client_cert {
                    verifier
                } else {
                    verifier.allow_unauthenticated()
                };
                let verifier = verifier.build().map_err(|e| TlsError::Verifier {
                    path: ca.clone(),
                    reason: e.to_string(),
                })?;
                builder.with_client_cert_verifier(verifier)
            }
            None if self.require_client_cert => {
                return Err(TlsError::Incomplete(
                    "client certificates are required but no CA to check them against was given"
                        .into(),
                ));
            }
            None => builder.with_no_client_auth(),
        };
        let mut config =
            builder
                .with_single_cert(certs, key)
                .map_err(|source| TlsError::BadIdentity {
                    cert: self.cert.clone(),
                    key: self.key.clone(),
                    source,
                })?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(config))
    }
}

/// A listener's TLS settings, which can be reloaded from their files while the node runs: each new
/// connection gets the configuration current when it arrived; open connections keep theirs.
pub struct ServerTls {
    files: ServerTlsFiles,
    current: RwLock<TlsAcceptor>,
}

impl ServerTls {
    pub fn new(files: ServerTlsFiles) -> Result<Arc<Self>, TlsError> {
        let config = files.load()?;
        Ok(Arc::new(ServerTls {
            files,
            current: RwLock::new(TlsAcceptor::from(config)),
        }))
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Reads the files again. On an error the old configuration stays in force: a certificate
    /// rotation that went wrong must not leave the node unable to accept anyone.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = self.files.load()?;
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = TlsAcceptor::from(config);
        Ok(())
    }

    pub fn files(&self) -> &ServerTlsFiles {
        &self.files
    }
}

/// The TLS side of a client: the CA that signed the servers' certificates and, for servers that
/// ask for one, this client's own certificate and key. The files are parsed here so that a bad one
/// is named now; tonic then gets the same PEM.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientTlsConfig, TlsError> {
    let (roots, _) = load_roots(ca)?;
    let mut config = ClientTlsConfig::new().trust_anchors(roots.roots);
    if let Some((cert_path, key_path)) = identity {
        let (certs, cert_pem) = load_certs(cert_path)?;
        let (key, key_pem) = load_key(key_path)?;
        // The same check rustls makes when it uses the pair, made before any connection.
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .and_then(|b| {
                b.with_root_certificates(RootCertStore::empty())
                    .with_client_auth_cert(certs, key)
            })
            .map_err(|source| TlsError::BadIdentity {
                cert: cert_path.to_path_buf(),
                key: key_path.to_path_buf(),
                source,
            })?;
        config = config.identity(Identity::from_pem(cert_pem, key_pem));
    }
    Ok(config)
}

/// The etcdctl-style client flags (`--cacert`, `--cert`, `--key`) as a client configuration:
/// None without a CA (plaintext), an error for a certificate without its key or either without a CA.
pub fn client_config_from_flags(
    cacert: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<Option<ClientTlsConfig>, TlsError> {
    let identity = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        (Some(_), None) => return Err(TlsError::Incomplete("--cert needs --key".into())),
        (None, Some(_)) => return Err(TlsError::Incomplete("--key needs --cert".into())),
    };
    match cacert {
        Some(ca) => client_config(ca, identity).map(Some),
        None if identity.is_some() => Err(TlsError::Incomplete(
            "--cert and --key need --cacert (the CA that signed the servers' certificates)".into(),
        )),
        None => Ok(None),
    }
}

/// The client's TLS flags, as etcdctl spells them; shared by the CLI and `raftkv bench`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ClientTlsArgs {
    /// CA certificate(s) (PEM) that signed the nodes' certificates; with it, nodes are dialed over
    /// TLS (https) and must show a certificate valid for the address dialed.
    #[arg(long, env = "RAFTKV_CACERT", global = true)]
    pub cacert: Option<PathBuf>,
    /// This client's certificate (PEM), for nodes started with --client-cert-auth. Needs --key.
    #[arg(long, env = "RAFTKV_CERT", global = true)]
    pub cert: Option<PathBuf>,
    /// The private key (PEM) of --cert. (Its id is not `key`: that is the key a command reads or writes.)
    #[arg(long = "key", id = "tls_key", env = "RAFTKV_KEY", global = true)]
    pub key: Option<PathBuf>,
}

impl ClientTlsArgs {
    pub fn config(&self) -> Result<Option<ClientTlsConfig>, TlsError> {
        client_config_from_flags(
            self.cacert.as_deref(),
            self.cert.as_deref(),
            self.key.as_deref(),
        )
    }
}

/// The node id a certificate from `raftkv certs` was made for, if it names one.
pub fn node_id_of(cert: &CertificateDer<'_>) -> Option<NodeId> {
    let cert = webpki::EndEntityCert::try_from(cert).ok()?;
    let mut ids = cert
        .valid_uri_names()
        .filter_map(|uri| uri.strip_prefix(NODE_URI_PREFIX)?.parse::<NodeId>().ok());
    let id = ids.next()?;
    // A certificate that claims two nodes is not evidence for either.
    ids.next().is_none().then_some(id)
}

/// The file names `raftkv certs` writes, relative to its output directory.
pub mod files {
    /// Signs the node certificates: what clients check nodes against, and peers each other.
    pub const CA: &str = "ca.pem";
    pub const CA_KEY: &str = "ca-key.pem";
    /// Signs client certificates only, so a client's certificate is no good on the peer port.
    pub const CLIENT_CA: &str = "client-ca.pem";
    pub const CLIENT_CA_KEY: &str = "client-ca-key.pem";
    pub const CLIENT: &str = "client.pem";
    pub const CLIENT_KEY: &str = "client-key.pem";

    pub fn node(id: u64) -> String {
        format!("node{id}.pem")
    }

    pub fn node_key(id: u64) -> String {
        format!("node{id}-key.pem")
    }
}

/// The server flags that run node `id` with TLS on both ports from the files `raftkv certs` wrote
/// into `dir`: its own certificate on each port, the nodes' CA for peers and the client CA for
/// clients' certificates (which only `--client-cert-auth` makes required).
pub fn node_server_args(dir: &Path, id: NodeId) -> Vec<String> {
    let path = |name: &str| dir.join(name).display().to_string();
    let (cert, key, ca) = (
        path(&files::node(id)),
        path(&files::node_key(id)),
        path(files::CA),
    );
    vec![
        format!("--cert-file={cert}"),
        format!("--key-file={key}"),
        format!("--trusted-ca-file={}", path(files::CLIENT_CA)),
        format!("--peer-cert-file={cert}"),
        format!("--peer-key-file={key}"),
        format!("--peer-trusted-ca-file={ca}"),
    ]
}

/// A client configuration from a `raftkv certs` directory, with the client certificate.
pub fn client_config_from_dir(dir: &Path) -> Result<ClientTlsConfig, TlsError> {
    client_config(
        &dir.join(files::CA),
        Some((&dir.join(files::CLIENT), &dir.join(files::CLIENT_KEY))),
    )
}

/// A CA and the certificates it signed, in PEM, before they are written anywhere.
pub struct GeneratedCerts {
    /// (file name, contents, is a private key).
    pub files: Vec<(String, String, bool)>,
}

/// A fresh CA, and per node a certificate valid for `hosts` that serves both as a server and as a
/// client certificate (the same file works on the public and the peer port, and for dialing peers);
/// plus a second CA and a client certificate it signed, for the CLI. Client certificates have a CA
/// of their own because peers trust whatever their CA signed: a CLI certificate from the nodes' CA
/// could speak on the peer port. `subject` names the CAs, so that two sets are told apart.
pub fn generate(
    subject: &str,
    hosts: &[String],
    nodes: &[NodeId],
) -> Result<GeneratedCerts, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };
    let mut files = Vec::new();
    let mut ca = |name: String, cert_file: &str, key_file: &str| {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        files.push((cert_file.to_string(), cert.pem(), false));
        files.push((key_file.to_string(), key.serialize_pem(), true));
        Ok::<_, TlsError>(Issuer::new(params, key))
    };
    let node_ca = ca(format!("{subject} CA"), files::CA, files::CA_KEY)?;
    let client_ca = ca(
        format!("{subject} client CA"),
        files::CLIENT_CA,
        files::CLIENT_CA_KEY,
    )?;
    let leaf = |name: String,
                sans: Vec<SanType>,
                usages: Vec<ExtendedKeyUsagePurpose>,
                issuer: &Issuer<'_, KeyPair>|
     -> Result<(String, String), TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = sans;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = usages;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let host_sans = hosts
        .iter()
        .map(|h| match h.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(h.clone().try_into()?)),
        })
        .collect::<Result<Vec<_>, rcgen::Error>>()?;
    for &id in nodes {
        let mut sans = host_sans.clone();
        sans.push(SanType::URI(format!("{NODE_URI_PREFIX}{id}").try_into()?));
        let both = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let (cert, key) = leaf(format!("raftkv node {id}"), sans, both, &node_ca)?;
        files.push((files::node(id), cert, false));
        files.push((files::node_key(id), key, true));
    }
    let (cert, key) = leaf(
        "raftkv client".to_string(),
        Vec::new(),
        vec![ExtendedKeyUsagePurpose::ClientAuth],
        &client_ca,
    )?;
    files.push((files::CLIENT.to_string(), cert, false));
    files.push((files::CLIENT_KEY.to_string(), key, true));
    Ok(GeneratedCerts { files })
}

impl GeneratedCerts {
    /// Writes every file into `dir` (created if missing), keys readable by their owner only. Refuses
    /// to replace an existing file: a new CA would silently lock a running cluster's nodes out of
    /// each other.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>, TlsError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        for (name, _, _) in &self.files {
            let path = dir.join(name);
            if path.exists() {
                return Err(TlsError::Exists { path });
            }
        }
        let mut written = Vec::new();
        for (name, contents, secret) in &self.files {
            let path = dir.join(name);
            let write = |source| TlsError::Write {
                path: path.clone(),
                source,
            };
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(if *secret { 0o600 } else { 0o644 })
                .open(&path)
                .map_err(write)?;
            file.write_all(contents.as_bytes()).map_err(write)?;
            file.sync_all().map_err(write)?;
            written.push(path);
        }
        Ok(written)
    }
}

/// `raftkv certs`: a CA, node certificates and a client certificate for a cluster.
#[derive(clap::Args, Debug, Clone)]
pub struct CertsArgs {
    /// Directory to write the PEM files into (created if missing; existing files are not replaced).
    #[arg(long)]
    pub out: PathBuf,
    /// Host names and IP addresses the node certificates are valid for: every address clients and
    /// peers dial a node at.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1,localhost,::1")]
    pub hosts: Vec<String>,
    /// Node ids to make certificates for.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub nodes: Vec<NodeId>,
}

pub fn run_certs(args: &CertsArgs) -> anyhow::Result<std::process::ExitCode> {
    anyhow::ensure!(!args.hosts.is_empty(), "--hosts is empty");
    anyhow::ensure!(
        !args.nodes.contains(&0),
        "node id 0 is reserved (it means 'no leader')"
    );
    let certs = generate("raftkv", &args.hosts, &args.nodes)?;
    for path in certs.write(&args.out)? {
        println!("{}", path.display());
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_set(dir: &Path) {
        generate("test", &["127.0.0.1".into()], &[1, 2])
            .unwrap()
            .write(dir)
            .unwrap();
    }

    #[test]
    fn generated_files_load_and_keys_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path());
        let files = ServerTlsFiles {
            cert: dir.path().join(files::node(1)),
            key: dir.path().join(files::node_key(1)),
            client_ca: Some(dir.path().join(files::CLIENT_CA)),
            require_client_cert: true,
        };
        let config = files.load().unwrap();
        assert_eq!(config.alpn_protocols, vec![b"h2".to_vec()]);
        client_config(
            &dir.path().join(files::CA),
            Some((
                &dir.path().join(files::CLIENT),
                &dir.path().join(files::CLIENT_KEY),
            )),
        )
        .unwrap();
        for key in [
            files::CA_KEY,
            files::CLIENT_CA_KEY,
            &files::node_key(2),
            files::CLIENT_KEY,
        ] {
            let mode = std::fs::metadata(dir.path().join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        let (node2, _) = load_certs(&dir.path().join(files::node(2))).unwrap();
        assert_eq!(node_id_of(&node2[0]), Some(2));
        let (client, _) = load_certs(&dir.path().join(files::CLIENT)).unwrap();
        assert_eq!(node_id_of(&client[0]), None);
        // A second run into the same directory would replace the CA: refused.
        let again = generate("test", &["127.0.0.1".into()], &[1]).unwrap();
        assert!(matches!(
            again.write(dir.path()),
            Err(TlsError::Exists { .. })
        ));
    }

    #[test]
    fn bad_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path());
        let missing = dir.path().join("nope.pem");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not pem at all\n").unwrap();
        let cert = dir.path().join(files::node(1));
        let key = dir.path().join(files::node_key(1));
        let other_key = dir.path().join(files::node_key(2));
        let load = |cert: &Path, key: &Path, ca: Option<&Path>| {
            ServerTlsFiles {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                client_ca: ca.map(Path::to_path_buf),
                require_client_cert: ca.is_some(),
            }
            .load()
            .map(|_| ())
            .unwrap_err()
            .to_string()
        };
        let err = load(&missing, &key, None);
        assert!(err.contains("nope.pem"), "{err}");
        let err = load(&garbage, &key, None);
        assert!(
            err.contains("garbage.pem") && err.contains("CERTIFICATE"),
            "{err}"
        );
        let err = load(&cert, &cert, None);
        assert!(err.contains("PRIVATE KEY"), "{err}");
        let err = load(&cert, &other_key, None);
        assert!(
            err.contains("node1.pem") && err.contains("node2-key.pem"),
            "{err}"
        );
        let err = load(&cert, &key, Some(&garbage));
        assert!(err.contains("garbage.pem"), "{err}");
    }

    #[test]
    fn client_flags_must_come_together() {
        let p = Path::new("x.pem");
        assert!(
            client_config_from_flags(None, None, None)
                .unwrap()
                .is_none()
        );
        for (ca, cert, key) in [
            (None, Some(p), Some(p)),
            (Some(p), Some(p), None),
            (Some(p), None, Some(p)),
        ] {
            assert!(matches!(
                client_config_from_flags(ca, cert, key),
                Err(TlsError::Incomplete(_))
            ));
        }
    }
}
