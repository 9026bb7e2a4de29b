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

/// A SPIFFE bundle document read into a bundle, with the keys that were
/// ignored (and why) rather than refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    /// The usable X.509 authorities and JWT keys.
    pub bundle: Bundle,
    /// One line per ignored JWK: which one and why.
    pub ignored: Vec<String>,
}

/// OIDs (DER content bytes) used in SubjectPublicKeyInfo.
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_P521: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x23];
const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];

/// The named curves a JWK may use: (crv, OID, coordinate length).
const CURVES: [(&str, &[u8], usize); 3] = [
    ("P-256", OID_P256, 32),
    ("P-384", OID_P384, 48),
    ("P-521", OID_P521, 66),
];

/// One DER TLV.
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(content);
    out
}

/// A DER INTEGER of an unsigned big-endian magnitude.
fn der_uint(magnitude: &[u8]) -> Vec<u8> {
    let trimmed: &[u8] = match magnitude.iter().position(|b| *b != 0) {
        Some(i) => &magnitude[i..],
        None => &[0],
    };
    let mut c = Vec::with_capacity(trimmed.len() + 1);
    if trimmed[0] & 0x80 != 0 {
        c.push(0);
    }
    c.extend_from_slice(trimmed);
    der(0x02, &c)
}

fn spki(algorithm: &[u8], key: &[u8]) -> Vec<u8> {
    let mut bits = vec![0u8];
    bits.extend_from_slice(key);
    let mut body = der(0x30, algorithm);
    body.extend(der(0x03, &bits));
    der(0x30, &body)
}

/// The SubjectPublicKeyInfo DER of a JWK's public key (RFC 7518 §6.2, §6.3):
/// EC P-256/P-384/P-521 or RSA. `Err` says why the key is not usable.
fn spki_of_jwk(k: &serde_json::Map<String, Value>) -> Result<Vec<u8>, String> {
    let field = |name: &str| -> Result<Vec<u8>, String> {
        let v = k
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("no {name:?}"))?;
        URL_SAFE_NO_PAD
            .decode(v)
            .map_err(|e| format!("{name:?} is not base64url: {e}"))
    };
    match k.get("kty").and_then(Value::as_str) {
        Some("EC") => {
            let crv = k.get("crv").and_then(Value::as_str).unwrap_or_default();
            let (_, oid, len) = CURVES
                .iter()
                .find(|(name, _, _)| *name == crv)
                .ok_or_else(|| format!("unsupported EC curve {crv:?}"))?;
            let (x, y) = (field("x")?, field("y")?);
            if x.len() != *len || y.len() != *len {
                return Err(format!("x/y are not {len} bytes for {crv}"));
            }
            let mut point = vec![4u8];
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            let mut alg = der(0x06, OID_EC_PUBLIC_KEY);
            alg.extend(der(0x06, oid));
            Ok(spki(&alg, &point))
        }
        Some("RSA") => {
            let (n, e) = (field("n")?, field("e")?);
            if n.len() < 256 {
                return Err(format!("RSA modulus of {} bits is too small", n.len() * 8));
            }
            let mut body = der_uint(&n);
            body.extend(der_uint(&e));
            let rsa_key = der(0x30, &body);
            let mut alg = der(0x06, OID_RSA);
            alg.extend(der(0x05, &[]));
            Ok(spki(&alg, &rsa_key))
        }
        Some(other) => Err(format!("unknown key type {other:?}")),
        None => Err("no \"kty\"".into()),
    }
}

