//! X509-SVID issuance, as the SPIFFE X509-SVID specification demands.
//!
//! The CSR contributes its public key and nothing else: the SPIFFE ID and DNS
//! names come from the registration entry. The certificate has exactly one URI
//! SAN, CA:false, digitalSignature (+keyEncipherment for RSA keys), EKU
//! serverAuth+clientAuth, a 128-bit serial (signing time in milliseconds,
//! then 80 random bits: [`super::ordered_serial`]), notBefore backdated 10 s,
//! and notAfter = min(now + ttl, CA notAfter).

use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
    SanType, SubjectPublicKeyInfo,
};
use x509_parser::prelude::*;

use super::{SigningCa, ordered_serial};

/// Clock-skew allowance applied to notBefore.
pub const BACKDATE: Duration = Duration::from_secs(10);

/// Why an SVID was not issued. Each maps to one gRPC code.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum IssueError {
    /// The CSR does not parse.
    #[error("malformed CSR: {0}")]
    MalformedCsr(String),
    /// The CSR's self-signature does not verify.
    #[error("CSR signature does not verify")]
    BadCsrSignature,
    /// The CSR's key type is not supported.
    #[error("unsupported CSR public key: {0}")]
    UnsupportedKey(String),
    /// A DNS name of the entry is not valid.
    #[error("invalid DNS name {0:?}")]
    InvalidDnsName(String),
    /// The SPIFFE ID is not valid or not in this trust domain.
    #[error("invalid SPIFFE ID {0:?}")]
    InvalidSpiffeId(String),
    /// The CA has no lifetime left.
    #[error("signing CA has expired")]
    CaExpired,
    /// Certificate construction failed.
    #[error("signing failed: {0}")]
    Sign(String),
}

/// A signed X509-SVID.
#[derive(Debug, Clone)]
pub struct IssuedSvid {
    /// The SPIFFE ID in the URI SAN.
    pub spiffe_id: String,
    /// DER: leaf first, then intermediates (excluding the root).
    pub chain: Vec<Vec<u8>>,
    /// Lowercase hex serial.
    pub serial: String,
    /// notAfter.
    pub not_after: SystemTime,
}

/// A verified CSR's public key.
pub struct CsrKey {
    spki: SubjectPublicKeyInfo,
    rsa: bool,
}

/// Parses a PKCS#10 CSR and verifies its self-signature.
pub fn parse_csr(der: &[u8]) -> Result<CsrKey, IssueError> {
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|e| IssueError::MalformedCsr(e.to_string()))?;
    if !rest.is_empty() {
        return Err(IssueError::MalformedCsr("trailing bytes after CSR".into()));
    }
    let spki_info = &csr.certification_request_info.subject_pki;
    // The key type first: a key nobody should be issued for gets that
    // answer, not a signature error from a verifier that cannot check it.
    let rsa = supported_key(spki_info)?;
    csr.verify_signature()
        .map_err(|_| IssueError::BadCsrSignature)?;
    let spki = SubjectPublicKeyInfo::from_der(spki_info.raw)
        .map_err(|e| IssueError::UnsupportedKey(e.to_string()))?;
    Ok(CsrKey { spki, rsa })
}

/// Keys an X509-SVID may carry: ECDSA P-256 or P-384, RSA of 2048 to 8192
/// bits, Ed25519. Returns whether the key is RSA.
fn supported_key(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<bool, IssueError> {
    use x509_parser::oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
        OID_SIG_ED25519,
    };
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        return match curve {
            Some(c) if c == OID_EC_P256 || c == OID_NIST_EC_P384 => Ok(false),
            Some(c) => Err(IssueError::UnsupportedKey(format!(
                "EC curve {c} (P-256 and P-384 are accepted)"
            ))),
            None => Err(IssueError::UnsupportedKey(
                "EC key without a named curve".into(),
            )),
        };
    }
    if *alg == OID_PKCS1_RSAENCRYPTION {
        let bits = spki.parsed().map(|k| k.key_size()).unwrap_or(0);
        return if (2048..=8192).contains(&bits) {
            Ok(true)
        } else {
            Err(IssueError::UnsupportedKey(format!(
                "RSA key of {bits} bits (2048 to 8192 are accepted)"
            )))
        };
    }
    if *alg == OID_SIG_ED25519 {
        return Ok(false);
    }
    Err(IssueError::UnsupportedKey(format!(
        "key algorithm {alg} (ECDSA P-256/P-384, RSA, Ed25519 are accepted)"
    )))
}

