//! Bad input against a real sidecar process (SVIDs from a real server and
//! agent), case by case: each gets a log line and a metric, and afterwards
//! the sidecar still serves a good inbound client and good outbound traffic.
//!
//! Cases: garbage and plaintext HTTP on the TLS port, a TLS client without a
//! certificate, a TLS 1.2-only client, a certificate from an unknown CA, a
//! handshake that stalls (deadline), idle connections past the handshake
//! pool, established connections past `max_inbound_connections`, and local
//! connections past `max_outbound_connections`.

mod common;
mod sidecar_proc;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use common::wait_for;
use meshid_identity::crypto;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sidecar_proc::{
    ClientSvid, Mesh, RunningSidecar, echo_app, echo_line, free_addr, id, tls_connect,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MAX_PENDING: usize = 6;
const MAX_INBOUND: usize = 10;
const MAX_OUTBOUND: usize = 3;

struct Env {
    mesh: Mesh,
    gate: RunningSidecar,
    _peer: RunningSidecar,
    gate_in: SocketAddr,
    gate_out: SocketAddr,
    good: Arc<rustls::ClientConfig>,
}

/// A TLS client config built by `f`, verifying nothing of the server (the
/// point is what the sidecar does with the client).
fn loose_client(
    versions: &[&'static rustls::SupportedProtocolVersion],
    cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Arc<rustls::ClientConfig> {
    #[derive(Debug)]
    struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = crypto::provider();
    let b = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)));
    Arc::new(match cert {
        Some((chain, key)) => b.with_client_auth_cert(chain, key).expect("cert"),
        None => b.with_no_client_auth(),
    })
}

/// A self-signed SVID from a CA nobody trusts.
fn stranger_svid() -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let issuer = rcgen::Issuer::new(ca.clone(), ca_key);
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    p.subject_alt_names = vec![rcgen::SanType::URI(id("frontend").try_into().expect("uri"))];
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = p.signed_by(&key, &issuer).expect("leaf");
    (
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
}

/// Raw bytes on a fresh connection; waits until the sidecar closes it.
fn raw(addr: SocketAddr, bytes: &[u8]) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(bytes).expect("write");
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
}

/// A TLS handshake with `cfg` that must not lead to a working connection.
async fn refused_tls(cfg: Arc<rustls::ClientConfig>, addr: SocketAddr) {
    let res = async {
        let mut tls = tls_connect(cfg, addr).await?;
        tls.write_all(b"ping\n").await?;
        let mut b = [0u8; 5];
        tls.read_exact(&mut b).await?;
        Ok::<_, std::io::Error>(b)
    }
    .await;
    assert!(res.is_err(), "bad client was served: {res:?}");
}

/// One good inbound round trip.
async fn good_inbound(env: &Env) -> Result<(), String> {
    let mut tls = tls_connect(env.good.clone(), env.gate_in)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tls.write_all(b"good\n").await.map_err(|e| e.to_string())?;
    let mut b = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut b))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
    (&b == b"good\n")
        .then_some(())
        .ok_or_else(|| format!("{b:?}"))
}

