//! Many agents on the sync stream: AGENTS simulated agents (real node API
//! clients: join-token attestation, mTLS with their own SVID, one `Sync`
//! stream each) and ENTRIES entries spread over them, against two `meshid
//! server run` processes on one PostgreSQL and, as the baseline in the same
//! run, one server on SQLite.
//!
//! Prints, per setup: the initial sync of every agent; the time from an
//! entry update (through the admin API of one server, alternating) to the
//! agent that parents it seeing the new revision on its stream (p50/p99, and
//! how many stream messages each change caused across all agents); the time
//! for every agent of a server to be resynced after that server is killed
//! (`kill -9`) and started again; and each server's resident memory.
//!
//! `cargo bench --bench sync_scale` (env: AGENTS=2000 ENTRIES=20000
//! CHANGES=200 WRITERS=1). PostgreSQL's binaries are needed for the
//! PostgreSQL half (`apt-get install postgresql`); without them only the
//! SQLite baseline runs.

#[path = "../tests/common/mod.rs"]
mod common;

use common::bench::{env, pct};

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::postgres as pg;
use common::{Server, TD};
use meshid_proto::admin::{CreateEntryRequest, CreateJoinTokenRequest, UpdateEntryRequest};
use meshid_proto::node::node_client::NodeClient;
use meshid_proto::node::{AttestRequest, SyncRequest};
use meshid_proto::types::{Entry, Selector};
use tokio::sync::{Semaphore, watch};
use tonic::transport::Channel;

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn alias(i: usize) -> String {
    format!("spiffe://{TD}/node/n{i}")
}

/// Resident and peak resident memory of a process, in MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// One simulated agent: the entries (id → revision) its stream last
/// showed, and how many stream messages it got.
struct SimAgent {
    server: usize,
    seen: watch::Receiver<Arc<HashMap<String, i64>>>,
    /// Bumped on every (re)connected stream's first message.
    connections: watch::Receiver<u64>,
}

/// Opens an agent's stream and keeps it open, reconnecting (every 100 ms
/// plus jitter) when the server goes away.
fn spawn_stream(
    addr: String,
    bundle_pem: String,
    identity: common::Identity,
    seen: watch::Sender<Arc<HashMap<String, i64>>>,
    connections: watch::Sender<u64>,
    messages: Arc<AtomicU64>,
) {
    tokio::spawn(async move {
        loop {
            let channel = tokio::time::timeout(
                Duration::from_secs(5),
                try_channel(&addr, &bundle_pem, identity.clone()),
            )
            .await;
            if let Ok(Some(channel)) = channel
                && let Ok(resp) = NodeClient::new(channel).sync(SyncRequest {}).await
            {
                let mut stream = resp.into_inner();
                let mut first = true;
                while let Ok(Some(msg)) = stream.message().await {
                    messages.fetch_add(1, Ordering::Relaxed);
                    let map: HashMap<String, i64> = msg
                        .entries
                        .iter()
                        .map(|e| (e.id.clone(), e.revision))
                        .collect();
                    seen.send_replace(Arc::new(map));
                    if first {
                        connections.send_modify(|c| *c += 1);
                        first = false;
                    }
                }
            }
            if seen.is_closed() {
                return;
            }
            let jitter = Duration::from_millis(u64::from(rand_u8()) % 100);
            tokio::time::sleep(Duration::from_millis(100) + jitter).await;
        }
    });
}

fn rand_u8() -> u8 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.subsec_nanos() % 251) as u8
}

/// A channel to the node API, or `None` while the server is down.
async fn try_channel(addr: &str, bundle_pem: &str, identity: common::Identity) -> Option<Channel> {
    common::try_node_channel(addr, bundle_pem, Some(identity))
        .await
        .ok()
}

struct Figures {
    label: String,
    initial_sync: Duration,
    change_p50: Duration,
    change_p99: Duration,
    change_max: Duration,
    messages_per_change: f64,
    restart_ready: Duration,
    resync_all: Duration,
    resynced_agents: usize,
    rss: Vec<(f64, f64)>,
}

