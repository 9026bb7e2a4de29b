//! Attacks on the Workload API through real server and agent processes:
//! JWT-SVID validation across trust domains, stale JWT-SVIDs after an entry
//! changes, hint collisions and malformed entries, and callers that are not
//! the process that connected.

mod common;

use std::time::Duration;

use aws_lc_rs::encoding::AsDer as _;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _, RsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{AgentProc, Server, TD};
use meshid_proto::admin::{GetBundleRequest, SetFederatedBundleRequest};
use meshid_proto::types::{Bundle, JwtKey};
use meshid_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use meshid_proto::workload::{JwtBundlesRequest, ValidateJwtsvidRequest};
use serde_json::{Value, json};

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

async fn raw_client(agent: &AgentProc) -> SpiffeWorkloadApiClient<tonic::transport::Channel> {
    meshid_agent::cli::connect(&agent.endpoint())
        .await
        .expect("connect")
}

/// Polls an async condition until it yields a value (30 s deadline).
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A self-signed CA certificate (DER) for a federated bundle's X.509 side.
fn ca_root() -> Vec<u8> {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    p.self_signed(&key).expect("ca").der().to_vec()
}

enum Signer {
    Ec(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

impl Signer {
    fn spki(&self) -> Vec<u8> {
        match self {
            Self::Ec(k) => k.public_key().as_der().expect("der").as_ref().to_vec(),
            Self::Rsa(k) => k.public_key().as_der().expect("der").as_ref().to_vec(),
        }
    }

    fn token(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let rng = SystemRandom::new();
        let sig = match self {
            Self::Ec(k) => k
                .sign(&rng, input.as_bytes())
                .expect("sign")
                .as_ref()
                .to_vec(),
            Self::Rsa(k) => {
                let enc: &'static dyn signature::RsaEncoding = match header["alg"].as_str() {
                    Some("PS256") => &signature::RSA_PSS_SHA256,
                    _ => &signature::RSA_PKCS1_SHA256,
                };
                let mut sig = vec![0; k.public_modulus_len()];
                k.sign(enc, &rng, input.as_bytes(), &mut sig).expect("sign");
                sig
            }
        };
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }
}

fn claims(sub: &str, aud: &str) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    json!({"sub": sub, "aud": aud, "exp": now + 300, "iat": now})
}

