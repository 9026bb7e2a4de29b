//! The one place that chooses TLS cryptography for every meshid config.

use std::sync::Arc;

use rustls::crypto::{CryptoProvider, aws_lc_rs};

/// The crypto provider every meshid TLS config is built with: aws-lc-rs,
/// AES-GCM and ChaCha20-Poly1305 suites only, ECDHE key exchange.
pub fn provider() -> Arc<CryptoProvider> {
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
    Arc::new(p)
}

/// Protocol versions: TLS 1.3 only unless `allow_tls12`.
pub fn versions(allow_tls12: bool) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static BOTH: &[&rustls::SupportedProtocolVersion] =
        &[&rustls::version::TLS13, &rustls::version::TLS12];
    static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    if allow_tls12 { BOTH } else { TLS13_ONLY }
}
