//! The one place that chooses TLS cryptography for every meshid config.
//!
//! Key exchange is post-quantum hybrid by default: every TLS 1.3 connection
//! meshid makes offers X25519MLKEM768 first (with an X25519 share alongside,
//! so a classical peer answers without a retry), and every listener accepts
//! it. Classical X25519 (and P-256/P-384) stay acceptable so that curl,
//! HAProxy and OpenSSL 3.0 keep working, unless a component is configured
//! with [`KeyExchange::HybridRequired`].

use std::sync::{Arc, OnceLock};

use rustls::crypto::{CryptoProvider, SupportedKxGroup, aws_lc_rs};

/// Which TLS key exchange groups a component offers and accepts: the
/// `tls_key_exchange` setting of the server, agent and sidecar configs.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum KeyExchange {
    /// X25519MLKEM768 preferred; X25519, P-256 and P-384 still accepted.
    #[default]
    HybridPreferred,
    /// X25519MLKEM768 only: peers without it (and TLS 1.2) are refused.
    HybridRequired,
    /// X25519, P-256 and P-384 only, as before post-quantum hybrids.
    Classical,
}

impl KeyExchange {
    /// The config spelling: `hybrid-preferred`, `hybrid-required`, `classical`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HybridPreferred => "hybrid-preferred",
            Self::HybridRequired => "hybrid-required",
            Self::Classical => "classical",
        }
    }

    /// The groups offered and accepted, most preferred first.
    pub fn groups(self) -> Vec<&'static dyn SupportedKxGroup> {
        use aws_lc_rs::kx_group::{SECP256R1, SECP384R1, X25519, X25519MLKEM768};
        match self {
            Self::HybridPreferred => vec![X25519MLKEM768, X25519, SECP256R1, SECP384R1],
            Self::HybridRequired => vec![X25519MLKEM768],
            Self::Classical => vec![X25519, SECP256R1, SECP384R1],
        }
    }
}

impl std::fmt::Display for KeyExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown `tls_key_exchange` value.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "tls_key_exchange {0:?} is not one of \"hybrid-preferred\", \"hybrid-required\", \"classical\""
)]
pub struct UnknownKeyExchange(pub String);

impl std::str::FromStr for KeyExchange {
    type Err = UnknownKeyExchange;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "hybrid-preferred" => Ok(Self::HybridPreferred),
            "hybrid-required" => Ok(Self::HybridRequired),
            "classical" => Ok(Self::Classical),
            other => Err(UnknownKeyExchange(other.to_string())),
        }
    }
}

/// The crypto provider with the default key exchange
/// ([`KeyExchange::HybridPreferred`]); see [`provider_for`].
pub fn provider() -> Arc<CryptoProvider> {
    provider_for(KeyExchange::default())
}

/// The crypto provider every meshid TLS config is built with: aws-lc-rs,
/// AES-GCM and ChaCha20-Poly1305 suites only, and the key exchange groups
/// of `kx`.
pub fn provider_for(kx: KeyExchange) -> Arc<CryptoProvider> {
    static CACHE: [OnceLock<Arc<CryptoProvider>>; 3] =
        [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let slot = match kx {
        KeyExchange::HybridPreferred => &CACHE[0],
        KeyExchange::HybridRequired => &CACHE[1],
        KeyExchange::Classical => &CACHE[2],
    };
    slot.get_or_init(|| {
        let mut p = aws_lc_rs::default_provider();
        p.cipher_suites.retain(|s| {
            matches!(
                s.suite(),
                rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                    | rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
                    | rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
                    | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                    | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            )
        });
        p.kx_groups = kx.groups();
        Arc::new(p)
    })
    .clone()
}

/// Protocol versions: TLS 1.3 only unless `allow_tls12`.
pub fn versions(allow_tls12: bool) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static BOTH: &[&rustls::SupportedProtocolVersion] =
        &[&rustls::version::TLS13, &rustls::version::TLS12];
    static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    if allow_tls12 { BOTH } else { TLS13_ONLY }
}

/// A fixed metric label for a negotiated key exchange group:
/// `X25519MLKEM768`, `X25519`, `secp256r1`, `secp384r1`, `other`, or `none`
/// (no key exchange, e.g. a TLS 1.2 resumption).
pub fn group_label(group: Option<&'static dyn SupportedKxGroup>) -> &'static str {
    use rustls::NamedGroup;
    match group.map(|g| g.name()) {
        None => "none",
        Some(NamedGroup::X25519MLKEM768) => "X25519MLKEM768",
        Some(NamedGroup::X25519) => "X25519",
        Some(NamedGroup::secp256r1) => "secp256r1",
        Some(NamedGroup::secp384r1) => "secp384r1",
        Some(_) => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_choose_groups() {
        for (s, first, n) in [
            ("hybrid-preferred", rustls::NamedGroup::X25519MLKEM768, 4),
            ("hybrid-required", rustls::NamedGroup::X25519MLKEM768, 1),
            ("classical", rustls::NamedGroup::X25519, 3),
        ] {
            let kx: KeyExchange = s.parse().expect(s);
            assert_eq!(kx.as_str(), s);
            let p = provider_for(kx);
            assert_eq!(p.kx_groups.len(), n, "{s}");
            assert_eq!(p.kx_groups[0].name(), first, "{s}");
        }
        assert_eq!(KeyExchange::default(), KeyExchange::HybridPreferred);
        assert_eq!(
            provider().kx_groups[0].name(),
            rustls::NamedGroup::X25519MLKEM768
        );
        let e = "hybrid".parse::<KeyExchange>().expect_err("unknown");
        assert!(e.to_string().contains("hybrid-required"), "{e}");
        assert!(
            !KeyExchange::Classical
                .groups()
                .iter()
                .any(|g| g.name() == rustls::NamedGroup::X25519MLKEM768)
        );
    }
}
