//! Soak under rotation, with real processes: a server, an agent, 50
//! workloads streaming X509-SVIDs from the Workload API, and a sidecar pair
//! (frontend outbound -> payments inbound -> echo app) carrying traffic at a
//! steady rate, every SVID with a TTL of `TTL` seconds, rotated at half of it.
//!
//! Counted: rotations seen per stream, failed requests and reset
//! connections (both must be 0), agent and sidecar RSS at start and end
//! (growth must stay under `RSS_GROWTH_KIB`). Runs 60 s by default;
//! `MESHID_SOAK_SECS=600` runs longer.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{AgentProc, Server, TD, free_port, meshid, wait_for};
use meshid_proto::workload::X509svidRequest;
use meshid_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tonic::transport::Endpoint;

/// SVID lifetime in seconds: short enough for many rotations in a minute,
/// long enough that a loaded machine never lets one lapse (the agent
/// rotates at half-life, leaving TTL/2 of slack).
const TTL: u64 = 12;
const WORKLOADS: usize = 50;
/// Bound on RSS growth of each process between start and end of the soak.
const RSS_GROWTH_KIB: u64 = 32 * 1024;
/// One request every this long on fresh connections, and one on a held one.
const PERIOD: Duration = Duration::from_millis(100);

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("proc status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sidecar(dir: &std::path::Path, name: &str, cfg: &str) -> Proc {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, cfg).expect("config");
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log");
    Proc(
        meshid()
            .args(["sidecar", "run", "--config"])
            .arg(&p)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("sidecar"),
    )
}

fn ready(admin: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", admin)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    if s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).is_ok() && line.contains(" 200 ")
}

#[derive(Default)]
struct Traffic {
    ok: AtomicU64,
    failed: AtomicU64,
    resets: AtomicU64,
}

impl Traffic {
    fn fail(&self, what: &str, e: &std::io::Error) {
        if matches!(
            e.kind(),
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof
        ) {
            self.resets.fetch_add(1, Ordering::Relaxed);
        }
        self.failed.fetch_add(1, Ordering::Relaxed);
        eprintln!("{what}: {e}");
    }
}

fn round_trip(r: &mut BufReader<TcpStream>, line: &str) -> std::io::Result<()> {
    r.get_mut().write_all(format!("{line}\n").as_bytes())?;
    let mut back = String::new();
    if r.read_line(&mut back)? == 0 {
        return Err(ErrorKind::UnexpectedEof.into());
    }
    if back.trim_end() != line {
        return Err(std::io::Error::other(format!("echo {back:?} for {line:?}")));
    }
    Ok(())
}

