//! Revocation checking against the trust domain's CRL.
//!
//! ```toml
//! crl = "required"                          # "off" (default), "optional", "required"
//! crl_source = "http://meshid-server:9090/crl" # or a file: "/var/lib/meshid/crl.pem"
//! crl_refresh = "30s"                        # how often it is fetched
//! ```
//!
//! The CRL (DER or PEM) is fetched every `crl_refresh` and used only after
//! its signature verified against the bundle of the sidecar's own trust
//! domain (a root, or a CA of the sidecar's own verified SVID chain), and
//! only if it is not older than the one held (no replay of an old CRL).
//! Every presented certificate chain of that trust domain, inbound and
//! outbound, full or resumed handshake, is checked after its chain verified
//! ([`RevocationCheck`], called by the SPIFFE verifiers):
//!
//! - a listed serial is refused (`revoked`) in both modes;
//! - `required`: with no CRL yet, or one past its nextUpdate, every such
//!   handshake is refused (`revocation status unknown`): fail secure, and
//!   `/readyz` answers 503 with the reason and the CRL's age;
//! - `optional`: a missing or stale CRL is logged and counted, handshakes
//!   proceed (the last CRL held still refuses what it lists).
//!
//! Peers of other (federated) trust domains are not covered by this CRL.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use meshid_identity::SpiffeId;
use meshid_identity::crl::{VerifiedCrl, crl_der, verify_crl};
use meshid_identity::verify::{RevocationCheck, RevocationError};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rustls_pki_types::{CertificateDer, UnixTime};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::identity::Identity;

/// Largest CRL accepted from a source.
pub const MAX_CRL_BYTES: usize = 16 * 1024 * 1024;

/// How presented certificates are checked against the CRL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CrlMode {
    /// No revocation checking (the default).
    #[default]
    Off,
    /// Listed certificates are refused; a missing or stale CRL is logged
    /// and counted, and handshakes proceed.
    Optional,
    /// Listed certificates are refused, and so is every handshake while the
    /// CRL is missing or past its nextUpdate (fail secure).
    Required,
}

impl CrlMode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Optional => "optional",
            Self::Required => "required",
        }
    }
}

/// Where the CRL is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrlSource {
    /// `http://host:port/path` (the server's metrics listener serves `/crl`).
    /// Plain HTTP is enough: the CRL is signed and its signature verified.
    Http {
        /// `host:port`.
        authority: String,
        /// Path and query.
        path: String,
    },
    /// A file (DER or PEM), e.g. one kept current by another process.
    File(PathBuf),
}

impl std::fmt::Display for CrlSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Http { authority, path } => write!(f, "http://{authority}{path}"),
            Self::File(p) => write!(f, "{}", p.display()),
        }
    }
}

impl CrlSource {
    /// Parses `http://host:port/path`, `file:///abs` or `/abs`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("http://") {
            let (authority, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/crl"),
            };
            if authority.is_empty() || !authority.contains(':') {
                return Err(format!(
                    "crl_source {s:?}: give host and port, like http://meshid-server:9090/crl"
                ));
            }
            return Ok(Self::Http {
                authority: authority.to_string(),
                path: path.to_string(),
            });
        }
        let path = s.strip_prefix("file://").unwrap_or(s);
        if !path.starts_with('/') {
            return Err(format!(
                "crl_source {s:?}: an http:// URL or an absolute file path"
            ));
        }
        Ok(Self::File(PathBuf::from(path)))
    }
}

/// The CRL settings of a validated config (`None` when `crl = "off"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlSettings {
    /// `optional` or `required`.
    pub mode: CrlMode,
    /// Where it is fetched.
    pub source: CrlSource,
    /// How often.
    pub refresh: Duration,
}

/// Default `crl_refresh`.
pub fn default_refresh() -> Duration {
    Duration::from_secs(30)
}

