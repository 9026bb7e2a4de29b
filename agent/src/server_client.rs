//! The agent's side of the node API: one gRPC channel over mTLS whose client
//! certificate is swapped in place on renewal, attestation with a join token,
//! and the persisted agent identity (SVID, key 0600, bundle).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use hyper_util::rt::TokioIo;
use meshid_identity::SvidInfo;
use meshid_identity::verify::{Authorizer, SpiffeServerVerifier, TrustBundles};
use meshid_proto::node::AttestRequest;
use meshid_proto::node::node_client::NodeClient;
use meshid_proto::types::{Bundle, X509Svid};
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tonic::transport::{Channel, Endpoint};

/// Failures talking to the server or handling the agent identity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server refused or failed a call.
    #[error("server: {0}")]
    Status(#[from] tonic::Status),
    /// No connection could be made.
    #[error("connect to {addr}: {message}")]
    Connect {
        /// Address tried.
        addr: String,
        /// Why.
        message: String,
    },
    /// The agent identity files are missing, unreadable or invalid.
    #[error("agent identity: {0}")]
    Identity(String),
    /// Local I/O.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// The agent's own SVID and key.
#[derive(Clone)]
pub struct AgentIdentity {
    /// DER chain, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 DER key.
    pub key: Vec<u8>,
    /// Parsed leaf.
    pub info: SvidInfo,
}

impl std::fmt::Debug for AgentIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentIdentity")
            .field("spiffe_id", &self.info.spiffe_id.to_string())
            .finish_non_exhaustive()
    }
}

impl AgentIdentity {
    /// From a signed SVID and the key its CSR was made with.
    pub fn new(svid: &X509Svid, key: Vec<u8>) -> Result<Self, ClientError> {
        let leaf = svid
            .cert_chain
            .first()
            .ok_or_else(|| ClientError::Identity("empty chain".into()))?;
        let info = SvidInfo::from_der(leaf).map_err(|e| ClientError::Identity(e.to_string()))?;
        Ok(Self {
            chain: svid.cert_chain.clone(),
            key,
            info,
        })
    }

    fn certified_key(&self) -> Result<CertifiedKey, ClientError> {
        let provider = meshid_identity::crypto::provider();
        let signing = provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                self.key.clone(),
            )))
            .map_err(|e| ClientError::Identity(e.to_string()))?;
        Ok(CertifiedKey::new(
            self.chain
                .iter()
                .map(|d| CertificateDer::from(d.clone()))
                .collect(),
            signing,
        ))
    }
}

/// Serves the current agent SVID to every new handshake.
#[derive(Debug, Default)]
struct ClientCert(ArcSwapOption<CertifiedKey>);

impl ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.load_full()
    }
    fn has_certs(&self) -> bool {
        self.0.load().is_some()
    }
}

/// A fresh P-256 key (PKCS#8 DER) and a CSR for it.
pub fn new_key_and_csr() -> Result<(Vec<u8>, Vec<u8>), ClientError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| ClientError::Identity(e.to_string()))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| ClientError::Identity(e.to_string()))?;
    Ok((key.serialize_der(), csr.der().to_vec()))
}

/// Longest a single server may take to accept a TCP connection and finish
/// the TLS handshake before the next one is tried.
pub const PER_SERVER_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The servers an agent may talk to and where it is connected.
///
/// Every connection attempt resolves each configured address (a DNS name may
/// stand for several servers) and tries the candidates in turn, starting at
/// the cursor: the server that last accepted a connection, or, after
/// [`ServerClient::fail_over`], the one after it. The first cursor is random,
/// so that agents configured alike spread over the servers.
#[derive(Debug)]
struct Servers {
    configured: Vec<String>,
    cursor: AtomicUsize,
    /// Candidates found by the last resolution.
    count: AtomicUsize,
    /// The server of the last successful connection.
    current: Mutex<Option<SocketAddr>>,
}

impl Servers {
    fn new(configured: Vec<String>) -> Self {
        let n = configured.len().max(1);
        Self {
            configured,
            cursor: AtomicUsize::new(rand::random_range(0..n)),
            count: AtomicUsize::new(n),
            current: Mutex::new(None),
        }
    }

