//! What the post-quantum hybrid costs, classical against hybrid in one run:
//! new mTLS connections per second through the inbound proxy (full
//! handshakes, sequential and concurrent), handshake bytes on the wire in
//! each direction, and the CPU time of one handshake in memory.
//!
//! `cargo bench -p meshid-sidecar --bench key_exchange` (`CONNS`, default
//! 1000 per mode and column; `CONCURRENCY`, default 8; `ROUNDS`, default 5:
//! the modes alternate round by round and medians are reported). Each
//! connection: TCP connect, full mTLS handshake (no resumption) with a
//! client SVID, one byte echoed by the app behind the sidecar, close. The
//! sidecar and the client use the same `tls_key_exchange`.
#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use meshid_identity::crypto::{self, KeyExchange};
use meshid_identity::verify::{SpiffeClientVerifier, SpiffeServerVerifier};
use meshid_identity::{Authorizer, SpiffeId, TrustBundles};
use meshid_sidecar::config::Config;
use meshid_sidecar::identity::{Identity, SvidMaterial};
use meshid_sidecar::metrics::Metrics;
use meshid_sidecar::{CancellationToken, Sidecar, tls_settings};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

type Leaf = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn leaf(issuer: &Issuer<'_, KeyPair>, id: &str) -> Leaf {
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

/// A TCP stream that counts the bytes it carries.
struct Counted {
    inner: TcpStream,
    read: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read
            .fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One connection; returns the bytes (client→server, server→client) up to
/// the end of the handshake.
async fn connect_once(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>) -> (u64, u64) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (read, written) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let s = Counted {
        inner: tcp,
        read: read.clone(),
        written: written.clone(),
    };
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("web.invalid").unwrap(), s)
        .await
        .unwrap();
    let bytes = (
        written.load(Ordering::Relaxed),
        read.load(Ordering::Relaxed),
    );
    tls.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    tls.read_exact(&mut b).await.unwrap();
    bytes
}

/// Connections per second with `concurrency` clients, and the mean
/// handshake bytes per connection.
async fn run(
    addr: SocketAddr,
    n: usize,
    concurrency: usize,
    cfg: &Arc<rustls::ClientConfig>,
) -> (f64, f64, f64) {
    let start = Instant::now();
    let per = n / concurrency;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let cfg = cfg.clone();
        tasks.push(tokio::spawn(async move {
            let mut sum = (0u64, 0u64);
            for _ in 0..per {
                let (c2s, s2c) = connect_once(addr, cfg.clone()).await;
                sum.0 += c2s;
                sum.1 += s2c;
            }
            sum
        }));
    }
    let mut total = (0u64, 0u64);
    for t in tasks {
        let (a, b) = t.await.unwrap();
        total.0 += a;
        total.1 += b;
    }
    let done = (per * concurrency) as f64;
    (
        done / start.elapsed().as_secs_f64(),
        total.0 as f64 / done,
        total.1 as f64 / done,
    )
}

/// Microseconds of CPU per full mutual handshake, client and server in
/// memory on this thread.
fn in_memory(
    n: usize,
    client: &Arc<rustls::ClientConfig>,
    server: &Arc<rustls::ServerConfig>,
) -> f64 {
    let start = Instant::now();
    for _ in 0..n {
        let mut c = rustls::ClientConnection::new(
            client.clone(),
            ServerName::try_from("web.invalid").unwrap(),
        )
        .unwrap();
        let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
        let mut buf = Vec::with_capacity(8192);
        while c.is_handshaking() || s.is_handshaking() {
            buf.clear();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                s.read_tls(&mut buf.as_slice()).unwrap();
                s.process_new_packets().unwrap();
            }
            buf.clear();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                c.read_tls(&mut buf.as_slice()).unwrap();
                c.process_new_packets().unwrap();
            }
        }
    }
    start.elapsed().as_secs_f64() * 1e6 / n as f64
}

/// One mode under test: its sidecar's address and both TLS configs.
struct Mode {
    kx: KeyExchange,
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let n = env("CONNS", 1000);
    let concurrency = env("CONCURRENCY", 8).max(1);
    let rounds = env("ROUNDS", 5).max(1);
    let per_round = (n / rounds).max(concurrency);

