//! End to end: real server and agent processes; the Workload API used
//! through the `spiffe` crate (a client nobody here wrote) and the raw proto.

mod common;

use std::time::Duration;

use common::{AgentProc, Server, TD, free_port, meshid};
use meshid_proto::workload::X509svidRequest;
use meshid_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use spiffe::{TrustDomain, WorkloadApiClient, X509Source};

fn uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn me() -> String {
    std::env::current_exe().expect("exe").display().to_string()
}

async fn raw_client(agent: &AgentProc) -> SpiffeWorkloadApiClient<tonic::transport::Channel> {
    meshid_agent::cli::connect(&agent.endpoint())
        .await
        .expect("connect")
}

fn with_header<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_api_serves_spiffe_clients() {
    let port = free_port();
    let mut server = Server::start(&format!("bind_address = \"127.0.0.1:{port}\""));
    let alias = format!("spiffe://{TD}/node/a1");
    let token = server.ok(&["token", "create", "--spiffe-id", &alias]);
    let uid_sel = format!("unix:uid:{}", uid());
    let path_sel = format!("unix:path:{}", me());

    // A federated trust domain.
    let fed_key = rcgen::KeyPair::generate().expect("key");
    let mut fp = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    fp.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    fp.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let fed = fp.self_signed(&fed_key).expect("fed ca");
    std::fs::write(server.dir.path().join("partner.pem"), fed.pem()).expect("w");
    let partner = server.dir.path().join("partner.pem").display().to_string();
    server.ok(&[
        "bundle",
        "set",
        "--trust-domain",
        "partner.org",
        "--path",
        &partner,
    ]);

    // Two entries for this test process (uid + its executable), with hints.
    let web = server.ok(&[
        "entry",
        "create",
        "--parent-id",
        &alias,
        "--spiffe-id",
        &format!("spiffe://{TD}/web"),
        "--selector",
        &uid_sel,
        "--selector",
        &path_sel,
        "--ttl",
        "5s",
        "--hint",
        "internal",
    ]);
    let db = server.ok(&[
        "entry",
        "create",
        "--parent-id",
        &alias,
        "--spiffe-id",
        &format!("spiffe://{TD}/db"),
        "--selector",
        &uid_sel,
        "--selector",
        &path_sel,
        "--ttl",
        "1h",
        "--hint",
        "external",
        "--federates-with",
        "partner.org",
    ]);

    let dir = server.dir.path().join("agent");
    let mut agent = AgentProc::start(&dir, &server, Some(&token));
    let client = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .expect("spiffe client");

    // Both SVIDs, in entry order, with hints (waiting for the first mint).
    let svids = match tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match client.fetch_all_x509_svids().await {
                Ok(v) if v.len() == 2 => return Ok(v),
                Ok(v) => eprintln!("got {} SVIDs", v.len()),
                Err(e) => eprintln!("fetch: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        #[allow(unreachable_code)]
        Err::<Vec<spiffe::X509Svid>, ()>(())
    })
    .await
    {
        Ok(Ok(v)) => v,
        _ => panic!("no SVIDs; agent log:\n{}", agent.log()),
    };
    assert_eq!(
        svids[0].spiffe_id().to_string(),
        format!("spiffe://{TD}/web")
    );
    assert_eq!(svids[0].hint(), Some("internal"));
    assert_eq!(
        svids[1].spiffe_id().to_string(),
        format!("spiffe://{TD}/db")
    );
    assert_eq!(svids[1].hint(), Some("external"));

    // Bundles: own and federated.
    let bundles = client.fetch_x509_bundles().await.expect("bundles");
    assert!(bundles.get(&TrustDomain::new(TD).expect("td")).is_some());
    assert!(
        bundles
            .get(&TrustDomain::new("partner.org").expect("td"))
            .is_some()
    );

    // JWT-SVID fetch and validation.
    let jwt = client
        .fetch_jwt_token(["payments"], None)
        .await
        .expect("jwt");
    let v = client
        .validate_jwt_token("payments", &jwt)
        .await
        .expect("validate");
    assert_eq!(v.spiffe_id().to_string(), format!("spiffe://{TD}/web"));
    assert!(
        client
            .validate_jwt_token("other-audience", &jwt)
            .await
            .is_err()
    );

    // X509Source: default SVID is the first, and a rotation (TTL 5s) arrives.
    let source = X509Source::builder()
        .endpoint(agent.endpoint())
        .build()
        .await
        .expect("source");
    let first = source.svid().expect("svid");
    assert_eq!(first.spiffe_id().to_string(), format!("spiffe://{TD}/web"));
    let serial = |s: &spiffe::X509Svid| {
        meshid_identity::SvidInfo::from_der(s.leaf().as_ref())
            .expect("leaf")
            .serial
    };
    let s0 = serial(&first);
    let mut updates = source.updated();
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            updates.changed().await.expect("update");
            if serial(&source.svid().expect("svid")) != s0 {
                break;
            }
        }
    })
    .await
    .expect("a rotated SVID arrives on the stream");

    // No security header -> InvalidArgument.
    let mut raw = raw_client(&agent).await;
    let err = raw
        .fetch_x509svid(tonic::Request::new(X509svidRequest {}))
        .await
        .expect_err("no header");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // A caller with no matching entry (the meshid binary: another executable) -> PermissionDenied.
    let out = meshid()
        .args([
            "agent",
            "api",
            "fetch",
            "x509",
            "--socket",
            &agent.endpoint(),
        ])
        .output()
        .expect("cli");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("permissiondenied") || stderr.contains("permission"),
        "{stderr}"
    );

    // Deleting an entry drops its SVID from an open stream at once.
    let mut stream = raw
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .expect("stream")
        .into_inner();
    let first = stream.message().await.expect("msg").expect("some");
    assert_eq!(first.svids.len(), 2);
    assert!(first.federated_bundles.contains_key("spiffe://partner.org"));
    server.ok(&["entry", "delete", &db]);
    let dropped = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let m = stream.message().await.expect("msg").expect("some");
            if m.svids.len() == 1 {
                return m;
            }
        }
    })
    .await
    .expect("stream drops the deleted entry's SVID");
    assert_eq!(dropped.svids[0].spiffe_id, format!("spiffe://{TD}/web"));

    // Agent restart: no new token needed.
    agent.restart();
    let client = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .expect("spiffe client");
    let again = wait_for_async(|| async {
        client
            .fetch_all_x509_svids()
            .await
            .ok()
            .filter(|v| !v.is_empty())
    })
    .await;
    assert_eq!(
        again[0].spiffe_id().to_string(),
        format!("spiffe://{TD}/web")
    );
    assert!(agent.log().contains("resuming with persisted agent SVID"));

    // Server down for longer than a rotation: the agent keeps serving what it
    // has, logs and counts the failures, and catches up when it returns.
    server.stop();
    let before = serial(&client.fetch_x509_svid().await.expect("svid"));
    tokio::time::sleep(Duration::from_secs(6)).await; // outage longer than the 5s TTL's rotation point
    let during = client
        .fetch_x509_svid()
        .await
        .expect("still served while the server is down");
    assert_eq!(serial(&during), before);
    assert!(
        agent.log().contains("reconnecting") || agent.log().contains("retrying"),
        "{}",
        agent.log()
    );
    server.restart();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Ok(s) = client.fetch_x509_svid().await
                && serial(&s) != before
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("agent catches up after the server returns");
    let _ = web;
}

async fn wait_for_async<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn agent_config_check_refuses_unknown_keys() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path().join("a.toml");
    std::fs::write(&p, "trust_domain = \"example.org\"\nserver_address = \"127.0.0.1:1\"\nsocket_path = \"/tmp/x.sock\"\nsocket = \"x\"\n").expect("w");
    let out = meshid()
        .args(["agent", "run", "--check", "--config"])
        .arg(&p)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `socket`"));
}
