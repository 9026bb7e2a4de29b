//! Post-quantum hybrid key exchange, end to end with real processes: the
//! handshake between two sidecars, read off the wire, uses X25519MLKEM768;
//! the agent's connection to the server does too; OpenSSL 3.0 (which has no
//! hybrid) still completes with X25519; a `hybrid-required` sidecar refuses
//! it with a clear log line; a `classical` sidecar negotiates X25519.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Server, TD, agent_with_workloads, free_port, meshid, sidecar, wait_for};

/// TLS NamedGroup code points.
const X25519MLKEM768: u16 = 0x11ec;
const X25519: u16 = 0x001d;

/// Bytes seen in each direction of one relayed connection.
#[derive(Default)]
struct Capture {
    to_server: Vec<u8>,
    to_client: Vec<u8>,
}

/// Every connection a relay saw.
type Captures = Arc<Mutex<Vec<Arc<Mutex<Capture>>>>>;

/// A TCP relay to `target` that records the first bytes of every connection.
fn capture_relay(target: u16) -> (u16, Captures) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind relay");
    let port = l.local_addr().expect("addr").port();
    let seen: Captures = Arc::default();
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let Ok(up) = TcpStream::connect(("127.0.0.1", target)) else {
                continue;
            };
            let cap = Arc::new(Mutex::new(Capture::default()));
            seen2.lock().expect("lock").push(cap.clone());
            let pipe = |mut from: TcpStream, mut to: TcpStream, to_server: bool| {
                let cap = cap.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        {
                            let mut c = cap.lock().expect("lock");
                            let v = if to_server {
                                &mut c.to_server
                            } else {
                                &mut c.to_client
                            };
                            if v.len() < 64 * 1024 {
                                v.extend_from_slice(&buf[..n]);
                            }
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            };
            let (c2, u2) = (
                c.try_clone().expect("clone"),
                up.try_clone().expect("clone"),
            );
            pipe(c, up, true);
            pipe(u2, c2, false);
        }
    });
    (port, seen)
}

/// The first handshake message of a TLS byte stream: (type, body).
fn first_handshake(stream: &[u8]) -> Option<(u8, &[u8])> {
    // record: type 22, version, length
    if stream.len() < 9 || stream[0] != 22 {
        return None;
    }
    let rec_len = usize::from(u16::from_be_bytes([stream[3], stream[4]]));
    let rec = stream.get(5..5 + rec_len)?;
    let hs_len = (usize::from(rec[1]) << 16) | (usize::from(rec[2]) << 8) | usize::from(rec[3]);
    Some((rec[0], rec.get(4..4 + hs_len)?))
}

/// Extensions of a ClientHello (`client`) or ServerHello body.
fn extensions(body: &[u8], client: bool) -> Vec<(u16, &[u8])> {
    let mut i = 2 + 32; // version, random
    let sid = usize::from(body[i]);
    i += 1 + sid;
    if client {
        let suites = usize::from(u16::from_be_bytes([body[i], body[i + 1]]));
        i += 2 + suites;
        let comp = usize::from(body[i]);
        i += 1 + comp;
    } else {
        i += 2 + 1; // cipher suite, compression
    }
    let end = i + 2 + usize::from(u16::from_be_bytes([body[i], body[i + 1]]));
    i += 2;
    let mut out = Vec::new();
    while i + 4 <= end {
        let t = u16::from_be_bytes([body[i], body[i + 1]]);
        let len = usize::from(u16::from_be_bytes([body[i + 2], body[i + 3]]));
        out.push((t, &body[i + 4..i + 4 + len]));
        i += 4 + len;
    }
    out
}

/// (group, key share length) the server chose, from its ServerHello.
fn server_key_share(to_client: &[u8]) -> (u16, usize) {
    let (t, body) = first_handshake(to_client).expect("a TLS handshake from the server");
    assert_eq!(t, 2, "ServerHello");
    // A HelloRetryRequest has this fixed random.
    assert_ne!(
        &body[2..10],
        &[0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11],
        "the server asked for another key share (HelloRetryRequest)"
    );
    let (_, ks) = extensions(body, false)
        .into_iter()
        .find(|(t, _)| *t == 0x0033)
        .expect("key_share extension");
    (
        u16::from_be_bytes([ks[0], ks[1]]),
        usize::from(u16::from_be_bytes([ks[2], ks[3]])),
    )
}

/// Groups the client sent key shares for, in its ClientHello.
fn client_key_shares(to_server: &[u8]) -> Vec<u16> {
    let (t, body) = first_handshake(to_server).expect("a TLS handshake from the client");
    assert_eq!(t, 1, "ClientHello");
    let (_, ks) = extensions(body, true)
        .into_iter()
        .find(|(t, _)| *t == 0x0033)
        .expect("key_share extension");
    let mut groups = Vec::new();
    let mut i = 2;
    while i + 4 <= ks.len() {
        groups.push(u16::from_be_bytes([ks[i], ks[i + 1]]));
        i += 4 + usize::from(u16::from_be_bytes([ks[i + 2], ks[i + 3]]));
    }
    groups
}

