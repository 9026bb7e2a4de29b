//! Two `meshid server run` processes on one PostgreSQL database: what an
//! operator does through one server reaches an agent synced to the other,
//! pushed through the store's change notifications.

mod common;

use std::time::{Duration, Instant};

use common::postgres as pg;
use common::{AgentProc, Server, TD};
use spiffe::WorkloadApiClient;

/// Polls the agent's Workload API until it serves exactly these SPIFFE IDs.
async fn wait_ids(agent: &AgentProc, want: &[String]) -> Duration {
    let t0 = Instant::now();
    let client = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .expect("spiffe client");
    let got = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let mut ids: Vec<String> = match client.fetch_all_x509_svids().await {
                Ok(v) => v.iter().map(|s| s.spiffe_id().to_string()).collect(),
                Err(_) => Vec::new(),
            };
            ids.sort();
            let mut want = want.to_vec();
            want.sort();
            if ids == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        got.is_ok(),
        "agent never served {want:?}; agent log:\n{}",
        agent.log()
    );
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_on_one_server_reach_agents_of_another() {
    let Some(url) = pg::database("two_servers") else {
        return;
    };
    let store = format!("[store]\nkind = \"postgres\"\nurl = \"{url}\"\npool_size = 4");
    let a = Server::start(&store);
    let b = Server::start(&store);

    // A token made on A is good on B (and only once: the store has it).
    let alias = format!("spiffe://{TD}/node/n1");
    let token = a.ok(&["token", "create", "--spiffe-id", &alias]);
    let agent = AgentProc::start(&a.dir.path().join("agent"), &b, Some(&token));
    wait_ids(&agent, &[]).await;
    assert!(
        a.ok(&["agent", "list"]).contains("join_token"),
        "A lists the agent B attested"
    );

    // An entry created through A's admin API reaches the agent synced to B.
    let uid = format!("unix:uid:{}", nix::unistd::geteuid().as_raw());
    let web = format!("spiffe://{TD}/web");
    let id = a.ok(&[
        "entry",
        "create",
        "--parent-id",
        &alias,
        "--spiffe-id",
        &web,
        "--selector",
        &uid,
    ]);
    let took = wait_ids(&agent, std::slice::from_ref(&web)).await;
    eprintln!("entry created on A -> SVID served by the agent on B: {took:?}");
    assert!(b.ok(&["entry", "list"]).contains(&web));

    // Deleted through A: the agent on B drops the SVID.
    a.ok(&["entry", "delete", &id]);
    let took = wait_ids(&agent, &[]).await;
    eprintln!("entry deleted on A -> SVID dropped by the agent on B: {took:?}");
}

/// `GET path` on `addr`: (status, body).
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut c = std::net::TcpStream::connect(addr).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(c, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut s = String::new();
    c.read_to_string(&mut s).ok()?;
    let status = s.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        status,
        s.split("\r\n\r\n").nth(1).unwrap_or_default().to_string(),
    ))
}

/// A server that cannot reach its database says so in `/readyz`, refuses
/// new node API calls with Unavailable, keeps its open sync stream (the
/// agent keeps serving), and is ready again once the database is back. The
/// store metrics are exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_its_database_is_not_ready_but_keeps_streams() {
    let Some(url) = pg::database("store_down") else {
        return;
    };
    let pgs = pg::server().expect("postgres");
    let db = pg::db_name(&url).to_string();
    let store = format!("[store]\nkind = \"postgres\"\nurl = \"{url}\"\npool_size = 3");
    let s = Server::start(&store);
    let alias = format!("spiffe://{TD}/node/n1");
    let token = s.ok(&["token", "create", "--spiffe-id", &alias]);
    let uid = format!("unix:uid:{}", nix::unistd::geteuid().as_raw());
    let web = format!("spiffe://{TD}/web");
    s.ok(&[
        "entry",
        "create",
        "--parent-id",
        &alias,
        "--spiffe-id",
        &web,
        "--selector",
        &uid,
    ]);
    let agent = AgentProc::start(&s.dir.path().join("agent"), &s, Some(&token));
    wait_ids(&agent, std::slice::from_ref(&web)).await;
    let (code, body) = http_get(&s.metrics_addr, "/readyz").expect("readyz");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("store: reachable"), "{body}");
    let metrics = common::wait_for("store metrics", Duration::from_secs(30), || {
        let (_, m) = http_get(&s.metrics_addr, "/metrics")?;
        m.contains("meshid_server_store_notification_lag_seconds_count")
            .then_some(m)
    });
    for name in [
        "meshid_server_store_up 1",
        "meshid_server_store_pool_max_connections 3",
        "meshid_server_store_pool_connections ",
        "meshid_server_store_pool_idle_connections ",
        "meshid_server_store_listener_reconnects_total ",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }

    let bundle = s.bundle_pem();
    // The database refuses every connection, and the open ones are cut.
    pgs.psql(
        "postgres",
        &format!("ALTER DATABASE \"{db}\" ALLOW_CONNECTIONS false"),
    );
    pgs.psql(
        "postgres",
        &format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'"),
    );
    let body = common::wait_for("not ready", Duration::from_secs(30), || {
        let (code, body) = http_get(&s.metrics_addr, "/readyz")?;
        (code == 503 && body.contains("store unreachable")).then_some(body)
    });
    assert!(body.contains("open sync streams are kept"), "{body}");
    // New work is refused with Unavailable (an agent goes to another server).
    let ch = common::node_channel(&s.node_addr, &bundle, None).await;
    let (_, csr) = common::key_and_csr();
    let err = meshid_proto::node::node_client::NodeClient::new(ch)
        .attest(meshid_proto::node::AttestRequest {
            attestor: "join_token".into(),
            payload: b"no-such-token".to_vec(),
            csr,
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(err.message().contains("store"), "{err}");
    // The open sync stream stays: the server still counts it, and the
    // agent still serves its SVID.
    let (_, m) = http_get(&s.metrics_addr, "/metrics").expect("metrics");
    assert!(m.contains("meshid_server_sync_streams 1"), "{m}");
    assert!(m.contains("meshid_server_store_up 0"), "{m}");
    wait_ids(&agent, std::slice::from_ref(&web)).await;
    assert!(
        !agent.log().contains("sync stream failed"),
        "the sync stream broke:\n{}",
        agent.log()
    );

    // The database is back: ready again, and changes flow.
    pgs.psql(
        "postgres",
        &format!("ALTER DATABASE \"{db}\" ALLOW_CONNECTIONS true"),
    );
    common::wait_for("ready again", Duration::from_secs(30), || {
        let (code, _) = http_get(&s.metrics_addr, "/readyz")?;
        (code == 200).then_some(())
    });
    let api = format!("spiffe://{TD}/api");
    s.ok(&[
        "entry",
        "create",
        "--parent-id",
        &alias,
        "--spiffe-id",
        &api,
        "--selector",
        &uid,
    ]);
    wait_ids(&agent, &[api, web]).await;
}
