//! Prometheus metrics of the server, and the HTTP endpoint that serves them
//! with `/healthz` and `/readyz`.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels for issuance counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssueLabels {
    /// `x509`, `jwt`, `agent`, `server`.
    pub kind: &'static str,
    /// `ok`, `denied`, `not_found`, `invalid`, `error`.
    pub outcome: &'static str,
}

/// Labels for batch latency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `ok` (all items signed) or `partial` or `error`.
    pub outcome: &'static str,
}

/// Labels for attestation counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttestLabels {
    /// e.g. `join_token`.
    pub attestor: String,
    /// `ok`, `invalid_token`, `expired_token`, `bad_request`, `error`.
    pub outcome: &'static str,
}

/// Labels for refusals at the TLS layer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// From `meshid_identity::verify::classify`, or `timeout`, `io`.
    pub reason: &'static str,
}

/// Labels of CA journal transitions.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    /// `x509` or `jwt`.
    pub kind: &'static str,
    /// `bootstrapped`, `prepared`, `pending`, `activated`, `retired`,
    /// `removed`, `tainted`, `revoked`, `imported`, `failed`,
    /// `needs_operator`.
    pub transition: &'static str,
}

type HistogramFamily = Family<OutcomeLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

/// Every server metric.
pub struct Metrics {
    registry: Registry,
    /// SVIDs issued, by kind and outcome.
    pub svids: Family<IssueLabels, Counter>,
    /// Latency of one signing call (a whole batch), by outcome.
    pub sign_latency: HistogramFamily,
    /// Node attestations, by attestor and outcome.
    pub attestations: Family<AttestLabels, Counter>,
    /// TLS handshakes refused on the node API.
    pub tls_refused: Family<ReasonLabels, Counter>,
    /// notAfter of the signing CA, Unix seconds.
    pub ca_not_after: Gauge,
    /// Registration entries.
    pub entries: Gauge,
    /// Attested agents.
    pub agents: Gauge,
    /// Open sync streams.
    pub sync_streams: Gauge,
    /// CA journal transitions.
    pub ca_transitions: Family<TransitionLabels, Counter>,
    /// notAfter of the active JWT key.
    pub jwt_key_not_after: Gauge,
    /// notAfter of the prepared (next) CA, 0 when none.
    pub ca_next_not_after: Gauge,
    /// notAfter of the upstream CA chain, 0 without upstream.
    pub upstream_not_after: Gauge,
    /// Bundle publications refused by the chain gate.
    pub bundle_refused: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Registers every metric under the `meshid_server` prefix.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("meshid_server");
        let svids = Family::<IssueLabels, Counter>::default();
        registry.register(
            "svids_issued",
            "SVIDs signed, by kind and outcome",
            svids.clone(),
        );
        let sign_latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        registry.register(
            "sign_batch_duration_seconds",
            "Latency of one signing call, by outcome",
            sign_latency.clone(),
        );
        let attestations = Family::<AttestLabels, Counter>::default();
        registry.register(
            "attestations",
            "Node attestations, by attestor and outcome",
            attestations.clone(),
        );
        let tls_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "node_tls_refused",
            "Node API TLS handshakes refused, by reason",
            tls_refused.clone(),
        );
        let ca_not_after = Gauge::default();
        registry.register(
            "ca_not_after_seconds",
            "notAfter of the signing CA (Unix seconds)",
            ca_not_after.clone(),
        );
        let entries = Gauge::default();
        registry.register("entries", "Registration entries", entries.clone());
        let agents = Gauge::default();
        registry.register("agents", "Attested agents", agents.clone());
        let sync_streams = Gauge::default();
        registry.register(
            "sync_streams",
            "Open agent sync streams",
            sync_streams.clone(),
        );
        let ca_transitions = Family::<TransitionLabels, Counter>::default();
        registry.register(
            "ca_transitions",
            "CA journal transitions, by kind and transition",
            ca_transitions.clone(),
        );
        let jwt_key_not_after = Gauge::default();
        registry.register(
            "jwt_key_not_after_seconds",
            "notAfter of the active JWT signing key (Unix seconds)",
            jwt_key_not_after.clone(),
        );
        let ca_next_not_after = Gauge::default();
        registry.register(
            "ca_next_not_after_seconds",
            "notAfter of the prepared next CA (Unix seconds; 0 when none is prepared)",
            ca_next_not_after.clone(),
        );
        let upstream_not_after = Gauge::default();
        registry.register(
            "upstream_not_after_seconds",
            "Earliest notAfter of the upstream CA chain (Unix seconds; 0 without upstream)",
            upstream_not_after.clone(),
        );
        let bundle_refused = Counter::default();
        registry.register(
            "bundle_publications_refused",
            "Bundle publications refused by the chain gate",
            bundle_refused.clone(),
        );
        Arc::new(Self {
            ca_transitions,
            jwt_key_not_after,
            ca_next_not_after,
            upstream_not_after,
            bundle_refused,
            registry,
            svids,
            sign_latency,
            attestations,
            tls_refused,
            ca_not_after,
            entries,
            agents,
            sync_streams,
        })
    }

    /// Counts a CA journal transition.
    pub fn ca_transition(&self, kind: &str, transition: &'static str) {
        let kind = if kind == "jwt" { "jwt" } else { "x509" };
        self.ca_transitions
            .get_or_create(&TransitionLabels { kind, transition })
            .inc();
    }

    /// Counts `n` SVIDs.
    pub fn issued(&self, kind: &'static str, outcome: &'static str, n: u64) {
        if n > 0 {
            self.svids
                .get_or_create(&IssueLabels { kind, outcome })
                .inc_by(n);
        }
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
