//! The trust domain's signing authorities and their lifecycle.
//!
//! - [`journal`]-backed [`manager::CaManager`] keeps, per server, one active
//!   X.509 signing CA and one active JWT key, prepares the next ones at half
//!   their lifetime, activates them once they have been published long
//!   enough, and retires and removes the old ones when nothing they signed is
//!   still live ([`schedule`] decides when, as a pure function of the journal
//!   and the clock).
//! - [`mint`] makes new authorities: a self-signed CA (ECDSA P-256), an
//!   intermediate under a configured upstream CA, or a key and CSR for an
//!   offline upstream to sign.
//! - [`gate`] and [`validate`] check every chain and bundle before anything
//!   is stored, published or served.
//! - [`SigningCa`] ([`x509svid`]) and [`JwtSigner`] ([`jwt`]) sign.
//!
//! rcgen cannot express URI name constraints, so a CA carries its trust
//! domain as URI SAN (`spiffe://<td>`) but no nameConstraints extension; the
//! server itself never signs a SPIFFE ID outside its trust domain.
//!
//! [`journal`]: crate::store::Store::list_authorities

pub mod crl;
pub mod gate;
pub mod jwt;
pub mod keyfile;
pub mod keys;
pub mod manager;
pub mod mint;
pub mod schedule;
pub mod validate;
pub mod x509svid;

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rcgen::{Issuer, KeyPair, SerialNumber};
use rustls_pki_types::CertificateDer;

use meshid_proto::types::Authority;

pub use jwt::JwtSigner;
pub use manager::CaManager;
pub use x509svid::{IssueError, IssuedSvid};

/// Why a CA cannot be loaded, created or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// A certificate of the chain is past its notAfter.
    #[error("CA certificate {subject:?} expired at {not_after}; refusing to use or publish it")]
    Expired {
        /// Subject DN.
        subject: String,
        /// RFC 3339.
        not_after: String,
    },
    /// A certificate of the chain is before its notBefore.
    #[error("CA certificate {subject:?} is not valid before {not_before}")]
    NotYetValid {
        /// Subject DN.
        subject: String,
        /// RFC 3339.
        not_before: String,
    },
    /// The chain does not verify to a trusted root.
    #[error("CA chain is not trusted: {0}")]
    UntrustedChain(String),
    /// A certificate is malformed or lacks CA properties.
    #[error("invalid CA: {0}")]
    Invalid(String),
    /// Reading or writing CA files.
    #[error("CA file {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// The journal in the store failed.
    #[error("CA journal: {0}")]
    Store(#[from] crate::store::StoreError),
    /// A requested transition is not allowed in the authority's state.
    #[error("{0}")]
    Refused(String),
    /// The named authority does not exist.
    #[error("no authority {0:?}")]
    NotFound(String),
    /// The audit log cannot record the transition, so it is not made.
    #[error("audit log: {0}")]
    Audit(String),
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A positive 128-bit serial for a certificate signed at `now`: the time in
/// milliseconds since the Unix epoch (48 bits) followed by 80 random bits.
/// Serials thus grow with time, so the CA journal's index of serials takes
/// each new row at its end (with random serials every row dirtied a random
/// index page, which every commit wrote again); 80 random bits keep them
/// unpredictable (the CA/Browser Forum asks public CAs for at least 64).
pub fn ordered_serial(now: SystemTime) -> SerialNumber {
    let ms = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut b: [u8; 16] = rand::random();
    // 48 bits of milliseconds last until the year 10889; the top bit stays
    // clear so the serial is positive.
    let ms = u64::try_from(ms).unwrap_or(u64::MAX).min((1 << 47) - 1);
    b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    if b[0] == 0 {
        // Before 1974 (a clock far off): still a 16-byte positive serial.
        b[0] = 1;
    }
    SerialNumber::from_slice(&b)
}

/// One X.509 signing CA, ready to sign: the active authority of the journal
/// with its private key.
pub struct SigningCa {
    id: String,
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// Certificates served after each leaf: the signing CA and upstream
    /// intermediates, excluding roots. Empty when the CA is its own root.
    chain_tail: Vec<Vec<u8>>,
    /// DER of the signing CA certificate.
    cert_der: Vec<u8>,
    /// Earliest notAfter along the chain: nothing signed may outlive it.
    not_after: SystemTime,
}

impl std::fmt::Debug for SigningCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningCa")
            .field("id", &self.id)
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl SigningCa {
    /// A signing CA from its journal record and private key, after the chain
    /// gate: the chain must verify to the record's roots at `now`.
    pub fn from_authority(
        trust_domain: &str,
        a: &Authority,
        key: KeyPair,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let cert_der =
            a.chain.first().cloned().ok_or_else(|| {
                CaError::Invalid(format!("authority {} has no certificate", a.id))
            })?;
        let not_after = validate::validate_chain(&a.chain, &a.roots, now)?;
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(cert_der.clone()), key)?;
        let chain_tail = a
            .chain
            .iter()
            .filter(|c| !a.roots.contains(c))
            .cloned()
            .collect();
        Ok(Self {
            id: a.id.clone(),
            trust_domain: trust_domain.to_string(),
            issuer,
            chain_tail,
            cert_der,
            not_after,
        })
    }

    /// A fresh self-signed CA outside any journal (benchmarks, tools).
    pub fn ephemeral(
        trust_domain: &str,
        ttl: std::time::Duration,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let (rec, key) = mint::self_signed(trust_domain, ttl, "ephemeral", now)?;
        Self::from_authority(trust_domain, &rec, key, now)
    }

    /// The authority id (hex subject key identifier).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The signing CA certificate (DER).
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// Certificates served after each leaf (empty for a self-signed CA).
    pub fn chain_tail(&self) -> &[Vec<u8>] {
        &self.chain_tail
    }

    /// Nothing signed may outlive this.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The trust domain name.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Re-validates the chain at `now` (validity, constraints, signatures).
    pub fn revalidate(&self, now: SystemTime) -> Result<(), CaError> {
        if now >= self.not_after {
            return Err(CaError::Expired {
                subject: format!("authority {}", self.id),
                not_after: humantime::format_rfc3339_seconds(self.not_after).to_string(),
            });
        }
        Ok(())
    }
}
