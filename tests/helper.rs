//! `meshid helper` end to end: a real server, agent and helper; the files it
//! writes read by real programs (nginx serving mTLS, curl, openssl), across
//! rotations and crashes.

mod common;

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{AgentProc, Server, TD, free_port, meshid, wait_for};
use x509_parser::prelude::{FromDer, X509Certificate};

const APP: &str = "spiffe://example.org/app";

struct Mesh {
    server: Server,
    agent: AgentProc,
}

/// A server, an agent, and an entry for the `meshid` binary run by this uid
/// (the helper is the workload), with `entry_args` (e.g. `--ttl 6s`).
fn mesh(entry_args: &[&str]) -> Mesh {
    mesh_with(entry_args, |_| {})
}

fn mesh_with(entry_args: &[&str], before_entry: impl FnOnce(&Server)) -> Mesh {
    let server = Server::start("");
    let alias = format!("spiffe://{TD}/node/helper");
    let token = server.ok(&["token", "create", "--spiffe-id", &alias]);
    before_entry(&server);
    let uid = format!("unix:uid:{}", nix::unistd::geteuid().as_raw());
    let path = format!("unix:path:{}", env!("CARGO_BIN_EXE_meshid"));
    let mut args = vec![
        "entry",
        "create",
        "--parent-id",
        &alias,
        "--spiffe-id",
        APP,
        "--selector",
        &uid,
        "--selector",
        &path,
    ];
    args.extend_from_slice(entry_args);
    server.ok(&args);
    let dir = server.dir.path().join("agent");
    let agent = AgentProc::start(&dir, &server, Some(&token));
    Mesh { server, agent }
}

/// A running `meshid helper run`, killed on drop.
struct Helper {
    child: Option<Child>,
    log: PathBuf,
}

impl Helper {
    fn start(config: &Path, env: &[(&str, &str)]) -> Self {
        let log = config.with_extension("log");
        let mut cmd = meshid();
        cmd.args(["helper", "run", "--config"]).arg(config);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn helper");
        Self {
            child: Some(child),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let c = self.child.as_mut().expect("running");
        let status = wait_for("helper exit", timeout, || c.try_wait().expect("wait"));
        self.child = None;
        status
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The hex serial of the first certificate in a PEM file.
fn serial_of(pem: &[u8]) -> String {
    let certs = meshid_identity::pem::parse_certs(pem).expect("certs");
    let (_, c) = X509Certificate::from_der(&certs[0]).expect("parse");
    c.raw_serial_as_string()
}

/// Whether the private key in `key_pem` belongs to the first certificate
/// in `cert_pem`.
fn key_matches(cert_pem: &[u8], key_pem: &[u8]) -> bool {
    let certs = meshid_identity::pem::parse_certs(cert_pem).expect("certs");
    let (_, c) = X509Certificate::from_der(&certs[0]).expect("parse");
    let key = rcgen::KeyPair::from_pem(std::str::from_utf8(key_pem).expect("utf8")).expect("key");
    c.public_key().subject_public_key.data.as_ref() == key.public_key_raw()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("metadata").mode() & 0o7777
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_default()
}

/// A tool needed by a test: its path, or `None` (with the reason printed)
/// outside CI; under CI a missing tool fails the test.
fn tool(name: &str, candidates: &[&str]) -> Option<PathBuf> {
    for c in candidates {
        if Path::new(c).exists() {
            return Some(PathBuf::from(c));
        }
    }
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim().to_string()));
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{name} is required in CI (.ci/run installs it)"
        );
        eprintln!("SKIPPED: {name} is not installed");
    }
    found
}

fn base_config(mesh: &Mesh, certs: &Path, extra: &str) -> String {
    format!(
        "agent_address = \"{}\"\ncert_dir = \"{}\"\nsvid_file_name = \"svid.pem\"\nsvid_key_file_name = \"svid_key.pem\"\nsvid_bundle_file_name = \"svid_bundle.pem\"\nsvid_combined_file_name = \"svid_combined.pem\"\n{extra}",
        mesh.agent.socket.display(),
        certs.display()
    )
}