    /// Every address the configured names resolve to, in configuration
    /// order, without repeats. Names that do not resolve are logged and left
    /// out.
    async fn resolve(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::new();
        for name in &self.configured {
            match tokio::net::lookup_host(name.as_str()).await {
                Ok(addrs) => {
                    for a in addrs {
                        if !out.contains(&a) {
                            out.push(a);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(server = %name, error = %e, "cannot resolve server address")
                }
            }
        }
        if !out.is_empty() {
            self.count.store(out.len(), Ordering::Relaxed);
        }
        out
    }

    fn current(&self) -> Option<SocketAddr> {
        *self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_current(&self, a: Option<SocketAddr>) {
        *self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = a;
    }

    /// Connects to the first candidate, from the cursor on, that accepts TCP
    /// and completes the TLS handshake (which verifies its node API
    /// certificate) within [`PER_SERVER_CONNECT_TIMEOUT`].
    async fn connect(
        &self,
        connector: &tokio_rustls::TlsConnector,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let candidates = self.resolve().await;
        if candidates.is_empty() {
            return Err(std::io::Error::other(format!(
                "no server address resolves: {}",
                self.configured.join(", ")
            )));
        }
        let start = self.cursor.load(Ordering::Relaxed) % candidates.len();
        let mut errors = Vec::new();
        for i in 0..candidates.len() {
            let idx = (start + i) % candidates.len();
            let addr = candidates[idx];
            let attempt = async {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let name = ServerName::try_from("meshid-server").map_err(std::io::Error::other)?;
                connector.connect(name, tcp).await
            };
            match tokio::time::timeout(PER_SERVER_CONNECT_TIMEOUT, attempt).await {
                Ok(Ok(tls)) => {
                    self.cursor.store(idx, Ordering::Relaxed);
                    if self.current() != Some(addr) {
                        tracing::info!(server = %addr, "connected to server");
                    }
                    self.set_current(Some(addr));
                    return Ok(tls);
                }
                Ok(Err(e)) => {
                    tracing::warn!(server = %addr, error = %e, "server unreachable; trying the next");
                    errors.push(format!("{addr}: {e}"));
                }
                Err(_) => {
                    tracing::warn!(server = %addr, timeout = ?PER_SERVER_CONNECT_TIMEOUT, "server did not answer in time; trying the next");
                    errors.push(format!("{addr}: timed out"));
                }
            }
        }
        Err(std::io::Error::other(errors.join("; ")))
    }

    /// The server of the last connection failed: start the next attempt at
    /// the one after it.
    fn advance(&self) {
        let n = self.count.load(Ordering::Relaxed).max(1);
        let at = self.cursor.load(Ordering::Relaxed);
        self.cursor.store((at + 1) % n, Ordering::Relaxed);
        self.set_current(None);
    }
}

/// When to try the node API again after a failure.
///
/// The first failure moves on to the next server almost at once (a jitter
/// of up to [`FAILOVER_JITTER`] spreads agents leaving a dead server); once
/// every known server has failed in a round, the wait grows exponentially
/// from 200 ms up to `max`, with jitter (each wait is drawn from the upper
/// half of its step). No wait is longer than a quarter of the time left on
/// the soonest-expiring credential the agent holds (never shorter than
/// [`MIN_RETRY`]), so attempts come ever more often as it nears expiry: a
/// credential does not expire while some server is reachable again in time.
#[derive(Debug, Clone)]
pub struct RetrySchedule {
    failures: u32,
    max: Duration,
}

/// Most jitter before moving to the next server after a failure.
pub const FAILOVER_JITTER: Duration = Duration::from_millis(250);

/// Shortest wait between attempts, however close an expiry is.
pub const MIN_RETRY: Duration = Duration::from_millis(50);

impl RetrySchedule {
    /// A schedule whose waits never exceed `max`.
    pub fn new(max: Duration) -> Self {
        Self { failures: 0, max }
    }

    /// A call succeeded: the next failure starts a fresh round.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Records a failure and returns how long to wait before the next
    /// attempt, given `servers` known servers and the time `left` on the
    /// soonest-expiring credential still valid (`None`: nothing valid).
    pub fn next_delay(&mut self, servers: usize, left: Option<Duration>) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let servers = u32::try_from(servers.max(1)).unwrap_or(u32::MAX);
        let wait = if !self.failures.is_multiple_of(servers) {
            FAILOVER_JITTER.mul_f64(rand::random::<f64>())
        } else {
            let round = (self.failures / servers).saturating_sub(1).min(16);
            Duration::from_millis(200)
                .saturating_mul(1u32 << round)
                .min(self.max)
                .mul_f64(0.5 + rand::random::<f64>() / 2.0)
        };
        bound_by_expiry(wait.min(self.max), left)
    }
}

/// `wait`, shortened to a quarter of `left` (at least [`MIN_RETRY`]).
pub fn bound_by_expiry(wait: Duration, left: Option<Duration>) -> Duration {
    match left {
        Some(l) if !l.is_zero() => wait.min((l / 4).max(MIN_RETRY)),
        _ => wait,
    }
}

/// Whether a failed call says more about the server (or the way to it) than
/// about the request: worth trying another server.
pub fn is_server_failure(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Internal
            | tonic::Code::ResourceExhausted
    )
}

/// Connection to the servers' node API.
#[derive(Clone)]
pub struct ServerClient {
    /// The current channel and its generation (bumped on each new channel).
    channel: Arc<ArcSwap<(u64, Channel)>>,
    cert: Arc<ClientCert>,
    /// Rebuilt when the trust domain's bundle changes; read at each connect.
    connector: Arc<ArcSwap<tokio_rustls::TlsConnector>>,
    servers: Arc<Servers>,
    generation: Arc<AtomicU64>,
    td: String,
    kx: meshid_identity::crypto::KeyExchange,
}

/// A lazily connecting channel. Connections live as long as the channel, so a
/// new identity needs a new channel: HTTP/2 would otherwise keep using the
/// connection (and certificate) it already has.
fn make_channel(
    connector: Arc<ArcSwap<tokio_rustls::TlsConnector>>,
    servers: Arc<Servers>,
) -> Channel {
    Endpoint::from_static("http://meshid-server")
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect_with_connector_lazy(tower::service_fn(move |_| {
            let (connector, servers) = (connector.clone(), servers.clone());
            async move {
                let tls = servers.connect(&connector.load_full()).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
}

impl std::fmt::Debug for ServerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerClient")
    }
}

impl ServerClient {
    /// A lazily connecting client for the servers at `addrs` (`host:port`
    /// each; a name may resolve to several servers), trusting `roots` (DER)
    /// for `td`, with the key exchange groups of `kx`.
    pub fn new(
        addrs: Vec<String>,
        td: &str,
        roots: &[Vec<u8>],
        kx: meshid_identity::crypto::KeyExchange,
    ) -> Result<Self, ClientError> {
        let cert = Arc::new(ClientCert::default());
        let connector = Arc::new(ArcSwap::from_pointee(Self::connector(
            td, roots, &cert, kx,
        )?));
        let servers = Arc::new(Servers::new(addrs));
        let channel = ArcSwap::from_pointee((0, make_channel(connector.clone(), servers.clone())));
        Ok(Self {
            channel: Arc::new(channel),
            cert,
            connector,
            servers,
            generation: Arc::new(AtomicU64::new(0)),
            td: td.to_string(),
            kx,
        })
    }

    fn new_channel(&self) {
        let g = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        self.channel.store(Arc::new((
            g,
            make_channel(self.connector.clone(), self.servers.clone()),
        )));
    }

    /// Servers known (from the last resolution of the configured addresses).
    pub fn server_count(&self) -> usize {
        self.servers.count.load(Ordering::Relaxed)
    }

    /// The server of the last successful connection, if any.
    pub fn current_server(&self) -> Option<SocketAddr> {
        self.servers.current()
    }

    /// A call made with the client of `node_at` returning `generation`
    /// failed in a way that blames the server: later calls go to a new
    /// connection, to the next server first. Calls already under way keep
    /// their connection. A failure seen through an older channel than the
    /// current one (another loop already failed over) changes nothing.
    pub fn fail_over(&self, generation: u64) {
        if self.channel.load().0 != generation {
            return;
        }
        if let Some(a) = self.servers.current() {
            tracing::warn!(server = %a, "failing over to the next server");
        }
        self.servers.advance();
        self.new_channel();
    }

    /// Trusts `roots` for every later connection to the server (the bundle
    /// changed: a CA rotation). Established connections stay.
    pub fn set_trust(&self, roots: &[Vec<u8>]) -> Result<(), ClientError> {
        self.connector.store(Arc::new(Self::connector(
            &self.td, roots, &self.cert, self.kx,
        )?));
        Ok(())
    }

    fn connector(
        td: &str,
        roots: &[Vec<u8>],
        cert: &Arc<ClientCert>,
        kx: meshid_identity::crypto::KeyExchange,
    ) -> Result<tokio_rustls::TlsConnector, ClientError> {
        let provider = meshid_identity::crypto::provider_for(kx);
        let mut bundles = TrustBundles::new();
        let ders: Vec<CertificateDer<'static>> = roots
            .iter()
            .map(|d| CertificateDer::from(d.clone()))
            .collect();
        bundles.add(td, &ders);
        let server_id = format!("spiffe://{td}/meshid/server")
            .parse()
            .map_err(|e| ClientError::Identity(format!("server ID: {e}")))?;
        let verifier = SpiffeServerVerifier::new(bundles, Authorizer::Exact(server_id), &provider);
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(meshid_identity::crypto::versions(false))
            .map_err(|e| ClientError::Identity(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(cert.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        // A resumed session keeps the identity of the session it resumes: the
        // unauthenticated attestation, or an agent SVID since renewed.
        cfg.resumption = rustls::client::Resumption::disabled();
        Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
    }

    /// Presents `id` on every new connection.
    pub fn set_identity(&self, id: &AgentIdentity) -> Result<(), ClientError> {
        self.cert.0.store(Some(Arc::new(id.certified_key()?)));
        self.new_channel();
        Ok(())
    }

    /// The gRPC client.
    pub fn node(&self) -> NodeClient<Channel> {
        self.node_at().1
    }

    /// The gRPC client and the generation of its channel, for
    /// [`ServerClient::fail_over`].
    pub fn node_at(&self) -> (u64, NodeClient<Channel>) {
        let c = self.channel.load();
        (c.0, NodeClient::new(c.1.clone()))
    }

    /// Attests with the named node attestor and its payload.
    pub async fn attest(
        &self,
        attestor: &str,
        payload: Vec<u8>,
    ) -> Result<(AgentIdentity, Bundle), ClientError> {
        let (key, csr) = new_key_and_csr()?;
        let r = self
            .node()
            .attest(AttestRequest {
                attestor: attestor.into(),
                payload,
                csr,
            })
            .await?
            .into_inner();
        let svid = r
            .svid
            .ok_or_else(|| ClientError::Identity("server sent no SVID".into()))?;
        let bundle = r
            .bundle
            .ok_or_else(|| ClientError::Identity("server sent no bundle".into()))?;
        Ok((AgentIdentity::new(&svid, key)?, bundle))
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ClientError + '_ {
    move |source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), ClientError> {
    meshid_identity::files::write_atomic(path, data, mode).map_err(io(path))
}

/// Creates the agent's data directory 0700 (an existing one is tightened).
pub fn create_data_dir(dir: &Path) -> Result<(), ClientError> {
    meshid_identity::files::create_private_dir(dir).map_err(io(dir))
}

/// Whether the PKCS#8 `key` is the key of the certificate `leaf`.
fn key_matches(key: &[u8], leaf: &[u8]) -> Result<bool, ClientError> {
    use rcgen::PublicKeyData as _;
    let kp = rcgen::KeyPair::try_from(key)
        .map_err(|e| ClientError::Identity(format!("agent key: {e}")))?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| ClientError::Identity(format!("agent SVID: {e}")))?;
    Ok(cert.public_key().raw == kp.subject_public_key_info().as_slice())
}

/// A DER chain (leaf first) and its PKCS#8 key.
type ChainAndKey = (Vec<Vec<u8>>, Vec<u8>);

/// A persisted agent identity and the bundle roots (DER) saved with it.
pub type Persisted = (AgentIdentity, Vec<Vec<u8>>);

/// Files of the persisted agent identity.
///
/// The SVID chain and its key are one file, `agent_identity.pem` (0600),
/// replaced with a single rename, so no crash can leave a key next to a
/// certificate it does not belong to. The separate `agent_svid.pem` +
/// `agent_svid.key` of earlier versions are still read (when they match) and
/// removed on the next save.
#[derive(Debug, Clone)]
pub struct IdentityStore {
    dir: PathBuf,
    identity: PathBuf,
    legacy_svid: PathBuf,
    legacy_key: PathBuf,
    bundle: PathBuf,
}

impl IdentityStore {
    /// Under `data_dir`.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.to_path_buf(),
            identity: data_dir.join("agent_identity.pem"),
            legacy_svid: data_dir.join("agent_svid.pem"),
            legacy_key: data_dir.join("agent_svid.key"),
            bundle: data_dir.join("bundle.pem"),
        }
    }

    /// Persists identity and bundle (identity file 0600, data dir 0700).
    pub fn save(&self, id: &AgentIdentity, bundle: &Bundle) -> Result<(), ClientError> {
        create_data_dir(&self.dir)?;
        let mut pem = meshid_identity::pem::encode_certs(id.chain.iter().map(Vec::as_slice));
        pem.push_str(&meshid_identity::pem::encode("PRIVATE KEY", &id.key));
        write_atomic(&self.identity, pem.as_bytes(), 0o600)?;
        let mut removed = false;
        for old in [&self.legacy_key, &self.legacy_svid] {
            match std::fs::remove_file(old) {
                Ok(()) => removed = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(old)(e)),
            }
        }
        if removed {
            meshid_identity::files::sync_dir(&self.dir).map_err(io(&self.dir))?;
        }
        self.save_bundle(bundle)
    }

    /// Persists the bundle roots.
    pub fn save_bundle(&self, bundle: &Bundle) -> Result<(), ClientError> {
        create_data_dir(&self.dir)?;
        write_atomic(
            &self.bundle,
            meshid_identity::pem::encode_certs(bundle.x509_authorities.iter().map(Vec::as_slice))
                .as_bytes(),
            0o644,
        )
    }

    /// The chain (DER, leaf first) and PKCS#8 key, if present and matching.
    fn read_pair(&self) -> Result<Option<ChainAndKey>, ClientError> {
        let (cert_pem, key_pem) = if self.identity.exists() {
            owner_only(&self.identity)?;
            let pem = std::fs::read(&self.identity).map_err(io(&self.identity))?;
            (pem.clone(), pem)
        } else if self.legacy_svid.exists() && self.legacy_key.exists() {
            (
                std::fs::read(&self.legacy_svid).map_err(io(&self.legacy_svid))?,
                {
                    owner_only(&self.legacy_key)?;
                    std::fs::read(&self.legacy_key).map_err(io(&self.legacy_key))?
                },
            )
        } else {
            return Ok(None);
        };
        let chain: Vec<Vec<u8>> = meshid_identity::pem::parse_certs(&cert_pem)
            .map_err(|e| ClientError::Identity(e.to_string()))?
            .into_iter()
            .map(|c| c.to_vec())
            .collect();
        let key = match meshid_identity::pem::parse_key(&key_pem)
            .map_err(|e| ClientError::Identity(e.to_string()))?
        {
            PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
            _ => return Err(ClientError::Identity("agent key is not PKCS#8".into())),
        };
        let leaf = chain
            .first()
            .ok_or_else(|| ClientError::Identity("no certificate in the agent identity".into()))?;
        if !key_matches(&key, leaf)? {
            tracing::error!(
                dir = %self.dir.display(),
                "the persisted agent key does not belong to the persisted agent SVID; \
                 ignoring both: the agent must attest again"
            );
            return Ok(None);
        }
        Ok(Some((chain, key)))
    }

    /// The persisted identity, if present, matching and not expired. A key
    /// that does not belong to the certificate is logged and never used.
    pub fn load(&self) -> Result<Option<Persisted>, ClientError> {
        let Some((chain, key)) = self.read_pair()? else {
            return Ok(None);
        };
        let roots = load_roots(&self.bundle)?;
        let id = AgentIdentity::new(
            &X509Svid {
                cert_chain: chain,
                ..X509Svid::default()
            },
            key,
        )?;
        if id.info.not_after <= SystemTime::now() {
            tracing::warn!(
                spiffe_id = %id.info.spiffe_id,
                not_after = %humantime::format_rfc3339_seconds(id.info.not_after),
                "persisted agent SVID has expired; the agent must attest again"
            );
            return Ok(None);
        }
        Ok(Some((id, roots)))
    }
}

/// Refuses a private key file that anyone but its owner may read or write:
/// another local user could have read the agent's key (or planted one), so
/// the identity in it proves nothing.
fn owner_only(path: &Path) -> Result<(), ClientError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path)
        .map_err(io(path))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(ClientError::Identity(format!(
            "{} has mode {mode:o}; the agent's private key must be readable by its owner \
             only (chmod 600), or removed so that the agent attests again",
            path.display()
        )));
    }
    Ok(())
}

