//! Bundle and Workload API conformance through real server and agent
//! processes: a SPIRE-shaped federated bundle imports and validates tokens
//! its RSA key signs, an empty bundle revokes trust, equal state is not
//! re-sent, and the socket answers gRPC reflection.

mod common;

use std::time::Duration;

use aws_lc_rs::encoding::AsDer as _;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, KeyPair as _, RsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use common::{AgentProc, Server, TD};
use hyper_util::rt::TokioIo;
use meshid_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use meshid_proto::workload::{
    JwtBundlesRequest, ValidateJwtsvidRequest, X509BundlesRequest, X509svidRequest,
};
use serde_json::json;
use tonic::transport::{Channel, Endpoint};

fn uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn me() -> String {
    std::env::current_exe().expect("exe").display().to_string()
}

fn with_header<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    r
}

/// A plain HTTP/2 channel over the agent's Unix socket.
async fn channel(agent: &AgentProc) -> Channel {
    let path = agent.socket.clone();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await
        .expect("connect")
}

/// Polls an async condition until it yields a value (60 s deadline).
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A self-signed CA certificate (DER).
fn ca_root(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(alg).expect("key");
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    p.self_signed(&key).expect("ca").der().to_vec()
}

/// An RS256 JWT-SVID signed by `key`.
fn rs256(key: &RsaKeyPair, kid: &str, sub: &str, aud: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(json!({"alg": "RS256", "kid": kid, "typ": "JWT"}).to_string()),
        URL_SAFE_NO_PAD
            .encode(json!({"sub": sub, "aud": aud, "exp": now + 600, "iat": now}).to_string())
    );
    let mut sig = vec![0; key.public_modulus_len()];
    key.sign(
        &signature::RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        input.as_bytes(),
        &mut sig,
    )
    .expect("sign");
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

/// The JWK (`n`, `e`) of an RSA key.
fn rsa_jwk(key: &RsaKeyPair) -> (String, String) {
    use x509_parser::prelude::FromDer as _;
    let spki = key.public_key().as_der().expect("der");
    let (_, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki.as_ref()).expect("spki");
    match info.parsed().expect("key") {
        x509_parser::public_key::PublicKey::RSA(r) => (
            URL_SAFE_NO_PAD.encode(r.modulus.strip_prefix(&[0u8][..]).unwrap_or(r.modulus)),
            URL_SAFE_NO_PAD.encode(r.exponent),
        ),
        _ => panic!("not RSA"),
    }
}

fn start_with_federation(extra_tds: &[&str]) -> (Server, AgentProc) {
    let server = Server::start("");
    let alias = format!("spiffe://{TD}/node/fed");
    let token = server.ok(&["token", "create", "--spiffe-id", &alias]);
    let mut args = vec![
        "entry".to_string(),
        "create".into(),
        "--parent-id".into(),
        alias.clone(),
        "--spiffe-id".into(),
        format!("spiffe://{TD}/client"),
        "--selector".into(),
        format!("unix:uid:{}", uid()),
        "--selector".into(),
        format!("unix:path:{}", me()),
        "--federates-with".into(),
        "spire.example".into(),
    ];
    for td in extra_tds {
        args.push("--federates-with".into());
        args.push((*td).into());
    }
    server.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let agent = AgentProc::start(&server.dir.path().join("agent"), &server, Some(&token));
    (server, agent)
}

fn bundle_set(server: &Server, td: &str, doc: &str) -> std::process::Output {
    let path = server.dir.path().join(format!("{td}.bundle"));
    std::fs::write(&path, doc).expect("write bundle");
    server.cli(&[
        "bundle",
        "set",
        "--trust-domain",
        td,
        "--path",
        path.to_str().expect("utf-8"),
    ])
}

