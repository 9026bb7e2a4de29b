//! In-process tests of the sidecar with real sockets and real TLS: SVIDs are
//! made here with rcgen and fed straight into `Identity::update` (the seam
//! the Workload API source uses in production).
#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshid_identity::{SvidInfo, crypto};
use meshid_sidecar::config::Config;
use meshid_sidecar::identity::{Identity, InboundTls};
use meshid_sidecar::metrics::{ByteLabels, Direction, HandshakeLabels, Metrics, RefusedLabels};
use meshid_sidecar::{CancellationToken, Sidecar, tls_settings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod sidecar_support;
use sidecar_support::{Ca, TD, client_config, tls_connect};

const SIDECAR_ID: &str = "spiffe://example.org/web";
const CLIENT_ID: &str = "spiffe://example.org/ns/prod/client";
const EVIL_ID: &str = "spiffe://example.org/ns/production/evil";

/// An echo server; returns its address.
async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// An HTTP/1.1 app that answers each request with the `x-spiffe-id` header
/// values it received, one per line. Returns its address.
async fn http_app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    let n = match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = find(&buf, b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        buf.drain(..end + 4);
                        let ids: String = head
                            .lines()
                            .filter_map(|l| l.split_once(':'))
                            .filter(|(k, _)| k.eq_ignore_ascii_case("x-spiffe-id"))
                            .map(|(_, v)| format!("{}\n", v.trim()))
                            .collect();
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{ids}",
                            ids.len()
                        );
                        if s.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads one HTTP response (content-length framed) and returns status and body.
async fn read_response<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> (u16, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
            let len: usize = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .map(|(_, v)| v.trim().parse().unwrap())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "EOF inside body");
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
            return (status, body);
        }
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "EOF before response head");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A running sidecar.
struct Running {
    sidecar_task: tokio::task::JoinHandle<usize>,
    inbound: Vec<SocketAddr>,
    outbound: Vec<SocketAddr>,
    admin: Option<SocketAddr>,
    inbound_tls: Vec<Arc<InboundTls>>,
    identity: Arc<Identity>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

impl Running {
    fn handshakes(&self, direction: Direction, outcome: &'static str) -> u64 {
        self.metrics
            .handshakes
            .get_or_create(&HandshakeLabels { direction, outcome })
            .get()
    }
}

async fn start(toml: &str) -> Running {
    let v = Config::parse(toml).unwrap().validate(None).unwrap();
    let metrics = Arc::new(Metrics::new());
    let identity = Identity::new(tls_settings(&v), metrics.clone());
    let shutdown = CancellationToken::new();
    let sidecar = Sidecar::bind(&v, identity.clone(), metrics.clone(), shutdown.clone())
        .await
        .unwrap();
    let inbound = sidecar.inbound_addrs();
    let outbound = sidecar.outbound_addrs();
    let admin = sidecar.admin_addr();
    let inbound_tls = sidecar.inbound_tls();
    let sidecar_task = tokio::spawn(async move { sidecar.run().await.unwrap() });
    Running {
        sidecar_task,
        inbound,
        outbound,
        admin,
        inbound_tls,
        identity,
        metrics,
        shutdown,
    }
}

fn inbound_toml(forward_to: SocketAddr, mode: &str, extra: &str) -> String {
    format!(
        r#"
admin_address = "127.0.0.1:0"
handshake_timeout = "5s"
drain_timeout = "5s"
[[inbound]]
listen = "127.0.0.1:0"
forward_to = "{forward_to}"
allow = ["spiffe://{TD}/ns/prod/*"]
mode = "{mode}"
{extra}
"#
    )
}

async fn echo_roundtrip<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    msg: &[u8],
) {
    s.write_all(msg).await.unwrap();
    s.flush().await.unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(got, msg);
}

async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    read_response(&mut s).await
}

