//! rustls verifiers for SPIFFE peers.
//!
//! Order of checks, each with its own error so metrics can tell them apart:
//! 1. the leaf is an X509-SVID (exactly one SPIFFE URI SAN);
//! 2. the chain verifies (webpki) against the bundle of the leaf's trust
//!    domain, for the right extended key usage, at the current time;
//! 3. the SPIFFE ID is authorized by policy.
//!
//! A verifier is immutable: when bundles change, build a new one and swap the
//! whole rustls config, so no handshake ever sees a half-updated trust store.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use spiffe::SpiffeId;
use webpki::{EndEntityCert, KeyUsage};

use crate::svid::SvidInfo;

/// Trust anchors per trust domain name (without scheme).
#[derive(Clone, Default)]
pub struct TrustBundles {
    roots: HashMap<String, Vec<rustls_pki_types::TrustAnchor<'static>>>,
}

impl fmt::Debug for TrustBundles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.roots.iter().map(|(k, v)| (k, v.len())))
            .finish()
    }
}

impl TrustBundles {
    /// Empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the DER root certificates of `trust_domain`. Certificates that are
    /// not usable as trust anchors are skipped and counted in the result.
    pub fn add(&mut self, trust_domain: &str, ders: &[CertificateDer<'_>]) -> usize {
        let mut skipped = 0;
        let anchors = self.roots.entry(trust_domain.to_string()).or_default();
        for d in ders {
            match webpki::anchor_from_trusted_cert(d) {
                Ok(a) => anchors.push(a.to_owned()),
                Err(_) => skipped += 1,
            }
        }
        skipped
    }

    /// Trust domains present.
    pub fn trust_domains(&self) -> impl Iterator<Item = &str> {
        self.roots.keys().map(String::as_str)
    }

    fn anchors(&self, td: &str) -> Option<&[rustls_pki_types::TrustAnchor<'static>]> {
        self.roots
            .get(td)
            .map(Vec::as_slice)
            .filter(|a| !a.is_empty())
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

#[derive(Debug)]
struct NotSvid(String);
impl fmt::Display for NotSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not an X509-SVID: {}", self.0)
    }
}
impl std::error::Error for NotSvid {}

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
        W::UnknownIssuer => CertificateError::UnknownIssuer,
        W::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        W::RequiredEkuNotFoundContext(ctx) => CertificateError::InvalidPurposeContext {
            required: purpose(ctx.required.oid_values().collect()),
            presented: ctx.present.into_iter().map(purpose).collect(),
        },
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(ce)
}

/// The shared core: chain to the peer's trust domain bundle, then policy.
#[derive(Debug)]
struct Core {
    bundles: TrustBundles,
    authorizer: Authorizer,
    algs: WebPkiSupportedAlgorithms,
}

impl Core {
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<SpiffeId, rustls::Error> {
        let info = SvidInfo::from_der(end_entity).map_err(|e| other(NotSvid(e.to_string())))?;
        let td = info.spiffe_id.trust_domain().to_string();
        let td = td.strip_prefix("spiffe://").unwrap_or(&td).to_string();
        let anchors = self
            .bundles
            .anchors(&td)
            .ok_or(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            ))?;
        let ee = EndEntityCert::try_from(end_entity).map_err(webpki_error)?;
        ee.verify_for_usage(
            self.algs.all,
            anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(webpki_error)?;
        if !self.authorizer.allows(&info.spiffe_id) {
            return Err(other(Denied(info.spiffe_id.to_string())));
        }
        Ok(info.spiffe_id)
    }
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
        Arc::new(Self {
            core: Core {
                bundles,
                authorizer,
                algs: provider.signature_verification_algorithms,
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
        Arc::new(Self {
            core: Core {
                bundles,
                authorizer,
                algs: provider.signature_verification_algorithms,
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
/// `no_kx_group`, `other`.
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
            CertificateError::Other(o) => {
                let s = o.to_string();
                if s.starts_with(DENIED) {
                    "denied"
                } else if s.starts_with("not an X509-SVID") {
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
        _ => "other",
    }
}