/// Issue 12 finding 4, issue 16 items 2 and 3 (JWT-SVID §2.1, §2.3, §4;
/// Workload API §6.3: the token is validated with the bundle of the trust
/// domain of its `sub`). Federated bundles carrying the JWT authorities a
/// SPIRE trust domain publishes (an RSA-2048 key, a P-384 key) are served
/// as JWKS and validate tokens those keys sign; a federated key never
/// validates a token claiming a local SPIFFE ID, neither under a kid of its
/// own nor under the local key's kid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_jwt_svid_trusts_only_the_subjects_trust_domain() {
    let server = Server::start("");
    let alias = format!("spiffe://{TD}/node/jwt");
    let token = server.ok(&["token", "create", "--spiffe-id", &alias]);
    server.ok(&[
        "entry",
        "create",
        "--parent-id",
        &alias,
        "--spiffe-id",
        &format!("spiffe://{TD}/validator"),
        "--selector",
        &format!("unix:uid:{}", uid()),
        "--selector",
        &format!("unix:path:{}", me()),
        "--federates-with",
        "spire.example",
        "--federates-with",
        "partner.org",
    ]);

    let mut admin = meshid_server::cli::admin_client(&server.admin_socket)
        .await
        .expect("admin");
    let local_kid = admin
        .get_bundle(GetBundleRequest {})
        .await
        .expect("bundle")
        .into_inner()
        .jwt_authorities[0]
        .key_id
        .clone();
    let rsa = Signer::Rsa(RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("rsa"));
    let p384 = Signer::Ec(
        EcdsaKeyPair::generate(&signature::ECDSA_P384_SHA384_FIXED_SIGNING).expect("p384"),
    );
    let partner = Signer::Ec(
        EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING).expect("p256"),
    );
    let key = |kid: &str, s: &Signer| JwtKey {
        key_id: kid.into(),
        public_key: s.spki(),
        expires_at: 0,
    };
    for b in [
        Bundle {
            trust_domain: "spire.example".into(),
            x509_authorities: vec![ca_root()],
            jwt_authorities: vec![key("spire-rsa", &rsa), key("spire-p384", &p384)],
            ..Bundle::default()
        },
        Bundle {
            trust_domain: "partner.org".into(),
            x509_authorities: vec![ca_root()],
            jwt_authorities: vec![key("partner-kid", &partner), key(&local_kid, &partner)],
            ..Bundle::default()
        },
    ] {
        admin
            .set_federated_bundle(SetFederatedBundleRequest { bundle: Some(b) })
            .await
            .expect("set bundle");
    }

    let agent = AgentProc::start(&server.dir.path().join("agent"), &server, Some(&token));
    let raw = raw_client(&agent).await;

    // The JWKS served for the SPIRE trust domain carries both keys.
    let jwks: Value = eventually("federated JWT bundles", || {
        let mut raw = raw.clone();
        async move {
            let mut s = raw
                .fetch_jwt_bundles(with_header(JwtBundlesRequest {}))
                .await
                .ok()?
                .into_inner();
            let m = s.message().await.ok()??;
            let doc = m.bundles.get("spiffe://spire.example")?;
            m.bundles
                .contains_key("spiffe://partner.org")
                .then_some(())?;
            serde_json::from_slice(doc).ok()
        }
    })
    .await;
    let kinds: Vec<(String, String)> = jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| {
            (
                k["kid"].as_str().unwrap_or_default().to_string(),
                k["kty"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("spire-rsa".to_string(), "RSA".to_string()),
            ("spire-p384".to_string(), "EC".to_string())
        ]
    );
    // An independent client parses the JWKS documents too.
    let client = spiffe::WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .expect("spiffe client");
    let set = client.fetch_jwt_bundles().await.expect("jwt bundles");
    let spire = set
        .get(&spiffe::TrustDomain::new("spire.example").expect("td"))
        .expect("spire bundle");
    assert!(spire.find_jwt_authority("spire-rsa").is_some());
    assert!(spire.find_jwt_authority("spire-p384").is_some());

    let validate = |svid: String| {
        let mut raw = raw.clone();
        async move {
            raw.validate_jwtsvid(with_header(ValidateJwtsvidRequest {
                audience: "svc".into(),
                svid,
            }))
            .await
            .map(tonic::Response::into_inner)
        }
    };
    let sub = "spiffe://spire.example/ns/default/sa/web";
    for (alg, kid, s) in [
        ("RS256", "spire-rsa", &rsa),
        ("PS256", "spire-rsa", &rsa),
        ("ES384", "spire-p384", &p384),
    ] {
        let t = s.token(
            &json!({"alg": alg, "kid": kid, "typ": "JWT"}),
            &claims(sub, "svc"),
        );
        let r = validate(t).await.unwrap_or_else(|e| panic!("{alg}: {e}"));
        assert_eq!(r.spiffe_id, sub, "{alg}");
    }

    // The attack: a federated domain signs a token for a local SPIFFE ID.
    let local_sub = format!("spiffe://{TD}/admin");
    for kid in ["partner-kid", local_kid.as_str()] {
        let t = partner.token(
            &json!({"alg": "ES256", "kid": kid, "typ": "JWT"}),
            &claims(&local_sub, "svc"),
        );
        let e = validate(t).await.expect_err("partner key for a local sub");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{kid}: {e}");
    }
    // The partner's key validates the partner's own IDs.
    let t = partner.token(
        &json!({"alg": "ES256", "kid": "partner-kid"}),
        &claims("spiffe://partner.org/x", "svc"),
    );
    assert_eq!(
        validate(t).await.expect("partner sub").spiffe_id,
        "spiffe://partner.org/x"
    );

    // Headers and claims the spec refuses.
    let now = claims(sub, "svc")["iat"].as_u64().expect("iat");
    for (header, c, what) in [
        (
            json!({"alg": "RS256", "kid": "spire-rsa", "typ": "JWS"}),
            claims(sub, "svc"),
            "typ",
        ),
        (
            json!({"alg": "RS256", "kid": "spire-rsa", "crit": ["exp"]}),
            claims(sub, "svc"),
            "crit",
        ),
        (
            json!({"alg": "RS256", "kid": "spire-rsa"}),
            json!({"sub": sub, "aud": "svc", "exp": now + 300, "nbf": now + 120}),
            "nbf",
        ),
        (
            json!({"alg": "RS256", "kid": "spire-rsa"}),
            json!({"sub": sub, "aud": "svc", "exp": (now + 300) as f64 + 0.5}),
            "exp",
        ),
    ] {
        let e = validate(rsa.token(&header, &c)).await.expect_err(what);
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{what}: {e}");
        assert!(e.message().contains(what), "{what}: {}", e.message());
    }
}
