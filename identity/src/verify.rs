//! rustls verifiers for SPIFFE peers.
//!
//! Order of checks, each with its own error so metrics can tell them apart:
//! 1. the leaf is an X509-SVID leaf (X509-SVID §5.2): exactly one URI SAN
//!    holding a SPIFFE ID with a path, `cA` not set, key usage present with
//!    `digitalSignature` and without `keyCertSign` / `cRLSign`;
//! 2. the chain verifies (webpki) against the bundle of the leaf's trust
//!    domain, for the right extended key usage, at the current time; roots
//!    past their notAfter are not used as trust anchors;
//! 3. the SPIFFE ID is authorized by policy.
//!
//! A verifier is immutable: when bundles change, build a new one and swap the
//! whole rustls config, so no handshake ever sees a half-updated trust store.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use spiffe::SpiffeId;
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::svid::{SvidError, spiffe_id_of};

/// The roots of one trust domain, each with its notAfter (Unix seconds).
#[derive(Clone, Default, PartialEq, Eq)]
struct Roots {
    anchors: Vec<TrustAnchor<'static>>,
    not_after: Vec<u64>,
}

/// Trust anchors per trust domain name (without scheme).
///
/// Each root keeps its notAfter: a root past it is never used to verify a
/// chain (webpki itself does not look at the validity of trust anchors), and
/// [`TrustBundles::prune_expired`] removes such roots when configs are built.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TrustBundles {
    roots: BTreeMap<String, Roots>,
}

impl fmt::Debug for TrustBundles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.roots.iter().map(|(k, v)| (k, v.anchors.len())))
            .finish()
    }
}

fn unix_secs(t: UnixTime) -> u64 {
    t.as_secs()
}

impl TrustBundles {
    /// Empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the DER root certificates of `trust_domain`. Certificates that are
    /// not usable as trust anchors are skipped and counted in the result; a
    /// root already present is not added twice.
    pub fn add(&mut self, trust_domain: &str, ders: &[CertificateDer<'_>]) -> usize {
        let mut skipped = 0;
        let roots = self.roots.entry(trust_domain.to_string()).or_default();
        for d in ders {
            let not_after = X509Certificate::from_der(d)
                .ok()
                .and_then(|(_, c)| u64::try_from(c.validity().not_after.timestamp()).ok());
            match (webpki::anchor_from_trusted_cert(d), not_after) {
                (Ok(a), Some(not_after)) => {
                    let a = a.to_owned();
                    if !roots.anchors.contains(&a) {
                        roots.anchors.push(a);
                        roots.not_after.push(not_after);
                    }
                }
                _ => skipped += 1,
            }
        }
        skipped
    }

    /// Trust domains present.
    pub fn trust_domains(&self) -> impl Iterator<Item = &str> {
        self.roots.keys().map(String::as_str)
    }

    /// How many roots `trust_domain` has (expired ones included).
    pub fn root_count(&self, trust_domain: &str) -> usize {
        self.roots.get(trust_domain).map_or(0, |r| r.anchors.len())
    }

    /// Removes every root whose notAfter is before `now`; returns how many
    /// were removed. A trust domain left without roots stays present and
    /// empty, so it trusts nothing.
    pub fn prune_expired(&mut self, now: UnixTime) -> usize {
        let now = unix_secs(now);
        let mut removed = 0;
        for r in self.roots.values_mut() {
            let before = r.anchors.len();
            (r.anchors, r.not_after) = std::mem::take(&mut r.anchors)
                .into_iter()
                .zip(std::mem::take(&mut r.not_after))
                .filter(|(_, na)| *na >= now)
                .unzip();
            removed += before - r.anchors.len();
        }
        removed
    }

    /// Replaces the roots of `trust_domain` with those `other` has for it.
    pub fn copy_domain_from(&mut self, other: &TrustBundles, trust_domain: &str) {
        match other.roots.get(trust_domain) {
            Some(r) => {
                self.roots.insert(trust_domain.to_string(), r.clone());
            }
            None => {
                self.roots.remove(trust_domain);
            }
        }
    }

    /// The roots of `td` that are valid at `now` (none if the trust domain
    /// is unknown).
    pub fn anchors_valid_at(&self, td: &str, now: UnixTime) -> Vec<TrustAnchor<'static>> {
        self.anchors_at(td, now)
            .map(|a| a.into_owned())
            .unwrap_or_default()
    }

