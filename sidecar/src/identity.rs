//! The sidecar's identity: the current X509-SVID and trust bundles, turned
//! into rustls configs and swapped atomically on every update.
//!
//! [`Identity`] is the one channel through which certificates change. Its
//! input is [`SvidMaterial`] — in production fed by [`run_workload_api`]
//! (the `spiffe` crate's `X509Source`, which reconnects with backoff and
//! keeps the last SVID while the agent is away), in tests fed directly with
//! generated certificates. Each update builds a fresh [`Snapshot`] of every
//! rustls config and stores it with one atomic pointer swap: a handshake in
//! progress or an established connection keeps the config it started with,
//! and the next handshake sees the new one. Nothing rebuilds a verifier per
//! connection.
//!
//! # Session resumption
//!
//! Every inbound [`ServerConfig`] issues TLS 1.3 session tickets (stateless,
//! encrypted with a rotating key) and every outbound [`ClientConfig`] keeps
//! an in-memory session cache, so a sidecar reconnecting to another sidecar
//! skips the certificate exchange and both signatures: new mTLS
//! connections per second go up several times. The trade-off: a resumed
//! session is **not re-verified** — the peer's identity is the one proved by
//! the original full handshake. We bound that:
//!
//! - tickets are keyed per snapshot, so any SVID, bundle or policy update
//!   invalidates every earlier ticket (the next handshake is a full one
//!   against the new bundle and policy);
//! - a ticket's lifetime never exceeds the remaining lifetime of the SVID
//!   that issued it, and tickets are refused once that SVID has expired;
//! - the readiness probe never resumes, so it always proves a full handshake.
//!
//! A peer whose SVID is revoked without a bundle change can thus resume for
//! at most the issuing SVID's remaining lifetime (≤ its TTL, default 1 h);
//! the same holds for an established connection in any TLS proxy.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use meshid_identity::verify::{SpiffeClientVerifier, SpiffeServerVerifier};
use meshid_identity::{Authorizer, SpiffeId, SvidInfo, TrustBundles, crypto};
use rustls::server::ProducesTickets;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// TLS server name the readiness probe sends, so the inbound listener can
/// tell probes from traffic (probes are verified but never forwarded).
pub const PROBE_SNI: &str = "meshid-readyz.invalid";

