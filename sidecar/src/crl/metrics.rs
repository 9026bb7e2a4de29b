//! `meshid_sidecar_crl_*` metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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
