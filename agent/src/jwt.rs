//! JWT bundles as JWKS documents, and JWT-SVID validation (ES256).

use std::time::SystemTime;

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use meshid_proto::types::Bundle;
use serde_json::{Value, json};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

/// Why a JWT-SVID is not valid.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum JwtError {
    /// Not a JWS compact serialization with JSON parts.
    #[error("malformed JWT: {0}")]
    Malformed(String),
    /// Algorithm other than ES256.
    #[error("unsupported JWT algorithm {0:?}")]
    Algorithm(String),
    /// No bundle key with this kid.
    #[error("no key {0:?} in any trusted bundle")]
    UnknownKey(String),
    /// Signature does not verify.
    #[error("JWT signature does not verify")]
    BadSignature,
    /// Past exp.
    #[error("JWT-SVID has expired")]
    Expired,
    /// Audience not present.
    #[error("audience {0:?} not in the JWT-SVID")]
    Audience(String),
    /// sub is not a SPIFFE ID.
    #[error("sub is not a SPIFFE ID")]
    Subject,
}

fn ec_point(spki_der: &[u8]) -> Option<Vec<u8>> {
    let (_, spki) = SubjectPublicKeyInfo::from_der(spki_der).ok()?;
    let d = spki.subject_public_key.data.to_vec();
    (d.len() == 65 && d[0] == 4).then_some(d)
}

/// JWKS document of a bundle's JWT authorities.
pub fn jwks(b: &Bundle) -> Vec<u8> {
    let keys: Vec<Value> = b
        .jwt_authorities
        .iter()
        .filter_map(|k| {
            let p = ec_point(&k.public_key)?;
            Some(json!({
                "kty": "EC", "crv": "P-256", "use": "jwt-svid", "kid": k.key_id,
                "x": URL_SAFE_NO_PAD.encode(&p[1..33]), "y": URL_SAFE_NO_PAD.encode(&p[33..]),
            }))
        })
        .collect();
    json!({ "keys": keys }).to_string().into_bytes()
}

fn part(s: &str) -> Result<Value, JwtError> {
    let raw = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|e| JwtError::Malformed(e.to_string()))?;
    serde_json::from_slice(&raw).map_err(|e| JwtError::Malformed(e.to_string()))
}

/// Validates a JWT-SVID against bundles and an audience; returns (sub, claims).
pub fn validate<'a>(
    token: &str,
    audience: &str,
    bundles: impl IntoIterator<Item = &'a Bundle>,
    now: SystemTime,
) -> Result<(String, Value), JwtError> {
    let parts: Vec<&str> = token.split('.').collect();
    let [h, c, s] = parts.as_slice() else {
        return Err(JwtError::Malformed(
            "expected three dot-separated parts".into(),
        ));
    };
    let header = part(h)?;
    let alg = header["alg"].as_str().unwrap_or_default();
    if alg != "ES256" {
        return Err(JwtError::Algorithm(alg.into()));
    }
    let kid = header["kid"].as_str().unwrap_or_default().to_string();
    let key = bundles
        .into_iter()
        .flat_map(|b| b.jwt_authorities.iter())
        .find(|k| k.key_id == kid)
        .and_then(|k| ec_point(&k.public_key))
        .ok_or_else(|| JwtError::UnknownKey(kid.clone()))?;
    let sig = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|e| JwtError::Malformed(e.to_string()))?;
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, key)
        .verify(format!("{h}.{c}").as_bytes(), &sig)
        .map_err(|_| JwtError::BadSignature)?;
    let claims = part(c)?;
    let exp = claims["exp"]
        .as_i64()
        .ok_or_else(|| JwtError::Malformed("no exp".into()))?;
    if exp <= meshid_identity::svid::unix(now) {
        return Err(JwtError::Expired);
    }
    let aud_ok = match &claims["aud"] {
        Value::String(a) => a == audience,
        Value::Array(v) => v.iter().any(|a| a.as_str() == Some(audience)),
        _ => false,
    };
    if !aud_ok {
        return Err(JwtError::Audience(audience.into()));
    }
    let sub = claims["sub"].as_str().unwrap_or_default().to_string();
    spiffe::SpiffeId::new(&sub).map_err(|_| JwtError::Subject)?;
    Ok((sub, claims))
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
