//! HTTP/2 CONNECT tunnels between sidecars, with real processes: server,
//! agent, an outbound sidecar with `tunnel = "h2"` ("frontend") and an
//! inbound one accepting tunnels ("payments", tcp mode with PROXY v2).
//! Many short application connections share one TLS handshake and each
//! still carries the caller's SPIFFE ID; an SVID rotation opens a new tunnel
//! while a connection on the old one keeps working (the old tunnel drains).

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{AgentProc, Server, TD, agent_with_workloads, free_port, sidecar, wait_for};
use meshid_sidecar::proxy_protocol::decode_v2;

/// An application behind the inbound sidecar: reads the PROXY v2 header,
/// answers `id=<SPIFFE ID>\n`, then echoes until EOF.
fn id_echo_app() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut head = vec![0u8; 16];
                if s.read_exact(&mut head).is_err() {
                    return;
                }
                let len = u16::from_be_bytes([head[14], head[15]]) as usize;
                head.resize(16 + len, 0);
                if s.read_exact(&mut head[16..]).is_err() {
                    return;
                }
                let id = decode_v2(&head)
                    .ok()
                    .and_then(|h| h.spiffe_id)
                    .unwrap_or_else(|| "none".into());
                if s.write_all(format!("id={id}\n").as_bytes()).is_err() {
                    return;
                }
                let mut buf = [0u8; 16384];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    port
}

/// One short connection through the outbound sidecar: sends `msg`, closes
/// its side, returns everything the far end answered.
fn once(port: u16, msg: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(msg.as_bytes()).map_err(|e| e.to_string())?;
    s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

fn metrics(port: u16) -> String {
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("admin");
    c.set_read_timeout(Some(Duration::from_secs(5))).ok();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut s = String::new();
    c.read_to_string(&mut s).expect("read");
    s
}

/// The value of the sample `name{labels}` (0 when absent).
fn sample(body: &str, series: &str) -> u64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

struct Pair {
    _server: Server,
    _agent: AgentProc,
    _sidecars: Vec<common::Sidecar>,
    out_port: u16,
    out_admin: u16,
    in_admin: u16,
}

fn start(ttl: &str) -> Pair {
    let server = Server::start("");
    let agent = agent_with_workloads(&server, "tunnel", &["frontend", "payments"], Some(ttl));
    let dir = server.dir.path().to_path_buf();
    let ep = agent.endpoint();
    let app = id_echo_app();
    let [in_port, in_admin, out_port, out_admin] = [(); 4].map(|()| free_port());
    let inbound = sidecar(
        &dir,
        "payments",
        &format!(
            "workload_api_socket = \"{ep}\"\nadmin_address = \"127.0.0.1:{in_admin}\"\n\
             spiffe_id = \"spiffe://{TD}/payments\"\n[[inbound]]\nlisten = \"127.0.0.1:{in_port}\"\n\
             forward_to = \"127.0.0.1:{app}\"\nmode = \"tcp\"\nproxy_protocol = true\ntunnel = \"h2\"\n\
             allow = [\"spiffe://{TD}/frontend\"]\n"
        ),
    );
    let outbound = sidecar(
        &dir,
        "frontend",
        &format!(
            "workload_api_socket = \"{ep}\"\nadmin_address = \"127.0.0.1:{out_admin}\"\n\
             spiffe_id = \"spiffe://{TD}/frontend\"\n[[outbound]]\nlisten = \"127.0.0.1:{out_port}\"\n\
             upstream = \"127.0.0.1:{in_port}\"\nserver_id = \"spiffe://{TD}/payments\"\ntunnel = \"h2\"\n"
        ),
    );
    wait_for(
        "a first connection through the tunnel",
        Duration::from_secs(60),
        || {
            once(out_port, "hello")
                .ok()
                .filter(|o| o.ends_with("hello"))
        },
    );
    Pair {
        _server: server,
        _agent: agent,
        _sidecars: vec![inbound, outbound],
        out_port,
        out_admin,
        in_admin,
    }
}

#[test]
fn short_connections_share_one_tunnel_and_each_carries_the_caller_id() {
    let p = start("1h");
    let want = format!("id=spiffe://{TD}/frontend\n");
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (port, want) = (p.out_port, want.clone());
            std::thread::spawn(move || {
                for i in 0..50 {
                    let msg = format!("conn-{t}-{i}");
                    let got = once(port, &msg).expect("connection through the tunnel");
                    assert_eq!(got, format!("{want}{msg}"), "caller ID and echo");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    let out = metrics(p.out_admin);
    let inn = metrics(p.in_admin);
    let hs = |b: &str, d: &str, o: &str| {
        sample(
            b,
            &format!("meshid_sidecar_tls_handshakes_total{{direction=\"{d}\",outcome=\"{o}\"}}"),
        )
    };
    // 201 application connections (the readiness one included), one TLS
    // handshake on each side.
    assert_eq!(hs(&out, "outbound", "ok"), 1, "{out}");
    assert_eq!(hs(&out, "outbound", "resumed"), 0, "{out}");
    assert_eq!(hs(&inn, "inbound", "ok"), 1, "{inn}");
    assert_eq!(
        sample(
            &out,
            "meshid_sidecar_tunnels_opened_total{direction=\"outbound\"}"
        ),
        1
    );
    assert_eq!(
        sample(
            &out,
            "meshid_sidecar_tunnel_streams_total{direction=\"outbound\"}"
        ),
        201
    );
    assert_eq!(
        sample(
            &inn,
            "meshid_sidecar_tunnel_streams_total{direction=\"inbound\"}"
        ),
        201
    );
}

#[test]
fn rotation_opens_a_new_tunnel_and_drains_the_old_one() {
    // 4 s SVIDs: the agent renews them every few seconds.
    let p = start("4s");
    let want = format!("id=spiffe://{TD}/frontend\n");
    // A long connection on the first tunnel.
    let mut long = TcpStream::connect(("127.0.0.1", p.out_port)).expect("connect");
    long.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let echo = |s: &mut TcpStream, msg: &str| {
        s.write_all(msg.as_bytes()).expect("write");
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).expect("read");
        String::from_utf8(got).expect("utf-8")
    };
    let mut head = vec![0u8; want.len()];
    long.read_exact(&mut head).expect("identity line");
    assert_eq!(String::from_utf8_lossy(&head), want);
    assert_eq!(echo(&mut long, "before"), "before");
    let opened = |b: &str| {
        sample(
            b,
            "meshid_sidecar_tunnels_opened_total{direction=\"outbound\"}",
        )
    };
    let first = opened(&metrics(p.out_admin));
    // New connections keep succeeding while the frontend's SVID rotates; at
    // least one rotation moves them to a new tunnel.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    while opened(&metrics(p.out_admin)) < first + 2 {
        assert!(Instant::now() < deadline, "no new tunnel after rotations");
        let msg = format!("short-{n}");
        assert_eq!(
            once(p.out_port, &msg).expect("short"),
            format!("{want}{msg}")
        );
        n += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    // The connection opened on the first tunnel still works: old tunnels
    // drain, they are not cut.
    assert_eq!(echo(&mut long, "after"), "after");
    long.shutdown(Shutdown::Write).expect("shutdown");
    let mut rest = String::new();
    long.read_to_string(&mut rest).expect("eof");
    assert_eq!(rest, "");
    let out = metrics(p.out_admin);
    assert!(
        sample(&out, "meshid_sidecar_svid_rotations_total") >= 3,
        "{out}"
    );
}