fn fresh(addr: SocketAddr, line: &str) -> std::io::Result<()> {
    let s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    round_trip(&mut BufReader::new(s), line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_under_rotation() {
    let secs: u64 = std::env::var("MESHID_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let server = Server::start("");
    let alias = format!("spiffe://{TD}/node/soak");
    let token = server.ok(&["token", "create", "--spiffe-id", &alias]);
    let uid = format!("unix:uid:{}", nix::unistd::geteuid().as_raw());
    let meshid_exe = std::fs::canonicalize(env!("CARGO_BIN_EXE_meshid")).expect("exe");
    let me = std::env::current_exe().expect("exe");
    let ttl = format!("{TTL}s");
    for (name, exe) in [
        ("frontend", meshid_exe.display().to_string()),
        ("payments", meshid_exe.display().to_string()),
        ("workload", me.display().to_string()),
    ] {
        server.ok(&[
            "entry",
            "create",
            "--parent-id",
            &alias,
            "--spiffe-id",
            &format!("spiffe://{TD}/{name}"),
            "--selector",
            &uid,
            "--selector",
            &format!("unix:path:{exe}"),
            "--ttl",
            &ttl,
            "--hint",
            name,
        ]);
    }
    let dir = server.dir.path().join("soak");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("bootstrap.pem"), server.bundle_pem()).expect("bundle");
    let socket = dir.join("api.sock");
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"{TD}\"\nserver_address = \"{}\"\ntrust_bundle_path = \"{d}/bootstrap.pem\"\n\
             data_dir = \"{d}/data\"\nsocket_path = \"{}\"\nmax_backoff = \"1s\"\nrotation_fraction = 0.5\n",
            server.node_addr,
            socket.display(),
            d = dir.display()
        ),
    )
    .expect("config");
    let agent = AgentProc::start_config(&dir, config, socket, Some(&token));
    let ep = agent.endpoint();

    // The sidecar pair and the app.
    let echo = common::apps::echo_app();
    let (b_in, a_out, a_adm, b_adm) = (free_port(), free_port(), free_port(), free_port());
    let payments = sidecar(
        &dir,
        "payments",
        &format!(
            "workload_api_socket = \"{ep}\"\nadmin_address = \"127.0.0.1:{b_adm}\"\nspiffe_id = \"spiffe://{TD}/payments\"\n\
             [[inbound]]\nlisten = \"127.0.0.1:{b_in}\"\nforward_to = \"127.0.0.1:{echo}\"\nallow = [\"spiffe://{TD}/frontend\"]\n"
        ),
    );
    let frontend = sidecar(
        &dir,
        "frontend",
        &format!(
            "workload_api_socket = \"{ep}\"\nadmin_address = \"127.0.0.1:{a_adm}\"\nspiffe_id = \"spiffe://{TD}/frontend\"\n\
             [[outbound]]\nlisten = \"127.0.0.1:{a_out}\"\nupstream = \"127.0.0.1:{b_in}\"\nserver_id = \"spiffe://{TD}/payments\"\n"
        ),
    );
    wait_for("sidecars ready", Duration::from_secs(60), || {
        (ready(a_adm) && ready(b_adm)).then_some(())
    });
    let out: SocketAddr = ([127, 0, 0, 1], a_out).into();
    wait_for(
        "first request through the pair",
        Duration::from_secs(60),
        || fresh(out, "hello").ok(),
    );

    // 50 workloads streaming, each on its own connection.
    let stop = Arc::new(AtomicBool::new(false));
    let mut streams = Vec::new();
    for _ in 0..WORKLOADS {
        let p = agent.socket.clone();
        let ch = Endpoint::from_static("http://workload.api")
            .connect_with_connector(tower::service_fn(move |_| {
                let p = p.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(p).await?,
                    ))
                }
            }))
            .await
            .expect("connect");
        let mut req = tonic::Request::new(X509svidRequest {});
        req.metadata_mut().insert(
            "workload.spiffe.io",
            tonic::metadata::MetadataValue::from_static("true"),
        );
        let mut s = SpiffeWorkloadApiClient::new(ch)
            .fetch_x509svid(req)
            .await
            .expect("stream")
            .into_inner();
        let stop = stop.clone();
        streams.push(tokio::spawn(async move {
            let mut serials = Vec::<Vec<u8>>::new();
            let mut error = None;
            while !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_secs(1), s.message()).await {
                    Err(_) => continue,
                    Ok(Ok(Some(m))) => {
                        if let Some(svid) = m.svids.first()
                            && serials.last() != Some(&svid.x509_svid)
                        {
                            serials.push(svid.x509_svid.clone());
                        }
                    }
                    Ok(Ok(None)) => {
                        error = Some("stream ended".to_string());
                        break;
                    }
                    Ok(Err(e)) => {
                        error = Some(e.to_string());
                        break;
                    }
                }
            }
            (serials.len().saturating_sub(1), error)
        }));
    }

    // Warm-up done: RSS at start.
    let pids = [
        ("agent", agent.pid().expect("agent pid")),
        ("frontend sidecar", frontend.0.id()),
        ("payments sidecar", payments.0.id()),
    ];
    let start_rss: Vec<u64> = pids.iter().map(|(_, p)| rss_kib(*p)).collect();

    // Steady traffic: a fresh connection per request (a new mTLS handshake
    // with whatever SVID is current), and one connection held throughout.
    let traffic = Arc::new(Traffic::default());
    let mut threads = Vec::new();
    {
        let (stop, t) = (stop.clone(), traffic.clone());
        threads.push(std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let tick = Instant::now();
                n += 1;
                match fresh(out, &format!("fresh {n}")) {
                    Ok(()) => t.ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        t.fail("fresh connection", &e);
                        0
                    }
                };
                std::thread::sleep(PERIOD.saturating_sub(tick.elapsed()));
            }
        }));
    }
    {
        let (stop, t) = (stop.clone(), traffic.clone());
        threads.push(std::thread::spawn(move || {
            let s = TcpStream::connect(out).expect("held connection");
            s.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("t");
            let mut r = BufReader::new(s);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let tick = Instant::now();
                n += 1;
                match round_trip(&mut r, &format!("held {n}")) {
                    Ok(()) => {
                        t.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        t.fail("held connection", &e);
                        return;
                    }
                }
                std::thread::sleep(PERIOD.saturating_sub(tick.elapsed()));
            }
        }));
    }

    tokio::time::sleep(Duration::from_secs(secs)).await;
    let end_rss: Vec<u64> = pids.iter().map(|(_, p)| rss_kib(*p)).collect();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("traffic thread");
    }
    let mut rotations = Vec::new();
    for s in streams {
        let (n, err) = s.await.expect("stream task");
        assert!(
            err.is_none(),
            "a workload stream failed: {err:?}\n{}",
            agent.log()
        );
        rotations.push(n);
    }

    let ok = traffic.ok.load(Ordering::Relaxed);
    let failed = traffic.failed.load(Ordering::Relaxed);
    let resets = traffic.resets.load(Ordering::Relaxed);
    let (min, max) = (
        *rotations.iter().min().expect("streams"),
        *rotations.iter().max().expect("streams"),
    );
    eprintln!(
        "soak {secs}s, TTL {TTL}s, {WORKLOADS} streams: rotations per stream min {min} max {max}; \
         requests ok {ok}, failed {failed}, resets {resets}"
    );
    for ((name, _), (a, b)) in pids.iter().zip(start_rss.iter().zip(&end_rss)) {
        eprintln!(
            "{name} RSS {a} KiB -> {b} KiB ({:+} KiB)",
            *b as i64 - *a as i64
        );
    }
    assert_eq!(failed, 0, "failed requests");
    assert_eq!(resets, 0, "reset connections");
    assert!(ok >= secs, "too little traffic: {ok} requests in {secs}s");
    // Rotation at half-life: about secs / (TTL / 2) per stream; at least
    // one per full TTL even on a loaded machine.
    let want = (secs / TTL).max(1) as usize;
    assert!(
        min >= want,
        "a stream saw {min} rotations in {secs}s, want >= {want}"
    );
    for ((name, _), (a, b)) in pids.iter().zip(start_rss.iter().zip(&end_rss)) {
        assert!(
            *b <= a + RSS_GROWTH_KIB,
            "{name} RSS grew from {a} KiB to {b} KiB (bound +{RSS_GROWTH_KIB} KiB)"
        );
    }
    drop(frontend);
    drop(payments);
}