/// Trust Domain and Bundle §4.1.3 ("Clients encountering unknown key types
/// or uses MUST ignore the corresponding JWK element"; "A trust domain
/// which publishes an empty key array indicates that the trust domain has
/// revoked any previously-published keys ... workloads MUST treat all SVIDs
/// from the trust domain as invalid"), §4.2.2 (missing `use`: ignore),
/// X509-SVID §6.2 (`x5c` missing: "the entry MUST be ignored"), JWT-SVID
/// §2.1/§6.2 (RS256 keys of the bundle validate) and Workload API §6.3
/// (ValidateJWTSVID). A bundle shaped like SPIRE's — an RSA `jwt-svid` key,
/// a `wit-svid` key, a key without `use`, an `x509-svid` key without `x5c`,
/// a P-384 root — imports with `meshid server bundle set`, is listed again
/// with its P-384 root, and the agent validates a token its RSA key signed;
/// after an empty key set replaces it, the same token no longer validates
/// and the domain's X.509 bundle is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spire_shaped_bundle_imports_and_an_empty_one_revokes_it() {
    let (server, agent) = start_with_federation(&[]);
    let rsa = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("rsa");
    let (n, e) = rsa_jwk(&rsa);
    let p384_root = ca_root(&rcgen::PKCS_ECDSA_P384_SHA384);
    let doc = json!({
        "keys": [
            {"use": "x509-svid", "kty": "EC", "crv": "P-384",
             "x": "AA", "y": "AA", "x5c": [STANDARD.encode(&p384_root)]},
            {"use": "jwt-svid", "kty": "RSA", "kid": "spire-rsa", "n": n, "e": e},
            {"use": "wit-svid", "kty": "OKP", "crv": "Ed25519", "kid": "wit", "x": "AA"},
            {"kty": "EC", "kid": "no-use", "crv": "P-256", "x": "AA", "y": "AA"},
            {"use": "x509-svid", "kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}
        ],
        "spiffe_sequence": 4,
        "spiffe_refresh_hint": 300
    });
    let out = bundle_set(&server, "spire.example", &doc.to_string());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bundle set refused: {stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 X.509 authority, 1 JWT key(s)"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    for why in ["unknown use \"wit-svid\"", "no use", "without x5c"] {
        assert!(stderr.contains(why), "{why} not reported: {stderr}");
    }
    let listed = server.ok(&["bundle", "list", "--format", "spiffe"]);
    assert!(
        listed.contains("\"P-384\"") && listed.contains("\"RSA\""),
        "{listed}"
    );

    let mut raw = SpiffeWorkloadApiClient::new(channel(&agent).await);
    let sub = "spiffe://spire.example/ns/default/sa/web";
    let token = rs256(&rsa, "spire-rsa", sub, "svc");
    let validate = |raw: &mut SpiffeWorkloadApiClient<Channel>| {
        let mut raw = raw.clone();
        let token = token.clone();
        async move {
            raw.validate_jwtsvid(with_header(ValidateJwtsvidRequest {
                audience: "svc".into(),
                svid: token,
            }))
            .await
            .map(tonic::Response::into_inner)
        }
    };
    let ok = eventually("the RS256 token to validate", || {
        let f = validate(&mut raw);
        async move { f.await.ok() }
    })
    .await;
    assert_eq!(ok.spiffe_id, sub);
    let x509_bundle = |mut raw: SpiffeWorkloadApiClient<Channel>| async move {
        let mut s = raw
            .fetch_x509_bundles(with_header(X509BundlesRequest {}))
            .await
            .ok()?
            .into_inner();
        let m = s.message().await.ok()??;
        m.bundles.get("spiffe://spire.example").cloned()
    };
    assert_eq!(
        x509_bundle(raw.clone()).await.expect("spire bundle"),
        p384_root
    );

    let out = bundle_set(&server, "spire.example", r#"{"keys": []}"#);
    assert!(
        out.status.success(),
        "empty bundle refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = eventually("the token to stop validating", || {
        let f = validate(&mut raw);
        async move { f.await.err() }
    })
    .await;
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let left = eventually("the empty X.509 bundle", || {
        let raw = raw.clone();
        async move { x509_bundle(raw).await.filter(Vec::is_empty) }
    })
    .await;
    assert!(left.is_empty());
    // An independent client takes the empty bundle in its stride.
    let client = spiffe::WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .expect("spiffe client");
    let set = client.fetch_x509_bundles().await.expect("x509 bundles");
    let spire = set
        .get(&spiffe::TrustDomain::new("spire.example").expect("td"))
        .expect("spire.example bundle present");
    assert!(spire.authorities().is_empty());
    let jwt = client.fetch_jwt_bundles().await.expect("jwt bundles");
    let spire = jwt
        .get(&spiffe::TrustDomain::new("spire.example").expect("td"))
        .expect("spire.example JWT bundle present");
    assert!(spire.find_jwt_authority("spire-rsa").is_none());
}