/// Checks the `crl*` keys; `None` when `crl = "off"`.
pub fn settings(c: &Config) -> Result<Option<CrlSettings>, String> {
    if c.crl_refresh < Duration::from_secs(1) {
        return Err("crl_refresh must be at least 1s".into());
    }
    if c.crl == CrlMode::Off {
        return Ok(None);
    }
    let source = c.crl_source.as_deref().ok_or_else(|| {
        format!(
            "crl = \"{}\" needs crl_source (the server's http://host:port/crl, or a file)",
            c.crl.as_str()
        )
    })?;
    Ok(Some(CrlSettings {
        mode: c.crl,
        source: CrlSource::parse(source)?,
        refresh: c.crl_refresh,
    }))
}

/// Labels of CRL fetches.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `ok`, `fetch_error`, `invalid` (does not parse or verify), `older`
    /// (older than the CRL held: not taken).
    pub outcome: &'static str,
}

/// Labels of handshakes refused by the CRL check.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// `revoked`, `stale` (past nextUpdate, required mode) or `missing`
    /// (no CRL yet, required mode).
    pub reason: &'static str,
}

/// `meshid_sidecar_crl_*` metrics.
#[derive(Debug, Clone, Default)]
pub struct CrlMetrics {
    /// nextUpdate of the CRL held, Unix seconds (0: none).
    pub next_update: Gauge,
    /// thisUpdate of the CRL held, Unix seconds (0: none).
    pub this_update: Gauge,
    /// Certificates listed on the CRL held.
    pub revoked: Gauge,
    /// 1 while the CRL held is past its nextUpdate (or none is held).
    pub stale: Gauge,
    /// Fetches by outcome.
    pub fetches: Family<OutcomeLabels, Counter>,
    /// Handshakes refused by the CRL check, by reason.
    pub refusals: Family<ReasonLabels, Counter>,
}

impl CrlMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "crl_next_update_seconds",
            "nextUpdate of the CRL held, Unix seconds (0: none)",
            m.next_update.clone(),
        );
        registry.register(
            "crl_this_update_seconds",
            "thisUpdate of the CRL held, Unix seconds (0: none)",
            m.this_update.clone(),
        );
        registry.register(
            "crl_revoked_certificates",
            "Certificates listed on the CRL held",
            m.revoked.clone(),
        );
        registry.register(
            "crl_stale",
            "1 while the CRL held is past its nextUpdate, or none is held",
            m.stale.clone(),
        );
        registry.register("crl_fetches", "CRL fetches by outcome", m.fetches.clone());
        registry.register(
            "crl_refusals",
            "Handshakes refused by the CRL check, by reason",
            m.refusals.clone(),
        );
        m
    }
}

/// The CRL held, how it is renewed, and the check the verifiers call.
#[derive(Debug)]
pub struct CrlGuard {
    settings: CrlSettings,
    current: ArcSwapOption<VerifiedCrl>,
    last_error: ArcSwapOption<String>,
    was_stale: AtomicBool,
    metrics: CrlMetrics,
}

fn unix(now: UnixTime) -> i64 {
    i64::try_from(now.as_secs()).unwrap_or(i64::MAX)
}

impl CrlGuard {
    /// A guard with no CRL yet.
    pub fn new(settings: CrlSettings, metrics: CrlMetrics) -> Arc<Self> {
        metrics.stale.set(1);
        Arc::new(Self {
            settings,
            current: ArcSwapOption::empty(),
            last_error: ArcSwapOption::empty(),
            was_stale: AtomicBool::new(false),
            metrics,
        })
    }

    /// The CRL held.
    pub fn current(&self) -> Option<Arc<VerifiedCrl>> {
        self.current.load_full()
    }

    /// Status lines for `/readyz`, and why the sidecar is not ready because
    /// of the CRL (required mode only).
    pub fn readiness(&self, now: UnixTime) -> (String, Option<String>) {
        let now = unix(now);
        let s = &self.settings;
        let err = self
            .last_error
            .load_full()
            .map(|e| format!("; last fetch failed: {e}"))
            .unwrap_or_default();
        let (line, problem) = match self.current() {
            None => (
                format!(
                    "crl: {} from {}: none fetched yet{err}\n",
                    s.mode.as_str(),
                    s.source
                ),
                Some(format!("no CRL fetched yet from {}{err}", s.source)),
            ),
            Some(c) => {
                let line = format!(
                    "crl: {} from {}: {} revoked, age {}s, nextUpdate in {}s{err}\n",
                    s.mode.as_str(),
                    s.source,
                    c.revoked_count(),
                    now - c.this_update,
                    c.next_update - now
                );
                let problem = c.is_stale(now).then(|| {
                    format!(
                        "CRL is stale: nextUpdate passed {}s ago (CRL age {}s, from {}){err}",
                        now - c.next_update,
                        now - c.this_update,
                        s.source
                    )
                });
                (line, problem)
            }
        };
        match (s.mode, problem) {
            (CrlMode::Required, Some(p)) => (line, Some(p)),
            (_, Some(p)) => (format!("{line}warning: {p}\n"), None),
            (_, None) => (line, None),
        }
    }

