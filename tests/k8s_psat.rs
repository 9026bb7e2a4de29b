//! Kubernetes PSAT node attestation with real server and agent processes and
//! a stand-in Kubernetes API server (HTTPS, bearer auth, TokenReview and pod
//! lookups with the API's own JSON types).

mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{AgentProc, Server, TD, key_and_csr, meshid, node_channel};
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewStatus, UserInfo};
use k8s_openapi::api::core::v1::{Pod, PodSpec};
use meshid_proto::node::AttestRequest;
use meshid_proto::node::node_client::NodeClient;

/// The token the meshid server must present to the API server.
const SERVER_SA_TOKEN: &str = "server-sa-token";
const AGENT_SA: &str = "system:serviceaccount:meshid-system:meshid-agent";

/// What the stand-in API server knows.
struct FakeApi {
    requests: AtomicUsize,
}

fn review_for(token: &str) -> TokenReviewStatus {
    let extra = |node: Option<&str>, pod: &str, uid: &str| {
        let mut m = BTreeMap::new();
        m.insert(
            "authentication.kubernetes.io/pod-name".to_string(),
            vec![pod.to_string()],
        );
        m.insert(
            "authentication.kubernetes.io/pod-uid".to_string(),
            vec![uid.to_string()],
        );
        if let Some(n) = node {
            m.insert(
                "authentication.kubernetes.io/node-name".to_string(),
                vec![n.to_string()],
            );
        }
        m
    };
    let ok = |user: &str, aud: &str, extra| TokenReviewStatus {
        authenticated: Some(true),
        audiences: Some(vec![aud.to_string()]),
        user: Some(UserInfo {
            username: Some(user.to_string()),
            extra: Some(extra),
            ..UserInfo::default()
        }),
        ..TokenReviewStatus::default()
    };
    match token {
        "agent-node-1" => ok(
            AGENT_SA,
            "meshid-server",
            extra(Some("node-1"), "agent-a", "uid-a"),
        ),
        // Kubernetes < 1.30: no node name in the review; the pod says.
        "agent-node-2" => ok(AGENT_SA, "meshid-server", extra(None, "agent-b", "uid-b")),
        // The pod was replaced since the token was issued.
        "agent-stale-pod" => ok(AGENT_SA, "meshid-server", extra(None, "agent-b", "uid-old")),
        "default-sa" => ok(
            "system:serviceaccount:default:default",
            "meshid-server",
            extra(Some("node-1"), "x", "uid-x"),
        ),
        "other-audience" => ok(AGENT_SA, "vault", extra(Some("node-1"), "agent-a", "uid-a")),
        _ => TokenReviewStatus {
            authenticated: Some(false),
            error: Some("invalid bearer token".into()),
            ..TokenReviewStatus::default()
        },
    }
}

fn json(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

impl FakeApi {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let authorized = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            == Some(&format!("Bearer {SERVER_SA_TOKEN}"));
        if !authorized {
            return json(
                StatusCode::UNAUTHORIZED,
                br#"{"kind":"Status","code":401}"#.to_vec(),
            );
        }
        let path = req.uri().path().to_string();
        match (req.method().as_str(), path.as_str()) {
            ("POST", "/apis/authentication.k8s.io/v1/tokenreviews") => {
                let body = req.into_body().collect().await.expect("body").to_bytes();
                let review: TokenReview = serde_json::from_slice(&body).expect("TokenReview");
                assert_eq!(
                    review.spec.audiences.as_deref(),
                    Some(&["meshid-server".to_string()][..])
                );
                let answer = TokenReview {
                    status: Some(review_for(&review.spec.token)),
                    ..review
                };
                json(
                    StatusCode::CREATED,
                    serde_json::to_vec(&answer).expect("json"),
                )
            }
            ("GET", "/api/v1/namespaces/meshid-system/pods/agent-b") => {
                let mut pod = Pod::default();
                pod.metadata.name = Some("agent-b".into());
                pod.metadata.uid = Some("uid-b".into());
                pod.spec = Some(PodSpec {
                    node_name: Some("node-2".into()),
                    ..PodSpec::default()
                });
                json(StatusCode::OK, serde_json::to_vec(&pod).expect("json"))
            }
            _ => json(
                StatusCode::NOT_FOUND,
                br#"{"kind":"Status","code":404}"#.to_vec(),
            ),
        }
    }
}

/// Serves the stand-in API on 127.0.0.1 over TLS; returns its port and CA PEM.
async fn start_fake_api(api: Arc<FakeApi>) -> (u16, String, tokio::task::JoinHandle<()>) {
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
        .expect("tls config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
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
    (port, cert.pem(), task)
}

fn psat_payload(cluster: &str, token: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "cluster": cluster, "token": token })).expect("json")
}

