//! Bad input against a real server process, case by case: each gets its
//! typed answer (a gRPC code, a per-item status, or a closed connection)
//! with a metric, and after each a good agent still has an SVID signed.
//!
//! Node API: garbage, plaintext HTTP/1.1 and plaintext HTTP/2 on the TLS
//! port; a handshake that never starts (it does not block others and ends
//! at `handshake_timeout`); idle connections past `max_pending_handshakes`
//! and established ones past `max_connections`; malformed protobuf and
//! messages past `max_message_size`; CSRs with a bad signature, unsupported
//! keys (RSA-1024, secp256k1), a certificate instead of a CSR, a huge
//! garbage CSR, and a batch past `max_sign_batch`. Admin API: selectors
//! that do not parse. Config: unknown keys, bad types, missing files, a
//! loosely permitted audit seal key.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::raw_codec::Raw;
use common::{Identity, Server, TD, key_and_csr, meshid, node_channel, wait_for};
use meshid_proto::node::node_client::NodeClient;
use meshid_proto::node::{AttestRequest, SignX509SvidsRequest, X509SvidParams};
use tonic::Code;
use tonic::codegen::http::uri::PathAndQuery;

const MAX_CONNECTIONS: usize = 12;
const MAX_PENDING: usize = 4;
const MAX_MESSAGE: usize = 256 * 1024;
const MAX_BATCH: usize = 8;

fn http_get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

