//! JWT bundles as JWKS documents, and JWT-SVID validation.
//!
//! Validation follows the JWT-SVID standard: the token's `sub` is parsed
//! first, and only the JWT authorities of *that* trust domain are tried
//! (a key of another trust domain, even one with the same `kid`, never
//! vouches for it); `alg` is one of RFC 7518 §3.3–3.5 (RS256/384/512,
//! ES256/384/512, PS256/384/512) and must suit the key's type; `typ`, when
//! present, is `JWT` or `JOSE`; a `crit` header is refused (no extension is
//! understood, RFC 7515 §4.1.11); `exp` is required and, like `nbf`, must be
//! an integer NumericDate; `nbf` in the future is refused.

use std::time::SystemTime;

use aws_lc_rs::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use meshid_proto::types::{Bundle, JwtKey};
use serde_json::{Map, Value, json};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
    OID_PKCS1_RSAENCRYPTION,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

/// Why a JWT-SVID is not valid.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum JwtError {
    /// Not a JWS compact serialization with JSON object parts.
    #[error("malformed JWT: {0}")]
    Malformed(String),
    /// `alg` not among RFC 7518 §3.3–3.5.
    #[error("unsupported JWT algorithm {0:?}")]
    Algorithm(String),
    /// `typ` present and neither `JWT` nor `JOSE`.
    #[error("JWT typ {0:?} is neither JWT nor JOSE")]
    Type(String),
    /// A `crit` header: extensions that must be understood, and none are.
    #[error("JWT has critical header parameters {0} that are not understood")]
    Critical(String),
    /// No bundle for the trust domain of `sub`.
    #[error("no JWT bundle for trust domain {0:?}")]
    UnknownTrustDomain(String),
    /// No key of the `sub` trust domain with this kid suits the algorithm.
    #[error("no key {kid:?} for {alg} in the bundle of {trust_domain:?}")]
    UnknownKey {
        /// Trust domain of `sub`.
        trust_domain: String,
        /// The token's kid (empty when absent).
        kid: String,
        /// The token's alg.
        alg: &'static str,
    },
    /// Signature does not verify.
    #[error("JWT signature does not verify")]
    BadSignature,
    /// Past exp.
    #[error("JWT-SVID has expired")]
    Expired,
    /// Before nbf.
    #[error("JWT-SVID is not valid yet (nbf)")]
    NotYetValid,
    /// Audience not present.
    #[error("audience {0:?} not in the JWT-SVID")]
    Audience(String),
    /// sub is not a SPIFFE ID.
    #[error("sub is not a SPIFFE ID")]
    Subject,
}

/// A JWS algorithm of RFC 7518 §3.3 (RS), §3.4 (ES) and §3.5 (PS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alg {
    Rs256,
    Rs384,
    Rs512,
    Es256,
    Es384,
    Es512,
    Ps256,
    Ps384,
    Ps512,
}

/// Key types the algorithms need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyType {
    Rsa,
    P256,
    P384,
    P521,
}

impl Alg {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "RS256" => Self::Rs256,
            "RS384" => Self::Rs384,
            "RS512" => Self::Rs512,
            "ES256" => Self::Es256,
            "ES384" => Self::Es384,
            "ES512" => Self::Es512,
            "PS256" => Self::Ps256,
            "PS384" => Self::Ps384,
            "PS512" => Self::Ps512,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Rs384 => "RS384",
            Self::Rs512 => "RS512",
            Self::Es256 => "ES256",
            Self::Es384 => "ES384",
            Self::Es512 => "ES512",
            Self::Ps256 => "PS256",
            Self::Ps384 => "PS384",
            Self::Ps512 => "PS512",
        }
    }

    fn key_type(self) -> KeyType {
        match self {
            Self::Es256 => KeyType::P256,
            Self::Es384 => KeyType::P384,
            Self::Es512 => KeyType::P521,
            _ => KeyType::Rsa,
        }
    }

    fn verification(self) -> &'static dyn VerificationAlgorithm {
        match self {
            Self::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
            Self::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
            Self::Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
            Self::Es256 => &signature::ECDSA_P256_SHA256_FIXED,
            Self::Es384 => &signature::ECDSA_P384_SHA384_FIXED,
            Self::Es512 => &signature::ECDSA_P521_SHA512_FIXED,
            Self::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
            Self::Ps384 => &signature::RSA_PSS_2048_8192_SHA384,
            Self::Ps512 => &signature::RSA_PSS_2048_8192_SHA512,
        }
    }
}

