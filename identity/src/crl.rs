//! Certificate revocation lists (RFC 5280 §5) of a SPIFFE trust domain:
//! parsed, their signature checked against the trust domain's bundle, and
//! asked whether a serial is revoked.
//!
//! meshid's servers sign one CRL with their active X.509 CA; it lists every
//! revoked certificate of the trust domain (the revocations are shared
//! through the store). Serials are random 128-bit numbers unique in the
//! trust domain's issuance journal, so a serial listed on a CRL signed by
//! any CA of the trust domain names one certificate: the check matches
//! serials, not (issuer, serial) pairs, and so still covers certificates of
//! a predecessor CA after a rotation.

use std::collections::HashSet;

use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::{CertificateRevocationList, FromDer, X509Certificate};

use crate::verify::TrustBundles;

/// Why a CRL is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CrlError {
    /// Not a DER CRL.
    #[error("malformed CRL: {0}")]
    Malformed(String),
    /// No nextUpdate: freshness cannot be judged.
    #[error("the CRL has no nextUpdate")]
    NoNextUpdate,
    /// No CA of the trust domain's bundle has the CRL's issuer name.
    #[error("the CRL's issuer ({0}) is not a CA of trust domain {1}")]
    UnknownIssuer(String, String),
    /// The signature does not verify with the issuer's key.
    #[error("the CRL's signature does not verify with the key of its issuer {0}")]
    BadSignature(String),
    /// thisUpdate lies in the future beyond the clock-skew tolerance.
    #[error("the CRL's thisUpdate is {0}s in the future")]
    FromTheFuture(i64),
}

/// A CRL whose signature verified against its trust domain's bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCrl {
    /// Trust domain whose CA signed it (a name, without scheme).
    pub trust_domain: String,
    /// The issuer's distinguished name, for messages.
    pub issuer: String,
    /// thisUpdate, Unix seconds.
    pub this_update: i64,
    /// nextUpdate, Unix seconds.
    pub next_update: i64,
    revoked: HashSet<Vec<u8>>,
}

/// A serial without leading zero bytes (INTEGER encodings may pad).
fn norm(serial: &[u8]) -> &[u8] {
    let start = serial.iter().position(|b| *b != 0).unwrap_or(serial.len());
    &serial[start..]
}

impl VerifiedCrl {
    /// Whether a certificate with this serial (raw big-endian bytes) is listed.
    pub fn is_revoked(&self, serial: &[u8]) -> bool {
        self.revoked.contains(norm(serial))
    }

    /// Whether the certificate `der` is listed (by serial). A certificate
    /// that does not parse is not listed (the chain check refuses it).
    pub fn lists(&self, der: &[u8]) -> bool {
        X509Certificate::from_der(der).is_ok_and(|(_, c)| self.is_revoked(c.raw_serial()))
    }

    /// How many certificates it lists.
    pub fn revoked_count(&self) -> usize {
        self.revoked.len()
    }

    /// Whether it is past its nextUpdate at `now` (Unix seconds).
    pub fn is_stale(&self, now: i64) -> bool {
        now > self.next_update
    }
}

/// The DER of a CRL given as DER or as PEM (`X509 CRL`).
pub fn crl_der(bytes: &[u8]) -> Result<Vec<u8>, CrlError> {
    if !bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
        return Ok(bytes.to_vec());
    }
    let mut rd = bytes;
    match rustls_pemfile::crls(&mut rd).next() {
        Some(Ok(der)) => Ok(der.as_ref().to_vec()),
        Some(Err(e)) => Err(CrlError::Malformed(format!("PEM: {e}"))),
        None => Err(CrlError::Malformed("no X509 CRL block in the PEM".into())),
    }
}

/// One DER element: (tag, content, the whole element, what follows).
type Tlv<'a> = (u8, &'a [u8], &'a [u8], &'a [u8]);

/// Splits the first DER element (definite lengths up to 4 length bytes) off `input`.
fn tlv(input: &[u8]) -> Option<Tlv<'_>> {
    let tag = *input.first()?;
    let first = *input.get(1)?;
    let (len, hdr) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for b in input.get(2..2 + n)? {
            len = (len << 8) | usize::from(*b);
        }
        (len, 2 + n)
    };
    let end = hdr.checked_add(len)?;
    let whole = input.get(..end)?;
    Some((tag, whole.get(hdr..)?, whole, input.get(end..)?))
}