    /// The roots of `td` that are valid at `now`, or `None` if there is none.
    fn anchors_at(&self, td: &str, now: UnixTime) -> Option<Cow<'_, [TrustAnchor<'static>]>> {
        let r = self.roots.get(td)?;
        let now = unix_secs(now);
        let anchors = if r.not_after.iter().all(|na| *na >= now) {
            Cow::Borrowed(r.anchors.as_slice())
        } else {
            Cow::Owned(
                r.anchors
                    .iter()
                    .zip(&r.not_after)
                    .filter(|(_, na)| **na >= now)
                    .map(|(a, _)| a.clone())
                    .collect(),
            )
        };
        (!anchors.is_empty()).then_some(anchors)
    }
}

/// SPIFFE ID policy applied after the chain verified.
#[derive(Clone)]
pub enum Authorizer {
    /// Any SPIFFE ID whose chain verifies.
    Any,
    /// Exactly this ID.
    Exact(SpiffeId),
    /// A predicate.
    Func(Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>),
}

impl fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("Any"),
            Self::Exact(id) => write!(f, "Exact({id})"),
            Self::Func(_) => f.write_str("Func"),
        }
    }
}

impl Authorizer {
    /// Whether `id` is allowed.
    pub fn allows(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(want) => want == id,
            Self::Func(f) => f(id),
        }
    }
}

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

/// Marker text inside `CertificateError::Other` for a certificate that is not
/// an X509-SVID leaf ([`LeafError`]).
pub const NOT_SVID: &str = "not an X509-SVID";

#[derive(Debug)]
struct NotSvid(LeafError);
impl fmt::Display for NotSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{NOT_SVID}: {}", self.0)
    }
}
impl std::error::Error for NotSvid {}

/// Why a certificate is not acceptable as an X509-SVID leaf (X509-SVID §3,
/// §4.1, §4.3, §5.2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LeafError {
    /// No single valid SPIFFE ID in the URI SANs, or the DER is malformed.
    #[error("{0}")]
    Svid(#[from] SvidError),
    /// The SPIFFE ID names a trust domain, not a workload (no path).
    #[error("SPIFFE ID {0} has no path; a leaf SVID must identify a workload")]
    RootPath(String),
    /// basicConstraints has `cA` set: a signing certificate presented as leaf.
    #[error("the certificate is a CA (basicConstraints cA=true); a leaf SVID must not be")]
    Ca,
    /// No key usage extension.
    #[error("no key usage extension; a leaf SVID must set digitalSignature")]
    NoKeyUsage,
    /// Key usage without `digitalSignature`.
    #[error("key usage lacks digitalSignature")]
    NoDigitalSignature,
    /// Key usage with `keyCertSign`.
    #[error("key usage has keyCertSign, which only signing certificates may set")]
    KeyCertSign,
    /// Key usage with `cRLSign`.
    #[error("key usage has cRLSign, which only signing certificates may set")]
    CrlSign,
    /// basicConstraints or key usage is malformed or present twice.
    #[error("malformed extensions: {0}")]
    Extensions(String),
}

/// Checks that a DER certificate is an X509-SVID *leaf* and returns its
/// SPIFFE ID: exactly one URI SAN with a SPIFFE ID that has a path, `cA`
/// false, and key usage with `digitalSignature` but neither `keyCertSign`
/// nor `cRLSign`. Chain and validity are not checked here.
pub fn check_leaf(der: &[u8]) -> Result<SpiffeId, LeafError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| SvidError::Malformed(e.to_string()))?;
    check_parsed_leaf(&cert)
}

