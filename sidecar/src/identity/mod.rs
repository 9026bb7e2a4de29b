//! The sidecar's identity: the current X509-SVID and trust bundles, turned
//! into rustls configs and swapped atomically on every update.
//!
//! [`Identity`] is the one channel through which certificates change. Its
//! input is [`SvidMaterial`] — in production fed by [`run_workload_api`]
//! (the `spiffe` crate's `X509Source`, which reconnects with backoff and
//! keeps the last SVID while the agent is away), in tests fed directly with
//! generated certificates. Each update builds a fresh [`Snapshot`] (the SVID,
//! the bundles, the readiness-probe configs) and a fresh rustls config for
//! every listener, and swaps each in with one atomic pointer store: a
//! handshake in progress or an established connection keeps the config it
//! started with, and the next handshake sees the new one. Nothing rebuilds a
//! verifier per connection. Each listener carries its own policy in the
//! handle it registered ([`Identity::inbound_listener`],
//! [`Identity::outbound_listener`]).
//!
//! Files: `decision.rs` (may an update be used), `listener.rs` (per-listener
//! configs and re-verification of resumed sessions), `tickets.rs` (session
//! tickets bound to the SVID), `source.rs` (the Workload API feed).
//!
//! # Session resumption
//!
//! Every inbound [`ServerConfig`] issues TLS 1.3 session tickets (stateless,
//! encrypted with a rotating key) and every outbound [`ClientConfig`] keeps
//! an in-memory session cache, so a sidecar reconnecting to another sidecar
//! skips the certificate exchange and both handshake signatures: new mTLS
//! connections per second go up severalfold. A resumed session carries the
//! peer certificate chain proved by the original full handshake; it is held
//! to the same rules as a new one:
//!
//! - **ticket keys are per listener and per snapshot**: a ticket issued by
//!   one inbound listener cannot be decrypted by another (whose allow list
//!   may differ), and any SVID, bundle or policy update invalidates every
//!   earlier ticket ([`listener`]);
//! - **every resumed session is re-verified before anything is forwarded**
//!   ([`InboundConfig::reverify_resumed`]): the peer chain from the ticket against
//!   the current bundle at the current time (so a peer SVID that expired
//!   after the ticket was issued is refused) and against the listener's
//!   policy. A refused resumption is counted under the same outcome as a
//!   refused full handshake (`expired`, `denied`, …). Outbound, the
//!   upstream's chain from the session cache gets the same check
//!   ([`OutboundConfig::reverify_resumed_upstream`]);
//! - a ticket's lifetime never exceeds the remaining lifetime of the SVID
//!   that issued it, and tickets are refused once that SVID has expired;
//! - the readiness probe never resumes, so it always proves a full handshake.
//!
//! # Bundle updates
//!
//! An update is checked before it is used ([`decide_update`]): roots past
//! their notAfter are dropped first; if the update's SVID chain then verifies
//! against the update's own bundle, all of it is taken (during a CA rotation
//! the bundle holds the old and the new root, and an SVID from either
//! verifies). If it does not, but the last good bundle still verifies it, the
//! own trust domain's bundle of the update is refused and the last good one
//! kept (`bundle_updates_refused_total`). If neither verifies it, the whole
//! update is refused and the previous snapshot stays
//! (`svid_updates_refused_total`). An update identical to what is in use
//! changes nothing (no new snapshot, so no ticket is voided).

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use meshid_identity::{Authorizer, SpiffeId, SvidInfo, TrustBundles, crypto};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio::sync::watch;

use crate::metrics::Metrics;

mod decision;
mod listener;
mod source;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;
mod tickets;

pub use decision::{BundleDecision, decide_update};
pub use listener::{ALPN_H2, InboundConfig, InboundTls, OutboundConfig, OutboundTls};
pub use source::run_workload_api;

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
    /// The SVID verifies against neither the update's bundle nor the last
    /// good one.
    #[error("SVID does not verify against its trust bundle: {0}")]
    Untrusted(String),
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

/// TLS settings every listener shares (each listener's policy is its own).
#[derive(Debug, Clone, Copy, Default)]
pub struct TlsSettings {
    /// Allow TLS 1.2 besides 1.3.
    pub allow_tls12: bool,
    /// Key exchange groups offered and accepted.
    pub key_exchange: crypto::KeyExchange,
}