/// The JWK parameters of a public key: EC (P-256, P-384, P-521) or RSA.
fn jwk_of_spki(spki: &SubjectPublicKeyInfo<'_>) -> Result<serde_json::Map<String, Value>, String> {
    let mut m = serde_json::Map::new();
    match spki.parsed().map_err(|e| format!("public key: {e}"))? {
        PublicKey::EC(point) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .ok_or("EC key without a named curve")?;
            let (crv, _, len) = CURVES
                .iter()
                .find(|(_, oid, _)| curve.as_bytes() == *oid)
                .ok_or_else(|| format!("EC curve {curve} has no JWK name"))?;
            let d = point.data();
            if d.len() != 1 + 2 * len || d[0] != 4 {
                return Err(format!("{crv} point is not uncompressed"));
            }
            m.insert("kty".into(), "EC".into());
            m.insert("crv".into(), (*crv).into());
            m.insert("x".into(), URL_SAFE_NO_PAD.encode(&d[1..=*len]).into());
            m.insert("y".into(), URL_SAFE_NO_PAD.encode(&d[1 + len..]).into());
        }
        PublicKey::RSA(rsa) => {
            m.insert("kty".into(), "RSA".into());
            let n = rsa.modulus.strip_prefix(&[0u8][..]).unwrap_or(rsa.modulus);
            m.insert("n".into(), URL_SAFE_NO_PAD.encode(n).into());
            m.insert("e".into(), URL_SAFE_NO_PAD.encode(rsa.exponent).into());
        }
        _ => {
            return Err(format!(
                "key algorithm {} has no JWK form here",
                spki.algorithm.algorithm
            ));
        }
    }
    Ok(m)
}

/// The SPIFFE bundle JSON document of a bundle (Trust Domain and Bundle §4;
/// X509-SVID §6.1: `x5c`, no `kid`; JWT-SVID §6.1: `kid`). Every authority
/// is encoded — EC P-256/P-384/P-521 and RSA — and one that cannot be is an
/// error rather than left out.
pub fn to_spiffe_json(b: &Bundle) -> Result<Value, BundleFormatError> {
    let mut keys = Vec::new();
    for (i, der) in b.x509_authorities.iter().enumerate() {
        let (_, c) = X509Certificate::from_der(der).map_err(|e| {
            BundleFormatError::UnsupportedKey(format!("X.509 authority #{i} does not parse: {e}"))
        })?;
        let mut k = jwk_of_spki(c.public_key()).map_err(|e| {
            BundleFormatError::UnsupportedKey(format!("X.509 authority {}: {e}", c.subject()))
        })?;
        k.insert("use".into(), "x509-svid".into());
        k.insert("x5c".into(), json!([STANDARD.encode(der)]));
        keys.push(Value::Object(k));
    }
    for jk in &b.jwt_authorities {
        let (_, spki) = SubjectPublicKeyInfo::from_der(&jk.public_key).map_err(|e| {
            BundleFormatError::UnsupportedKey(format!("JWT key {:?}: {e}", jk.key_id))
        })?;
        let mut k = jwk_of_spki(&spki).map_err(|e| {
            BundleFormatError::UnsupportedKey(format!("JWT key {:?}: {e}", jk.key_id))
        })?;
        k.insert("use".into(), "jwt-svid".into());
        k.insert("kid".into(), jk.key_id.clone().into());
        keys.push(Value::Object(k));
    }
    Ok(json!({
        "keys": keys,
        "spiffe_sequence": b.sequence_number,
        "spiffe_refresh_hint": b.refresh_hint,
    }))
}

/// PEM of the bundle's X.509 authorities.
pub fn to_pem(b: &Bundle) -> String {
    meshid_identity::pem::encode_certs(b.x509_authorities.iter().map(Vec::as_slice))
}

/// Parses PEM certificates or SPIFFE bundle JSON into a bundle for `td`;
/// ignored keys are logged.
pub fn parse(td: &str, data: &[u8]) -> Result<Bundle, BundleFormatError> {
    let p = parse_with_notes(td, data)?;
    for why in &p.ignored {
        tracing::warn!(trust_domain = td, "bundle key ignored: {why}");
    }
    Ok(p.bundle)
}

