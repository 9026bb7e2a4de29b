//! Trust bundle formats for operators: PEM, and the SPIFFE bundle format
//! (a JWKS with `use` = `x509-svid` / `jwt-svid`, `spiffe_sequence` and
//! `spiffe_refresh_hint`).

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use meshid_proto::types::{Bundle, JwtKey};
use serde_json::{Value, json};
use x509_parser::prelude::*;
use x509_parser::public_key::PublicKey;

/// Bundle conversion failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleFormatError {
    /// Neither PEM certificates nor SPIFFE bundle JSON.
    #[error("not a PEM certificate bundle nor SPIFFE bundle JSON: {0}")]
    Unrecognized(String),
    /// A key of the JWKS cannot be used.
    #[error("unsupported key in bundle: {0}")]
    UnsupportedKey(String),
}

/// DER SubjectPublicKeyInfo prefix of an uncompressed P-256 point
/// (id-ecPublicKey, prime256v1, BIT STRING of 66 bytes).
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

fn jwk_of_spki(spki: &SubjectPublicKeyInfo<'_>) -> Option<serde_json::Map<String, Value>> {
    let mut m = serde_json::Map::new();
    match spki.parsed().ok()? {
        PublicKey::EC(point) => {
            let d = point.data();
            if d.len() != 65 || d[0] != 4 {
                return None;
            }
            m.insert("kty".into(), "EC".into());
            m.insert("crv".into(), "P-256".into());
            m.insert("x".into(), URL_SAFE_NO_PAD.encode(&d[1..33]).into());
            m.insert("y".into(), URL_SAFE_NO_PAD.encode(&d[33..]).into());
        }
        PublicKey::RSA(rsa) => {
            m.insert("kty".into(), "RSA".into());
            let n = rsa.modulus.strip_prefix(&[0u8][..]).unwrap_or(rsa.modulus);
            m.insert("n".into(), URL_SAFE_NO_PAD.encode(n).into());
            m.insert("e".into(), URL_SAFE_NO_PAD.encode(rsa.exponent).into());
        }
        _ => return None,
    }
    Some(m)
}

/// The SPIFFE bundle JSON document of a bundle.
pub fn to_spiffe_json(b: &Bundle) -> Value {
    let mut keys = Vec::new();
    for der in &b.x509_authorities {
        if let Ok((_, c)) = X509Certificate::from_der(der)
            && let Some(mut k) = jwk_of_spki(c.public_key())
        {
            k.insert("use".into(), "x509-svid".into());
            k.insert("x5c".into(), json!([STANDARD.encode(der)]));
            keys.push(Value::Object(k));
        }
    }
    for jk in &b.jwt_authorities {
        if let Ok((_, spki)) = SubjectPublicKeyInfo::from_der(&jk.public_key)
            && let Some(mut k) = jwk_of_spki(&spki)
        {
            k.insert("use".into(), "jwt-svid".into());
            k.insert("kid".into(), jk.key_id.clone().into());
            keys.push(Value::Object(k));
        }
    }
    json!({
        "keys": keys,
        "spiffe_sequence": b.sequence_number,
        "spiffe_refresh_hint": b.refresh_hint,
    })
}

/// PEM of the bundle's X.509 authorities.
pub fn to_pem(b: &Bundle) -> String {
    meshid_identity::pem::encode_certs(b.x509_authorities.iter().map(Vec::as_slice))
}

