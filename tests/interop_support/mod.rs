//! Support for the interoperability tests: a deliberately small HTTP/2
//! client over a raw Unix socket that sends header blocks built by hand
//! (so it can carry any `:authority`, or none), a plain HTTP/1.1 GET, and a
//! server plus an agent (with metrics) serving one entry for this uid.
#![allow(dead_code, missing_docs)]

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use prost::Message;

use crate::common::{AgentProc, Server, TD, free_port, meshid, wait_for};
use meshid_proto::workload::JwtsvidRequest;

pub const WORKLOAD_ID: &str = "spiffe://example.org/interop";

/// A server, and an agent (with metrics) serving one entry for this uid.
pub struct Setup {
    pub server: Server,
    pub agent: AgentProc,
    /// The agent's metrics address.
    pub metrics: String,
}

pub fn setup() -> Setup {
    let server = Server::start("");
    let alias = format!("spiffe://{TD}/node/interop");
    let token = server.ok(&["token", "create", "--spiffe-id", &alias]);
    let uid = nix::unistd::geteuid().as_raw();
    server.ok(&[
        "entry",
        "create",
        "--parent-id",
        &alias,
        "--spiffe-id",
        WORKLOAD_ID,
        "--selector",
        &format!("unix:uid:{uid}"),
    ]);
    let dir = server.dir.path().join("agent");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("bootstrap.pem"), server.bundle_pem()).expect("bundle");
    let socket = dir.join("api.sock");
    let metrics = format!("127.0.0.1:{}", free_port());
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"{TD}\"\nserver_address = \"{}\"\ntrust_bundle_path = \"{d}/bootstrap.pem\"\ndata_dir = \"{d}/data\"\nsocket_path = \"{}\"\nmetrics_address = \"{metrics}\"\nmax_backoff = \"1s\"\n",
            server.node_addr,
            socket.display(),
            d = dir.display()
        ),
    )
    .expect("config");
    let agent = AgentProc::start_config(&dir, config, socket, Some(&token));
    Setup {
        server,
        agent,
        metrics,
    }
}

/// FetchJWTSVID for audience `interop`.
pub fn fetch_jwt(c: &mut RawH2, authority: Option<&[u8]>) -> Outcome {
    let req = JwtsvidRequest {
        audience: vec!["interop".into()],
        spiffe_id: String::new(),
    };
    c.unary(
        "/SpiffeWorkloadAPI/FetchJWTSVID",
        authority,
        &[("workload.spiffe.io", "true")],
        &req.encode_to_vec(),
    )
}

/// Waits until the agent has synced the entry and serves it.
pub fn wait_served(s: &Setup) {
    let sock = s.agent.socket.clone();
    wait_for(
        "the agent to serve the entry",
        Duration::from_secs(30),
        || {
            let mut c = RawH2::connect(&sock);
            (fetch_jwt(&mut c, Some(b"localhost")).grpc_status() == Some("0")).then_some(())
        },
    );
    wait_for("the X509-SVID", Duration::from_secs(30), || {
        meshid()
            .args(["agent", "api", "fetch", "x509", "--socket"])
            .arg(s.agent.endpoint())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|_| ())
    });
}

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

/// Every `:authority` form gRPC stacks send on a Unix socket, by name.
/// `None` is a request without `:authority`.
pub fn authority_forms(socket: &Path) -> Vec<(&'static str, Option<Vec<u8>>)> {
    let raw = socket.display().to_string();
    let encoded = raw.trim_start_matches('/').replace('/', "%2F");
    vec![
        (
            "percent-encoded path (gRPC C-core)",
            Some(encoded.into_bytes()),
        ),
        ("raw path (grpc-java)", Some(raw.into_bytes())),
        ("localhost (Go, Rust spiffe)", Some(b"localhost".to_vec())),
        ("empty", Some(Vec::new())),
        ("absent", None),
    ]
}

