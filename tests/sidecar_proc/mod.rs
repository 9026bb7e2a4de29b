//! Process-level sidecar test support: a real server and agent, entries for
//! sidecars (selected by the `meshid` executable) and for test clients
//! (selected by the test executable), SVIDs fetched from the agent's
//! Workload API, admin endpoint helpers, and small recording apps.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meshid_identity::verify::{Authorizer, SpiffeServerVerifier, TrustBundles};
use meshid_identity::{SpiffeId, SvidInfo, crypto};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::common::{AgentProc, Server, TD, wait_for};

/// Server + agent, with entries made by [`Mesh::start`].
pub struct Mesh {
    pub server: Server,
    pub agent: AgentProc,
    pub dir: PathBuf,
}

/// `spiffe://example.org/<name>`.
pub fn id(name: &str) -> String {
    format!("spiffe://{TD}/{name}")
}

impl Mesh {
    /// Starts a server and an agent. `sidecars` are entries for `meshid`
    /// processes (default TTL); `clients` are `(name, ttl)` entries for this
    /// test process.
    pub fn start(sidecars: &[&str], clients: &[(&str, &str)]) -> Self {
        let server = Server::start("");
        let alias = id("node/sc");
        let token = server.ok(&["token", "create", "--spiffe-id", &alias]);
        let uid = format!("unix:uid:{}", nix::unistd::geteuid().as_raw());
        let meshid_exe = std::fs::canonicalize(env!("CARGO_BIN_EXE_meshid")).expect("exe");
        let me = std::env::current_exe().expect("exe");
        let entries = sidecars
            .iter()
            .map(|n| (*n, "1h", meshid_exe.display().to_string()))
            .chain(
                clients
                    .iter()
                    .map(|(n, ttl)| (*n, *ttl, me.display().to_string())),
            );
        for (name, ttl, exe) in entries {
            server.ok(&[
                "entry",
                "create",
                "--parent-id",
                &alias,
                "--spiffe-id",
                &id(name),
                "--selector",
                &uid,
                "--selector",
                &format!("unix:path:{exe}"),
                "--ttl",
                ttl,
                "--hint",
                name,
            ]);
        }
        let dir = server.dir.path().to_path_buf();
        let agent = AgentProc::start(&dir.join("agent"), &server, Some(&token));
        Self { server, agent, dir }
    }

    /// The trust bundle of the test trust domain.
    pub fn bundles(&self) -> TrustBundles {
        let roots =
            meshid_identity::pem::parse_certs(self.server.bundle_pem().as_bytes()).expect("bundle");
        let mut b = TrustBundles::new();
        b.add(TD, &roots);
        b
    }

