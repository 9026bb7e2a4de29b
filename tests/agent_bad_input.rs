//! Bad input against a real agent process (with a real server), case by
//! case: each gets its typed answer or a closed connection, and after each a
//! good workload still fetches its SVID through the `spiffe` crate.
//!
//! Workload API: garbage and HTTP/1.1 on the socket, a caller that connects
//! and sends nothing (others are served meanwhile), malformed protobuf, a
//! message past the size limit, a call without the security header, and
//! callers that disconnect in the middle of a stream. Config: unknown keys,
//! bad types, a missing config or trust bundle file.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::raw_codec::Raw;
use common::{AgentProc, Server, TD, meshid};
use meshid_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use meshid_proto::workload::{JwtsvidRequest, X509svidRequest};
use tonic::Code;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};

fn with_header<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    r
}

async fn channel(agent: &AgentProc) -> Channel {
    let p = agent.socket.clone();
    Endpoint::from_static("http://workload.api")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = p.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .expect("connect Workload API")
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect metrics");
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

fn sum(page: &str, prefix: &str) -> u64 {
    page.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

struct Env {
    _server: Server,
    agent: AgentProc,
    metrics: String,
    want: String,
}

impl Env {
    fn metric(&self, prefix: &str) -> u64 {
        sum(&http_get(&self.metrics, "/metrics"), prefix)
    }

    /// A good workload fetches its SVID on a fresh connection.
    async fn good(&self, after: &str) {
        let res = tokio::time::timeout(Duration::from_secs(60), async {
            let c = spiffe::WorkloadApiClient::connect_to(self.agent.endpoint()).await?;
            c.fetch_x509_svid().await
        })
        .await;
        match res {
            Ok(Ok(s)) if s.spiffe_id().to_string() == self.want => {}
            other => panic!(
                "after {after}: a good workload was not served: {other:?}\n{}",
                self.agent.log()
            ),
        }
    }

    async fn raw_unary(&self, path: &'static str, body: Vec<u8>) -> tonic::Status {
        let mut g = tonic::client::Grpc::new(channel(&self.agent).await);
        g.ready().await.expect("ready");
        match g
            .unary(with_header(body), PathAndQuery::from_static(path), Raw)
            .await
        {
            Ok(r) => panic!("{path} accepted a bad message: {:?}", r.into_inner()),
            Err(s) => s,
        }
    }
}

async fn setup() -> Env {
    let server = Server::start("");
    let alias = format!("spiffe://{TD}/node/agent-bad-input");
    let token = server.ok(&["token", "create", "--spiffe-id", &alias]);
    let want = format!("spiffe://{TD}/workload");
    server.ok(&[
        "entry",
        "create",
        "--parent-id",
        &alias,
        "--spiffe-id",
        &want,
        "--selector",
        &format!("unix:uid:{}", nix::unistd::geteuid().as_raw()),
    ]);
    let dir = server.dir.path().join("agent");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("bootstrap.pem"), server.bundle_pem()).expect("bundle");
    let metrics = format!("127.0.0.1:{}", common::free_port());
    let socket = dir.join("api.sock");
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"{TD}\"\nserver_address = \"{}\"\ntrust_bundle_path = \"{d}/bootstrap.pem\"\n\
             data_dir = \"{d}/data\"\nsocket_path = \"{}\"\nmax_backoff = \"1s\"\nmetrics_address = \"{metrics}\"\n",
            server.node_addr,
            socket.display(),
            d = dir.display()
        ),
    )
    .expect("config");
    let agent = AgentProc::start_config(&dir, config, socket, Some(&token));
    let env = Env {
        _server: server,
        agent,
        metrics,
        want,
    };
    env.good("setup").await;
    env
}

