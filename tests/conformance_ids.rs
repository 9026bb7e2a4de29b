//! SPIFFE ID conformance through the real binary: IDs and trust domains
//! that break SPIFFE-ID §2 are refused where they enter (CLI and admin API,
//! server config, federation), never issued even when already stored, and
//! hints are unique among the entries one workload receives.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{AgentProc, Server, TD, wait_for};
use meshid_proto::types::{Entry, Selector};
use meshid_server::store::prelude::*;

fn uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn me() -> String {
    std::env::current_exe().expect("exe").display().to_string()
}

/// Runs a CLI command that must fail; returns its stderr.
fn refused(server: &Server, args: &[&str]) -> String {
    let out = server.cli(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "meshid server {args:?} was accepted: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

/// SPIFFE-ID §2.1 ("The scheme and trust domain name are case-insensitive,
/// but must be normalized to lowercase"), §2.2 (path segments: no empty,
/// `.` or `..` segment, only `[a-zA-Z0-9.-_]`, so no percent-encoding),
/// §2.3 ("SHOULD NOT generate URIs of length greater than 2048 bytes") and
/// X509-SVID §3.1 ("Leaf certificate SPIFFE IDs MUST have a non-root path
/// component"). Each non-canonical form is refused by `entry create`,
/// `entry update`, `token create` and as `--federates-with` / `bundle set`
/// trust domain, with the reason on stderr; nothing is stored.
#[test]
fn non_canonical_spiffe_ids_are_refused_by_cli_and_admin_api() {
    let server = Server::start("");
    let parent = format!("spiffe://{TD}/node/a");
    let sel = format!("unix:uid:{}", uid());
    let long = format!("spiffe://{TD}/{}", "a".repeat(2200));
    let cases: Vec<(String, &str)> = vec![
        ("SPIFFE://example.org/upper".into(), "lowercase"),
        ("spiffe://EXAMPLE.ORG/Upper".into(), "lowercase"),
        (format!("spiffe://{TD}"), "names a trust domain"),
        (long.clone(), "2048"),
        (format!("spiffe://{TD}/a/../b"), "dot segments"),
        (format!("spiffe://{TD}/a/./b"), "dot segments"),
        (format!("spiffe://{TD}/a//b"), "empty segments"),
        (format!("spiffe://{TD}/a%2Fb"), "percent-encoding"),
        (format!("spiffe://{TD}/a b"), "percent-encoding"),
        (format!("spiffe://{TD}/a/"), "trailing slash"),
    ];
    for (id, why) in &cases {
        let err = refused(
            &server,
            &[
                "entry",
                "create",
                "--parent-id",
                &parent,
                "--spiffe-id",
                id,
                "--selector",
                &sel,
            ],
        );
        assert!(err.contains(why), "{id}: expected {why:?} in {err}");
        let err = refused(
            &server,
            &[
                "entry",
                "create",
                "--parent-id",
                id,
                "--spiffe-id",
                &format!("spiffe://{TD}/ok"),
                "--selector",
                &sel,
            ],
        );
        assert!(err.contains("--parent-id"), "{err}");
    }
    // The uppercase form names the canonical one to use instead.
    let err = refused(
        &server,
        &[
            "entry",
            "create",
            "--parent-id",
            &parent,
            "--spiffe-id",
            "spiffe://EXAMPLE.ORG/Upper",
            "--selector",
            &sel,
        ],
    );
    assert!(err.contains("spiffe://example.org/Upper"), "{err}");

    // Update: a stored, valid entry cannot be changed into a bad one.
    let id = server.ok(&[
        "entry",
        "create",
        "--parent-id",
        &parent,
        "--spiffe-id",
        &format!("spiffe://{TD}/ok"),
        "--selector",
        &sel,
    ]);
    for (bad, why) in &cases {
        let err = refused(&server, &["entry", "update", &id, "--spiffe-id", bad]);
        assert!(err.contains(why), "{bad}: {err}");
    }
    let shown = server.ok(&["entry", "show", &id]);
    assert!(shown.contains(&format!("spiffe://{TD}/ok")), "{shown}");

    // Join token aliases and federation trust domains.
    let err = refused(
        &server,
        &[
            "token",
            "create",
            "--spiffe-id",
            "spiffe://Example.org/node",
        ],
    );
    assert!(err.contains("lowercase"), "{err}");
    let err = refused(
        &server,
        &[
            "entry",
            "create",
            "--parent-id",
            &parent,
            "--spiffe-id",
            &format!("spiffe://{TD}/fed"),
            "--selector",
            &sel,
            "--federates-with",
            "Partner.ORG",
        ],
    );
    assert!(err.contains("\"partner.org\""), "{err}");
    let bundle = server.dir.path().join("partner.json");
    std::fs::write(&bundle, r#"{"keys": []}"#).expect("write");
    for td in [
        "Partner.ORG",
        "spiffe://partner.org/path",
        "SPIFFE://partner.org",
    ] {
        let err = refused(
            &server,
            &[
                "bundle",
                "set",
                "--trust-domain",
                td,
                "--path",
                bundle.to_str().expect("utf-8"),
            ],
        );
        assert!(
            err.contains("trust domain") || err.contains("lowercase"),
            "{td}: {err}"
        );
    }
    let listed = server.ok(&["entry", "list"]);
    assert_eq!(listed.matches("Entry ID").count(), 1, "{listed}");
}

/// SPIFFE-ID §2.1: "Trust domain names ... must be normalized to
/// lowercase". `trust_domain = "Example.ORG"` in the server config stops
/// `meshid server run` at start with a message naming the canonical form.
#[test]
fn server_config_with_uppercase_trust_domain_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = dir.path().join("server.toml");
    std::fs::write(
        &cfg,
        format!(
            "trust_domain = \"Example.ORG\"\ndata_dir = \"{d}/data\"\nbind_address = \"127.0.0.1:0\"\nadmin_socket = \"{d}/admin.sock\"\n",
            d = dir.path().display()
        ),
    )
    .expect("config");
    let child = common::meshid()
        .args(["server", "run", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "server started: {err}");
    assert!(
        err.contains("trust_domain") && err.contains("\"example.org\""),
        "{err}"
    );
    assert!(!dir.path().join("admin.sock").exists());
}

/// X509-SVID §3.1 and SPIFFE-ID §2.1/§2.3, defence in depth: entries with
/// non-canonical SPIFFE IDs written straight into the store (as an older
/// version or a hand edit could have left them) are never signed — the
/// server refuses and logs — while the caller's valid entry is issued and
/// served as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_non_canonical_ids_are_never_issued() {
    let port = common::free_port();
    let mut server = Server::start(&format!("bind_address = \"127.0.0.1:{port}\""));
    let alias = format!("spiffe://{TD}/node/stored");
    let token = server.ok(&["token", "create", "--spiffe-id", &alias]);
    let selectors = vec![
        Selector {
            r#type: "unix".into(),
            value: format!("uid:{}", uid()),
        },
        Selector {
            r#type: "unix".into(),
            value: format!("path:{}", me()),
        },
    ];
    let good = format!("spiffe://{TD}/good");
    server.ok(&[
        "entry",
        "create",
        "--parent-id",
        &alias,
        "--spiffe-id",
        &good,
        "--selector",
        &format!("unix:uid:{}", uid()),
        "--selector",
        &format!("unix:path:{}", me()),
    ]);
    server.stop();
    let bad = [
        "spiffe://EXAMPLE.ORG/Upper".to_string(),
        format!("spiffe://{TD}"),
        format!("spiffe://{TD}/{}", "x".repeat(2200)),
    ];
    {
        let store =
            meshid_server::store::SqliteStore::open(&server.dir.path().join("data/meshid.db"))
                .await
                .expect("store");
        for (i, id) in bad.iter().enumerate() {
            store
                .create_entry(&Entry {
                    id: format!("bad-{i}"),
                    spiffe_id: id.clone(),
                    parent_id: alias.clone(),
                    selectors: selectors.clone(),
                    revision: 1,
                    ..Entry::default()
                })
                .await
                .expect("insert");
        }
    }
    server.restart();
    let agent = AgentProc::start(&server.dir.path().join("agent"), &server, Some(&token));
    let client = spiffe::WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .expect("client");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let ids = loop {
        if let Ok(svids) = client.fetch_all_x509_svids().await {
            break svids
                .iter()
                .map(|s| s.spiffe_id().to_string())
                .collect::<Vec<_>>();
        }
        assert!(tokio::time::Instant::now() < deadline, "no SVIDs served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(ids, std::slice::from_ref(&good));
    // The agent asked for the bad ones; the server refused each, with why.
    wait_for(
        "refusals in the server log",
        Duration::from_secs(60),
        || {
            let log = server.log();
            (log.contains("refusing to sign an X509-SVID")
                && log.contains("not in canonical form")
                && log.contains("names a trust domain")
                && log.contains("longer than the 2048 bytes"))
            .then_some(())
        },
    );
    let issued: Vec<String> = server
        .audit()
        .iter()
        .filter(|r| r["event"] == "x509_svid_issued")
        .filter_map(|r| r["spiffe_id"].as_str().map(str::to_string))
        .collect();
    for b in &bad {
        assert!(!issued.contains(b), "{b} was issued");
    }
    assert!(issued.contains(&good), "{issued:?}");
}

/// Workload API §5.2.1 / §6.2.1: the `hint` of each SVID in a response
/// "MUST be unique". Creating or updating an entry whose hint another entry
/// under the same parent already uses, where a workload matching one entry
/// matches the other (identical selectors, or a subset), is refused with a
/// clear error; the same hint on entries no single workload can match
/// (different uids) is allowed.
#[test]
fn duplicate_hints_for_one_workload_are_refused() {
    let server = Server::start("");
    let parent = format!("spiffe://{TD}/node/hints");
    let create = |id: &str, sels: &[&str], hint: &str| {
        let mut args = vec![
            "entry".to_string(),
            "create".into(),
            "--parent-id".into(),
            parent.clone(),
            "--spiffe-id".into(),
            format!("spiffe://{TD}/{id}"),
            "--hint".into(),
            hint.into(),
        ];
        for s in sels {
            args.push("--selector".into());
            args.push((*s).into());
        }
        server.cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let first = create("db", &["unix:uid:1000"], "internal");
    assert!(first.status.success());
    let first_id = String::from_utf8_lossy(&first.stdout).trim().to_string();
    for sels in [&["unix:uid:1000"][..], &["unix:uid:1000", "unix:gid:5"][..]] {
        let out = create("db2", sels, "internal");
        assert!(
            !out.status.success(),
            "duplicate hint accepted for {sels:?}"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("hint \"internal\" is already used") && err.contains(&first_id),
            "{err}"
        );
    }
    // No workload has two uids: the same hint is fine there.
    let other = create("db3", &["unix:uid:2000"], "internal");
    assert!(
        other.status.success(),
        "{}",
        String::from_utf8_lossy(&other.stderr)
    );
    let other_id = String::from_utf8_lossy(&other.stdout).trim().to_string();
    // An update that would make two entries collide is refused too.
    let out = server.cli(&["entry", "update", &other_id, "--selector", "unix:uid:1000"]);
    assert!(!out.status.success(), "colliding update accepted");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Workload API §5.2.1"));
    // A different hint under the same selectors is accepted.
    let distinct = create("db4", &["unix:uid:1000"], "external");
    assert!(distinct.status.success());
}

/// X509-SVID §4.1 ("Signing certificates MUST set the `cA` field to
/// `true`"), §4.3 ("SVID signing certificates MUST set `keyCertSign`. They
/// MAY set `cRLSign`"; digitalSignature is a leaf's, Appendix A) and §3.2
/// ("the SPIFFE ID of a signing certificate MUST NOT have a path
/// component"): the CA certificates the server publishes are signing
/// certificates only, with a critical key usage.
#[test]
fn published_ca_certificates_are_signing_certificates_only() {
    use x509_parser::prelude::*;
    let server = Server::start("");
    let pem = server.bundle_pem();
    let certs = meshid_identity::pem::parse_certs(pem.as_bytes()).expect("bundle");
    assert!(!certs.is_empty());
    for der in &certs {
        let (_, c) = X509Certificate::from_der(der.as_ref()).expect("cert");
        assert!(c.basic_constraints().expect("bc").expect("bc").value.ca);
        let ku = c.key_usage().expect("ku").expect("key usage set");
        assert!(ku.critical, "key usage must be critical");
        assert!(ku.value.key_cert_sign());
        assert!(!ku.value.digital_signature(), "digitalSignature on a CA");
        let uris: Vec<String> = c
            .subject_alternative_name()
            .expect("san")
            .map(|s| {
                s.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::URI(u) => Some((*u).to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(uris, [format!("spiffe://{TD}")]);
    }
}
