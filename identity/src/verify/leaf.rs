//! Is this certificate an X509-SVID *leaf*? (X509-SVID §3, §4.1, §4.3, §5.2)

use std::fmt;

use spiffe::SpiffeId;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::svid::{SvidError, spiffe_id_of};

/// Marker text inside `CertificateError::Other` for a certificate that is not
/// an X509-SVID leaf ([`LeafError`]).
pub const NOT_SVID: &str = "not an X509-SVID";

#[derive(Debug)]
pub(super) struct NotSvid(pub(super) LeafError);
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