async fn run(
    label: &str,
    store: &str,
    servers_n: usize,
    agents_n: usize,
    entries_n: usize,
) -> Figures {
    eprintln!("== {label}: starting {servers_n} server(s)");
    let mut servers: Vec<Server> = (0..servers_n)
        .map(|_| {
            let port = common::free_port();
            Server::start(&format!(
                "bind_address = \"127.0.0.1:{port}\"\ndefault_svid_ttl = \"1h\"\n{store}"
            ))
        })
        .collect();
    let mut admins = Vec::new();
    for s in &servers {
        admins.push(
            meshid_server::cli::admin_client(&s.admin_socket)
                .await
                .expect("admin client"),
        );
    }

    // Tokens and entries, through the admin API, 32 at a time.
    let t = Instant::now();
    let sem = Arc::new(Semaphore::new(32));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..agents_n {
        let (mut admin, sem) = (admins[i % servers_n].clone(), sem.clone());
        tasks.spawn(async move {
            let _p = sem.acquire_owned().await;
            let t = admin
                .create_join_token(CreateJoinTokenRequest {
                    ttl: 3600,
                    spiffe_id: alias(i),
                })
                .await
                .expect("token")
                .into_inner();
            (i, t.token)
        });
    }
    let mut tokens = vec![String::new(); agents_n];
    while let Some(r) = tasks.join_next().await {
        let (i, tok) = r.expect("task");
        tokens[i] = tok;
    }
    let mut entries: Vec<Entry> = Vec::with_capacity(entries_n);
    let mut etasks = tokio::task::JoinSet::new();
    for j in 0..entries_n {
        let (mut admin, sem) = (admins[j % servers_n].clone(), sem.clone());
        etasks.spawn(async move {
            let _p = sem.acquire_owned().await;
            let e = admin
                .create_entry(CreateEntryRequest {
                    entry: Some(Entry {
                        spiffe_id: format!("spiffe://{TD}/w/{j}"),
                        parent_id: alias(j % agents_n),
                        selectors: vec![Selector {
                            r#type: "unix".into(),
                            value: format!("uid:{}", 10_000 + j),
                        }],
                        ..Entry::default()
                    }),
                })
                .await
                .expect("entry")
                .into_inner();
            (j, e)
        });
    }
    let mut by_index = Vec::with_capacity(entries_n);
    while let Some(r) = etasks.join_next().await {
        by_index.push(r.expect("task"));
    }
    by_index.sort_by_key(|(j, _)| *j);
    entries.extend(by_index.into_iter().map(|(_, e)| e));
    eprintln!(
        "   {agents_n} tokens and {entries_n} entries created in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // Attest every agent on its server, then open its stream.
    let bundle_pem = servers[0].bundle_pem();
    let t = Instant::now();
    let mut atasks = tokio::task::JoinSet::new();
    for (i, token) in tokens.iter().enumerate() {
        let (addr, bundle, token, sem) = (
            servers[i % servers_n].node_addr.clone(),
            bundle_pem.clone(),
            token.clone(),
            sem.clone(),
        );
        atasks.spawn(async move {
            let _p = sem.acquire_owned().await;
            let (key, csr) = common::key_and_csr();
            let ch = common::node_channel(&addr, &bundle, None).await;
            let svid = NodeClient::new(ch)
                .attest(AttestRequest {
                    attestor: "join_token".into(),
                    payload: token.into_bytes(),
                    csr,
                })
                .await
                .expect("attest")
                .into_inner()
                .svid
                .expect("svid");
            (i, (svid.cert_chain, key.serialize_der()))
        });
    }
    let mut identities = vec![None; agents_n];
    while let Some(r) = atasks.join_next().await {
        let (i, id) = r.expect("task");
        identities[i] = Some(id);
    }
    eprintln!(
        "   {agents_n} agents attested in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let messages = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    let mut sims = Vec::with_capacity(agents_n);
    // Keep the senders' owners alive: the stream tasks hold them.
    for (i, id) in identities.into_iter().enumerate() {
        let (seen_tx, seen) = watch::channel(Arc::new(HashMap::new()));
        let (conn_tx, connections) = watch::channel(0u64);
        let server = i % servers_n;
        spawn_stream(
            servers[server].node_addr.clone(),
            bundle_pem.clone(),
            id.expect("identity"),
            seen_tx,
            conn_tx,
            messages.clone(),
        );
        sims.push(SimAgent {
            server,
            seen,
            connections,
        });
    }
    for s in &mut sims {
        s.connections
            .wait_for(|c| *c >= 1)
            .await
            .expect("first message");
    }
    let initial_sync = t.elapsed();
    eprintln!("   every agent synced in {}", ms(initial_sync));

    // Entry changes: time to the agent that needs them.
    let changes = env("CHANGES", 200);
    let writers = env("WRITERS", 1).max(1);
    let before = messages.load(Ordering::Relaxed);
    let entries = Arc::new(entries);
    let sims = Arc::new(sims);
    let mut ctasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let (entries, sims, admins) = (entries.clone(), sims.clone(), admins.clone());
        ctasks.spawn(async move {
            let mut lat = Vec::new();
            let mut c = w;
            while c < changes {
                // A spread of entries (and so of agents and servers).
                let j = (c * 7919) % entries.len();
                let mut e = entries[j].clone();
                let agent = j % sims.len();
                e.hint = format!("change-{c}");
                let mut admin = admins[c % admins.len()].clone();
                let mut seen = sims[agent].seen.clone();
                let t0 = Instant::now();
                // Later changes to the same entry carry a newer revision.
                let current = admin
                    .get_entry(meshid_proto::admin::GetEntryRequest { id: e.id.clone() })
                    .await
                    .expect("get")
                    .into_inner();
                e.revision = current.revision;
                let after = admin
                    .update_entry(UpdateEntryRequest {
                        entry: Some(e.clone()),
                        dry_run: false,
                    })
                    .await
                    .expect("update")
                    .into_inner()
                    .after
                    .expect("after");
                let rev = after.revision;
                let got = tokio::time::timeout(
                    Duration::from_secs(30),
                    seen.wait_for(|m| m.get(&e.id).is_some_and(|r| *r >= rev)),
                )
                .await;
                assert!(got.is_ok(), "change {c} never reached agent {agent}");
                lat.push(t0.elapsed());
                c += writers;
            }
            lat
        });
    }
    let mut lat = Vec::new();
    while let Some(r) = ctasks.join_next().await {
        lat.extend(r.expect("task"));
    }
    lat.sort();
    let msgs = messages.load(Ordering::Relaxed) - before;
    let rss: Vec<(f64, f64)> = servers
        .iter()
        .map(|s| rss_mib(s.pid().expect("pid")))
        .collect();

    // kill -9 the first server and start it again: its agents reconnect.
    let mine: Vec<usize> = (0..sims.len()).filter(|i| sims[*i].server == 0).collect();
    let marks: Vec<u64> = mine
        .iter()
        .map(|i| *sims[*i].connections.borrow())
        .collect();
    let t0 = Instant::now();
    tokio::task::block_in_place(|| {
        servers[0].kill9();
        servers[0].restart();
    });
    let restart_ready = t0.elapsed();
    let t1 = Instant::now();
    let mut resynced = 0;
    for (k, i) in mine.iter().enumerate() {
        let mut c = sims[*i].connections.clone();
        let ok =
            tokio::time::timeout(Duration::from_secs(120), c.wait_for(|v| *v > marks[k])).await;
        if ok.is_ok() {
            resynced += 1;
        }
    }
    let resync_all = t1.elapsed();

    Figures {
        label: label.to_string(),
        initial_sync,
        change_p50: pct(&lat, 0.5),
        change_p99: pct(&lat, 0.99),
        change_max: lat.last().copied().unwrap_or_default(),
        messages_per_change: msgs as f64 / lat.len().max(1) as f64,
        restart_ready,
        resync_all,
        resynced_agents: resynced,
        rss,
    }
}

fn main() {
    let agents = env("AGENTS", 2000);
    let entries = env("ENTRIES", 20_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut figs = Vec::new();
    if let Some(url) = pg::database("sync_scale") {
        let store = format!("[store]\nkind = \"postgres\"\nurl = \"{url}\"\npool_size = 10");
        figs.push(rt.block_on(run("2 servers, PostgreSQL", &store, 2, agents, entries)));
    } else {
        eprintln!("PostgreSQL binaries not found: the PostgreSQL half is skipped");
    }
    figs.push(rt.block_on(run("1 server, SQLite (baseline)", "", 1, agents, entries)));

    println!("\n{agents} agents with a sync stream each, {entries} entries\n");
    println!(
        "| setup | initial sync, all agents | change → agent p50 | p99 | max | stream messages per change | restart → ready | ready → its agents resynced | server RSS (peak) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for f in &figs {
        let rss: Vec<String> = f
            .rss
            .iter()
            .map(|(r, p)| format!("{r:.0} MiB ({p:.0})"))
            .collect();
        println!(
            "| {} | {} | {} | {} | {} | {:.2} | {} | {} ({} agents) | {} |",
            f.label,
            ms(f.initial_sync),
            ms(f.change_p50),
            ms(f.change_p99),
            ms(f.change_max),
            f.messages_per_change,
            ms(f.restart_ready),
            ms(f.resync_all),
            f.resynced_agents,
            rss.join(", ")
        );
    }
    if figs.len() == 2 {
        let (p, s) = (&figs[0], &figs[1]);
        println!(
            "\nPostgreSQL / SQLite: change p99 {:.2}×, initial sync {:.2}×",
            p.change_p99.as_secs_f64() / s.change_p99.as_secs_f64().max(1e-9),
            p.initial_sync.as_secs_f64() / s.initial_sync.as_secs_f64().max(1e-9)
        );
    }
}
