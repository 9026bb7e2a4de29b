//! The webhook's HTTPS transport: `POST /mutate` (AdmissionReview v1) and
//! `GET /healthz`. Bodies over 1 MiB get 413, unreadable reviews 400; every
//! other answer is an AdmissionReview carrying the request's uid.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::InjectorConfig;
use crate::mutate::{Decision, mutate};
use crate::review::{AdmissionResponse, AdmissionReview, ResponseStatus};

/// Largest AdmissionReview accepted.
pub const MAX_BODY: usize = 1 << 20;
/// How often the certificate files are checked for a change.
const RELOAD_CHECK: Duration = Duration::from_secs(5);

/// Why the webhook cannot serve.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The certificate or key cannot be loaded.
    #[error("webhook certificate {path}: {reason}")]
    Cert {
        /// File.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The listener cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

/// Serves the webhook certificate, re-reading the files when they change
/// (cert-manager renews them in place). A broken new pair is logged and the
/// previous one kept.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    interval: Duration,
    state: Mutex<CertState>,
}

#[derive(Debug)]
struct CertState {
    checked: Instant,
    stamp: Option<(FileStamp, FileStamp)>,
    /// The files' stamp when they last failed to load: logged once, retried
    /// when they change again.
    failed: Option<Option<(FileStamp, FileStamp)>>,
    current: Arc<CertifiedKey>,
}

/// What tells a rewritten file from the old one: modification time, size and
/// inode (a Secret volume update swaps a symlink to new files, which
/// `metadata` follows).
type FileStamp = (SystemTime, u64, u64);

fn stamp(p: &PathBuf) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

fn load(cert: &PathBuf, key: &PathBuf) -> Result<Arc<CertifiedKey>, ServeError> {
    let err = |path: &PathBuf, reason: String| ServeError::Cert {
        path: path.clone(),
        reason,
    };
    let chain = std::fs::read(cert).map_err(|e| err(cert, e.to_string()))?;
    let chain = meshid_identity::pem::parse_certs(&chain).map_err(|e| err(cert, e.to_string()))?;
    let pem = std::fs::read(key).map_err(|e| err(key, e.to_string()))?;
    let key_der = meshid_identity::pem::parse_key(&pem).map_err(|e| err(key, e.to_string()))?;
    let ck = CertifiedKey::from_der(chain, key_der, &meshid_identity::crypto::provider())
        .map_err(|e| err(cert, e.to_string()))?;
    Ok(Arc::new(ck))
}

impl ReloadingCert {
    /// Loads the pair once; fails if it is unusable. The files are checked
    /// for a change at most every few seconds, during handshakes.
    pub fn new(cert: PathBuf, key: PathBuf) -> Result<Self, ServeError> {
        Self::with_interval(cert, key, RELOAD_CHECK)
    }

    /// As [`ReloadingCert::new`], checking the files at most every `interval`.
    pub fn with_interval(
        cert: PathBuf,
        key: PathBuf,
        interval: Duration,
    ) -> Result<Self, ServeError> {
        let current = load(&cert, &key)?;
        let stamp = stamp(&cert).zip(stamp(&key));
        Ok(Self {
            cert,
            key,
            interval,
            state: Mutex::new(CertState {
                checked: Instant::now(),
                stamp,
                failed: None,
                current,
            }),
        })
    }

    fn current(&self) -> Arc<CertifiedKey> {
        // Every field holds a complete value, so a poisoned lock is still usable.
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if st.checked.elapsed() >= self.interval {
            st.checked = Instant::now();
            let now = stamp(&self.cert).zip(stamp(&self.key));
            if now != st.stamp && st.failed != Some(now) {
                match load(&self.cert, &self.key) {
                    Ok(ck) => {
                        tracing::info!(cert = %self.cert.display(), "webhook certificate reloaded");
                        st.current = ck;
                        st.stamp = now;
                        st.failed = None;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "new webhook certificate unusable; keeping the previous one");
                        st.failed = Some(now);
                    }
                }
            }
        }
        st.current.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// A bound webhook, ready to serve.
pub struct Webhook {
    listener: tokio::net::TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    cfg: Arc<InjectorConfig>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

impl Webhook {
    /// Loads the certificate and binds the listener.
    pub async fn bind(cfg: InjectorConfig) -> Result<Self, ServeError> {
        let resolver = ReloadingCert::new(cfg.tls_cert.clone(), cfg.tls_key.clone())?;
        let tls = rustls::ServerConfig::builder_with_provider(meshid_identity::crypto::provider())
            .with_protocol_versions(meshid_identity::crypto::versions(true))
            .map_err(|e| ServeError::Cert {
                path: cfg.tls_cert.clone(),
                reason: e.to_string(),
            })?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver));
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| ServeError::Bind {
                addr: cfg.listen,
                source,
            })?;
        Ok(Self {
            listener,
            tls: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
            cfg: Arc::new(cfg),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the task is dropped.
    pub async fn run(self) {
        loop {
            let (tcp, peer) = match self.listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (tls, cfg) = (self.tls.clone(), self.cfg.clone());
            tokio::spawn(async move {
                let stream =
                    match tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                let svc = hyper::service::service_fn(move |req| {
                    let cfg = cfg.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(req, &cfg).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            });
        }
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.into())));
    *r.status_mut() = status;
    r
}

async fn handle(req: Request<Incoming>, cfg: &InjectorConfig) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::POST, "/mutate") => {
            let body = match read_body(req.into_body()).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "AdmissionReview body refused");
                    return text(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!(
                            "AdmissionReview larger than {MAX_BODY} bytes or unreadable: {e}\n"
                        ),
                    );
                }
            };
            match review(&body, cfg) {
                Ok(answer) => {
                    let mut r = Response::new(Full::new(Bytes::from(answer)));
                    r.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("application/json"),
                    );
                    r
                }
                Err(msg) => {
                    tracing::warn!(error = %msg, "malformed AdmissionReview");
                    text(StatusCode::BAD_REQUEST, format!("{msg}\n"))
                }
            }
        }
        _ => text(StatusCode::NOT_FOUND, "POST /mutate or GET /healthz\n"),
    }
}