fn check_parsed_leaf(cert: &X509Certificate<'_>) -> Result<SpiffeId, LeafError> {
    let id = spiffe_id_of(cert)?;
    if id.path().is_empty() {
        return Err(LeafError::RootPath(id.to_string()));
    }
    let ext = |e: x509_parser::error::X509Error| LeafError::Extensions(e.to_string());
    if cert
        .basic_constraints()
        .map_err(ext)?
        .is_some_and(|bc| bc.value.ca)
    {
        return Err(LeafError::Ca);
    }
    let ku = cert
        .key_usage()
        .map_err(ext)?
        .ok_or(LeafError::NoKeyUsage)?;
    if ku.value.key_cert_sign() {
        return Err(LeafError::KeyCertSign);
    }
    if ku.value.crl_sign() {
        return Err(LeafError::CrlSign);
    }
    if !ku.value.digital_signature() {
        return Err(LeafError::NoDigitalSignature);
    }
    Ok(id)
}

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

/// Marker text inside `CertificateError::Other` for a peer whose revocation
/// status cannot be established (a required CRL is missing or stale).
pub const REVOCATION_UNKNOWN: &str = "revocation status unknown";

#[derive(Debug)]
struct RevocationUnknown(String);
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

/// The shared core: chain to the peer's trust domain bundle, then
/// revocation, then policy.
#[derive(Debug)]
struct Core {
    bundles: TrustBundles,
    authorizer: Authorizer,
    algs: WebPkiSupportedAlgorithms,
    revocation: Option<Arc<dyn RevocationCheck>>,
}

impl Core {
    fn verify(
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

/// Verifies servers by SPIFFE ID; the TLS server name is not used.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    core: Core,
}

impl SpiffeServerVerifier {
    /// A verifier that trusts `bundles` and admits servers `authorizer` allows.
    pub fn new(
        bundles: TrustBundles,
        authorizer: Authorizer,
        provider: &CryptoProvider,
    ) -> Arc<Self> {
        Self::with_revocation(bundles, authorizer, provider, None)
    }

    /// As [`SpiffeServerVerifier::new`], with a revocation check run after
    /// the chain verified.
    pub fn with_revocation(
        bundles: TrustBundles,
        authorizer: Authorizer,
        provider: &CryptoProvider,
        revocation: Option<Arc<dyn RevocationCheck>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            core: Core {
                bundles,
                authorizer,
                algs: provider.signature_verification_algorithms,
                revocation,
            },
        })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.core
            .verify(end_entity, intermediates, now, KeyUsage::server_auth())?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.core.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.core.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.core.algs.supported_schemes()
    }
}

/// Verifies clients by SPIFFE ID.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    core: Core,
    mandatory: bool,
}

impl SpiffeClientVerifier {
    /// A verifier that trusts `bundles` and admits clients `authorizer`
    /// allows. With `mandatory` false, a client may present no certificate
    /// (the application must then refuse what needs identity).
    pub fn new(
        bundles: TrustBundles,
        authorizer: Authorizer,
        provider: &CryptoProvider,
        mandatory: bool,
    ) -> Arc<Self> {
        Self::with_revocation(bundles, authorizer, provider, mandatory, None)
    }

    /// As [`SpiffeClientVerifier::new`], with a revocation check run after
    /// the chain verified.
    pub fn with_revocation(
        bundles: TrustBundles,
        authorizer: Authorizer,
        provider: &CryptoProvider,
        mandatory: bool,
        revocation: Option<Arc<dyn RevocationCheck>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            core: Core {
                bundles,
                authorizer,
                algs: provider.signature_verification_algorithms,
                revocation,
            },
            mandatory,
        })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.core
            .verify(end_entity, intermediates, now, KeyUsage::client_auth())?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.core.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.core.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.core.algs.supported_schemes()
    }
}

