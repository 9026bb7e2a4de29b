//! The revocation hook every verifier runs after the chain verified.

use std::fmt;

use rustls_pki_types::{CertificateDer, UnixTime};
use spiffe::SpiffeId;

/// Marker text inside `CertificateError::Other` for a peer whose revocation
/// status cannot be established (a required CRL is missing or stale).
pub const REVOCATION_UNKNOWN: &str = "revocation status unknown";

#[derive(Debug)]
pub(super) struct RevocationUnknown(pub(super) String);
impl fmt::Display for RevocationUnknown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{REVOCATION_UNKNOWN}: {}", self.0)
    }
}
impl std::error::Error for RevocationUnknown {}

/// What a [`RevocationCheck`] decides against a verified peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevocationError {
    /// A certificate of the chain is listed as revoked.
    Revoked,
    /// Revocation status cannot be established and policy demands it
    /// (e.g. the CRL is past its nextUpdate): refuse, fail secure.
    Unknown(String),
}

/// A revocation check run on every peer chain after it verified and before
/// the SPIFFE ID policy (see `crate::crl`). The check holds its own,
/// changing state (the latest CRL); verifiers stay immutable.
pub trait RevocationCheck: Send + Sync + fmt::Debug {
    /// Decides on the verified chain of the peer `id` at `now`.
    fn check(
        &self,
        id: &SpiffeId,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), RevocationError>;
}
