//! The CRL held, its renewal, and the check the SPIFFE verifiers call.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use meshid_identity::SpiffeId;
use meshid_identity::crl::{VerifiedCrl, crl_der, verify_crl};
use meshid_identity::verify::{RevocationCheck, RevocationError};
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::identity::Identity;

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
                CrlSource::Http { authority, path } => {
                    super::source::http_get(authority, path).await
                }
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
