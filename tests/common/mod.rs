//! Test harness: real `meshid` processes on loopback, in temp directories.
#![allow(dead_code, missing_docs)]

pub mod bench;
pub mod postgres;
pub mod raw_codec;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use meshid_identity::verify::{Authorizer, SpiffeServerVerifier, TrustBundles};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::transport::{Channel, Endpoint};

pub mod apps;

pub const TD: &str = "example.org";

/// The `meshid` binary under test.
pub fn meshid() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshid"))
}

/// Kills `child` and, when it leads a process group of its own (spawned
/// with `process_group(0)`), every process of that group; then reaps it.
/// For wrappers that fork rather than exec (`faketime`) and for nginx's
/// workers, which would otherwise outlive the test.
pub fn kill_group(child: &mut std::process::Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Polls `cond` until it returns `Some`, or panics after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A running `meshid server run`.
pub struct Server {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub admin_socket: PathBuf,
    pub node_addr: String,
    pub metrics_addr: String,
    child: Option<Child>,
    /// The uid the server runs as, when not the tests' own.
    uid: Option<u32>,
}

/// Writes a server config into `dir` with `extra` TOML appended.
pub fn write_server_config(dir: &Path, extra: &str) -> PathBuf {
    let bind = if extra.contains("bind_address") {
        String::new()
    } else {
        "bind_address = \"127.0.0.1:0\"\n".to_string()
    };
    let cfg = format!(
        "trust_domain = \"{TD}\"\ndata_dir = \"{d}/data\"\n{bind}admin_socket = \"{d}/admin.sock\"\nmetrics_address = \"127.0.0.1:0\"\n{extra}\n",
        d = dir.display()
    );
    let p = dir.join("server.toml");
    std::fs::write(&p, cfg).expect("write config");
    p
}

impl Server {
    /// Starts a server with `extra` config and waits until it answers.
    pub fn start(extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = write_server_config(dir.path(), extra);
        Self::start_with(dir, config)
    }

    /// Starts a server on an existing directory and config.
    pub fn start_with(dir: tempfile::TempDir, config: PathBuf) -> Self {
        Self::start_with_uid(dir, config, None)
    }

    /// Starts a server running as `uid` (group `uid` too; the tests run as
    /// root), its directory owned by that uid. The admin socket then admits
    /// two admin identities: `uid` and root.
    pub fn start_as(uid: u32, extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = write_server_config(dir.path(), extra);
        for p in [dir.path(), config.as_path()] {
            nix::unistd::chown(
                p,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(uid)),
            )
            .expect("chown to the server's uid");
        }
        Self::start_with_uid(dir, config, Some(uid))
    }

    /// Starts a server run by another `meshid` binary (a bench's
    /// baseline), with `extra` config; the admin CLI stays this build's.
    pub fn start_bin(bin: &std::ffi::OsStr, extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = write_server_config(dir.path(), extra);
        Self::spawn(dir, config, None, Some(bin))
    }

    fn start_with_uid(dir: tempfile::TempDir, config: PathBuf, uid: Option<u32>) -> Self {
        Self::spawn(dir, config, uid, None)
    }

    fn spawn(
        dir: tempfile::TempDir,
        config: PathBuf,
        uid: Option<u32>,
        bin: Option<&std::ffi::OsStr>,
    ) -> Self {
        use std::os::unix::process::CommandExt as _;
        let admin_socket = dir.path().join("admin.sock");
        let log = std::fs::File::create(dir.path().join("server.log")).expect("log");
        let mut cmd = bin.map_or_else(meshid, Command::new);
        if let Some(uid) = uid {
            cmd.uid(uid).gid(uid);
        }
        let child = cmd
            .args(["server", "run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn server");
        let mut s = Self {
            dir,
            config,
            admin_socket,
            node_addr: String::new(),
            metrics_addr: String::new(),
            child: Some(child),
            uid,
        };
        let health: serde_json::Value =
            wait_for("server readiness", Duration::from_secs(30), || {
                if let Some(c) = s.child.as_mut()
                    && let Ok(Some(status)) = c.try_wait()
                {
                    panic!("server exited early ({status}): {}", s.log());
                }
                let out = s.cli(&["healthcheck", "--json"]);
                out.status
                    .success()
                    .then(|| serde_json::from_slice(&out.stdout).expect("health json"))
            });
        s.node_addr = health["node_address"]
            .as_str()
            .expect("node addr")
            .to_string();
        s.metrics_addr = health["metrics_address"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        s
    }

    /// Runs `meshid server <args> --admin-socket <sock>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        meshid()
            .arg("server")
            .args(args)
            .arg("--admin-socket")
            .arg(&self.admin_socket)
            .output()
            .expect("run cli")
    }

    /// Runs `meshid server <args> --admin-socket <sock>` as `uid` (a second
    /// admin identity when the server runs as `uid`, see [`Server::start_as`]).
    pub fn cli_as(&self, uid: u32, args: &[&str]) -> Output {
        use std::os::unix::process::CommandExt as _;
        meshid()
            .uid(uid)
            .gid(uid)
            .arg("server")
            .args(args)
            .arg("--admin-socket")
            .arg(&self.admin_socket)
            .output()
            .expect("run cli")
    }

    /// Runs a CLI command that must succeed; returns trimmed stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "meshid server {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The server process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// The audit log so far.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("data/audit.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }

    /// Bundle PEM as `meshid server bundle show` prints it.
    pub fn bundle_pem(&self) -> String {
        self.ok(&["bundle", "show", "--format", "pem"]) + "\n"
    }

    /// Starts the server again on the same directory and config.
    pub fn restart(&mut self) {
        self.stop();
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("server.log"))
            .expect("log");
        let mut cmd = meshid();
        if let Some(uid) = self.uid {
            use std::os::unix::process::CommandExt as _;
            cmd.uid(uid).gid(uid);
        }
        self.child = Some(
            cmd.args(["server", "run", "--config"])
                .arg(&self.config)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn server"),
        );
        wait_for(
            "server readiness after restart",
            Duration::from_secs(30),
            || self.cli(&["healthcheck"]).status.success().then_some(()),
        );
    }

    /// Kills the server with SIGKILL (no shutdown path) and waits for it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the server (SIGTERM) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(c.id()).expect("pid")),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A client identity: certificate chain and PKCS#8 key.
pub type Identity = (Vec<Vec<u8>>, Vec<u8>);

/// A gRPC channel to the node API over mTLS, verifying the server's SPIFFE ID.
pub async fn node_channel(addr: &str, bundle_pem: &str, identity: Option<Identity>) -> Channel {
    try_node_channel(addr, bundle_pem, identity)
        .await
        .expect("connect node API")
}

/// [`node_channel`], with a failure to connect as an error.
pub async fn try_node_channel(
    addr: &str,
    bundle_pem: &str,
    identity: Option<Identity>,
) -> Result<Channel, tonic::transport::Error> {
    let provider = meshid_identity::crypto::provider();
    let roots = meshid_identity::pem::parse_certs(bundle_pem.as_bytes()).expect("bundle pem");
    let mut bundles = TrustBundles::new();
    bundles.add(TD, &roots);
    let server_id = format!("spiffe://{TD}/meshid/server").parse().expect("id");
    let verifier = SpiffeServerVerifier::new(bundles, Authorizer::Exact(server_id), &provider);
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(meshid_identity::crypto::versions(false))
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(
                chain.into_iter().map(CertificateDer::from).collect(),
                PrivateKeyDer::Pkcs8(key.into()),
            )
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let addr = addr.to_string();
    Endpoint::from_static("http://meshid-server")
        .connect_with_connector(tower::service_fn(move |_| {
            let (connector, addr) = (connector.clone(), addr.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let name = ServerName::try_from("meshid-server").expect("name");
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
}

/// A fresh P-256 key and a CSR for it.
pub fn key_and_csr() -> (rcgen::KeyPair, Vec<u8>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .expect("csr")
        .der()
        .to_vec();
    (key, csr)
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// The bootstrap most end-to-end tests begin with: a join token for the
/// node alias `spiffe://TD/node/<node>`, and under it one entry per name in
/// `workloads` (`spiffe://TD/<name>`, selected by this test process's uid,
/// with the name as its hint and `ttl` if given). Returns the alias and the
/// token.
pub fn register_node(
    server: &Server,
    node: &str,
    workloads: &[&str],
    ttl: Option<&str>,
) -> (String, String) {
    let alias = format!("spiffe://{TD}/node/{node}");
    let token = server.ok(&["token", "create", "--spiffe-id", &alias]);
    let uid = format!("unix:uid:{}", nix::unistd::geteuid().as_raw());
    for name in workloads {
        let id = format!("spiffe://{TD}/{name}");
        let mut args = vec![
            "entry",
            "create",
            "--parent-id",
            &alias,
            "--spiffe-id",
            &id,
            "--selector",
            &uid,
            "--hint",
            name,
        ];
        if let Some(ttl) = ttl {
            args.extend(["--ttl", ttl]);
        }
        server.ok(&args);
    }
    (alias, token)
}

/// [`register_node`], then an agent attested with the node's token in
/// `<server dir>/agent`, its Workload API answering.
pub fn agent_with_workloads(
    server: &Server,
    node: &str,
    workloads: &[&str],
    ttl: Option<&str>,
) -> AgentProc {
    let (_, token) = register_node(server, node, workloads, ttl);
    AgentProc::start(&server.dir.path().join("agent"), server, Some(&token))
}

/// A running `meshid agent run`.
pub struct AgentProc {
    pub dir: PathBuf,
    pub socket: PathBuf,
    config: PathBuf,
    child: Option<Child>,
}

impl AgentProc {
    /// Writes a config under `dir` for `server` and starts the agent, with
    /// `token` if given; waits until the Workload API answers.
    pub fn start(dir: &Path, server: &Server, token: Option<&str>) -> Self {
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
        let mut a = Self {
            dir: dir.to_path_buf(),
            socket,
            config,
            child: None,
        };
        a.spawn(token);
        a
    }

    /// Starts the agent on a config file written elsewhere; a `token` goes in
    /// `MESHID_JOIN_TOKEN`, as a systemd `EnvironmentFile` would pass it.
    pub fn start_config(dir: &Path, config: PathBuf, socket: PathBuf, token: Option<&str>) -> Self {
        let mut a = Self {
            dir: dir.to_path_buf(),
            socket,
            config,
            child: None,
        };
        a.spawn_env(None, token);
        a
    }

    fn spawn(&mut self, token: Option<&str>) {
        self.spawn_env(token, None);
    }

    fn spawn_env(&mut self, token: Option<&str>, env_token: Option<&str>) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .expect("log");
        let mut cmd = meshid();
        cmd.args(["agent", "run", "--config"]).arg(&self.config);
        if let Some(t) = token {
            cmd.args(["--join-token", t]);
        }
        if let Some(t) = env_token {
            cmd.env("MESHID_JOIN_TOKEN", t);
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn agent");
        let sock = self.socket.clone();
        wait_for("agent Workload API socket", Duration::from_secs(30), || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "agent exited early ({st}): {}",
                    std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
                );
            }
            std::os::unix::net::UnixStream::connect(&sock)
                .ok()
                .map(|_| ())
        });
        self.child = Some(child);
    }

    /// `kill -9` the agent (no cleanup at all).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the agent again after [`AgentProc::kill9`] or a stop, without a
    /// token: it must resume from its persisted identity and bundle.
    pub fn start_again(&mut self) {
        self.spawn(None);
    }

    /// Stops and starts the agent again, without a token.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn(None);
    }

    /// The agent's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `unix://` endpoint for SPIFFE clients.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(c.id()).expect("pid")),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running `meshid sidecar run`, killed on drop.
pub struct Sidecar(Child);

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a sidecar with config `cfg`, logging to `<dir>/<name>.log`.
pub fn sidecar(dir: &Path, name: &str, cfg: &str) -> Sidecar {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, cfg).expect("config");
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log");
    Sidecar(
        meshid()
            .args(["sidecar", "run", "--config"])
            .arg(&p)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("sidecar"),
    )
}
