//! Agent metrics (`meshid_agent_*`).

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels for Workload API requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// RPC name.
    pub rpc: &'static str,
    /// gRPC code name.
    pub code: String,
}

/// Labels for workload attestations.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `ok`, `no_entry`, or the attestation error.
    pub outcome: &'static str,
}

/// Labels for Workload API connections refused before the gRPC layer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// `bad_preface`, `hpack`, `protocol`, `header_block_too_large`, ...
    pub reason: &'static str,
}

/// Labels for entries left out of a Workload API response.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    /// `invalid_spiffe_id`, `duplicate_hint` or `invalid_svid`.
    pub reason: &'static str,
}

/// Every agent metric.
pub struct Metrics {
    registry: Registry,
    /// Workload attestations by outcome.
    pub attestations: Family<OutcomeLabels, Counter>,
    /// Workload API requests by RPC and code.
    pub requests: Family<RpcLabels, Counter>,
    /// Workload API connections closed for malformed HTTP/2, by reason.
    pub connections_refused: Family<ReasonLabels, Counter>,
    /// SVIDs in the cache.
    pub svids_cached: Gauge,
    /// SVIDs minted (first issue and rotations).
    pub rotations: Counter,
    /// Seconds until the next SVID rotation.
    pub next_rotation: Gauge,
    /// Sync stream reconnects.
    pub sync_reconnects: Counter,
    /// Failed signing calls.
    pub sign_failures: Counter,
    /// Failed agent SVID renewals.
    pub agent_renewal_failures: Counter,
    /// Agent SVID notAfter, Unix seconds.
    pub agent_not_after: Gauge,
    /// Bundle updates refused (they would not verify the agent's own SVID).
    pub bundle_refused: Counter,
    /// Bundle updates accepted from the server.
    pub bundle_updates: Counter,
    /// SVIDs re-minted early because their authority was tainted.
    pub tainted_reminted: Counter,
    /// Entries (entry revisions) left out of Workload API responses.
    pub entries_dropped: Family<DropLabels, Counter>,
    /// SDS responses Envoy refused (NACKs).
    pub sds_nacks: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Registers everything.
    pub fn new() -> Arc<Self> {
        let mut r = Registry::with_prefix("meshid_agent");
        let attestations = Family::default();
        r.register(
            "workload_attestations",
            "Workload attestations by outcome",
            attestations.clone(),
        );
        let requests = Family::default();
        r.register(
            "workload_api_requests",
            "Workload API requests by RPC and code",
            requests.clone(),
        );
        let connections_refused = Family::default();
        r.register(
            "workload_api_connections_refused",
            "Workload API connections closed for malformed HTTP/2, by reason",
            connections_refused.clone(),
        );
        let svids_cached = Gauge::default();
        r.register("svids_cached", "SVIDs in the cache", svids_cached.clone());
        let rotations = Counter::default();
        r.register(
            "svids_minted",
            "SVIDs minted, first issue and rotations",
            rotations.clone(),
        );
        let next_rotation = Gauge::default();
        r.register(
            "seconds_to_next_rotation",
            "Seconds until the next SVID rotation",
            next_rotation.clone(),
        );
        let sync_reconnects = Counter::default();
        r.register(
            "sync_reconnects",
            "Sync stream reconnects",
            sync_reconnects.clone(),
        );
        let sign_failures = Counter::default();
        r.register(
            "sign_failures",
            "Failed signing calls to the server",
            sign_failures.clone(),
        );
        let agent_renewal_failures = Counter::default();
        r.register(
            "agent_renewal_failures",
            "Failed agent SVID renewals",
            agent_renewal_failures.clone(),
        );
        let agent_not_after = Gauge::default();
        r.register(
            "agent_svid_not_after_seconds",
            "Agent SVID notAfter (Unix seconds)",
            agent_not_after.clone(),
        );
        let bundle_refused = Counter::default();
        r.register(
            "bundle_updates_refused",
            "Bundle updates refused because they would not verify the agent's own SVID",
            bundle_refused.clone(),
        );
        let bundle_updates = Counter::default();
        r.register(
            "bundle_updates",
            "Bundle updates accepted from the server",
            bundle_updates.clone(),
        );
        let tainted_reminted = Counter::default();
        r.register(
            "tainted_svids_reminted",
            "SVIDs re-minted early because their signing authority was tainted",
            tainted_reminted.clone(),
        );
        let entries_dropped = Family::default();
        r.register(
            "workload_entries_dropped",
            "Entry revisions the Workload API cannot serve and leaves out, by reason",
            entries_dropped.clone(),
        );
        let sds_nacks = Counter::default();
        r.register(
            "sds_nacks",
            "SDS responses the client refused (NACK with error_detail)",
            sds_nacks.clone(),
        );
        Arc::new(Self {
            sds_nacks,
            bundle_refused,
            bundle_updates,
            tainted_reminted,
            registry: r,
            attestations,
            requests,
            connections_refused,
            svids_cached,
            rotations,
            next_rotation,
            sync_reconnects,
            sign_failures,
            agent_renewal_failures,
            agent_not_after,
            entries_dropped,
        })
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
