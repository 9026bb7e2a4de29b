//! Prometheus metrics of the sidecar.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Traffic direction.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Direction {
    /// mTLS in, plaintext to the app.
    Inbound,
    /// Plaintext from the app, mTLS out.
    Outbound,
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        encoder.write_str(match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        })
    }
}

/// Labels for handshakes.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// inbound/outbound.
    pub direction: Direction,
    /// `ok`, `resumed`, `probe`, a `verify::classify` label, `timeout`,
    /// `not_ready`, `tls` (protocol error, e.g. garbage) or `io`.
    pub outcome: &'static str,
}

/// Labels for negotiated key exchange groups.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KxLabels {
    /// inbound/outbound.
    pub direction: Direction,
    /// `X25519MLKEM768`, `X25519`, `secp256r1`, `secp384r1`, `other`, `none`
    /// (see `meshid_identity::crypto::group_label`).
    pub group: &'static str,
}

/// Labels by direction only.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirLabels {
    /// inbound/outbound.
    pub direction: Direction,
}

/// Labels for refused connections.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// inbound/outbound.
    pub direction: Direction,
    /// `connections` (the direction's connection budget is spent) or
    /// `pending_handshakes` (too many inbound connections still handshaking).
    pub reason: &'static str,
}

/// Labels for byte counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByteLabels {
    /// inbound/outbound.
    pub direction: Direction,
    /// `tx` (toward the TLS peer) or `rx` (from the TLS peer).
    pub flow: &'static str,
}

/// All sidecar metrics, registered in one registry.
#[derive(Debug)]
pub struct Metrics {
    /// The registry to encode.
    pub registry: Registry,
    /// Handshakes by direction and outcome.
    pub handshakes: Family<HandshakeLabels, Counter>,
    /// Established TLS connections by negotiated key exchange group.
    pub key_exchanges: Family<KxLabels, Counter>,
    /// Open proxied connections.
    pub active: Family<DirLabels, Gauge>,
    /// Bytes proxied.
    pub bytes: Family<ByteLabels, Counter>,
    /// Connection duration in seconds.
    pub duration: Family<DirLabels, Histogram>,
    /// Upstream/app dial failures.
    pub dial_errors: Family<DirLabels, Counter>,
    /// notAfter of the current SVID, Unix seconds (0 before the first).
    pub svid_not_after: Gauge,
    /// SVID updates applied (the first one included).
    pub rotations: Counter,
    /// Connections closed at accept because a budget was spent.
    pub refused: Family<RefusedLabels, Counter>,
    /// Connections accepted and still in their TLS handshake.
    pub pending_handshakes: Family<DirLabels, Gauge>,
    /// Workload API updates whose bundle would not verify the sidecar's own
    /// SVID: the last good bundle was kept.
    pub bundle_updates_refused: Counter,
    /// Workload API updates refused whole: the SVID verified against neither
    /// the new nor the last good bundle.
    pub svid_updates_refused: Counter,
    /// Trust-bundle roots dropped because they were past their notAfter.
    pub expired_roots_pruned: Counter,
    /// `meshid_sidecar_crl_*` (see [`crate::crl`]).
    pub crl: crate::crl::CrlMetrics,
    /// HTTP/2 tunnels opened (outbound) or accepted (inbound).
    pub tunnels_opened: Family<DirLabels, Counter>,
    /// Application connections carried as tunnel streams.
    pub tunnel_streams: Family<DirLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric under the `meshid_sidecar` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("meshid_sidecar");
        let handshakes = Family::<HandshakeLabels, Counter>::default();
        let key_exchanges = Family::<KxLabels, Counter>::default();
        let active = Family::<DirLabels, Gauge>::default();
        let bytes = Family::<ByteLabels, Counter>::default();
        let duration = Family::<DirLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.001, 4.0, 12))) as fn() -> Histogram,
        );
        let dial_errors = Family::<DirLabels, Counter>::default();
        let svid_not_after = Gauge::default();
        let rotations = Counter::default();
        let refused = Family::<RefusedLabels, Counter>::default();
        let pending_handshakes = Family::<DirLabels, Gauge>::default();
        let bundle_updates_refused = Counter::default();
        let svid_updates_refused = Counter::default();
        let expired_roots_pruned = Counter::default();
        registry.register(
            "tls_handshakes",
            "TLS handshakes by direction and outcome",
            handshakes.clone(),
        );
        registry.register(
            "tls_key_exchanges",
            "Established TLS connections by direction and negotiated key exchange group",
            key_exchanges.clone(),
        );
        registry.register(
            "active_connections",
            "Open proxied connections",
            active.clone(),
        );
        registry.register("bytes", "Bytes proxied", bytes.clone());
        registry.register(
            "connection_duration_seconds",
            "Duration of proxied connections",
            duration.clone(),
        );
        registry.register(
            "dial_errors",
            "Failures to connect to the app or upstream",
            dial_errors.clone(),
        );
        registry.register(
            "svid_not_after_seconds",
            "notAfter of the current SVID (Unix seconds)",
            svid_not_after.clone(),
        );
        registry.register("svid_rotations", "SVID updates applied", rotations.clone());
        registry.register(
            "connections_refused",
            "Connections closed at accept because a connection budget was spent",
            refused.clone(),
        );
        registry.register(
            "pending_handshakes",
            "Accepted connections still in their TLS handshake",
            pending_handshakes.clone(),
        );
        registry.register(
            "bundle_updates_refused",
            "Bundle updates that would not verify the sidecar's own SVID (last good bundle kept)",
            bundle_updates_refused.clone(),
        );
        registry.register(
            "svid_updates_refused",
            "Workload API updates refused because the SVID does not verify",
            svid_updates_refused.clone(),
        );
        registry.register(
            "expired_roots_pruned",
            "Trust-bundle roots dropped because they were past their notAfter",
            expired_roots_pruned.clone(),
        );
        let crl = crate::crl::CrlMetrics::register(&mut registry);
        let tunnels_opened = Family::<DirLabels, Counter>::default();
        registry.register(
            "tunnels_opened",
            "HTTP/2 tunnels opened (outbound) or accepted (inbound)",
            tunnels_opened.clone(),
        );
        let tunnel_streams = Family::<DirLabels, Counter>::default();
        registry.register(
            "tunnel_streams",
            "Application connections carried as HTTP/2 tunnel streams",
            tunnel_streams.clone(),
        );
        Self {
            registry,
            handshakes,
            key_exchanges,
            active,
            bytes,
            duration,
            dial_errors,
            svid_not_after,
            rotations,
            refused,
            pending_handshakes,
            bundle_updates_refused,
            svid_updates_refused,
            expired_roots_pruned,
            crl,
            tunnels_opened,
            tunnel_streams,
        }
    }

    /// Counts one handshake.
    pub fn handshake(&self, direction: Direction, outcome: &'static str) {
        self.handshakes
            .get_or_create(&HandshakeLabels { direction, outcome })
            .inc();
    }

    /// Counts the key exchange group of an established connection.
    pub fn key_exchange(
        &self,
        direction: Direction,
        group: Option<&'static dyn rustls::crypto::SupportedKxGroup>,
    ) {
        self.key_exchanges
            .get_or_create(&KxLabels {
                direction,
                group: meshid_identity::crypto::group_label(group),
            })
            .inc();
    }

    /// Counts one connection refused at accept.
    pub fn count_refused(&self, direction: Direction, reason: &'static str) {
        self.refused
            .get_or_create(&RefusedLabels { direction, reason })
            .inc();
    }

    /// Text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
