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
use meshid_proto::workload::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, X509svidRequest,
};
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

fn jwt_sub(token: &str) -> String {
    let payload = token.split('.').nth(1).expect("payload");
    let claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("b64")).expect("json");
    claims["sub"].as_str().expect("sub").to_string()
}

/// Issue 12 finding 8: JWT-SVIDs were cached by (entry, audience) for half
/// their lifetime, so after `entry update --spiffe-id` the old SPIFFE ID
/// kept being served (here: for 30 minutes); and any number of any size of
/// audiences were accepted, cached and sent to the server. Now the cache is
/// keyed by entry revision — the next fetch after the agent learns of the
/// change carries the new ID — and audiences are bounded with a clear
/// InvalidArgument. The X.509 side never serves an SVID minted for an older
/// revision either: once the new ID is served, the old one never returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_update_is_served_at_once_and_audiences_are_bounded() {
    let server = Server::start("");
    let alias = format!("spiffe://{TD}/node/cache");
    let token = server.ok(&["token", "create", "--spiffe-id", &alias]);
    let id = server.ok(&[
        "entry",
        "create",
        "--parent-id",
        &alias,
        "--spiffe-id",
        &format!("spiffe://{TD}/web-v1"),
        "--selector",
        &format!("unix:uid:{}", uid()),
        "--selector",
        &format!("unix:path:{}", me()),
        "--jwt-ttl",
        "1h",
    ]);
    let agent = AgentProc::start(&server.dir.path().join("agent"), &server, Some(&token));
    let raw = raw_client(&agent).await;
    let fetch = |audience: Vec<String>| {
        let mut raw = raw.clone();
        async move {
            raw.fetch_jwtsvid(with_header(JwtsvidRequest {
                audience,
                spiffe_id: String::new(),
            }))
            .await
            .map(tonic::Response::into_inner)
        }
    };
    let aud = || vec!["svc".to_string()];
    let first = eventually("first JWT-SVID", || async { fetch(aud()).await.ok() }).await;
    assert_eq!(first.svids[0].spiffe_id, format!("spiffe://{TD}/web-v1"));
    // Cached: the same token again.
    assert_eq!(
        fetch(aud()).await.expect("again").svids[0].svid,
        first.svids[0].svid
    );

    // An X.509 stream open across the change.
    let mut stream = raw
        .clone()
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .expect("stream")
        .into_inner();
    let m = stream.message().await.expect("msg").expect("some");
    assert_eq!(m.svids[0].spiffe_id, format!("spiffe://{TD}/web-v1"));

    server.ok(&[
        "entry",
        "update",
        &id,
        "--spiffe-id",
        &format!("spiffe://{TD}/web-v2"),
    ]);
    let v2 = format!("spiffe://{TD}/web-v2");
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let r = fetch(aud()).await.expect("fetch");
            if r.svids[0].spiffe_id == v2 {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the new SPIFFE ID is served as soon as the agent has the change");
    assert_eq!(jwt_sub(&got.svids[0].svid), v2);
    // Never the old one again.
    for _ in 0..5 {
        let r = fetch(aud()).await.expect("fetch");
        assert_eq!(r.svids[0].spiffe_id, v2);
        assert_eq!(jwt_sub(&r.svids[0].svid), v2);
    }
    let mut seen_v2 = false;
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(m) = stream.message().await.expect("msg") {
            for s in &m.svids {
                if s.spiffe_id == v2 {
                    seen_v2 = true;
                } else {
                    assert!(!seen_v2, "old SVID after the new one: {}", s.spiffe_id);
                }
            }
            if seen_v2 {
                break;
            }
        }
    })
    .await
    .expect("the X.509 stream moves to the new SPIFFE ID");

    // Audience bounds.
    for (audience, what) in [
        (
            (0..33).map(|i| format!("a{i}")).collect::<Vec<_>>(),
            "too many audiences",
        ),
        (vec!["x".repeat(1 << 20)], "longer than"),
        (
            (0..10).map(|i| format!("{i}{}", "y".repeat(500))).collect(),
            "in total",
        ),
    ] {
        let e = fetch(audience).await.expect_err(what);
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{what}");
        assert!(e.message().contains(what), "{}", e.message());
    }
    // The agent keeps serving.
    assert_eq!(
        fetch(aud()).await.expect("still serving").svids[0].spiffe_id,
        v2
    );
}

