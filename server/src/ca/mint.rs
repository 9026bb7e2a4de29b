//! Making new authorities: a self-signed X.509 CA, an intermediate under a
//! configured upstream CA, a key and CSR for an offline upstream CA, and a
//! JWT signing key. Each comes back as a journal record (state `prepared`)
//! and the private key, which the caller writes to disk before the record is
//! stored.

use std::path::Path;
use std::time::{Duration, SystemTime};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData as _, SanType,
};
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::*;

use meshid_identity::svid::{subject_key_id, to_system_time, unix};
use meshid_proto::types::Authority;

use super::{CaError, io_err, ordered_serial, validate};
use crate::config::UpstreamConfig;

/// `kind` of X.509 authorities.
pub const X509: &str = "x509";
/// `kind` of JWT authorities.
pub const JWT: &str = "jwt";

/// notBefore backdating of CA certificates, for clock skew.
const BACKDATE: Duration = Duration::from_secs(10);

/// Reads every certificate of a PEM file (DER).
pub fn read_pem_certs(path: &Path) -> Result<Vec<Vec<u8>>, CaError> {
    let pem = std::fs::read(path).map_err(io_err(path))?;
    meshid_identity::pem::parse_certs(&pem)
        .map(|v| v.into_iter().map(|c| c.to_vec()).collect())
        .map_err(|e| CaError::Invalid(format!("{}: {e}", path.display())))
}

/// Reads a PEM private key.
pub fn read_key(path: &Path) -> Result<KeyPair, CaError> {
    let pem = std::fs::read_to_string(path).map_err(io_err(path))?;
    KeyPair::from_pem(&pem).map_err(|e| CaError::Invalid(format!("{}: {e}", path.display())))
}

fn is_self_signed(der: &[u8]) -> bool {
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
    dn.push(
        DnType::CommonName,
        format!("meshid CA {trust_domain} {}", unix(now)),
    );
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    // X509-SVID Appendix A: a signing certificate has keyCertSign (and may
    // have cRLSign); digitalSignature is for leaves.
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.subject_alt_names = vec![SanType::URI(
        meshid_identity::spiffe_id::trust_domain_id(trust_domain)
            .try_into()
            .map_err(|_| CaError::Invalid("trust domain is not IA5".into()))?,
    )];
    p.not_before = (now - BACKDATE).into();
    p.not_after = not_after.into();
    p.serial_number = Some(ordered_serial(now));
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

/// A journal record for an X.509 CA certificate and its chain.
pub fn x509_record(
    chain: Vec<Vec<u8>>,
    roots: Vec<Vec<u8>>,
    origin: &str,
    owner: &str,
    now: SystemTime,
) -> Result<Authority, CaError> {
    let first = chain
        .first()
        .ok_or_else(|| CaError::Invalid("empty CA chain".into()))?;
    let (_, c) = X509Certificate::from_der(first)
        .map_err(|e| CaError::Invalid(format!("CA certificate does not parse: {e}")))?;
    let id = subject_key_id(first)
        .ok_or_else(|| CaError::Invalid("CA certificate has no usable key id".into()))?;
    Ok(Authority {
        id,
        kind: X509.into(),
        owner: owner.into(),
        state: "prepared".into(),
        serial: hex::encode(c.raw_serial()),
        not_before: unix(to_system_time(c.validity().not_before)),
        not_after: unix(to_system_time(c.validity().not_after)),
        prepared_at: unix(now),
        origin: origin.into(),
        chain,
        roots,
        revision: 1,
        ..Authority::default()
    })
}

/// A new self-signed CA valid for `ttl` from `now`.
pub fn self_signed(
    trust_domain: &str,
    ttl: Duration,
    owner: &str,
    now: SystemTime,
) -> Result<(Authority, KeyPair), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let params = ca_params(trust_domain, now + ttl, now)?;
    let der = params.self_signed(&key)?.der().to_vec();
    validate::validate_chain(std::slice::from_ref(&der), std::slice::from_ref(&der), now)?;
    let rec = x509_record(vec![der.clone()], vec![der], "self_signed", owner, now)?;
    Ok((rec, key))
}

/// The configured upstream CA: its chain (below the roots), the roots the
/// bundle publishes, and, when its key is configured, an issuer.
pub struct Upstream {
    /// Upstream CA certificate and intermediates, excluding roots.
    pub chain: Vec<Vec<u8>>,
    /// Roots published in the bundle.
    pub roots: Vec<Vec<u8>>,
    /// The upstream CA's issuer, when its key is on this machine.
    pub issuer: Option<Issuer<'static, KeyPair>>,
    /// Earliest notAfter of the upstream chain.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("chain", &self.chain.len())
            .field("roots", &self.roots.len())
            .field("has_key", &self.issuer.is_some())
            .finish()
    }
}