#[tokio::test]
async fn http_inbound_sets_spiffe_id_and_strips_forged_header() {
    let ca = Ca::new("ca");
    let app = http_app().await;
    let sc = start(&inbound_toml(app, "http", "")).await;
    sc.identity.update(ca.material(SIDECAR_ID, 1)).unwrap();

    let cfg = client_config(&ca, ca.svid(CLIENT_ID, 100), SIDECAR_ID);
    let mut tls = tls_connect(cfg, sc.inbound[0]).await.unwrap();
    for _ in 0..2 {
        let req = "GET / HTTP/1.1\r\nhost: web\r\nx-spiffe-id: spiffe://example.org/admin\r\nX-Spiffe-Id: forged\r\n\r\n";
        tls.write_all(req.as_bytes()).await.unwrap();
        let (status, body) = read_response(&mut tls).await;
        assert_eq!(status, 200);
        assert_eq!(
            body,
            format!("{CLIENT_ID}\n"),
            "only the proven ID reaches the app"
        );
    }
    assert_eq!(sc.handshakes(Direction::Inbound, "ok"), 1);
    // Bytes are counted when the connection ends.
    drop(tls);
    let rx = || {
        sc.metrics
            .bytes
            .get_or_create(&ByteLabels {
                direction: Direction::Inbound,
                flow: "rx",
            })
            .get()
    };
    // The connection task ends asynchronously and has no signal of its own:
    // poll the metric it updates.
    for _ in 0..200 {
        if rx() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(rx() > 100, "request bytes counted");
}

#[tokio::test]
async fn disallowed_peer_is_refused_at_handshake() {
    let ca = Ca::new("ca");
    let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sc = start(&inbound_toml(app.local_addr().unwrap(), "tcp", "")).await;
    sc.identity.update(ca.material(SIDECAR_ID, 1)).unwrap();

    // `ns/production/*` is not under the allowed `ns/prod/*` prefix.
    let cfg = client_config(&ca, ca.svid(EVIL_ID, 7), SIDECAR_ID);
    // In TLS 1.3 the client finishes first; the refusal arrives as an alert.
    let res = async {
        let mut tls = tls_connect(cfg, sc.inbound[0]).await?;
        tls.write_all(b"hello").await?;
        let mut b = [0u8; 1];
        tls.read(&mut b).await
    }
    .await;
    assert!(
        matches!(res, Err(_) | Ok(0)),
        "disallowed peer got data: {res:?}"
    );
    assert_eq!(sc.handshakes(Direction::Inbound, "denied"), 1);
    // The app never saw a connection.
    let accepted = tokio::time::timeout(Duration::from_millis(200), app.accept()).await;
    assert!(accepted.is_err(), "app must not be reached");

    // A client from another CA is refused with unknown_ca.
    let other = Ca::new("other");
    let cfg = client_config(&ca, other.svid(CLIENT_ID, 8), SIDECAR_ID);
    let res = async {
        let mut tls = tls_connect(cfg, sc.inbound[0]).await?;
        let mut b = [0u8; 1];
        tls.read(&mut b).await
    }
    .await;
    assert!(matches!(res, Err(_) | Ok(0)));
    assert_eq!(sc.handshakes(Direction::Inbound, "unknown_ca"), 1);
}

#[tokio::test]
async fn outbound_to_inbound_roundtrip_with_resumption() {
    let ca = Ca::new("ca");
    let echo = echo_server().await;
    let server = start(&inbound_toml(echo, "tcp", "")).await;
    server
        .identity
        .update(ca.material("spiffe://example.org/ns/prod/db", 1))
        .unwrap();
    let client = start(&format!(
        r#"
[[outbound]]
listen = "127.0.0.1:0"
upstream = "{}"
server_id = "spiffe://example.org/ns/prod/db"
"#,
        server.inbound[0]
    ))
    .await;
    // The server's inbound allows ns/prod/*; the client sidecar is ns/prod/client.
    client.identity.update(ca.material(CLIENT_ID, 2)).unwrap();

    for i in 0..3u8 {
        let mut app = TcpStream::connect(client.outbound[0]).await.unwrap();
        echo_roundtrip(&mut app, &[i; 100_000]).await;
        // Half-close: our EOF reaches the echo server, its EOF comes back.
        app.shutdown().await.unwrap();
        let mut rest = Vec::new();
        app.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
    assert_eq!(client.handshakes(Direction::Outbound, "ok"), 1);
    assert_eq!(client.handshakes(Direction::Outbound, "resumed"), 2);
    assert_eq!(server.handshakes(Direction::Inbound, "ok"), 1);
    assert_eq!(server.handshakes(Direction::Inbound, "resumed"), 2);

    // After a rotation on the server, old tickets are void: full handshake.
    server
        .identity
        .update(ca.material("spiffe://example.org/ns/prod/db", 3))
        .unwrap();
    let mut app = TcpStream::connect(client.outbound[0]).await.unwrap();
    echo_roundtrip(&mut app, b"after rotation").await;
    drop(app);
    assert_eq!(server.handshakes(Direction::Inbound, "ok"), 2);
}

#[tokio::test]
async fn outbound_refuses_upstream_with_wrong_spiffe_id() {
    let ca = Ca::new("ca");
    // An upstream presenting spiffe://example.org/impostor.
    let impostor = ca.svid("spiffe://example.org/impostor", 50);
    let server_cfg = Arc::new(
        rustls::ServerConfig::builder_with_provider(crypto::provider())
            .with_protocol_versions(crypto::versions(false))
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(impostor.chain, impostor.key)
            .unwrap(),
    );
    let up = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = up.local_addr().unwrap();
    let (reached_tx, mut reached_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = up.accept().await {
            let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg.clone());
            let tx = reached_tx.clone();
            tokio::spawn(async move {
                if let Ok(mut s) = acceptor.accept(tcp).await {
                    let mut b = [0u8; 16];
                    if let Ok(n) = s.read(&mut b).await
                        && n > 0
                    {
                        let _ = tx.send(());
                    }
                }
            });
        }
    });
    let sc = start(&format!(
        r#"
[[outbound]]
listen = "127.0.0.1:0"
upstream = "{up_addr}"
server_id = "spiffe://example.org/db"
"#
    ))
    .await;
    sc.identity.update(ca.material(CLIENT_ID, 1)).unwrap();

    let mut app = TcpStream::connect(sc.outbound[0]).await.unwrap();
    let _ = app.write_all(b"secret").await;
    let mut b = Vec::new();
    let _ = app.read_to_end(&mut b).await;
    assert!(b.is_empty());
    assert_eq!(sc.handshakes(Direction::Outbound, "denied"), 1);
    assert!(
        reached_rx.try_recv().is_err(),
        "no data may reach the impostor"
    );
}

