//! Faults under real processes: the server killed mid-signing, the store
//! going away under a running server, the audit log becoming unwritable.
//! Each checks what must survive and what must be refused.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{AgentProc, Server, TD, key_and_csr, meshid, node_channel, wait_for};
use meshid_proto::admin::{CreateEntryRequest, CreateJoinTokenRequest, ListAuthoritiesRequest};
use meshid_proto::node::node_client::NodeClient;
use meshid_proto::node::{SignX509SvidsRequest, X509SvidParams};
use meshid_proto::types::{Entry, Selector};

fn uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

fn entry(alias: &str, name: &str) -> Entry {
    Entry {
        spiffe_id: format!("spiffe://{TD}/w/{name}"),
        parent_id: alias.to_string(),
        selectors: vec![Selector {
            r#type: "unix".into(),
            value: format!("uid:{}", uid()),
        }],
        ..Entry::default()
    }
}

/// The X509-SVIDs the agent serves this process (all entries select its uid).
async fn served_serials(agent: &AgentProc) -> Option<Vec<String>> {
    let client = spiffe::WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .ok()?;
    let svids = client.fetch_all_x509_svids().await.ok()?;
    Some(
        svids
            .iter()
            .map(|s| {
                meshid_identity::SvidInfo::from_der(s.leaf().as_ref())
                    .expect("leaf")
                    .serial
            })
            .collect(),
    )
}

/// Waits up to a minute for the agent to serve `n` SVIDs.
async fn wait_served(agent: &AgentProc, n: usize) -> bool {
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if served_serials(agent).await.is_some_and(|s| s.len() == n) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .is_ok()
}

fn audit_verify(config: &Path) -> std::process::Output {
    meshid()
        .args(["server", "audit", "verify", "--config"])
        .arg(config)
        .output()
        .expect("audit verify")
}

/// The agent's persisted identity, as a client identity for the node API.
fn agent_identity(agent: &AgentProc) -> common::Identity {
    let pem = std::fs::read(agent.dir.join("data/agent_identity.pem")).expect("identity");
    let chain = meshid_identity::pem::parse_certs(&pem)
        .expect("chain")
        .into_iter()
        .map(|c| c.to_vec())
        .collect();
    let key = match meshid_identity::pem::parse_key(&pem).expect("key") {
        rustls::pki_types::PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        other => panic!("unexpected key type {other:?}"),
    };
    (chain, key)
}

