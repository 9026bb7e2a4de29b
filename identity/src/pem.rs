//! PEM encoding and decoding of certificates and private keys.

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// Errors from PEM decoding.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PemError {
    /// The input holds no PEM block of the expected kind.
    #[error("no {0} found in PEM input")]
    Missing(&'static str),
    /// The PEM input is malformed.
    #[error("malformed PEM: {0}")]
    Malformed(String),
}

/// Decodes every `CERTIFICATE` block.
pub fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::Malformed(e.to_string()))?;
    if certs.is_empty() {
        return Err(PemError::Missing("certificate"));
    }
    Ok(certs)
}

/// Decodes the first private key block (PKCS#8, SEC1 or PKCS#1).
pub fn parse_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => PemError::Missing("private key"),
        other => PemError::Malformed(other.to_string()),
    })
}

/// Encodes DER certificates as concatenated `CERTIFICATE` PEM blocks.
pub fn encode_certs<'a>(ders: impl IntoIterator<Item = &'a [u8]>) -> String {
    ders.into_iter().map(|d| encode("CERTIFICATE", d)).collect()
}

/// Encodes one DER blob as a PEM block with the given label.
pub fn encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