/// A bundle key, parsed from its SubjectPublicKeyInfo.
struct ParsedKey {
    key_type: KeyType,
    /// The subjectPublicKey: an uncompressed EC point, or a PKCS#1
    /// RSAPublicKey.
    raw: Vec<u8>,
    /// JWK members of the public key (`kty`, `crv`/`x`/`y` or `n`/`e`).
    jwk: Map<String, Value>,
}

fn unsigned(b: &[u8]) -> &[u8] {
    let first = b.iter().position(|x| *x != 0).unwrap_or(b.len());
    &b[first..]
}

fn parse_key(spki_der: &[u8]) -> Option<ParsedKey> {
    let (rest, spki) = SubjectPublicKeyInfo::from_der(spki_der).ok()?;
    if !rest.is_empty() {
        return None;
    }
    let raw = spki.subject_public_key.data.to_vec();
    let alg = &spki.algorithm;
    let mut jwk = Map::new();
    let key_type = if alg.algorithm == OID_PKCS1_RSAENCRYPTION {
        let Ok(PublicKey::RSA(rsa)) = spki.parsed() else {
            return None;
        };
        jwk.insert("kty".into(), "RSA".into());
        jwk.insert(
            "n".into(),
            URL_SAFE_NO_PAD.encode(unsigned(rsa.modulus)).into(),
        );
        jwk.insert(
            "e".into(),
            URL_SAFE_NO_PAD.encode(unsigned(rsa.exponent)).into(),
        );
        KeyType::Rsa
    } else if alg.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = alg.parameters.as_ref()?.as_oid().ok()?;
        let (key_type, crv, len) = if curve == OID_EC_P256 {
            (KeyType::P256, "P-256", 32)
        } else if curve == OID_NIST_EC_P384 {
            (KeyType::P384, "P-384", 48)
        } else if curve == OID_NIST_EC_P521 {
            (KeyType::P521, "P-521", 66)
        } else {
            return None;
        };
        if raw.len() != 1 + 2 * len || raw[0] != 4 {
            return None;
        }
        jwk.insert("kty".into(), "EC".into());
        jwk.insert("crv".into(), crv.into());
        jwk.insert("x".into(), URL_SAFE_NO_PAD.encode(&raw[1..=len]).into());
        jwk.insert("y".into(), URL_SAFE_NO_PAD.encode(&raw[1 + len..]).into());
        key_type
    } else {
        return None;
    };
    Some(ParsedKey { key_type, raw, jwk })
}

/// JWKS document of a bundle's JWT authorities (RSA and EC P-256, P-384 and
/// P-521 keys; keys of another type are left out).
pub fn jwks(b: &Bundle) -> Vec<u8> {
    let keys: Vec<Value> = b
        .jwt_authorities
        .iter()
        .filter_map(|k| {
            let mut jwk = parse_key(&k.public_key)?.jwk;
            jwk.insert("use".into(), "jwt-svid".into());
            jwk.insert("kid".into(), k.key_id.clone().into());
            Some(Value::Object(jwk))
        })
        .collect();
    json!({ "keys": keys }).to_string().into_bytes()
}

fn part(s: &str, what: &str) -> Result<Map<String, Value>, JwtError> {
    let raw = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|e| JwtError::Malformed(format!("{what}: {e}")))?;
    match serde_json::from_slice(&raw) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(JwtError::Malformed(format!("{what} is not a JSON object"))),
        Err(e) => Err(JwtError::Malformed(format!("{what}: {e}"))),
    }
}

/// An optional integer NumericDate claim; any other JSON type is invalid.
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<i64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| JwtError::Malformed(format!("{name} is not an integer"))),
        Some(_) => Err(JwtError::Malformed(format!("{name} is not a number"))),
    }
}