/// Issue 16 items 1 and 4 (Workload API §5.2.1, §6.2.1: hints are unique
/// within a response; SPIFFE-ID §2.1: lowercase scheme and trust domain).
/// Two of the caller's entries share a hint: the first is kept in both the
/// X.509 and the JWT response, and the collision is logged and counted. An
/// entry whose SPIFFE ID breaks the spec (if the server accepts one at
/// all) is left out with a log and a metric, and every other SVID of the
/// caller is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hint_collisions_and_malformed_entries_do_not_poison_a_response() {
    let server = Server::start("");
    let alias = format!("spiffe://{TD}/node/hints");
    let token = server.ok(&["token", "create", "--spiffe-id", &alias]);
    let create = |id: &str, selector: String, hint: &str| {
        let mut args = vec![
            "entry".to_string(),
            "create".into(),
            "--parent-id".into(),
            alias.clone(),
            "--spiffe-id".into(),
            id.to_string(),
            "--selector".into(),
            selector,
        ];
        if !hint.is_empty() {
            args.extend(["--hint".to_string(), hint.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        server.cli(&args)
    };
    // Different selectors, so no check at creation can see that one
    // process matches both.
    let ok = |o: std::process::Output| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    ok(create(
        &format!("spiffe://{TD}/first"),
        format!("unix:uid:{}", uid()),
        "h",
    ));
    ok(create(
        &format!("spiffe://{TD}/second"),
        format!("unix:path:{}", me()),
        "h",
    ));
    ok(create(
        &format!("spiffe://{TD}/third"),
        format!("unix:uid:{}", uid()),
        "",
    ));
    let bad = create(
        "SPIFFE://EXAMPLE.ORG/Upper",
        format!("unix:uid:{}", uid()),
        "",
    );
    let bad_accepted = bad.status.success();

    let agent = AgentProc::start(&server.dir.path().join("agent"), &server, Some(&token));
    let mut raw = raw_client(&agent).await;
    let want = [
        format!("spiffe://{TD}/first"),
        format!("spiffe://{TD}/third"),
    ];
    let x509 = eventually("X.509 SVIDs", || {
        let mut raw = raw.clone();
        let want = want.clone();
        async move {
            let mut s = raw
                .fetch_x509svid(with_header(X509svidRequest {}))
                .await
                .ok()?
                .into_inner();
            let m = s.message().await.ok()??;
            let ids: Vec<String> = m.svids.iter().map(|s| s.spiffe_id.clone()).collect();
            (ids == want).then_some(m)
        }
    })
    .await;
    assert_eq!(x509.svids[0].hint, "h");
    assert_eq!(x509.svids[1].hint, "");

    let jwt = raw
        .fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec!["svc".into()],
            spiffe_id: String::new(),
        }))
        .await
        .expect("jwt")
        .into_inner();
    let ids: Vec<&str> = jwt.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    assert_eq!(ids, want.iter().map(String::as_str).collect::<Vec<_>>());
    let hints: Vec<&str> = jwt.svids.iter().map(|s| s.hint.as_str()).collect();
    assert_eq!(hints, ["h", ""]);

    // The independent client gets every valid SVID.
    let client = spiffe::WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .expect("spiffe client");
    assert_eq!(client.fetch_all_x509_svids().await.expect("svids").len(), 2);

    let log = agent.log();
    assert!(log.contains("duplicate_hint"), "{log}");
    if bad_accepted {
        assert!(log.contains("invalid_spiffe_id"), "{log}");
    } else {
        // Refused at the server's boundary: never issued either.
        assert!(!bad.stderr.is_empty());
    }
}

