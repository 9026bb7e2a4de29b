//! Envoy SDS v3 on the agent's Workload API socket: a real server and agent,
//! an SDS client (the `envoy-types` service) over the Unix socket, as Envoy
//! would connect (no security header). The resource names of the README's
//! Envoy snippet, and the others Envoy configurations written for SPIRE use,
//! resolve to the right secrets; ACK, NACK and stale nonces are handled; a
//! rotation and bundle changes (federated, own) are pushed; callers are
//! attested from the connection's kernel credentials.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{AgentProc, Server, TD, free_port, wait_for};
use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    Secret, SpiffeCertValidatorConfig, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use x509_parser::prelude::*;

const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const WEB: &str = "spiffe://example.org/web";
const DB: &str = "spiffe://example.org/db";
const PARTNER: &str = "partner.org";
/// Selected by this uid and this test executable's path.
const ME: &str = "spiffe://example.org/sds-test-binary";

struct Setup {
    server: Server,
    agent: AgentProc,
    metrics: String,
}

fn ca_pem(cn: &str) -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    p.self_signed(&key).expect("ca").pem()
}

fn set_partner_bundle(server: &Server, pem: &str) {
    let path = server.dir.path().join("partner.pem");
    std::fs::write(&path, pem).expect("write");
    server.ok(&[
        "bundle",
        "set",
        "--trust-domain",
        PARTNER,
        "--path",
        &path.display().to_string(),
    ]);
}

