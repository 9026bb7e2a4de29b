//! The trust domain's signing CA: load or create it, validate its chain, and
//! sign X509-SVIDs and JWT-SVIDs with it.
//!
//! Without `[upstream]` the server keeps a self-signed CA (ECDSA P-256,
//! `ca_ttl`), which is also the bundle's root. With `[upstream]` the server
//! mints its own intermediate under the upstream CA and serves the chain; the
//! bundle holds the upstream roots. Either way the chain is validated before
//! the CA is used or published, and the server refuses to start otherwise.
//!
//! rcgen cannot express URI name constraints, so the CA carries its trust
//! domain as URI SAN (`spiffe://<td>`) but no nameConstraints extension; the
//! server itself never signs a SPIFFE ID outside its trust domain.

pub mod jwt;
pub mod keyfile;
pub mod validate;
pub mod x509svid;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;

use crate::config::UpstreamConfig;

pub use jwt::JwtSigner;
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
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Random positive 128-bit serial number.
pub fn random_serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f;
    if b[0] == 0 {
        b[0] = 1;
    }
    SerialNumber::from_slice(&b)
}

/// The active signing CA.
pub struct SigningCa {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// The signing CA certificate followed by intermediates up to, excluding,
    /// the root. Empty when the signing CA is itself the root.
    chain_tail: Vec<Vec<u8>>,
    /// DER of the signing CA certificate.
    cert_der: Vec<u8>,
    roots: Vec<Vec<u8>>,
    /// Earliest notAfter along the chain: nothing signed may outlive it.
    not_after: SystemTime,
}

impl std::fmt::Debug for SigningCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningCa")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Files under `<data_dir>/ca/`.
struct CaFiles {
    cert: PathBuf,
    key: PathBuf,
}

impl CaFiles {
    fn new(data_dir: &Path) -> Self {
        let d = data_dir.join("ca");
        Self {
            cert: d.join("signing-ca.pem"),
            key: d.join("signing-ca.key"),
        }
    }
}

fn read_pem_certs(path: &Path) -> Result<Vec<Vec<u8>>, CaError> {
    let pem = std::fs::read(path).map_err(io_err(path))?;
    meshid_identity::pem::parse_certs(&pem)
        .map(|v| v.into_iter().map(|c| c.to_vec()).collect())
        .map_err(|e| CaError::Invalid(format!("{}: {e}", path.display())))
}

fn read_key(path: &Path) -> Result<KeyPair, CaError> {
    let pem = std::fs::read_to_string(path).map_err(io_err(path))?;
    KeyPair::from_pem(&pem).map_err(|e| CaError::Invalid(format!("{}: {e}", path.display())))
}

fn is_self_signed(der: &[u8]) -> bool {
    use x509_parser::prelude::*;
    X509Certificate::from_der(der)
        .map(|(_, c)| c.subject() == c.issuer() && c.verify_signature(None).is_ok())
        .unwrap_or(false)
}

fn ca_params(
    trust_domain: &str,
    not_after: SystemTime,
    now: SystemTime,
) -> Result<CertificateParams, CaError> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "meshid");
    dn.push(DnType::CommonName, format!("meshid CA {trust_domain}"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{trust_domain}")
            .try_into()
            .map_err(|_| CaError::Invalid("trust domain is not IA5".into()))?,
    )];
    p.not_before = (now - Duration::from_secs(10)).into();
    p.not_after = not_after.into();
    p.serial_number = Some(random_serial());
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

impl SigningCa {
    /// Loads the CA from `<data_dir>/ca/`, creating (or, when expired,
    /// replacing) it as needed, then validates the whole chain.
    pub fn load_or_create(
        data_dir: &Path,
        trust_domain: &str,
        ca_ttl: Duration,
        upstream: Option<&UpstreamConfig>,
        now: SystemTime,
    ) -> Result<(Self, bool), CaError> {
        let files = CaFiles::new(data_dir);
        match upstream {
            None => Self::self_signed(&files, trust_domain, ca_ttl, now),
            Some(u) => Self::under_upstream(&files, trust_domain, ca_ttl, u, now),
        }
    }