/// Writes `bytes` on a fresh Workload API connection; waits for the close.
fn raw_socket(env: &Env, bytes: &[u8]) {
    let mut s = UnixStream::connect(&env.agent.socket).expect("connect");
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
        "agent did not close the connection: {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workload_api_refuses_bad_input_and_keeps_serving() {
    let env = setup().await;

    // --- Not HTTP/2 at all.
    for (name, bytes) in [
        (
            "garbage",
            (0..2048u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
                .collect::<Vec<u8>>(),
        ),
        ("HTTP/1.1", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
    ] {
        let before = env.metric("meshid_agent_workload_api_connections_refused_total");
        raw_socket(&env, &bytes);
        let after = env.metric("meshid_agent_workload_api_connections_refused_total");
        eprintln!("{name}: closed; connections_refused {before} -> {after}");
        env.good(name).await;
    }

    // --- A caller that connects and says nothing does not hold others up.
    let silent = UnixStream::connect(&env.agent.socket).expect("connect");
    env.good("a silent caller (while connected)").await;
    drop(silent);

    // --- Malformed protobuf and a message past the size limit.
    let st = env
        .raw_unary(
            "/SpiffeWorkloadAPI/FetchJWTSVID",
            vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01],
        )
        .await;
    assert!(
        matches!(st.code(), Code::Internal | Code::InvalidArgument)
            && st.message().contains("decode"),
        "{st:?}"
    );
    eprintln!("malformed protobuf: {:?} {}", st.code(), st.message());
    env.good("malformed protobuf").await;

    let huge = prost::Message::encode_to_vec(&JwtsvidRequest {
        audience: vec!["a".repeat(5 << 20)],
        spiffe_id: String::new(),
    });
    let st = env.raw_unary("/SpiffeWorkloadAPI/FetchJWTSVID", huge).await;
    assert!(
        matches!(st.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{st:?}"
    );
    eprintln!("5 MiB audience: {:?} {}", st.code(), st.message());
    env.good("an oversized message").await;

    // --- No security header.
    let mut c = SpiffeWorkloadApiClient::new(channel(&env.agent).await);
    let st = c
        .fetch_x509svid(tonic::Request::new(X509svidRequest {}))
        .await
        .expect_err("served without the security header");
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    eprintln!("no security header: {:?} {}", st.code(), st.message());
    env.good("a call without the security header").await;

    // --- Callers that disconnect mid-stream, many times over.
    for _ in 0..20 {
        let mut c = SpiffeWorkloadApiClient::new(channel(&env.agent).await);
        let mut s = c
            .fetch_x509svid(with_header(X509svidRequest {}))
            .await
            .expect("stream")
            .into_inner();
        let first = tokio::time::timeout(Duration::from_secs(30), s.message())
            .await
            .expect("first message in time")
            .expect("first message");
        assert!(first.is_some());
        drop(s);
        drop(c);
    }
    // Half a stream: the request headers, then the socket is gone.
    for _ in 0..5 {
        let mut s = UnixStream::connect(&env.agent.socket).expect("connect");
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .expect("write");
    }
    env.good("callers that disconnect mid-stream").await;
    let requests = env.metric("meshid_agent_workload_api_requests_total{rpc=\"FetchX509SVID\"");
    assert!(requests >= 20, "streams not counted: {requests}");
    // The agent is still the same process.
    assert!(env.agent.pid().is_some());
}

/// `meshid agent run` on `toml` must exit non-zero with `says` on stderr.
fn agent_refuses(dir: &std::path::Path, toml: &str, says: &str) {
    let p = dir.join("agent.toml");
    std::fs::write(&p, toml).expect("write");
    let mut child = meshid()
        .args(["agent", "run", "--config"])
        .arg(&p)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("agent still running after 60 s with:\n{toml}");
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(!status.success(), "agent ran with:\n{toml}");
    assert!(err.contains(says), "{toml}\nwant {says:?} in: {err}");
    eprintln!("refused ({says}): {}", err.lines().last().unwrap_or(""));
}

#[test]
fn agent_config_errors_exit_non_zero_with_the_cause() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path().display();
    let base = format!(
        "trust_domain = \"{TD}\"\nserver_address = \"127.0.0.1:1\"\ndata_dir = \"{d}/data\"\nsocket_path = \"{d}/api.sock\"\n"
    );
    agent_refuses(
        dir.path(),
        &format!("{base}sockett = \"x\"\n"),
        "unknown field `sockett`",
    );
    agent_refuses(
        dir.path(),
        &format!("{base}rotation_fraction = \"half\"\n"),
        "invalid type",
    );
    agent_refuses(
        dir.path(),
        &format!("{base}max_backoff = 5\n"),
        "invalid type",
    );
    agent_refuses(
        dir.path(),
        &format!("{base}rotation_fraction = 2.0\n"),
        "rotation_fraction",
    );
    agent_refuses(
        dir.path(),
        &format!("{base}trust_bundle_path = \"{d}/missing-bundle.pem\"\njoin_token = \"t\"\n"),
        "missing-bundle.pem",
    );
    let out = meshid()
        .args(["agent", "run", "--config"])
        .arg(dir.path().join("nowhere.toml"))
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nowhere.toml"));
}
