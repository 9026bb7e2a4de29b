//! The real `meshid injector run` over HTTPS, fed real AdmissionReview v1
//! documents; returned patches are applied (RFC 6902) to the submitted pod and
//! the result is read back as a Kubernetes `Pod`.

mod common;

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, Stdio};
use std::sync::Arc;

use base64::Engine as _;
use common::meshid;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

struct Injector {
    child: Child,
    addr: String,
    ca: String,
    dir: tempfile::TempDir,
}

impl Drop for Injector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start() -> Injector {
    let dir = tempfile::tempdir().expect("tmp");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec![
        "meshid-injector.meshid-system.svc".to_string(),
        "127.0.0.1".to_string(),
    ])
    .expect("params")
    .self_signed(&key)
    .expect("cert");
    std::fs::write(dir.path().join("tls.crt"), cert.pem()).expect("w");
    std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).expect("w");
    let cfg = dir.path().join("injector.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\ntls_cert = \"{d}/tls.crt\"\ntls_key = \"{d}/tls.key\"\nimage = \"meshid:test\"\n",
            d = dir.path().display()
        ),
    )
    .expect("w");
    let mut child = meshid()
        .args(["injector", "run", "--config"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn injector");
    // The readiness signal: the bound address on stdout.
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    Injector {
        child,
        addr,
        ca: cert.pem(),
        dir,
    }
}

/// POSTs `body` to `path`; returns status and body.
async fn post(inj: &Injector, path: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
    let mut roots = rustls::RootCertStore::empty();
    for c in meshid_identity::pem::parse_certs(inj.ca.as_bytes()).expect("ca") {
        roots.add(c).expect("root");
    }
    let cfg = rustls::ClientConfig::builder_with_provider(meshid_identity::crypto::provider())
        .with_protocol_versions(meshid_identity::crypto::versions(true))
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(&inj.addr)
        .await
        .expect("connect");
    let name =
        rustls::pki_types::ServerName::try_from("meshid-injector.meshid-system.svc").expect("name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("tls");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("http");
    tokio::spawn(conn);
    let req = hyper::Request::post(path)
        .header("host", "meshid-injector.meshid-system.svc")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("req");
    let resp = send.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, body.to_vec())
}

fn review(uid: &str, operation: &str, pod: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "demo",
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": null,
            "dryRun": false
        }
    }))
    .expect("json")
}