/// Sum of every sample whose series starts with `prefix`.
fn sum(page: &str, prefix: &str) -> u64 {
    page.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

struct Env {
    server: Server,
    bundle: String,
    agent: Identity,
    entry: String,
}

impl Env {
    fn metrics(&self) -> String {
        http_get(&self.server.metrics_addr, "/metrics")
    }

    fn refused(&self, reason: &str) -> u64 {
        sum(
            &self.metrics(),
            &format!("meshid_server_node_tls_refused_total{{reason=\"{reason}\"}}"),
        )
    }

    fn refused_total(&self) -> u64 {
        sum(&self.metrics(), "meshid_server_node_tls_refused_total")
    }

    fn connections(&self) -> u64 {
        sum(&self.metrics(), "meshid_server_node_connections ")
    }

    fn invalid_csrs(&self) -> u64 {
        sum(
            &self.metrics(),
            "meshid_server_svids_issued_total{kind=\"x509\",outcome=\"invalid\"}",
        )
    }

    async fn agent_client(&self) -> NodeClient<tonic::transport::Channel> {
        NodeClient::new(
            node_channel(
                &self.server.node_addr,
                &self.bundle,
                Some(self.agent.clone()),
            )
            .await,
        )
    }

    /// Signs one item with `csr`: the item's status code and message.
    async fn sign_one(&self, csr: Vec<u8>) -> Result<(i32, String), tonic::Status> {
        let mut c = self.agent_client().await;
        let r = c
            .sign_x509_svids(SignX509SvidsRequest {
                params: vec![X509SvidParams {
                    entry_id: self.entry.clone(),
                    csr,
                }],
            })
            .await?
            .into_inner();
        let st = r.results[0].status.clone().unwrap_or_default();
        Ok((st.code, st.message))
    }

    /// A good agent still gets an SVID, on a fresh connection.
    async fn good(&self, after: &str) {
        let res =
            tokio::time::timeout(Duration::from_secs(60), self.sign_one(key_and_csr().1)).await;
        match res {
            Ok(Ok((0, _))) => {}
            other => panic!(
                "after {after}: a good agent was not served: {other:?}\n{}",
                self.server.log()
            ),
        }
    }

    /// A raw unary call on `path` (authenticated as the agent when `auth`).
    async fn raw_call(&self, path: &'static str, body: Vec<u8>, auth: bool) -> tonic::Status {
        let ch = node_channel(
            &self.server.node_addr,
            &self.bundle,
            auth.then(|| self.agent.clone()),
        )
        .await;
        let mut g = tonic::client::Grpc::new(ch);
        g.ready().await.expect("ready");
        match g
            .unary(
                tonic::Request::new(body),
                PathAndQuery::from_static(path),
                Raw,
            )
            .await
        {
            Ok(r) => panic!("{path} accepted a bad message: {:?}", r.into_inner()),
            Err(s) => s,
        }
    }
}

/// Writes `bytes` on a fresh connection and waits until the server closes it.
fn raw_bytes(addr: &str, bytes: &[u8]) -> Duration {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(bytes).expect("write");
    let mut sink = Vec::new();
    let r = s.read_to_end(&mut sink);
    // Closed, with or without a reset (unread bytes make the close a reset).
    assert!(
        r.is_ok()
            || r.as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "server did not close the connection: {r:?}"
    );
    started.elapsed()
}

/// An openssl-made CSR (DER) for a key the server must refuse.
fn openssl_csr(dir: &std::path::Path, name: &str, newkey: &[&str]) -> Vec<u8> {
    let out = dir.join(format!("{name}.csr"));
    let st = std::process::Command::new("openssl")
        .args([
            "req", "-new", "-nodes", "-subj", "/O=x", "-outform", "DER", "-keyout",
        ])
        .arg(dir.join(format!("{name}.key")))
        .arg("-out")
        .arg(&out)
        .args(newkey)
        .output()
        .expect("openssl (apt-get install openssl)");
    assert!(
        st.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    std::fs::read(out).expect("csr")
}

async fn setup() -> Env {
    let server = Server::start(&format!(
        "max_sign_batch = {MAX_BATCH}\n[node_api]\nmax_connections = {MAX_CONNECTIONS}\n\
         max_pending_handshakes = {MAX_PENDING}\nhandshake_timeout = \"3s\"\n\
         max_message_size = {MAX_MESSAGE}\n"
    ));
    let bundle = server.bundle_pem();
    let alias = format!("spiffe://{TD}/node/bad-input");
    let token = server.ok(&["token", "create", "--spiffe-id", &alias]);
    let entry = server.ok(&[
        "entry",
        "create",
        "--parent-id",
        &alias,
        "--spiffe-id",
        &format!("spiffe://{TD}/web"),
        "--selector",
        "unix:uid:1000",
    ]);
    let (key, csr) = key_and_csr();
    let mut c = NodeClient::new(node_channel(&server.node_addr, &bundle, None).await);
    let svid = c
        .attest(AttestRequest {
            attestor: "join_token".into(),
            payload: token.into_bytes(),
            csr,
        })
        .await
        .expect("attest")
        .into_inner()
        .svid
        .expect("svid");
    let env = Env {
        server,
        bundle,
        agent: (svid.cert_chain, key.serialize_der()),
        entry,
    };
    env.good("setup").await;
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_api_refuses_bad_input_and_keeps_serving() {
    let env = setup().await;
    let addr = env.server.node_addr.clone();

    // --- Not TLS at all on the TLS port.
    let not_tls: [(&str, Vec<u8>); 3] = [
        (
            "garbage",
            (0..4096u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        ),
        (
            "plaintext HTTP/1.1",
            b"GET /metrics HTTP/1.1\r\nHost: meshid\r\n\r\n".to_vec(),
        ),
        (
            "plaintext HTTP/2 (gRPC without TLS)",
            [
                &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
                &[0, 0, 0, 4, 0, 0, 0, 0, 0],
            ]
            .concat(),
        ),
    ];
    for (name, bytes) in not_tls {
        let before = env.refused_total();
        let took = raw_bytes(&addr, &bytes);
        wait_for(&format!("{name} counted"), Duration::from_secs(20), || {
            (env.refused_total() > before).then_some(())
        });
        assert!(env.server.log().contains("node API TLS handshake refused"));
        eprintln!("{name}: closed after {took:?}, counted in node_tls_refused_total");
        env.good(name).await;
    }

    // --- A handshake that never starts: others are served meanwhile, and it
    // ends at the handshake deadline.
    let before = env.refused("timeout");
    let started = Instant::now();
    let mut slow = TcpStream::connect(&addr).expect("connect");
    env.good("a silent connection (while it is open)").await;
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("t");
    let mut b = [0u8; 1];
    let n = slow.read(&mut b).unwrap_or(0);
    assert_eq!(n, 0, "silent connection got data");
    wait_for("timeout counted", Duration::from_secs(20), || {
        (env.refused("timeout") > before).then_some(())
    });
    eprintln!("silent connection: closed after {:?}", started.elapsed());
    env.good("a silent connection").await;

    // --- Idle connections past the handshake pool.
    let before = env.refused("handshake_limit");
    let idle: Vec<TcpStream> = (0..MAX_PENDING)
        .map(|_| TcpStream::connect(&addr).expect("connect"))
        .collect();
    wait_for("handshake pool full", Duration::from_secs(20), || {
        (env.connections() >= MAX_PENDING as u64).then_some(())
    });
    let took = raw_bytes(&addr, b"");
    assert!(took < Duration::from_secs(3), "refusal took {took:?}");
    assert!(env.refused("handshake_limit") > before);
    assert!(env.server.log().contains("limit reached"));
    drop(idle);
    wait_for("handshake pool drained", Duration::from_secs(20), || {
        (env.connections() == 0).then_some(())
    });
    env.good("a handshake flood").await;

    // --- Established connections past max_connections.
    let before = env.refused("connection_limit");
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        held.push(node_channel(&addr, &env.bundle, None).await);
    }
    wait_for("connections held", Duration::from_secs(20), || {
        (env.connections() >= MAX_CONNECTIONS as u64).then_some(())
    });
    let took = raw_bytes(&addr, b"");
    assert!(took < Duration::from_secs(3), "refusal took {took:?}");
    assert!(env.refused("connection_limit") > before);
    drop(held);
    wait_for("connections released", Duration::from_secs(30), || {
        (env.connections() == 0).then_some(())
    });
    env.good("a connection flood").await;

    // --- Malformed protobuf, authenticated and not.
    let junk = vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01];
    for (path, auth) in [
        ("/meshid.node.v1.Node/SignX509Svids", true),
        ("/meshid.node.v1.Node/Attest", false),
    ] {
        let st = env.raw_call(path, junk.clone(), auth).await;
        assert!(
            matches!(st.code(), Code::Internal | Code::InvalidArgument)
                && st.message().contains("decode"),
            "{path}: {st:?}"
        );
        eprintln!(
            "malformed protobuf to {path}: {:?} {}",
            st.code(),
            st.message()
        );
        env.good("malformed protobuf").await;
    }

    // --- Messages past max_message_size.
    let big = vec![0u8; MAX_MESSAGE + 1024];
    let huge_attest = prost::Message::encode_to_vec(&AttestRequest {
        attestor: "join_token".into(),
        payload: big.clone(),
        csr: Vec::new(),
    });
    let st = env
        .raw_call("/meshid.node.v1.Node/Attest", huge_attest, false)
        .await;
    assert!(
        matches!(st.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{st:?}"
    );
    eprintln!("oversized Attest: {:?} {}", st.code(), st.message());
    let mut c = env.agent_client().await;
    let st = c
        .sign_x509_svids(SignX509SvidsRequest {
            params: vec![X509SvidParams {
                entry_id: env.entry.clone(),
                csr: big,
            }],
        })
        .await
        .expect_err("oversized batch accepted");
    assert!(
        matches!(st.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{st:?}"
    );
    eprintln!("oversized SignX509Svids: {:?} {}", st.code(), st.message());
    env.good("oversized messages").await;

    // --- CSRs the server must refuse, one per item, with a typed status.
    let dir = env.server.dir.path().to_path_buf();
    let mut bad_sig = key_and_csr().1;
    let last = bad_sig.len() - 1;
    bad_sig[last] ^= 0x55;
    let cert = rcgen::CertificateParams::new(vec!["x.example".to_string()])
        .expect("params")
        .self_signed(&rcgen::KeyPair::generate().expect("key"))
        .expect("cert")
        .der()
        .to_vec();
    let mut huge = vec![0x30, 0x83, 0x03, 0xd0, 0x90];
    huge.resize(MAX_MESSAGE - 4096, 0x41);
    let csrs: Vec<(&str, Vec<u8>, &str)> = vec![
        ("bad signature", bad_sig, "signature"),
        (
            "RSA-1024 key",
            openssl_csr(&dir, "rsa1024", &["-newkey", "rsa:1024"]),
            "RSA key of 1024 bits",
        ),
        (
            "secp256k1 key",
            openssl_csr(
                &dir,
                "k1",
                &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp256k1"],
            ),
            "EC curve",
        ),
        ("a certificate, not a CSR", cert, "malformed CSR"),
        ("huge garbage CSR", huge, "malformed CSR"),
        ("empty CSR", Vec::new(), "malformed CSR"),
    ];
    for (name, csr, says) in csrs {
        let before = env.invalid_csrs();
        let (code, msg) = env.sign_one(csr).await.expect("the batch is answered");
        assert_eq!(code, Code::InvalidArgument as i32, "{name}: {msg}");
        assert!(msg.contains(says), "{name}: {msg}");
        assert!(env.invalid_csrs() > before, "{name} not counted");
        eprintln!("{name}: InvalidArgument {msg:?}");
        env.good(name).await;
    }

    // --- A batch past max_sign_batch.
    let mut c = env.agent_client().await;
    let st = c
        .sign_x509_svids(SignX509SvidsRequest {
            params: (0..=MAX_BATCH)
                .map(|_| X509SvidParams {
                    entry_id: env.entry.clone(),
                    csr: key_and_csr().1,
                })
                .collect(),
        })
        .await
        .expect_err("oversized batch accepted");
    assert!(
        matches!(st.code(), Code::InvalidArgument | Code::ResourceExhausted),
        "{st:?}"
    );
    eprintln!(
        "batch of {}: {:?} {}",
        MAX_BATCH + 1,
        st.code(),
        st.message()
    );
    env.good("an oversized batch").await;

    // --- Selectors that do not parse never reach the store.
    for sel in ["unix", ":uid:1000", "unix:", ""] {
        let out = env.server.cli(&[
            "entry",
            "create",
            "--parent-id",
            &format!("spiffe://{TD}/node/x"),
            "--spiffe-id",
            &format!("spiffe://{TD}/bad-selector"),
            "--selector",
            sel,
        ]);
        assert!(!out.status.success(), "selector {sel:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("must look like type:key:value"),
            "{sel:?}: {err}"
        );
    }
    let list = env.server.ok(&["entry", "list", "--output", "json"]);
    assert!(!list.contains("bad-selector"), "{list}");
    env.good("bad selectors").await;
}

/// `meshid server run --check` on `toml`; must fail with `says` on stderr.
fn refused_config(dir: &std::path::Path, toml: &str, says: &str) {
    let p = dir.join("server.toml");
    std::fs::write(&p, toml).expect("write");
    let out = meshid()
        .args(["server", "run", "--check", "--config"])
        .arg(&p)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted:\n{toml}");
    assert!(err.contains(says), "{toml}\nwant {says:?} in: {err}");
}

#[test]
fn server_config_errors_exit_non_zero_with_the_cause() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path().display();
    let base = format!(
        "trust_domain = \"{TD}\"\ndata_dir = \"{d}/data\"\nbind_address = \"127.0.0.1:0\"\n"
    );
    refused_config(
        dir.path(),
        &format!("{base}bind_adress = \"127.0.0.1:1\"\n"),
        "unknown field `bind_adress`",
    );
    refused_config(
        dir.path(),
        &format!("{base}[node_api]\nmax_conections = 1\n"),
        "unknown field `max_conections`",
    );
    refused_config(
        dir.path(),
        &format!("{base}max_sign_batch = \"many\"\n"),
        "invalid type",
    );
    refused_config(
        dir.path(),
        &format!("{base}default_svid_ttl = 5\n"),
        "invalid type",
    );
    refused_config(
        dir.path(),
        &format!("{base}[node_api]\nmax_connections = 0\n"),
        "node_api.max_connections",
    );
    refused_config(
        dir.path(),
        &format!("{base}[node_api]\nmax_connections = 4\nmax_pending_handshakes = 8\n"),
        "max_pending_handshakes must not exceed",
    );
    let p = dir.path().join("upstream.toml");
    std::fs::write(
        &p,
        format!("{base}admin_socket = \"{d}/admin.sock\"\n[upstream]\ncert_path = \"{d}/missing.pem\"\nkey_path = \"{d}/missing.key\"\n"),
    )
    .expect("write");
    let err = run_fails(&p);
    assert!(err.contains("missing.pem"), "{err}");
    let out = meshid()
        .args(["server", "run", "--check", "--config"])
        .arg(dir.path().join("nowhere.toml"))
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nowhere.toml"));
}

#[test]
fn loosely_permitted_seal_key_stops_the_server() {
    use std::os::unix::fs::PermissionsExt;
    let mut server = Server::start("");
    server.stop();
    let key = server.dir.path().join("data/audit-seal.key");
    let key = if key.exists() {
        key
    } else {
        std::fs::read_dir(server.dir.path().join("data"))
            .expect("data")
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().contains("seal") && p.is_file())
            .expect("a seal key in the data dir")
    };
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let err = run_fails(&server.config);
    assert!(err.contains(&key.display().to_string()), "{err}");
    eprintln!("0644 seal key: {}", err.lines().last().unwrap_or(""));
}

/// `meshid server run` on `config` must exit non-zero within a minute;
/// returns its stderr.
fn run_fails(config: &std::path::Path) -> String {
    let mut child = meshid()
        .args(["server", "run", "--config"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("server still running after 60 s on {}", config.display());
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(!status.success(), "server started: {err}");
    err
}