#[tokio::test]
async fn garbage_on_tls_port_does_not_disturb_good_connection() {
    let ca = Ca::new("ca");
    let echo = echo_server().await;
    let sc = start(&inbound_toml(echo, "tcp", "")).await;
    sc.identity.update(ca.material(SIDECAR_ID, 1)).unwrap();

    let cfg = client_config(&ca, ca.svid(CLIENT_ID, 100), SIDECAR_ID);
    let mut good = tls_connect(cfg, sc.inbound[0]).await.unwrap();
    echo_roundtrip(&mut good, b"before").await;

    for junk in [
        &b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0, 0, 0][..],
        &[0u8; 64][..],
    ] {
        let mut bad = TcpStream::connect(sc.inbound[0]).await.unwrap();
        bad.write_all(junk).await.unwrap();
        let mut b = Vec::new();
        // The sidecar drops the connection (possibly with a TLS alert).
        let _ = tokio::time::timeout(Duration::from_secs(5), bad.read_to_end(&mut b))
            .await
            .unwrap();
    }
    echo_roundtrip(&mut good, b"after").await;
    assert_eq!(sc.handshakes(Direction::Inbound, "tls"), 2);
    assert_eq!(sc.handshakes(Direction::Inbound, "plaintext_http"), 1);
    assert_eq!(sc.handshakes(Direction::Inbound, "ok"), 1);
}