impl Upstream {
    /// Loads and validates `[upstream]`: an expired or untrusted upstream
    /// chain is refused.
    pub fn load(up: &UpstreamConfig, now: SystemTime) -> Result<Self, CaError> {
        let file_chain = match &up.cert_path {
            Some(p) => read_pem_certs(p)?,
            None => Vec::new(),
        };
        let roots = match &up.bundle_path {
            Some(p) => read_pem_certs(p)?,
            None => {
                let last = file_chain.last().cloned().ok_or_else(|| {
                    CaError::Invalid(
                        "[upstream] needs cert_path, or bundle_path for an offline root".into(),
                    )
                })?;
                if !is_self_signed(&last) {
                    return Err(CaError::Invalid(format!(
                        "{}: the last certificate is not a self-signed root; set upstream.bundle_path",
                        up.cert_path
                            .as_deref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_default()
                    )));
                }
                vec![last]
            }
        };
        if roots.is_empty() {
            return Err(CaError::Invalid("upstream bundle holds no roots".into()));
        }
        let chain: Vec<Vec<u8>> = file_chain
            .iter()
            .filter(|c| !roots.contains(c))
            .cloned()
            .collect();
        let not_after = if chain.is_empty() {
            match file_chain.first() {
                Some(first) => validate::validate_chain(std::slice::from_ref(first), &roots, now)?,
                None => roots
                    .iter()
                    .map(|r| {
                        validate::validate_chain(std::slice::from_ref(r), &roots, now)
                            .unwrap_or(SystemTime::UNIX_EPOCH)
                    })
                    .max()
                    .unwrap_or(SystemTime::UNIX_EPOCH),
            }
        } else {
            validate::validate_chain(&chain, &roots, now)?
        };
        let issuer = match (&up.key_path, file_chain.first()) {
            (Some(k), Some(cert)) => Some(Issuer::from_ca_cert_der(
                &CertificateDer::from(cert.clone()),
                read_key(k)?,
            )?),
            (Some(_), None) => {
                return Err(CaError::Invalid(
                    "[upstream] key_path is set without cert_path".into(),
                ));
            }
            (None, _) => None,
        };
        Ok(Self {
            chain,
            roots,
            issuer,
            not_after,
        })
    }
}

/// A new intermediate CA signed by the configured upstream key, valid for
/// `ttl` but never beyond the upstream chain.
pub fn under_upstream(
    trust_domain: &str,
    ttl: Duration,
    up: &Upstream,
    owner: &str,
    now: SystemTime,
) -> Result<(Authority, KeyPair), CaError> {
    let issuer = up.issuer.as_ref().ok_or_else(|| {
        CaError::Refused(
            "the upstream CA key is not configured: prepare with an upstream CSR and import \
             the signed intermediate"
                .into(),
        )
    })?;
    if now >= up.not_after {
        return Err(CaError::Refused("the upstream CA has expired".into()));
    }
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let params = ca_params(trust_domain, (now + ttl).min(up.not_after), now)?;
    let der = params.signed_by(&key, issuer)?.der().to_vec();
    let mut chain = vec![der];
    chain.extend(up.chain.iter().cloned());
    validate::validate_chain(&chain, &up.roots, now)?;
    let rec = x509_record(chain, up.roots.clone(), "upstream", owner, now)?;
    Ok((rec, key))
}

/// A key and a PEM CSR for the next intermediate, to be signed by an offline
/// upstream CA. The CSR asks for what [`ca_params`] would set; the upstream
/// decides the validity.
pub fn upstream_csr(trust_domain: &str, now: SystemTime) -> Result<(KeyPair, String), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    // A CSR carries the subject and the SAN; the upstream sets the CA
    // constraints, key usage and validity.
    let full = ca_params(trust_domain, now + Duration::from_secs(86400), now)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = full.distinguished_name;
    params.subject_alt_names = full.subject_alt_names;
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.pem()?))
}

/// The hex key id a CSR's key will carry as subjectKeyIdentifier (rcgen's
/// method: SHA-256 of the public key, first 20 bytes), used to name a
/// pending authority before its certificate exists.
pub fn key_id(key: &KeyPair) -> String {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(key.der_bytes());
    hex::encode(&d[..20])
}

/// A new JWT signing key (ECDSA P-256, ES256): the journal record and the
/// PKCS#8 DER private key.
pub fn jwt_key(
    ttl: Duration,
    owner: &str,
    now: SystemTime,
) -> Result<(Authority, Vec<u8>), CaError> {
    let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
        .map_err(|_| CaError::Invalid("cannot generate JWT key".into()))?;
    let pkcs8 = doc.as_ref().to_vec();
    let signer = super::JwtSigner::from_pkcs8(&pkcs8, SystemTime::UNIX_EPOCH)?;
    let rec = Authority {
        id: signer.kid().to_string(),
        kind: JWT.into(),
        owner: owner.into(),
        state: "prepared".into(),
        public_key: signer.public_key_der().to_vec(),
        not_before: unix(now),
        not_after: unix(now + ttl),
        prepared_at: unix(now),
        origin: "self_signed".into(),
        revision: 1,
        ..Authority::default()
    };
    Ok((rec, pkcs8))
}

/// The public key (SPKI DER) of a certificate.
pub fn cert_public_key(der: &[u8]) -> Option<Vec<u8>> {
    X509Certificate::from_der(der)
        .ok()
        .map(|(_, c)| c.public_key().raw.to_vec())
}

/// The public key (SPKI DER) of a key pair.
pub fn key_public_key(key: &KeyPair) -> Vec<u8> {
    key.subject_public_key_info()
}