/// Good traffic in both directions, retried until `deadline` while slots
/// that a case freed are released asynchronously.
async fn still_serving(env: &Env, case: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let gate_out = env.gate_out;
        let out = tokio::task::spawn_blocking(move || echo_line(gate_out, "out"))
            .await
            .expect("join");
        let inbound = good_inbound(env).await;
        if inbound.is_ok() && out.as_deref() == Ok("out") {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{case}: sidecar no longer serves good clients: inbound {inbound:?}, outbound {out:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn setup() -> Env {
    let mesh = Mesh::start(&["gate", "peer"], &[("frontend", "1h")]);
    let echo = echo_app();
    let (peer_in, gate_in, gate_out) = (free_addr(), free_addr(), free_addr());
    let peer = mesh.sidecar(
        "peer",
        &format!(
            "[[inbound]]\nlisten = \"{peer_in}\"\nforward_to = \"{echo}\"\nallow = [\"{}\"]\n",
            id("gate")
        ),
    );
    let gate = mesh.sidecar(
        "gate",
        &format!(
            "handshake_timeout = \"2s\"\nmax_pending_handshakes = {MAX_PENDING}\n\
             max_inbound_connections = {MAX_INBOUND}\nmax_outbound_connections = {MAX_OUTBOUND}\n\
             [[inbound]]\nlisten = \"{gate_in}\"\nforward_to = \"{echo}\"\nallow = [\"{}\"]\n\
             [[outbound]]\nlisten = \"{gate_out}\"\nupstream = \"{peer_in}\"\nserver_id = \"{}\"\n",
            id("frontend"),
            id("peer"),
        ),
    );
    let svid: ClientSvid = mesh.svid("frontend", Duration::from_secs(600)).await;
    let good = Arc::new(svid.client_config(mesh.bundles(), &id("gate")));
    Env {
        mesh,
        gate,
        _peer: peer,
        gate_in,
        gate_out,
        good,
    }
}

fn handshakes(outcome: &str) -> String {
    format!("meshid_sidecar_tls_handshakes_total{{direction=\"inbound\",outcome=\"{outcome}\"}}")
}

fn refused(direction: &str, reason: &str) -> String {
    format!(
        "meshid_sidecar_connections_refused_total{{direction=\"{direction}\",reason=\"{reason}\"}}"
    )
}

/// What each case does; `Env` is borrowed for the whole run.
#[derive(Clone, Copy)]
enum Action {
    Raw(&'static [u8]),
    Tls12Only,
    NoClientCert,
    UnknownCa,
    Stall,
    IdleFlood(usize),
    EstablishedFlood,
    OutboundFlood,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_counted_logged_and_good_clients_still_served() {
    let env = setup().await;
    still_serving(&env, "before any bad input").await;
    // (case, action, metric series, minimum increase, log line needles)
    let cases: &[(&str, Action, String, u64, &[&str])] = &[
        (
            "garbage on the TLS port",
            Action::Raw(&[0x16, 0x03, 0x01, 0xff, 0xff, 0xde, 0xad, 0xbe, 0xef]),
            handshakes("tls"),
            1,
            &[
                "inbound handshake failed",
                "MessageTooLarge",
                "outcome=\"tls\"",
            ],
        ),
        (
            "plaintext HTTP on the TLS port",
            Action::Raw(b"GET / HTTP/1.1\r\nHost: gate\r\n\r\n"),
            handshakes("plaintext_http"),
            1,
            &["inbound handshake failed", "plaintext HTTP on an mTLS port"],
        ),
        (
            "zeros on the TLS port",
            Action::Raw(&[0u8; 4096]),
            handshakes("tls"),
            1,
            &[
                "inbound handshake failed",
                "InvalidContentType",
                "outcome=\"tls\"",
            ],
        ),
        (
            "TLS 1.2 only",
            Action::Tls12Only,
            handshakes("tls"),
            1,
            &[
                "inbound handshake failed",
                "incompatible",
                "outcome=\"tls\"",
            ],
        ),
        (
            "no client certificate",
            Action::NoClientCert,
            handshakes("no_client_cert"),
            1,
            &["inbound handshake failed", "no_client_cert"],
        ),
        (
            "certificate from an unknown CA",
            Action::UnknownCa,
            handshakes("unknown_ca"),
            1,
            &["inbound handshake failed", "unknown CA"],
        ),
        (
            "a handshake that stalls half-way",
            Action::Stall,
            handshakes("timeout"),
            1,
            &["inbound handshake failed", "handshake_timeout"],
        ),
        (
            "idle connections past the handshake pool",
            Action::IdleFlood(MAX_PENDING + 20),
            refused("inbound", "pending_handshakes"),
            20,
            &["inbound connection refused", "max_pending_handshakes"],
        ),
        (
            "established connections past max_inbound_connections",
            Action::EstablishedFlood,
            refused("inbound", "connections"),
            1,
            &["inbound connection refused", "max_inbound_connections"],
        ),
        (
            "local connections past max_outbound_connections",
            Action::OutboundFlood,
            refused("outbound", "connections"),
            1,
            &["outbound connection refused", "max_outbound_connections"],
        ),
    ];
    for (case, action, series, min, needles) in cases {
        let before = env.gate.metric(series);
        let mut held: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
        match *action {
            Action::Raw(bytes) => {
                let addr = env.gate_in;
                tokio::task::spawn_blocking(move || raw(addr, bytes))
                    .await
                    .expect("join");
            }
            Action::Tls12Only => {
                refused_tls(loose_client(&[&rustls::version::TLS12], None), env.gate_in).await;
            }
            Action::NoClientCert => {
                refused_tls(loose_client(crypto::versions(false), None), env.gate_in).await;
            }
            Action::UnknownCa => {
                let cfg = loose_client(crypto::versions(false), Some(stranger_svid()));
                refused_tls(cfg, env.gate_in).await;
            }
            Action::Stall => {
                // A TLS record header announcing a ClientHello, then silence.
                let addr = env.gate_in;
                tokio::task::spawn_blocking(move || {
                    raw(addr, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
                })
                .await
                .expect("join");
            }
            Action::IdleFlood(n) => {
                for _ in 0..n {
                    held.push(Box::new(TcpStream::connect(env.gate_in).expect("connect")));
                }
            }
            Action::EstablishedFlood => {
                for i in 0..MAX_INBOUND {
                    let mut tls = tls_connect(env.good.clone(), env.gate_in)
                        .await
                        .unwrap_or_else(|e| panic!("{case}: connection {i}: {e}"));
                    tls.write_all(b"held\n").await.expect("write");
                    let mut b = [0u8; 5];
                    tls.read_exact(&mut b).await.expect("echo");
                    held.push(Box::new(tls));
                }
                refused_tls(env.good.clone(), env.gate_in).await;
            }
            Action::OutboundFlood => {
                for _ in 0..MAX_OUTBOUND {
                    let mut s = TcpStream::connect(env.gate_out).expect("connect");
                    s.set_read_timeout(Some(Duration::from_secs(10)))
                        .expect("t");
                    s.write_all(b"held\n").expect("write");
                    let mut b = [0u8; 5];
                    s.read_exact(&mut b).expect("echo through the mesh");
                    held.push(Box::new(s));
                }
                let gate_out = env.gate_out;
                let extra = tokio::task::spawn_blocking(move || echo_line(gate_out, "extra"))
                    .await
                    .expect("join");
                assert!(extra.is_err(), "{case}: served beyond the cap: {extra:?}");
            }
        }
        wait_for(
            &format!("{case}: {series} +{min}"),
            Duration::from_secs(20),
            || (env.gate.metric(series) >= before + min).then_some(()),
        );
        let line = env.gate.wait_log(needles);
        eprintln!("{case}: {line}");
        drop(held);
        still_serving(&env, case).await;
    }
    // Nothing above left a slot taken for good.
    assert_eq!(
        env.gate
            .metric("meshid_sidecar_pending_handshakes{direction=\"inbound\"}"),
        0
    );
    drop(env.mesh);
}