/// A message for operators: what failed and, where it helps, what to check.
/// The README's troubleshooting section quotes these.
pub fn describe(err: &rustls::Error) -> String {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "certificate is not signed by any CA in the bundle of its trust domain (unknown CA)"
                .into()
        }
        rustls::Error::InvalidCertificate(CertificateError::Other(o)) => o.to_string(),
        rustls::Error::InvalidCertificate(
            ce @ (CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYetContext { .. }
            | CertificateError::InvalidPurposeContext { .. }),
        ) => ce.to_string(),
        rustls::Error::NoCertificatesPresented => "the peer presented no certificate".into(),
        rustls::Error::InvalidCertificate(CertificateError::Revoked) => {
            "certificate is revoked (listed on its trust domain's CRL)".into()
        }
        rustls::Error::PeerIncompatible(rustls::PeerIncompatible::NoKxGroupsInCommon) => {
            "no TLS key exchange group in common: the peer offers none that tls_key_exchange \
             allows (\"hybrid-required\" accepts only X25519MLKEM768; OpenSSL before 3.5 and \
             other classical clients offer only X25519 and the NIST curves)"
                .into()
        }
        rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure) => {
            "the peer aborted the handshake (handshake_failure): no common TLS version, cipher \
             suite or key exchange group (is its tls_key_exchange \"hybrid-required\"?), or it \
             refused our certificate"
                .into()
        }
        rustls::Error::AlertReceived(a) => format!("the peer refused our certificate ({a:?})"),
        other => other.to_string(),
    }
}

