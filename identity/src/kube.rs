//! A minimal client for the Kubernetes API server and the kubelet: JSON over
//! HTTPS/1.1 with a service-account token, one request per connection.
//!
//! Callers make few requests (a TokenReview per node attestation; a pod list
//! every few seconds at most), so a pooled client buys nothing; what matters is
//! that the peer's certificate is checked against the cluster CA and that the
//! bearer token is re-read on every call (the kubelet rotates it).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Default in-cluster token of the server's service account.
pub const IN_CLUSTER_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// Default in-cluster CA certificate.
pub const IN_CLUSTER_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

/// Largest response body accepted from the API server.
const MAX_BODY: usize = 4 << 20;
/// Deadline for one request, connect to last byte.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Why a call to the API server failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KubeError {
    /// The client cannot be set up (bad URL, unreadable CA or token file).
    #[error("kubernetes API client: {0}")]
    Config(String),
    /// Network, TLS or HTTP failure: the API server may come back.
    #[error("kubernetes API {url}: {reason}")]
    Unavailable {
        /// The URL called.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The API server answered with an error status.
    #[error("kubernetes API {url}: HTTP {status}: {body}")]
    Status {
        /// The URL called.
        url: String,
        /// HTTP status.
        status: u16,
        /// Start of the response body.
        body: String,
    },
    /// The response is not the JSON expected.
    #[error("kubernetes API {url}: unexpected response: {reason}")]
    Decode {
        /// The URL called.
        url: String,
        /// The parser's message.
        reason: String,
    },
}

/// A client for one API server.
#[derive(Clone)]
pub struct KubeApi {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
    token_path: PathBuf,
}

impl std::fmt::Debug for KubeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeApi")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`, when running in a pod.
pub fn in_cluster_url() -> Option<String> {
    let host = std::env::var("KUBERNETES_SERVICE_HOST").ok()?;
    let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
    Some(if host.contains(':') {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    })
}

fn parse_url(url: &str) -> Result<(String, u16, ServerName<'static>), KubeError> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| KubeError::Config(format!("URL {url:?}: {e}")))?;
    if uri.scheme_str() != Some("https") {
        return Err(KubeError::Config(format!(
            "URL {url:?} must be an https:// URL"
        )));
    }
    let host = uri
        .host()
        .ok_or_else(|| KubeError::Config(format!("URL {url:?} has no host")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    let server_name = ServerName::try_from(host.clone())
        .map_err(|e| KubeError::Config(format!("host {host:?}: {e}")))?;
    Ok((host, port, server_name))
}

/// Accepts any server certificate, still checking handshake signatures.
#[derive(Debug)]
struct AnyServerCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl KubeApi {
    /// A client for `url` (`https://host[:port]`), trusting the PEM CA
    /// certificates in `ca_path` and sending the token in `token_path`.
    pub fn new(url: &str, ca_path: &Path, token_path: &Path) -> Result<Self, KubeError> {
        let (host, port, server_name) = parse_url(url)?;
        let pem = std::fs::read(ca_path)
            .map_err(|e| KubeError::Config(format!("CA {}: {e}", ca_path.display())))?;
        let certs = crate::pem::parse_certs(&pem)
            .map_err(|e| KubeError::Config(format!("CA {}: {e}", ca_path.display())))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in certs {
            roots
                .add(c)
                .map_err(|e| KubeError::Config(format!("CA {}: {e}", ca_path.display())))?;
        }
        if roots.is_empty() {
            return Err(KubeError::Config(format!(
                "CA {} holds no certificate",
                ca_path.display()
            )));
        }
        let config = rustls::ClientConfig::builder_with_provider(crate::crypto::provider())
            .with_protocol_versions(crate::crypto::versions(true))
            .map_err(|e| KubeError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Self::with_tls(host, port, server_name, config, token_path)
    }

    /// A client that accepts any server certificate: for kubelets serving
    /// self-signed certificates (`skip_kubelet_verification`). The bearer
    /// token still goes only to the configured address.
    pub fn new_unverified(url: &str, token_path: &Path) -> Result<Self, KubeError> {
        let (host, port, server_name) = parse_url(url)?;
        let provider = crate::crypto::provider();
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(crate::crypto::versions(true))
            .map_err(|e| KubeError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider)))
            .with_no_client_auth();
        Self::with_tls(host, port, server_name, config, token_path)
    }

    fn with_tls(
        host: String,
        port: u16,
        server_name: ServerName<'static>,
        config: rustls::ClientConfig,
        token_path: &Path,
    ) -> Result<Self, KubeError> {
        Ok(Self {
            host,
            port,
            server_name,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            token_path: token_path.to_path_buf(),
        })
    }

    /// `POST path` with a JSON body; decodes the JSON answer.
    pub async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<R, KubeError> {
        let body = serde_json::to_vec(body).map_err(|e| KubeError::Config(e.to_string()))?;
        self.call(hyper::Method::POST, path, Some(body)).await
    }

    /// `GET path`; decodes the JSON answer.
    pub async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, KubeError> {
        self.call(hyper::Method::GET, path, None).await
    }

    async fn call<R: DeserializeOwned>(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<R, KubeError> {
        let url = format!("https://{}:{}{path}", self.host, self.port);
        let unavailable = |reason: String| KubeError::Unavailable {
            url: url.clone(),
            reason,
        };
        let token = std::fs::read_to_string(&self.token_path)
            .map_err(|e| KubeError::Config(format!("token {}: {e}", self.token_path.display())))?;
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, format!("{}:{}", self.host, self.port))
            .header(hyper::header::ACCEPT, "application/json")
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", token.trim()),
            );
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| KubeError::Config(e.to_string()))?;
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| unavailable(format!("connect: {e}")))?;
            tcp.set_nodelay(true)
                .map_err(|e| unavailable(format!("connect: {e}")))?;
            let tls = self
                .tls
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| unavailable(format!("TLS: {e}")))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| unavailable(format!("HTTP: {e}")))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "kubernetes API connection ended");
                }
            });
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| unavailable(format!("HTTP: {e}")))?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| unavailable(format!("reading body: {e}")))?
                .to_bytes();
            Ok::<_, KubeError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| unavailable(format!("no answer within {TIMEOUT:?}")))??;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&bytes);
            return Err(KubeError::Status {
                url,
                status: status.as_u16(),
                body: text.chars().take(300).collect(),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| KubeError::Decode {
            url,
            reason: e.to_string(),
        })
    }
}