    /// Fetches, verifies and installs the CRL once.
    pub async fn refresh(&self, identity: &Identity) {
        let now = UnixTime::now();
        let res = self.fetch_and_verify(identity, now).await;
        match res {
            Ok(crl) => {
                let older = self
                    .current()
                    .is_some_and(|c| crl.this_update < c.this_update);
                if older {
                    self.metrics
                        .fetches
                        .get_or_create(&OutcomeLabels { outcome: "older" })
                        .inc();
                    self.fail(format!(
                        "the CRL from {} is older than the one held; keeping the newer",
                        self.settings.source
                    ));
                } else {
                    self.metrics
                        .fetches
                        .get_or_create(&OutcomeLabels { outcome: "ok" })
                        .inc();
                    self.metrics.next_update.set(crl.next_update);
                    self.metrics.this_update.set(crl.this_update);
                    self.metrics
                        .revoked
                        .set(i64::try_from(crl.revoked_count()).unwrap_or(i64::MAX));
                    let changed = self
                        .current()
                        .is_none_or(|c| c.revoked_count() != crl.revoked_count());
                    if changed {
                        tracing::info!(
                            revoked = crl.revoked_count(),
                            issuer = %crl.issuer,
                            next_update = crl.next_update,
                            "CRL installed"
                        );
                    }
                    self.current.store(Some(Arc::new(crl)));
                    self.last_error.store(None);
                }
            }
            Err((outcome, e)) => {
                self.metrics
                    .fetches
                    .get_or_create(&OutcomeLabels { outcome })
                    .inc();
                self.fail(e);
            }
        }
        self.update_staleness(unix(now));
    }

    fn fail(&self, e: String) {
        let same = self.last_error.load().as_deref() == Some(&e);
        if !same {
            tracing::warn!(source = %self.settings.source, error = %e, "CRL not updated");
        }
        self.last_error.store(Some(Arc::new(e)));
    }

    fn update_staleness(&self, now: i64) {
        let stale = self.current().is_none_or(|c| c.is_stale(now));
        self.metrics.stale.set(i64::from(stale));
        let was = self.was_stale.swap(stale, Ordering::Relaxed);
        if stale && !was {
            if let Some(c) = self.current() {
                tracing::error!(
                    mode = self.settings.mode.as_str(),
                    next_update = c.next_update,
                    source = %self.settings.source,
                    "CRL is past its nextUpdate{}",
                    if self.settings.mode == CrlMode::Required {
                        ": refusing every handshake until a fresh CRL arrives"
                    } else {
                        ""
                    }
                );
            }
        } else if !stale && was {
            tracing::info!("CRL is fresh again");
        }
    }

    async fn fetch_and_verify(
        &self,
        identity: &Identity,
        now: UnixTime,
    ) -> Result<VerifiedCrl, (&'static str, String)> {
        let raw = tokio::time::timeout(self.settings.refresh.max(Duration::from_secs(5)), async {
            match &self.settings.source {
                CrlSource::File(p) => tokio::fs::read(p)
                    .await
                    .map_err(|e| format!("reading {}: {e}", p.display())),
                CrlSource::Http { authority, path } => http_get(authority, path).await,
            }
        })
        .await
        .map_err(|_| ("fetch_error", "timed out".to_string()))?
        .map_err(|e| ("fetch_error", e))?;
        if raw.len() > MAX_CRL_BYTES {
            return Err(("invalid", format!("larger than {MAX_CRL_BYTES} bytes")));
        }
        let snap = identity
            .current()
            .ok_or(("fetch_error", "no SVID yet".to_string()))?;
        let td = snap.svid.spiffe_id.trust_domain().as_str().to_string();
        let der = crl_der(&raw).map_err(|e| ("invalid", e.to_string()))?;
        let tail = snap.chain.get(1..).unwrap_or_default();
        let provider = meshid_identity::crypto::provider();
        verify_crl(&der, &td, &snap.bundles, tail, now, &provider)
            .map_err(|e| ("invalid", e.to_string()))
    }