fn echo_app() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let Ok(mut w) = c.try_clone() else { return };
                let mut r = BufReader::new(c);
                let mut line = String::new();
                while r.read_line(&mut line).unwrap_or(0) > 0 {
                    if w.write_all(line.as_bytes()).is_err() {
                        return;
                    }
                    line.clear();
                }
            });
        }
    });
    port
}

fn echo_through(port: u16, msg: &str) -> Result<(), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("{msg}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    (line.trim() == msg)
        .then_some(())
        .ok_or_else(|| format!("got {line:?}"))
}

fn metrics(port: u16) -> String {
    http_metrics(&format!("127.0.0.1:{port}"))
}

fn http_metrics(addr: &str) -> String {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn count(page: &str, prefix: &str) -> u64 {
    page.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

fn kx_count(port: u16, direction: &str, group: &str) -> u64 {
    count(
        &metrics(port),
        &format!(
            "meshid_sidecar_tls_key_exchanges_total{{direction=\"{direction}\",group=\"{group}\"}}"
        ),
    )
}

/// Runs `openssl s_client -brief` against `port` with the frontend's SVID,
/// sends a line, and returns (the line came back, everything s_client
/// printed: the echo on stdout, the handshake summary on stderr).
fn s_client(port: u16, certs: &Path, extra: &[&str]) -> (bool, String) {
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-brief",
            "-verify_return_error",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-tls1_3",
            // Non-blocking: a blocking SSL_read would sit on the session
            // tickets and never get to the line on stdin.
            "-nbio",
        ])
        .arg("-cert")
        .arg(certs.join("frontend.pem"))
        .arg("-key")
        .arg(certs.join("frontend.key"))
        .arg("-CAfile")
        .arg(certs.join("bundle.pem"))
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl s_client");
    let msg = "hello-from-openssl";
    let mut stdin = child.stdin.take().expect("stdin");
    let _ = writeln!(stdin, "{msg}");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            all.push_str(&line);
            all.push('\n');
            if line.contains(msg) {
                let _ = tx.send((true, all.clone()));
                return;
            }
        }
        let _ = tx.send((false, all));
    });
    let (echoed, out) = rx
        .recv_timeout(Duration::from_secs(15))
        .unwrap_or((false, String::new()));
    drop(stdin);
    let _ = child.kill();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let _ = child.wait();
    (echoed, format!("{out}\n{err}"))
}

fn openssl_available() -> bool {
    let ok = Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "openssl is required in CI (.ci/run installs it)"
        );
        eprintln!("skipping the OpenSSL part: `openssl` is not installed");
    }
    ok
}