#[tokio::test]
async fn rotation_keeps_established_connection_and_new_handshake_sees_new_cert() {
    let ca = Ca::new("ca");
    let echo = echo_server().await;
    let sc = start(&inbound_toml(echo, "tcp", "")).await;
    let first = sc.identity.update(ca.material(SIDECAR_ID, 0x1111)).unwrap();
    assert!(Arc::ptr_eq(&first, &sc.identity.current().unwrap()));
    let first_listener = sc.inbound_tls[0].current().unwrap();

    let serial_of = |tls: &tokio_rustls::client::TlsStream<TcpStream>| {
        let leaf = &tls.get_ref().1.peer_certificates().unwrap()[0];
        SvidInfo::from_der(leaf).unwrap().serial
    };
    let client = ca.svid(CLIENT_ID, 100);
    let cfg = client_config(&ca, client, SIDECAR_ID);
    let mut old = tls_connect(cfg.clone(), sc.inbound[0]).await.unwrap();
    echo_roundtrip(&mut old, b"one").await;
    assert_eq!(serial_of(&old), "1111");

    let second = sc.identity.update(ca.material(SIDECAR_ID, 0x2222)).unwrap();
    let now = sc.identity.current().unwrap();
    assert!(Arc::ptr_eq(&second, &now));
    assert!(!Arc::ptr_eq(&first, &now));
    let now_listener = sc.inbound_tls[0].current().unwrap();
    assert!(!Arc::ptr_eq(&first_listener.config, &now_listener.config));
    assert_eq!(now.generation, 2);

    // The established connection is untouched.
    echo_roundtrip(&mut old, b"two").await;
    // A new handshake presents the new SVID (the client's cached ticket was
    // issued under the old snapshot and is refused, so this is a full one).
    let mut new = tls_connect(cfg, sc.inbound[0]).await.unwrap();
    echo_roundtrip(&mut new, b"three").await;
    assert_eq!(serial_of(&new), "2222");
    echo_roundtrip(&mut old, b"four").await;
    assert_eq!(sc.metrics.rotations.get(), 2);
}

#[tokio::test]
async fn not_ready_until_first_svid_then_readyz_does_real_handshake() {
    let ca = Ca::new("ca");
    let echo = echo_server().await;
    let sc = start(&inbound_toml(echo, "tcp", "")).await;
    let admin = sc.admin.unwrap();

    let (code, body) = admin_get(admin, "/healthz").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = admin_get(admin, "/readyz").await;
    assert_eq!(code, 503, "{body}");

    // Connections are refused cleanly before the first SVID.
    let cfg = client_config(&ca, ca.svid(CLIENT_ID, 100), SIDECAR_ID);
    assert!(tls_connect(cfg.clone(), sc.inbound[0]).await.is_err());
    assert_eq!(sc.handshakes(Direction::Inbound, "not_ready"), 1);

    let snap = sc.identity.update(ca.material(SIDECAR_ID, 0xabcd)).unwrap();
    sc.identity.ready().await;
    let (code, body) = admin_get(admin, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("serial: 00abcd"), "{body}");
    assert!(
        body.contains(&format!("not_after: {}", snap.svid.not_after_unix())),
        "{body}"
    );
    // The probe was a real handshake on the inbound listener.
    assert_eq!(sc.handshakes(Direction::Inbound, "probe"), 1);
    // Probes are never forwarded and never counted as traffic.
    assert_eq!(sc.handshakes(Direction::Inbound, "ok"), 0);

    let mut tls = tls_connect(cfg, sc.inbound[0]).await.unwrap();
    echo_roundtrip(&mut tls, b"ready now").await;

    let (code, body) = admin_get(admin, "/metrics").await;
    assert_eq!(code, 200);
    for needle in [
        "meshid_sidecar_tls_handshakes_total{direction=\"inbound\",outcome=\"ok\"} 1",
        "meshid_sidecar_svid_not_after_seconds",
        "meshid_sidecar_svid_rotations_total 1",
        "meshid_sidecar_active_connections",
    ] {
        assert!(body.contains(needle), "missing {needle} in\n{body}");
    }
}

