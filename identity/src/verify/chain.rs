//! The shared core of both verifiers: leaf checks, the chain to the peer's
//! trust domain bundle, revocation, then policy.

use std::fmt;
use std::sync::Arc;

use rustls::CertificateError;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls_pki_types::{CertificateDer, UnixTime};
use spiffe::SpiffeId;
use webpki::{EndEntityCert, KeyUsage};

use super::leaf::{NotSvid, check_leaf};
use super::revocation::{RevocationCheck, RevocationError, RevocationUnknown};
use super::{Authorizer, TrustBundles};

/// Marker text inside `CertificateError::Other` for a denied SPIFFE ID, so
/// callers can classify the failure.
pub const DENIED: &str = "SPIFFE ID not authorized";

#[derive(Debug)]
struct Denied(String);
impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{DENIED}: {}", self.0)
    }
}
impl std::error::Error for Denied {}

fn other(e: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
}

/// An EKU OID (as its arcs) in rustls' terms.
fn purpose(oid: Vec<usize>) -> rustls::ExtendedKeyPurpose {
    const SERVER_AUTH: &[usize] = &[1, 3, 6, 1, 5, 5, 7, 3, 1];
    const CLIENT_AUTH: &[usize] = &[1, 3, 6, 1, 5, 5, 7, 3, 2];
    match oid.as_slice() {
        SERVER_AUTH => rustls::ExtendedKeyPurpose::ServerAuth,
        CLIENT_AUTH => rustls::ExtendedKeyPurpose::ClientAuth,
        _ => rustls::ExtendedKeyPurpose::Other(oid),
    }
}

fn webpki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as W;
    let ce = match e {
        // The context variants print the times and purposes involved, which
        // is what an operator needs to tell clock skew from a stale cert.
        W::CertExpired { time, not_after } => CertificateError::ExpiredContext { time, not_after },
        W::CertNotValidYet { time, not_before } => {
            CertificateError::NotValidYetContext { time, not_before }
        }
        // An issuer with the right name but another key (e.g. a CA that was
        // replaced under the same name) did not sign this chain: to an
        // operator that is the same as an unknown CA.
        W::UnknownIssuer | W::InvalidSignatureForPublicKey => CertificateError::UnknownIssuer,
        W::RequiredEkuNotFoundContext(ctx) => CertificateError::InvalidPurposeContext {
            required: purpose(ctx.required.oid_values().collect()),
            presented: ctx.present.into_iter().map(purpose).collect(),
        },
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(ce)
}

/// The shared core: chain to the peer's trust domain bundle, then
/// revocation, then policy.
#[derive(Debug)]
pub(super) struct Core {
    pub(super) bundles: TrustBundles,
    pub(super) authorizer: Authorizer,
    pub(super) algs: WebPkiSupportedAlgorithms,
    pub(super) revocation: Option<Arc<dyn RevocationCheck>>,
}

impl Core {
    pub(super) fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<SpiffeId, rustls::Error> {
        let id = check_leaf(end_entity).map_err(|e| other(NotSvid(e)))?;
        verify_chain(
            &self.bundles,
            &id,
            end_entity,
            intermediates,
            now,
            usage,
            self.algs,
        )?;
        if let Some(r) = &self.revocation {
            match r.check(&id, end_entity, intermediates, now) {
                Ok(()) => {}
                Err(RevocationError::Revoked) => {
                    return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
                }
                Err(RevocationError::Unknown(why)) => return Err(other(RevocationUnknown(why))),
            }
        }
        if !self.authorizer.allows(&id) {
            return Err(other(Denied(id.to_string())));
        }
        Ok(id)
    }
}

/// Verifies `end_entity` (whose SPIFFE ID is `id`) up to a root of its trust
/// domain that is valid at `now`.
fn verify_chain(
    bundles: &TrustBundles,
    id: &SpiffeId,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: KeyUsage,
    algs: WebPkiSupportedAlgorithms,
) -> Result<(), rustls::Error> {
    let anchors = bundles.anchors_at(id.trust_domain().as_str(), now).ok_or(
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
    )?;
    let ee = EndEntityCert::try_from(end_entity).map_err(webpki_error)?;
    // A certificate of the chain that starts being valid within
    // CLOCK_SKEW_TOLERANCE of `now` was issued by a clock that is ahead of
    // ours: the chain is verified again at that certificate's notBefore
    // (notAfter is then checked at that later time, never relaxed).
    let mut at = now;
    loop {
        match ee.verify_for_usage(algs.all, &anchors, intermediates, at, usage, None, None) {
            Ok(_) => return Ok(()),
            Err(webpki::Error::CertNotValidYet { not_before, .. })
                if not_before.as_secs() > at.as_secs()
                    && not_before.as_secs() <= now.as_secs() + CLOCK_SKEW_TOLERANCE.as_secs() =>
            {
                at = not_before;
            }
            Err(e) => return Err(webpki_error(e)),
        }
    }
}

/// How far ahead of this host's clock the clock of a certificate's issuer
/// may be: a certificate whose notBefore is at most this far in the future
/// is accepted (verified at its notBefore). Its notAfter is never relaxed.
pub const CLOCK_SKEW_TOLERANCE: std::time::Duration = std::time::Duration::from_secs(300);

/// Checks that `chain` (leaf first) is an X509-SVID that `bundles` verifies at
/// `now` for both TLS client and server use, as a workload's own SVID must
/// be; returns its SPIFFE ID. No policy is applied.
pub fn verify_svid_chain(
    bundles: &TrustBundles,
    chain: &[CertificateDer<'_>],
    now: UnixTime,
    provider: &CryptoProvider,
) -> Result<SpiffeId, rustls::Error> {
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or(rustls::Error::NoCertificatesPresented)?;
    let id = check_leaf(leaf).map_err(|e| other(NotSvid(e)))?;
    let algs = provider.signature_verification_algorithms;
    for usage in [KeyUsage::server_auth(), KeyUsage::client_auth()] {
        verify_chain(bundles, &id, leaf, intermediates, now, usage, algs)?;
    }
    Ok(id)
}