/// `kill -9` of the server while an agent has hundreds of SVIDs signed in
/// batches, then a restart on the same data directory: entries, an unused
/// join token, the CA journal and the audit chain are intact (`audit
/// verify` passes, a torn last record is cut and recorded), the agent
/// reconnects by itself and ends up serving every SVID, and every serial it
/// serves is on record in the audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_mid_signing_restarts_intact() {
    const ENTRIES: usize = 600;
    // A fixed node API port: the agent must find the restarted server.
    let mut server = Server::start(&format!(
        "bind_address = \"127.0.0.1:{}\"\ndefault_svid_ttl = \"30m\"\n",
        common::free_port()
    ));
    let alias = format!("spiffe://{TD}/node/faults");
    let mut admin = meshid_server::cli::admin_client(&server.admin_socket)
        .await
        .expect("admin");
    for i in 0..ENTRIES {
        admin
            .create_entry(CreateEntryRequest {
                entry: Some(entry(&alias, &format!("batch-{i}"))),
            })
            .await
            .expect("create entry");
    }
    let spare = admin
        .create_join_token(CreateJoinTokenRequest {
            ttl: 3600,
            spiffe_id: format!("spiffe://{TD}/node/spare"),
        })
        .await
        .expect("token")
        .into_inner()
        .token;
    let authorities = |r: meshid_proto::admin::ListAuthoritiesResponse| {
        let mut v: Vec<_> = r
            .authorities
            .into_iter()
            .filter_map(|a| a.authority)
            .map(|a| (a.id, a.kind, a.state))
            .collect();
        v.sort();
        v
    };
    let cas_before = authorities(
        admin
            .list_authorities(ListAuthoritiesRequest::default())
            .await
            .expect("authorities")
            .into_inner(),
    );
    drop(admin);

    let token = server.ok(&["token", "create", "--spiffe-id", &alias]);
    let agent = AgentProc::start(&server.dir.path().join("agent"), &server, Some(&token));
    // Kill as soon as the first workload SVIDs are on record: the agent's
    // batches are still being signed.
    let issued = |s: &Server| {
        s.audit()
            .iter()
            .filter(|r| r["event"] == "x509_svid_issued" && r["entry_id"].is_string())
            .count()
    };
    let at_kill = wait_for("first batch signed", Duration::from_secs(60), || {
        let log = std::fs::read_to_string(server.dir.path().join("data/audit.log")).ok()?;
        let n = log.matches("\"entry_id\"").count();
        (n > 0).then_some(n)
    });
    let pid = server.pid().expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9");
    let after_kill = issued(&server);
    eprintln!("killed with {at_kill}..{after_kill} of {ENTRIES} workload SVIDs on record");
    assert!(after_kill < ENTRIES, "the kill came mid-signing");

    server.restart();
    let out = audit_verify(&server.config);
    assert!(
        out.status.success(),
        "audit chain intact after kill -9: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut admin = meshid_server::cli::admin_client(&server.admin_socket)
        .await
        .expect("admin");
    let cas_after = authorities(
        admin
            .list_authorities(ListAuthoritiesRequest::default())
            .await
            .expect("authorities")
            .into_inner(),
    );
    assert_eq!(cas_before, cas_after, "CA journal unchanged");
    let entries: serde_json::Value =
        serde_json::from_str(&server.ok(&["entry", "list", "--output", "json"])).expect("json");
    assert_eq!(entries.as_array().expect("array").len(), ENTRIES);

    // The agent reconnects by itself and gets every SVID.
    let served = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            if let Some(s) = served_serials(&agent).await
                && s.len() == ENTRIES
            {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("agent serves every SVID after restart: {}", agent.log()));
    // Nothing served that is not on record.
    let audit = server.audit();
    for serial in &served {
        assert!(
            audit
                .iter()
                .any(|r| r["event"] == "x509_svid_issued" && r["serial"] == serial.as_str()),
            "served SVID {serial} is in the audit log"
        );
    }
    // The unused token survived and still works, once.
    let spare_agent = AgentProc::start(&server.dir.path().join("spare"), &server, Some(&spare));
    wait_for("spare agent attested", Duration::from_secs(30), || {
        server
            .ok(&["agent", "list", "--output", "json"])
            .contains("node/spare")
            .then_some(())
    });
    drop(spare_agent);
    let out = audit_verify(&server.config);
    assert!(out.status.success(), "audit chain intact at the end");
}

/// Starts `meshid server run` with SIGXFSZ ignored (inherited through exec),
/// so that a file size limit makes writes fail with EFBIG instead of
/// killing the process: the way to make the audit file unwritable that works
/// as root and as any user.
fn spawn_server_ignoring_sigxfsz(config: &Path, log: &Path) -> Child {
    Command::new("sh")
        .arg("-c")
        .arg("trap '' XFSZ; exec \"$0\" server run --config \"$1\"")
        .arg(env!("CARGO_BIN_EXE_meshid"))
        .arg(config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log"))
        .spawn()
        .expect("spawn server")
}

/// A child killed on drop, with its whole process group when it leads one
/// (`faketime` forks the agent rather than exec'ing it).
struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        common::kill_group(&mut self.0);
    }
}