    /// An SVID for client entry `name` with at least `min_left` of lifetime.
    pub async fn svid(&self, name: &str, min_left: Duration) -> ClientSvid {
        let want = id(name);
        let client = spiffe::WorkloadApiClient::connect_to(self.agent.endpoint())
            .await
            .expect("workload API");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(all) = client.fetch_all_x509_svids().await
                && let Some(s) = all.iter().find(|s| s.spiffe_id().to_string() == want)
            {
                let chain: Vec<CertificateDer<'static>> = s
                    .cert_chain()
                    .iter()
                    .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
                    .collect();
                let info = SvidInfo::from_der(&chain[0]).expect("leaf");
                let left = info
                    .not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                if left >= min_left {
                    return ClientSvid {
                        chain,
                        key: s.private_key().as_bytes().to_vec(),
                        info,
                    };
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no SVID for {want}; agent log:\n{}",
                self.agent.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts a sidecar named `name` whose config is `body` plus the
    /// Workload API address, an admin address and its SPIFFE ID; waits until
    /// `/readyz` answers 200 (or, without inbound listeners, the SVID is in).
    pub fn sidecar(&self, name: &str, body: &str) -> RunningSidecar {
        let admin = free_addr();
        let cfg = format!(
            "workload_api_socket = \"{}\"\nadmin_address = \"{admin}\"\nspiffe_id = \"{}\"\n{body}",
            self.agent.endpoint(),
            id(name)
        );
        let proc = crate::common::sidecar(&self.dir, name, &cfg);
        let log_path = self.dir.join(format!("{name}.log"));
        let s = RunningSidecar {
            _proc: proc,
            admin,
            log_path,
        };
        wait_for(
            &format!("sidecar {name} ready"),
            Duration::from_secs(30),
            || (s.get("/readyz").0 == 200).then_some(()),
        );
        s
    }
}

/// A loopback address that was free a moment ago.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], crate::common::free_port()))
}

/// An SVID fetched from the agent for a test client.
pub struct ClientSvid {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Vec<u8>,
    pub info: SvidInfo,
}

impl ClientSvid {
    /// A rustls client config presenting this SVID, requiring `server_id`,
    /// with the default in-memory session cache (resumption on).
    pub fn client_config(&self, bundles: TrustBundles, server_id: &str) -> rustls::ClientConfig {
        let provider = crypto::provider();
        let verifier = SpiffeServerVerifier::new(
            bundles,
            Authorizer::Exact(SpiffeId::new(server_id).expect("id")),
            &provider,
        );
        rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(crypto::versions(false))
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(
                self.chain.clone(),
                PrivateKeyDer::Pkcs8(self.key.clone().into()),
            )
            .expect("client cert")
    }
}

/// mTLS connect with TLS server name `web.invalid` (the same name for every
/// listener, so a session cache offers one listener's ticket to another).
pub async fn tls_connect(
    cfg: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("web.invalid").expect("name"), tcp)
        .await
}

/// Whether the client side of `tls` resumed a session.
pub fn resumed(tls: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> bool {
    tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
}

/// Sends `request` on `tls` and reads one response (up to EOF or 5 s of
/// silence); `Err` when the connection failed before any byte came back.
pub async fn exchange<S>(tls: &mut S, request: &[u8]) -> Result<String, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(request).await.map_err(|e| e.to_string())?;
    tls.flush().await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                if response_complete(&out) {
                    break;
                }
            }
            Ok(Err(e)) if out.is_empty() => return Err(e.to_string()),
            Ok(Err(_)) => break,
        }
    }
    if out.is_empty() {
        return Err("connection closed without a response".into());
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn response_complete(buf: &[u8]) -> bool {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    buf.len() >= end + 4 + len
}

/// A running sidecar process with its admin address and log.
pub struct RunningSidecar {
    _proc: crate::common::Sidecar,
    pub admin: SocketAddr,
    pub log_path: PathBuf,
}

impl RunningSidecar {
    /// `GET path` on the admin address: status and body (0 if unreachable).
    pub fn get(&self, path: &str) -> (u16, String) {
        admin_get(self.admin, path)
    }

    /// A counter or gauge value from `/metrics` (0 when absent): `series` is
    /// the name with its labels as exposed, e.g.
    /// `meshid_sidecar_tls_handshakes_total{direction="inbound",outcome="ok"}`.
    pub fn metric(&self, series: &str) -> u64 {
        let (_, body) = self.get("/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    }

    /// `tls_handshakes_total` for inbound `outcome`.
    pub fn inbound(&self, outcome: &str) -> u64 {
        self.metric(&format!(
            "meshid_sidecar_tls_handshakes_total{{direction=\"inbound\",outcome=\"{outcome}\"}}"
        ))
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until a log line contains every one of `needles`; returns it.
    pub fn wait_log(&self, needles: &[&str]) -> String {
        wait_for(
            &format!("log line with {needles:?}"),
            Duration::from_secs(20),
            || {
                self.log()
                    .lines()
                    .find(|l| needles.iter().all(|n| l.contains(n)))
                    .map(str::to_string)
            },
        )
    }
}

/// `GET path` over plain HTTP/1.1: status and body; status 0 on I/O error.
pub fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let attempt = || -> std::io::Result<(u16, String)> {
        let mut c = TcpStream::connect(addr)?;
        c.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            c,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )?;
        let mut s = String::new();
        c.read_to_string(&mut s)?;
        let code = s
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = s.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
        Ok((code, body.unwrap_or_default()))
    };
    attempt().unwrap_or((0, String::new()))
}

/// One request as an application received it.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    /// Header fields, names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// Trailer fields of a chunked body.
    pub trailers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Seen {
    /// Values of header `name` (lower-case).
    pub fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// An HTTP/1.1 app that records each request (headers, chunked trailers,
/// body) and answers `200` with body `caller=<x-spiffe-id>`.
pub fn recording_app() -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let rec = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let rec = rec.clone();
            std::thread::spawn(move || {
                let Ok(mut w) = c.try_clone() else { return };
                let mut r = BufReader::new(c);
                while let Some(s) = read_request(&mut r) {
                    let caller = s.header("x-spiffe-id").join(",");
                    if let Ok(mut v) = rec.lock() {
                        v.push(s);
                    }
                    let body = format!("caller={caller}");
                    if write!(
                        w,
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

fn read_fields<R: BufRead>(r: &mut R) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end_matches(['\r', '\n']);
        if h.is_empty() {
            return Some(out);
        }
        let (k, v) = h.split_once(':')?;
        out.push((k.to_ascii_lowercase(), v.trim().to_string()));
    }
}

fn read_request<R: BufRead>(r: &mut R) -> Option<Seen> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let headers = read_fields(r)?;
    let mut s = Seen {
        headers,
        ..Seen::default()
    };
    let chunked = s
        .header("transfer-encoding")
        .iter()
        .any(|v| v.eq_ignore_ascii_case("chunked"));
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).ok()?;
            let n = usize::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
            if n == 0 {
                s.trailers = read_fields(r)?;
                break;
            }
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk).ok()?;
            s.body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(len) = s
        .header("content-length")
        .first()
        .and_then(|v| v.parse::<usize>().ok())
    {
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).ok()?;
        s.body = body;
    }
    Some(s)
}

/// A line echo app.
pub fn echo_app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
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
    addr
}

/// Sends one line through a plaintext connection to `addr` and reads the
/// echo (5 s read timeout).
pub fn echo_line(addr: SocketAddr, line: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut back = String::new();
    BufReader::new(s)
        .read_line(&mut back)
        .map_err(|e| e.to_string())?;
    if back.is_empty() {
        return Err("closed without an echo".into());
    }
    Ok(back.trim_end().to_string())
}