    /// Fetches every `refresh` until `shutdown`, starting once an SVID is
    /// installed (the CRL is verified against its bundle).
    pub async fn run(self: Arc<Self>, identity: Arc<Identity>, shutdown: CancellationToken) {
        tokio::select! {
            () = identity.ready() => {},
            () = shutdown.cancelled() => return,
        }
        loop {
            self.refresh(&identity).await;
            tokio::select! {
                () = tokio::time::sleep(self.settings.refresh) => {},
                () = shutdown.cancelled() => return,
            }
        }
    }
}

impl RevocationCheck for CrlGuard {
    fn check(
        &self,
        id: &SpiffeId,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), RevocationError> {
        let refuse = |reason: &'static str| {
            self.metrics
                .refusals
                .get_or_create(&ReasonLabels { reason })
                .inc();
        };
        let required = self.settings.mode == CrlMode::Required;
        let Some(crl) = self.current.load_full() else {
            if required {
                refuse("missing");
                return Err(RevocationError::Unknown(format!(
                    "crl = \"required\" and no CRL fetched yet from {}",
                    self.settings.source
                )));
            }
            return Ok(());
        };
        if id.trust_domain().as_str() != crl.trust_domain {
            return Ok(());
        }
        if crl.lists(end_entity) || intermediates.iter().any(|c| crl.lists(c)) {
            refuse("revoked");
            return Err(RevocationError::Revoked);
        }
        let now = unix(now);
        if required && crl.is_stale(now) {
            refuse("stale");
            self.update_staleness(now);
            return Err(RevocationError::Unknown(format!(
                "crl = \"required\" and the CRL is past its nextUpdate by {}s",
                now - crl.next_update
            )));
        }
        Ok(())
    }
}

async fn http_get(authority: &str, path: &str) -> Result<Vec<u8>, String> {
    use http_body_util::BodyExt as _;
    let tcp = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| format!("connect {authority}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("http: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, authority)
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("GET http://{authority}{path}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!(
            "GET http://{authority}{path}: HTTP {}",
            resp.status()
        ));
    }
    let body = http_body_util::Limited::new(resp.into_body(), MAX_CRL_BYTES)
        .collect()
        .await
        .map_err(|e| format!("GET http://{authority}{path}: {e}"))?;
    Ok(body.to_bytes().to_vec())
}

/// Starts CRL checking for `identity` if the config asks for it: installs
/// the check in the verifiers (call before the first SVID update) and
/// starts fetching.
pub fn start(
    settings: Option<CrlSettings>,
    identity: &Arc<Identity>,
    metrics: &CrlMetrics,
    shutdown: CancellationToken,
) -> Option<Arc<CrlGuard>> {
    let s = settings?;
    tracing::info!(mode = s.mode.as_str(), source = %s.source, refresh = ?s.refresh, "CRL checking on");
    let guard = CrlGuard::new(s, metrics.clone());
    identity.set_crl(guard.clone());
    tokio::spawn(guard.clone().run(identity.clone(), shutdown));
    Some(guard)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse() {
        assert_eq!(
            CrlSource::parse("http://srv:9090/crl").unwrap(),
            CrlSource::Http {
                authority: "srv:9090".into(),
                path: "/crl".into()
            }
        );
        assert_eq!(
            CrlSource::parse("http://srv:9090").unwrap().to_string(),
            "http://srv:9090/crl"
        );
        assert_eq!(
            CrlSource::parse("file:///x/crl.pem").unwrap(),
            CrlSource::File("/x/crl.pem".into())
        );
        assert!(CrlSource::parse("https://srv:9090/crl").is_err());
        assert!(CrlSource::parse("http://srv/crl").is_err());
        assert!(CrlSource::parse("crl.pem").is_err());
    }
}