/// Parses PEM certificates or SPIFFE bundle JSON into a bundle for `td`,
/// following Trust Domain and Bundle §4.1.3 and §4.2 (a key with an unknown
/// or missing `use` or `kty` is ignored, not the bundle refused), X509-SVID
/// §6.2 (an `x509-svid` key without `x5c` is ignored; of several `x5c`
/// values the first counts) and JWT-SVID §6.1/§6.2 (`jwt-svid` keys with a
/// `kid`; RSA and EC P-256/P-384/P-521). An empty `keys` array is a valid,
/// empty bundle: the trust domain vouches for nothing.
pub fn parse_with_notes(td: &str, data: &[u8]) -> Result<Parsed, BundleFormatError> {
    let text = String::from_utf8_lossy(data);
    if !text.trim_start().starts_with('{') {
        let certs = meshid_identity::pem::parse_certs(data)
            .map_err(|e| BundleFormatError::Unrecognized(e.to_string()))?;
        let bundle = Bundle {
            trust_domain: td.into(),
            x509_authorities: certs.into_iter().map(|c| c.to_vec()).collect(),
            ..Bundle::default()
        };
        check_x509_authorities(&bundle)?;
        return Ok(Parsed {
            bundle,
            ignored: Vec::new(),
        });
    }
    let v: Value = serde_json::from_slice(data)
        .map_err(|e| BundleFormatError::Unrecognized(format!("JSON: {e}")))?;
    let keys = v
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| BundleFormatError::Unrecognized("JSON has no \"keys\" array".into()))?;
    let int = |name: &str| -> Result<i64, BundleFormatError> {
        match v.get(name) {
            None | Some(Value::Null) => Ok(0),
            Some(n) => n.as_i64().ok_or_else(|| {
                BundleFormatError::Unrecognized(format!("{name} is not an integer"))
            }),
        }
    };
    let mut out = Parsed {
        bundle: Bundle {
            trust_domain: td.into(),
            sequence_number: int("spiffe_sequence")?,
            refresh_hint: int("spiffe_refresh_hint")?,
            ..Bundle::default()
        },
        ignored: Vec::new(),
    };
    for (i, k) in keys.iter().enumerate() {
        let Some(k) = k.as_object() else {
            out.ignored.push(format!("key #{i}: not a JSON object"));
            continue;
        };
        let name = match k.get("kid").and_then(Value::as_str) {
            Some(kid) => format!("key #{i} (kid {kid:?})"),
            None => format!("key #{i}"),
        };
        match k.get("use").and_then(Value::as_str) {
            Some("x509-svid") => {
                if !matches!(
                    k.get("kty").and_then(Value::as_str),
                    Some("EC" | "RSA" | "OKP")
                ) {
                    out.ignored.push(format!(
                        "{name}: x509-svid key with a missing or unknown kty"
                    ));
                    continue;
                }
                let Some(first) = k
                    .get("x5c")
                    .and_then(Value::as_array)
                    .and_then(|a| a.first())
                else {
                    out.ignored.push(format!(
                        "{name}: x509-svid key without x5c (X509-SVID §6.2)"
                    ));
                    continue;
                };
                match first.as_str().map(|s| STANDARD.decode(s)) {
                    Some(Ok(der)) if matches!(X509Certificate::from_der(&der), Ok(([], _))) => {
                        out.bundle.x509_authorities.push(der);
                    }
                    _ => out
                        .ignored
                        .push(format!("{name}: x5c[0] is not one base64 DER certificate")),
                }
            }
            Some("jwt-svid") => {
                let Some(kid) = k
                    .get("kid")
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                else {
                    out.ignored
                        .push(format!("{name}: jwt-svid key without kid (JWT-SVID §6.1)"));
                    continue;
                };
                match spki_of_jwk(k) {
                    Ok(public_key) => out.bundle.jwt_authorities.push(JwtKey {
                        key_id: kid.into(),
                        public_key,
                        expires_at: 0,
                    }),
                    Err(why) => out.ignored.push(format!("{name}: {why}")),
                }
            }
            Some(other) => out.ignored.push(format!("{name}: unknown use {other:?}")),
            None => out.ignored.push(format!("{name}: no use")),
        }
    }
    Ok(out)
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
        // In SPIFFE JSON an unusable key is ignored and reported (Trust
        // Domain and Bundle §4.2), never stored as a root.
        let json =
            json!({"keys": [{"use": "x509-svid", "kty": "EC", "x5c": [STANDARD.encode(b"junk")]}]});
        let p = parse_with_notes("other.org", json.to_string().as_bytes()).expect("parsed");
        assert!(p.bundle.x509_authorities.is_empty());
        assert!(
            p.ignored
                .iter()
                .any(|w| w.contains("not one base64 DER certificate")),
            "{:?}",
            p.ignored
        );
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
        let doc = to_spiffe_json(&b).expect("encode").to_string();
        let back = parse("other.org", doc.as_bytes()).expect("parse");
        assert_eq!(back, b);
        let from_pem = parse("other.org", to_pem(&b).as_bytes()).expect("pem");
        assert_eq!(from_pem.x509_authorities, b.x509_authorities);
        assert!(parse("x", b"garbage").is_err());
    }

    fn root(alg: &'static rcgen::SignatureAlgorithm) -> (Vec<u8>, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate_for(alg).expect("key");
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        (p.self_signed(&key).expect("cert").der().to_vec(), key)
    }

    fn rsa_spki() -> Vec<u8> {
        use aws_lc_rs::encoding::AsDer as _;
        use aws_lc_rs::signature::KeyPair as _;
        let k = aws_lc_rs::signature::RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
            .expect("rsa");
        k.public_key().as_der().expect("der").as_ref().to_vec()
    }

    /// X509-SVID §6.1 ("each entry representing an X509-SVID CA certificate
    /// MUST contain the `x5c` parameter"), JWT-SVID §6.1 (`kid` MUST be set):
    /// P-256, P-384 and RSA roots and JWT keys are all encoded — none is
    /// silently left out — and read back to the same bytes.
    #[test]
    fn p384_and_rsa_authorities_round_trip() {
        use rcgen::PublicKeyData as _;
        let (p256, _) = root(&rcgen::PKCS_ECDSA_P256_SHA256);
        let (p384, p384_key) = root(&rcgen::PKCS_ECDSA_P384_SHA384);
        let rsa_pem = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .output()
            .ok()
            .filter(|o| o.status.success());
        let mut roots = vec![p256, p384];
        if let Some(o) = rsa_pem {
            let key = rcgen::KeyPair::from_pem(&String::from_utf8_lossy(&o.stdout)).expect("rsa");
            let mut p = rcgen::CertificateParams::default();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            roots.push(p.self_signed(&key).expect("cert").der().to_vec());
        } else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "openssl missing in CI"
            );
            eprintln!("openssl not found: the RSA root case is skipped");
        }
        let b = Bundle {
            trust_domain: "spire.example".into(),
            x509_authorities: roots.clone(),
            jwt_authorities: vec![
                JwtKey {
                    key_id: "rsa".into(),
                    public_key: rsa_spki(),
                    expires_at: 0,
                },
                JwtKey {
                    key_id: "p384".into(),
                    public_key: p384_key.subject_public_key_info(),
                    expires_at: 0,
                },
            ],
            sequence_number: 3,
            refresh_hint: 60,
        };
        let doc = to_spiffe_json(&b).expect("encode");
        let keys = doc["keys"].as_array().expect("keys");
        assert_eq!(keys.len(), roots.len() + 2);
        assert_eq!(keys[1]["crv"], "P-384");
        assert!(
            keys.iter()
                .take(roots.len())
                .all(|k| k.get("kid").is_none())
        );
        let back = parse_with_notes("spire.example", doc.to_string().as_bytes()).expect("parse");
        assert!(back.ignored.is_empty(), "{:?}", back.ignored);
        assert_eq!(back.bundle, b);
    }

    /// Trust Domain and Bundle §4.1.3 ("Clients encountering unknown key
    /// types or uses MUST ignore the corresponding JWK element"), §4.2.2
    /// (a missing `use` likewise), X509-SVID §6.2 ("If `x5c` is not set, or
    /// is empty, then the entry MUST be ignored"; "all but the first MUST be
    /// ignored"): a SPIRE-shaped document with such keys keeps its usable
    /// keys, and the ignored ones are reported.
    #[test]
    fn unknown_and_incomplete_keys_are_ignored_not_fatal() {
        let (ca, _) = root(&rcgen::PKCS_ECDSA_P256_SHA256);
        let (other, _) = root(&rcgen::PKCS_ECDSA_P256_SHA256);
        let rsa = rsa_spki();
        let (_, spki) = SubjectPublicKeyInfo::from_der(&rsa).expect("spki");
        let mut jwk = jwk_of_spki(&spki).expect("jwk");
        jwk.insert("use".into(), "jwt-svid".into());
        jwk.insert("kid".into(), "spire-rsa".into());
        jwk.insert("alg".into(), "RS256".into());
        let doc = json!({
            "keys": [
                {"use": "x509-svid", "kty": "EC", "crv": "P-256", "x": "AA", "y": "AA",
                 "x5c": [STANDARD.encode(&ca), STANDARD.encode(&other)]},
                Value::Object(jwk),
                {"use": "wit-svid", "kty": "OKP", "crv": "Ed25519", "x": "AA", "kid": "w"},
                {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "kid": "no-use"},
                {"use": "x509-svid", "kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"},
                {"use": "x509-svid", "kty": "EC", "x5c": []},
                {"use": "jwt-svid", "kty": "OKP", "crv": "Ed25519", "x": "AA", "kid": "ed"},
                {"use": "jwt-svid", "kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"},
                {"use": "x509-svid", "kty": "Unknown", "x5c": [STANDARD.encode(&ca)]},
                "not an object"
            ],
            "spiffe_sequence": 12,
            "spiffe_refresh_hint": 300
        });
        let p = parse_with_notes("spire.example", doc.to_string().as_bytes()).expect("parse");
        assert_eq!(p.bundle.x509_authorities, vec![ca]);
        assert_eq!(p.bundle.jwt_authorities.len(), 1);
        assert_eq!(p.bundle.jwt_authorities[0].key_id, "spire-rsa");
        assert_eq!(p.bundle.jwt_authorities[0].public_key, rsa);
        assert_eq!(p.bundle.sequence_number, 12);
        assert_eq!(p.ignored.len(), 8, "{:#?}", p.ignored);
        assert!(
            p.ignored
                .iter()
                .any(|w| w.contains("unknown use \"wit-svid\""))
        );
        assert!(p.ignored.iter().any(|w| w.contains("no use")));
        assert!(p.ignored.iter().any(|w| w.contains("without x5c")));
    }

    /// Trust Domain and Bundle §4.1.3: "The `keys` parameter may contain an
    /// empty array" — a valid bundle that trusts nothing; `keys` itself
    /// MUST be present.
    #[test]
    fn empty_key_set_is_a_valid_bundle() {
        let p = parse_with_notes("gone.example", br#"{"keys": [], "spiffe_sequence": 9}"#)
            .expect("empty bundle");
        assert!(p.bundle.x509_authorities.is_empty());
        assert!(p.bundle.jwt_authorities.is_empty());
        assert_eq!(p.bundle.sequence_number, 9);
        assert!(parse("x", br#"{"spiffe_sequence": 1}"#).is_err());
        assert!(parse("x", br#"{"keys": [], "spiffe_sequence": "1"}"#).is_err());
    }
}