impl SigningCa {
    /// Signs an X509-SVID for `spiffe_id` over the key of `csr_der`.
    pub fn sign_x509_svid(
        &self,
        csr_der: &[u8],
        spiffe_id: &str,
        dns_names: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedSvid, IssueError> {
        let key = parse_csr(csr_der)?;
        self.sign_x509_svid_for_key(&key, spiffe_id, dns_names, ttl, now)
    }

    /// Signs an X509-SVID over an already verified CSR key.
    pub fn sign_x509_svid_for_key(
        &self,
        key: &CsrKey,
        spiffe_id: &str,
        dns_names: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedSvid, IssueError> {
        // Defence in depth: whatever the store holds, nothing that is not a
        // canonical workload SPIFFE ID of this trust domain is ever signed
        // (SPIFFE-ID §2.1, §2.3; X509-SVID §2, §3.1).
        let id = meshid_identity::spiffe_id::workload_id(spiffe_id).map_err(|e| {
            tracing::warn!(reason = %e, "refusing to sign an X509-SVID for a non-canonical SPIFFE ID");
            IssueError::InvalidSpiffeId(spiffe_id.into())
        })?;
        if id.trust_domain().as_str() != self.trust_domain() {
            return Err(IssueError::InvalidSpiffeId(spiffe_id.into()));
        }
        if now >= self.not_after() {
            return Err(IssueError::CaExpired);
        }
        let not_after = (now + ttl).min(self.not_after());
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "meshid");
        p.distinguished_name = dn;
        let mut sans = Vec::with_capacity(1 + dns_names.len());
        sans.push(SanType::URI(
            spiffe_id
                .try_into()
                .map_err(|_| IssueError::InvalidSpiffeId(spiffe_id.into()))?,
        ));
        for d in dns_names {
            sans.push(SanType::DnsName(
                d.as_str()
                    .try_into()
                    .map_err(|_| IssueError::InvalidDnsName(d.clone()))?,
            ));
        }
        p.subject_alt_names = sans;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = if key.rsa {
            vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ]
        } else {
            vec![KeyUsagePurpose::DigitalSignature]
        };
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = (now - BACKDATE).into();
        p.not_after = not_after.into();
        let serial = ordered_serial(now);
        let serial_hex = hex::encode(serial.as_ref());
        p.serial_number = Some(serial);
        p.use_authority_key_identifier_extension = true;
        let cert = p
            .signed_by(&key.spki, &self.issuer)
            .map_err(|e| IssueError::Sign(e.to_string()))?;
        let mut chain = Vec::with_capacity(1 + self.chain_tail.len());
        chain.push(cert.der().to_vec());
        chain.extend(self.chain_tail.iter().cloned());
        Ok(IssuedSvid {
            spiffe_id: spiffe_id.to_string(),
            chain,
            serial: serial_hex,
            not_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshid_identity::svid::SvidInfo;

    fn ca(_dir: &std::path::Path) -> SigningCa {
        SigningCa::ephemeral("example.org", Duration::from_secs(86400), SystemTime::now())
            .expect("ca")
    }

    #[test]
    fn serials_grow_with_time_and_differ_within_a_millisecond() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_000_000_123);
        let hex = |s: rcgen::SerialNumber| hex::encode(s.as_ref());
        let (a, b) = (hex(ordered_serial(t)), hex(ordered_serial(t)));
        assert_ne!(a, b);
        assert_eq!(a[..12], b[..12]);
        assert!(hex(ordered_serial(t + Duration::from_millis(1))) > a.max(b));
        // Positive and 16 bytes even for a clock stuck at the epoch.
        let early = ordered_serial(SystemTime::UNIX_EPOCH);
        assert_eq!(early.as_ref().len(), 16);
        assert!(early.as_ref()[0] > 0 && early.as_ref()[0] < 0x80);
    }

    fn csr() -> Vec<u8> {
        let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut p =
            CertificateParams::new(vec!["spiffe://evil.org/claimed".to_string()]).expect("params");
        p.distinguished_name = DistinguishedName::new();
        p.serialize_request(&k).expect("csr").der().to_vec()
    }

    #[test]
    fn svid_has_entry_identity_not_csr_claims() {
        let dir = tempfile::tempdir().expect("tmp");
        let ca = ca(dir.path());
        let now = SystemTime::now();
        let s = ca
            .sign_x509_svid(
                &csr(),
                "spiffe://example.org/web",
                &["web.local".into()],
                Duration::from_secs(60),
                now,
            )
            .expect("sign");
        let info = SvidInfo::from_der(&s.chain[0]).expect("svid");
        assert_eq!(info.spiffe_id.to_string(), "spiffe://example.org/web");
        assert_eq!(info.serial, s.serial);
        // 16 bytes, positive, led by the signing time in milliseconds.
        let ms = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after 1970")
            .as_millis();
        assert_eq!(s.serial.len(), 32, "{}", s.serial);
        assert_eq!(s.serial[..12], format!("{ms:012x}"), "{}", s.serial);
        let (_, c) = X509Certificate::from_der(&s.chain[0]).expect("parse");
        assert!(!c.is_ca());
        let eku = c.extended_key_usage().expect("eku").expect("present").value;
        assert!(eku.server_auth && eku.client_auth);
        let ku = c.key_usage().expect("ku").expect("present").value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());
        let lifetime = c.validity().not_after.timestamp() - c.validity().not_before.timestamp();
        assert!((69..=71).contains(&lifetime), "{lifetime}");
    }

    #[test]
    fn ttl_is_capped_by_ca_and_foreign_td_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let ca = ca(dir.path());
        let now = SystemTime::now();
        let s = ca
            .sign_x509_svid(
                &csr(),
                "spiffe://example.org/w",
                &[],
                Duration::from_secs(10 * 86400),
                now,
            )
            .expect("sign");
        assert!(s.not_after <= ca.not_after());
        assert_eq!(
            ca.sign_x509_svid(
                &csr(),
                "spiffe://other.org/w",
                &[],
                Duration::from_secs(60),
                now
            )
            .expect_err("foreign"),
            IssueError::InvalidSpiffeId("spiffe://other.org/w".into())
        );
    }

    #[test]
    fn malformed_and_tampered_csr_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let ca = ca(dir.path());
        let now = SystemTime::now();
        assert!(matches!(
            ca.sign_x509_svid(
                b"garbage",
                "spiffe://example.org/w",
                &[],
                Duration::from_secs(60),
                now
            ),
            Err(IssueError::MalformedCsr(_))
        ));
        let mut c = csr();
        let n = c.len();
        c[n - 5] ^= 0xff;
        assert!(matches!(
            ca.sign_x509_svid(
                &c,
                "spiffe://example.org/w",
                &[],
                Duration::from_secs(60),
                now
            ),
            Err(IssueError::BadCsrSignature | IssueError::MalformedCsr(_))
        ));
    }
}