    let mut ca = CertificateParams::new(vec![]).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca_der = ca.self_signed(&ca_key).unwrap().der().clone();
    let issuer = Issuer::new(ca, ca_key);
    let mut bundles = TrustBundles::new();
    bundles.add("example.org", &[ca_der]);
    let (schain, skey) = leaf(&issuer, "spiffe://example.org/web");
    let (cchain, ckey) = leaf(&issuer, "spiffe://example.org/client");

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

    let stop = CancellationToken::new();
    let mut modes = Vec::new();
    for kx in [KeyExchange::Classical, KeyExchange::HybridPreferred] {
        let v = Config::parse(&format!(
            "tls_key_exchange = \"{kx}\"\nmax_connections = 100000\n[[inbound]]\nlisten = \"127.0.0.1:0\"\nforward_to = \"{echo_addr}\"\nallow = [\"spiffe://example.org\"]\n"
        ))
        .unwrap()
        .validate(None)
        .unwrap();
        let metrics = Arc::new(Metrics::new());
        let identity = Identity::new(tls_settings(&v), metrics.clone());
        identity
            .update(SvidMaterial {
                chain: schain.clone(),
                key: skey.clone_key(),
                bundles: bundles.clone(),
            })
            .unwrap();
        let sidecar = Sidecar::bind(&v, identity, metrics.clone(), stop.clone())
            .await
            .unwrap();
        let addr = sidecar.inbound_addrs()[0];
        tokio::spawn(sidecar.run());
        let provider = crypto::provider_for(kx);
        let client = Arc::new({
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
            cfg.resumption = rustls::client::Resumption::disabled();
            cfg
        });
        let server = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(crypto::versions(false))
                .unwrap()
                .with_client_cert_verifier(SpiffeClientVerifier::new(
                    bundles.clone(),
                    Authorizer::Any,
                    &provider,
                    false,
                ))
                .with_single_cert(schain.clone(), skey.clone_key())
                .unwrap(),
        );
        // Warm up.
        run(addr, 50, 1, &client).await;
        in_memory(50, &client, &server);
        modes.push(Mode {
            kx,
            addr,
            metrics,
            client,
            server,
        });
    }

    // The modes take turns, round after round, so that load from anything
    // else on the machine falls on both alike; medians are reported.
    let mut results: Vec<[Vec<f64>; 5]> = modes.iter().map(|_| Default::default()).collect();
    for _ in 0..rounds {
        for (m, r) in modes.iter().zip(results.iter_mut()) {
            let (seq, c2s, s2c) = run(m.addr, per_round, 1, &m.client).await;
            let (conc, _, _) = run(m.addr, per_round, concurrency, &m.client).await;
            let cpu = in_memory(per_round, &m.client, &m.server);
            for (slot, v) in r.iter_mut().zip([seq, conc, cpu, c2s, s2c]) {
                slot.push(v);
            }
        }
    }
    println!(
        "{:<18} {:>12} {:>14} {:>12} {:>12} {:>12}",
        "tls_key_exchange",
        "conn/s seq",
        format!("conn/s x{concurrency}"),
        "hs CPU µs",
        "bytes c->s",
        "bytes s->c"
    );
    let mut rows = Vec::new();
    for (m, r) in modes.iter().zip(results) {
        let want = if m.kx == KeyExchange::Classical {
            "X25519"
        } else {
            "X25519MLKEM768"
        };
        let negotiated = m
            .metrics
            .key_exchanges
            .get_or_create(&meshid_sidecar::metrics::KxLabels {
                direction: meshid_sidecar::metrics::Direction::Inbound,
                group: want,
            })
            .get();
        assert!(negotiated > 0, "{}: {want} was negotiated", m.kx);
        let [seq, conc, cpu, c2s, s2c] = r.map(median);
        println!(
            "{:<18} {seq:>12.0} {conc:>14.0} {cpu:>12.0} {c2s:>12.0} {s2c:>12.0}",
            m.kx.as_str()
        );
        rows.push((seq, conc, cpu, c2s, s2c));
    }
    let (a, b) = (rows[0], rows[1]);
    println!(
        "hybrid/classical   {:>12.2} {:>14.2} {:>+12.0} {:>+12.0} {:>+12.0}",
        b.0 / a.0,
        b.1 / a.1,
        b.2 - a.2,
        b.3 - a.3,
        b.4 - a.4
    );
    println!(
        "(medians of {rounds} rounds of {per_round} full handshakes per mode and column; CPU: client + server, one thread, in memory)"
    );
    stop.cancel();
}