/// Reads PEM roots.
pub fn load_roots(path: &Path) -> Result<Vec<Vec<u8>>, ClientError> {
    let pem = std::fs::read(path).map_err(io(path))?;
    Ok(meshid_identity::pem::parse_certs(&pem)
        .map_err(|e| ClientError::Identity(format!("{}: {e}", path.display())))?
        .into_iter()
        .map(|c| c.to_vec())
        .collect())
}

#[cfg(test)]
mod tests {

    #[test]
    fn an_identity_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("dir");
        let store = IdentityStore::new(dir.path());
        let f = dir.path().join("agent_identity.pem");
        std::fs::write(&f, b"not checked before the mode").expect("write");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = store.load().expect_err("refused");
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let e = store.load().expect_err("still not a valid identity");
        assert!(!e.to_string().contains("chmod 600"), "{e}");
    }
    use super::*;
    use tokio::time::Instant;

    /// Drives `schedule` through an outage of `outage` (every attempt fails),
    /// sleeping in (paused) tokio time; `expires` is when the soonest
    /// credential expires, as an offset from the start. Returns the offsets
    /// of the attempts.
    async fn outage(
        schedule: &mut RetrySchedule,
        servers: usize,
        outage: Duration,
        expires: Option<Duration>,
    ) -> Vec<Duration> {
        let t0 = Instant::now();
        let mut attempts = vec![Duration::ZERO];
        while t0.elapsed() < outage {
            let left = expires.and_then(|e| e.checked_sub(t0.elapsed()));
            let wait = schedule.next_delay(servers, left);
            tokio::time::sleep(wait).await;
            attempts.push(t0.elapsed());
        }
        attempts
    }

    #[tokio::test(start_paused = true)]
    async fn fails_over_at_once_then_backs_off_with_jitter() {
        let max = Duration::from_secs(4);
        let mut s = RetrySchedule::new(max);
        let at = outage(&mut s, 2, Duration::from_secs(120), None).await;
        let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
        for (i, g) in gaps.iter().enumerate() {
            let failure = u32::try_from(i).expect("small") + 1;
            if failure % 2 == 1 {
                // The other server is tried at once (jitter only).
                assert!(
                    *g <= FAILOVER_JITTER + Duration::from_millis(1),
                    "hop {failure} waited {g:?}"
                );
            } else {
                // Both failed: back off, 200 ms doubling up to `max`, upper half jittered.
                let round = failure / 2 - 1;
                let step = Duration::from_millis(200)
                    .saturating_mul(1 << round.min(16))
                    .min(max);
                assert!(
                    *g >= step / 2 && *g <= step + Duration::from_millis(1),
                    "round {round}: waited {g:?}, step {step:?}"
                );
            }
        }
        // The wait reached `max` and stayed there: about 2 attempts per 4 s.
        assert!(gaps.iter().any(|g| *g > max / 2), "{gaps:?}");
        assert!(at.len() < 120, "too many attempts: {}", at.len());
        // Jitter: the long waits are not all the same.
        let long: std::collections::BTreeSet<_> = gaps.iter().filter(|g| **g > max / 2).collect();
        assert!(long.len() > 1, "no jitter in {gaps:?}");
        assert_eq!(s.failures(), u32::try_from(gaps.len()).expect("small"));
        s.succeeded();
        assert_eq!(s.failures(), 0);
        assert!(
            s.next_delay(2, None) <= FAILOVER_JITTER,
            "a success starts a new round"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_come_faster_as_a_credential_nears_expiry() {
        // A 30 s maximum backoff would let an 8 s SVID expire between two
        // attempts; bounded by the time left, the attempts come ever more
        // often until the very end.
        let mut s = RetrySchedule::new(Duration::from_secs(30));
        let expires = Duration::from_secs(8);
        let at = outage(&mut s, 2, Duration::from_secs(40), Some(expires)).await;
        for w in at.windows(2) {
            if w[0] < expires {
                let left = expires - w[0];
                // (+1 ms: tokio's timer rounds up to whole milliseconds)
                assert!(
                    w[1] - w[0] <= (left / 4).max(MIN_RETRY) + Duration::from_millis(1),
                    "at {:?} ({left:?} left) waited {:?}",
                    w[0],
                    w[1] - w[0]
                );
            }
        }
        let before: Vec<&Duration> = at.iter().filter(|t| **t < expires).collect();
        let last = **before.last().expect("attempts before expiry");
        assert!(
            expires - last <= MIN_RETRY + Duration::from_millis(1),
            "last attempt {last:?}, expiry {expires:?}"
        );
        assert!(
            before.len() < 200,
            "bounded, not spinning: {} attempts",
            before.len()
        );
        // Once nothing is left to save, the wait grows back to the maximum.
        let after: Vec<Duration> = at
            .windows(2)
            .filter(|w| w[0] >= expires)
            .map(|w| w[1] - w[0])
            .collect();
        assert!(
            after.iter().any(|g| *g > Duration::from_secs(5)),
            "{after:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn one_server_backs_off_from_the_first_failure() {
        let mut s = RetrySchedule::new(Duration::from_secs(30));
        let at = outage(&mut s, 1, Duration::from_secs(10), None).await;
        let first = at[1] - at[0];
        assert!(
            first >= Duration::from_millis(100) && first <= Duration::from_millis(201),
            "{first:?}"
        );
        assert!(at[2] - at[1] >= Duration::from_millis(200), "{at:?}");
    }

    #[test]
    fn server_failures_are_told_from_refusals() {
        assert!(is_server_failure(&tonic::Status::unavailable("down")));
        assert!(is_server_failure(&tonic::Status::unknown("reset")));
        assert!(!is_server_failure(&tonic::Status::permission_denied("no")));
        assert!(!is_server_failure(&tonic::Status::invalid_argument("csr")));
    }

    #[tokio::test]
    async fn a_name_resolving_to_several_addresses_gives_every_server() {
        let s = Servers::new(vec![
            "localhost:7001".into(),
            "127.0.0.1:7002".into(),
            "127.0.0.1:7002".into(),
        ]);
        let got = s.resolve().await;
        assert!(
            got.contains(&"127.0.0.1:7001".parse().expect("addr")),
            "{got:?}"
        );
        assert!(
            got.contains(&"127.0.0.1:7002".parse().expect("addr")),
            "{got:?}"
        );
        assert_eq!(
            got.len(),
            s.count.load(Ordering::Relaxed),
            "repeats are dropped and the count follows the resolution"
        );
        let start = s.cursor.load(Ordering::Relaxed);
        s.advance();
        assert_eq!(s.cursor.load(Ordering::Relaxed), (start + 1) % got.len());
    }
}
