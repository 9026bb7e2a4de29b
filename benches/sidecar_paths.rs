//! Sidecar data path against baselines, in one run: the same HTTP traffic
//! (1 KiB responses) through three paths —
//!   direct plaintext;
//!   meshid outbound sidecar -> mTLS -> meshid inbound sidecar (tcp mode);
//!   meshid sidecars with `tunnel = "h2"`: every connection is an HTTP/2
//!   CONNECT stream on one pooled mTLS connection;
//!   HAProxy -> mTLS -> HAProxy (mode tcp), with the same SVIDs and bundle.
//! Reports wrk requests/s and p50/p99 (-t1 -c32), new connections/s
//! (Connection: close), and bulk MB/s on one connection, as ratios.
//!
//! Then resident memory (VmRSS) of each proxy process at idle and with
//! CONNS (1,000) keep-alive connections open through each pair.
//!
//! `cargo bench --bench sidecar_paths` (needs `haproxy` and `wrk`; DURATION=8,
//! CONNS=1000; PHASES=rps,conn,bulk,memory picks phases; BULK_MIB=512).
//!
//! With `ZTUNNEL_DIR=/path/to/ztunnel` (a source tree of Istio's ztunnel
//! built with `cargo build --release --features testing`; `ZTUNNEL_BIN` if
//! the binary is elsewhere), a fifth path: ztunnel doing both ends (HBONE),
//! under the same load. Needs root, `ip`, `iptables` and `setpriv`: the whole
//! bench then runs in a network namespace of its own, where an iptables rule
//! sends uid 65534's connections to ztunnel (see `sidecar_paths/ztunnel.rs`):
//!
//! `ZTUNNEL_DIR=/path/to/ztunnel cargo bench --bench sidecar_paths`

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "sidecar_paths/ztunnel.rs"]
mod ztunnel;

use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use common::{AgentProc, Server, TD, free_port, meshid, wait_for};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Bytes of the bulk transfer (BULK_MIB, default 512 MiB).
fn bulk_bytes() -> usize {
    common::bench::env("BULK_MIB", 512) << 20
}

async fn app(port: u16) {
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind app");
    let body = vec![b'x'; 1024];
    loop {
        let Ok((s, _)) = l.accept().await else {
            continue;
        };
        let body = body.clone();
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let bulk = line.contains("/bulk");
                let mut close = false;
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if h.to_ascii_lowercase().starts_with("connection: close") {
                        close = true;
                    }
                    if h.trim().is_empty() {
                        break;
                    }
                }
                if bulk {
                    let total = bulk_bytes();
                    let chunk = vec![b'y'; 1 << 20];
                    let _ = w
                        .write_all(
                            format!("HTTP/1.1 200 OK\r\ncontent-length: {total}\r\n\r\n")
                                .as_bytes(),
                        )
                        .await;
                    for _ in 0..(total >> 20) {
                        if w.write_all(&chunk).await.is_err() {
                            return;
                        }
                    }
                } else {
                    let mut resp =
                        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len())
                            .into_bytes();
                    resp.extend_from_slice(&body);
                    if w.write_all(&resp).await.is_err() {
                        return;
                    }
                }
                if close {
                    return;
                }
            }
        });
    }
}

