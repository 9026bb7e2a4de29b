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
            let ids: Vec<String> = match client.fetch_all_x509_svids().await {
                Ok(v) => v.iter().map(|s| s.spiffe_id().to_string()).collect(),
                Err(_) => Vec::new(),
            };
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
