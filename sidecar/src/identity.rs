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
//! skips the certificate exchange and both handshake signatures: new mTLS
//! connections per second go up severalfold. A resumed session carries the
//! peer certificate chain proved by the original full handshake; it is held
//! to the same rules as a new one:
//!
//! - **ticket keys are per listener and per snapshot**: a ticket issued by
//!   one inbound listener cannot be decrypted by another (whose allow list
//!   may differ), and any SVID, bundle or policy update invalidates every
//!   earlier ticket;
//! - **every resumed session is re-verified before anything is forwarded**
//!   ([`Snapshot::reverify_resumed`]): the peer chain from the ticket against
//!   the current bundle at the current time (so a peer SVID that expired
//!   after the ticket was issued is refused) and against the listener's
//!   policy. A refused resumption is counted under the same outcome as a
//!   refused full handshake (`expired`, `denied`, …). Outbound, the
//!   upstream's chain from the session cache gets the same check
//!   ([`Snapshot::reverify_resumed_upstream`]);
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

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use meshid_identity::verify::{
    SpiffeClientVerifier, SpiffeServerVerifier, describe, verify_svid_chain,
};
use meshid_identity::{Authorizer, SpiffeId, SvidInfo, TrustBundles, crypto};
use rustls::client::danger::ServerCertVerifier;
use rustls::server::ProducesTickets;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
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
    /// The SVID chain presented (leaf first).
    pub chain: Vec<CertificateDer<'static>>,
    /// The bundles peers are verified with (expired roots removed).
    pub bundles: TrustBundles,
    /// One server config per inbound listener, each with its own ticket key.
    pub inbound: Vec<Arc<ServerConfig>>,
    /// The client verifier of each inbound listener (the same one its
    /// config uses), to re-verify resumed sessions.
    pub inbound_verifiers: Vec<Arc<SpiffeClientVerifier>>,
    /// Server config for readiness probes: client must be this same SPIFFE ID.
    pub probe_server: Arc<ServerConfig>,
    /// One client config per outbound listener.
    pub outbound: Vec<Arc<ClientConfig>>,
    /// The server verifier of each outbound listener (the same one its
    /// config uses), to re-verify resumed sessions.
    pub outbound_verifiers: Vec<Arc<SpiffeServerVerifier>>,
    /// Client config for readiness probes: no resumption, server must be us.
    pub probe_client: Arc<ClientConfig>,
}

impl Snapshot {
    /// Re-verifies the peer of a resumed session on inbound listener `idx`:
    /// the chain `peer` (leaf first, as the ticket carried it) against this
    /// snapshot's bundle, at the current time, and the listener's policy —
    /// what a full handshake would check, minus the proof of key possession
    /// that the original handshake made. Returns the peer's SPIFFE ID.
    pub fn reverify_resumed(
        &self,
        idx: usize,
        peer: &[CertificateDer<'_>],
    ) -> Result<SpiffeId, rustls::Error> {
        let verifier = self
            .inbound_verifiers
            .get(idx)
            .ok_or_else(|| rustls::Error::General("no verifier for listener".into()))?;
        let (leaf, intermediates) = peer
            .split_first()
            .ok_or(rustls::Error::NoCertificatesPresented)?;
        verifier.verify_client_cert(leaf, intermediates, UnixTime::now())?;
        // The verifier admitted the leaf, so it parses as an SVID.
        SvidInfo::from_der(leaf)
            .map(|i| i.spiffe_id)
            .map_err(|e| rustls::Error::General(e.to_string()))
    }
}

impl Snapshot {
    /// Re-verifies the upstream of a resumed session on outbound listener
    /// `idx`, as [`Snapshot::reverify_resumed`] does for inbound peers: the
    /// chain from the session cache against this snapshot's bundle, at the
    /// current time, and the listener's `server_id`.
    pub fn reverify_resumed_upstream(
        &self,
        idx: usize,
        upstream: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        let verifier = self
            .outbound_verifiers
            .get(idx)
            .ok_or_else(|| rustls::Error::General("no verifier for listener".into()))?;
        let (leaf, intermediates) = upstream
            .split_first()
            .ok_or(rustls::Error::NoCertificatesPresented)?;
        // The SPIFFE verifiers do not look at the TLS server name.
        let name = ServerName::try_from("upstream.invalid")
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(leaf, intermediates, &name, &[], UnixTime::now())?;
        Ok(())
    }
}

/// What to do with a Workload API update (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleDecision {
    /// The SVID verifies against the update's bundle: take the update.
    Accept,
    /// The update's bundle would not verify the SVID but the last good one
    /// does: keep the last good bundle of `trust_domain`.
    KeepLastBundle {
        /// The SVID's trust domain.
        trust_domain: String,
        /// Why the update's bundle does not verify the SVID.
        reason: String,
    },
    /// The SVID verifies against neither: refuse the whole update.
    Refuse {
        /// Why the SVID does not verify against the update's bundle.
        reason: String,
    },
}

