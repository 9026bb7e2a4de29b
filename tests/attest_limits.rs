//! Unauthenticated `Attest` calls cannot grow the server without bound: an
//! attestor name of 1 MiB leaves memory, the audit log, the log and
//! /metrics bounded; Kubernetes TokenReviews in flight are capped and the
//! API server's error bodies stay in the server log.

mod common;

use std::convert::Infallible;
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Server, key_and_csr, node_channel, wait_for};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use meshid_proto::node::AttestRequest;
use meshid_proto::node::node_client::NodeClient;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("proc status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(10)))
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

/// The value of one sample line of an OpenMetrics page.
fn sample(page: &str, prefix: &str) -> u64 {
    page.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

fn file_len(p: &std::path::Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_attestor_names_leave_memory_audit_log_and_metrics_bounded() {
    let server = Server::start("");
    let pid = server.pid().expect("pid");
    let audit = server.dir.path().join("data/audit.log");
    let log = server.dir.path().join("server.log");
    let mut client =
        NodeClient::new(node_channel(&server.node_addr, &server.bundle_pem(), None).await);
    let (_key, csr) = key_and_csr();
    let attest = |attestor: String| AttestRequest {
        attestor,
        payload: b"x".to_vec(),
        csr: csr.clone(),
    };
    // One small refusal first, so lazily built state exists before measuring.
    let e = client
        .attest(attest("nope".into()))
        .await
        .expect_err("unknown attestor");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    let (rss0, audit0, log0) = (rss_kib(pid), file_len(&audit), file_len(&log));
    let started = Instant::now();
    const N: u64 = 60;
    for i in 0..N {
        let name = format!("{i:02}{}", "A".repeat((1 << 20) - 2));
        let e = client
            .attest(attest(name))
            .await
            .expect_err("oversized attestor");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message().len() < 1024,
            "the refusal echoes {} bytes",
            e.message().len()
        );
    }
    let elapsed = started.elapsed();
    let rss1 = rss_kib(pid);
    let metrics = http_get(&server.metrics_addr, "/metrics");
    // The refusals queued to the audit writer are on disk shortly after.
    let audited = wait_for("refusal records", Duration::from_secs(10), || {
        let n = server
            .audit()
            .iter()
            .filter(|r| r["event"] == "attestation_failed" && r["attestor"] != "nope")
            .count() as u64;
        let suppressed = sample(&metrics, "meshid_server_audit_refusals_suppressed_total");
        (n + suppressed == N).then_some(n)
    });

    let grew = |a: u64, b: u64| b.saturating_sub(a);
    eprintln!(
        "after {N} calls in {elapsed:?}: RSS +{} KiB, audit +{} B ({audited} records), log +{} B, /metrics {} B",
        grew(rss0, rss1),
        grew(audit0, file_len(&audit)),
        grew(log0, file_len(&log)),
        metrics.len()
    );
    assert!(
        grew(rss0, rss1) < 32 * 1024,
        "server RSS grew by {} KiB",
        grew(rss0, rss1)
    );
    assert!(grew(audit0, file_len(&audit)) < 1 << 20, "audit log grew");
    assert!(grew(log0, file_len(&log)) < 1 << 20, "server log grew");
    assert!(
        metrics.len() < 64 * 1024,
        "/metrics is {} bytes",
        metrics.len()
    );
    assert_eq!(
        sample(
            &metrics,
            "meshid_server_attestations_total{attestor=\"other\",outcome=\"bad_request\"}"
        ),
        N + 1
    );
    assert!(!metrics.contains("AAAA"), "a caller's name became a label");
    // At most 10 refusals per second are audited; each names the caller's
    // attestor cut to 256 bytes and marked.
    assert!(
        audited <= 10 * (elapsed.as_secs() + 2),
        "{audited} refusals audited in {elapsed:?}"
    );
    let rec = server
        .audit()
        .into_iter()
        .rfind(|r| r["event"] == "attestation_failed")
        .expect("a refusal record");
    let name = rec["attestor"].as_str().expect("attestor");
    assert!(
        name.len() < 400 && name.ends_with("[truncated, 1048576 bytes]"),
        "{name}"
    );
    // The server still serves.
    let (_k, csr2) = key_and_csr();
    let e = client
        .attest(AttestRequest {
            attestor: "join_token".into(),
            payload: b"not-a-token".to_vec(),
            csr: csr2,
        })
        .await
        .expect_err("bad token");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
}

/// A stand-in API server whose TokenReviews wait for `release` and then
/// fail with a body that must never reach an agent.
struct SlowApi {
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    release: tokio::sync::watch::Receiver<bool>,
}

const SECRET: &str = "SECRET-API-SERVER-BODY";

impl SlowApi {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let _ = req.into_body().collect().await;
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let mut release = self.release.clone();
        let _ = release.wait_for(|r| *r).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let body = format!(
            "{{\"kind\":\"Status\",\"message\":\"{SECRET} {}\"}}",
            "x".repeat(4000)
        );
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        r
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psat_token_reviews_are_bounded_and_api_error_bodies_stay_in_the_log() {
    // The API server, over TLS with its own CA.
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let tls = rustls::ServerConfig::builder_with_provider(meshid_identity::crypto::provider())
        .with_protocol_versions(meshid_identity::crypto::versions(true))
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("tls");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (release_tx, release) = tokio::sync::watch::channel(false);
    let api = Arc::new(SlowApi {
        in_flight: AtomicUsize::new(0),
        max_in_flight: AtomicUsize::new(0),
        release,
    });
    {
        let api = api.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, api) = (acceptor.clone(), api.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let api = api.clone();
                        async move { Ok::<_, Infallible>(api.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("api-ca.pem"), cert.pem()).expect("ca");
    std::fs::write(dir.path().join("sa-token"), "server-token").expect("token");
    let cfg = common::write_server_config(
        dir.path(),
        &format!(
            "[node_attestor.k8s_psat]\ncluster = \"demo\"\nservice_accounts = [\"meshid-system:meshid-agent\"]\napi_server = \"https://127.0.0.1:{port}\"\nca_path = \"{d}/api-ca.pem\"\ntoken_path = \"{d}/sa-token\"\nmax_concurrent_reviews = 2\n",
            d = dir.path().display()
        ),
    );
    let server = Server::start_with(dir, cfg);
    let channel = node_channel(&server.node_addr, &server.bundle_pem(), None).await;

    let done = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let mut client = NodeClient::new(channel.clone());
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let (_k, csr) = key_and_csr();
            let r = client
                .attest(AttestRequest {
                    attestor: "k8s_psat".into(),
                    payload: br#"{"cluster":"demo","token":"agent-token"}"#.to_vec(),
                    csr,
                })
                .await;
            let e = r.expect_err("no attestation succeeds here");
            done.lock().expect("lock").push(e);
        }));
    }
    // Two reviews reach the API server and wait there; the other eight are
    // answered at once.
    let api2 = api.clone();
    let done2 = done.clone();
    tokio::task::spawn_blocking(move || {
        wait_for(
            "2 reviews in flight, 8 refused",
            Duration::from_secs(20),
            || {
                (api2.in_flight.load(Ordering::SeqCst) == 2
                    && done2.lock().expect("lock").len() == 8)
                    .then_some(())
            },
        )
    })
    .await
    .expect("wait");
    for e in done.lock().expect("lock").iter() {
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        assert!(e.message().contains("in flight"), "{}", e.message());
    }
    release_tx.send(true).expect("release");
    for t in tasks {
        t.await.expect("task");
    }
    assert_eq!(api.max_in_flight.load(Ordering::SeqCst), 2);
    let errors: Vec<tonic::Status> = done.lock().expect("lock").clone();
    let failed: Vec<_> = errors
        .iter()
        .filter(|e| e.code() != tonic::Code::Unavailable)
        .collect();
    assert_eq!(failed.len(), 2, "{errors:?}");
    for e in failed {
        assert_eq!(e.code(), tonic::Code::Internal, "{e:?}");
        assert!(!e.message().contains(SECRET), "leaked: {}", e.message());
        assert!(e.message().contains("server log"), "{}", e.message());
    }
    // The details are in the server's log, cut to a bounded length.
    let log = wait_for("API error logged", Duration::from_secs(5), || {
        let l = server.log();
        l.contains(SECRET).then_some(l)
    });
    let line = log.lines().find(|l| l.contains(SECRET)).expect("line");
    assert!(line.len() < 2048, "{} bytes logged", line.len());
    // The permits came back: the next attestation reaches the API server again.
    let mut client = NodeClient::new(channel.clone());
    let (_k, csr) = key_and_csr();
    let e = client
        .attest(AttestRequest {
            attestor: "k8s_psat".into(),
            payload: br#"{"cluster":"demo","token":"agent-token"}"#.to_vec(),
            csr,
        })
        .await
        .expect_err("API still failing");
    assert_eq!(e.code(), tonic::Code::Internal);
}