/// Validates a JWT-SVID for `audience` against `bundles` (the bundles the
/// caller may use); returns (sub, claims).
pub fn validate<'a>(
    token: &str,
    audience: &str,
    bundles: impl IntoIterator<Item = &'a Bundle>,
    now: SystemTime,
) -> Result<(String, Value), JwtError> {
    let parts: Vec<&str> = token.split('.').collect();
    let [h, c, s] = parts.as_slice() else {
        return Err(JwtError::Malformed(
            "expected three dot-separated parts (JWS compact serialization)".into(),
        ));
    };
    let header = part(h, "header")?;
    let alg_name = match header.get("alg") {
        Some(Value::String(a)) => a.as_str(),
        _ => return Err(JwtError::Algorithm(String::new())),
    };
    let alg = Alg::parse(alg_name).ok_or_else(|| JwtError::Algorithm(alg_name.into()))?;
    match header.get("typ") {
        None => {}
        Some(Value::String(t)) if t == "JWT" || t == "JOSE" => {}
        Some(other) => {
            return Err(JwtError::Type(match other {
                Value::String(t) => t.clone(),
                v => v.to_string(),
            }));
        }
    }
    if let Some(crit) = header.get("crit") {
        return Err(JwtError::Critical(crit.to_string()));
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.as_str()),
        Some(_) => return Err(JwtError::Malformed("kid is not a string".into())),
    };
    let claims = part(c, "claims")?;

    // The trust domain of sub decides which keys may vouch for the token.
    let sub = match claims.get("sub") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(JwtError::Subject),
    };
    if crate::cache::spiffe_id_problem(&sub).is_some() {
        return Err(JwtError::Subject);
    }
    let id = spiffe::SpiffeId::new(&sub).map_err(|_| JwtError::Subject)?;
    let td = id.trust_domain_name();
    let bundle = bundles
        .into_iter()
        .find(|b| b.trust_domain == td)
        .ok_or_else(|| JwtError::UnknownTrustDomain(td.to_string()))?;
    let unix_now = meshid_identity::svid::unix(now);
    let usable = |k: &&JwtKey| {
        kid.is_none_or(|kid| k.key_id == kid) && (k.expires_at == 0 || k.expires_at > unix_now)
    };
    let keys: Vec<ParsedKey> = bundle
        .jwt_authorities
        .iter()
        .filter(usable)
        .filter_map(|k| parse_key(&k.public_key))
        .filter(|k| k.key_type == alg.key_type())
        .collect();
    if keys.is_empty() {
        return Err(JwtError::UnknownKey {
            trust_domain: td.to_string(),
            kid: kid.unwrap_or_default().to_string(),
            alg: alg.name(),
        });
    }
    let sig = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|e| JwtError::Malformed(format!("signature: {e}")))?;
    let signing_input = format!("{h}.{c}");
    if !keys.iter().any(|k| {
        UnparsedPublicKey::new(alg.verification(), &k.raw)
            .verify(signing_input.as_bytes(), &sig)
            .is_ok()
    }) {
        return Err(JwtError::BadSignature);
    }

    let exp = numeric_date(&claims, "exp")?.ok_or_else(|| JwtError::Malformed("no exp".into()))?;
    if exp <= unix_now {
        return Err(JwtError::Expired);
    }
    if let Some(nbf) = numeric_date(&claims, "nbf")?
        && nbf > unix_now
    {
        return Err(JwtError::NotYetValid);
    }
    let aud_ok = match claims.get("aud") {
        Some(Value::String(a)) => a == audience,
        Some(Value::Array(v)) if !v.is_empty() => {
            if v.iter().any(|a| !a.is_string()) {
                return Err(JwtError::Malformed("aud holds a non-string".into()));
            }
            v.iter().any(|a| a.as_str() == Some(audience))
        }
        _ => false,
    };
    if !aud_ok {
        return Err(JwtError::Audience(audience.into()));
    }
    Ok((sub, Value::Object(claims)))
}