/// The provider and protocol versions of every config.
#[derive(Debug)]
struct TlsParts {
    provider: Arc<CryptoProvider>,
    versions: &'static [&'static rustls::SupportedProtocolVersion],
}

/// What a listener config is built from.
#[derive(Debug)]
pub(crate) struct Base<'a> {
    generation: u64,
    key: &'a Arc<CertifiedKey>,
    bundles: &'a TrustBundles,
    not_after: SystemTime,
    tls: &'a TlsParts,
    /// The CRL check every verifier runs, if on.
    revocation: Option<Arc<dyn meshid_identity::verify::RevocationCheck>>,
}

/// The SVID and bundles of one update, with the readiness-probe configs.
#[derive(Debug)]
pub struct Snapshot {
    /// The SVID presented.
    pub svid: SvidInfo,
    /// Increments with each update, starting at 1.
    pub generation: u64,
    /// The SVID chain presented (leaf first).
    pub chain: Vec<CertificateDer<'static>>,
    /// The bundles peers are verified with (expired roots removed).
    pub bundles: TrustBundles,
    /// Server config for readiness probes: client must be this same SPIFFE ID.
    pub probe_server: Arc<ServerConfig>,
    /// Client config for readiness probes: no resumption, server must be us.
    pub probe_client: Arc<ClientConfig>,
    /// The SVID and its key, as every listener presents it.
    key: Arc<CertifiedKey>,
}

/// Every listener registered with an [`Identity`].
#[derive(Debug, Default)]
struct Listeners {
    inbound: Vec<Arc<InboundTls>>,
    outbound: Vec<Arc<OutboundTls>>,
}

/// The current identity, swapped atomically on each update.
#[derive(Debug)]
pub struct Identity {
    tls: TlsParts,
    /// CRL check installed in every verifier built after it is set.
    crl: std::sync::OnceLock<Arc<crate::crl::CrlGuard>>,
    current: ArcSwapOption<Snapshot>,
    /// Also serialises updates with listener registration.
    listeners: Mutex<Listeners>,
    generation: watch::Sender<u64>,
    metrics: Arc<Metrics>,
}

