//! Reading SPIFFE identity out of X.509 certificates.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use spiffe::SpiffeId;
use x509_parser::prelude::*;

/// Why a certificate is not a usable X509-SVID.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SvidError {
    /// The DER does not parse as an X.509 certificate.
    #[error("certificate does not parse: {0}")]
    Malformed(String),
    /// The certificate has no URI SAN.
    #[error("certificate has no URI SAN (not an X509-SVID)")]
    NoSpiffeId,
    /// The certificate has more than one URI SAN.
    #[error("certificate has {0} URI SANs; an X509-SVID has exactly one")]
    MultipleUris(usize),
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("URI SAN {uri:?} is not a valid SPIFFE ID: {reason}")]
    InvalidSpiffeId {
        /// The URI as found.
        uri: String,
        /// Why it is invalid.
        reason: String,
    },
}

/// What matters about an SVID: identity, serial and validity window.
#[derive(Debug, Clone)]
pub struct SvidInfo {
    /// The SPIFFE ID from the single URI SAN.
    pub spiffe_id: SpiffeId,
    /// Lowercase hex serial number.
    pub serial: String,
    /// notBefore.
    pub not_before: SystemTime,
    /// notAfter.
    pub not_after: SystemTime,
}

impl SvidInfo {
    /// Parses a leaf certificate as an X509-SVID.
    pub fn from_der(der: &[u8]) -> Result<Self, SvidError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| SvidError::Malformed(e.to_string()))?;
        let spiffe_id = spiffe_id_of(&cert)?;
        Ok(Self {
            spiffe_id,
            serial: hex::encode(cert.raw_serial()),
            not_before: to_system_time(cert.validity().not_before),
            not_after: to_system_time(cert.validity().not_after),
        })
    }

    /// Seconds since the Unix epoch of notAfter.
    pub fn not_after_unix(&self) -> i64 {
        unix(self.not_after)
    }
}

/// Parses a SPIFFE ID exactly as written. The `spiffe` crate also accepts
/// an upper-case scheme or trust domain and lower-cases it; the SPIFFE ID
/// specification allows only lower case there, and an entry or certificate
/// whose text differs from the ID it is read as would name one identity two
/// ways (and other SPIFFE implementations refuse it). Anything that does not
/// print back unchanged is refused.
pub fn parse_spiffe_id(s: &str) -> Result<SpiffeId, String> {
    // One rule for every boundary: [`crate::spiffe_id::any_id`].
    crate::spiffe_id::any_id(s).map_err(|e| e.to_string())
}

/// The SPIFFE ID carried by a parsed certificate: exactly one URI SAN, in
/// canonical form ([`parse_spiffe_id`]).
pub fn spiffe_id_of(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name {
                uris.push(*u);
            }
        }
    }
    match uris.as_slice() {
        [] => Err(SvidError::NoSpiffeId),
        [one] => parse_spiffe_id(one).map_err(|reason| SvidError::InvalidSpiffeId {
            uri: (*one).to_string(),
            reason,
        }),
        many => Err(SvidError::MultipleUris(many.len())),
    }
}

/// Converts an ASN.1 time to `SystemTime`.
pub fn to_system_time(t: ASN1Time) -> SystemTime {
    let ts = t.timestamp();
    if ts >= 0 {
        UNIX_EPOCH + Duration::from_secs(ts.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(ts.unsigned_abs())
    }
}

/// Seconds since the Unix epoch (negative before it).
pub fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// The id of the authority that signed a certificate: the lowercase hex
/// keyIdentifier of its authorityKeyIdentifier extension, if present.
pub fn authority_key_id(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    cert.extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|k| hex::encode(k.0))
            }
            _ => None,
        })
}

/// The id of a CA certificate as an authority: the lowercase hex of its
/// subjectKeyIdentifier, or, when it has none, of the first 20 bytes of the
/// SHA-256 of its public key (what leaves signed by it are matched against
/// through their authorityKeyIdentifier).
pub fn subject_key_id(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let ski = cert
        .extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(hex::encode(k.0)),
            _ => None,
        });
    ski.or_else(|| {
        use sha2::Digest as _;
        let d = sha2::Sha256::digest(cert.public_key().subject_public_key.data.as_ref());
        Some(hex::encode(&d[..20]))
    })
}

#[cfg(test)]
mod canonical_tests {
    use super::*;

    fn cert_with_uri(uri: &str) -> Vec<u8> {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        p.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().expect("uri"))];
        let key = rcgen::KeyPair::generate().expect("key");
        p.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn only_canonical_spiffe_ids_are_read() {
        assert!(parse_spiffe_id("spiffe://example.org/ns/web").is_ok());
        for bad in [
            "spiffe://Example.org/ns/web",
            "SPIFFE://example.org/ns/web",
            "spiffe://EXAMPLE.ORG",
        ] {
            let e = parse_spiffe_id(bad).expect_err(bad);
            assert!(e.contains("canonical"), "{bad}: {e}");
        }
        // A certificate naming the upper-case form is not an X509-SVID for
        // the lower-case one.
        let ok = SvidInfo::from_der(&cert_with_uri("spiffe://example.org/web")).expect("svid");
        assert_eq!(ok.spiffe_id.to_string(), "spiffe://example.org/web");
        assert!(matches!(
            SvidInfo::from_der(&cert_with_uri("spiffe://Example.org/web")),
            Err(SvidError::InvalidSpiffeId { .. })
        ));
    }
}
