//! The agent's `k8s` workload attestor against a stand-in kubelet (HTTPS,
//! bearer token, `/pods` as Kubernetes JSON) and a fake `/proc` tree.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use meshid_agent::attest::{AttestError, Caller, WorkloadAttestor};
use meshid_agent::k8s_attestor::{K8sAttestor, K8sAttestorConfig};
use serde_json::json;

const CID: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";
const UID: &str = "2c48913c-b29f-11e7-9350-020968147796";

/// A kubelet answering `/pods` with one pod, counting requests.
async fn kubelet(hits: Arc<AtomicUsize>) -> (u16, String) {
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
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    let pods = json!({"kind": "PodList", "apiVersion": "v1", "items": [{
        "metadata": {"name": "payments-7d9f", "namespace": "demo", "uid": UID,
                     "labels": {"app": "payments"}},
        "spec": {"serviceAccountName": "payments", "containers": [{"name": "app", "image": "payments:1"}]},
        "status": {"containerStatuses": [{"name": "app", "image": "payments:1", "imageID": "",
            "ready": true, "restartCount": 0, "containerID": format!("containerd://{CID}")}]}
    }]});
    let body = serde_json::to_vec(&pods).expect("json");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (a, hits, body) = (acceptor.clone(), hits.clone(), body.clone());
            tokio::spawn(async move {
                let Ok(tls) = a.accept(tcp).await else { return };
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        hits.fetch_add(1, Ordering::SeqCst);
                        let ok = req.uri().path() == "/pods"
                            && req
                                .headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                == Some("Bearer agent-token");
                        let mut r = hyper::Response::new(Full::new(Bytes::from(if ok {
                            body.clone()
                        } else {
                            b"Unauthorized".to_vec()
                        })));
                        if !ok {
                            *r.status_mut() = hyper::StatusCode::UNAUTHORIZED;
                        }
                        async move { Ok::<_, Infallible>(r) }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (port, cert.pem())
}

fn proc_entry(root: &std::path::Path, pid: i32, cgroup: &str) {
    let d = root.join(pid.to_string());
    std::fs::create_dir_all(&d).expect("mkdir");
    std::fs::write(d.join("cgroup"), cgroup).expect("w");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k8s_selectors_from_cgroup_and_kubelet() {
    let hits = Arc::new(AtomicUsize::new(0));
    let (port, ca) = kubelet(hits.clone()).await;
    let dir = tempfile::tempdir().expect("tmp");
    let proc_root = dir.path().join("proc");
    proc_entry(
        &proc_root,
        10,
        &format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID}.scope\n",
            UID.replace('-', "_")
        ),
    );
    proc_entry(&proc_root, 11, "0::/system.slice/sshd.service\n");
    proc_entry(
        &proc_root,
        12,
        &format!("0::/kubepods/besteffort/pod11111111-2222-3333-4444-555555555555/{CID}\n"),
    );
    // Issue 12 finding 3: the real pod's layout rebuilt below a delegated
    // subtree (pod UID and container ID are world-readable in /proc).
    proc_entry(
        &proc_root,
        13,
        &format!(
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/evil/kubepods/burstable/pod{UID}/{CID}\n"
        ),
    );
    // ...and nested below the real container.
    proc_entry(
        &proc_root,
        14,
        &format!("0::/kubepods/burstable/pod{UID}/{CID}/escape\n"),
    );
    std::fs::write(dir.path().join("token"), "agent-token\n").expect("w");
    std::fs::write(dir.path().join("ca.pem"), ca).expect("w");
    let cfg = |extra: &str| -> K8sAttestorConfig {
        toml::from_str(&format!(
            "node_name = \"node-1\"\nkubelet_url = \"https://127.0.0.1:{port}\"\ntoken_path = \"{d}/token\"\nkubelet_ca_path = \"{d}/ca.pem\"\n{extra}",
            d = dir.path().display()
        ))
        .expect("config")
    };
    let attestor = Arc::new(K8sAttestor::new(&cfg(""), proc_root.clone()).expect("attestor"));
    let attest = |pid: i32| {
        let a = attestor.clone();
        async move {
            tokio::task::spawn_blocking(move || a.attest(&Caller::new(Some(pid), 0, 0)))
                .await
                .expect("join")
        }
    };
    let mut got: Vec<String> = attest(10)
        .await
        .expect("pod caller")
        .into_iter()
        .map(|s| format!("{}:{}", s.r#type, s.value))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            "k8s:container-image:payments:1",
            "k8s:container-name:app",
            "k8s:node-name:node-1",
            "k8s:ns:demo",
            "k8s:pod-label:app:payments",
            "k8s:pod-name:payments-7d9f",
            &format!("k8s:pod-uid:{UID}"),
            "k8s:sa:payments",
        ]
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    // Cached: the second call does not ask the kubelet.
    attest(10).await.expect("again");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    // Not in a pod: no k8s selectors, no kubelet call.
    assert!(attest(11).await.expect("host process").is_empty());
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    // Look-alike and nested layouts: refused with a typed error, before any
    // kubelet call, never with the pod's selectors.
    for pid in [13, 14] {
        let e = attest(pid).await.expect_err("look-alike cgroup");
        assert!(matches!(e, AttestError::Cgroup { .. }), "{e:?}");
        assert_eq!(e.label(), "cgroup_layout");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    // A pod the kubelet does not know: one fresh fetch, then a typed error.
    let e = attest(12).await.expect_err("unknown pod");
    assert!(matches!(e, AttestError::UnknownPod { .. }), "{e:?}");
    assert_eq!(hits.load(Ordering::SeqCst), 2);

    // Wrong token: the kubelet's refusal is a typed error.
    std::fs::write(dir.path().join("token"), "stolen\n").expect("w");
    let fresh = K8sAttestor::new(&cfg(""), proc_root.clone()).expect("attestor");
    let e = tokio::task::spawn_blocking(move || fresh.attest(&Caller::new(Some(10), 0, 0)))
        .await
        .expect("join")
        .expect_err("401");
    assert!(
        matches!(&e, AttestError::Kubelet(m) if m.contains("401")),
        "{e:?}"
    );

    // A CA that did not sign the kubelet's certificate: TLS refuses.
    std::fs::write(dir.path().join("token"), "agent-token\n").expect("w");
    let other = rcgen::CertificateParams::new(vec!["x".to_string()])
        .expect("p")
        .self_signed(&rcgen::KeyPair::generate().expect("k"))
        .expect("c");
    std::fs::write(dir.path().join("ca.pem"), other.pem()).expect("w");
    let strict = K8sAttestor::new(&cfg(""), proc_root.clone()).expect("attestor");
    let e = tokio::task::spawn_blocking(move || strict.attest(&Caller::new(Some(10), 0, 0)))
        .await
        .expect("join")
        .expect_err("tls");
    assert!(
        matches!(&e, AttestError::Kubelet(m) if m.contains("TLS")),
        "{e:?}"
    );
    // ...unless verification is skipped on purpose.
    let lax =
        K8sAttestor::new(&cfg("skip_kubelet_verification = true"), proc_root).expect("attestor");
    tokio::task::spawn_blocking(move || lax.attest(&Caller::new(Some(10), 0, 0)))
        .await
        .expect("join")
        .expect("skip verification");
}