/// A foreground nginx with its own prefix, killed on drop.
/// nginx (master and workers, in a process group of their own), killed
/// as a group on drop so that no worker outlives the test.
struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        common::kill_group(&mut self.0);
    }
}

/// nginx serves mTLS from the helper's files and is reloaded by SIGHUP from
/// the helper at every rotation; curl, presenting the helper's combined
/// file, keeps getting answers across several rotations with no failed
/// request, and the certificate nginx serves changes.
#[test]
fn nginx_keeps_serving_mtls_across_rotations() {
    let Some(nginx) = tool("nginx", &["/usr/sbin/nginx"]) else {
        return;
    };
    let Some(curl) = tool("curl", &["/usr/bin/curl"]) else {
        return;
    };
    let mesh = mesh(&["--ttl", "8s", "--dns", "localhost"]);
    let work = mesh.server.dir.path().join("nginx");
    let certs = work.join("certs");
    std::fs::create_dir_all(&certs).expect("mkdir");
    let pid_file = work.join("nginx.pid");
    let cfg = work.join("helper.toml");
    std::fs::write(
        &cfg,
        base_config(
            &mesh,
            &certs,
            &format!(
                "pid_file_name = \"{}\"\nrenew_signal = \"SIGHUP\"\n",
                pid_file.display()
            ),
        ),
    )
    .expect("config");
    let helper = Helper::start(&cfg, &[]);
    wait_for("first files", Duration::from_secs(60), || {
        certs.join("svid_combined.pem").exists().then_some(())
    });

    let port = free_port();
    let conf = work.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "pid {w}/nginx.pid;\nerror_log {w}/error.log info;\nworker_processes 1;\nevents {{ worker_connections 64; }}\nhttp {{\n  access_log {w}/access.log;\n  server {{\n    listen 127.0.0.1:{port} ssl;\n    server_name localhost;\n    ssl_certificate {c}/svid.pem;\n    ssl_certificate_key {c}/svid_key.pem;\n    ssl_client_certificate {c}/svid_bundle.pem;\n    ssl_verify_client on;\n    location / {{ return 200 \"hello $ssl_client_verify\\n\"; }}\n  }}\n}}\n",
            w = work.display(),
            c = certs.display()
        ),
    )
    .expect("nginx.conf");
    let _nginx = Nginx(
        Command::new(&nginx)
            .arg("-p")
            .arg(&work)
            .arg("-e")
            .arg(work.join("error.log"))
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx"),
    );
    wait_for("nginx listening", Duration::from_secs(30), || {
        (pid_file.exists() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
            .then_some(())
    });

    let url = format!("https://localhost:{port}/");
    let (mut ok, mut failed) = (0u32, Vec::new());
    let mut serials: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(150);
    while serials.len() < 4 && Instant::now() < deadline {
        let out = Command::new(&curl)
            .args(["-sS", "--fail", "--max-time", "10", "--cacert"])
            .arg(certs.join("svid_bundle.pem"))
            .arg("--cert")
            .arg(certs.join("svid_combined.pem"))
            .args(["-w", "%{certs}", &url])
            .output()
            .expect("curl");
        let body = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() && body.starts_with("hello SUCCESS") {
            ok += 1;
            let serial = serial_of(body.as_bytes());
            if serials.last() != Some(&serial) {
                serials.push(serial);
            }
        } else {
            failed.push(format!(
                "{}: {body} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let signalled = helper.log().matches("process signalled").count();
    eprintln!(
        "nginx/curl: {ok} requests answered, {} failed, {} served certificates ({} rotations), helper signalled nginx {signalled} times",
        failed.len(),
        serials.len(),
        serials.len().saturating_sub(1)
    );
    assert!(failed.is_empty(), "failed requests: {failed:#?}");
    assert!(
        serials.len() >= 4,
        "nginx served {} certificates: {serials:?}\nhelper log:\n{}",
        serials.len(),
        helper.log()
    );
    assert!(signalled >= 3, "helper log:\n{}", helper.log());
}

/// A crash in the middle of writing an update (the process aborts after
/// writing half of a file, or after writing every file but before the
/// switch) leaves the previous certificate and key in place, matching; and
/// `kill -9` at arbitrary moments never leaves a mismatched pair.
#[test]
fn crash_mid_write_leaves_previous_pair_intact() {
    let mesh = mesh(&["--ttl", "6s"]);
    let work = mesh.server.dir.path().join("crash");
    let certs = work.join("certs");
    std::fs::create_dir_all(&certs).expect("mkdir");
    let cfg = work.join("helper.toml");
    std::fs::write(&cfg, base_config(&mesh, &certs, "")).expect("config");

    for fault in ["partial-write@2", "before-swap@2"] {
        std::fs::remove_dir_all(&certs).expect("rm");
        std::fs::create_dir_all(&certs).expect("mkdir");
        let mut h = Helper::start(&cfg, &[("MESHID_HELPER_FAULT", fault)]);
        // The first update is written whole; the second one crashes.
        let first = wait_for("first files", Duration::from_secs(60), || {
            let c = read(&certs.join("svid.pem"));
            (!c.is_empty()).then(|| serial_of(&c))
        });
        let status = h.wait(Duration::from_secs(60));
        assert!(!status.success(), "{fault}: the helper crashed: {status}");
        assert!(h.log().contains("aborting"), "{fault}: {}", h.log());
        let cert = read(&certs.join("svid.pem"));
        let key = read(&certs.join("svid_key.pem"));
        assert_eq!(serial_of(&cert), first, "{fault}: previous certificate");
        assert!(key_matches(&cert, &key), "{fault}: key matches certificate");
        let combined = read(&certs.join("svid_combined.pem"));
        assert_eq!(serial_of(&combined), first);
        let text = String::from_utf8(combined).expect("utf8");
        let key_at = text
            .find("-----BEGIN PRIVATE KEY-----")
            .expect("key in combined");
        assert!(
            key_matches(text.as_bytes(), &text.as_bytes()[key_at..]),
            "{fault}: combined file"
        );
        // The crashed update's directory is there, unused.
        let versions = std::fs::read_dir(&certs)
            .expect("ls")
            .filter(|e| {
                e.as_ref()
                    .expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .starts_with("..meshid_v")
            })
            .count();
        assert!(versions >= 2, "{fault}: {versions} version directories");
    }

    // kill -9 at moments spread over rotations: the pair always matches.
    for i in 0..6u64 {
        let mut h = Helper::start(&cfg, &[]);
        std::thread::sleep(Duration::from_millis(300 + (i * 1_137) % 4_000));
        h.kill9();
        let cert = read(&certs.join("svid.pem"));
        let key = read(&certs.join("svid_key.pem"));
        assert!(
            key_matches(&cert, &key),
            "round {i}: key matches certificate"
        );
    }

    // A clean start afterwards: a newer pair, and the leftovers removed.
    let before = serial_of(&read(&certs.join("svid.pem")));
    let h = Helper::start(&cfg, &[]);
    wait_for("a newer pair", Duration::from_secs(60), || {
        let c = read(&certs.join("svid.pem"));
        (serial_of(&c) != before).then_some(())
    });
    wait_for("leftovers removed", Duration::from_secs(60), || {
        let n = std::fs::read_dir(&certs)
            .expect("ls")
            .filter(|e| {
                e.as_ref()
                    .expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .starts_with("..meshid_v")
            })
            .count();
        (n <= 2).then_some(())
    });
    let cert = read(&certs.join("svid.pem"));
    assert!(key_matches(&cert, &read(&certs.join("svid_key.pem"))));
    drop(h);
}

/// `--once` writes every file and exits 0; as root, files get the
/// configured owner and group; the key, combined and PKCS#12
/// files are 0600, certificates 0644; openssl reads the PKCS#12 with its
/// password and finds the same certificate.
#[test]
fn once_writes_files_and_exits_zero_with_key_0600() {
    let mesh = mesh(&["--ttl", "1h"]);
    let work = mesh.server.dir.path().join("once");
    let certs = work.join("certs");
    std::fs::create_dir_all(&certs).expect("mkdir");
    // As root (CI), the files are handed to another user.
    let root = nix::unistd::geteuid().is_root();
    let owner = if root {
        "file_owner = \"nobody\"\nfile_group = \"65534\"\n"
    } else {
        eprintln!("not root: file_owner is not exercised");
        ""
    };
    let cfg = work.join("helper.toml");
    std::fs::write(
        &cfg,
        base_config(
            &mesh,
            &certs,
            &format!("pkcs12_file_name = \"svid.p12\"\npkcs12_password = \"changeit\"\n{owner}"),
        ),
    )
    .expect("config");
    let out = meshid()
        .args(["helper", "run", "--once", "--timeout", "60s", "--config"])
        .arg(&cfg)
        .output()
        .expect("helper");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cert = read(&certs.join("svid.pem"));
    assert!(key_matches(&cert, &read(&certs.join("svid_key.pem"))));
    let ders = meshid_identity::pem::parse_certs(&cert).expect("certs");
    let (_, leaf) = X509Certificate::from_der(&ders[0]).expect("parse");
    let id = meshid_identity::svid::spiffe_id_of(&leaf).expect("id");
    assert_eq!(id.to_string(), APP);
    assert_eq!(mode(&certs.join("svid_key.pem")), 0o600);
    assert_eq!(mode(&certs.join("svid_combined.pem")), 0o600);
    assert_eq!(mode(&certs.join("svid.p12")), 0o600);
    assert_eq!(mode(&certs.join("svid.pem")), 0o644);
    assert_eq!(mode(&certs.join("svid_bundle.pem")), 0o644);
    if root {
        let nobody = nix::unistd::User::from_name("nobody")
            .expect("passwd")
            .expect("nobody");
        for f in ["svid_key.pem", "svid.pem", "svid.p12"] {
            let m = std::fs::metadata(certs.join(f)).expect("metadata");
            assert_eq!((m.uid(), m.gid()), (nobody.uid.as_raw(), 65534), "{f}");
        }
    }
    assert_eq!(
        meshid_identity::pem::parse_certs(&read(&certs.join("svid_bundle.pem")))
            .expect("bundle")
            .len(),
        meshid_identity::pem::parse_certs(mesh.server.bundle_pem().as_bytes())
            .expect("server bundle")
            .len()
    );
    if let Some(openssl) = tool("openssl", &["/usr/bin/openssl"]) {
        let out = Command::new(&openssl)
            .args([
                "pkcs12",
                "-nokeys",
                "-clcerts",
                "-passin",
                "pass:changeit",
                "-in",
            ])
            .arg(certs.join("svid.p12"))
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(serial_of(&out.stdout), serial_of(&cert));
        let bad = Command::new(&openssl)
            .args(["pkcs12", "-nokeys", "-passin", "pass:wrong", "-in"])
            .arg(certs.join("svid.p12"))
            .output()
            .expect("openssl");
        assert!(!bad.status.success(), "a wrong password is refused");
    }
}

/// `--once` with no agent answering exits non-zero after `--timeout`,
/// saying what it waited for.
#[test]
fn once_times_out_without_an_agent() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = dir.path().join("helper.toml");
    std::fs::write(
        &cfg,
        format!(
            "agent_address = \"{d}/nobody.sock\"\ncert_dir = \"{d}\"\nsvid_bundle_file_name = \"bundle.pem\"\n",
            d = dir.path().display()
        ),
    )
    .expect("config");
    let started = Instant::now();
    let out = meshid()
        .args(["helper", "run", "--once", "--timeout", "2s", "--config"])
        .arg(&cfg)
        .output()
        .expect("helper");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("timed out after 2s"), "{err}");
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert!(!dir.path().join("bundle.pem").exists());
}

/// spiffe-helper's own HCL configuration, as a user has it, works by
/// changing the binary name: every named file is written with the
/// configured modes, and `daemon_mode = false` exits once done. An unknown
/// key is refused by name.
#[test]
fn spiffe_helper_hcl_config_is_accepted() {
    let mesh = mesh(&["--ttl", "1h"]);
    let work = mesh.server.dir.path().join("hcl");
    let certs = work.join("certs");
    std::fs::create_dir_all(&certs).expect("mkdir");
    let cfg = work.join("helper.conf");
    let hcl = format!(
        r#"agent_address = "{sock}"
cmd = "ghostunnel"
cmd_args = "server --listen localhost:8002 --target localhost:8001 --keystore certs/svid_key.pem --cacert certs/svid_bundle.pem --allow-uri-san spiffe://example.org/Database"
cert_dir = "{certs}"
renew_signal = "SIGUSR1"
daemon_mode = false
add_intermediates_to_bundle = false
include_federated_domains = true
svid_file_name = "svid.pem"
svid_key_file_name = "svid_key.pem"
svid_bundle_file_name = "svid_bundle.pem"
jwt_svids = [{{jwt_audience="your-audience", jwt_extra_audiences=["your-extra-audience-1"], jwt_svid_file_name="jwt_svid.token"}}]
jwt_bundle_file_name = "bundle.json"
cert_file_mode = 0444
key_file_mode = 0400
jwt_bundle_file_mode = 0444
jwt_svid_file_mode = 0400
"#,
        sock = mesh.agent.socket.display(),
        certs = certs.display()
    );
    std::fs::write(&cfg, &hcl).expect("config");
    let out = meshid()
        .args(["helper", "run", "--timeout", "60s", "--config"])
        .arg(&cfg)
        .output()
        .expect("helper");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (f, m) in [
        ("svid.pem", 0o444),
        ("svid_key.pem", 0o400),
        ("svid_bundle.pem", 0o444),
        ("jwt_svid.token", 0o400),
        ("bundle.json", 0o444),
    ] {
        assert_eq!(mode(&certs.join(f)), m, "{f}");
    }
    let cert = read(&certs.join("svid.pem"));
    assert!(key_matches(&cert, &read(&certs.join("svid_key.pem"))));
    let claims = jwt_claims(&read(&certs.join("jwt_svid.token")));
    assert_eq!(claims["sub"], APP);
    assert_eq!(
        claims["aud"],
        serde_json::json!(["your-audience", "your-extra-audience-1"])
    );
    let bundles: serde_json::Value =
        serde_json::from_slice(&read(&certs.join("bundle.json"))).expect("bundle.json");
    let jwks = jwks_of(&bundles, TD);
    assert!(!jwks["keys"].as_array().expect("keys").is_empty());

    // A typo is refused with the key's name.
    std::fs::write(&cfg, hcl.replace("svid_file_name", "svid_fiel_name")).expect("config");
    let out = meshid()
        .args(["helper", "run", "--config"])
        .arg(&cfg)
        .output()
        .expect("helper");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("svid_fiel_name"), "{err}");
}

fn jwt_claims(token: &[u8]) -> serde_json::Value {
    use base64::Engine as _;
    let token = std::str::from_utf8(token).expect("utf8");
    let payload = token.split('.').nth(1).expect("payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("claims")
}

fn jwks_of(bundles: &serde_json::Value, td: &str) -> serde_json::Value {
    use base64::Engine as _;
    let b64 = bundles[td].as_str().expect("trust domain present");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64");
    serde_json::from_slice(&raw).expect("jwks")
}

/// A JWT-SVID file is written and replaced by a fresh token before the old
/// one expires; the JWT bundle file carries the trust domain's keys.
#[test]
fn jwt_svid_file_is_written_and_refreshed() {
    let mesh = mesh(&["--ttl", "1h", "--jwt-ttl", "8s"]);
    let work = mesh.server.dir.path().join("jwt");
    let certs = work.join("certs");
    std::fs::create_dir_all(&certs).expect("mkdir");
    let cfg = work.join("helper.toml");
    std::fs::write(
        &cfg,
        format!(
            "agent_address = \"{}\"\ncert_dir = \"{}\"\njwt_bundle_file_name = \"jwt_bundle.json\"\n[[jwt_svids]]\njwt_audience = \"db\"\njwt_svid_file_name = \"db.token\"\n",
            mesh.agent.socket.display(),
            certs.display()
        ),
    )
    .expect("config");
    let h = Helper::start(&cfg, &[]);
    let token = certs.join("db.token");
    let first = wait_for("JWT-SVID file", Duration::from_secs(60), || {
        let t = read(&token);
        (!t.is_empty()).then_some(t)
    });
    let c1 = jwt_claims(&first);
    assert_eq!(c1["sub"], APP);
    // One audience: a string or a one-element array (RFC 7519 §4.1.3).
    assert!(
        c1["aud"] == "db" || c1["aud"] == serde_json::json!(["db"]),
        "{c1}"
    );
    assert_eq!(mode(&token), 0o600);
    let exp1 = c1["exp"].as_i64().expect("exp");
    let second = wait_for("refreshed JWT-SVID", Duration::from_secs(60), || {
        let t = read(&token);
        (t != first && !t.is_empty()).then_some(t)
    });
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("now")
            .as_secs(),
    )
    .expect("now");
    assert!(now <= exp1, "refreshed before the old token expired");
    let exp2 = jwt_claims(&second)["exp"].as_i64().expect("exp");
    assert!(exp2 > exp1, "a later expiry: {exp1} -> {exp2}");
    let bundles: serde_json::Value =
        serde_json::from_slice(&read(&certs.join("jwt_bundle.json"))).expect("json");
    assert!(
        !jwks_of(&bundles, TD)["keys"]
            .as_array()
            .expect("keys")
            .is_empty()
    );
    drop(h);
}

/// A federated CA that expires while the helper runs is in the bundle file
/// while valid and left out once expired; the others stay.
#[test]
fn bundle_file_omits_an_expired_ca() {
    fn fed_ca(secs: i64) -> String {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::seconds(secs);
        p.self_signed(&key).expect("ca").pem()
    }
    let long = fed_ca(86_400);
    let short = fed_ca(15);
    let short_expiry = Instant::now() + Duration::from_secs(15);
    let serial = |pem: &str| serial_of(pem.as_bytes());
    let (long_serial, short_serial) = (serial(&long), serial(&short));
    let mesh = mesh_with(&["--ttl", "6s", "--federates-with", "partner.org"], |s| {
        let p = s.dir.path().join("partner.pem");
        std::fs::write(&p, format!("{long}{short}")).expect("w");
        s.ok(&[
            "bundle",
            "set",
            "--trust-domain",
            "partner.org",
            "--path",
            &p.display().to_string(),
        ]);
    });
    let work = mesh.server.dir.path().join("expired");
    let certs = work.join("certs");
    std::fs::create_dir_all(&certs).expect("mkdir");
    let cfg = work.join("helper.toml");
    std::fs::write(
        &cfg,
        base_config(&mesh, &certs, "include_federated_domains = true\n"),
    )
    .expect("config");
    let h = Helper::start(&cfg, &[]);
    let serials = |p: &Path| -> Vec<String> {
        meshid_identity::pem::parse_certs(&read(p))
            .unwrap_or_default()
            .iter()
            .map(|d| {
                X509Certificate::from_der(d)
                    .expect("parse")
                    .1
                    .raw_serial_as_string()
            })
            .collect()
    };
    let bundle = certs.join("svid_bundle.pem");
    let first = wait_for(
        "bundle with the federated CAs",
        Duration::from_secs(60),
        || {
            let s = serials(&bundle);
            (s.contains(&short_serial)).then_some(s)
        },
    );
    assert!(first.contains(&long_serial), "{first:?}");
    assert!(
        Instant::now() < short_expiry,
        "the short-lived CA was seen while valid"
    );
    let after = wait_for("expired CA gone", Duration::from_secs(90), || {
        let s = serials(&bundle);
        (!s.contains(&short_serial) && !s.is_empty()).then_some(s)
    });
    assert!(Instant::now() >= short_expiry, "left out only once expired");
    assert!(after.contains(&long_serial), "{after:?}");
    let own = meshid_identity::pem::parse_certs(mesh.server.bundle_pem().as_bytes())
        .expect("own")
        .len();
    assert_eq!(after.len(), own + 1, "own CAs and the live federated CA");
    drop(h);
}

/// `cmd`/`cmd_args`: the command is started once, after the first files,
/// and signalled (`renew_signal`) at each renewal; SIGTERM to the helper
/// stops both.
#[test]
fn command_is_started_once_and_signalled_on_renewal() {
    let mesh = mesh(&["--ttl", "6s"]);
    let work = mesh.server.dir.path().join("cmd");
    let certs = work.join("certs");
    std::fs::create_dir_all(&certs).expect("mkdir");
    let events = work.join("events.log");
    let script = format!(
        "trap 'echo reload >> {e}' USR1; test -s {c}/svid.pem && echo start >> {e}; while :; do sleep 0.1; done",
        e = events.display(),
        c = certs.display()
    );
    let cfg = work.join("helper.toml");
    std::fs::write(
        &cfg,
        base_config(
            &mesh,
            &certs,
            &format!(
                "cmd = \"/bin/sh\"\ncmd_args = [\"-c\", {script:?}]\nrenew_signal = \"USR1\"\n"
            ),
        ),
    )
    .expect("config");
    let mut h = Helper::start(&cfg, &[]);
    let lines = wait_for("two renewals signalled", Duration::from_secs(60), || {
        let log = String::from_utf8(read(&events)).expect("utf8");
        (log.matches("reload").count() >= 2).then_some(log)
    });
    assert_eq!(lines.matches("start").count(), 1, "started once: {lines}");
    assert!(
        lines.starts_with("start"),
        "started after the files: {lines}"
    );
    let pid = h.child.as_ref().expect("running").id();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let status = h.wait(Duration::from_secs(30));
    assert!(status.success(), "{status}: {}", h.log());
}

/// The README's helper configuration is valid as written (only the
/// directory moved into a temp dir): it gets as far as waiting for the agent.
#[test]
fn readme_helper_config_is_valid() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README");
    let start = readme
        .find("```hcl\n# helper.conf\n")
        .expect("README helper quick start");
    let body = &readme[start + "```hcl\n".len()..];
    let hcl = &body[..body.find("```").expect("end of block")];
    let dir = tempfile::tempdir().expect("tmp");
    let hcl = hcl
        .replace("/etc/nginx/spiffe", &dir.path().display().to_string())
        .replace(
            "/tmp/meshid/agent/api.sock",
            &dir.path().join("none.sock").display().to_string(),
        );
    let cfg = dir.path().join("helper.conf");
    std::fs::write(&cfg, hcl).expect("config");
    let out = meshid()
        .args(["helper", "run", "--once", "--timeout", "1s", "--config"])
        .arg(&cfg)
        .output()
        .expect("helper");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("timed out after 1s waiting for X.509 files, payments.jwt"),
        "{err}"
    );
}
