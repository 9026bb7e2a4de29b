//! JWT-SVID signing: ES256, with a `kid` published in the bundle.

use std::time::{Duration, SystemTime};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use rcgen::PublicKeyData as _;

use super::CaError;
use meshid_identity::svid::unix;

/// The JWT-SVID signing key.
pub struct JwtSigner {
    key: EcdsaKeyPair,
    kid: String,
    public_key_der: Vec<u8>,
    not_after: SystemTime,
    rng: SystemRandom,
}

impl std::fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSigner")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// A signed JWT-SVID.
#[derive(Debug, Clone)]
pub struct SignedJwt {
    /// JWS compact serialization.
    pub token: String,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
}

impl JwtSigner {
    /// A signer over a PKCS#8 P-256 key; nothing it signs outlives `not_after`.
    pub fn from_pkcs8(pkcs8: &[u8], not_after: SystemTime) -> Result<Self, CaError> {
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8)
            .map_err(|_| CaError::Invalid("JWT key is not a P-256 PKCS#8 key".into()))?;
        let public_key_der = rcgen::KeyPair::try_from(pkcs8)
            .map_err(|e| CaError::Invalid(format!("JWT key: {e}")))?
            .subject_public_key_info();
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &public_key_der);
        let kid = URL_SAFE_NO_PAD.encode(&digest.as_ref()[..16]);
        Ok(Self {
            key,
            kid,
            public_key_der,
            not_after,
            rng: SystemRandom::new(),
        })
    }

    /// The key's own end of life: tokens never outlive it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Key id, as in the JWT header and the bundle.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// PKIX DER of the public key.
    pub fn public_key_der(&self) -> &[u8] {
        &self.public_key_der
    }

    /// Signs a JWT-SVID for `sub` and `aud`, expiring after `ttl` (capped by
    /// `max_not_after`).
    pub fn sign(
        &self,
        sub: &str,
        aud: &[String],
        ttl: Duration,
        now: SystemTime,
        max_not_after: SystemTime,
    ) -> Result<SignedJwt, CaError> {
        // Defence in depth: never a `sub` that is not a canonical workload
        // SPIFFE ID (JWT-SVID §3: `sub` is the workload's SPIFFE ID).
        meshid_identity::spiffe_id::workload_id(sub)
            .map_err(|e| CaError::Invalid(format!("refusing to sign a JWT-SVID: {e}")))?;
        let iat = unix(now);
        let exp = unix((now + ttl).min(max_not_after).min(self.not_after));
        let header = serde_json::json!({"alg": "ES256", "kid": self.kid, "typ": "JWT"});
        let aud_v = if aud.len() == 1 {
            serde_json::Value::String(aud[0].clone())
        } else {
            serde_json::json!(aud)
        };
        let claims = serde_json::json!({"sub": sub, "aud": aud_v, "exp": exp, "iat": iat});
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .key
            .sign(&self.rng, signing_input.as_bytes())
            .map_err(|_| CaError::Invalid("JWT signing failed".into()))?;
        Ok(SignedJwt {
            token: format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref())),
            issued_at: iat,
            expires_at: exp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::KeyPair as _;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};

    #[test]
    fn signs_verifiable_es256() {
        let doc =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .expect("key");
        let far = SystemTime::now() + Duration::from_secs(86400);
        let s = JwtSigner::from_pkcs8(doc.as_ref(), far).expect("key");
        let now = SystemTime::now();
        let j = s
            .sign(
                "spiffe://td/w",
                &["a".into()],
                Duration::from_secs(60),
                now,
                now + Duration::from_secs(3600),
            )
            .expect("sign");
        let parts: Vec<&str> = j.token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let sig = URL_SAFE_NO_PAD.decode(parts[2]).expect("b64");
        let pk = UnparsedPublicKey::new(
            &ECDSA_P256_SHA256_FIXED,
            s.key.public_key().as_ref().to_vec(),
        );
        pk.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
            .expect("verifies");
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("b64")).expect("json");
        assert_eq!(claims["sub"], "spiffe://td/w");
        assert_eq!(claims["aud"], "a");
        assert_eq!(j.expires_at - j.issued_at, 60);
        let again = JwtSigner::from_pkcs8(doc.as_ref(), far).expect("reload");
        assert_eq!(again.kid(), s.kid());
        // Never outlives the key.
        let short = JwtSigner::from_pkcs8(doc.as_ref(), now + Duration::from_secs(5)).expect("key");
        let j = short
            .sign(
                "spiffe://td/w",
                &["a".into()],
                Duration::from_secs(60),
                now,
                far,
            )
            .expect("sign");
        assert_eq!(j.expires_at - j.issued_at, 5);
    }
}