/// Sets the soft file size limit of `pid` (lowering and raising a soft limit
/// up to the hard one needs no privilege).
fn prlimit_fsize(pid: u32, limit: &str) {
    let out = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--fsize={limit}:")])
        .output()
        .expect("prlimit (util-linux)");
    assert!(
        out.status.success(),
        "prlimit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The audit log stops taking writes (the file may not grow: a file size
/// limit on the server process, which holds for root as for anyone; the
/// store is PostgreSQL so that nothing else the server writes is local).
/// Signing is refused with `Unavailable` naming the audit log, the refusal
/// is logged and counted (`meshid_server_audit_write_errors_total`), no SVID
/// is handed out, and once the file may grow again issuance resumes and the
/// chain verifies. An audit log on a full device (`/dev/full`) at start
/// stops the server before it serves anything, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritable_audit_log_refuses_issuance() {
    // At start: a full device.
    let dir = tempfile::tempdir().expect("tmp");
    std::os::unix::fs::symlink("/dev/full", dir.path().join("full-audit.log")).expect("symlink");
    let cfg = common::write_server_config(
        dir.path(),
        &format!("audit_log = \"{}/full-audit.log\"", dir.path().display()),
    );
    let out = meshid()
        .args(["server", "run", "--config"])
        .arg(&cfg)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a server whose audit log is full does not start"
    );
    assert!(
        err.contains("audit") && err.contains("No space left on device"),
        "{err}"
    );

    let Some(url) = common::postgres::database("faults_audit") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = common::write_server_config(
        dir.path(),
        &format!("[store]\nkind = \"postgres\"\nurl = \"{url}\"\npool_size = 4"),
    );
    let child = Killed(spawn_server_ignoring_sigxfsz(
        &cfg,
        &dir.path().join("server.log"),
    ));
    let admin_socket = dir.path().join("admin.sock");
    let cli = |args: &[&str]| {
        meshid()
            .arg("server")
            .args(args)
            .arg("--admin-socket")
            .arg(&admin_socket)
            .output()
            .expect("cli")
    };
    let health: serde_json::Value = wait_for("server ready", Duration::from_secs(30), || {
        let out = cli(&["healthcheck", "--json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).expect("json"))
    });
    let node_addr = health["node_address"].as_str().expect("addr").to_string();
    let metrics_addr = health["metrics_address"]
        .as_str()
        .expect("metrics")
        .to_string();
    let stdout = |o: std::process::Output| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let alias = format!("spiffe://{TD}/node/audit");
    let token = stdout(cli(&["token", "create", "--spiffe-id", &alias]));
    let entry_id = stdout(cli(&[
        "entry",
        "create",
        "--parent-id",
        &alias,
        "--spiffe-id",
        &format!("spiffe://{TD}/w/audited"),
        "--selector",
        &format!("unix:uid:{}", uid()),
    ]));
    // A stand-in Server for the agent harness (bundle and address).
    let bundle = stdout(cli(&["bundle", "show", "--format", "pem"])) + "\n";
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).expect("mkdir");
    std::fs::write(agent_dir.join("bootstrap.pem"), &bundle).expect("bundle");
    let agent_cfg = agent_dir.join("agent.toml");
    std::fs::write(
        &agent_cfg,
        format!(
            "trust_domain = \"{TD}\"\nserver_address = \"{node_addr}\"\ntrust_bundle_path = \"{d}/bootstrap.pem\"\ndata_dir = \"{d}/data\"\nsocket_path = \"{d}/api.sock\"\nmax_backoff = \"1s\"\n",
            d = agent_dir.display()
        ),
    )
    .expect("agent config");
    let agent = AgentProc::start_config(
        &agent_dir,
        agent_cfg,
        agent_dir.join("api.sock"),
        Some(&token),
    );
    wait_for("SVID served", Duration::from_secs(60), || {
        std::fs::read_to_string(dir.path().join("data/audit.log"))
            .ok()?
            .contains(&entry_id)
            .then_some(())
    });
    let mut node =
        NodeClient::new(node_channel(&node_addr, &bundle, Some(agent_identity(&agent))).await);
    let sign = |csr: Vec<u8>| SignX509SvidsRequest {
        params: vec![X509SvidParams {
            entry_id: entry_id.clone(),
            csr,
        }],
    };
    node.sign_x509_svids(sign(key_and_csr().1))
        .await
        .expect("signing works before the fault");

    let audit_path = dir.path().join("data/audit.log");
    let size = std::fs::metadata(&audit_path).expect("audit").len();
    prlimit_fsize(child.0.id(), &size.to_string());
    // A record written just before the limit took effect is fine; from now
    // on the file cannot grow.
    let size = std::fs::metadata(&audit_path).expect("audit").len();
    let err = node
        .sign_x509_svids(sign(key_and_csr().1))
        .await
        .expect_err("no SVID without an audit record");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("audit log not writable"),
        "the error says why: {err:?}"
    );
    assert!(child.0.id() > 0);
    let log = std::fs::read_to_string(dir.path().join("server.log")).expect("log");
    assert!(
        log.contains("audit log write failed"),
        "a log line says why: {log}"
    );
    let metrics = http_get(&metrics_addr, "/metrics");
    let errors: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("meshid_server_audit_write_errors_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_default();
    assert!(errors >= 1.0, "write errors counted: {metrics}");
    assert_eq!(
        std::fs::metadata(&audit_path).expect("audit").len(),
        size,
        "the failed write left nothing behind"
    );
    // Admin changes are refused too (they are audited), and the server
    // still answers.
    assert!(
        !cli(&["token", "create", "--spiffe-id", &alias])
            .status
            .success()
    );
    assert!(cli(&["healthcheck"]).status.success(), "still serving");

    // Room again: issuance resumes by itself and the chain is whole.
    prlimit_fsize(child.0.id(), "unlimited");
    node.sign_x509_svids(sign(key_and_csr().1))
        .await
        .expect("signing resumes once the audit log can be written");
    drop(agent);
    drop(child);
    let out = audit_verify(&cfg);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

/// A TCP relay in front of PostgreSQL that can be cut: down, it closes every
/// relayed connection and refuses new ones (as a stopped database does);
/// up, it listens on the same port again.
struct Relay {
    port: u16,
    upstream: u16,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    fn start(upstream: u16) -> Self {
        let port = common::free_port();
        let r = Self {
            port,
            upstream,
            up: Arc::new(AtomicBool::new(false)),
            conns: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
        };
        r.set_up();
        r
    }

    fn set_up(&self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).expect("bind relay");
        listener.set_nonblocking(true).expect("nonblocking");
        self.up.store(true, Ordering::SeqCst);
        let (up, conns, stop, upstream) = (
            self.up.clone(),
            self.conns.clone(),
            self.stop.clone(),
            self.upstream,
        );
        std::thread::spawn(move || {
            while up.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).expect("blocking");
                        let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                            continue;
                        };
                        let mut c = conns.lock().expect("conns");
                        c.push(client.try_clone().expect("clone"));
                        c.push(server.try_clone().expect("clone"));
                        drop(c);
                        for (mut from, mut to) in [
                            (
                                client.try_clone().expect("c"),
                                server.try_clone().expect("s"),
                            ),
                            (server, client),
                        ] {
                            std::thread::spawn(move || {
                                let _ = std::io::copy(&mut from, &mut to);
                                let _ = to.shutdown(std::net::Shutdown::Both);
                            });
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
    }

    fn set_down(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.conns.lock().expect("conns").drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        // The accept loop drops the listener within its next poll.
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.set_down();
    }
}

/// The database goes away under a running server (every connection cut,
/// new ones refused) and comes back. Meanwhile admin and node calls fail
/// with Unavailable within the pool's acquire timeout (no crash, no hang),
/// and afterwards the server recovers by itself: admin calls work, and an
/// entry created after the outage reaches the agent as an SVID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_is_unavailable_and_recovers() {
    let Some(url) = common::postgres::database("faults_outage") else {
        return;
    };
    let pg = common::postgres::server().expect("postgres");
    let relay = Relay::start(pg.port);
    let url = url.replace(&format!(":{}/", pg.port), &format!(":{}/", relay.port));
    assert!(url.contains(&relay.port.to_string()), "{url}");
    let server = Server::start(&format!(
        "[store]\nkind = \"postgres\"\nurl = \"{url}\"\npool_size = 4"
    ));
    let alias = format!("spiffe://{TD}/node/outage");
    let token = server.ok(&["token", "create", "--spiffe-id", &alias]);
    let agent = AgentProc::start(&server.dir.path().join("agent"), &server, Some(&token));
    let create = |name: &str| {
        server.cli(&[
            "entry",
            "create",
            "--parent-id",
            &alias,
            "--spiffe-id",
            &format!("spiffe://{TD}/w/{name}"),
            "--selector",
            &format!("unix:uid:{}", uid()),
        ])
    };
    assert!(create("before").status.success());
    assert!(wait_served(&agent, 1).await, "SVID before the outage");
    let entry_id = {
        let v: serde_json::Value =
            serde_json::from_str(&server.ok(&["entry", "list", "--output", "json"])).expect("json");
        v[0]["id"].as_str().expect("id").to_string()
    };
    let bundle = server.bundle_pem();
    let mut node = NodeClient::new(
        node_channel(&server.node_addr, &bundle, Some(agent_identity(&agent))).await,
    );

    relay.set_down();
    let started = Instant::now();
    let out = server.cli(&["entry", "list"]);
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "entry list fails during the outage");
    assert!(err.to_lowercase().contains("unavailable"), "{err}");
    assert!(took < Duration::from_secs(30), "no hang: {took:?}");
    let started = Instant::now();
    let err = node
        .sign_x509_svids(SignX509SvidsRequest {
            params: vec![X509SvidParams {
                entry_id: entry_id.clone(),
                csr: key_and_csr().1,
            }],
        })
        .await
        .expect_err("no signing without the store");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(30), "no hang");
    assert!(server.pid().is_some());
    assert!(
        !server.log().contains("panicked"),
        "no crash: {}",
        server.log()
    );

    relay.set_up();
    wait_for("admin API recovers", Duration::from_secs(60), || {
        server
            .cli(&["entry", "list"])
            .status
            .success()
            .then_some(())
    });
    assert!(create("after").status.success());
    assert!(
        wait_served(&agent, 2).await,
        "the new entry reaches the agent: {}",
        agent.log()
    );
}