/// Parses PEM certificates or SPIFFE bundle JSON into a bundle for `td`.
pub fn parse(td: &str, data: &[u8]) -> Result<Bundle, BundleFormatError> {
    let text = String::from_utf8_lossy(data);
    if text.trim_start().starts_with('{') {
        let v: Value = serde_json::from_slice(data)
            .map_err(|e| BundleFormatError::Unrecognized(format!("JSON: {e}")))?;
        let keys = v
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| BundleFormatError::Unrecognized("JSON has no \"keys\" array".into()))?;
        let mut b = Bundle {
            trust_domain: td.into(),
            sequence_number: v
                .get("spiffe_sequence")
                .and_then(Value::as_i64)
                .unwrap_or(0),
            refresh_hint: v
                .get("spiffe_refresh_hint")
                .and_then(Value::as_i64)
                .unwrap_or(0),
            ..Bundle::default()
        };
        for k in keys {
            match k.get("use").and_then(Value::as_str) {
                Some("x509-svid") => {
                    let x5c = k
                        .get("x5c")
                        .and_then(Value::as_array)
                        .and_then(|a| a.first())
                        .and_then(Value::as_str)
                        .ok_or_else(|| {
                            BundleFormatError::UnsupportedKey("x509-svid key without x5c".into())
                        })?;
                    b.x509_authorities.push(
                        STANDARD
                            .decode(x5c)
                            .map_err(|e| BundleFormatError::UnsupportedKey(format!("x5c: {e}")))?,
                    );
                }
                Some("jwt-svid") => {
                    let kid = k.get("kid").and_then(Value::as_str).unwrap_or_default();
                    let (Some("EC"), Some("P-256"), Some(x), Some(y)) = (
                        k.get("kty").and_then(Value::as_str),
                        k.get("crv").and_then(Value::as_str),
                        k.get("x").and_then(Value::as_str),
                        k.get("y").and_then(Value::as_str),
                    ) else {
                        return Err(BundleFormatError::UnsupportedKey(format!(
                            "jwt-svid key {kid:?}: only EC P-256 keys are supported"
                        )));
                    };
                    let (x, y) = (URL_SAFE_NO_PAD.decode(x), URL_SAFE_NO_PAD.decode(y));
                    let (Ok(x), Ok(y)) = (x, y) else {
                        return Err(BundleFormatError::UnsupportedKey(format!(
                            "jwt-svid key {kid:?}: bad x/y"
                        )));
                    };
                    if x.len() != 32 || y.len() != 32 {
                        return Err(BundleFormatError::UnsupportedKey(format!(
                            "jwt-svid key {kid:?}: bad x/y length"
                        )));
                    }
                    let mut der = P256_SPKI_PREFIX.to_vec();
                    der.push(4);
                    der.extend_from_slice(&x);
                    der.extend_from_slice(&y);
                    b.jwt_authorities.push(JwtKey {
                        key_id: kid.into(),
                        public_key: der,
                        expires_at: 0,
                    });
                }
                other => {
                    return Err(BundleFormatError::UnsupportedKey(format!(
                        "unknown key use {other:?}"
                    )));
                }
            }
        }
        check_x509_authorities(&b)?;
        Ok(b)
    } else {
        let certs = meshid_identity::pem::parse_certs(data)
            .map_err(|e| BundleFormatError::Unrecognized(e.to_string()))?;
        let b = Bundle {
            trust_domain: td.into(),
            x509_authorities: certs.into_iter().map(|c| c.to_vec()).collect(),
            ..Bundle::default()
        };
        check_x509_authorities(&b)?;
        Ok(b)
    }
}

/// Every X.509 authority must be one whole certificate: a PEM block or an
/// `x5c` entry holding anything else would be stored and handed to every
/// agent and sidecar as a root.
fn check_x509_authorities(b: &Bundle) -> Result<(), BundleFormatError> {
    for (i, der) in b.x509_authorities.iter().enumerate() {
        match X509Certificate::from_der(der) {
            Ok(([], _)) => {}
            Ok(_) => {
                return Err(BundleFormatError::UnsupportedKey(format!(
                    "X.509 authority {} has trailing bytes after the certificate",
                    i + 1
                )));
            }
            Err(e) => {
                return Err(BundleFormatError::UnsupportedKey(format!(
                    "X.509 authority {} is not an X.509 certificate: {e}",
                    i + 1
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_that_are_not_certificates_are_refused() {
        let pem = meshid_identity::pem::encode("CERTIFICATE", b"not a certificate");
        let e = parse("other.org", pem.as_bytes()).expect_err("garbage PEM accepted");
        assert!(e.to_string().contains("not an X.509 certificate"), "{e}");
        let json = json!({"keys": [{"use": "x509-svid", "x5c": [STANDARD.encode(b"junk")]}]});
        let e = parse("other.org", json.to_string().as_bytes()).expect_err("garbage x5c accepted");
        assert!(e.to_string().contains("not an X.509 certificate"), "{e}");
    }

    #[test]
    fn spiffe_json_round_trips() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = p.self_signed(&key).expect("cert");
        use rcgen::PublicKeyData as _;
        let b = Bundle {
            trust_domain: "other.org".into(),
            x509_authorities: vec![cert.der().to_vec()],
            jwt_authorities: vec![JwtKey {
                key_id: "k1".into(),
                public_key: key.subject_public_key_info(),
                expires_at: 0,
            }],
            sequence_number: 7,
            refresh_hint: 300,
        };
        let doc = to_spiffe_json(&b).to_string();
        let back = parse("other.org", doc.as_bytes()).expect("parse");
        assert_eq!(back, b);
        let from_pem = parse("other.org", to_pem(&b).as_bytes()).expect("pem");
        assert_eq!(from_pem.x509_authorities, b.x509_authorities);
        assert!(parse("x", b"garbage").is_err());
    }
}
