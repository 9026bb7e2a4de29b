//! The usual mTLS failures, each produced for real and matched against the
//! exact message the README's troubleshooting section quotes.
//!
//! The server signs under a test upstream root, so the test can also sign
//! defective certificates under the very root the sidecar trusts: expired,
//! not yet valid (clock skew), without the serverAuth EKU, with the wrong
//! SPIFFE ID, and one from an unknown CA. A real sidecar (SVID from a real
//! agent) dials a TLS server presenting each and logs why it refused.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{AgentProc, Server, TD, free_port, sidecar, wait_for};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

/// The cases, the README quotes these messages verbatim.
const CASES: &[(&str, &str)] = &[
    ("expired", "certificate expired: verification time"),
    (
        "not_yet_valid",
        "certificate not valid yet: verification time",
    ),
    (
        "unknown_ca",
        "certificate is not signed by any CA in the bundle of its trust domain (unknown CA)",
    ),
    (
        "wrong_id",
        "SPIFFE ID not authorized: spiffe://example.org/impostor",
    ),
    (
        "no_server_eku",
        "certificate does not allow extended key usage for server authentication",
    ),
];

fn ca(name: &str) -> (rcgen::Certificate, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    let cert = p.self_signed(&key).expect("root");
    (cert, Issuer::new(p, key))
}

/// A leaf under `issuer`, altered by `f`.
fn leaf(
    issuer: &Issuer<'static, KeyPair>,
    f: impl FnOnce(&mut CertificateParams),
) -> (Vec<u8>, KeyPair) {
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{TD}/payments").try_into().expect("uri"),
    )];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::minutes(5);
    p.not_after = now + time::Duration::hours(1);
    f(&mut p);
    let cert = p.signed_by(&key, issuer).expect("leaf");
    (cert.der().to_vec(), key)
}

/// A TLS server presenting `cert`; returns its port.
async fn bad_upstream(cert: Vec<u8>, key: KeyPair) -> u16 {
    let cfg = rustls::ServerConfig::builder_with_provider(meshid_identity::crypto::provider())
        .with_protocol_versions(meshid_identity::crypto::versions(false))
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.into()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let a = acceptor.clone();
            tokio::spawn(async move {
                let _ = a.accept(tcp).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usual_mtls_failures_print_the_documented_errors() {
    let dir = tempfile::tempdir().expect("tmp");
    let (root, root_issuer) = ca("troubleshooting root");
    std::fs::write(dir.path().join("up.pem"), root.pem()).expect("w");
    std::fs::write(dir.path().join("up.key"), root_issuer.key().serialize_pem()).expect("w");
    let config = common::write_server_config(
        dir.path(),
        &format!(
            "[upstream]\ncert_path = \"{d}/up.pem\"\nkey_path = \"{d}/up.key\"\n",
            d = dir.path().display()
        ),
    );
    let server = Server::start_with(dir, config);
    let alias = format!("spiffe://{TD}/node/t");
    let token = server.ok(&["token", "create", "--spiffe-id", &alias]);
    let uid = nix::unistd::geteuid().as_raw();
    server.ok(&[
        "entry",
        "create",
        "--parent-id",
        &alias,
        "--spiffe-id",
        &format!("spiffe://{TD}/frontend"),
        "--selector",
        &format!("unix:uid:{uid}"),
    ]);
    let work = server.dir.path().to_path_buf();
    let agent = AgentProc::start(&work.join("agent"), &server, Some(&token));

    let (_, stranger) = ca("some other CA");
    let now = OffsetDateTime::now_utc();
    let upstreams = [
        (
            "expired",
            leaf(&root_issuer, |p| {
                p.not_before = now - time::Duration::days(2);
                p.not_after = now - time::Duration::days(1);
            }),
        ),
        (
            "not_yet_valid",
            leaf(&root_issuer, |p| {
                p.not_before = now + time::Duration::hours(2);
                p.not_after = now + time::Duration::hours(3);
            }),
        ),
        ("unknown_ca", leaf(&stranger, |_| {})),
        (
            "wrong_id",
            leaf(&root_issuer, |p| {
                p.subject_alt_names = vec![SanType::URI(
                    format!("spiffe://{TD}/impostor").try_into().expect("uri"),
                )];
            }),
        ),
        (
            "no_server_eku",
            leaf(&root_issuer, |p| {
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }),
        ),
    ];
    let mut toml = format!(
        "workload_api_socket = \"{}\"\nadmin_address = \"127.0.0.1:0\"\n",
        agent.endpoint()
    );
    let mut listeners = Vec::new();
    for (name, (cert, key)) in upstreams {
        let up = bad_upstream(cert, key).await;
        let listen = free_port();
        toml.push_str(&format!(
            "[[outbound]]\nlisten = \"127.0.0.1:{listen}\"\nupstream = \"127.0.0.1:{up}\"\nserver_id = \"spiffe://{TD}/payments\"\n"
        ));
        listeners.push((name, listen));
    }
    let _sc = sidecar(&work, "frontend", &toml);
    let log = || std::fs::read_to_string(work.join("frontend.log")).unwrap_or_default();
    wait_for("sidecar SVID", Duration::from_secs(30), || {
        log().contains("SVID installed").then_some(())
    });

    for (name, port) in &listeners {
        // Each connection is closed without a byte from the upstream.
        let got = tokio::task::spawn_blocking({
            let port = *port;
            move || {
                use std::io::{Read as _, Write as _};
                let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
                s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
                let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf);
                Some(buf)
            }
        })
        .await
        .expect("join");
        assert_eq!(got.as_deref(), Some(&b""[..]), "{name}: upstream refused");
    }
    let readme =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .expect("README");
    let mut lines = Vec::new();
    for (name, needle) in CASES {
        let find = || {
            log()
                .lines()
                .find(|l| l.contains("outbound handshake failed") && l.contains(needle))
                .map(str::to_string)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let line = loop {
            if let Some(l) = find() {
                break l;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name}: no log line with {needle:?}; sidecar log:\n{}",
                log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        lines.push((needle, line));
    }
    for (needle, line) in &lines {
        assert!(
            readme.contains(*needle),
            "README troubleshooting must quote {needle:?} (log line: {line}); all lines:\n{lines:#?}"
        );
    }
}