/// One HTTP/2 frame.
pub fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let l = u32::try_from(payload.len()).expect("len").to_be_bytes();
    let mut v = vec![l[1], l[2], l[3], ty, flags];
    v.extend_from_slice(&stream.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// What came back for one gRPC call.
#[derive(Debug)]
pub enum Outcome {
    /// The response: headers plus trailers, and the gRPC message bodies.
    Reply {
        headers: Vec<(String, String)>,
        messages: Vec<Vec<u8>>,
    },
    /// The server reset the stream with this error code.
    Reset(u32),
    /// The server sent GOAWAY with this error code.
    GoAway(u32),
    /// The connection ended.
    Closed,
}

impl Outcome {
    /// The value of header `name` in a reply.
    pub fn header(&self, name: &str) -> Option<&str> {
        match self {
            Outcome::Reply { headers, .. } => headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }

    /// `grpc-status` of a reply.
    pub fn grpc_status(&self) -> Option<&str> {
        self.header("grpc-status")
    }
}

/// A raw HTTP/2 client connection.
pub struct RawH2 {
    s: UnixStream,
    enc: loona_hpack::Encoder<'static>,
    dec: loona_hpack::Decoder<'static>,
    next_stream: u32,
}

impl RawH2 {
    /// Connects, sends the preface and an empty SETTINGS frame.
    pub fn connect(path: &Path) -> Self {
        let s = UnixStream::connect(path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        let mut c = Self {
            s,
            enc: loona_hpack::Encoder::new(),
            dec: loona_hpack::Decoder::new(),
            next_stream: 1,
        };
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        c.send(&hello);
        c
    }

    /// Writes raw bytes (errors ignored: the server may have closed).
    pub fn send(&mut self, bytes: &[u8]) {
        let _ = self.s.write_all(bytes);
    }

    /// The next frame, or `None` when the connection ended.
    pub fn read_frame(&mut self) -> Option<(u8, u8, u32, Vec<u8>)> {
        let mut h = [0u8; 9];
        match self.s.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("no frame from the server within the read timeout")
            }
            Err(_) => return None,
        }
        let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let mut p = vec![0u8; len];
        self.s.read_exact(&mut p).ok()?;
        let sid = u32::from_be_bytes([h[5] & 0x7f, h[6], h[7], h[8]]);
        Some((h[3], h[4], sid, p))
    }

    /// A new stream's id.
    pub fn stream_id(&mut self) -> u32 {
        let s = self.next_stream;
        self.next_stream += 2;
        s
    }

    /// HPACK-encodes a gRPC request's headers (the encoder indexes, so later
    /// requests on this connection refer to the dynamic table).
    pub fn header_block(
        &mut self,
        path: &str,
        authority: Option<&[u8]>,
        extra: &[(&str, &str)],
    ) -> Vec<u8> {
        let mut h: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.as_bytes()),
        ];
        if let Some(a) = authority {
            h.push((b":authority", a));
        }
        h.push((b"content-type", b"application/grpc"));
        h.push((b"te", b"trailers"));
        for (n, v) in extra {
            h.push((n.as_bytes(), v.as_bytes()));
        }
        self.enc.encode(h)
    }

    /// A unary gRPC call with `msg` (an encoded protobuf message).
    pub fn unary(
        &mut self,
        path: &str,
        authority: Option<&[u8]>,
        extra: &[(&str, &str)],
        msg: &[u8],
    ) -> Outcome {
        let sid = self.stream_id();
        let block = self.header_block(path, authority, extra);
        let mut body = vec![0u8];
        body.extend_from_slice(&u32::try_from(msg.len()).expect("len").to_be_bytes());
        body.extend_from_slice(msg);
        let mut out = frame(HEADERS, END_HEADERS, sid, &block);
        out.extend(frame(0x0, END_STREAM, sid, &body));
        self.send(&out);
        self.response(sid)
    }

    /// Reads frames until stream `sid` ends, is reset, or the connection
    /// goes away.
    pub fn response(&mut self, sid: u32) -> Outcome {
        let mut headers = Vec::new();
        let mut data = Vec::new();
        let mut block = Vec::new();
        loop {
            let Some((ty, flags, stream, p)) = self.read_frame() else {
                return Outcome::Closed;
            };
            match ty {
                SETTINGS if flags & ACK == 0 => self.send(&frame(SETTINGS, ACK, 0, &[])),
                PING if flags & ACK == 0 => self.send(&frame(PING, ACK, 0, &p)),
                GOAWAY => {
                    return Outcome::GoAway(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
                }
                RST_STREAM if stream == sid => {
                    return Outcome::Reset(u32::from_be_bytes([p[0], p[1], p[2], p[3]]));
                }
                HEADERS | CONTINUATION if stream == sid => {
                    block.extend_from_slice(&p);
                    if flags & END_HEADERS != 0 {
                        for (n, v) in self.dec.decode(&block).expect("server HPACK") {
                            headers.push((
                                String::from_utf8_lossy(&n).into_owned(),
                                String::from_utf8_lossy(&v).into_owned(),
                            ));
                        }
                        block.clear();
                    }
                    if flags & END_STREAM != 0 {
                        break;
                    }
                }
                0x0 if stream == sid => {
                    data.extend_from_slice(&p);
                    if flags & END_STREAM != 0 {
                        break;
                    }
                }
                _ => {}
            }
        }
        let mut messages = Vec::new();
        let mut d = &data[..];
        while d.len() >= 5 {
            let n = u32::from_be_bytes([d[1], d[2], d[3], d[4]]) as usize;
            messages.push(d[5..5 + n].to_vec());
            d = &d[5 + n..];
        }
        Outcome::Reply { headers, messages }
    }

    /// Reads until the server ends the connection; panics if it answers
    /// stream `sid` instead. Returns the GOAWAY code, if one was sent.
    pub fn expect_closed(&mut self, sid: u32) -> Option<u32> {
        loop {
            let (ty, _, stream, p) = self.read_frame()?;
            match ty {
                GOAWAY => return Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]])),
                HEADERS | 0x0 if stream == sid => panic!("the server answered a refused stream"),
                _ => {}
            }
        }
    }
}

/// `GET path` over HTTP/1.1; returns the body.
pub fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    match out.split_once("\r\n\r\n") {
        Some((head, body)) if head.contains("chunked") => dechunk(body),
        Some((_, body)) => body.to_string(),
        None => out,
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}