fn readyz_serial(addr: &str) -> Option<String> {
    let mut c = TcpStream::connect(addr).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    c.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut s = String::new();
    c.read_to_string(&mut s).ok()?;
    if !s.starts_with("HTTP/1.1 200") {
        return None;
    }
    s.lines()
        .find_map(|l| l.strip_prefix("serial: "))
        .map(str::to_string)
}

/// `kill -9` of the agent while a workload streams from its Workload API and
/// a sidecar pair carries a long-lived stream and fresh requests: during the
/// outage the sidecars keep serving with the SVIDs they hold (ready, no
/// failed request, the stream never reset); after the restart the agent
/// resumes from its persisted identity, the sidecars and the streaming
/// workload receive new SVIDs, and traffic never notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_while_workloads_stream() {
    use common::apps::{Traffic, echo_app, http_app};
    let server = Server::start("");
    let alias = format!("spiffe://{TD}/node/restart");
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
            &format!("unix:uid:{}", uid()),
            "--ttl",
            "30s",
            "--hint",
            n,
        ]);
    }
    let dir = server.dir.path().to_path_buf();
    let mut agent = AgentProc::start(&dir.join("agent"), &server, Some(&token));
    let ep = agent.endpoint();
    let http = http_app(Arc::new(Mutex::new(Vec::new())));
    let echo = echo_app();
    let [b_http, b_tcp, b_adm, a_http, a_tcp, a_adm] = [(); 6].map(|()| common::free_port());
    let _b = common::sidecar(
        &dir,
        "payments",
        &format!(
            "workload_api_socket = \"{ep}\"\nadmin_address = \"127.0.0.1:{b_adm}\"\nspiffe_id = \"spiffe://{TD}/payments\"\n\
         [[inbound]]\nlisten = \"127.0.0.1:{b_http}\"\nforward_to = \"127.0.0.1:{http}\"\nmode = \"http\"\nallow = [\"spiffe://{TD}/frontend\"]\n\
         [[inbound]]\nlisten = \"127.0.0.1:{b_tcp}\"\nforward_to = \"127.0.0.1:{echo}\"\nmode = \"tcp\"\nallow = [\"spiffe://{TD}/frontend\"]\n"
        ),
    );
    let _a = common::sidecar(
        &dir,
        "frontend",
        &format!(
            "workload_api_socket = \"{ep}\"\nadmin_address = \"127.0.0.1:{a_adm}\"\nspiffe_id = \"spiffe://{TD}/frontend\"\n\
         [[outbound]]\nlisten = \"127.0.0.1:{a_http}\"\nupstream = \"127.0.0.1:{b_http}\"\nserver_id = \"spiffe://{TD}/payments\"\n\
         [[outbound]]\nlisten = \"127.0.0.1:{a_tcp}\"\nupstream = \"127.0.0.1:{b_tcp}\"\nserver_id = \"spiffe://{TD}/payments\"\n"
        ),
    );
    let (b_admin, a_admin) = (format!("127.0.0.1:{b_adm}"), format!("127.0.0.1:{a_adm}"));
    wait_for("sidecars ready", Duration::from_secs(30), || {
        readyz_serial(&b_admin).and(readyz_serial(&a_admin))
    });
    wait_for("path through the sidecars", Duration::from_secs(30), || {
        common::apps::get(a_http).ok()
    });
    // A workload streaming X509-SVID updates.
    let source = spiffe::X509Source::builder()
        .endpoint(agent.endpoint())
        .build()
        .await
        .expect("X509Source");
    let leaf_serial = |s: &spiffe::X509Svid| {
        meshid_identity::SvidInfo::from_der(s.leaf().as_ref())
            .expect("leaf")
            .serial
    };
    let traffic = Traffic::start(a_tcp, a_http);

    agent.kill9();
    let killed = Instant::now();
    let b_serial = readyz_serial(&b_admin).expect("payments ready while the agent is down");
    let src_serial = leaf_serial(&source.svid().expect("svid"));
    // Three seconds of outage: the sidecars keep serving.
    while killed.elapsed() < Duration::from_secs(3) {
        assert!(
            readyz_serial(&b_admin).is_some() && readyz_serial(&a_admin).is_some(),
            "sidecars stay ready while the agent is down"
        );
        assert_eq!(traffic.failures(), 0, "no request fails during the outage");
        std::thread::sleep(Duration::from_millis(200));
    }
    agent.start_again();

    // The next SVIDs reach the sidecars and the streaming workload.
    wait_for("payments sidecar rotates", Duration::from_secs(60), || {
        readyz_serial(&b_admin).filter(|s| *s != b_serial)
    });
    let mut updates = source.updated();
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if leaf_serial(&source.svid().expect("svid")) != src_serial {
                break;
            }
            updates.changed().await.expect("update");
        }
    })
    .await
    .expect("the streaming workload receives a new SVID after the restart");
    std::thread::sleep(Duration::from_secs(1));
    let report = traffic.stop();
    eprintln!("traffic across the agent restart: {report:?}");
    assert!(report.stream_error.is_none(), "{report:?}");
    assert!(report.requests_failed.is_empty(), "{report:?}");
    assert!(
        report.requests_ok > 10 && report.stream_lines > 10,
        "{report:?}"
    );
}