#[test]
fn hybrid_by_default_classical_clients_still_served_hybrid_required_refuses_them() {
    let server = Server::start("");
    let agent = agent_with_workloads(&server, "pq", &["frontend", "payments"], None);
    let dir = server.dir.path().to_path_buf();
    let ep = agent.endpoint();

    // The agent's connection to the node API negotiated the hybrid.
    let node_kx = wait_for("agent connected", Duration::from_secs(60), || {
        let page = http_metrics(&server.metrics_addr);
        let n = count(
            &page,
            "meshid_server_node_tls_key_exchanges_total{group=\"X25519MLKEM768\"}",
        );
        (n > 0).then_some(page)
    });
    assert_eq!(
        count(
            &node_kx,
            "meshid_server_node_tls_key_exchanges_total{group=\"X25519\"}"
        ),
        0
    );

    let app = echo_app();
    let [
        inb,
        strict,
        out_hybrid,
        out_classic,
        out_strict,
        adm_in,
        adm_strict,
        adm_out,
        adm_classic,
        adm_out_strict,
    ] = [(); 10].map(|()| free_port());
    let (relay, captures) = capture_relay(inb);
    let inbound = |listen: u16, admin: u16, extra: &str| {
        format!(
            "workload_api_socket = \"{ep}\"\nadmin_address = \"127.0.0.1:{admin}\"\nspiffe_id = \"spiffe://{TD}/payments\"\n{extra}\n[[inbound]]\nlisten = \"127.0.0.1:{listen}\"\nforward_to = \"127.0.0.1:{app}\"\nallow = [\"spiffe://{TD}/frontend\"]\n"
        )
    };
    let outbound = |listen: u16, admin: u16, upstream: u16, extra: &str| {
        format!(
            "workload_api_socket = \"{ep}\"\nadmin_address = \"127.0.0.1:{admin}\"\nspiffe_id = \"spiffe://{TD}/frontend\"\n{extra}\n[[outbound]]\nlisten = \"127.0.0.1:{listen}\"\nupstream = \"127.0.0.1:{upstream}\"\nserver_id = \"spiffe://{TD}/payments\"\n"
        )
    };
    let _in = sidecar(&dir, "in", &inbound(inb, adm_in, ""));
    let _strict = sidecar(
        &dir,
        "strict",
        &inbound(strict, adm_strict, "tls_key_exchange = \"hybrid-required\""),
    );
    let _out = sidecar(&dir, "out", &outbound(out_hybrid, adm_out, relay, ""));
    let _out_strict = sidecar(
        &dir,
        "out-strict",
        &outbound(out_strict, adm_out_strict, strict, ""),
    );
    let _classic = sidecar(
        &dir,
        "classic",
        &outbound(
            out_classic,
            adm_classic,
            inb,
            "tls_key_exchange = \"classical\"",
        ),
    );

    // Sidecar to sidecar, through the capturing relay.
    wait_for("frontend -> payments", Duration::from_secs(60), || {
        echo_through(out_hybrid, "pq").ok()
    });
    let cap = captures
        .lock()
        .expect("lock")
        .iter()
        .find(|c| !c.lock().expect("lock").to_client.is_empty())
        .cloned()
        .expect("a captured connection");
    let (to_server, to_client) = {
        let c = cap.lock().expect("lock");
        (c.to_server.clone(), c.to_client.clone())
    };
    assert_eq!(
        client_key_shares(&to_server),
        [X25519MLKEM768, X25519],
        "the client offers the hybrid first, with an X25519 share alongside"
    );
    let (group, share_len) = server_key_share(&to_client);
    assert_eq!(group, X25519MLKEM768, "ServerHello key_share group");
    assert_eq!(share_len, 1088 + 32, "ML-KEM-768 ciphertext + X25519 share");
    assert!(kx_count(adm_out, "outbound", "X25519MLKEM768") >= 1);
    assert!(kx_count(adm_in, "inbound", "X25519MLKEM768") >= 1);

    // A classical sidecar still talks to the hybrid-preferred one: X25519.
    let before = kx_count(adm_in, "inbound", "X25519");
    wait_for(
        "classical frontend -> payments",
        Duration::from_secs(60),
        || echo_through(out_classic, "classic").ok(),
    );
    assert!(kx_count(adm_classic, "outbound", "X25519") >= 1);
    assert!(kx_count(adm_in, "inbound", "X25519") > before);

    if !openssl_available() {
        return;
    }
    // OpenSSL 3.0 with the frontend's SVID.
    let certs = dir.join("certs");
    wait_for("SVIDs on disk", Duration::from_secs(60), || {
        meshid()
            .args(["agent", "api", "fetch", "x509", "--socket", &ep, "--write"])
            .arg(&certs)
            .output()
            .ok()
            .filter(|o| {
                o.status.success() && String::from_utf8_lossy(&o.stdout).contains("Received 2")
            })
            .map(|_| ())
    });
    for i in 0..2 {
        let pem = std::fs::read_to_string(certs.join(format!("svid.{i}.pem"))).expect("pem");
        if pem.is_empty() {
            continue;
        }
        let leaf = meshid_identity::pem::parse_certs(pem.as_bytes()).expect("certs");
        let id = meshid_identity::SvidInfo::from_der(&leaf[0])
            .expect("svid")
            .spiffe_id
            .to_string();
        if id.ends_with("/frontend") {
            std::fs::copy(
                certs.join(format!("svid.{i}.pem")),
                certs.join("frontend.pem"),
            )
            .expect("copy");
            std::fs::copy(
                certs.join(format!("svid.{i}.key")),
                certs.join("frontend.key"),
            )
            .expect("copy");
        }
    }
    std::fs::copy(certs.join("bundle.0.pem"), certs.join("bundle.pem")).expect("bundle");

    let before = kx_count(adm_in, "inbound", "X25519");
    let (echoed, out) = s_client(inb, &certs, &[]);
    assert!(
        echoed,
        "openssl s_client through the sidecar:\n{out}\n{}",
        std::fs::read_to_string(dir.join("in.log")).unwrap_or_default(),
    );
    assert!(
        out.contains("Server Temp Key: X25519"),
        "OpenSSL negotiated X25519:\n{out}"
    );
    assert!(kx_count(adm_in, "inbound", "X25519") > before);

    // hybrid-required refuses OpenSSL 3.0, saying why.
    let (echoed, out) = s_client(strict, &certs, &[]);
    assert!(!echoed, "hybrid-required served a classical client:\n{out}");
    let log = wait_for("refusal logged", Duration::from_secs(10), || {
        let l = std::fs::read_to_string(dir.join("strict.log")).unwrap_or_default();
        l.contains("no TLS key exchange group in common")
            .then_some(l)
    });
    assert!(log.contains("hybrid-required"), "{log}");
    assert!(
        count(
            &metrics(adm_strict),
            "meshid_sidecar_tls_handshakes_total{direction=\"inbound\",outcome=\"no_kx_group\"}"
        ) >= 1
    );
    // …and still serves the hybrid.
    wait_for(
        "frontend -> strict payments",
        Duration::from_secs(60),
        || echo_through(out_strict, "strict").ok(),
    );
    assert!(kx_count(adm_strict, "inbound", "X25519MLKEM768") >= 1);
    drop(agent);
}
