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
    /// `join_token`, `k8s_psat`, or `other` for any name the server does
    /// not know (the caller chooses it: never a label of its own).
    pub attestor: &'static str,
    /// `ok`, `invalid_token`, `expired_token`, `bad_request`, `banned`,
    /// `busy`, `error`, …
    pub outcome: &'static str,
}

/// The fixed metric label for an attestor name sent by a caller.
pub fn attestor_label(name: &str) -> &'static str {
    match name {
        crate::attest::join_token::ATTESTOR => crate::attest::join_token::ATTESTOR,
        crate::attest::k8s_psat::ATTESTOR => crate::attest::k8s_psat::ATTESTOR,
        _ => "other",
    }
}

/// Labels for negotiated TLS key exchange groups.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KxLabels {
    /// From `meshid_identity::crypto::group_label`.
    pub group: &'static str,
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
    /// Node API connections by negotiated key exchange group.
    pub key_exchanges: Family<KxLabels, Counter>,
    /// Audit counters (shared with the audit writer).
    pub audit: crate::audit::AuditCounters,
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
    /// Staged trust changes, by outcome (`completed`, `halted`).
    pub trust_rollouts: Family<OutcomeLabels, Counter>,
    /// notAfter of the active JWT key.
    pub jwt_key_not_after: Gauge,
    /// notAfter of the prepared (next) CA, 0 when none.
    pub ca_next_not_after: Gauge,
    /// notAfter of the upstream CA chain, 0 without upstream.
    pub upstream_not_after: Gauge,
    /// Bundle publications refused by the chain gate.
    pub bundle_refused: Counter,
    /// Node API connections held now (handshaking or established).
    pub node_connections: Gauge,
    /// The store: reachable, pool use, notification lag.
    pub store: StoreMetrics,
}

/// `meshid_server_store_*`.
#[derive(Debug, Clone, Default)]
pub struct StoreMetrics {
    /// 1 while the last store probe succeeded.
    pub up: Gauge,
    /// Open connections in the pool (PostgreSQL).
    pub pool_connections: Gauge,
    /// Idle connections in the pool (PostgreSQL).
    pub pool_idle: Gauge,
    /// Most connections the pool may open (PostgreSQL).
    pub pool_max: Gauge,
    /// Records of expired certificates and revocations pruned from the CA
    /// journal.
    pub journal_pruned: Counter,
    /// Notification lag and listener reconnects (PostgreSQL).
    pub stats: crate::store::StoreStats,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Registers every metric under the `meshid_server` prefix, with audit
    /// counters of their own.
    pub fn new() -> Arc<Self> {
        Self::with_audit(crate::audit::AuditCounters::default())
    }

    /// Registers every metric, exposing the audit log's counters.
    pub fn with_audit(audit: crate::audit::AuditCounters) -> Arc<Self> {
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
        let key_exchanges = Family::<KxLabels, Counter>::default();
        registry.register(
            "node_tls_key_exchanges",
            "Node API TLS connections by negotiated key exchange group",
            key_exchanges.clone(),
        );
        registry.register(
            "audit_records",
            "Audit records written",
            audit.records.clone(),
        );
        registry.register(
            "audit_write_errors",
            "Failed audit log writes (each refuses the operations waiting on it)",
            audit.write_errors.clone(),
        );
        registry.register(
            "audit_refusals_suppressed",
            "Refusals of unauthenticated calls counted but not audited or logged (rate limit)",
            audit.refusals_suppressed.clone(),
        );
        registry.register(
            "audit_seals",
            "Audit chain heads sealed into the store",
            audit.seals_ok.clone(),
        );
        registry.register(
            "audit_seal_failures",
            "Audit seals that could not be stored",
            audit.seals_failed.clone(),
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
        let trust_rollouts = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "trust_rollouts",
            "Staged trust changes (canary first), by outcome",
            trust_rollouts.clone(),
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
        let store = StoreMetrics::default();
        registry.register(
            "store_up",
            "1 while the store answers its health probe",
            store.up.clone(),
        );
        registry.register(
            "store_pool_connections",
            "Connections open in the store's pool",
            store.pool_connections.clone(),
        );
        registry.register(
            "store_pool_idle_connections",
            "Idle connections in the store's pool",
            store.pool_idle.clone(),
        );
        registry.register(
            "store_pool_max_connections",
            "Most connections the store's pool may open (pool_size)",
            store.pool_max.clone(),
        );
        registry.register(
            "store_journal_pruned",
            "Records of expired certificates and their revocations pruned from the CA journal (journal_retention)",
            store.journal_pruned.clone(),
        );
        registry.register(
            "store_notification_lag_seconds",
            "Delay from a NOTIFY through the store to its delivery on the change listener",
            store.stats.notification_lag.clone(),
        );
        registry.register(
            "store_listener_reconnects",
            "Times the store's change listener lost its connection or could not listen",
            store.stats.listener_reconnects.clone(),
        );
        let node_connections = Gauge::default();
        registry.register(
            "node_connections",
            "Node API connections held now, handshaking or established",
            node_connections.clone(),
        );
        Arc::new(Self {
            store,
            node_connections,
            ca_transitions,
            trust_rollouts,
            jwt_key_not_after,
            ca_next_not_after,
            upstream_not_after,
            bundle_refused,
            registry,
            svids,
            sign_latency,
            attestations,
            tls_refused,
            key_exchanges,
            audit,
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

    /// Counts one staged trust change that ended.
    pub fn trust_rollout(&self, outcome: &'static str) {
        self.trust_rollouts
            .get_or_create(&OutcomeLabels { outcome })
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

    /// Counts one node attestation.
    pub fn attestation(&self, attestor: &str, outcome: &'static str) {
        self.attestations
            .get_or_create(&AttestLabels {
                attestor: attestor_label(attestor),
                outcome,
            })
            .inc();
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
