//! End to end: a real `meshid server run` process, its CLI, and the node API
//! over mTLS, with certificates checked by an X.509 parser and by openssl.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::{Server, TD, key_and_csr, meshid, node_channel};
use meshid_proto::node::node_client::NodeClient;
use meshid_proto::node::{
    AttestRequest, JwtSvidParams, SignJwtSvidsRequest, SignX509SvidsRequest, X509SvidParams,
};
use x509_parser::prelude::*;

fn now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs(),
    )
    .expect("i64")
}

async fn attest(
    server: &Server,
    token: &str,
    bundle: &str,
) -> Result<(Vec<Vec<u8>>, Vec<u8>, String), tonic::Status> {
    let (key, csr) = key_and_csr();
    let mut c = NodeClient::new(node_channel(&server.node_addr, bundle, None).await);
    let r = c
        .attest(AttestRequest {
            attestor: "join_token".into(),
            payload: token.as_bytes().to_vec(),
            csr,
        })
        .await?
        .into_inner();
    let svid = r.svid.expect("svid");
    Ok((svid.cert_chain, key.serialize_der(), svid.spiffe_id))
}

fn check_svid(der: &[u8], want_id: &str, ttl: i64) {
    let (_, c) = X509Certificate::from_der(der).expect("parses");
    let san = c
        .subject_alternative_name()
        .expect("san")
        .expect("has SAN")
        .value;
    let uris: Vec<_> = san
        .general_names
        .iter()
        .filter_map(|g| {
            if let GeneralName::URI(u) = g {
                Some(*u)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(uris, vec![want_id], "exactly one URI SAN");
    let bc = c.basic_constraints().expect("bc").expect("present").value;
    assert!(!bc.ca, "CA:false");
    let ku = c.key_usage().expect("ku").expect("present").value;
    assert!(ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign());
    let eku = c.extended_key_usage().expect("eku").expect("present").value;
    assert!(eku.server_auth && eku.client_auth);
    assert_eq!(c.raw_serial().len(), 16, "128-bit serial");
    let nb = c.validity().not_before.timestamp();
    let na = c.validity().not_after.timestamp();
    assert!((now() - nb - 10).abs() <= 3, "notBefore backdated ~10s");
    assert!(
        (na - nb - ttl - 10).abs() <= 3,
        "lifetime {} != ttl {ttl}",
        na - nb
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_issues_valid_svids_and_refuses_bad_input() {
    let server = Server::start("");
    let bundle = server.bundle_pem();
    assert!(bundle.contains("BEGIN CERTIFICATE"));

    // Token with an alias, entries parented by the alias.
    let alias = format!("spiffe://{TD}/node/n1");
    let token = server.ok(&["token", "create", "--spiffe-id", &alias, "--ttl", "5m"]);
    let e1 = server.ok(&[
        "entry",
        "create",
        "--parent-id",
        &alias,
        "--spiffe-id",
        &format!("spiffe://{TD}/web"),
        "--selector",
        "unix:uid:1000",
        "--ttl",
        "10m",
        "--dns",
        "web.local",
        "--hint",
        "internal",
    ]);
    let e2 = server.ok(&[
        "entry",
        "create",
        "--parent-id",
        &alias,
        "--spiffe-id",
        &format!("spiffe://{TD}/db"),
        "--selector",
        "unix:uid:1001",
        "--ttl",
        "1h",
    ]);
    let foreign = server.ok(&[
        "entry",
        "create",
        "--parent-id",
        &format!("spiffe://{TD}/node/other"),
        "--spiffe-id",
        &format!("spiffe://{TD}/secret"),
        "--selector",
        "unix:uid:0",
    ]);
    let list: serde_json::Value =
        serde_json::from_str(&server.ok(&["entry", "list", "--output", "json"])).expect("json");
    assert_eq!(list.as_array().expect("array").len(), 3);

    // Attest: agent SVID under the join_token path.
    let (chain, key, agent_id) = attest(&server, &token, &bundle).await.expect("attest");
    assert!(
        agent_id.starts_with(&format!("spiffe://{TD}/meshid/agent/join_token/")),
        "{agent_id}"
    );
    check_svid(&chain[0], &agent_id, 3600);

    // A token is single use.
    let again = attest(&server, &token, &bundle)
        .await
        .expect_err("second use");
    assert_eq!(again.code(), tonic::Code::PermissionDenied, "{again:?}");
    let agents: serde_json::Value =
        serde_json::from_str(&server.ok(&["agent", "list", "--output", "json"])).expect("json");
    assert_eq!(
        agents.as_array().expect("array").len(),
        1,
        "second use changed nothing"
    );

    // A batch: two good entries, a foreign entry, a malformed CSR, an unknown entry.
    let mut node = NodeClient::new(
        node_channel(
            &server.node_addr,
            &bundle,
            Some((chain.clone(), key.clone())),
        )
        .await,
    );
    let (k1, c1) = key_and_csr();
    let (_k2, c2) = key_and_csr();
    let (_k3, c3) = key_and_csr();
    let r = node
        .sign_x509_svids(SignX509SvidsRequest {
            params: vec![
                X509SvidParams {
                    entry_id: e1.clone(),
                    csr: c1,
                },
                X509SvidParams {
                    entry_id: e2.clone(),
                    csr: c2,
                },
                X509SvidParams {
                    entry_id: foreign.clone(),
                    csr: c3,
                },
                X509SvidParams {
                    entry_id: e1.clone(),
                    csr: b"not a csr".to_vec(),
                },
                X509SvidParams {
                    entry_id: "no-such-entry".into(),
                    csr: key_and_csr().1,
                },
            ],
        })
        .await
        .expect("batch")
        .into_inner()
        .results;
    let codes: Vec<i32> = r
        .iter()
        .map(|x| x.status.as_ref().map_or(-1, |s| s.code))
        .collect();
    assert_eq!(
        codes,
        vec![
            0,
            0,
            tonic::Code::PermissionDenied as i32,
            tonic::Code::InvalidArgument as i32,
            tonic::Code::NotFound as i32
        ]
    );
    let web = r[0].svid.as_ref().expect("svid");
    check_svid(&web.cert_chain[0], &format!("spiffe://{TD}/web"), 600);
    check_svid(
        &r[1].svid.as_ref().expect("svid").cert_chain[0],
        &format!("spiffe://{TD}/db"),
        3600,
    );
    let (_, leaf) = X509Certificate::from_der(&web.cert_chain[0]).expect("parse");
    let dns: Vec<String> = leaf
        .subject_alternative_name()
        .expect("san")
        .expect("san")
        .value
        .general_names
        .iter()
        .filter_map(|g| {
            if let GeneralName::DNSName(d) = g {
                Some((*d).to_string())
            } else {
                None
            }
        })
        .collect();
    assert_eq!(dns, vec!["web.local"]);
    // The key in the certificate is the CSR's.
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        k1.public_key_raw()
    );

    // The chain verifies to the bundle: webpki (our verifier) and openssl.
    let svid_pem = meshid_identity::pem::encode_certs(web.cert_chain.iter().map(Vec::as_slice));
    std::fs::write(server.dir.path().join("svid.pem"), &svid_pem).expect("write");
    std::fs::write(server.dir.path().join("bundle.pem"), &bundle).expect("write");
    let out = std::process::Command::new("openssl")
        .args(["verify", "-CAfile", "bundle.pem", "svid.pem"])
        .current_dir(server.dir.path())
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // JWT-SVIDs.
    let j = node
        .sign_jwt_svids(SignJwtSvidsRequest {
            params: vec![JwtSvidParams {
                entry_id: e1.clone(),
                audience: vec!["payments".into()],
            }],
        })
        .await
        .expect("jwt")
        .into_inner()
        .results;
    let tok = j[0].svid.as_ref().expect("jwt svid");
    assert_eq!(tok.token.split('.').count(), 3);
    let spiffe: serde_json::Value =
        serde_json::from_str(&server.ok(&["bundle", "show", "--format", "spiffe"])).expect("json");
    let uses: Vec<&str> = spiffe["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter_map(|k| k["use"].as_str())
        .collect();
    assert!(
        uses.contains(&"x509-svid") && uses.contains(&"jwt-svid"),
        "{uses:?}"
    );

    // Audit: every issuance, the refusal, no key material.
    let audit = server.audit();
    let issued: Vec<_> = audit
        .iter()
        .filter(|e| e["event"] == "x509_svid_issued")
        .collect();
    assert!(
        issued.iter().any(|e| e["serial"] == web.serial.as_str()
            && e["spiffe_id"] == format!("spiffe://{TD}/web"))
    );
    assert!(
        audit
            .iter()
            .any(|e| e["event"] == "x509_svid_refused" && e["entry_id"] == foreign.as_str())
    );
    assert!(audit.iter().any(|e| e["event"] == "attestation_failed"));
    let raw = std::fs::read_to_string(server.dir.path().join("data/audit.log")).expect("audit");
    assert!(
        !raw.contains("PRIVATE KEY") && !raw.contains(&token),
        "no secrets in the audit log"
    );

    // Bulk delete: refused without a filter, dry run changes nothing.
    let out = server.cli(&["entry", "delete"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to delete every entry"));
    let dry = server.ok(&["entry", "delete", "--parent-id", &alias, "--dry-run"]);
    assert!(
        dry.contains("Would delete 2 entries")
            && dry.contains(&e1)
            && dry.contains(&e2)
            && !dry.contains(&foreign),
        "{dry}"
    );
    let list: serde_json::Value =
        serde_json::from_str(&server.ok(&["entry", "list", "--output", "json"])).expect("json");
    assert_eq!(
        list.as_array().expect("array").len(),
        3,
        "dry run deleted nothing"
    );
    let upd = server.ok(&["entry", "update", &e2, "--ttl", "2h", "--dry-run"]);
    assert!(upd.contains("x509_svid_ttl: 3600 -> 7200"), "{upd}");

    // Metrics.
    let metrics = reqwest_get(&server.metrics_addr, "/metrics").await;
    assert!(
        metrics.contains("meshid_server_svids_issued_total{kind=\"x509\",outcome=\"ok\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("meshid_server_ca_not_after_seconds"));

    // A banned agent is refused.
    server.ok(&["agent", "ban", &agent_id]);
    let err = node
        .sign_x509_svids(SignX509SvidsRequest {
            params: vec![X509SvidParams {
                entry_id: e1.clone(),
                csr: key_and_csr().1,
            }],
        })
        .await
        .expect_err("banned");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("banned"), "{err:?}");
}

/// Minimal HTTP GET over a TCP socket (the metrics endpoint).
async fn reqwest_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect metrics");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

#[test]
fn unknown_config_key_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = common::write_server_config(dir.path(), "bind_adress = \"127.0.0.1:1\"");
    for args in [
        vec!["server", "run", "--check", "--config"],
        vec!["server", "run", "--config"],
    ] {
        let out = meshid().args(&args).arg(&cfg).output().expect("run");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("unknown field") && err.contains("bind_adress"),
            "{err}"
        );
    }
    assert!(!dir.path().join("data").exists(), "nothing was written");
    let good = common::write_server_config(dir.path(), "");
    let out = meshid()
        .args(["server", "run", "--check", "--config"])
        .arg(&good)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn expired_upstream_intermediate_is_refused_at_start() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let dir = tempfile::tempdir().expect("tmp");
    let root_key = KeyPair::generate().expect("key");
    let mut rp = CertificateParams::new(Vec::<String>::new()).expect("params");
    rp.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    rp.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    rp.distinguished_name
        .push(rcgen::DnType::CommonName, "upstream root");
    let root = rp.self_signed(&root_key).expect("root");
    let int_key = KeyPair::generate().expect("key");
    let mut ip = CertificateParams::new(Vec::<String>::new()).expect("params");
    ip.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    ip.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ip.distinguished_name
        .push(rcgen::DnType::CommonName, "upstream intermediate");
    ip.not_before = ::time::OffsetDateTime::now_utc() - ::time::Duration::days(30);
    ip.not_after = ::time::OffsetDateTime::now_utc() - ::time::Duration::days(1);
    let int = ip
        .signed_by(&int_key, &Issuer::new(rp, root_key))
        .expect("intermediate");
    std::fs::write(
        dir.path().join("up.pem"),
        format!("{}{}", int.pem(), root.pem()),
    )
    .expect("w");
    std::fs::write(dir.path().join("up.key"), int_key.serialize_pem()).expect("w");
    let cfg = common::write_server_config(
        dir.path(),
        &format!(
            "[upstream]\ncert_path = \"{d}/up.pem\"\nkey_path = \"{d}/up.key\"\n",
            d = dir.path().display()
        ),
    );
    let out = meshid()
        .args(["server", "run", "--config"])
        .arg(&cfg)
        .output()
        .expect("run");
    assert!(!out.status.success(), "server must refuse to start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("expired")
            && err.contains("upstream intermediate")
            && err.contains("refusing"),
        "{err}"
    );
    assert!(
        !dir.path().join("data/ca/signing-ca.pem").exists(),
        "no CA was minted under it"
    );

    // With a valid intermediate the server starts and serves the chain.
    let int_key = KeyPair::generate().expect("key");
    let mut ip = CertificateParams::new(Vec::<String>::new()).expect("params");
    ip.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    ip.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ip.distinguished_name
        .push(rcgen::DnType::CommonName, "upstream intermediate 2");
    let root_key = KeyPair::generate().expect("key");
    let mut rp = CertificateParams::new(Vec::<String>::new()).expect("params");
    rp.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    rp.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    rp.distinguished_name
        .push(rcgen::DnType::CommonName, "upstream root 2");
    let root = rp.self_signed(&root_key).expect("root");
    let int = ip
        .signed_by(&int_key, &Issuer::new(rp, root_key))
        .expect("intermediate");
    std::fs::write(
        dir.path().join("up.pem"),
        format!("{}{}", int.pem(), root.pem()),
    )
    .expect("w");
    std::fs::write(dir.path().join("up.key"), int_key.serialize_pem()).expect("w");
    let server = Server::start_with(dir, cfg);
    let bundle = server.bundle_pem();
    assert_eq!(
        meshid_identity::pem::parse_certs(bundle.as_bytes()).expect("pem")[0].as_ref(),
        root.der().as_ref()
    );
}