/// The answer's response, and the pod after applying its patch (if any).
async fn admit(inj: &Injector, uid: &str, operation: &str, pod: &Value) -> (Value, Option<Value>) {
    let (status, body) = post(inj, "/mutate", review(uid, operation, pod)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let answer: Value = serde_json::from_slice(&body).expect("answer json");
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = answer["response"].clone();
    assert_eq!(response["uid"], uid);
    let patched = response["patch"].as_str().map(|b64| {
        assert_eq!(response["patchType"], "JSONPatch");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("base64");
        let patch: json_patch::Patch = serde_json::from_slice(&raw).expect("RFC 6902 patch");
        let mut doc = pod.clone();
        json_patch::patch(&mut doc, &patch).expect("patch applies to the submitted pod");
        doc
    });
    (response, patched)
}

fn app_pod(extra_annotations: Value, spec: Value) -> Value {
    let mut annotations = json!({
        "meshid.io/inject": "true",
        "meshid.io/sidecar-config": "payments-sidecar"
    });
    if let (Some(a), Some(e)) = (annotations.as_object_mut(), extra_annotations.as_object()) {
        for (k, v) in e {
            a.insert(k.clone(), v.clone());
        }
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "payments-", "namespace": "demo",
                     "labels": {"app": "payments"}, "annotations": annotations},
        "spec": spec
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_injects_native_sidecar_idempotently() {
    let inj = start();

    // (a) A plain annotated pod, with its own env, mounts, volumes and init container.
    let pod = app_pod(
        json!({}),
        json!({
            "serviceAccountName": "payments",
            "initContainers": [{"name": "migrate", "image": "payments:1", "args": ["migrate"]}],
            "volumes": [{"name": "data", "emptyDir": {}}],
            "containers": [
                {"name": "app", "image": "payments:1", "ports": [{"containerPort": 8080}],
                 "env": [{"name": "MODE", "value": "prod"}],
                 "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
                {"name": "metrics", "image": "exporter:1"}
            ]
        }),
    );
    let (resp, patched) = admit(&inj, "a", "CREATE", &pod).await;
    assert_eq!(resp["allowed"], true);
    let patched = patched.expect("a patch for an annotated pod");
    let typed: Pod = serde_json::from_value(patched.clone()).expect("result is a Pod");
    let spec = typed.spec.clone().expect("spec");
    let inits = spec.init_containers.clone().expect("init containers");
    assert_eq!(inits[0].name, "meshid-sidecar", "sidecar first: {inits:?}");
    assert_eq!(inits[0].restart_policy.as_deref(), Some("Always"));
    assert_eq!(inits[0].image.as_deref(), Some("meshid:test"));
    assert_eq!(
        inits[0].args.as_deref(),
        Some(
            &[
                "sidecar",
                "run",
                "--config",
                "/etc/meshid/sidecar/sidecar.toml"
            ]
            .map(String::from)[..]
        )
    );
    assert_eq!(inits[1].name, "migrate");
    let volumes = spec.volumes.clone().expect("volumes");
    let socket = volumes
        .iter()
        .find(|v| v.name == "meshid-agent-socket")
        .expect("socket volume");
    assert_eq!(
        socket.host_path.as_ref().map(|h| h.path.as_str()),
        Some("/run/meshid/agent")
    );
    let config = volumes
        .iter()
        .find(|v| v.name == "meshid-sidecar-config")
        .expect("config volume");
    assert_eq!(
        config.config_map.as_ref().map(|c| c.name.as_str()),
        Some("payments-sidecar")
    );
    assert!(volumes.iter().any(|v| v.name == "data"));
    for c in &spec.containers {
        let env = c.env.clone().unwrap_or_default();
        assert!(
            env.iter().any(|e| e.name == "SPIFFE_ENDPOINT_SOCKET"
                && e.value.as_deref() == Some("unix:///run/meshid/agent/api.sock")),
            "{}: {env:?}",
            c.name
        );
        assert!(
            c.volume_mounts
                .iter()
                .flatten()
                .any(|m| m.name == "meshid-agent-socket" && m.read_only == Some(true))
        );
    }
    let app = &spec.containers[0];
    assert_eq!(app.env.as_ref().map(Vec::len), Some(2), "MODE kept");
    assert_eq!(app.ports.as_ref().map(Vec::len), Some(1));
    assert_eq!(
        typed
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("meshid.io/status"))
            .map(String::as_str),
        Some("injected")
    );

    // (b) The injected pod again: admitted, not changed twice.
    let (resp, again) = admit(&inj, "b", "CREATE", &patched).await;
    assert_eq!(resp["allowed"], true);
    assert!(again.is_none(), "re-injection: {resp}");

    // (c) Opted out.
    let out = app_pod(
        json!({"meshid.io/inject": "false"}),
        json!({"containers": [{"name": "a", "image": "a"}]}),
    );
    let (resp, p) = admit(&inj, "c", "CREATE", &out).await;
    assert_eq!(resp["allowed"], true);
    assert!(p.is_none());

    // (d) A bare pod: no annotations map beyond ours, no env, no volumes, no inits.
    let bare = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "bare", "annotations": {"meshid.io/inject": "true", "meshid.io/sidecar-config": "bare"}},
        "spec": {"containers": [{"name": "a", "image": "a"}]}
    });
    let (_, p) = admit(&inj, "d", "CREATE", &bare).await;
    let typed: Pod = serde_json::from_value(p.expect("patch")).expect("pod");
    let spec = typed.spec.expect("spec");
    assert_eq!(spec.init_containers.map(|v| v.len()), Some(1));
    assert_eq!(spec.volumes.map(|v| v.len()), Some(2));
    assert_eq!(spec.containers[0].env.as_ref().map(Vec::len), Some(1));

    // Asking for injection without a config: admitted unchanged, with a warning.
    let no_cfg = json!({"metadata": {"name": "x", "annotations": {"meshid.io/inject": "true"}},
                        "spec": {"containers": [{"name": "a"}]}});
    let (resp, p) = admit(&inj, "e", "CREATE", &no_cfg).await;
    assert!(p.is_none());
    assert!(
        resp["warnings"][0]
            .as_str()
            .unwrap_or_default()
            .contains("meshid.io/sidecar-config")
    );

    // (f) UPDATE is never mutated.
    let (resp, p) = admit(&inj, "f", "UPDATE", &pod).await;
    assert_eq!(resp["allowed"], true);
    assert!(p.is_none());

    // An object that is not a pod is refused with a reason.
    let (resp, _) = admit(&inj, "g", "CREATE", &json!({"metadata": {"annotations": {"meshid.io/inject": "true"}}, "spec": {"containers": 5}})).await;
    assert_eq!(resp["allowed"], false);
    assert!(
        resp["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("cannot read the pod")
    );

    // (e) Malformed reviews: 400/413 with a clear body; the webhook keeps serving.
    let (status, body) = post(&inj, "/mutate", b"{not json".to_vec()).await;
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("not an AdmissionReview"));
    let (status, body) = post(
        &inj,
        "/mutate",
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
    )
    .await;
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("no request"));
    let (status, _) = post(&inj, "/mutate", vec![b' '; 2 << 20]).await;
    assert_eq!(status, 413);
    let (_, p) = admit(&inj, "h", "CREATE", &bare).await;
    assert!(p.is_some(), "still serving after bad input");
}

#[test]
fn patch_subcommand_reads_stdin() {
    let inj = start();
    let cfg = inj.dir.path().join("injector.toml");
    let bare = json!({
        "metadata": {"name": "bare", "annotations": {"meshid.io/inject": "true", "meshid.io/sidecar-config": "bare"}},
        "spec": {"containers": [{"name": "a", "image": "a"}]}
    });
    let mut child = meshid()
        .args(["injector", "patch", "--config"])
        .arg(&cfg)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&review("cli", "CREATE", &bare))
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success());
    let answer: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(answer["response"]["uid"], "cli");
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
}
