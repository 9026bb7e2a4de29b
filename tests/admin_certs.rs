//! Admin certificates through the real binaries: `meshid server x509 mint`
//! within the `[admin_certs]` policy, `x509 revoke` and the CRL the server
//! signs and serves, and a sidecar with `crl = "required"` that lets a
//! minted certificate in, refuses it once revoked, and fails secure (and
//! says so on `/readyz`) when the CRL goes stale.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::apps::http_app;
use common::{Server, TD, agent_with_workloads, free_port, sidecar, wait_for};
use meshid_identity::verify::{Authorizer, SpiffeServerVerifier, TrustBundles};
use rustls::pki_types::ServerName;

const POLICY: &str = "[admin_certs]\nmax_ttl = \"7d\"\nallowed_prefixes = [\"spiffe://example.org/admin/\"]\ncrl_validity = \"6s\"\ncrl_refresh = \"1s\"\n";

/// `openssl`, or `None` (skipped, with a reason) outside CI.
fn openssl() -> Option<PathBuf> {
    let found = ["/usr/bin/openssl", "/usr/local/bin/openssl"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "openssl is required in CI (.ci/run installs it)"
        );
        eprintln!("SKIPPED: openssl is not installed");
    }
    found
}

/// GET over plain HTTP: (status, body).
fn http(addr: &str, path: &str) -> Option<(u16, Vec<u8>)> {
    let mut c = TcpStream::connect(addr).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut raw = Vec::new();
    c.read_to_end(&mut raw).ok()?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, raw[split + 4..].to_vec()))
}

fn readyz(addr: &str) -> Option<(u16, String)> {
    http(addr, "/readyz").map(|(s, b)| (s, String::from_utf8_lossy(&b).to_string()))
}