/// serde_json → protobuf Struct value.
pub fn to_prost(v: &Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(to_prost).collect(),
        }),
        Value::Object(o) => Kind::StructValue(prost_types::Struct {
            fields: o.iter().map(|(k, v)| (k.clone(), to_prost(v))).collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::encoding::AsDer as _;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair as _, RsaKeyPair};
    use std::time::Duration;

    const NOW: u64 = 1_900_000_000;

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(NOW)
    }

    enum Signer {
        Ec(EcdsaKeyPair),
        Rsa(RsaKeyPair),
    }

    impl Signer {
        fn p256() -> Self {
            Self::ec(&signature::ECDSA_P256_SHA256_FIXED_SIGNING)
        }
        fn ec(alg: &'static signature::EcdsaSigningAlgorithm) -> Self {
            Self::Ec(EcdsaKeyPair::generate(alg).expect("ec key"))
        }
        fn rsa() -> Self {
            Self::Rsa(RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("rsa key"))
        }
        fn spki(&self) -> Vec<u8> {
            match self {
                Self::Ec(k) => k.public_key().as_der().expect("der").as_ref().to_vec(),
                Self::Rsa(k) => k.public_key().as_der().expect("der").as_ref().to_vec(),
            }
        }
        fn sign(&self, alg: &str, input: &[u8]) -> Vec<u8> {
            let rng = SystemRandom::new();
            match self {
                Self::Ec(k) => k.sign(&rng, input).expect("sign").as_ref().to_vec(),
                Self::Rsa(k) => {
                    let enc: &'static dyn signature::RsaEncoding = match alg {
                        "RS256" => &signature::RSA_PKCS1_SHA256,
                        "RS384" => &signature::RSA_PKCS1_SHA384,
                        "RS512" => &signature::RSA_PKCS1_SHA512,
                        "PS256" => &signature::RSA_PSS_SHA256,
                        "PS384" => &signature::RSA_PSS_SHA384,
                        _ => &signature::RSA_PSS_SHA512,
                    };
                    let mut sig = vec![0; k.public_modulus_len()];
                    k.sign(enc, &rng, input, &mut sig).expect("sign");
                    sig
                }
            }
        }
        /// A JWS over `header` and `claims`.
        fn token(&self, header: &Value, claims: &Value) -> String {
            let alg = header["alg"].as_str().unwrap_or("ES256");
            let input = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(header.to_string()),
                URL_SAFE_NO_PAD.encode(claims.to_string())
            );
            let sig = self.sign(alg, input.as_bytes());
            format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
        }
    }

    fn bundle(td: &str, keys: &[(&str, &Signer)]) -> Bundle {
        Bundle {
            trust_domain: td.into(),
            jwt_authorities: keys
                .iter()
                .map(|(kid, s)| JwtKey {
                    key_id: (*kid).into(),
                    public_key: s.spki(),
                    expires_at: 0,
                })
                .collect(),
            ..Bundle::default()
        }
    }

    fn claims(sub: &str) -> Value {
        json!({"sub": sub, "aud": ["svc"], "exp": NOW + 60, "iat": NOW})
    }

    /// JWT-SVID §2.1: "The alg header MUST be set to one of the values
    /// defined in RFC 7518 sections 3.3, 3.4, or 3.5". Trust Domain and
    /// Bundle §4.2 / issue 16 item 2: a SPIRE trust domain publishes RSA and
    /// other EC JWT authorities; tokens they sign validate, and the JWKS the
    /// agent serves carries them (an RSA key as `n`/`e` that verifies on its
    /// own).
    #[test]
    fn rsa_and_ec_algorithms_of_a_federated_bundle_validate() {
        let rsa = Signer::rsa();
        let p384 = Signer::ec(&signature::ECDSA_P384_SHA384_FIXED_SIGNING);
        let p521 = Signer::ec(&signature::ECDSA_P521_SHA512_FIXED_SIGNING);
        let p256 = Signer::p256();
        let spire = bundle(
            "spire.example",
            &[
                ("rsa", &rsa),
                ("p384", &p384),
                ("p521", &p521),
                ("p256", &p256),
            ],
        );
        let sub = "spiffe://spire.example/ns/default/sa/web";
        for (alg, kid, key) in [
            ("RS256", "rsa", &rsa),
            ("RS384", "rsa", &rsa),
            ("RS512", "rsa", &rsa),
            ("PS256", "rsa", &rsa),
            ("PS384", "rsa", &rsa),
            ("PS512", "rsa", &rsa),
            ("ES256", "p256", &p256),
            ("ES384", "p384", &p384),
            ("ES512", "p521", &p521),
        ] {
            let t = key.token(&json!({"alg": alg, "kid": kid, "typ": "JWT"}), &claims(sub));
            let (got, _) = validate(&t, "svc", [&spire], now()).unwrap_or_else(|e| {
                panic!("{alg}: {e}");
            });
            assert_eq!(got, sub, "{alg}");
        }
        // alg must suit the key: an RSA algorithm with an EC key is refused.
        let t = p384.token(&json!({"alg": "RS256", "kid": "p384"}), &claims(sub));
        assert!(matches!(
            validate(&t, "svc", [&spire], now()),
            Err(JwtError::UnknownKey { .. })
        ));
        // Unsupported algorithms (HS256, none) are refused.
        for alg in ["HS256", "none", "EdDSA"] {
            let t = p256.token(&json!({"alg": alg, "kid": "p256"}), &claims(sub));
            assert_eq!(
                validate(&t, "svc", [&spire], now()),
                Err(JwtError::Algorithm(alg.into()))
            );
        }

        // The JWKS served to workloads holds all four keys.
        let doc: Value = serde_json::from_slice(&jwks(&spire)).expect("json");
        let keys = doc["keys"].as_array().expect("keys");
        assert_eq!(keys.len(), 4);
        let rsa_jwk = keys.iter().find(|k| k["kid"] == "rsa").expect("rsa jwk");
        assert_eq!(rsa_jwk["kty"], "RSA");
        assert_eq!(rsa_jwk["use"], "jwt-svid");
        assert_eq!(
            keys.iter().find(|k| k["kid"] == "p384").expect("p384")["crv"],
            "P-384"
        );
        let n = URL_SAFE_NO_PAD
            .decode(rsa_jwk["n"].as_str().expect("n"))
            .expect("b64");
        let e = URL_SAFE_NO_PAD
            .decode(rsa_jwk["e"].as_str().expect("e"))
            .expect("b64");
        assert_eq!(e, [1, 0, 1]);
        let t = rsa.token(&json!({"alg": "RS256", "kid": "rsa"}), &claims(sub));
        let (input, sig) = t.rsplit_once('.').expect("parts");
        signature::RsaPublicKeyComponents { n: &n, e: &e }
            .verify(
                &signature::RSA_PKCS1_2048_8192_SHA256,
                input.as_bytes(),
                &URL_SAFE_NO_PAD.decode(sig).expect("b64"),
            )
            .expect("the served n/e verify the token");
    }

    /// JWT-SVID §4 and Workload API §6.3 (issue 12 finding 4): a token is
    /// validated with the JWT authorities of the trust domain of its `sub`
    /// only. A federated trust domain's key — under its own kid, or under
    /// the kid of a local key — never vouches for a local SPIFFE ID.
    #[test]
    fn only_the_sub_trust_domains_keys_are_used() {
        let local = Signer::p256();
        let partner = Signer::p256();
        let own = bundle("example.org", &[("local-kid", &local)]);
        let fed = bundle(
            "partner.org",
            &[("partner-kid", &partner), ("local-kid", &partner)],
        );
        let sub = "spiffe://example.org/admin";
        for kid in ["partner-kid", "local-kid"] {
            let t = partner.token(&json!({"alg": "ES256", "kid": kid}), &claims(sub));
            // Either bundle order.
            for bundles in [[&own, &fed], [&fed, &own]] {
                let r = validate(&t, "svc", bundles, now());
                assert!(
                    matches!(r, Err(JwtError::UnknownKey { .. } | JwtError::BadSignature)),
                    "{kid}: {r:?}"
                );
            }
        }
        // The local key validates the local token; the partner key its own.
        let t = local.token(&json!({"alg": "ES256", "kid": "local-kid"}), &claims(sub));
        assert!(validate(&t, "svc", [&fed, &own], now()).is_ok());
        let p = "spiffe://partner.org/x";
        let t = partner.token(&json!({"alg": "ES256", "kid": "partner-kid"}), &claims(p));
        assert!(validate(&t, "svc", [&own, &fed], now()).is_ok());
        // No bundle for the sub's trust domain.
        let t = local.token(
            &json!({"alg": "ES256", "kid": "local-kid"}),
            &claims("spiffe://other.org/x"),
        );
        assert_eq!(
            validate(&t, "svc", [&own, &fed], now()),
            Err(JwtError::UnknownTrustDomain("other.org".into()))
        );
        // JWT-SVID §2.2: kid is optional; then every key of the sub's
        // trust domain is tried — still never another domain's.
        let t = local.token(&json!({"alg": "ES256"}), &claims(sub));
        assert!(validate(&t, "svc", [&own], now()).is_ok());
        let t = partner.token(&json!({"alg": "ES256"}), &claims(sub));
        assert_eq!(
            validate(&t, "svc", [&own, &fed], now()),
            Err(JwtError::BadSignature)
        );
    }

    /// JWT-SVID §2.3: "The typ header is optional. If set, its value MUST be
    /// either JWT or JOSE." RFC 7515 §4.1.11: recipients MUST reject a JWS
    /// whose `crit` names extensions they do not understand.
    #[test]
    fn typ_and_crit_headers() {
        let k = Signer::p256();
        let b = bundle("example.org", &[("k", &k)]);
        let c = claims("spiffe://example.org/w");
        for typ in ["JWT", "JOSE"] {
            let t = k.token(&json!({"alg": "ES256", "kid": "k", "typ": typ}), &c);
            assert!(validate(&t, "svc", [&b], now()).is_ok(), "{typ}");
        }
        for typ in [json!("JWS"), json!("jwt+at"), json!(1)] {
            let t = k.token(&json!({"alg": "ES256", "kid": "k", "typ": typ}), &c);
            assert!(
                matches!(validate(&t, "svc", [&b], now()), Err(JwtError::Type(_))),
                "{typ}"
            );
        }
        for crit in [json!(["exp"]), json!(["b64"]), json!([])] {
            let t = k.token(&json!({"alg": "ES256", "kid": "k", "crit": crit}), &c);
            assert!(
                matches!(validate(&t, "svc", [&b], now()), Err(JwtError::Critical(_))),
                "{crit}"
            );
        }
    }

    /// JWT-SVID §3.3: exp is required and a token past it is invalid; a
    /// non-integer exp is invalid. RFC 7519 §4.1.5: a JWT MUST NOT be
    /// accepted before its nbf. JWT-SVID §3.2: aud must hold the audience.
    #[test]
    fn exp_nbf_and_aud() {
        let k = Signer::p256();
        let b = bundle("example.org", &[("k", &k)]);
        let h = json!({"alg": "ES256", "kid": "k"});
        let sub = "spiffe://example.org/w";
        let v = |claims: Value| validate(&k.token(&h, &claims), "svc", [&b], now());
        assert!(v(json!({"sub": sub, "aud": "svc", "exp": NOW + 1})).is_ok());
        assert_eq!(
            v(json!({"sub": sub, "aud": "svc", "exp": NOW})),
            Err(JwtError::Expired)
        );
        for exp in [json!(NOW as f64 + 60.5), json!("1900000060"), json!(null)] {
            assert!(
                matches!(
                    v(json!({"sub": sub, "aud": "svc", "exp": exp})),
                    Err(JwtError::Malformed(_))
                ),
                "{exp}"
            );
        }
        assert!(matches!(
            v(json!({"sub": sub, "aud": "svc"})),
            Err(JwtError::Malformed(_))
        ));
        assert_eq!(
            v(json!({"sub": sub, "aud": "svc", "exp": NOW + 60, "nbf": NOW + 1})),
            Err(JwtError::NotYetValid)
        );
        assert!(v(json!({"sub": sub, "aud": "svc", "exp": NOW + 60, "nbf": NOW})).is_ok());
        assert!(matches!(
            v(json!({"sub": sub, "aud": "svc", "exp": NOW + 60, "nbf": 1.5})),
            Err(JwtError::Malformed(_))
        ));
        assert_eq!(
            v(json!({"sub": sub, "aud": ["a", "b"], "exp": NOW + 60})),
            Err(JwtError::Audience("svc".into()))
        );
        assert_eq!(
            v(json!({"sub": sub, "aud": [], "exp": NOW + 60})),
            Err(JwtError::Audience("svc".into()))
        );
        assert!(v(json!({"sub": sub, "aud": ["a", "svc"], "exp": NOW + 60})).is_ok());
        for bad in [
            "not-an-id",
            "spiffe://example.org",
            "SPIFFE://example.org/w",
        ] {
            assert_eq!(
                v(json!({"sub": bad, "aud": "svc", "exp": NOW + 60})),
                Err(JwtError::Subject),
                "{bad}"
            );
        }
        // A tampered payload does not verify.
        let t = k.token(&h, &json!({"sub": sub, "aud": "svc", "exp": NOW + 60}));
        let mut parts: Vec<&str> = t.split('.').collect();
        let forged = URL_SAFE_NO_PAD
            .encode(json!({"sub": sub, "aud": "other", "exp": NOW + 60}).to_string());
        parts[1] = &forged;
        assert_eq!(
            validate(&parts.join("."), "other", [&b], now()),
            Err(JwtError::BadSignature)
        );
        // A JWE (five parts) or garbage is malformed.
        assert!(matches!(
            validate("a.b.c.d.e", "svc", [&b], now()),
            Err(JwtError::Malformed(_))
        ));
    }
}
