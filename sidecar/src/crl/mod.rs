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

mod guard;
mod metrics;
mod settings;
mod source;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::identity::Identity;

pub use guard::CrlGuard;
pub use metrics::{CrlMetrics, OutcomeLabels, ReasonLabels};
pub use settings::{CrlMode, CrlSettings, default_refresh, settings};
pub use source::{CrlSource, MAX_CRL_BYTES};

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
