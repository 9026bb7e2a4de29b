//! The agent's side of the node API: one gRPC channel over mTLS whose client
//! certificate is swapped in place on renewal, attestation with a join token,
//! and the persisted agent identity (SVID, key 0600, bundle).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

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

/// Connection to the server's node API.
#[derive(Clone)]
pub struct ServerClient {
    channel: Arc<ArcSwap<Channel>>,
    cert: Arc<ClientCert>,
    /// Rebuilt when the trust domain's bundle changes; read at each connect.
    connector: Arc<ArcSwap<tokio_rustls::TlsConnector>>,
    addrs: Arc<Vec<String>>,
    td: String,
    kx: meshid_identity::crypto::KeyExchange,
}

/// A lazily connecting channel. Connections live as long as the channel, so a
/// new identity needs a new channel: HTTP/2 would otherwise keep using the
/// connection (and certificate) it already has.
fn make_channel(
    connector: Arc<ArcSwap<tokio_rustls::TlsConnector>>,
    addrs: Arc<Vec<String>>,
) -> Channel {
    Endpoint::from_static("http://meshid-server")
        .connect_timeout(std::time::Duration::from_secs(5))
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .connect_with_connector_lazy(tower::service_fn(move |_| {
            let (connector, addrs) = (connector.clone(), addrs.clone());
            async move {
                let mut last = std::io::Error::other("no server address");
                for a in addrs.iter() {
                    match tokio::net::TcpStream::connect(a).await {
                        Ok(tcp) => {
                            tcp.set_nodelay(true)?;
                            let name = ServerName::try_from("meshid-server")
                                .map_err(std::io::Error::other)?;
                            let tls = connector.load_full().connect(name, tcp).await?;
                            return Ok::<_, std::io::Error>(TokioIo::new(tls));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }))
}

impl std::fmt::Debug for ServerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerClient")
    }
}

impl ServerClient {
    /// A lazily connecting client trusting `roots` (DER) for `td`, with the
    /// key exchange groups of `kx`.
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
        let addrs = Arc::new(addrs);
        let channel = ArcSwap::from_pointee(make_channel(connector.clone(), addrs.clone()));
        Ok(Self {
            channel: Arc::new(channel),
            cert,
            connector,
            addrs,
            td: td.to_string(),
            kx,
        })
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
        self.channel.store(Arc::new(make_channel(
            self.connector.clone(),
            self.addrs.clone(),
        )));
        Ok(())
    }

    /// The gRPC client.
    pub fn node(&self) -> NodeClient<Channel> {
        NodeClient::new((**self.channel.load()).clone())
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
            let pem = std::fs::read(&self.identity).map_err(io(&self.identity))?;
            (pem.clone(), pem)
        } else if self.legacy_svid.exists() && self.legacy_key.exists() {
            (
                std::fs::read(&self.legacy_svid).map_err(io(&self.legacy_svid))?,
                std::fs::read(&self.legacy_key).map_err(io(&self.legacy_key))?,
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

/// Reads PEM roots.
pub fn load_roots(path: &Path) -> Result<Vec<Vec<u8>>, ClientError> {
    let pem = std::fs::read(path).map_err(io(path))?;
    Ok(meshid_identity::pem::parse_certs(&pem)
        .map_err(|e| ClientError::Identity(format!("{}: {e}", path.display())))?
        .into_iter()
        .map(|c| c.to_vec())
        .collect())
}
