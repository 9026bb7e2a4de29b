//! Signing X.509 v2 certificate revocation lists (RFC 5280 §5) with the
//! active CA: what `meshid server x509 revoke` publishes.

use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateRevocationListParams, KeyIdMethod, RevocationReason, RevokedCertParams, SerialNumber,
};

use super::SigningCa;
use crate::store::RevokedCert;

/// Why a CRL was not signed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CrlError {
    /// A stored serial is not hex.
    #[error("revoked serial {0:?} is not hex")]
    BadSerial(String),
    /// rcgen refused to build or sign.
    #[error("signing the CRL failed: {0}")]
    Sign(String),
}

/// A signed CRL.
#[derive(Debug, Clone)]
pub struct SignedCrl {
    /// DER.
    pub der: Vec<u8>,
    /// PEM (`X509 CRL`).
    pub pem: String,
    /// thisUpdate, Unix seconds.
    pub this_update: i64,
    /// nextUpdate, Unix seconds.
    pub next_update: i64,
    /// CRL number (Unix milliseconds of thisUpdate: grows across restarts
    /// and across servers whose clocks agree).
    pub number: i64,
    /// How many certificates it lists.
    pub revoked: usize,
    /// Id of the authority that signed it.
    pub ca_id: String,
}

/// The RFC 5280 CRLReason for a code; unknown codes are `unspecified`.
pub fn reason_of(code: i64) -> RevocationReason {
    match code {
        1 => RevocationReason::KeyCompromise,
        2 => RevocationReason::CaCompromise,
        3 => RevocationReason::AffiliationChanged,
        4 => RevocationReason::Superseded,
        5 => RevocationReason::CessationOfOperation,
        9 => RevocationReason::PrivilegeWithdrawn,
        _ => RevocationReason::Unspecified,
    }
}

fn at(unix: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

impl SigningCa {
    /// Signs a CRL listing `revoked`, valid from `now` for `validity`
    /// (nextUpdate), capped at the CA's own notAfter.
    pub fn sign_crl(
        &self,
        revoked: &[RevokedCert],
        validity: Duration,
        now: SystemTime,
    ) -> Result<SignedCrl, CrlError> {
        let since = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let this_update = i64::try_from(since.as_secs()).unwrap_or(i64::MAX);
        let next = (now + validity).min(self.not_after);
        let next_update = i64::try_from(
            next.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
        )
        .unwrap_or(i64::MAX);
        if next_update <= this_update {
            return Err(CrlError::Sign("the signing CA expires now".into()));
        }
        let number = i64::try_from(since.as_millis()).unwrap_or(i64::MAX);
        let revoked_certs = revoked
            .iter()
            .map(|r| {
                let bytes =
                    hex::decode(&r.serial).map_err(|_| CrlError::BadSerial(r.serial.clone()))?;
                if bytes.is_empty() || bytes.len() > 20 {
                    return Err(CrlError::BadSerial(r.serial.clone()));
                }
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&bytes),
                    revocation_time: at(r.revoked_at),
                    reason_code: Some(reason_of(r.reason)),
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let params = CertificateRevocationListParams {
            this_update: at(this_update),
            next_update: at(next_update),
            crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params
            .signed_by(&self.issuer)
            .map_err(|e| CrlError::Sign(e.to_string()))?;
        let pem = crl.pem().map_err(|e| CrlError::Sign(e.to_string()))?;
        Ok(SignedCrl {
            der: crl.der().to_vec(),
            pem,
            this_update,
            next_update,
            number,
            revoked: revoked.len(),
            ca_id: self.id.clone(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use x509_parser::prelude::{CertificateRevocationList, FromDer, X509Certificate};

    #[test]
    fn crl_lists_serials_and_verifies_with_the_ca_key() {
        let now = SystemTime::now();
        let ca = SigningCa::ephemeral("td", Duration::from_secs(3600), now).unwrap();
        let rc = RevokedCert {
            serial: "7f0102".into(),
            spiffe_id: "spiffe://td/admin/a".into(),
            not_after: 0,
            revoked_at: 1_700_000_000,
            reason: 1,
        };
        let crl = ca.sign_crl(&[rc], Duration::from_secs(600), now).unwrap();
        assert_eq!(crl.next_update - crl.this_update, 600);
        let (_, parsed) = CertificateRevocationList::from_der(&crl.der).unwrap();
        let serials: Vec<Vec<u8>> = parsed
            .iter_revoked_certificates()
            .map(|r| r.raw_serial().to_vec())
            .collect();
        assert_eq!(serials, vec![vec![0x7f, 1, 2]]);
        let (_, cert) = X509Certificate::from_der(ca.cert_der()).unwrap();
        assert_eq!(parsed.issuer(), cert.subject());
        // nextUpdate never beyond the CA's own notAfter.
        let capped = ca.sign_crl(&[], Duration::from_secs(86_400), now).unwrap();
        assert!(capped.next_update <= capped.this_update + 3600);
        // A serial that is not hex is refused, not signed as garbage.
        let bad = RevokedCert {
            serial: "zz".into(),
            ..RevokedCert {
                serial: String::new(),
                spiffe_id: String::new(),
                not_after: 0,
                revoked_at: 0,
                reason: 0,
            }
        };
        assert!(matches!(
            ca.sign_crl(&[bad], Duration::from_secs(60), now),
            Err(CrlError::BadSerial(_))
        ));
    }
}