/// Stable encoding: the agent sends a stream message only when it differs
/// from the last one sent, comparing encoded bytes; bundle maps are ordered
/// maps, so the same bundles always encode the same. With five federated
/// trust domains, three changes that leave the caller's bundles alone
/// (each adds an SVID, seen on the X.509-SVID stream) send no second
/// FetchJWTBundles or FetchX509Bundles message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_bundles_are_not_sent_again() {
    let tds = ["a.example", "b.example", "c.example", "d.example"];
    let (server, agent) = start_with_federation(&tds);
    let pem = |der: &[u8]| {
        format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            STANDARD.encode(der)
        )
    };
    for td in tds.iter().chain(["spire.example"].iter()) {
        let out = bundle_set(&server, td, &pem(&ca_root(&rcgen::PKCS_ECDSA_P256_SHA256)));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut raw = SpiffeWorkloadApiClient::new(channel(&agent).await);
    let mut jwt = raw
        .fetch_jwt_bundles(with_header(JwtBundlesRequest {}))
        .await
        .expect("jwt bundles")
        .into_inner();
    let mut x509 = raw
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .expect("x509 bundles")
        .into_inner();
    let mut svids = raw
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .expect("svids")
        .into_inner();
    // Wait until both bundle streams carry all six trust domains.
    let mut last_jwt = jwt.message().await.expect("jwt").expect("msg");
    while last_jwt.bundles.len() < 6 {
        last_jwt = jwt.message().await.expect("jwt").expect("msg");
    }
    let mut last_x509 = x509.message().await.expect("x509").expect("msg");
    while last_x509.bundles.len() < 6 {
        last_x509 = x509.message().await.expect("x509").expect("msg");
    }
    let mut have = svids
        .message()
        .await
        .expect("svids")
        .expect("msg")
        .svids
        .len();
    let alias = format!("spiffe://{TD}/node/fed");
    for i in 0..3 {
        server.ok(&[
            "entry",
            "create",
            "--parent-id",
            &alias,
            "--spiffe-id",
            &format!("spiffe://{TD}/extra{i}"),
            "--selector",
            &format!("unix:uid:{}", uid()),
            "--hint",
            &format!("extra{i}"),
        ]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while have < i + 2 {
            let m = tokio::time::timeout_at(deadline, svids.message())
                .await
                .expect("new SVID in time")
                .expect("svids")
                .expect("msg");
            have = m.svids.len();
        }
        // The snapshot that carried the new SVID has been rendered for
        // the bundle streams as well: nothing new may be pending there.
        let quiet = Duration::from_secs(2);
        if let Ok(m) = tokio::time::timeout(quiet, jwt.message()).await {
            panic!("JWT bundles re-sent after change {i}: {m:?}");
        }
        if let Ok(m) = tokio::time::timeout(quiet, x509.message()).await {
            panic!(
                "X.509 bundles re-sent after change {i}: {:?}",
                m.map(|o| o.map(|r| r.bundles.len()))
            );
        }
    }
    drop(server);
}

/// Workload Endpoint §7 ("the SPIFFE Workload Endpoint SHOULD support the
/// gRPC Server Reflection protocol"): a reflection client on the agent's
/// Unix socket lists `SpiffeWorkloadAPI` (v1 and v1alpha) and fetches its
/// descriptor, without the `workload.spiffe.io` header — SPIFFE requires
/// that header on Workload API calls (Workload Endpoint §6), which
/// reflection is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_workload_api() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1alpha;

    let server = Server::start("");
    let token = server.ok(&["token", "create"]);
    let agent = AgentProc::start(&server.dir.path().join("agent"), &server, Some(&token));
    let ch = channel(&agent).await;

    let mut v1 = ServerReflectionClient::new(ch.clone());
    let reqs = vec![
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "SpiffeWorkloadAPI".into(),
            )),
        },
    ];
    let mut s = v1
        .server_reflection_info(tokio_stream::iter(reqs))
        .await
        .expect("reflection v1")
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = s
        .message()
        .await
        .expect("list")
        .expect("msg")
        .message_response
    else {
        panic!("no service list");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"SpiffeWorkloadAPI"), "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with("meshid.")), "{names:?}");
    let Some(MessageResponse::FileDescriptorResponse(fd)) = s
        .message()
        .await
        .expect("symbol")
        .expect("msg")
        .message_response
    else {
        panic!("no descriptor");
    };
    assert!(!fd.file_descriptor_proto.is_empty());

    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(ch);
    let mut s = alpha
        .server_reflection_info(tokio_stream::iter(vec![v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
            ),
        }]))
        .await
        .expect("reflection v1alpha")
        .into_inner();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) = s
        .message()
        .await
        .expect("list")
        .expect("msg")
        .message_response
    else {
        panic!("no v1alpha service list");
    };
    assert!(list.service.iter().any(|s| s.name == "SpiffeWorkloadAPI"));
}