/// The `faketime` wrapper (Debian package `faketime`), or `None` with a
/// printed reason outside CI.
fn faketime() -> Option<&'static str> {
    let found = Command::new("faketime")
        .args(["-f", "+0", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return Some("faketime");
    }
    assert!(
        !std::env::var("CI").is_ok_and(|v| v == "true"),
        "faketime is required in CI (.ci/run installs it)"
    );
    eprintln!("SKIPPED: faketime is not installed");
    None
}

/// Agents whose clocks are a few minutes ahead of and behind the server's
/// (libfaketime, monotonic clock left alone): both attest, serve X509-SVIDs
/// that are valid at the server's time, and rotate them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_with_clock_skew_still_serve_and_rotate() {
    let Some(faketime) = faketime() else {
        return;
    };
    let server = Server::start("");
    let bundle = server.bundle_pem();
    let mut agents = Vec::new();
    for (name, offset) in [("ahead", "+150s"), ("behind", "-150s")] {
        let alias = format!("spiffe://{TD}/node/{name}");
        let token = server.ok(&["token", "create", "--spiffe-id", &alias]);
        server.ok(&[
            "entry",
            "create",
            "--parent-id",
            &alias,
            "--spiffe-id",
            &format!("spiffe://{TD}/skew/{name}"),
            "--selector",
            &format!("unix:uid:{}", uid()),
            "--ttl",
            "5m",
        ]);
        let dir = server.dir.path().join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("bootstrap.pem"), &bundle).expect("bundle");
        let socket = dir.join("api.sock");
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "trust_domain = \"{TD}\"\nserver_address = \"{}\"\ntrust_bundle_path = \"{d}/bootstrap.pem\"\n\
                 data_dir = \"{d}/data\"\nsocket_path = \"{}\"\nmax_backoff = \"1s\"\nrotation_fraction = 0.1\n",
                server.node_addr,
                socket.display(),
                d = dir.display()
            ),
        )
        .expect("config");
        let child = Killed(
            Command::new(faketime)
                .args(["-f", offset])
                .arg(env!("CARGO_BIN_EXE_meshid"))
                .args(["agent", "run", "--config"])
                .arg(&config)
                .args(["--join-token", &token])
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
                .process_group(0)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("agent.log")).expect("log"))
                .spawn()
                .expect("faketime agent"),
        );
        agents.push((name, dir, socket, child));
    }
    let roots: Vec<_> = meshid_identity::pem::parse_certs(bundle.as_bytes()).expect("bundle");
    let mut first = Vec::new();
    for (name, dir, socket, _) in &agents {
        let ep = format!("unix://{}", socket.display());
        let serial = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                if let Ok(c) = spiffe::WorkloadApiClient::connect_to(ep.clone()).await
                    && let Ok(svids) = c.fetch_all_x509_svids().await
                    && let Some(s) = svids.first()
                {
                    return check_valid_now(s, &roots);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "agent {name} serves an SVID: {}",
                std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
            )
        });
        first.push(serial);
    }
    // Rotation: 5 min SVIDs renewed at a tenth of their lifetime.
    for ((name, dir, socket, _), serial) in agents.iter().zip(&first) {
        let ep = format!("unix://{}", socket.display());
        tokio::time::timeout(Duration::from_secs(90), async {
            loop {
                if let Ok(c) = spiffe::WorkloadApiClient::connect_to(ep.clone()).await
                    && let Ok(svids) = c.fetch_all_x509_svids().await
                    && let Some(s) = svids.first()
                    && check_valid_now(s, &roots) != *serial
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "agent {name} rotates: {}",
                std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
            )
        });
    }
}

/// Checks the SVID is within its validity window at the server's (this
/// process's) time and chains to the bundle; returns its serial.
fn check_valid_now(
    s: &spiffe::X509Svid,
    roots: &[rustls::pki_types::CertificateDer<'static>],
) -> String {
    let info = meshid_identity::SvidInfo::from_der(s.leaf().as_ref()).expect("leaf");
    let now = std::time::SystemTime::now();
    let (_, leaf) = x509_parser::parse_x509_certificate(s.leaf().as_ref()).expect("leaf parses");
    let nb = std::time::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(leaf.validity().not_before.timestamp()).expect("nb"));
    assert!(nb <= now && now < info.not_after, "valid now");
    let issuer_ok = roots.iter().any(|r| {
        x509_parser::parse_x509_certificate(r.as_ref())
            .is_ok_and(|(_, root)| leaf.verify_signature(Some(root.public_key())).is_ok())
    }) || s.cert_chain().len() > 1;
    assert!(issuer_ok, "signed by a bundle authority");
    info.serial
}