/// A server with a federated trust domain, and an agent (with metrics)
/// serving entries for this uid: `web` (first, so `default`) with
/// `web_ttl`, `db`, which federates with partner.org, and [`ME`] for this
/// test executable only.
fn setup(web_ttl: &str) -> (Setup, String) {
    let server = Server::start("");
    let partner = ca_pem("partner CA 1");
    set_partner_bundle(&server, &partner);
    let alias = format!("spiffe://{TD}/node/envoy");
    let token = server.ok(&["token", "create", "--spiffe-id", &alias]);
    let uid = format!("unix:uid:{}", nix::unistd::geteuid().as_raw());
    for (id, ttl, fed) in [(WEB, web_ttl, None), (DB, "1h", Some(PARTNER))] {
        let mut args = vec![
            "entry",
            "create",
            "--parent-id",
            &alias,
            "--spiffe-id",
            id,
            "--selector",
            &uid,
            "--ttl",
            ttl,
        ];
        if let Some(f) = fed {
            args.extend(["--federates-with", f]);
        }
        server.ok(&args);
    }
    let me = format!(
        "unix:path:{}",
        std::env::current_exe().expect("exe").display()
    );
    server.ok(&[
        "entry",
        "create",
        "--parent-id",
        &alias,
        "--spiffe-id",
        ME,
        "--selector",
        &uid,
        "--selector",
        &me,
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
    (
        Setup {
            server,
            agent,
            metrics,
        },
        partner,
    )
}

async fn client(socket: &Path) -> SecretDiscoveryServiceClient<Channel> {
    let path: PathBuf = socket.to_path_buf();
    let ch = Endpoint::try_from("http://localhost")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = path.clone();
            async move {
                tokio::net::UnixStream::connect(p)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .expect("connect to the agent socket");
    SecretDiscoveryServiceClient::new(ch)
}

fn request(names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        type_url: SECRET_TYPE.into(),
        ..Default::default()
    }
}

/// The secrets of a response, by name.
fn secrets(r: &DiscoveryResponse) -> Vec<Secret> {
    r.resources
        .iter()
        .map(|a| {
            assert_eq!(a.type_url, SECRET_TYPE);
            Secret::decode(a.value.as_slice()).expect("Secret")
        })
        .collect()
}

fn names(r: &DiscoveryResponse) -> BTreeSet<String> {
    secrets(r).into_iter().map(|s| s.name).collect()
}

fn find(r: &DiscoveryResponse, name: &str) -> Secret {
    secrets(r)
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no secret {name} in {:?}", names(r)))
}

fn inline(d: &Option<DataSource>) -> Vec<u8> {
    match d.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(data_source::Specifier::InlineBytes(b)) => b.clone(),
        other => panic!("expected inline bytes, got {other:?}"),
    }
}

fn pem_ders(pem: &[u8]) -> Vec<Vec<u8>> {
    Pem::iter_from_buffer(pem)
        .map(|p| {
            let p = p.expect("PEM");
            assert_eq!(p.label, "CERTIFICATE");
            p.contents
        })
        .collect()
}

/// A `tls_certificate` secret: the chain parses, its leaf carries `id`, the
/// key is the leaf's. Returns the leaf's serial.
fn check_tls(s: &Secret, id: &str) -> String {
    let Some(secret::Type::TlsCertificate(t)) = &s.r#type else {
        panic!("{}: not a tls_certificate: {:?}", s.name, s.r#type);
    };
    let chain = pem_ders(&inline(&t.certificate_chain));
    assert!(!chain.is_empty(), "{}: empty chain", s.name);
    let (_, leaf) = X509Certificate::from_der(&chain[0]).expect("leaf parses");
    let uris: Vec<String> = leaf
        .subject_alternative_name()
        .expect("SAN")
        .expect("SAN present")
        .value
        .general_names
        .iter()
        .filter_map(|g| match g {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(uris, vec![id.to_string()], "{}", s.name);
    let key_pem = String::from_utf8(inline(&t.private_key)).expect("key PEM");
    assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    let key = rcgen::KeyPair::from_pem(&key_pem).expect("key parses");
    assert_eq!(
        rcgen::PublicKeyData::subject_public_key_info(&key),
        leaf.tbs_certificate.subject_pki.raw,
        "{}: the key is the leaf's",
        s.name
    );
    leaf.raw_serial_as_string()
}

/// A plain `validation_context` secret holding exactly `bundle_pem`.
fn check_trusted_ca(s: &Secret, bundle_pem: &str) {
    let Some(secret::Type::ValidationContext(v)) = &s.r#type else {
        panic!("{}: not a validation_context: {:?}", s.name, s.r#type);
    };
    assert!(v.custom_validator_config.is_none(), "{}", s.name);
    assert_eq!(
        pem_ders(&inline(&v.trusted_ca)),
        pem_ders(bundle_pem.as_bytes()),
        "{}",
        s.name
    );
}

/// The `ALL` secret: the SPIFFE validator with each trust domain's bundle.
fn check_all(s: &Secret, expected: &[(&str, &str)]) {
    let Some(secret::Type::ValidationContext(v)) = &s.r#type else {
        panic!("{}: not a validation_context", s.name);
    };
    let c = v
        .custom_validator_config
        .as_ref()
        .expect("custom validator");
    assert_eq!(c.name, "envoy.tls.cert_validator.spiffe");
    let tc = c.typed_config.as_ref().expect("typed_config");
    assert_eq!(
        tc.type_url,
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig"
    );
    let cfg = SpiffeCertValidatorConfig::decode(tc.value.as_slice()).expect("config");
    let got: Vec<(String, Vec<Vec<u8>>)> = cfg
        .trust_domains
        .iter()
        .map(|t| (t.name.clone(), pem_ders(&inline(&t.trust_bundle))))
        .collect();
    let want: Vec<(String, Vec<Vec<u8>>)> = expected
        .iter()
        .map(|(td, pem)| (td.to_string(), pem_ders(pem.as_bytes())))
        .collect();
    assert_eq!(got, want);
}

fn all_of(r: &DiscoveryResponse) -> SpiffeCertValidatorConfig {
    let Some(secret::Type::ValidationContext(v)) = find(r, "ALL").r#type else {
        panic!("ALL");
    };
    let tc = v
        .custom_validator_config
        .and_then(|c| c.typed_config)
        .expect("typed_config");
    SpiffeCertValidatorConfig::decode(tc.value.as_slice()).expect("config")
}

/// Polls FetchSecrets until both SVIDs are served.
async fn wait_served(c: &mut SecretDiscoveryServiceClient<Channel>, agent: &AgentProc) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = c.fetch_secrets(request(&[WEB, DB, ME])).await
            && r.get_ref().resources.len() == 3
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "SVIDs never served over SDS; agent log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An open StreamSecrets stream.
struct Stream {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: tonic::Streaming<DiscoveryResponse>,
}

impl Stream {
    async fn open(c: &mut SecretDiscoveryServiceClient<Channel>, first: DiscoveryRequest) -> Self {
        let (tx, rx) = mpsc::channel(8);
        tx.send(first).await.expect("send");
        let rx = c
            .stream_secrets(ReceiverStream::new(rx))
            .await
            .expect("StreamSecrets")
            .into_inner();
        Self { tx, rx }
    }

    async fn send(&self, r: DiscoveryRequest) {
        self.tx.send(r).await.expect("send");
    }

    async fn next(&mut self, within: Duration) -> DiscoveryResponse {
        tokio::time::timeout(within, self.rx.message())
            .await
            .expect("a response in time")
            .expect("stream ok")
            .expect("stream open")
    }

    /// ACKs `r` for `names`.
    async fn ack(&self, r: &DiscoveryResponse, names: &[&str]) {
        let mut a = request(names);
        a.version_info = r.version_info.clone();
        a.response_nonce = r.nonce.clone();
        self.send(a).await;
    }
}

/// Every SDS resource name the README's Envoy snippet uses.
fn readme_names() -> Vec<String> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README");
    let section = readme
        .split("## Quick start: Envoy with SDS")
        .nth(1)
        .expect("README has the Envoy quick start");
    let yaml = section
        .split("```yaml\n")
        .nth(1)
        .and_then(|s| s.split("\n```").next())
        .expect("a YAML block in the Envoy quick start");
    let doc: serde_json::Value = serde_yaml_ng::from_str(yaml).expect("the snippet is YAML");
    fn walk(v: &serde_json::Value, sds: bool, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if sds && let Some(n) = m.get("name").and_then(|n| n.as_str()) {
                    out.push(n.to_string());
                }
                for (k, v) in m {
                    walk(
                        v,
                        k.ends_with("sds_secret_configs") || k.ends_with("sds_secret_config"),
                        out,
                    );
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, sds, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&doc, false, &mut out);
    // The SDS cluster is the agent's socket.
    assert!(yaml.contains("pipe: { path: /tmp/meshid/agent/api.sock }"));
    assert!(yaml.contains("cluster_name: meshid_agent"));
    out.sort();
    out.dedup();
    out
}

fn nacks(metrics: &str) -> Option<u64> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(metrics).ok()?;
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    c.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("meshid_agent_sds_nacks_total "))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sds_serves_spire_resource_names_and_handles_ack_nack() {
    let (s, partner) = setup("1h");
    let own = s.server.bundle_pem();
    let mut c = client(&s.agent.socket).await;
    wait_served(&mut c, &s.agent).await;

    // FetchSecrets: every kind of name, plus two unknown ones (left out).
    let r = c
        .fetch_secrets(request(&[
            "default",
            WEB,
            DB,
            "ROOTCA",
            "spiffe://example.org",
            "example.org",
            PARTNER,
            "spiffe://partner.org",
            "ALL",
            "spiffe://example.org/nobody",
            "other.org",
        ]))
        .await
        .expect("FetchSecrets")
        .into_inner();
    assert_eq!(r.type_url, SECRET_TYPE);
    assert_eq!(
        names(&r),
        [
            "default",
            WEB,
            DB,
            "ROOTCA",
            "spiffe://example.org",
            "example.org",
            PARTNER,
            "spiffe://partner.org",
            "ALL",
        ]
        .into_iter()
        .map(String::from)
        .collect(),
        "unknown names are left out"
    );
    let default_serial = check_tls(&find(&r, "default"), WEB);
    assert_eq!(check_tls(&find(&r, WEB), WEB), default_serial);
    check_tls(&find(&r, DB), DB);
    for n in ["ROOTCA", "spiffe://example.org", "example.org"] {
        check_trusted_ca(&find(&r, n), &own);
    }
    for n in [PARTNER, "spiffe://partner.org"] {
        check_trusted_ca(&find(&r, n), &partner);
    }
    check_all(&find(&r, "ALL"), &[(TD, &own), (PARTNER, &partner)]);

    // Only unknown names: an empty answer.
    let r = c
        .fetch_secrets(request(&["spiffe://example.org/nobody"]))
        .await
        .expect("FetchSecrets")
        .into_inner();
    assert!(r.resources.is_empty());

    // A request for another resource type is refused; Delta is not served.
    let mut wrong = request(&["default"]);
    wrong.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
    let e = c.fetch_secrets(wrong).await.expect_err("wrong type");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let delta = c
        .delta_secrets(tokio_stream::iter(vec![DeltaDiscoveryRequest::default()]))
        .await;
    match delta {
        Err(e) => assert_eq!(e.code(), tonic::Code::Unimplemented),
        Ok(mut st) => {
            let e = st.get_mut().message().await.expect_err("unimplemented");
            assert_eq!(e.code(), tonic::Code::Unimplemented);
        }
    }

    // StreamSecrets with exactly the README snippet's names.
    let readme = readme_names();
    assert_eq!(
        readme,
        vec!["ALL", "ROOTCA", "default", WEB],
        "the README's names"
    );
    let readme: Vec<&str> = readme.iter().map(String::as_str).collect();
    let mut st = Stream::open(&mut c, request(&readme)).await;
    let first = st.next(Duration::from_secs(30)).await;
    assert_eq!(first.version_info, "1");
    assert!(!first.nonce.is_empty());
    assert_eq!(first.type_url, SECRET_TYPE);
    assert_eq!(
        names(&first),
        readme.iter().map(|n| n.to_string()).collect()
    );
    check_tls(&find(&first, "default"), WEB);
    check_tls(&find(&first, WEB), WEB);
    check_trusted_ca(&find(&first, "ROOTCA"), &own);
    check_all(&find(&first, "ALL"), &[(TD, &own), (PARTNER, &partner)]);

    // ACK; then a NACK of the same version; then a stale request (old nonce)
    // asking for other names. None of them is answered: the next response is
    // the answer to the request after them.
    st.ack(&first, &readme).await;
    let mut nack = request(&readme);
    nack.version_info = String::new();
    nack.response_nonce = first.nonce.clone();
    nack.error_detail = Some(RpcStatus {
        code: 3,
        message: "test: secret refused".into(),
        details: vec![],
    });
    st.send(nack).await;
    let mut stale = request(&["ALL"]);
    stale.response_nonce = "0000".into();
    st.send(stale).await;
    let mut next = request(&["ROOTCA"]);
    next.version_info = first.version_info.clone();
    next.response_nonce = first.nonce.clone();
    st.send(next).await;
    let second = st.next(Duration::from_secs(30)).await;
    assert_eq!(second.version_info, "2");
    assert_ne!(second.nonce, first.nonce);
    assert_eq!(names(&second), BTreeSet::from(["ROOTCA".to_string()]));
    check_trusted_ca(&find(&second, "ROOTCA"), &own);

    // The NACK was counted and logged.
    wait_for("the NACK metric", Duration::from_secs(30), || {
        (nacks(&s.metrics) == Some(1)).then_some(())
    });
    assert!(
        s.agent.log().contains("SDS NACK") && s.agent.log().contains("test: secret refused"),
        "{}",
        s.agent.log()
    );
    // The stream is still served: names that include an unknown one get the
    // known ones.
    st.ack(&second, &["ROOTCA"]).await;
    let mut more = request(&["default", "spiffe://example.org/nobody"]);
    more.version_info = second.version_info.clone();
    more.response_nonce = second.nonce.clone();
    st.send(more).await;
    let third = st.next(Duration::from_secs(30)).await;
    assert_eq!(third.version_info, "3");
    assert_eq!(names(&third), BTreeSet::from(["default".to_string()]));
    assert!(
        s.agent.log().contains("spiffe://example.org/nobody"),
        "the unknown name is logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sds_pushes_rotations_and_bundle_changes() {
    let (s, partner) = setup("8s");
    let own = s.server.bundle_pem();
    let mut c = client(&s.agent.socket).await;
    wait_served(&mut c, &s.agent).await;

    let names = ["default", "ALL"];
    let mut st = Stream::open(&mut c, request(&names)).await;
    let first = st.next(Duration::from_secs(30)).await;
    let serial = check_tls(&find(&first, "default"), WEB);
    check_all(&find(&first, "ALL"), &[(TD, &own), (PARTNER, &partner)]);
    st.ack(&first, &names).await;

    // The 8s SVID rotates at ~75% of its life: pushed without a request.
    let t0 = Instant::now();
    let rotated = st.next(Duration::from_secs(60)).await;
    let rotation_interval = t0.elapsed();
    assert_eq!(rotated.version_info, "2");
    let new_serial = check_tls(&find(&rotated, "default"), WEB);
    assert_ne!(new_serial, serial, "a new SVID was pushed");
    st.ack(&rotated, &names).await;

    // A federated bundle change is pushed (rotations may come in between).
    let partner2 = ca_pem("partner CA 2");
    set_partner_bundle(&s.server, &partner2);
    let t1 = Instant::now();
    let want = pem_ders(partner2.as_bytes());
    let mut version: u64 = 2;
    let latency = loop {
        let r = st.next(Duration::from_secs(60)).await;
        let v: u64 = r.version_info.parse().expect("numeric version");
        assert_eq!(v, version + 1, "versions increase by one");
        version = v;
        check_tls(&find(&r, "default"), WEB);
        st.ack(&r, &names).await;
        let cfg = all_of(&r);
        let p = cfg
            .trust_domains
            .iter()
            .find(|t| t.name == PARTNER)
            .expect("partner.org in ALL");
        if pem_ders(&inline(&p.trust_bundle)) == want {
            break t1.elapsed();
        }
    };

    // The own trust domain's bundle changes too: a prepared CA is published
    // in it, and pushed in ALL.
    s.server.ok(&["ca", "prepare"]);
    let t2 = Instant::now();
    let own2 = s.server.bundle_pem();
    let want = pem_ders(own2.as_bytes());
    assert!(want.len() > pem_ders(own.as_bytes()).len(), "{own2}");
    let own_latency = loop {
        let r = st.next(Duration::from_secs(60)).await;
        let v: u64 = r.version_info.parse().expect("numeric version");
        assert_eq!(v, version + 1, "versions increase by one");
        version = v;
        st.ack(&r, &names).await;
        let cfg = all_of(&r);
        let td = cfg
            .trust_domains
            .iter()
            .find(|t| t.name == TD)
            .expect("own trust domain in ALL");
        if pem_ders(&inline(&td.trust_bundle)) == want {
            break t2.elapsed();
        }
    };
    eprintln!(
        "SDS push: first rotation {rotation_interval:?} after the first response (8s SVID); \
         federated bundle change pushed {latency:?} after `meshid server bundle set` returned; \
         own bundle change pushed {own_latency:?} after `meshid server ca prepare` returned"
    );
}

/// Connects to `socket` in a perl process and relays its stdin/stdout: the
/// agent sees perl (same uid, another executable) as the caller.
const RELAY: &str = r#"
use strict; use warnings; use IO::Socket::UNIX; use IO::Select;
my $s = IO::Socket::UNIX->new(Type => SOCK_STREAM(), Peer => $ARGV[0]) or die "connect: $!";
binmode STDIN; binmode STDOUT;
my $sel = IO::Select->new(\*STDIN, $s);
while (1) {
    for my $from ($sel->can_read) {
        my $n = sysread($from, my $buf, 65536);
        exit 0 unless $n;
        my $to = ($from == $s) ? \*STDOUT : $s;
        my $off = 0;
        while ($off < $n) {
            my $w = syswrite($to, $buf, $n - $off, $off);
            die "write: $!" unless defined $w;
            $off += $w;
        }
    }
}
"#;

/// SDS callers are attested from the connection's kernel credentials, as
/// on the Workload API: the same request made by another executable of the
/// same uid (a perl relay) does not get the SVID selected by this test
/// executable's path, while the uid-only SVID and the bundles are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sds_callers_are_attested_by_kernel_credentials() {
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
    let (s, _) = setup("1h");
    let mut c = client(&s.agent.socket).await;
    wait_served(&mut c, &s.agent).await;
    let ask = [ME, "default", "ROOTCA"];

    // This executable gets all three.
    let direct = c
        .fetch_secrets(request(&ask))
        .await
        .expect("FetchSecrets")
        .into_inner();
    assert_eq!(names(&direct).len(), 3);
    check_tls(&find(&direct, ME), ME);

    // perl, same uid, relaying the same requests.
    let script = s.server.dir.path().join("relay.pl");
    std::fs::write(&script, RELAY).expect("script");
    let mut child = tokio::process::Command::new("perl")
        .arg(&script)
        .arg(&s.agent.socket)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("perl");
    let io = tokio::io::join(
        child.stdout.take().expect("stdout"),
        child.stdin.take().expect("stdin"),
    );
    let io = std::sync::Arc::new(std::sync::Mutex::new(Some(io)));
    let ch = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let io = io.lock().expect("lock").take();
            async move {
                io.map(hyper_util::rt::TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("already connected"))
            }
        }))
        .await
        .expect("gRPC through the relay");
    let mut relayed = SecretDiscoveryServiceClient::new(ch);
    let r = relayed
        .fetch_secrets(request(&ask))
        .await
        .expect("FetchSecrets through perl")
        .into_inner();
    assert_eq!(
        names(&r),
        BTreeSet::from(["default".to_string(), "ROOTCA".to_string()]),
        "perl is not this executable: no {ME}"
    );
    check_tls(&find(&r, "default"), WEB);

    // A stream through perl: the same answer, and the name stays unknown.
    let mut st = Stream::open(&mut relayed, request(&ask)).await;
    let first = st.next(Duration::from_secs(30)).await;
    assert_eq!(
        names(&first),
        BTreeSet::from(["default".to_string(), "ROOTCA".to_string()])
    );
}