#[tokio::test]
async fn tcp_mode_sends_proxy_v2_header_with_spiffe_id() {
    let ca = Ca::new("ca");
    let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sc = start(&inbound_toml(
        app.local_addr().unwrap(),
        "tcp",
        "proxy_protocol = true",
    ))
    .await;
    sc.identity.update(ca.material(SIDECAR_ID, 1)).unwrap();

    let cfg = client_config(&ca, ca.svid(CLIENT_ID, 100), SIDECAR_ID);
    let mut tls = tls_connect(cfg, sc.inbound[0]).await.unwrap();
    let client_local = tls.get_ref().0.local_addr().unwrap();
    tls.write_all(b"payload").await.unwrap();
    tls.flush().await.unwrap();

    let (mut s, _) = app.accept().await.unwrap();
    let mut head = [0u8; 16];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head[..12], b"\r\n\r\n\0\r\nQUIT\n");
    assert_eq!(head[12], 0x21);
    assert_eq!(head[13], 0x11);
    let len = u16::from_be_bytes([head[14], head[15]]) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    assert_eq!(&body[0..4], &[127, 0, 0, 1]);
    assert_eq!(
        u16::from_be_bytes([body[8], body[9]]),
        client_local.port(),
        "source port is the TLS peer's"
    );
    assert_eq!(
        u16::from_be_bytes([body[10], body[11]]),
        sc.inbound[0].port()
    );
    assert_eq!(body[12], 0xE0);
    let tlv_len = u16::from_be_bytes([body[13], body[14]]) as usize;
    assert_eq!(&body[15..15 + tlv_len], CLIENT_ID.as_bytes());
    let mut payload = [0u8; 7];
    s.read_exact(&mut payload).await.unwrap();
    assert_eq!(&payload, b"payload");
}

#[tokio::test]
async fn shutdown_stops_accepting_and_drains_open_connections() {
    let ca = Ca::new("ca");
    let echo = echo_server().await;
    let sc = start(&inbound_toml(echo, "tcp", "")).await;
    sc.identity.update(ca.material(SIDECAR_ID, 1)).unwrap();
    let cfg = client_config(&ca, ca.svid(CLIENT_ID, 100), SIDECAR_ID);
    let mut open = tls_connect(cfg.clone(), sc.inbound[0]).await.unwrap();
    echo_roundtrip(&mut open, b"x").await;

    sc.shutdown.cancel();
    // Wait until the listener is closed (a readiness condition, polled).
    let mut refused = false;
    for _ in 0..100 {
        if TcpStream::connect(sc.inbound[0]).await.is_err() {
            refused = true;
            break;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "listener still accepting after shutdown");
    // The open connection still works while draining.
    echo_roundtrip(&mut open, b"still here").await;
    assert!(!sc.sidecar_task.is_finished());
    open.shutdown().await.unwrap();
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).await.unwrap();
    drop(open);
    let cut = tokio::time::timeout(Duration::from_secs(5), sc.sidecar_task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cut, 0, "nothing was cut");
}

#[tokio::test]
async fn silent_client_hits_handshake_timeout() {
    let ca = Ca::new("ca");
    let echo = echo_server().await;
    let toml = inbound_toml(echo, "tcp", "").replace(
        "handshake_timeout = \"5s\"",
        "handshake_timeout = \"200ms\"",
    );
    let sc = start(&toml).await;
    sc.identity.update(ca.material(SIDECAR_ID, 1)).unwrap();
    let mut idle = TcpStream::connect(sc.inbound[0]).await.unwrap();
    let mut b = Vec::new();
    // The sidecar closes the silent connection by itself.
    tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut b))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sc.handshakes(Direction::Inbound, "timeout"), 1);
}

