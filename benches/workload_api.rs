//! Agent figures: Workload API first-response latency under 100 concurrent
//! clients on a warm cache, agent resident memory with 1,000 entries, and the
//! time from `entry create` to the SVID arriving on an open stream.
//!
//! `cargo bench --bench workload_api` (env: CLIENTS, ROUNDS, ENTRIES).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{AgentProc, Server, TD};
use meshid_proto::admin::CreateEntryRequest;
use meshid_proto::types::{Entry, Selector};
use meshid_proto::workload::X509svidRequest;
use meshid_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(v: &[Duration], p: f64) -> Duration {
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

async fn client(sock: std::path::PathBuf) -> SpiffeWorkloadApiClient<tonic::transport::Channel> {
    meshid_agent::cli::connect(&sock.display().to_string())
        .await
        .expect("connect")
}

fn req() -> tonic::Request<X509svidRequest> {
    let mut r = tonic::Request::new(X509svidRequest {});
    r.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    r
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn entry(parent: &str, id: &str, sels: &[String]) -> Entry {
    Entry {
        spiffe_id: format!("spiffe://{TD}/{id}"),
        parent_id: parent.into(),
        selectors: sels
            .iter()
            .map(|s| {
                let (t, v) = s.split_once(':').expect("selector");
                Selector {
                    r#type: t.into(),
                    value: v.into(),
                }
            })
            .collect(),
        ..Entry::default()
    }
}

#[tokio::main]
async fn main() {
    let clients = env("CLIENTS", 100);
    let rounds = env("ROUNDS", 20);
    let n_entries = env("ENTRIES", 1000);
    let uid = nix::unistd::geteuid().as_raw();
    let me = std::env::current_exe().expect("exe").display().to_string();
    let mine = vec![format!("unix:uid:{uid}"), format!("unix:path:{me}")];

    let server = Server::start("");
    let alias = format!("spiffe://{TD}/node/bench");
    let token = server.ok(&["token", "create", "--spiffe-id", &alias]);
    let mut admin = meshid_server::cli::admin_client(&server.admin_socket)
        .await
        .expect("admin");
    admin
        .create_entry(CreateEntryRequest {
            entry: Some(entry(&alias, "bench/me", &mine)),
        })
        .await
        .expect("entry");
    let dir = server.dir.path().join("agent");
    let agent = AgentProc::start(&dir, &server, Some(&token));
    let pid = agent.pid().expect("pid");
    let rss_idle = rss_kib(pid);

    // 1,000 entries the agent mints for (other uids, so callers don't match them).
    let t = Instant::now();
    for i in 1..n_entries {
        let sels = vec![format!("unix:uid:{}", 100_000 + i)];
        admin
            .create_entry(CreateEntryRequest {
                entry: Some(entry(&alias, &format!("svc/{i}"), &sels)),
            })
            .await
            .expect("entry");
    }
    let create_time = t.elapsed();
    // Wait until the agent has minted all of them (its metrics are off; use its log).
    let t = Instant::now();
    loop {
        let minted = agent.log().matches("SVID minted").count();
        if minted >= n_entries || t.elapsed() > Duration::from_secs(120) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mint_time = t.elapsed();
    let rss_1000 = rss_kib(pid);

    // First-response latency, warm cache, CLIENTS concurrent clients x ROUNDS
    // (round 0 warms the attestor's digest cache and is not counted).
    let mut lat = Vec::new();
    for round in 0..=rounds {
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let sock = agent.socket.clone();
            tasks.push(tokio::spawn(async move {
                let t = Instant::now();
                let mut c = client(sock).await;
                let mut s = c.fetch_x509svid(req()).await.expect("fetch").into_inner();
                let m = s.message().await.expect("msg").expect("first");
                assert_eq!(m.svids.len(), 1);
                t.elapsed()
            }));
        }
        for t in tasks {
            let d = t.await.expect("task");
            if round > 0 {
                lat.push(d);
            }
        }
    }
    lat.sort();

    // Entry create -> SVID on an already open stream.
    let mut c = client(agent.socket.clone()).await;
    let mut stream = c.fetch_x509svid(req()).await.expect("stream").into_inner();
    let _ = stream.message().await.expect("first");
    let mut propagation = Vec::new();
    for i in 0..5 {
        let t = Instant::now();
        admin
            .create_entry(CreateEntryRequest {
                entry: Some(entry(&alias, &format!("bench/new{i}"), &mine)),
            })
            .await
            .expect("entry");
        loop {
            let m = stream.message().await.expect("msg").expect("update");
            if m.svids.len() == 2 + i {
                break;
            }
        }
        propagation.push(t.elapsed());
    }
    propagation.sort();

    println!("meshid agent, Workload API over a Unix socket (release build)");
    println!(
        "first response, {clients} concurrent clients x {rounds} rounds, warm cache (connect + attest + first message):"
    );
    println!(
        "  p50 {:.2} ms   p99 {:.2} ms   max {:.2} ms   (goal p99 <= 2 ms)",
        pct(&lat, 0.5).as_secs_f64() * 1e3,
        pct(&lat, 0.99).as_secs_f64() * 1e3,
        lat[lat.len() - 1].as_secs_f64() * 1e3
    );
    println!(
        "agent RSS: {:.1} MiB with 1 entry, {:.1} MiB with {n_entries} entries/SVIDs (goal <= 32 MiB)",
        rss_idle as f64 / 1024.0,
        rss_1000 as f64 / 1024.0
    );
    println!(
        "  {n_entries} entries created in {create_time:.1?}; all minted {mint_time:.1?} after the last create"
    );
    println!(
        "entry create -> SVID on open stream: median {:.0} ms, max {:.0} ms (goal <= 1 s)",
        pct(&propagation, 0.5).as_secs_f64() * 1e3,
        propagation[propagation.len() - 1].as_secs_f64() * 1e3
    );
}