/// The content of `der` if it is one SEQUENCE spanning all of it, else `der`
/// itself (accepts a field's value with or without its outer tag).
fn unwrap_seq(der: &[u8]) -> &[u8] {
    match tlv(der) {
        Some((0x30, content, _, [])) => content,
        _ => der,
    }
}

/// (algorithm identifier content, key bytes) of a subjectPublicKeyInfo.
fn spki_parts(spki: &[u8]) -> Option<(&[u8], &[u8])> {
    let (tag, alg, _, rest) = tlv(unwrap_seq(spki))?;
    if tag != 0x30 {
        return None;
    }
    let (tag, bits, _, _) = tlv(rest)?;
    if tag != 0x03 || bits.first() != Some(&0) {
        return None;
    }
    Some((alg, bits.get(1..)?))
}

/// A key that may have signed the CRL: (subject name value, SPKI).
struct Candidate {
    subject: Vec<u8>,
    spki: Vec<u8>,
}

/// Parses `der`, checks that a CA of `trust_domain` signed it — a root of
/// the bundle valid at `now`, or one of `intermediates` (CA certificates
/// already verified to chain to that bundle, e.g. the tail of the caller's
/// own SVID chain) — and that it has a nextUpdate. Freshness (nextUpdate
/// against the clock) is the caller's policy.
pub fn verify_crl(
    der: &[u8],
    trust_domain: &str,
    bundles: &TrustBundles,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    provider: &CryptoProvider,
) -> Result<VerifiedCrl, CrlError> {
    let malformed = |m: &str| CrlError::Malformed(m.to_string());
    let (rest, crl) =
        CertificateRevocationList::from_der(der).map_err(|e| CrlError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(malformed("trailing bytes after the CRL"));
    }
    let issuer_name = crl.issuer().to_string();
    let next_update = crl.next_update().ok_or(CrlError::NoNextUpdate)?.timestamp();
    let this_update = crl.last_update().timestamp();
    let now_secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    let skew = i64::try_from(crate::verify::CLOCK_SKEW_TOLERANCE.as_secs()).unwrap_or(0);
    if this_update > now_secs.saturating_add(skew) {
        return Err(CrlError::FromTheFuture(this_update - now_secs));
    }

    // CertificateList ::= SEQUENCE { tbsCertList, signatureAlgorithm, signatureValue }
    let (tag, body, _, _) = tlv(der).ok_or_else(|| malformed("not a SEQUENCE"))?;
    if tag != 0x30 {
        return Err(malformed("not a SEQUENCE"));
    }
    let (_, _, tbs, rest) = tlv(body).ok_or_else(|| malformed("no tbsCertList"))?;
    let (_, sig_alg, _, rest) = tlv(rest).ok_or_else(|| malformed("no signatureAlgorithm"))?;
    let (tag, sig_bits, _, _) = tlv(rest).ok_or_else(|| malformed("no signatureValue"))?;
    if tag != 0x03 || sig_bits.first() != Some(&0) {
        return Err(malformed("signatureValue is not a BIT STRING"));
    }
    let signature = &sig_bits[1..];
    let issuer_raw = unwrap_seq(crl.issuer().as_raw());

    let mut candidates: Vec<Candidate> = bundles
        .anchors_valid_at(trust_domain, now)
        .into_iter()
        .map(|a| Candidate {
            subject: a.subject.as_ref().to_vec(),
            spki: a.subject_public_key_info.as_ref().to_vec(),
        })
        .collect();
    for c in intermediates {
        if let Ok((_, cert)) = X509Certificate::from_der(c)
            && cert.is_ca()
        {
            candidates.push(Candidate {
                subject: cert.subject().as_raw().to_vec(),
                spki: cert.public_key().raw.to_vec(),
            });
        }
    }
    let mut named = false;
    for cand in candidates
        .iter()
        .filter(|c| unwrap_seq(&c.subject) == issuer_raw)
    {
        named = true;
        let Some((key_alg, key)) = spki_parts(&cand.spki) else {
            continue;
        };
        let verified = provider
            .signature_verification_algorithms
            .all
            .iter()
            .filter(|alg| {
                alg.public_key_alg_id().as_ref() == key_alg
                    && alg.signature_alg_id().as_ref() == sig_alg
            })
            .any(|alg| alg.verify_signature(key, tbs, signature).is_ok());
        if verified {
            return Ok(VerifiedCrl {
                trust_domain: trust_domain.to_string(),
                issuer: issuer_name,
                this_update,
                next_update,
                revoked: crl
                    .iter_revoked_certificates()
                    .map(|r| norm(r.raw_serial()).to_vec())
                    .collect(),
            });
        }
    }
    if named {
        Err(CrlError::BadSignature(issuer_name))
    } else {
        Err(CrlError::UnknownIssuer(
            issuer_name,
            trust_domain.to_string(),
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::crypto;
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, IsCa, Issuer,
        KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber,
    };

    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        der: CertificateDer<'static>,
    }

    fn ca(name: &str) -> Ca {
        let mut p = CertificateParams::new(vec![]).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca {
            der: cert.der().clone(),
            issuer: Issuer::new(p, key),
        }
    }

    fn crl(ca: &Ca, serials: &[&[u8]], next_in: i64) -> Vec<u8> {
        let now = time::OffsetDateTime::now_utc();
        CertificateRevocationListParams {
            this_update: now - time::Duration::seconds(5),
            next_update: now + time::Duration::seconds(next_in),
            crl_number: SerialNumber::from(7u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(s),
                    revocation_time: now,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&ca.issuer)
        .unwrap()
        .der()
        .to_vec()
    }

    fn bundle(ca: &Ca) -> TrustBundles {
        let mut b = TrustBundles::new();
        b.add("td", std::slice::from_ref(&ca.der));
        b
    }

    #[test]
    fn verifies_against_the_bundle_and_lists_serials() {
        let a = ca("a");
        let p = crypto::provider();
        let der = crl(&a, &[&[0x7f, 1], &[0, 0x80, 2]], 60);
        let v = verify_crl(&der, "td", &bundle(&a), &[], UnixTime::now(), &p).unwrap();
        assert!(v.is_revoked(&[0x7f, 1]));
        assert!(v.is_revoked(&[0x80, 2]));
        assert!(v.is_revoked(&[0, 0x80, 2]));
        assert!(!v.is_revoked(&[0x7f, 2]));
        assert_eq!(v.revoked_count(), 2);
        assert!(!v.is_stale(v.next_update));
        assert!(v.is_stale(v.next_update + 1));
        // The same CRL is not trusted for another trust domain.
        assert!(matches!(
            verify_crl(&der, "other", &bundle(&a), &[], UnixTime::now(), &p),
            Err(CrlError::UnknownIssuer(..))
        ));
        // A CA certificate given as intermediate counts too.
        let v = verify_crl(
            &der,
            "td",
            &TrustBundles::new(),
            std::slice::from_ref(&a.der),
            UnixTime::now(),
            &p,
        )
        .unwrap();
        assert_eq!(v.revoked_count(), 2);
    }

    #[test]
    fn forged_and_tampered_crls_are_refused() {
        let (a, b) = (ca("a"), ca("b"));
        let p = crypto::provider();
        // Signed by a CA outside the bundle.
        let der = crl(&b, &[&[1]], 60);
        assert!(matches!(
            verify_crl(&der, "td", &bundle(&a), &[], UnixTime::now(), &p),
            Err(CrlError::UnknownIssuer(..))
        ));
        // Same issuer name, another key.
        let impostor = ca("a");
        let der = crl(&impostor, &[&[1]], 60);
        assert!(matches!(
            verify_crl(&der, "td", &bundle(&a), &[], UnixTime::now(), &p),
            Err(CrlError::BadSignature(_))
        ));
        // One byte of the revoked list changed.
        let mut der = crl(&a, &[&[0x42, 0x42, 0x42]], 60);
        let at = der
            .windows(3)
            .position(|w| w == [0x42, 0x42, 0x42])
            .unwrap();
        der[at] = 0x43;
        assert!(matches!(
            verify_crl(&der, "td", &bundle(&a), &[], UnixTime::now(), &p),
            Err(CrlError::BadSignature(_))
        ));
        // Garbage.
        assert!(matches!(
            verify_crl(b"not a crl", "td", &bundle(&a), &[], UnixTime::now(), &p),
            Err(CrlError::Malformed(_))
        ));
    }
}