/// A process that connects to the agent, then lets another process — or
/// another executable — use the connection (issue 12 finding 2).
///
/// `self`: the connecting perl relays stdin/stdout to the socket itself.
/// `fork`: it forks; the parent execs `<target> 600`, the child relays.
/// `exec`: it forks; the child copies the socket to stdout, the parent execs
/// `<target>` with stdout on the socket, so the new image writes the
/// requests with the connecting pid. The agent's HTTP/2 SETTINGS being
/// readable tells it the connection was accepted before anything changes.
const CONNECT_AND_HAND_OVER: &str = r#"
use strict; use warnings;
use IO::Socket::UNIX; use IO::Select; use Socket qw(SOCK_STREAM);
my ($path, $mode, $target) = @ARGV;
my $s = IO::Socket::UNIX->new(Type => SOCK_STREAM, Peer => $path) or die "connect $path: $!";
IO::Select->new($s)->can_read(30) or die "agent sent nothing";
binmode STDIN; binmode STDOUT;
sub pump {
    my ($from, $to) = @_;
    my $n = sysread($from, my $buf, 65536);
    return 0 unless $n;
    my $off = 0;
    while ($off < $n) {
        my $w = syswrite($to, $buf, $n - $off, $off);
        die "write: $!" unless defined $w;
        $off += $w;
    }
    return 1;
}
sub relay_both {
    my $sel = IO::Select->new(\*STDIN, $s);
    while (1) {
        for my $fh ($sel->can_read) {
            if ($fh == $s) { exit 0 unless pump($s, \*STDOUT) }
            else { exit 0 unless pump(\*STDIN, $s) }
        }
    }
}
relay_both() if $mode eq 'self';
my $pid = fork() // die "fork: $!";
if ($mode eq 'fork') {
    if ($pid) { exec($target, '600') or die "exec: $!" }
    relay_both();
}
if ($mode eq 'exec') {
    if ($pid) { open(STDOUT, '>&', $s) or die "dup: $!"; exec($target) or die "exec: $!" }
    while (pump($s, \*STDOUT)) {}
    exit 0;
}
die "unknown mode $mode";
"#;

/// Runs the perl hand-over in `mode`, waits until the connecting process
/// runs `image`, and returns a Workload API client speaking through it.
async fn handed_over_client(
    script: &std::path::Path,
    agent: &AgentProc,
    mode: &str,
    target: &str,
    image: &str,
) -> (
    SpiffeWorkloadApiClient<tonic::transport::Channel>,
    tokio::process::Child,
) {
    let mut child = tokio::process::Command::new("perl")
        .arg(script)
        .arg(&agent.socket)
        .arg(mode)
        .arg(target)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("perl");
    let pid = child.id().expect("pid");
    eventually(&format!("process {pid} to run {image}"), || async move {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
        (exe.to_str() == Some(image)).then_some(())
    })
    .await;
    let io = tokio::io::join(
        child.stdout.take().expect("stdout"),
        child.stdin.take().expect("stdin"),
    );
    let io = std::sync::Arc::new(std::sync::Mutex::new(Some(io)));
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let io = io.lock().expect("lock").take();
            async move {
                io.map(hyper_util::rt::TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("already connected"))
            }
        }))
        .await
        .expect("gRPC over the hand-over");
    (SpiffeWorkloadApiClient::new(channel), child)
}

fn canonical(p: &str) -> String {
    std::fs::canonicalize(p)
        .expect("canonicalize")
        .display()
        .to_string()
}