/// Identity errors.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The SVID is unusable.
    #[error("unusable SVID: {0}")]
    Svid(#[from] meshid_identity::SvidError),
    /// The SVID chain is empty.
    #[error("empty SVID certificate chain")]
    EmptyChain,
    /// rustls refused the key or config.
    #[error("building TLS config: {0}")]
    Tls(#[from] rustls::Error),
    /// The Workload API source failed.
    #[error("workload API: {0}")]
    WorkloadApi(String),
}

/// An X509-SVID with its key and the trust bundles to verify peers with.
#[derive(Debug)]
pub struct SvidMaterial {
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The SVID's private key.
    pub key: PrivateKeyDer<'static>,
    /// Bundles of the own and federated trust domains.
    pub bundles: TrustBundles,
}

/// What every connection needs: per-listener authorization.
#[derive(Debug, Clone)]
pub struct Policies {
    /// One authorizer per inbound listener, in config order.
    pub inbound: Vec<Authorizer>,
    /// One expected server ID per outbound listener, in config order.
    pub outbound: Vec<SpiffeId>,
    /// Allow TLS 1.2 besides 1.3.
    pub allow_tls12: bool,
    /// Key exchange groups offered and accepted.
    pub key_exchange: crypto::KeyExchange,
}

/// Every rustls config built from one SVID update.
#[derive(Debug)]
pub struct Snapshot {
    /// The SVID presented.
    pub svid: SvidInfo,
    /// Increments with each update, starting at 1.
    pub generation: u64,
    /// One server config per inbound listener.
    pub inbound: Vec<Arc<ServerConfig>>,
    /// Server config for readiness probes: client must be this same SPIFFE ID.
    pub probe_server: Arc<ServerConfig>,
    /// One client config per outbound listener.
    pub outbound: Vec<Arc<ClientConfig>>,
    /// Client config for readiness probes: no resumption, server must be us.
    pub probe_client: Arc<ClientConfig>,
}

/// The current identity, swapped atomically on each update.
#[derive(Debug)]
pub struct Identity {
    policies: Policies,
    current: ArcSwapOption<Snapshot>,
    generation: watch::Sender<u64>,
    metrics: Arc<Metrics>,
}

impl Identity {
    /// No SVID yet: [`Identity::current`] is `None` until the first update.
    pub fn new(policies: Policies, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            policies,
            current: ArcSwapOption::empty(),
            generation: watch::channel(0).0,
            metrics,
        })
    }

    /// The current snapshot, or `None` before the first SVID (not ready).
    pub fn current(&self) -> Option<Arc<Snapshot>> {
        self.current.load_full()
    }

    /// A receiver of the generation number (0 = no SVID yet).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Waits until an SVID is present.
    pub async fn ready(&self) {
        let mut rx = self.subscribe();
        // The sender lives in `self`, so this cannot fail while we borrow it.
        let _ = rx.wait_for(|g| *g > 0).await;
    }

    /// Builds every config from `material` and swaps them in. On error the
    /// previous snapshot stays in place.
    pub fn update(&self, material: SvidMaterial) -> Result<Arc<Snapshot>, IdentityError> {
        let leaf = material.chain.first().ok_or(IdentityError::EmptyChain)?;
        let svid = SvidInfo::from_der(leaf)?;
        let provider = crypto::provider_for(self.policies.key_exchange);
        let versions = crypto::versions(self.policies.allow_tls12);
        let key = Arc::new(CertifiedKey::from_der(
            material.chain.clone(),
            material.key,
            &provider,
        )?);
        let ticketer: Arc<dyn ProducesTickets> = Arc::new(SvidBoundTicketer {
            inner: rustls::crypto::aws_lc_rs::Ticketer::new()?,
            not_after: svid.not_after,
        });

        let server = |authorizer: Authorizer, tickets: bool| -> Result<_, IdentityError> {
            let verifier =
                SpiffeClientVerifier::new(material.bundles.clone(), authorizer, &provider, true);
            let mut cfg = ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(versions)?
                .with_client_cert_verifier(verifier)
                .with_cert_resolver(Arc::new(SingleCertAndKey::from(key.clone())));
            if tickets {
                cfg.ticketer = ticketer.clone();
            } else {
                cfg.send_tls13_tickets = 0;
            }
            Ok(Arc::new(cfg))
        };
        let client = |server_id: &SpiffeId, resume: bool| -> Result<_, IdentityError> {
            let verifier = SpiffeServerVerifier::new(
                material.bundles.clone(),
                Authorizer::Exact(server_id.clone()),
                &provider,
            );
            let mut cfg = ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(versions)?
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(key.clone())));
            if !resume {
                cfg.resumption = rustls::client::Resumption::disabled();
            }
            Ok(Arc::new(cfg))
        };

        let inbound = self
            .policies
            .inbound
            .iter()
            .map(|a| server(a.clone(), true))
            .collect::<Result<Vec<_>, _>>()?;
        let outbound = self
            .policies
            .outbound
            .iter()
            .map(|id| client(id, true))
            .collect::<Result<Vec<_>, _>>()?;
        let probe_server = server(Authorizer::Exact(svid.spiffe_id.clone()), false)?;
        let probe_client = client(&svid.spiffe_id, false)?;

        let generation = *self.generation.borrow() + 1;
        let snapshot = Arc::new(Snapshot {
            svid,
            generation,
            inbound,
            probe_server,
            outbound,
            probe_client,
        });
        self.current.store(Some(snapshot.clone()));
        self.generation.send_replace(generation);
        self.metrics
            .svid_not_after
            .set(snapshot.svid.not_after_unix());
        self.metrics.rotations.inc();
        tracing::info!(
            spiffe_id = %snapshot.svid.spiffe_id,
            serial = %snapshot.svid.serial,
            not_after = snapshot.svid.not_after_unix(),
            generation,
            "SVID installed"
        );
        Ok(snapshot)
    }
}

/// Session tickets that never outlive the SVID that issued them.
#[derive(Debug)]
struct SvidBoundTicketer {
    inner: Arc<dyn ProducesTickets>,
    not_after: SystemTime,
}

impl SvidBoundTicketer {
    fn remaining(&self) -> Duration {
        self.not_after
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
    }
}

impl ProducesTickets for SvidBoundTicketer {
    fn enabled(&self) -> bool {
        self.inner.enabled()
    }