/// How much of a refused body is still read (and dropped) so that the
/// client, still sending it, gets the 413 instead of a reset connection.
const DRAIN_LIMIT: usize = 16 * MAX_BODY;

/// The request body, at most [`MAX_BODY`] bytes. A larger one is an error,
/// answered only after the rest of it (up to [`DRAIN_LIMIT`]) was read and
/// dropped.
async fn read_body(mut body: Incoming) -> Result<Bytes, String> {
    let mut buf = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len();
        if seen > DRAIN_LIMIT {
            break;
        }
        if seen <= MAX_BODY {
            buf.extend_from_slice(&data);
        }
    }
    if seen > MAX_BODY {
        return Err("length limit exceeded".into());
    }
    Ok(Bytes::from(buf))
}

/// Answers one AdmissionReview body; `Err` means the body is not a review.
pub fn review(body: &[u8], cfg: &InjectorConfig) -> Result<Vec<u8>, String> {
    let review: AdmissionReview =
        serde_json::from_slice(body).map_err(|e| format!("body is not an AdmissionReview: {e}"))?;
    if review.api_version != "admission.k8s.io/v1" || review.kind != "AdmissionReview" {
        return Err(format!(
            "expected admission.k8s.io/v1 AdmissionReview, got {} {}",
            review.api_version, review.kind
        ));
    }
    let request = review
        .request
        .ok_or_else(|| "AdmissionReview has no request".to_string())?;
    let name = request
        .object
        .as_ref()
        .and_then(|o| {
            o.pointer("/metadata/name")
                .or(o.pointer("/metadata/generateName"))
        })
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_string();
    let ns = request.namespace.clone().unwrap_or_default();
    let mut response = AdmissionResponse {
        uid: request.uid.clone(),
        allowed: true,
        ..AdmissionResponse::default()
    };
    match mutate(&request, cfg) {
        Decision::Unchanged { reason, warnings } => {
            tracing::debug!(namespace = %ns, pod = %name, reason, "not injected");
            response.warnings = warnings;
        }
        Decision::Patch(ops) => {
            let patch = serde_json::to_vec(&ops).map_err(|e| e.to_string())?;
            tracing::info!(namespace = %ns, pod = %name, ops = ops.len(), "sidecar injected");
            response.patch_type = Some("JSONPatch".into());
            response.patch = Some(base64::engine::general_purpose::STANDARD.encode(patch));
        }
        Decision::Refuse(message) => {
            tracing::warn!(namespace = %ns, pod = %name, %message, "pod refused");
            response.allowed = false;
            response.status = Some(ResponseStatus { code: 400, message });
        }
    }
    serde_json::to_vec(&AdmissionReview::answer(response)).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        (cert.pem(), key.serialize_pem())
    }

    fn leaf(r: &ReloadingCert) -> Vec<u8> {
        r.current().cert[0].to_vec()
    }

    fn der(pem: &str) -> Vec<u8> {
        meshid_identity::pem::parse_certs(pem.as_bytes()).expect("pem")[0].to_vec()
    }

    #[test]
    fn reloads_changed_files_and_keeps_the_old_pair_when_broken() {
        let dir = tempfile::tempdir().expect("tmp");
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let write = |c: &str, k: &str| {
            std::fs::write(&cert, c).expect("w");
            std::fs::write(&key, k).expect("w");
        };
        let (a_cert, a_key) = pair("a.svc");
        write(&a_cert, &a_key);
        let r = ReloadingCert::with_interval(cert.clone(), key.clone(), Duration::ZERO)
            .expect("first pair");
        assert_eq!(leaf(&r), der(&a_cert));

        // Renewed in place: served from the next handshake on.
        let (b_cert, b_key) = pair("b.svc");
        write(&b_cert, &b_key);
        assert_eq!(leaf(&r), der(&b_cert));

        // Half-written (new cert, old key) and then garbage: the old pair stays.
        let (c_cert, c_key) = pair("c.svc");
        std::fs::write(&cert, &c_cert).expect("w");
        assert_eq!(leaf(&r), der(&b_cert), "mismatched key must not be used");
        std::fs::write(&key, "not a key").expect("w");
        assert_eq!(leaf(&r), der(&b_cert));
        std::fs::remove_file(&cert).expect("rm");
        assert_eq!(leaf(&r), der(&b_cert));

        // Complete again: picked up.
        write(&c_cert, &c_key);
        assert_eq!(leaf(&r), der(&c_cert));
    }

    #[test]
    fn refuses_to_start_without_a_usable_pair() {
        let dir = tempfile::tempdir().expect("tmp");
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let e = ReloadingCert::new(cert.clone(), key.clone()).expect_err("missing");
        assert!(e.to_string().contains("tls.crt"), "{e}");
        let (a_cert, _) = pair("a.svc");
        let (_, b_key) = pair("b.svc");
        std::fs::write(&cert, a_cert).expect("w");
        std::fs::write(&key, b_key).expect("w");
        assert!(ReloadingCert::new(cert, key).is_err(), "mismatched pair");
    }
}