    fn self_signed(
        files: &CaFiles,
        td: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<(Self, bool), CaError> {
        if files.cert.exists() && files.key.exists() {
            let chain = read_pem_certs(&files.cert)?;
            let key = read_key(&files.key)?;
            let root = chain.first().cloned().unwrap_or_default();
            match validate::validate_chain(&chain[..1], std::slice::from_ref(&root), now) {
                Ok(not_after) => {
                    let issuer =
                        Issuer::from_ca_cert_der(&CertificateDer::from(root.clone()), key)?;
                    return Ok((
                        Self {
                            trust_domain: td.into(),
                            issuer,
                            chain_tail: Vec::new(),
                            cert_der: root.clone(),
                            roots: vec![root],
                            not_after,
                        },
                        false,
                    ));
                }
                Err(e @ (CaError::Expired { .. } | CaError::NotYetValid { .. })) => {
                    tracing::warn!(error = %e, "self-signed CA is outside its validity window; creating a new one");
                }
                Err(e) => return Err(e),
            }
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let params = ca_params(td, now + ttl, now)?;
        let cert = params.self_signed(&key)?;
        let der = cert.der().to_vec();
        keyfile::write_secret(&files.key, key.serialize_pem().as_bytes())
            .map_err(io_err(&files.key))?;
        keyfile::write_file(&files.cert, cert.pem().as_bytes(), 0o644)
            .map_err(io_err(&files.cert))?;
        let not_after =
            validate::validate_chain(std::slice::from_ref(&der), std::slice::from_ref(&der), now)?;
        let issuer = Issuer::new(params, key);
        Ok((
            Self {
                trust_domain: td.into(),
                issuer,
                chain_tail: Vec::new(),
                cert_der: der.clone(),
                roots: vec![der],
                not_after,
            },
            true,
        ))
    }

    fn under_upstream(
        files: &CaFiles,
        td: &str,
        ttl: Duration,
        up: &UpstreamConfig,
        now: SystemTime,
    ) -> Result<(Self, bool), CaError> {
        let mut up_chain = read_pem_certs(&up.cert_path)?;
        let up_key = read_key(&up.key_path)?;
        let roots = match &up.bundle_path {
            Some(p) => read_pem_certs(p)?,
            None => {
                let last = up_chain.last().cloned().unwrap_or_default();
                if !is_self_signed(&last) {
                    return Err(CaError::Invalid(format!(
                        "{}: the last certificate is not a self-signed root; set upstream.bundle_path",
                        up.cert_path.display()
                    )));
                }
                vec![last]
            }
        };
        // The chain we serve stops below the root.
        up_chain.retain(|c| !roots.contains(c));
        if up_chain.is_empty() {
            // The upstream CA is itself a root.
            let first = read_pem_certs(&up.cert_path)?;
            up_chain = Vec::new();
            validate::validate_chain(&first[..1], &roots, now)?;
        } else {
            // Never build on an expired or untrusted upstream.
            validate::validate_chain(&up_chain, &roots, now)?;
        }
        let up_cert = read_pem_certs(&up.cert_path)?
            .into_iter()
            .next()
            .ok_or_else(|| CaError::Invalid("upstream cert_path holds no certificate".into()))?;
        let up_issuer = Issuer::from_ca_cert_der(&CertificateDer::from(up_cert), up_key)?;

        // Reuse our intermediate while it is valid under the current upstream.
        if files.cert.exists() && files.key.exists() {
            let ours = read_pem_certs(&files.cert)?;
            if let Some(first) = ours.first() {
                let mut chain = vec![first.clone()];
                chain.extend(up_chain.iter().cloned());
                match validate::validate_chain(&chain, &roots, now) {
                    Ok(not_after) => {
                        let key = read_key(&files.key)?;
                        let issuer =
                            Issuer::from_ca_cert_der(&CertificateDer::from(first.clone()), key)?;
                        return Ok((
                            Self {
                                trust_domain: td.into(),
                                issuer,
                                cert_der: first.clone(),
                                chain_tail: chain,
                                roots,
                                not_after,
                            },
                            false,
                        ));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "stored intermediate CA is not usable; minting a new one");
                    }
                }
            }
        }
        let up_not_after = validate::validate_chain(
            if up_chain.is_empty() {
                &roots[..1]
            } else {
                &up_chain
            },
            &roots,
            now,
        )?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let params = ca_params(td, (now + ttl).min(up_not_after), now)?;
        let cert = params.signed_by(&key, &up_issuer)?;
        let der = cert.der().to_vec();
        let mut chain = vec![der.clone()];
        chain.extend(up_chain.iter().cloned());
        let not_after = validate::validate_chain(&chain, &roots, now)?;
        keyfile::write_secret(&files.key, key.serialize_pem().as_bytes())
            .map_err(io_err(&files.key))?;
        keyfile::write_file(&files.cert, cert.pem().as_bytes(), 0o644)
            .map_err(io_err(&files.cert))?;
        let issuer = Issuer::new(params, key);
        Ok((
            Self {
                trust_domain: td.into(),
                issuer,
                cert_der: der,
                chain_tail: chain,
                roots,
                not_after,
            },
            true,
        ))
    }

    /// Bundle roots (DER).
    pub fn roots(&self) -> &[Vec<u8>] {
        &self.roots
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

    /// Re-validates the chain now (before each publication).
    pub fn revalidate(&self, now: SystemTime) -> Result<(), CaError> {
        let chain = if self.chain_tail.is_empty() {
            vec![self.cert_der.clone()]
        } else {
            self.chain_tail.clone()
        };
        validate::validate_chain(&chain, &self.roots, now).map(|_| ())
    }
}