    fn lifetime(&self) -> u32 {
        let remaining = u32::try_from(self.remaining().as_secs()).unwrap_or(u32::MAX);
        self.inner.lifetime().min(remaining)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        if self.remaining().is_zero() {
            return None;
        }
        self.inner.encrypt(plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if self.remaining().is_zero() {
            return None;
        }
        self.inner.decrypt(cipher)
    }
}

/// Picks the SVID with a given SPIFFE ID.
#[derive(Debug)]
struct IdPicker(SpiffeId);

impl spiffe::x509_source::SvidPicker for IdPicker {
    fn pick_svid(&self, svids: &[Arc<spiffe::X509Svid>]) -> Option<usize> {
        svids.iter().position(|s| s.spiffe_id() == &self.0)
    }
}

fn material_from_source(source: &spiffe::X509Source) -> Result<SvidMaterial, IdentityError> {
    let wl = |e: spiffe::X509SourceError| IdentityError::WorkloadApi(e.to_string());
    let svid = source.svid().map_err(wl)?;
    let chain = svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(svid.private_key().as_bytes().to_vec().into());
    let mut bundles = TrustBundles::new();
    for (td, bundle) in source.bundle_set().map_err(wl)?.iter() {
        let ders: Vec<CertificateDer<'_>> = bundle
            .authorities()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes()))
            .collect();
        let skipped = bundles.add(td.as_str(), &ders);
        if skipped > 0 {
            tracing::warn!(trust_domain = %td, skipped, "bundle certificates unusable as trust anchors");
        }
    }
    Ok(SvidMaterial {
        chain,
        key,
        bundles,
    })
}

/// Feeds `identity` from the Workload API at `endpoint` until `shutdown`.
///
/// Connecting is retried with exponential backoff (1 s … 30 s) until the
/// first SVID arrives; afterwards the `X509Source` reconnects by itself and
/// keeps the last SVID while the agent is unreachable, so the sidecar keeps
/// serving with it.
pub async fn run_workload_api(
    identity: Arc<Identity>,
    endpoint: String,
    want: Option<SpiffeId>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_secs(1);
    let source = loop {
        let mut builder = spiffe::X509Source::builder()
            .endpoint(&endpoint)
            .reconnect_backoff(Duration::from_millis(500), Duration::from_secs(30));
        if let Some(id) = &want {
            builder = builder.picker(IdPicker(id.clone()));
        }
        let attempt = tokio::select! {
            r = builder.build() => r,
            () = shutdown.cancelled() => return,
        };
        match attempt {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!(%endpoint, error = %e, retry_in = ?backoff, "workload API not ready");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    };
    let mut updates = source.updated();
    loop {
        match material_from_source(&source).and_then(|m| identity.update(m)) {
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "SVID update refused; keeping the previous one"),
        }
        tokio::select! {
            r = updates.changed() => if let Err(e) = r {
                tracing::error!(error = %e, "workload API source closed");
                return;
            },
            () = shutdown.cancelled() => break,
        }
    }
    source.shutdown().await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ticketer(not_after: SystemTime) -> SvidBoundTicketer {
        SvidBoundTicketer {
            inner: rustls::crypto::aws_lc_rs::Ticketer::new().unwrap(),
            not_after,
        }
    }

    #[test]
    fn ticket_lifetime_is_capped_by_svid_lifetime() {
        let t = ticketer(SystemTime::now() + Duration::from_secs(600));
        assert!(t.enabled());
        assert!(
            t.lifetime() <= 600 && t.lifetime() >= 590,
            "{}",
            t.lifetime()
        );
        let c = t.encrypt(b"session").unwrap();
        assert_eq!(t.decrypt(&c).unwrap(), b"session");

        // A long-lived SVID keeps the ticketer's own (shorter) lifetime.
        let long = ticketer(SystemTime::now() + Duration::from_secs(30 * 24 * 3600));
        assert!(long.lifetime() <= 24 * 3600);
    }

    #[test]
    fn no_tickets_after_svid_expiry() {
        let live = ticketer(SystemTime::now() + Duration::from_secs(600));
        let c = live.encrypt(b"session").unwrap();
        let expired = SvidBoundTicketer {
            inner: live.inner.clone(),
            not_after: SystemTime::now() - Duration::from_secs(1),
        };
        assert_eq!(expired.lifetime(), 0);
        assert!(expired.encrypt(b"session").is_none());
        assert!(expired.decrypt(&c).is_none(), "tickets die with the SVID");
    }
}
