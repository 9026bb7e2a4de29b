//! What a verification failure means, for operators and for metrics.

use rustls::CertificateError;

use super::chain::DENIED;
use super::leaf::NOT_SVID;
use super::revocation::REVOCATION_UNKNOWN;

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