/// wrk against `port`; `via_zt`: as the uid whose connections go to ztunnel.
fn wrk(port: u16, secs: u64, close: bool, via_zt: bool) -> (f64, f64, f64) {
    let mut cmd = if via_zt {
        ztunnel::client_command("wrk")
    } else {
        Command::new("wrk")
    };
    cmd.args(["-t1", "-c32", &format!("-d{secs}s"), "--latency"]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    let out = cmd
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .expect("wrk (apt-get install wrk)");
    let s = String::from_utf8_lossy(&out.stdout);
    let rps = s
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    let ms = |p: &str| {
        s.lines()
            .find(|l| l.trim_start().starts_with(p))
            .and_then(|l| l.split_whitespace().nth(1))
            .map(|v| {
                let (n, unit) = v.split_at(v.find(|c: char| c.is_alphabetic()).unwrap_or(v.len()));
                let n: f64 = n.parse().unwrap_or(0.0);
                match unit {
                    "us" => n / 1000.0,
                    "s" => n * 1000.0,
                    _ => n,
                }
            })
            .unwrap_or(0.0)
    };
    (rps, ms("50%"), ms("99%"))
}

/// Connects to `port`; `via_zt`: with a socket of the uid whose connections
/// go to ztunnel.
async fn connect(port: u16, via_zt: bool) -> tokio::net::TcpStream {
    if via_zt {
        let [s] = <[_; 1]>::try_from(ztunnel::client_sockets(1)).expect("one socket");
        s.connect(([127, 0, 0, 1], port).into())
            .await
            .expect("connect")
    } else {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect")
    }
}

async fn bulk(port: u16, via_zt: bool) -> f64 {
    let mut s = connect(port, via_zt).await;
    s.set_nodelay(true).ok();
    s.write_all(b"GET /bulk HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let t = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0usize;
    let total = bulk_bytes();
    while n < total {
        let r = s.read(&mut buf).await.expect("read");
        if r == 0 {
            break;
        }
        n += r;
    }
    n as f64 / t.elapsed().as_secs_f64() / 1e6
}

/// Resident memory of process `pid`, from `/proc/<pid>/status`.
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

/// Opens `n` keep-alive connections to `port`, each with one request
/// answered (so every hop is established), and returns them open.
async fn open_connections(port: u16, n: usize, via_zt: bool) -> Vec<tokio::net::TcpStream> {
    let mut conns = Vec::with_capacity(n);
    let mut buf = vec![0u8; 4096];
    for _ in 0..n {
        let mut s = connect(port, via_zt).await;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        // The whole response: headers plus the 1 KiB body.
        let want = "HTTP/1.1 200 OK\r\ncontent-length: 1024\r\n\r\n".len() + 1024;
        let mut got = 0;
        while got < want {
            let r = s.read(&mut buf).await.expect("read");
            assert!(r > 0, "connection closed");
            got += r;
        }
        conns.push(s);
    }
    conns
}

struct Kill(Vec<Child>);
impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Prints `a / b` for req/s, new conn/s and bulk, and with `p99` the p99
/// ratio too (lower is better).
fn print_ratios(what: &str, a: &ztunnel::Row, b: &ztunnel::Row, p99: bool) {
    let p99 = if p99 {
        format!(", p99 {:.2}x (lower is better)", a.3 / b.3)
    } else {
        String::new()
    };
    println!(
        "{what}: req/s {:.2}x{p99}, new conn/s {:.2}x, bulk {:.2}x",
        a.1 / b.1,
        a.4 / b.4,
        a.5 / b.5
    );
}

fn main() -> ExitCode {
    match ztunnel::start() {
        ztunnel::Start::Without => run(None),
        ztunnel::Start::Inside(zt) => run(Some(zt)),
        ztunnel::Start::Done(code) => return code,
    }
    ExitCode::SUCCESS
}

#[tokio::main]
async fn run(zt: Option<ztunnel::Ztunnel>) {
    let secs: u64 = std::env::var("DURATION")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let uid = nix::unistd::geteuid().as_raw();
    let server = Server::start("");
    let alias = format!("spiffe://{TD}/node/bench");
    let token = server.ok(&["token", "create", "--spiffe-id", &alias]);
    for n in ["frontend", "payments"] {
        server.ok(&[
            "entry",
            "create",
            "--parent-id",
            &alias,
            "--spiffe-id",
            &format!("spiffe://{TD}/{n}"),
            "--selector",
            &format!("unix:uid:{uid}"),
            "--ttl",
            "1h",
            "--hint",
            n,
        ]);
    }
    let d = server.dir.path().to_path_buf();
    let agent = AgentProc::start(&d.join("agent"), &server, Some(&token));
    let ep = agent.endpoint();
    let certs = d.join("certs");
    wait_for("SVIDs", Duration::from_secs(30), || {
        meshid()
            .args(["agent", "api", "fetch", "x509", "--socket", &ep, "--write"])
            .arg(&certs)
            .output()
            .ok()
            .filter(|o| {
                o.status.success() && String::from_utf8_lossy(&o.stdout).contains("Received 2")
            })
            .map(|_| ())
    });
    // HAProxy wants certificate + key in one file; svid.N follows entry order.
    let mut names = Vec::new();
    for i in 0..2 {
        let pem = std::fs::read_to_string(certs.join(format!("svid.{i}.pem"))).expect("pem");
        let id = meshid_identity::SvidInfo::from_der(
            &meshid_identity::pem::parse_certs(pem.as_bytes()).expect("certs")[0],
        )
        .expect("svid")
        .spiffe_id
        .to_string();
        let key = std::fs::read_to_string(certs.join(format!("svid.{i}.key"))).expect("key");
        let name = id.rsplit('/').next().unwrap_or_default().to_string();
        std::fs::write(certs.join(format!("{name}.pem")), format!("{pem}{key}")).expect("w");
        names.push(name);
    }
    std::fs::copy(certs.join("bundle.0.pem"), certs.join("bundle.pem")).expect("bundle");

    let [app_p, m_in, m_out, h_in, h_out, m_adm_in, m_adm_out] = [(); 7].map(|()| free_port());
    let [t_in, t_out, t_adm_in, t_adm_out] = [(); 4].map(|()| free_port());
    tokio::spawn(app(app_p));
    let mut procs = Kill(Vec::new());
    // BASELINE_MESHID=/path/to/an/older/meshid adds the same sidecar pair run
    // by that binary, for before/after figures in one run.
    let baseline = std::env::var_os("BASELINE_MESHID");
    let sidecar_with = |bin: Option<&std::ffi::OsStr>, name: &str, cfg: String| {
        let p = d.join(format!("{name}.toml"));
        std::fs::write(&p, cfg).expect("cfg");
        let log = std::fs::File::create(d.join(format!("{name}.log"))).expect("log");
        bin.map_or_else(meshid, Command::new)
            .args(["--log", "warn", "sidecar", "run", "--config"])
            .arg(&p)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("sidecar")
    };
    let sidecar = |name: &str, cfg: String| sidecar_with(None, name, cfg);
    procs.0.push(sidecar("in", format!("workload_api_socket = \"{ep}\"\nadmin_address = \"127.0.0.1:{m_adm_in}\"\nspiffe_id = \"spiffe://{TD}/payments\"\n[[inbound]]\nlisten = \"127.0.0.1:{m_in}\"\nforward_to = \"127.0.0.1:{app_p}\"\nmode = \"tcp\"\nallow = [\"spiffe://{TD}/frontend\"]\n")));
    procs.0.push(sidecar("out", format!("workload_api_socket = \"{ep}\"\nadmin_address = \"127.0.0.1:{m_adm_out}\"\nspiffe_id = \"spiffe://{TD}/frontend\"\n[[outbound]]\nlisten = \"127.0.0.1:{m_out}\"\nupstream = \"127.0.0.1:{m_in}\"\nserver_id = \"spiffe://{TD}/payments\"\n")));
    procs.0.push(sidecar("tin", format!("workload_api_socket = \"{ep}\"\nadmin_address = \"127.0.0.1:{t_adm_in}\"\nspiffe_id = \"spiffe://{TD}/payments\"\n[[inbound]]\nlisten = \"127.0.0.1:{t_in}\"\nforward_to = \"127.0.0.1:{app_p}\"\nmode = \"tcp\"\ntunnel = \"h2\"\nallow = [\"spiffe://{TD}/frontend\"]\n")));
    procs.0.push(sidecar("tout", format!("workload_api_socket = \"{ep}\"\nadmin_address = \"127.0.0.1:{t_adm_out}\"\nspiffe_id = \"spiffe://{TD}/frontend\"\n[[outbound]]\nlisten = \"127.0.0.1:{t_out}\"\nupstream = \"127.0.0.1:{t_in}\"\nserver_id = \"spiffe://{TD}/payments\"\ntunnel = \"h2\"\n")));
    let [b_in, b_out, b_adm_in, b_adm_out] = [(); 4].map(|()| free_port());
    if let Some(bin) = &baseline {
        procs.0.push(sidecar_with(Some(bin.as_os_str()), "bin", format!("workload_api_socket = \"{ep}\"\nadmin_address = \"127.0.0.1:{b_adm_in}\"\nspiffe_id = \"spiffe://{TD}/payments\"\n[[inbound]]\nlisten = \"127.0.0.1:{b_in}\"\nforward_to = \"127.0.0.1:{app_p}\"\nmode = \"tcp\"\nallow = [\"spiffe://{TD}/frontend\"]\n")));
        procs.0.push(sidecar_with(Some(bin.as_os_str()), "bout", format!("workload_api_socket = \"{ep}\"\nadmin_address = \"127.0.0.1:{b_adm_out}\"\nspiffe_id = \"spiffe://{TD}/frontend\"\n[[outbound]]\nlisten = \"127.0.0.1:{b_out}\"\nupstream = \"127.0.0.1:{b_in}\"\nserver_id = \"spiffe://{TD}/payments\"\n")));
    }
    // The ztunnel path: ztunnel in front of the same backend; its clients
    // connect to the backend's port and the namespace's nat rule takes them
    // to ztunnel.
    let zt_proc = zt.as_ref().map(|zt| {
        eprintln!("in network namespace {}, with ztunnel", zt.netns);
        procs
            .0
            .push(zt.spawn(std::fs::File::create(d.join("ztunnel.log")).expect("log")));
        procs.0.len() - 1
    });
    let c = certs.display();
    let hcfg = format!(
        "global\n  maxconn 4000\n  ssl-default-bind-options ssl-min-ver TLSv1.3\n  ssl-default-server-options ssl-min-ver TLSv1.3\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\nfrontend out\n  bind 127.0.0.1:{h_out}\n  default_backend to_in\nbackend to_in\n  server in 127.0.0.1:{h_in} ssl crt {c}/frontend.pem ca-file {c}/bundle.pem verify required\nfrontend in\n  bind 127.0.0.1:{h_in} ssl crt {c}/payments.pem ca-file {c}/bundle.pem verify required\n  default_backend app\nbackend app\n  server app 127.0.0.1:{app_p}\n"
    );
    std::fs::write(d.join("haproxy.cfg"), hcfg).expect("haproxy cfg");
    procs.0.push(
        Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(d.join("haproxy.cfg"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("haproxy.log")).expect("log"))
            .spawn()
            .expect("haproxy (apt-get install haproxy)"),
    );

    let probe = |port: u16| {
        eprintln!("probing {port} (logs in {})", d.display());
        wait_for("path ready", Duration::from_secs(30), || {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            use std::io::{Read, Write};
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            out.starts_with("HTTP/1.1 200").then_some(())
        });
    };
    for p in [app_p, m_out, t_out, h_out] {
        probe(p);
    }
    if baseline.is_some() {
        probe(b_out);
    }
    // ztunnel's count of connections, to check that the ztunnel path's
    // traffic and only that reaches it.
    let zt_count = zt.as_ref().map(|zt| {
        let before = zt.connections_opened();
        ztunnel::as_client(|| probe(app_p));
        let after = zt.connections_opened();
        assert!(
            after > before,
            "the ztunnel path's connection did not reach ztunnel (logs in {})",
            d.display()
        );
        after
    });

    // Name, port, and whether the clients are the uid that goes to ztunnel.
    let paths = [
        ("plaintext direct", app_p, false),
        ("meshid sidecars (mTLS)", m_out, false),
        ("meshid h2 tunnel (mTLS)", t_out, false),
        ("HAProxy pair (mTLS)", h_out, false),
    ];
    let phases = std::env::var("PHASES").unwrap_or_else(|_| "rps,conn,bulk,memory".into());
    let phase = |p: &str| phases.split(',').any(|x| x == p);
    // Pairs whose memory is measured: name, port, (inbound, outbound) pids,
    // clients going to ztunnel.
    let pid = |i: usize| procs.0[i].id();
    let h_pid = pid(procs.0.len() - 1);
    let mut pairs = vec![
        ("meshid sidecars", m_out, (pid(0), pid(1)), false),
        ("meshid h2 tunnel", t_out, (pid(2), pid(3)), false),
        ("HAProxy (one process)", h_out, (h_pid, 0), false),
    ];
    if baseline.is_some() {
        pairs.push(("meshid sidecars, baseline", b_out, (pid(4), pid(5)), false));
    }
    if let Some(i) = zt_proc {
        pairs.push((ztunnel::PAIR, app_p, (pid(i), 0), true));
    }
    let idle_rss: Vec<(f64, f64)> = pairs
        .iter()
        .map(|(_, _, (i, o), _)| (rss_mib(*i), rss_mib(*o)))
        .collect();

    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load_before = load();
    let mut rows = Vec::new();
    let baseline_path = baseline
        .as_ref()
        .map(|_| ("meshid sidecars, baseline", b_out, false));
    let zt_path = zt.as_ref().map(|_| (ztunnel::PATH, app_p, true));
    for (name, port, via_zt) in paths.into_iter().chain(baseline_path).chain(zt_path) {
        if let (Some(zt), Some(n), true) = (&zt, zt_count, via_zt) {
            assert_eq!(
                zt.connections_opened(),
                n,
                "other paths' traffic reached ztunnel"
            );
        }
        let (rps, p50, p99) = if phase("rps") {
            wrk(port, secs, false, via_zt)
        } else {
            (0.0, 0.0, 0.0)
        };
        let (cps, _, _) = if phase("conn") {
            wrk(port, secs, true, via_zt)
        } else {
            (0.0, 0.0, 0.0)
        };
        let mbs = if phase("bulk") {
            bulk(port, via_zt).await
        } else {
            0.0
        };
        rows.push((name, rps, p50, p99, cps, mbs));
    }
    let conns = common::bench::env("CONNS", 1000);
    let mut memory = Vec::new();
    if phase("memory") {
        for ((name, port, (i, o), via_zt), idle) in pairs.iter().zip(&idle_rss) {
            let open = open_connections(*port, conns, *via_zt).await;
            memory.push((*name, *idle, (rss_mib(*i), rss_mib(*o))));
            drop(open);
        }
    }
    println!(
        "load average before: {} after: {}",
        load_before.trim(),
        load().trim()
    );
    let n = ["four", "five", "six"].get(rows.len().saturating_sub(4));
    println!(
        "same traffic through {} paths (wrk -t1 -c32 -d{secs}s, 1 KiB responses; bulk: {} MiB on one connection)",
        n.copied().unwrap_or("the"),
        bulk_bytes() >> 20
    );
    println!(
        "{:<26} {:>10} {:>9} {:>9} {:>12} {:>10}",
        "path", "req/s", "p50 ms", "p99 ms", "new conn/s", "bulk MB/s"
    );
    for (name, rps, p50, p99, cps, mbs) in &rows {
        println!("{name:<26} {rps:>10.0} {p50:>9.2} {p99:>9.2} {cps:>12.0} {mbs:>10.0}");
    }
    let (m, t, h, p) = (&rows[1], &rows[2], &rows[3], &rows[0]);
    print_ratios("meshid / HAProxy", m, h, true);
    print_ratios("meshid / plaintext", m, p, false);
    print_ratios("h2 tunnel / HAProxy", t, h, true);
    print_ratios("h2 tunnel / plaintext", t, p, false);
    if !memory.is_empty() {
        println!(
            "resident memory (VmRSS, MiB), idle before traffic / with {conns} keep-alive connections open"
        );
        println!("{:<26} {:>16} {:>16}", "pair", "inbound", "outbound");
        for (name, (ii, io), (ci, co)) in &memory {
            println!(
                "{name:<26} {:>16} {:>16}",
                format!("{ii:.1} / {ci:.1}"),
                format!("{io:.1} / {co:.1}")
            );
        }
    }
    if let Some(b) = rows.iter().find(|r| r.0 == "meshid sidecars, baseline") {
        println!(
            "meshid / baseline build: req/s {:.2}x, new conn/s {:.2}x, bulk {:.2}x; baseline / plaintext bulk {:.2}x",
            m.1 / b.1,
            m.4 / b.4,
            m.5 / b.5,
            b.5 / p.5
        );
    }
    if let Some(z) = rows.iter().find(|r| r.0 == ztunnel::PATH) {
        ztunnel::report(p, m, t, h, z, &memory, conns);
    }
    drop(procs);
}