/// Beyond `max_inbound_connections` a connection is closed at accept and
/// counted; the accept loop does not wait, and a slot freed is reused.
#[tokio::test]
async fn max_inbound_connections_refuses_beyond_the_cap() {
    let ca = Ca::new("ca");
    let echo = echo_server().await;
    let toml = inbound_toml(echo, "tcp", "").replace(
        "drain_timeout = \"5s\"",
        "drain_timeout = \"5s\"\nmax_inbound_connections = 1",
    );
    let sc = start(&toml).await;
    sc.identity.update(ca.material(SIDECAR_ID, 1)).unwrap();
    let cfg = client_config(&ca, ca.svid(CLIENT_ID, 100), SIDECAR_ID);
    let mut first = tls_connect(cfg.clone(), sc.inbound[0]).await.unwrap();
    echo_roundtrip(&mut first, b"one").await;

    // While the first holds the only slot, the second is closed at once.
    let refused = || {
        sc.metrics
            .refused
            .get_or_create(&RefusedLabels {
                direction: Direction::Inbound,
                reason: "connections",
            })
            .get()
    };
    let second = async {
        let mut s = tls_connect(cfg.clone(), sc.inbound[0]).await?;
        echo_roundtrip_io(&mut s, b"two").await
    }
    .await;
    assert!(second.is_err(), "second connection served beyond the cap");
    assert_eq!(refused(), 1);
    echo_roundtrip(&mut first, b"still one").await;

    drop(first);
    // The freed slot is reused (the first connection's task ends
    // asynchronously: retry until it has).
    let mut served = false;
    for _ in 0..200 {
        let attempt = async {
            let mut s = tls_connect(cfg.clone(), sc.inbound[0]).await?;
            echo_roundtrip_io(&mut s, b"three").await
        }
        .await;
        if attempt.is_ok() {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(served, "slot not reused");
}

async fn echo_roundtrip_io<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    msg: &[u8],
) -> std::io::Result<()> {
    s.write_all(msg).await?;
    s.flush().await?;
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).await?;
    assert_eq!(got, msg);
    Ok(())
}

/// Outbound, a resumed session is re-verified too: an upstream whose
/// certificate expired after the session was cached is refused (`expired`)
/// and the application's bytes never reach it.
#[tokio::test]
async fn outbound_resumption_with_expired_upstream_is_refused() {
    let ca = Ca::new("ca");
    // An upstream certificate valid for a few seconds, and a server that
    // issues long-lived tickets.
    let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
    p.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://example.org/db".try_into().unwrap(),
    )];
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::minutes(1);
    p.not_after = now + time::Duration::seconds(3);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    let not_after = std::time::SystemTime::now() + Duration::from_secs(3);
    let mut server_cfg = rustls::ServerConfig::builder_with_provider(crypto::provider())
        .with_protocol_versions(crypto::versions(false))
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    server_cfg.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().unwrap();
    let server_cfg = Arc::new(server_cfg);
    let up = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = up.local_addr().unwrap();
    let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let (kind_tx, mut kind_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = up.accept().await {
            let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg.clone());
            let tx = got_tx.clone();
            let kind_tx = kind_tx.clone();
            tokio::spawn(async move {
                if let Ok(mut s) = acceptor.accept(tcp).await {
                    let _ = kind_tx.send(s.get_ref().1.handshake_kind());
                    let mut b = [0u8; 64];
                    while let Ok(n) = s.read(&mut b).await {
                        if n == 0 {
                            break;
                        }
                        let _ = tx.send(b[..n].to_vec());
                        if s.write_all(&b[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
        }
    });
    let sc = start(&format!(
        "[[outbound]]\nlisten = \"127.0.0.1:0\"\nupstream = \"{up_addr}\"\nserver_id = \"spiffe://example.org/db\"\n"
    ))
    .await;
    sc.identity.update(ca.material(CLIENT_ID, 1)).unwrap();

    let mut app = TcpStream::connect(sc.outbound[0]).await.unwrap();
    echo_roundtrip(&mut app, b"first").await;
    drop(app);
    assert_eq!(got_rx.recv().await.unwrap(), b"first");
    assert_eq!(sc.handshakes(Direction::Outbound, "ok"), 1);
    assert_eq!(
        kind_rx.recv().await.unwrap(),
        Some(rustls::HandshakeKind::Full)
    );

    while std::time::SystemTime::now() < not_after + Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut app = TcpStream::connect(sc.outbound[0]).await.unwrap();
    let _ = app.write_all(b"secret").await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), app.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok() && rest.is_empty(),
        "the connection to the expired upstream stayed open or answered: {rest:?}"
    );
    assert_eq!(sc.handshakes(Direction::Outbound, "expired"), 1);
    assert_eq!(sc.handshakes(Direction::Outbound, "resumed"), 0);
    assert!(got_rx.try_recv().is_err(), "no byte reached the upstream");
    // It was a resumption (the upstream completed it), refused afterwards.
    assert_eq!(
        kind_rx.recv().await.unwrap(),
        Some(rustls::HandshakeKind::Resumed)
    );
}