/// Classifies a handshake error for metrics: `no_client_cert`, `unknown_ca`,
/// `expired`, `not_yet_valid`, `bad_purpose`, `denied`, `not_svid`,
/// `revoked`, `revocation_unknown`, `no_kx_group`, `other`.
pub fn classify(err: &rustls::Error) -> &'static str {
    match err {
        rustls::Error::NoCertificatesPresented => "no_client_cert",
        rustls::Error::PeerIncompatible(rustls::PeerIncompatible::NoKxGroupsInCommon) => {
            "no_kx_group"
        }
        rustls::Error::InvalidCertificate(ce) => match ce {
            CertificateError::UnknownIssuer => "unknown_ca",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "bad_purpose"
            }
            CertificateError::Revoked => "revoked",
            CertificateError::Other(o) => {
                let s = o.to_string();
                if s.starts_with(REVOCATION_UNKNOWN) {
                    "revocation_unknown"
                } else if s.starts_with(DENIED) {
                    "denied"
                } else if s.starts_with(NOT_SVID) {
                    "not_svid"
                } else {
                    "other"
                }
            }
            _ => "other",
        },
        rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired) => {
            "no_client_cert"
        }
        rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA) => "unknown_ca",
        rustls::Error::AlertReceived(rustls::AlertDescription::CertificateExpired) => "expired",
        rustls::Error::AlertReceived(rustls::AlertDescription::AccessDenied) => "denied",
        rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRevoked) => "revoked",
        _ => "other",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    //! The verifier every meshid part trusts, case by case. Clauses quoted
    //! are from the SPIFFE X509-SVID standard.
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };
    use std::time::Duration;

    const WEB: &str = "spiffe://example.org/web";

    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        der: CertificateDer<'static>,
    }

    fn ca_with(td: &str, f: impl FnOnce(&mut CertificateParams)) -> Ca {
        let mut p = CertificateParams::new(vec![]).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, td);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.subject_alt_names = vec![SanType::URI(format!("spiffe://{td}").try_into().unwrap())];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::days(1);
        p.not_after = now + time::Duration::days(30);
        f(&mut p);
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca {
            der: cert.der().clone(),
            issuer: Issuer::new(p, key),
        }
    }

    fn ca(td: &str) -> Ca {
        ca_with(td, |_| {})
    }

    /// A good leaf SVID for `WEB`, then altered by `f`.
    fn leaf(ca: &Ca, f: impl FnOnce(&mut CertificateParams)) -> CertificateDer<'static> {
        let mut p = CertificateParams::new(vec![]).unwrap();
        p.subject_alt_names = vec![SanType::URI(WEB.try_into().unwrap())];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::minutes(1);
        p.not_after = now + time::Duration::hours(1);
        f(&mut p);
        let key = KeyPair::generate().unwrap();
        p.signed_by(&key, &ca.issuer).unwrap().der().clone()
    }

    fn bundles(cas: &[(&str, &Ca)]) -> TrustBundles {
        let mut b = TrustBundles::new();
        for (td, ca) in cas {
            assert_eq!(b.add(td, std::slice::from_ref(&ca.der)), 0);
        }
        b
    }

    fn at(offset_secs: i64) -> UnixTime {
        let now = UnixTime::now().as_secs();
        UnixTime::since_unix_epoch(Duration::from_secs(now.saturating_add_signed(offset_secs)))
    }

    /// Verifies `leaf` as a client with `authorizer`, at `now`; the metric
    /// label of the failure, or "ok".
    fn client(
        b: TrustBundles,
        authorizer: Authorizer,
        leaf: &CertificateDer<'_>,
        now: UnixTime,
    ) -> (&'static str, String) {
        let v = SpiffeClientVerifier::new(b, authorizer, &crypto::provider(), true);
        match v.verify_client_cert(leaf, &[], now) {
            Ok(_) => ("ok", String::new()),
            Err(e) => (classify(&e), describe(&e)),
        }
    }

    fn any_client(b: TrustBundles, leaf: &CertificateDer<'_>) -> (&'static str, String) {
        client(b, Authorizer::Any, leaf, UnixTime::now())
    }

    use crate::crypto;

    #[test]
    fn good_leaf_verifies_as_client_and_server() {
        let ca = ca("example.org");
        let l = leaf(&ca, |_| {});
        assert_eq!(any_client(bundles(&[("example.org", &ca)]), &l).0, "ok");
        let v = SpiffeServerVerifier::new(
            bundles(&[("example.org", &ca)]),
            Authorizer::Exact(SpiffeId::new(WEB).unwrap()),
            &crypto::provider(),
        );
        let name = ServerName::try_from("web.invalid").unwrap();
        v.verify_server_cert(&l, &[], &name, &[], UnixTime::now())
            .unwrap();
        assert_eq!(
            verify_svid_chain(
                &bundles(&[("example.org", &ca)]),
                &[l],
                UnixTime::now(),
                &crypto::provider()
            )
            .unwrap()
            .to_string(),
            WEB
        );
    }

    /// "the chain verifies against the bundle of the leaf's trust domain":
    /// a leaf claiming another trust domain is not accepted on the strength
    /// of this trust domain's CA, even when both bundles are present.
    #[test]
    fn trust_domain_mismatch_is_unknown_ca() {
        let ours = ca("example.org");
        let theirs = ca("other.org");
        let forged = leaf(&ours, |p| {
            p.subject_alt_names = vec![SanType::URI("spiffe://other.org/web".try_into().unwrap())];
        });
        assert_eq!(
            any_client(bundles(&[("example.org", &ours)]), &forged).0,
            "unknown_ca"
        );
        assert_eq!(
            any_client(
                bundles(&[("example.org", &ours), ("other.org", &theirs)]),
                &forged
            )
            .0,
            "unknown_ca"
        );
        // And an unknown trust domain altogether.
        let (label, msg) = any_client(bundles(&[("other.org", &theirs)]), &leaf(&ours, |_| {}));
        assert_eq!(label, "unknown_ca", "{msg}");
    }

    /// X509-SVID §4.4: leaf SVIDs carry id-kp-serverAuth and id-kp-clientAuth;
    /// a certificate lacking the purpose it is used for is refused.
    #[test]
    fn wrong_eku_is_bad_purpose() {
        let ca = ca("example.org");
        let server_only = leaf(&ca, |p| {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        });
        let (label, msg) = any_client(bundles(&[("example.org", &ca)]), &server_only);
        assert_eq!(label, "bad_purpose", "{msg}");
        let client_only = leaf(&ca, |p| {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        });
        let v = SpiffeServerVerifier::new(
            bundles(&[("example.org", &ca)]),
            Authorizer::Any,
            &crypto::provider(),
        );
        let name = ServerName::try_from("web.invalid").unwrap();
        let e = v
            .verify_server_cert(&client_only, &[], &name, &[], UnixTime::now())
            .unwrap_err();
        assert_eq!(classify(&e), "bad_purpose");
        let e = verify_svid_chain(
            &bundles(&[("example.org", &ca)]),
            &[client_only],
            UnixTime::now(),
            &crypto::provider(),
        )
        .unwrap_err();
        assert_eq!(classify(&e), "bad_purpose", "own SVIDs need both purposes");
    }

    #[test]
    fn expired_and_not_yet_valid_leaves_are_refused() {
        let ca = ca("example.org");
        let l = leaf(&ca, |_| {});
        let b = || bundles(&[("example.org", &ca)]);
        let (label, msg) = client(b(), Authorizer::Any, &l, at(2 * 3600));
        assert_eq!(label, "expired", "{msg}");
        assert!(msg.starts_with("certificate expired"), "{msg}");
        let (label, msg) = client(b(), Authorizer::Any, &l, at(-3600));
        assert_eq!(label, "not_yet_valid", "{msg}");
        assert_eq!(client(b(), Authorizer::Any, &l, at(0)).0, "ok");
    }

    #[test]
    fn denied_spiffe_id_is_refused_after_the_chain_verified() {
        let ca = ca("example.org");
        let l = leaf(&ca, |_| {});
        let other = Authorizer::Exact(SpiffeId::new("spiffe://example.org/payments").unwrap());
        let (label, msg) = client(bundles(&[("example.org", &ca)]), other, &l, UnixTime::now());
        assert_eq!(label, "denied");
        assert_eq!(msg, format!("{DENIED}: {WEB}"));
        // A chain that does not verify is refused for that, not for policy.
        let stranger = ca_with("example.org", |_| {});
        let other = Authorizer::Exact(SpiffeId::new("spiffe://example.org/payments").unwrap());
        let (label, _m) = client(
            bundles(&[("example.org", &stranger)]),
            other,
            &l,
            UnixTime::now(),
        );
        assert_eq!(label, "unknown_ca", "{_m}");
    }

    /// X509-SVID §5.2: "the validator MUST ensure that the `CA` field in the
    /// basic constraints extension is set to `false`, and that `keyCertSign`
    /// and `cRLSign` are not set in the key usage extension. The validator
    /// MUST also ensure that the scheme of the SPIFFE ID is set to `spiffe`,
    /// and MUST ensure that the SPIFFE ID has a non-root path component ...
    /// SVIDs containing more than one URI SAN MUST be rejected."
    /// X509-SVID §4.3: "Leaf SVIDs MUST set `digitalSignature`."
    #[test]
    fn leaf_rules_of_x509_svid() {
        let ca = ca("example.org");
        type Alter = fn(&mut CertificateParams);
        let cases: &[(&str, Alter, LeafError)] = &[
            (
                "CA certificate as leaf",
                |p| {
                    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
                    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
                },
                LeafError::Ca,
            ),
            (
                "cA=true with leaf key usage",
                |p| p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0)),
                LeafError::Ca,
            ),
            (
                "keyCertSign on a leaf",
                |p| {
                    p.key_usages = vec![
                        KeyUsagePurpose::DigitalSignature,
                        KeyUsagePurpose::KeyCertSign,
                    ];
                },
                LeafError::KeyCertSign,
            ),
            (
                "cRLSign on a leaf",
                |p| {
                    p.key_usages =
                        vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign];
                },
                LeafError::CrlSign,
            ),
            (
                "no digitalSignature",
                |p| p.key_usages = vec![KeyUsagePurpose::KeyEncipherment],
                LeafError::NoDigitalSignature,
            ),
            (
                "no key usage extension",
                |p| p.key_usages = vec![],
                LeafError::NoKeyUsage,
            ),
            (
                "two URI SANs",
                |p| {
                    p.subject_alt_names = vec![
                        SanType::URI(WEB.try_into().unwrap()),
                        SanType::URI("spiffe://example.org/admin".try_into().unwrap()),
                    ];
                },
                LeafError::Svid(SvidError::MultipleUris(2)),
            ),
            (
                "no URI SAN",
                |p| p.subject_alt_names = vec![SanType::DnsName("web".try_into().unwrap())],
                LeafError::Svid(SvidError::NoSpiffeId),
            ),
            (
                "root path (the trust domain's own ID)",
                |p| {
                    p.subject_alt_names =
                        vec![SanType::URI("spiffe://example.org".try_into().unwrap())];
                },
                LeafError::RootPath("spiffe://example.org".into()),
            ),
        ];
        for (what, alter, want) in cases {
            let l = leaf(&ca, alter);
            assert_eq!(check_leaf(&l).as_ref(), Err(want), "{what}");
            let (label, msg) = any_client(bundles(&[("example.org", &ca)]), &l);
            assert_eq!(label, "not_svid", "{what}: {msg}");
            assert_eq!(msg, format!("{NOT_SVID}: {want}"), "{what}");
        }
        // Not the spiffe scheme.
        let l = leaf(&ca, |p| {
            p.subject_alt_names = vec![SanType::URI("https://example.org/web".try_into().unwrap())];
        });
        assert!(matches!(
            check_leaf(&l),
            Err(LeafError::Svid(SvidError::InvalidSpiffeId { .. }))
        ));
        assert_eq!(
            any_client(bundles(&[("example.org", &ca)]), &l).0,
            "not_svid"
        );
        // Garbage DER.
        assert!(matches!(
            check_leaf(b"\x30\x03\x02\x01\x00"),
            Err(LeafError::Svid(SvidError::Malformed(_)))
        ));
    }

    /// webpki does not look at the validity of trust anchors; the bundle
    /// does: a root past its notAfter verifies nothing, even a leaf that is
    /// itself still within its validity window.
    #[test]
    fn expired_root_is_not_a_trust_anchor() {
        let short = ca_with("example.org", |p| {
            p.not_after = time::OffsetDateTime::now_utc() + time::Duration::minutes(30);
        });
        let l = leaf(&short, |_| {});
        let b = || bundles(&[("example.org", &short)]);
        assert_eq!(client(b(), Authorizer::Any, &l, at(0)).0, "ok");
        let (label, msg) = client(b(), Authorizer::Any, &l, at(45 * 60));
        assert_eq!(label, "unknown_ca", "{msg}");

        // Pruning: an expired root goes, a valid one stays.
        let good = ca("example.org");
        let mut both = bundles(&[("example.org", &short), ("example.org", &good)]);
        assert_eq!(both.root_count("example.org"), 2);
        assert_eq!(both.prune_expired(at(0)), 0);
        assert_eq!(both.prune_expired(at(45 * 60)), 1);
        assert_eq!(both.root_count("example.org"), 1);
        let l2 = leaf(&good, |_| {});
        assert_eq!(client(both.clone(), Authorizer::Any, &l2, at(0)).0, "ok");
        assert_eq!(client(both, Authorizer::Any, &l, at(0)).0, "unknown_ca");
    }

    #[test]
    fn bundles_skip_unusable_and_duplicate_roots() {
        let ca = ca("example.org");
        let mut b = TrustBundles::new();
        let garbage = CertificateDer::from(vec![0x30, 0x00]);
        assert_eq!(b.add("example.org", &[ca.der.clone(), garbage]), 1);
        assert_eq!(b.add("example.org", std::slice::from_ref(&ca.der)), 0);
        assert_eq!(b.root_count("example.org"), 1);
        assert_eq!(b, bundles(&[("example.org", &ca)]));
        let mut c = TrustBundles::new();
        c.copy_domain_from(&b, "example.org");
        assert_eq!(c, b);
        c.copy_domain_from(&TrustBundles::new(), "example.org");
        assert_eq!(c.root_count("example.org"), 0);
    }

    /// A chain through an intermediate verifies; the intermediate's own
    /// validity is checked (by webpki), so an expired intermediate fails.
    #[test]
    fn chain_through_intermediate() {
        let root = ca("example.org");
        let inter = {
            let mut p = CertificateParams::new(vec![]).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            p.distinguished_name.push(DnType::CommonName, "inter");
            let now = time::OffsetDateTime::now_utc();
            p.not_before = now - time::Duration::hours(1);
            p.not_after = now + time::Duration::minutes(30);
            let key = KeyPair::generate().unwrap();
            let der = p.signed_by(&key, &root.issuer).unwrap().der().clone();
            Ca {
                der,
                issuer: Issuer::new(p, key),
            }
        };
        let l = leaf(&inter, |_| {});
        let v = SpiffeClientVerifier::new(
            bundles(&[("example.org", &root)]),
            Authorizer::Any,
            &crypto::provider(),
            true,
        );
        v.verify_client_cert(&l, std::slice::from_ref(&inter.der), at(0))
            .unwrap();
        let e = v
            .verify_client_cert(&l, std::slice::from_ref(&inter.der), at(45 * 60))
            .unwrap_err();
        assert_eq!(classify(&e), "expired");
        let e = v.verify_client_cert(&l, &[], at(0)).unwrap_err();
        assert_eq!(classify(&e), "unknown_ca", "intermediate missing");
    }

    /// A revocation check with a fixed answer, counting its calls.
    #[derive(Debug)]
    struct Fixed(Result<(), RevocationError>, std::sync::atomic::AtomicUsize);
    impl RevocationCheck for Fixed {
        fn check(
            &self,
            _id: &SpiffeId,
            _ee: &CertificateDer<'_>,
            _im: &[CertificateDer<'_>],
            _now: UnixTime,
        ) -> Result<(), RevocationError> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.0.clone()
        }
    }

    #[test]
    fn revocation_hook_runs_after_the_chain_and_before_policy() {
        let a = ca("example.org");
        let other = ca("example.org");
        let good = leaf(&a, |_| {});
        let foreign = leaf(&other, |_| {});
        let p = crypto::provider();
        let run = |answer: Result<(), RevocationError>,
                   authorizer: Authorizer,
                   l: &CertificateDer<'_>|
         -> (&'static str, String, usize) {
            let hook = Arc::new(Fixed(answer, std::sync::atomic::AtomicUsize::new(0)));
            let v = SpiffeClientVerifier::with_revocation(
                bundles(&[("example.org", &a)]),
                authorizer,
                &p,
                true,
                Some(hook.clone()),
            );
            let calls = || hook.1.load(std::sync::atomic::Ordering::Relaxed);
            match v.verify_client_cert(l, &[], UnixTime::now()) {
                Ok(_) => ("ok", String::new(), calls()),
                Err(e) => (classify(&e), describe(&e), calls()),
            }
        };
        assert_eq!(run(Ok(()), Authorizer::Any, &good).0, "ok");
        let (label, msg, _) = run(Err(RevocationError::Revoked), Authorizer::Any, &good);
        assert_eq!(label, "revoked");
        assert!(msg.contains("revoked"), "{msg}");
        let (label, msg, _) = run(
            Err(RevocationError::Unknown("CRL stale".into())),
            Authorizer::Any,
            &good,
        );
        assert_eq!(label, "revocation_unknown");
        assert!(msg.contains("CRL stale"), "{msg}");
        // A revoked peer is refused as revoked even where policy would deny it.
        let none = Authorizer::Func(Arc::new(|_| false));
        assert_eq!(run(Err(RevocationError::Revoked), none, &good).0, "revoked");
        // An unverified chain never reaches the hook.
        let (label, _, calls) = run(Err(RevocationError::Revoked), Authorizer::Any, &foreign);
        assert_eq!((label, calls), ("unknown_ca", 0));
        // The server verifier runs it too.
        let v = SpiffeServerVerifier::with_revocation(
            bundles(&[("example.org", &a)]),
            Authorizer::Any,
            &p,
            Some(Arc::new(Fixed(
                Err(RevocationError::Revoked),
                std::sync::atomic::AtomicUsize::new(0),
            ))),
        );
        let name = ServerName::try_from("x.invalid").unwrap();
        let e = v
            .verify_server_cert(&good, &[], &name, &[], UnixTime::now())
            .unwrap_err();
        assert_eq!(classify(&e), "revoked");
    }
}