impl Identity {
    /// No SVID yet: [`Identity::current`] is `None` until the first update.
    pub fn new(settings: TlsSettings, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            tls: TlsParts {
                provider: crypto::provider_for(settings.key_exchange),
                versions: crypto::versions(settings.allow_tls12),
            },
            crl: std::sync::OnceLock::new(),
            current: ArcSwapOption::empty(),
            listeners: Mutex::default(),
            generation: watch::channel(0).0,
            metrics,
        })
    }

    /// Installs CRL checking in the verifiers of every later update (call
    /// before the first one); a second call is ignored.
    pub fn set_crl(&self, guard: Arc<crate::crl::CrlGuard>) {
        let _ = self.crl.set(guard);
    }

    /// The CRL check, if on.
    pub fn crl(&self) -> Option<&Arc<crate::crl::CrlGuard>> {
        self.crl.get()
    }

    fn revocation(&self) -> Option<Arc<dyn meshid_identity::verify::RevocationCheck>> {
        self.crl()
            .map(|c| c.clone() as Arc<dyn meshid_identity::verify::RevocationCheck>)
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

    fn listeners(&self) -> std::sync::MutexGuard<'_, Listeners> {
        // A panic while holding the lock leaves the lists intact.
        self.listeners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers an inbound listener admitting the peers `authorizer`
    /// allows, with TLS 1.3 session tickets of its own and ALPN `alpn`. Its
    /// config follows every update from now on.
    pub fn inbound_listener(
        &self,
        authorizer: Authorizer,
        alpn: Vec<Vec<u8>>,
    ) -> Result<Arc<InboundTls>, IdentityError> {
        let l = Arc::new(InboundTls::new(authorizer, true, alpn));
        let mut all = self.listeners();
        if let Some(snap) = self.current() {
            l.install(l.build(&self.base(&snap))?);
        }
        all.inbound.push(l.clone());
        Ok(l)
    }

    /// Registers an outbound listener requiring upstream `server_id`, with a
    /// client session cache and ALPN `alpn`. Its config follows every update
    /// from now on.
    pub fn outbound_listener(
        &self,
        server_id: SpiffeId,
        alpn: Vec<Vec<u8>>,
    ) -> Result<Arc<OutboundTls>, IdentityError> {
        let l = Arc::new(OutboundTls::new(server_id, true, alpn));
        let mut all = self.listeners();
        if let Some(snap) = self.current() {
            l.install(l.build(&self.base(&snap))?);
        }
        all.outbound.push(l.clone());
        Ok(l)
    }

    fn base<'a>(&'a self, snap: &'a Snapshot) -> Base<'a> {
        Base {
            generation: snap.generation,
            key: &snap.key,
            bundles: &snap.bundles,
            not_after: snap.svid.not_after,
            tls: &self.tls,
            revocation: self.revocation(),
        }
    }

    /// Checks `material` ([`decide_update`]), builds every config from it and
    /// swaps them in. On error the previous snapshot stays in place; an
    /// update identical to the current one returns the current snapshot.
    pub fn update(&self, mut material: SvidMaterial) -> Result<Arc<Snapshot>, IdentityError> {
        let leaf = material.chain.first().ok_or(IdentityError::EmptyChain)?;
        let svid = SvidInfo::from_der(leaf)?;
        let now = UnixTime::now();
        let pruned = material.bundles.prune_expired(now);
        if pruned > 0 {
            self.metrics.expired_roots_pruned.inc_by(pruned as u64);
            tracing::warn!(
                pruned,
                "trust bundle holds CA certificates past their notAfter; they are not trusted"
            );
        }
        let listeners = self.listeners();
        let current = self.current();
        let last_good = current.as_ref().map(|c| {
            let mut b = c.bundles.clone();
            b.prune_expired(now);
            b
        });
        match decide_update(
            &material.chain,
            &material.bundles,
            last_good.as_ref(),
            SystemTime::now(),
        ) {
            BundleDecision::Accept => {}
            BundleDecision::KeepLastBundle {
                trust_domain,
                reason,
            } => {
                if let Some(lg) = &last_good {
                    material.bundles.copy_domain_from(lg, &trust_domain);
                }
                self.metrics.bundle_updates_refused.inc();
                tracing::warn!(
                    %trust_domain,
                    spiffe_id = %svid.spiffe_id,
                    serial = %svid.serial,
                    %reason,
                    "bundle update refused: it would not verify our own SVID; keeping the last good bundle"
                );
            }
            BundleDecision::Refuse { reason } => {
                self.metrics.svid_updates_refused.inc();
                return Err(IdentityError::Untrusted(reason));
            }
        }
        if let Some(cur) = &current
            && cur.chain == material.chain
            && cur.bundles == material.bundles
        {
            return Ok(cur.clone());
        }

        let key = Arc::new(CertifiedKey::from_der(
            material.chain.clone(),
            material.key,
            &self.tls.provider,
        )?);
        let generation = *self.generation.borrow() + 1;
        let base = Base {
            generation,
            key: &key,
            bundles: &material.bundles,
            not_after: svid.not_after,
            tls: &self.tls,
            revocation: self.revocation(),
        };
        // Readiness probes: no resumption, the peer must be us.
        let own = svid.spiffe_id.clone();
        let probe_server = InboundTls::new(Authorizer::Exact(own.clone()), false, vec![])
            .build(&base)?
            .config;
        let probe_client = OutboundTls::new(own, false, vec![]).build(&base)?.config;
        let inbound = listeners
            .inbound
            .iter()
            .map(|l| l.build(&base))
            .collect::<Result<Vec<_>, _>>()?;
        let outbound = listeners
            .outbound
            .iter()
            .map(|l| l.build(&base))
            .collect::<Result<Vec<_>, _>>()?;

        let snapshot = Arc::new(Snapshot {
            svid,
            generation,
            chain: material.chain,
            bundles: material.bundles,
            probe_server,
            probe_client,
            key,
        });
        self.current.store(Some(snapshot.clone()));
        for (l, c) in listeners.inbound.iter().zip(inbound) {
            l.install(c);
        }
        for (l, c) in listeners.outbound.iter().zip(outbound) {
            l.install(c);
        }
        drop(listeners);
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