/// A metric's value from the sidecar's /metrics (first sample whose line
/// starts with `name`).
fn metric(addr: &str, name: &str) -> Option<f64> {
    let (_, body) = http(addr, "/metrics")?;
    String::from_utf8_lossy(&body)
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// One HTTP request through the sidecar's inbound mTLS listener, presenting
/// the minted certificate in `dir` (cert.pem, key.pem) and verifying the
/// sidecar as `server_id` against `dir`/bundle.pem. A fresh client config
/// each time, so no session is ever resumed.
fn mtls_get(port: u16, dir: &Path, server_id: &str) -> Result<String, String> {
    let provider = meshid_identity::crypto::provider();
    let chain = meshid_identity::pem::parse_certs(
        &std::fs::read(dir.join("cert.pem")).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let key = meshid_identity::pem::parse_key(
        &std::fs::read(dir.join("key.pem")).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let roots = meshid_identity::pem::parse_certs(
        &std::fs::read(dir.join("bundle.pem")).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let mut bundles = TrustBundles::new();
    bundles.add(TD, &roots);
    let verifier = SpiffeServerVerifier::new(
        bundles,
        Authorizer::Exact(server_id.parse().map_err(|e| format!("{e:?}"))?),
        &provider,
    );
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(|e| e.to_string())?;
    let conn = rustls::ClientConnection::new(
        Arc::new(cfg),
        ServerName::try_from("payments.invalid").map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    match tls.read_to_end(&mut out) {
        Ok(_) => {}
        // The sidecar closes without close_notify after a response.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !out.is_empty() => {}
        Err(e) => return Err(e.to_string()),
    }
    let out = String::from_utf8_lossy(&out).to_string();
    if out.starts_with("HTTP/1.1 200") {
        Ok(out)
    } else {
        Err(format!("no 200: {out:?}"))
    }
}

/// A TLS server presenting the minted certificate in `dir` (as an upstream
/// of a sidecar's outbound listener); answers every request with 200.
fn tls_upstream(dir: &Path) -> u16 {
    let chain =
        meshid_identity::pem::parse_certs(&std::fs::read(dir.join("cert.pem")).expect("cert"))
            .expect("chain");
    let key = meshid_identity::pem::parse_key(&std::fs::read(dir.join("key.pem")).expect("key"))
        .expect("key");
    let cfg = Arc::new(
        rustls::ServerConfig::builder_with_provider(meshid_identity::crypto::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server config"),
    );
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for tcp in l.incoming().flatten() {
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
                let Ok(conn) = rustls::ServerConnection::new(cfg) else {
                    return;
                };
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut buf = [0u8; 4096];
                let mut req = Vec::new();
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tls.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\nconnection: close\r\n\r\nupstream",
                );
                tls.conn.send_close_notify();
                let _ = tls.flush();
            });
        }
    });
    port
}

fn mint(server: &Server, id: &str, ttl: &str, out: &Path) -> String {
    let o = server.cli(&[
        "x509",
        "mint",
        "--spiffe-id",
        id,
        "--ttl",
        ttl,
        "--out",
        out.to_str().expect("utf-8 path"),
        "--output",
        "json",
    ]);
    assert!(
        o.status.success(),
        "mint {id} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("mint json");
    j["serial"].as_str().expect("serial").to_string()
}

fn audit_events(server: &Server, event: &str) -> Vec<serde_json::Value> {
    server
        .audit()
        .into_iter()
        .filter(|r| r["event"] == event)
        .collect()
}

#[test]
fn mint_is_capped_by_policy_audited_and_keys_are_private() {
    let server = Server::start(POLICY);
    let dir = server.dir.path().to_path_buf();

    // Over the max TTL: refused with the cap in the message.
    let o = server.cli(&[
        "x509",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/admin/alice",
        "--ttl",
        "8d",
        "--out",
        dir.join("too-long").to_str().expect("path"),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("exceeds [admin_certs] max_ttl 7days"),
        "unexpected error: {err}"
    );
    assert!(
        !dir.join("too-long/cert.pem").exists(),
        "nothing written for a refusal"
    );

    // Outside the allowed prefixes (a look-alike segment too): refused.
    for id in [
        "spiffe://example.org/web",
        "spiffe://example.org/adminx/alice",
        "spiffe://example.org/meshid/server",
    ] {
        let o = server.cli(&[
            "x509",
            "mint",
            "--spiffe-id",
            id,
            "--ttl",
            "1h",
            "--out",
            dir.join("outside").to_str().expect("path"),
        ]);
        assert!(!o.status.success(), "{id} must be refused");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(
                "is not under any [admin_certs] allowed_prefixes (spiffe://example.org/admin/)"
            ),
            "{id}: {err}"
        );
    }
    let refused = audit_events(&server, "admin_cert_refused");
    let reasons: Vec<&str> = refused
        .iter()
        .map(|r| r["reason"].as_str().expect("reason"))
        .collect();
    assert_eq!(
        reasons,
        [
            "ttl_too_long",
            "prefix_not_allowed",
            "prefix_not_allowed",
            "prefix_not_allowed"
        ]
    );

    // Within policy, key made locally: key 0600, chain and bundle written,
    // the certificate carries the ID and the requested lifetime.
    let out = dir.join("alice");
    let before = std::time::SystemTime::now();
    let serial = mint(&server, "spiffe://example.org/admin/alice", "7d", &out);
    let mode = std::fs::metadata(out.join("key.pem"))
        .expect("key.pem")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "key file mode {mode:o}");
    let chain =
        meshid_identity::pem::parse_certs(&std::fs::read(out.join("cert.pem")).expect("cert"))
            .expect("chain");
    let info = meshid_identity::SvidInfo::from_der(&chain[0]).expect("svid info");
    assert_eq!(
        info.spiffe_id.to_string(),
        "spiffe://example.org/admin/alice"
    );
    assert_eq!(info.serial, serial);
    let life = info
        .not_after
        .duration_since(before)
        .expect("not_after in the future");
    assert!(
        life <= Duration::from_secs(7 * 86_400 + 5) && life > Duration::from_secs(7 * 86_400 - 120),
        "lifetime {life:?}"
    );
    let minted = audit_events(&server, "admin_cert_minted");
    assert_eq!(minted.len(), 1);
    assert_eq!(minted[0]["serial"], serial.as_str());
    assert_eq!(minted[0]["spiffe_id"], "spiffe://example.org/admin/alice");

    // With the caller's own CSR: the chain goes to stdout, no key is made.
    let key = rcgen::KeyPair::generate().expect("key");
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .expect("params")
        .serialize_request(&key)
        .expect("csr");
    let csr_path = dir.join("tool.csr");
    std::fs::write(&csr_path, csr.pem().expect("pem")).expect("write csr");
    let o = server.cli(&[
        "x509",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/admin/tools/backup",
        "--ttl",
        "1h",
        "--csr",
        csr_path.to_str().expect("path"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let chain = meshid_identity::pem::parse_certs(&o.stdout).expect("chain on stdout");
    let (_, cert) = x509_parser::parse_x509_certificate(&chain[0]).expect("parse");
    assert_eq!(
        cert.public_key().raw,
        rcgen::PublicKeyData::subject_public_key_info(&key).as_slice(),
        "the certificate is for the CSR's key"
    );
    // The verify step of the runbook: openssl accepts it against the bundle.
    if let Some(openssl) = openssl() {
        let o = Command::new(openssl)
            .arg("verify")
            .arg("-CAfile")
            .arg(out.join("bundle.pem"))
            .arg(out.join("cert.pem"))
            .output()
            .expect("openssl verify");
        assert!(
            o.status.success(),
            "openssl verify: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

#[test]
fn revoked_cert_is_refused_and_a_stale_crl_fails_secure() {
    let mut server = Server::start(POLICY);
    let agent = agent_with_workloads(&server, "crl", &["payments", "frontend"], None);
    let dir = server.dir.path().to_path_buf();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let app = http_app(seen.clone());
    let [port, adm] = [(); 2].map(|()| free_port());
    let admin = format!("127.0.0.1:{adm}");
    let _payments = sidecar(
        &dir,
        "payments",
        &format!(
            "workload_api_socket = \"{ep}\"\nadmin_address = \"{admin}\"\nspiffe_id = \"spiffe://{TD}/payments\"\n\
             crl = \"required\"\ncrl_source = \"http://{metrics}/crl\"\ncrl_refresh = \"1s\"\n\
             [[inbound]]\nlisten = \"127.0.0.1:{port}\"\nforward_to = \"127.0.0.1:{app}\"\nmode = \"http\"\n\
             allow = [\"spiffe://{TD}/admin/alice\", \"spiffe://{TD}/admin/bob\"]\n",
            ep = agent.endpoint(),
            metrics = server.metrics_addr,
        ),
    );
    let body = wait_for("sidecar ready with a CRL", Duration::from_secs(60), || {
        readyz(&admin).filter(|(s, _)| *s == 200).map(|(_, b)| b)
    });
    assert!(
        body.contains("crl: required from http://") && body.contains("0 revoked"),
        "{body}"
    );

    let alice = dir.join("alice");
    let serial = mint(&server, "spiffe://example.org/admin/alice", "1h", &alice);
    let bob = dir.join("bob");
    mint(&server, "spiffe://example.org/admin/bob", "1h", &bob);
    let payments = format!("spiffe://{TD}/payments");
    // Outbound: a sidecar dialing upstreams that present the minted
    // certificates (server_id = their SPIFFE IDs).
    let (up_alice, up_bob) = (tls_upstream(&alice), tls_upstream(&bob));
    let [o_alice, o_bob, f_adm] = [(); 3].map(|()| free_port());
    let f_admin = format!("127.0.0.1:{f_adm}");
    let _frontend = sidecar(
        &dir,
        "frontend",
        &format!(
            "workload_api_socket = \"{ep}\"\nadmin_address = \"{f_admin}\"\nspiffe_id = \"spiffe://{TD}/frontend\"\n\
             crl = \"required\"\ncrl_source = \"http://{metrics}/crl\"\ncrl_refresh = \"1s\"\n\
             [[outbound]]\nlisten = \"127.0.0.1:{o_alice}\"\nupstream = \"127.0.0.1:{up_alice}\"\nserver_id = \"spiffe://{TD}/admin/alice\"\n\
             [[outbound]]\nlisten = \"127.0.0.1:{o_bob}\"\nupstream = \"127.0.0.1:{up_bob}\"\nserver_id = \"spiffe://{TD}/admin/bob\"\n",
            ep = agent.endpoint(),
            metrics = server.metrics_addr,
        ),
    );
    wait_for(
        "frontend sidecar ready with a CRL",
        Duration::from_secs(60),
        || readyz(&f_admin).filter(|(s, _)| *s == 200),
    );
    let up = wait_for(
        "outbound to alice's upstream",
        Duration::from_secs(30),
        || common::apps::get(o_alice).ok(),
    );
    assert!(up.ends_with("upstream"), "{up}");

    let ok = mtls_get(port, &alice, &payments).expect("minted certificate accepted");
    assert!(
        ok.ends_with(&format!("caller=spiffe://{TD}/admin/alice")),
        "{ok}"
    );

    // Revoke: refused by the sidecar within one CRL refresh (1 s here; the
    // deadline only absorbs a loaded machine).
    let said = server.ok(&[
        "x509",
        "revoke",
        "--serial",
        &serial,
        "--reason",
        "key-compromise",
    ]);
    assert!(said.contains(&format!("{serial} revoked")), "{said}");
    let revoked_at = Instant::now();
    let err = wait_for(
        "revoked certificate refused",
        Duration::from_secs(30),
        || mtls_get(port, &alice, &payments).err(),
    );
    eprintln!(
        "revoked certificate refused {:?} after x509 revoke: {err}",
        revoked_at.elapsed()
    );
    assert!(
        err.to_lowercase().contains("revoked"),
        "refused for the wrong reason: {err}"
    );
    // From now on no request with the revoked certificate reaches the app.
    let reached = seen.lock().expect("lock").len();
    for _ in 0..3 {
        let e = mtls_get(port, &alice, &payments).expect_err("stays refused");
        assert!(e.contains("CertificateRevoked"), "{e}");
    }
    assert!(
        metric(
            &admin,
            "meshid_sidecar_crl_refusals_total{reason=\"revoked\"}"
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    assert_eq!(
        metric(&admin, "meshid_sidecar_crl_revoked_certificates"),
        Some(1.0)
    );
    // Another minted certificate is unaffected.
    mtls_get(port, &bob, &payments).expect("bob is not revoked");
    // Outbound: the revoked upstream is refused, the other one is not.
    wait_for(
        "outbound refuses the revoked upstream",
        Duration::from_secs(30),
        || common::apps::get(o_alice).err(),
    );
    common::apps::get(o_bob).expect("bob's upstream is not revoked");
    assert!(
        metric(
            &f_admin,
            "meshid_sidecar_tls_handshakes_total{direction=\"outbound\",outcome=\"revoked\"}"
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    let rev = audit_events(&server, "x509_revoked");
    assert_eq!(rev.len(), 1);
    assert_eq!(rev[0]["serial"], serial.as_str());
    assert_eq!(rev[0]["reason"], "key-compromise");

    // The published CRL verifies with openssl against the bundle, and lists
    // the serial.
    if let Some(openssl) = openssl() {
        let (status, pem) = http(&server.metrics_addr, "/crl.pem").expect("GET /crl.pem");
        assert_eq!(status, 200);
        let crl_path = dir.join("crl.pem");
        std::fs::write(&crl_path, &pem).expect("write crl");
        let o = Command::new(&openssl)
            .args(["crl", "-noout", "-text", "-verify", "-in"])
            .arg(&crl_path)
            .arg("-CAfile")
            .arg(alice.join("bundle.pem"))
            .output()
            .expect("openssl crl");
        let text =
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success() && text.contains("verify OK"), "{text}");
        assert!(
            text.to_lowercase().contains(&serial.to_lowercase()),
            "serial not listed: {text}"
        );
        assert!(text.contains("Next Update"), "{text}");
        assert!(text.contains("Key Compromise"), "{text}");
    }

    // Stale CRL: with the server gone, nothing renews the CRL; once it is
    // past its nextUpdate (6 s) the sidecar refuses every handshake, even
    // an unrevoked certificate, and /readyz says why.
    server.stop();
    let why = wait_for(
        "readyz reports the stale CRL",
        Duration::from_secs(60),
        || readyz(&admin).filter(|(s, _)| *s == 503).map(|(_, b)| b),
    );
    assert!(
        why.contains("not ready: CRL is stale: nextUpdate passed") && why.contains("CRL age"),
        "{why}"
    );
    assert!(why.contains("last fetch failed"), "{why}");
    let err = mtls_get(port, &bob, &payments).expect_err("stale CRL must fail secure");
    wait_for(
        "frontend reports the stale CRL",
        Duration::from_secs(30),
        || readyz(&f_admin).filter(|(s, _)| *s == 503),
    );
    let e = common::apps::get(o_bob).expect_err("outbound fails secure too");
    eprintln!("outbound with a stale CRL: {e}");
    assert!(
        metric(&f_admin, "meshid_sidecar_tls_handshakes_total{direction=\"outbound\",outcome=\"revocation_unknown\"}")
            .unwrap_or(0.0)
            >= 1.0
    );
    eprintln!("unrevoked certificate with a stale CRL: {err}");
    assert!(
        metric(
            &admin,
            "meshid_sidecar_crl_refusals_total{reason=\"stale\"}"
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    assert_eq!(metric(&admin, "meshid_sidecar_crl_stale"), Some(1.0));
    let log = std::fs::read_to_string(dir.join("payments.log")).unwrap_or_default();
    assert!(log.contains("CRL is past its nextUpdate"), "{log}");
    let seen = seen.lock().expect("lock");
    assert_eq!(
        seen.len(),
        reached + 1,
        "after the revocation only bob's request reached the app: {seen:?}"
    );
    assert_eq!(
        seen.last().map(String::as_str),
        Some("spiffe://example.org/admin/bob")
    );
}