async fn attest(
    client: &mut NodeClient<tonic::transport::Channel>,
    payload: Vec<u8>,
) -> Result<String, tonic::Status> {
    let (_key, csr) = key_and_csr();
    let r = client
        .attest(AttestRequest {
            attestor: "k8s_psat".into(),
            payload,
            csr,
        })
        .await?
        .into_inner();
    let svid = r.svid.expect("svid");
    Ok(svid.spiffe_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_attest_with_kubernetes_service_account_tokens() {
    let api = Arc::new(FakeApi {
        requests: AtomicUsize::new(0),
    });
    let (api_port, api_ca, api_task) = start_fake_api(api.clone()).await;
    let dir = tempfile::tempdir().expect("tmp");
    let ca_path = dir.path().join("kube-ca.pem");
    let token_path = dir.path().join("server-sa-token");
    std::fs::write(&ca_path, api_ca).expect("w");
    std::fs::write(&token_path, format!("{SERVER_SA_TOKEN}\n")).expect("w");
    let server = Server::start(&format!(
        "[node_attestor.k8s_psat]\ncluster = \"demo\"\nservice_accounts = [\"meshid-system:meshid-agent\"]\napi_server = \"https://127.0.0.1:{api_port}\"\nca_path = \"{}\"\ntoken_path = \"{}\"\n",
        ca_path.display(),
        token_path.display()
    ));

    // One entry for every node of the cluster, parented by the cluster alias.
    let alias = format!("spiffe://{TD}/meshid/k8s/demo");
    let uid = nix::unistd::geteuid().as_raw();
    server.ok(&[
        "entry",
        "create",
        "--parent-id",
        &alias,
        "--spiffe-id",
        &format!("spiffe://{TD}/ns/demo/sa/web"),
        "--selector",
        &format!("unix:uid:{uid}"),
    ]);

    // A real agent attests with its projected token file and serves the entry.
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).expect("mkdir");
    std::fs::write(agent_dir.join("bootstrap.pem"), server.bundle_pem()).expect("w");
    std::fs::write(agent_dir.join("psat"), "agent-node-1\n").expect("w");
    let socket = agent_dir.join("api.sock");
    let agent_toml = agent_dir.join("agent.toml");
    std::fs::write(
        &agent_toml,
        format!(
            "trust_domain = \"{TD}\"\nserver_address = \"{}\"\ntrust_bundle_path = \"{d}/bootstrap.pem\"\ndata_dir = \"{d}/data\"\nsocket_path = \"{}\"\nmax_backoff = \"1s\"\n[node_attestor]\nkind = \"k8s_psat\"\ncluster = \"demo\"\ntoken_path = \"{d}/psat\"\n",
            server.node_addr,
            socket.display(),
            d = agent_dir.display()
        ),
    )
    .expect("w");
    let mut agent = AgentProc::start_config(&agent_dir, agent_toml, socket.clone(), None);
    let fetch = || {
        meshid()
            .args(["agent", "api", "fetch", "x509", "--socket"])
            .arg(format!("unix://{}", socket.display()))
            .output()
            .expect("fetch")
    };
    let out = common::wait_for("workload SVID", std::time::Duration::from_secs(20), || {
        let o = fetch();
        o.status.success().then_some(o)
    });
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("spiffe://{TD}/ns/demo/sa/web")),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let node1 = format!("spiffe://{TD}/meshid/agent/k8s_psat/demo/node-1");
    let agents = server.ok(&["agent", "list"]);
    assert!(agents.contains(&node1), "agent list: {agents}");
    let audit = server.audit();
    let ev = audit
        .iter()
        .find(|e| e["event"] == "attestation_succeeded" && e["agent"] == node1.as_str())
        .expect("attestation audited");
    assert_eq!(ev["node_name"], "node-1");
    assert_eq!(ev["service_account"], "meshid-system:meshid-agent");
    assert!(
        !serde_json::to_string(&audit)
            .expect("json")
            .contains("agent-node-1"),
        "the token itself must never reach the audit log"
    );

    // The node loses its data: the agent attests again by itself, as the same node.
    agent.stop();
    std::fs::remove_dir_all(agent_dir.join("data")).expect("rm data");
    agent.restart();
    common::wait_for(
        "SVID after re-attestation",
        std::time::Duration::from_secs(20),
        || fetch().status.success().then_some(()),
    );

    // Everything else is refused, with a reason, straight from the node API.
    let mut client =
        NodeClient::new(node_channel(&server.node_addr, &server.bundle_pem(), None).await);
    let refused = [
        (
            "default-sa",
            "demo",
            tonic::Code::PermissionDenied,
            "not allowed",
        ),
        (
            "other-audience",
            "demo",
            tonic::Code::PermissionDenied,
            "audiences",
        ),
        (
            "forged",
            "demo",
            tonic::Code::PermissionDenied,
            "invalid bearer token",
        ),
        (
            "agent-node-1",
            "prod",
            tonic::Code::PermissionDenied,
            "cluster",
        ),
        (
            "agent-stale-pod",
            "demo",
            tonic::Code::PermissionDenied,
            "no longer the pod",
        ),
    ];
    for (token, cluster, code, needle) in refused {
        let e = attest(&mut client, psat_payload(cluster, token))
            .await
            .expect_err(token);
        assert_eq!(e.code(), code, "{token}: {e:?}");
        assert!(e.message().contains(needle), "{token}: {}", e.message());
    }
    let e = attest(&mut client, b"not json".to_vec())
        .await
        .expect_err("garbage");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    // Kubernetes < 1.30: the node comes from the pod the token is bound to.
    let id = attest(&mut client, psat_payload("demo", "agent-node-2"))
        .await
        .expect("node-2");
    assert_eq!(
        id,
        format!("spiffe://{TD}/meshid/agent/k8s_psat/demo/node-2")
    );

    // A banned node cannot come back with a fresh token; an evicted one can.
    server.ok(&["agent", "ban", &node1]);
    let e = attest(&mut client, psat_payload("demo", "agent-node-1"))
        .await
        .expect_err("banned");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("banned"), "{}", e.message());
    server.ok(&["agent", "evict", &node1]);
    attest(&mut client, psat_payload("demo", "agent-node-1"))
        .await
        .expect("after eviction");

    // The API server is gone: a retryable error, not a refusal.
    let before = api.requests.load(Ordering::SeqCst);
    assert!(
        before >= 8,
        "every attestation asked the API server ({before})"
    );
    api_task.abort();
    let _ = api_task.await;
    let e = attest(&mut client, psat_payload("demo", "agent-node-1"))
        .await
        .expect_err("api down");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    drop(agent);
}
