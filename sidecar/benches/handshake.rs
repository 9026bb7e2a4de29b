//! New mTLS connections per second through the inbound proxy, full
//! handshakes vs TLS 1.3 resumption.
//!
//! `cargo bench -p meshid-sidecar --bench handshake` (set `CONNS` to change
//! the number of connections per run). Each connection: TCP connect, mTLS
//! handshake with a client SVID, one byte echoed by the app behind the
//! sidecar, close. Prints connections/s for each mode.
#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use meshid_identity::verify::SpiffeServerVerifier;
use meshid_identity::{Authorizer, SpiffeId, TrustBundles, crypto};
use meshid_sidecar::config::Config;
use meshid_sidecar::identity::{Identity, SvidMaterial};
use meshid_sidecar::metrics::Metrics;
use meshid_sidecar::{CancellationToken, Sidecar, tls_settings};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    id: &str,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let mut p = CertificateParams::new(vec![]).unwrap();
    p.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, issuer).unwrap();
    (
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
}

async fn run(addr: SocketAddr, n: usize, make: &dyn Fn() -> Arc<rustls::ClientConfig>) -> f64 {
    let start = Instant::now();
    for _ in 0..n {
        let tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(make())
            .connect(ServerName::try_from("web.invalid").unwrap(), tcp)
            .await
            .unwrap();
        tls.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await.unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let mut ca = CertificateParams::new(vec![]).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca_der = ca.self_signed(&ca_key).unwrap().der().clone();
    let issuer = Issuer::new(ca, ca_key);
    let mut bundles = TrustBundles::new();
    bundles.add("example.org", &[ca_der]);

    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let v = Config::parse(&format!(
        "[[inbound]]\nlisten = \"127.0.0.1:0\"\nforward_to = \"{echo_addr}\"\nallow = [\"spiffe://example.org\"]\n"
    ))
    .unwrap()
    .validate(None)
    .unwrap();
    let metrics = Arc::new(Metrics::new());
    let identity = Identity::new(tls_settings(&v), metrics.clone());
    let (chain, key) = leaf(&issuer, "spiffe://example.org/web");
    identity
        .update(SvidMaterial {
            chain,
            key,
            bundles: bundles.clone(),
        })
        .unwrap();
    let sidecar = Sidecar::bind(&v, identity, metrics, CancellationToken::new())
        .await
        .unwrap();
    let addr = sidecar.inbound_addrs()[0];
    tokio::spawn(sidecar.run());

    let (cchain, ckey) = leaf(&issuer, "spiffe://example.org/client");
    let provider = crypto::provider();
    let build = |resume: bool| {
        let verifier = SpiffeServerVerifier::new(
            bundles.clone(),
            Authorizer::Exact(SpiffeId::new("spiffe://example.org/web").unwrap()),
            &provider,
        );
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(crypto::versions(false))
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(cchain.clone(), ckey.clone_key())
            .unwrap();
        if !resume {
            cfg.resumption = rustls::client::Resumption::disabled();
        }
        Arc::new(cfg)
    };
    let full_cfg = build(false);
    let resume_cfg = build(true);
    // Warm up.
    run(addr, 20, &|| full_cfg.clone()).await;
    let full = run(addr, n, &|| full_cfg.clone()).await;
    let resumed = run(addr, n, &|| resume_cfg.clone()).await;
    println!("handshake/full     {full:>8.0} conn/s ({n} connections)");
    println!("handshake/resumed  {resumed:>8.0} conn/s ({n} connections)");
    println!("speed-up           {:>8.2}x", resumed / full);
}
