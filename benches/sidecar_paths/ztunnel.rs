//! The optional ztunnel path of `sidecar_paths`: Istio's ztunnel (HBONE:
//! HTTP/2 CONNECT streams over pooled mTLS connections) as one process doing
//! both ends, in the same run as the other paths.
//!
//! Set `ZTUNNEL_DIR` to a ztunnel source tree built with `cargo build
//! --release --features testing` (`ZTUNNEL_BIN` names the binary when it is
//! neither `$ZTUNNEL_DIR/out/rust/release/ztunnel`, where ztunnel's own cargo
//! configuration puts it, nor `$ZTUNNEL_DIR/target/release/ztunnel`). ztunnel captures traffic the
//! way it does in a pod: an iptables `nat OUTPUT` rule REDIRECTs the TCP
//! connections of an unprivileged uid to its outbound port 15001. That rule
//! needs a network namespace of its own, and a namespace with a nat table
//! (conntrack) changes every path's cost, so the whole bench runs inside it:
//! [`start`] creates the namespace, re-executes the bench in it with
//! `ip netns exec`, and deletes it (and the rule with it) afterwards. Only the
//! ztunnel path's clients run as that uid; every other path is the same as
//! without `ZTUNNEL_DIR`.

use std::path::PathBuf;
use std::process::{Child, Command, ExitCode};
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use nix::unistd::Uid;

/// The unprivileged uid (nobody) whose TCP connections go to ztunnel.
pub const CLIENT_UID: u32 = 65534;
/// Set in the re-executed bench: the network namespace it runs in.
const NETNS_ENV: &str = "SIDECAR_PATHS_NETNS";
/// ztunnel's ports (its defaults): outbound capture, stats, readiness.
const OUTBOUND_PORT: u16 = 15001;
const STATS_PORT: u16 = 15020;
const READY_PORT: u16 = 15021;

/// A built ztunnel: its source tree (working directory, home of the local
/// workload config `examples/localhost.yaml`) and its binary.
pub struct Ztunnel {
    dir: PathBuf,
    bin: PathBuf,
    /// The network namespace the bench runs in.
    pub netns: String,
}

/// What `main` does next.
pub enum Start {
    /// No `ZTUNNEL_DIR`: the bench as without ztunnel.
    Without,
    /// Inside the namespace: run the bench with the ztunnel path.
    Inside(Ztunnel),
    /// The bench ran in the namespace (or could not): exit with this.
    Done(ExitCode),
}

/// Reads `ZTUNNEL_DIR`/`ZTUNNEL_BIN`; outside the namespace, runs the whole
/// bench again inside a new one and returns its exit status.
pub fn start() -> Start {
    let Some(dir) = std::env::var_os("ZTUNNEL_DIR").map(PathBuf::from) else {
        return Start::Without;
    };
    let zt = locate(dir).and_then(|(dir, bin)| match std::env::var(NETNS_ENV) {
        Ok(netns) => Ok(Start::Inside(Ztunnel { dir, bin, netns })),
        Err(_) => reexec_in_netns().map(Start::Done),
    });
    zt.unwrap_or_else(|e| {
        eprintln!("sidecar_paths: ZTUNNEL_DIR is set, but {e}");
        Start::Done(ExitCode::from(2))
    })
}

fn locate(dir: PathBuf) -> Result<(PathBuf, PathBuf), String> {
    if !dir.join("examples/localhost.yaml").is_file() {
        return Err(format!(
            "{} is not a ztunnel source tree (no examples/localhost.yaml)",
            dir.display()
        ));
    }
    let candidates = match std::env::var_os("ZTUNNEL_BIN") {
        Some(bin) => vec![PathBuf::from(bin)],
        None => ["out/rust/release/ztunnel", "target/release/ztunnel"]
            .map(|b| dir.join(b))
            .into(),
    };
    match candidates.iter().find(|b| b.is_file()) {
        Some(bin) => Ok((dir.clone(), bin.clone())),
        None => Err(format!(
            "ztunnel is not built: no {candidates:?} (in ZTUNNEL_DIR: `cargo build --release \
             --features testing`, or set ZTUNNEL_BIN to the binary)"
        )),
    }
}

/// Runs `cmd`, turning a missing program or a failure into a message.
fn run(cmd: &mut Command, package: &str) -> Result<(), String> {
    let what = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            format!("{what}: not found (apt-get install {package})")
        }
        _ => format!("{what}: {e}"),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Deletes the namespace; its iptables rules go with it.
struct Netns(String);
impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run(
            Command::new("ip").args(["netns", "del", &self.0]),
            "iproute2",
        ) {
            eprintln!("sidecar_paths: {e}");
        }
    }
}

fn reexec_in_netns() -> Result<ExitCode, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err(
            "the bench must run as root: it creates a network namespace and an iptables rule"
                .into(),
        );
    }
    run(Command::new("iptables").arg("--version"), "iptables")?;
    run(Command::new("setpriv").arg("--version"), "util-linux")?;
    let name = format!("sidecar-paths-{}", std::process::id());
    run(Command::new("ip").args(["netns", "add", &name]), "iproute2")?;
    let netns = Netns(name);
    let in_ns = |args: &[&str]| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &netns.0]).args(args);
        c
    };
    run(&mut in_ns(&["ip", "link", "set", "lo", "up"]), "iproute2")?;
    let uid = CLIENT_UID.to_string();
    let port = OUTBOUND_PORT.to_string();
    run(
        &mut in_ns(&[
            "iptables",
            "-w",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-m",
            "owner",
            "--uid-owner",
            &uid,
            "-j",
            "REDIRECT",
            "--to-ports",
            &port,
        ]),
        "iptables",
    )?;
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut child = in_ns(&[])
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env(NETNS_ENV, &netns.0)
        .spawn()
        .map_err(|e| format!("ip netns exec: {e}"))?;
    // Ctrl-C reaches the bench in the namespace too (same process group);
    // this process outlives it and deletes the namespace.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        signals.add(s);
    }
    let _ = signals.thread_block();
    let status = child.wait().map_err(|e| format!("wait: {e}"))?;
    drop(netns);
    Ok(status
        .code()
        .and_then(|c| u8::try_from(c).ok())
        .map_or(ExitCode::FAILURE, ExitCode::from))
}

