//! Agent figures: Workload API first-response latency under 100 concurrent
//! clients and for one client calling in sequence, on a warm cache; agent CPU
//! per 1,000 calls; agent resident memory with 1,000 entries (ENTRIES=10000
//! for the 10,000-entry figure); and the time
//! from `entry create` to the SVID arriving on an open stream.
//!
//! `cargo bench --bench workload_api` (env: CLIENTS, ROUNDS, SINGLE, ENTRIES;
//! `BASELINE_MESHID=/path/to/an/older/meshid` also measures an agent run by
//! that binary, same server and entries, in the same run).

#[path = "../tests/common/mod.rs"]
mod common;

use common::bench::{env, pct};

use std::time::{Duration, Instant};

use common::{AgentProc, Server, TD};
use meshid_proto::admin::CreateEntryRequest;
use meshid_proto::types::{Entry, Selector};
use meshid_proto::workload::X509svidRequest;
use meshid_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

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

/// The agent's CPU time so far (utime + stime), from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    let ticks: u64 = f.iter().sum();
    let hz: u64 = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100);
    Duration::from_millis(ticks * 1000 / hz)
}

/// One call as a new client: connect, FetchX509SVID, first message.
async fn first_response(sock: std::path::PathBuf) -> Duration {
    let t = Instant::now();
    let mut c = client(sock).await;
    let mut s = c.fetch_x509svid(req()).await.expect("fetch").into_inner();
    let m = s.message().await.expect("msg").expect("first");
    assert_eq!(m.svids.len(), 1);
    t.elapsed()
}

/// First-response figures of one agent.
struct Figures {
    concurrent: Vec<Duration>,
    single: Vec<Duration>,
    /// Agent CPU per 1,000 calls: concurrent, single.
    cpu: (Duration, Duration),
}

/// CLIENTS concurrent clients x ROUNDS (round 0 warms the caches and is not
/// counted), then SINGLE calls one after another.
async fn measure(
    sock: &std::path::Path,
    pid: u32,
    clients: usize,
    rounds: usize,
    single: usize,
) -> Figures {
    let mut concurrent = Vec::new();
    let mut cpu0 = cpu_time(pid);
    for round in 0..=rounds {
        if round == 1 {
            cpu0 = cpu_time(pid);
        }
        let tasks: Vec<_> = (0..clients)
            .map(|_| tokio::spawn(first_response(sock.to_path_buf())))
            .collect();
        for t in tasks {
            let d = t.await.expect("task");
            if round > 0 {
                concurrent.push(d);
            }
        }
    }
    let cpu_concurrent =
        (cpu_time(pid) - cpu0) * 1000 / u32::try_from(clients * rounds).expect("calls");
    concurrent.sort();
    for _ in 0..10 {
        first_response(sock.to_path_buf()).await;
    }
    let cpu0 = cpu_time(pid);
    let mut single_lat = Vec::new();
    for _ in 0..single {
        single_lat.push(first_response(sock.to_path_buf()).await);
    }
    let cpu_single = (cpu_time(pid) - cpu0) * 1000 / u32::try_from(single.max(1)).expect("calls");
    single_lat.sort();
    Figures {
        concurrent,
        single: single_lat,
        cpu: (cpu_concurrent, cpu_single),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn print_figures(name: &str, f: &Figures, clients: usize, rounds: usize) {
    println!("{name}:");
    println!(
        "  {clients} concurrent clients x {rounds} rounds: p50 {:.2} ms   p99 {:.2} ms   max {:.2} ms   (goal p99 <= 2 ms)",
        ms(pct(&f.concurrent, 0.5)),
        ms(pct(&f.concurrent, 0.99)),
        ms(f.concurrent[f.concurrent.len() - 1])
    );
    println!(
        "  1 client, {} calls in sequence:     p50 {:.2} ms   p99 {:.2} ms   max {:.2} ms   (goal <= 0.5 ms)",
        f.single.len(),
        ms(pct(&f.single, 0.5)),
        ms(pct(&f.single, 0.99)),
        ms(f.single[f.single.len() - 1])
    );
    println!(
        "  agent CPU per 1,000 calls: {:.0} ms concurrent, {:.0} ms in sequence",
        ms(f.cpu.0),
        ms(f.cpu.1)
    );
}

/// Starts `bin agent run` like `AgentProc::start`, for the baseline agent.
fn start_baseline(
    bin: &std::ffi::OsStr,
    dir: &std::path::Path,
    server: &Server,
    token: &str,
) -> (std::process::Child, std::path::PathBuf) {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(dir.join("bootstrap.pem"), server.bundle_pem()).expect("bundle");
    let socket = dir.join("api.sock");
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"{TD}\"\nserver_address = \"{}\"\ntrust_bundle_path = \"{d}/bootstrap.pem\"\ndata_dir = \"{d}/data\"\nsocket_path = \"{}\"\nmax_backoff = \"1s\"\n",
            server.node_addr,
            socket.display(),
            d = dir.display()
        ),
    )
    .expect("config");
    let log = std::fs::File::create(dir.join("agent.log")).expect("log");
    let child = std::process::Command::new(bin)
        .args(["agent", "run", "--config"])
        .arg(&config)
        .args(["--join-token", token])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("baseline agent");
    common::wait_for("baseline agent socket", Duration::from_secs(30), || {
        std::os::unix::net::UnixStream::connect(&socket)
            .ok()
            .map(|_| ())
    });
    (child, socket)
}

/// Waits until the agent logging to `log` has minted `n` SVIDs (its metrics
/// are off; its log says so).
async fn wait_minted(log: impl Fn() -> String, n: usize) {
    let t = Instant::now();
    while log().matches("SVID minted").count() < n && t.elapsed() < Duration::from_secs(300) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::main]
async fn main() {
    let clients = env("CLIENTS", 100);
    let rounds = env("ROUNDS", 20);
    let single = env("SINGLE", 500);
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
    let t = Instant::now();
    wait_minted(|| agent.log(), n_entries).await;
    let mint_time = t.elapsed();
    let rss_1000 = rss_kib(pid);

    let baseline = std::env::var_os("BASELINE_MESHID").map(|bin| {
        let token = server.ok(&["token", "create", "--spiffe-id", &alias]);
        let dir = server.dir.path().join("baseline-agent");
        let (child, sock) = start_baseline(&bin, &dir, &server, &token);
        (child, sock, dir)
    });
    if let Some((_, _, dir)) = &baseline {
        let log = dir.join("agent.log");
        wait_minted(
            || std::fs::read_to_string(&log).unwrap_or_default(),
            n_entries,
        )
        .await;
    }

    let figures = measure(&agent.socket, pid, clients, rounds, single).await;
    let base_figures = match &baseline {
        Some((child, sock, _)) => Some(measure(sock, child.id(), clients, rounds, single).await),
        None => None,
    };
    if let Some((mut child, _, _)) = baseline {
        let _ = child.kill();
        let _ = child.wait();
    }

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
    println!("first response, warm cache (connect + attest + first message):");
    print_figures("this build", &figures, clients, rounds);
    if let Some(f) = &base_figures {
        print_figures("baseline (BASELINE_MESHID)", f, clients, rounds);
    }
    println!(
        "load average: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "agent RSS: {:.1} MiB with 1 entry, {:.1} MiB with {n_entries} entries/SVIDs (goal <= 32 MiB at 1,000, <= 64 MiB at 10,000: ENTRIES=10000)",
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