fn sha256_of(p: &str) -> String {
    let data = std::fs::read(p).expect("read");
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &data);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Issue 12 finding 2: an unprivileged process connects, forks, the parent
/// execs `/usr/bin/sleep` and the child calls — it used to receive the SVID
/// and key of the entry selected by `unix:path:/usr/bin/sleep` +
/// `unix:sha256:…`, because the agent read `/proc/<pid>` of the connecting
/// pid at call time. Now the child's bytes are not the connecting
/// process's, so every call is refused; and a connecting process whose
/// image changed since it connected (exec of `/usr/bin/cat`, which then
/// writes the requests itself) is refused too. A process that calls on its
/// own connection still gets its SVID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_swap_and_inherited_sockets_do_not_steal_identities() {
    if std::process::Command::new("perl")
        .args(["-MIO::Socket::UNIX", "-MIO::Select", "-e", "1"])
        .status()
        .map(|s| !s.success())
        .unwrap_or(true)
    {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "perl with IO::Socket::UNIX is required (Debian: perl-base)"
        );
        eprintln!("SKIPPED: perl with IO::Socket::UNIX not found");
        return;
    }
    let sleep = canonical("/usr/bin/sleep");
    let cat = canonical("/usr/bin/cat");
    let perl_out = std::process::Command::new("perl")
        .args(["-e", "print readlink(\"/proc/$$/exe\")"])
        .output()
        .expect("perl");
    let perl = String::from_utf8(perl_out.stdout).expect("utf8");

    let server = Server::start("");
    let alias = format!("spiffe://{TD}/node/exec");
    let token = server.ok(&["token", "create", "--spiffe-id", &alias]);
    let uid_sel = format!("unix:uid:{}", uid());
    for (name, extra) in [
        (
            "sleep",
            vec![
                format!("unix:path:{sleep}"),
                format!("unix:sha256:{}", sha256_of(&sleep)),
            ],
        ),
        ("cat", vec![format!("unix:path:{cat}")]),
        ("perl", vec![format!("unix:path:{perl}")]),
    ] {
        let id = format!("spiffe://{TD}/{name}");
        let mut args = vec![
            "entry",
            "create",
            "--parent-id",
            &alias,
            "--spiffe-id",
            &id,
            "--selector",
            &uid_sel,
        ];
        for e in &extra {
            args.extend(["--selector", e.as_str()]);
        }
        server.ok(&args);
    }
    let agent = AgentProc::start(&server.dir.path().join("agent"), &server, Some(&token));
    eventually("SVIDs minted", || async {
        let log = agent.log();
        ["sleep", "cat", "perl"]
            .iter()
            .all(|n| log.contains(&format!("spiffe://{TD}/{n}")))
            .then_some(())
    })
    .await;
    let dir = tempfile::tempdir().expect("tmp");
    let script = dir.path().join("hand_over.pl");
    std::fs::write(&script, CONNECT_AND_HAND_OVER).expect("script");

    // Control: the connecting process calls itself and gets its SVID.
    let (mut own, _p) = handed_over_client(&script, &agent, "self", "", &perl).await;
    let m = own
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .expect("own connection")
        .into_inner()
        .message()
        .await
        .expect("msg")
        .expect("some");
    assert_eq!(m.svids[0].spiffe_id, format!("spiffe://{TD}/perl"));

    // Fork, parent execs sleep, child calls.
    let (mut stolen, _p) = handed_over_client(&script, &agent, "fork", &sleep, &sleep).await;
    let e = stolen
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .expect_err("the child must not get the sleep SVID");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(e.message().contains("opened by process"), "{}", e.message());
    let e = stolen
        .fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec!["svc".into()],
            spiffe_id: String::new(),
        }))
        .await
        .expect_err("nor a JWT-SVID");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");

    // The connecting process execs cat, which writes the requests itself.
    let (mut swapped, _p) = handed_over_client(&script, &agent, "exec", &cat, &cat).await;
    let e = swapped
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .expect_err("cat must not get an SVID on perl's connection");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(
        e.message().contains("another executable"),
        "{}",
        e.message()
    );
    let e = swapped
        .fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec!["svc".into()],
            spiffe_id: String::new(),
        }))
        .await
        .expect_err("nor a JWT-SVID");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");

    let log = agent.log();
    assert!(
        log.contains("foreign_writer") || log.contains("opened by process"),
        "{log}"
    );
    assert!(log.contains("another executable"), "{log}");
}