/// Sends a one-shot HTTP GET from this process (root: not redirected).
fn get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

impl Ztunnel {
    /// Starts ztunnel (both ends, local CA, workloads from
    /// `examples/localhost.yaml`, 2 worker threads, warnings only, like the
    /// sidecars' `--log warn`) and waits until it reports ready.
    pub fn spawn(&self, log: std::fs::File) -> Child {
        let mut child = Command::new(&self.bin)
            .current_dir(&self.dir)
            .env("FAKE_CA", "true")
            .env("XDS_ADDRESS", "")
            .env("LOCAL_XDS_PATH", "examples/localhost.yaml")
            .env("PROXY_MODE", "dedicated")
            .env("PROXY_WORKLOAD_INFO", "default/local/default")
            .env("ZTUNNEL_WORKER_THREADS", "2")
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("ztunnel");
        crate::common::wait_for("ztunnel ready", Duration::from_secs(60), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("ztunnel exited: {status}");
            }
            get(READY_PORT, "/healthz/ready")
                .filter(|r| r.starts_with("HTTP/1.1 200"))
                .map(|_| ())
        });
        child
    }

    /// TCP connections ztunnel has opened (its `istio_tcp_connections_opened_total`
    /// series, summed), to check that the ztunnel path's traffic reaches it.
    pub fn connections_opened(&self) -> f64 {
        get(STATS_PORT, "/metrics")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("istio_tcp_connections_opened_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// Runs `f` on a thread of its own whose file-system uid is [`CLIENT_UID`]:
/// sockets it creates belong to that uid (iptables' owner match reads the
/// credentials of the socket's file), so their connections go to ztunnel.
/// `setfsuid` changes the calling thread only; the bench's other threads
/// keep their uid.
pub fn as_client<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::unistd::setfsuid(Uid::from_raw(CLIENT_UID));
            f()
        })
        .join()
        .expect("client thread")
    })
}

/// `n` unconnected TCP sockets owned by [`CLIENT_UID`].
pub fn client_sockets(n: usize) -> Vec<tokio::net::TcpSocket> {
    as_client(|| {
        (0..n)
            .map(|_| tokio::net::TcpSocket::new_v4().expect("socket"))
            .collect()
    })
}

/// `program` run as [`CLIENT_UID`].
pub fn client_command(program: &str) -> Command {
    let mut c = Command::new("setpriv");
    let (u, g) = (
        format!("--reuid={CLIENT_UID}"),
        format!("--regid={CLIENT_UID}"),
    );
    c.args([u.as_str(), g.as_str(), "--clear-groups", program]);
    c
}

/// The ztunnel path's name in the table.
pub const PATH: &str = "ztunnel (HBONE mTLS)";
/// The ztunnel process's name in the memory table.
pub const PAIR: &str = "ztunnel (one process)";

/// A table row: path, req/s, p50 ms, p99 ms, new conn/s, bulk MB/s.
pub type Row<'a> = (&'a str, f64, f64, f64, f64, f64);
/// A memory row: pair, (inbound, outbound) MiB idle, the same with connections.
pub type Memory<'a> = (&'a str, (f64, f64), (f64, f64));

/// Prints the ztunnel path's ratios: to plaintext and HAProxy, and of the
/// sidecar pair and the h2 tunnel to it; memory of both ends with `conns`
/// connections open.
pub fn report(p: &Row, m: &Row, t: &Row, h: &Row, z: &Row, memory: &[Memory], conns: usize) {
    println!(
        "all paths in network namespace {} (iptables nat OUTPUT: uid {CLIENT_UID} -> :{OUTBOUND_PORT}); the ztunnel path's clients run as uid {CLIENT_UID}",
        std::env::var(NETNS_ENV).unwrap_or_default()
    );
    super::print_ratios("ztunnel / plaintext", z, p, false);
    super::print_ratios("ztunnel / HAProxy", z, h, true);
    super::print_ratios("meshid sidecars / ztunnel", m, z, true);
    super::print_ratios("h2 tunnel / ztunnel", t, z, true);
    let both_ends = |name: &str| {
        memory
            .iter()
            .find(|r| r.0 == name)
            .map(|(_, _, (i, o))| i + o)
    };
    if let (Some(ms), Some(ts), Some(zs)) = (
        both_ends("meshid sidecars"),
        both_ends("meshid h2 tunnel"),
        both_ends(PAIR),
    ) {
        println!(
            "memory, both ends, {conns} connections: meshid sidecars {ms:.1} MiB ({:.2}x ztunnel), h2 tunnel {ts:.1} MiB ({:.2}x), ztunnel {zs:.1} MiB",
            ms / zs,
            ts / zs
        );
    }
}