/// Decides whether an update with SVID `chain` and `bundles` (expired roots
/// already pruned) may be used, given the last good bundles (`None` before
/// the first SVID). Pure: no state, no I/O.
pub fn decide_update(
    chain: &[CertificateDer<'_>],
    bundles: &TrustBundles,
    last_good: Option<&TrustBundles>,
    now: SystemTime,
) -> BundleDecision {
    let provider = crypto::provider();
    let now = UnixTime::since_unix_epoch(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO),
    );
    let err = match verify_svid_chain(bundles, chain, now, &provider) {
        Ok(_) => return BundleDecision::Accept,
        Err(e) => describe(&e),
    };
    match last_good.map(|lg| verify_svid_chain(lg, chain, now, &provider)) {
        Some(Ok(id)) => BundleDecision::KeepLastBundle {
            trust_domain: id.trust_domain().as_str().to_string(),
            reason: err,
        },
        _ => BundleDecision::Refuse { reason: err },
    }
}

fn unix_now() -> UnixTime {
    UnixTime::now()
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

    /// Checks `material` ([`decide_update`]), builds every config from it and
    /// swaps them in. On error the previous snapshot stays in place; an
    /// update identical to the current one returns the current snapshot.
    pub fn update(&self, mut material: SvidMaterial) -> Result<Arc<Snapshot>, IdentityError> {
        let leaf = material.chain.first().ok_or(IdentityError::EmptyChain)?;
        let svid = SvidInfo::from_der(leaf)?;
        let now = unix_now();
        let pruned = material.bundles.prune_expired(now);
        if pruned > 0 {
            self.metrics.expired_roots_pruned.inc_by(pruned as u64);
            tracing::warn!(
                pruned,
                "trust bundle holds CA certificates past their notAfter; they are not trusted"
            );
        }
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

        let provider = crypto::provider_for(self.policies.key_exchange);
        let versions = crypto::versions(self.policies.allow_tls12);
        let key = Arc::new(CertifiedKey::from_der(
            material.chain.clone(),
            material.key,
            &provider,
        )?);
        let new_ticketer = || -> Result<Arc<dyn ProducesTickets>, IdentityError> {
            Ok(Arc::new(SvidBoundTicketer {
                inner: rustls::crypto::aws_lc_rs::Ticketer::new()?,
                not_after: svid.not_after,
            }))
        };

        // `tickets`: a ticketer of its own for this config, or none.
        let server = |authorizer: Authorizer, tickets: bool| -> Result<_, IdentityError> {
            let verifier =
                SpiffeClientVerifier::new(material.bundles.clone(), authorizer, &provider, true);
            let mut cfg = ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(versions)?
                .with_client_cert_verifier(verifier.clone())
                .with_cert_resolver(Arc::new(SingleCertAndKey::from(key.clone())));
            if tickets {
                cfg.ticketer = new_ticketer()?;
            } else {
                cfg.send_tls13_tickets = 0;
            }
            Ok((Arc::new(cfg), verifier))
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
                .with_custom_certificate_verifier(verifier.clone())
                .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(key.clone())));
            if !resume {
                cfg.resumption = rustls::client::Resumption::disabled();
            }
            Ok((Arc::new(cfg), verifier))
        };

        let (inbound, inbound_verifiers): (Vec<_>, Vec<_>) = self
            .policies
            .inbound
            .iter()
            .map(|a| server(a.clone(), true))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .unzip();
        let (outbound, outbound_verifiers): (Vec<_>, Vec<_>) = self
            .policies
            .outbound
            .iter()
            .map(|id| client(id, true))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .unzip();
        let (probe_server, _) = server(Authorizer::Exact(svid.spiffe_id.clone()), false)?;
        let (probe_client, _) = client(&svid.spiffe_id, false)?;

        let generation = *self.generation.borrow() + 1;
        let snapshot = Arc::new(Snapshot {
            svid,
            generation,
            chain: material.chain,
            bundles: material.bundles,
            inbound,
            inbound_verifiers,
            probe_server,
            outbound,
            outbound_verifiers,
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
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };

    const TD: &str = "example.org";
    const ME: &str = "spiffe://example.org/web";

    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        der: CertificateDer<'static>,
    }

    fn ca_until(name: &str, not_after: time::OffsetDateTime) -> Ca {
        let mut p = CertificateParams::new(vec![]).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        p.not_after = not_after;
        let key = KeyPair::generate().unwrap();
        let der = p.self_signed(&key).unwrap().der().clone();
        Ca {
            der,
            issuer: Issuer::new(p, key),
        }
    }

    fn ca(name: &str) -> Ca {
        ca_until(
            name,
            time::OffsetDateTime::now_utc() + time::Duration::days(30),
        )
    }

    /// An SVID for `ME` under `ca`, valid from `from` to `until` (minutes
    /// from now).
    fn svid_between(
        ca: &Ca,
        from: i64,
        until: i64,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let mut p = CertificateParams::new(vec![]).unwrap();
        p.subject_alt_names = vec![SanType::URI(ME.try_into().unwrap())];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now + time::Duration::minutes(from);
        p.not_after = now + time::Duration::minutes(until);
        let key = KeyPair::generate().unwrap();
        let der = p.signed_by(&key, &ca.issuer).unwrap().der().clone();
        (vec![der], PrivateKeyDer::Pkcs8(key.serialize_der().into()))
    }

    fn svid(ca: &Ca) -> Vec<CertificateDer<'static>> {
        svid_between(ca, -1, 60).0
    }

    fn bundle(cas: &[&Ca]) -> TrustBundles {
        let mut b = TrustBundles::new();
        let ders: Vec<_> = cas.iter().map(|c| c.der.clone()).collect();
        assert_eq!(b.add(TD, &ders), 0);
        b
    }

    fn material(ca: &Ca, roots: &[&Ca]) -> SvidMaterial {
        let (chain, key) = svid_between(ca, -1, 60);
        SvidMaterial {
            chain,
            key,
            bundles: bundle(roots),
        }
    }

    fn decide(
        chain: &[CertificateDer<'_>],
        b: &TrustBundles,
        last: Option<&TrustBundles>,
    ) -> BundleDecision {
        decide_update(chain, b, last, SystemTime::now())
    }

    fn keep() -> BundleDecision {
        BundleDecision::KeepLastBundle {
            trust_domain: TD.into(),
            reason: String::new(),
        }
    }

    /// Compares decisions ignoring the reason text.
    fn same(a: &BundleDecision, b: &BundleDecision) -> bool {
        match (a, b) {
            (BundleDecision::Accept, BundleDecision::Accept) => true,
            (
                BundleDecision::KeepLastBundle {
                    trust_domain: x, ..
                },
                BundleDecision::KeepLastBundle {
                    trust_domain: y, ..
                },
            ) => x == y,
            (BundleDecision::Refuse { .. }, BundleDecision::Refuse { .. }) => true,
            _ => false,
        }
    }

    /// (what, SVID chain, update bundle, last good bundle, expected).
    type Case = (
        &'static str,
        Vec<CertificateDer<'static>>,
        TrustBundles,
        Option<TrustBundles>,
        BundleDecision,
    );

    #[test]
    fn decide_update_cases() {
        let old = ca("old");
        let new = ca("new");
        let stranger = ca("stranger");
        let refuse = BundleDecision::Refuse {
            reason: String::new(),
        };
        let cases: Vec<Case> = vec![
            (
                "first SVID, verifies",
                svid(&old),
                bundle(&[&old]),
                None,
                BundleDecision::Accept,
            ),
            (
                "first SVID, untrusted",
                svid(&stranger),
                bundle(&[&old]),
                None,
                refuse.clone(),
            ),
            (
                "rotation: both roots, SVID under the old one",
                svid(&old),
                bundle(&[&old, &new]),
                Some(bundle(&[&old])),
                BundleDecision::Accept,
            ),
            (
                "rotation: both roots, SVID under the new one",
                svid(&new),
                bundle(&[&old, &new]),
                Some(bundle(&[&old, &new])),
                BundleDecision::Accept,
            ),
            (
                "new SVID together with a new bundle",
                svid(&new),
                bundle(&[&new]),
                Some(bundle(&[&old])),
                BundleDecision::Accept,
            ),
            (
                "bundle drops the root of the current SVID",
                svid(&old),
                bundle(&[&new]),
                Some(bundle(&[&old])),
                keep(),
            ),
            (
                "empty own bundle",
                svid(&old),
                TrustBundles::new(),
                Some(bundle(&[&old])),
                keep(),
            ),
            (
                "new SVID whose root is in neither bundle",
                svid(&new),
                bundle(&[&old]),
                Some(bundle(&[&old])),
                refuse.clone(),
            ),
            (
                "expired SVID",
                svid_between(&old, -120, -60).0,
                bundle(&[&old]),
                Some(bundle(&[&old])),
                refuse.clone(),
            ),
            (
                "no certificate",
                vec![],
                bundle(&[&old]),
                Some(bundle(&[&old])),
                refuse.clone(),
            ),
        ];
        for (what, chain, b, last, want) in &cases {
            let got = decide(chain, b, last.as_ref());
            assert!(same(&got, want), "{what}: got {got:?}, want {want:?}");
        }
    }

    fn identity() -> (Arc<Identity>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let policies = Policies {
            inbound: vec![Authorizer::Any, Authorizer::Any],
            outbound: vec![],
            allow_tls12: false,
            key_exchange: meshid_identity::crypto::KeyExchange::default(),
        };
        (Identity::new(policies, metrics.clone()), metrics)
    }

    #[test]
    fn update_keeps_last_good_bundle_when_it_would_orphan_our_svid() {
        let (id, m) = identity();
        let old = ca("old");
        let new = ca("new");
        let first = id.update(material(&old, &[&old])).unwrap();
        assert_eq!(first.generation, 1);
        // Same SVID, bundle without its root: refused, nothing changes.
        let again = id
            .update(SvidMaterial {
                chain: first.chain.clone(),
                key: svid_between(&old, -1, 60).1,
                bundles: bundle(&[&new]),
            })
            .unwrap();
        assert!(Arc::ptr_eq(&first, &again), "no new snapshot");
        assert_eq!(m.bundle_updates_refused.get(), 1);
        assert_eq!(again.bundles, bundle(&[&old]));
        // Rotation: both roots, then a new SVID under the new root with the
        // new root alone — each accepted.
        let both = id.update(material(&old, &[&old, &new])).unwrap();
        assert_eq!(both.bundles.root_count(TD), 2);
        let rotated = id.update(material(&new, &[&new])).unwrap();
        assert_eq!(rotated.bundles, bundle(&[&new]));
        assert_eq!(m.bundle_updates_refused.get(), 1);
        assert_eq!(m.rotations.get(), 3);
        // An SVID that verifies against nothing: refused whole.
        let stranger = ca("stranger");
        let err = id.update(material(&stranger, &[&new])).unwrap_err();
        assert!(matches!(err, IdentityError::Untrusted(_)), "{err}");
        assert_eq!(m.svid_updates_refused.get(), 1);
    }

    #[test]
    fn identical_update_builds_nothing() {
        let (id, m) = identity();
        let ca = ca("ca");
        let (chain, key) = svid_between(&ca, -1, 60);
        let key2 = key.clone_key();
        let a = id
            .update(SvidMaterial {
                chain: chain.clone(),
                key,
                bundles: bundle(&[&ca]),
            })
            .unwrap();
        let b = id
            .update(SvidMaterial {
                chain,
                key: key2,
                bundles: bundle(&[&ca]),
            })
            .unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(m.rotations.get(), 1);
    }

    /// A root past its notAfter is pruned before the decision and never
    /// reaches a verifier.
    #[test]
    fn expired_roots_are_pruned() {
        let (id, m) = identity();
        let live = ca("live");
        let dead = ca_until(
            "dead",
            time::OffsetDateTime::now_utc() - time::Duration::hours(1),
        );
        let snap = id.update(material(&live, &[&live, &dead])).unwrap();
        assert_eq!(m.expired_roots_pruned.get(), 1);
        assert_eq!(snap.bundles, bundle(&[&live]));
    }

    /// Each inbound listener has its own ticket key: a ticket of one is
    /// opaque to another, of the same snapshot.
    #[test]
    fn ticket_keys_are_per_listener() {
        let (id, _) = identity();
        let ca = ca("ca");
        let snap = id.update(material(&ca, &[&ca])).unwrap();
        let (a, b) = (&snap.inbound[0].ticketer, &snap.inbound[1].ticketer);
        let t = a.encrypt(b"session").unwrap();
        assert_eq!(a.decrypt(&t).unwrap(), b"session");
        assert!(
            b.decrypt(&t).is_none(),
            "listener B opened listener A's ticket"
        );
        assert!(snap.probe_server.send_tls13_tickets == 0);
    }

    /// A resumed session's peer chain is re-verified: an expired peer SVID
    /// and a peer the listener's policy does not allow are refused.
    #[test]
    fn resumed_peers_are_reverified() {
        let metrics = Arc::new(Metrics::new());
        let allow = SpiffeId::new(ME).unwrap();
        let policies = Policies {
            inbound: vec![
                Authorizer::Exact(allow),
                Authorizer::Exact(SpiffeId::new("spiffe://example.org/payments").unwrap()),
            ],
            outbound: vec![],
            allow_tls12: false,
            key_exchange: meshid_identity::crypto::KeyExchange::default(),
        };
        let id = Identity::new(policies, metrics);
        let ca = ca("ca");
        let snap = id.update(material(&ca, &[&ca])).unwrap();
        let peer = svid(&ca);
        assert_eq!(snap.reverify_resumed(0, &peer).unwrap().to_string(), ME);
        let denied = snap.reverify_resumed(1, &peer).unwrap_err();
        assert_eq!(meshid_identity::verify::classify(&denied), "denied");
        let expired = svid_between(&ca, -120, -60).0;
        let e = snap.reverify_resumed(0, &expired).unwrap_err();
        assert_eq!(meshid_identity::verify::classify(&e), "expired");
        assert!(snap.reverify_resumed(0, &[]).is_err());
        assert!(snap.reverify_resumed(7, &peer).is_err());
    }

    /// Outbound, the upstream chain of a resumed session is re-verified
    /// against the listener's `server_id` and the current time.
    #[test]
    fn resumed_upstreams_are_reverified() {
        let policies = Policies {
            inbound: vec![],
            outbound: vec![
                SpiffeId::new(ME).unwrap(),
                SpiffeId::new("spiffe://example.org/db").unwrap(),
            ],
            allow_tls12: false,
            key_exchange: meshid_identity::crypto::KeyExchange::default(),
        };
        let id = Identity::new(policies, Arc::new(Metrics::new()));
        let ca = ca("ca");
        let snap = id.update(material(&ca, &[&ca])).unwrap();
        let upstream = svid(&ca);
        snap.reverify_resumed_upstream(0, &upstream).unwrap();
        let e = snap.reverify_resumed_upstream(1, &upstream).unwrap_err();
        assert_eq!(meshid_identity::verify::classify(&e), "denied");
        let expired = svid_between(&ca, -120, -60).0;
        let e = snap.reverify_resumed_upstream(0, &expired).unwrap_err();
        assert_eq!(meshid_identity::verify::classify(&e), "expired");
    }

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
