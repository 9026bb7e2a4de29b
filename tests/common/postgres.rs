//! A throwaway PostgreSQL server for tests: Debian's binaries
//! (`/usr/lib/postgresql/*/bin`, or `MESHID_PG_BINDIR`), `initdb` into a
//! temporary directory, `postgres` on 127.0.0.1 and a free port with TLS on,
//! run as an unprivileged user (`nobody` when the tests run as root, since
//! PostgreSQL refuses to run as root). One server per test process; every
//! test takes a database of its own with [`database`].
//!
//! The server stops, and its directory is removed, when the test process
//! exits: a shell holding the server reads its stdin from a pipe whose write
//! end only this process has.
//!
//! Without the binaries a test skips with a printed reason; under `CI=true`
//! it fails instead.
//!
//! Shared by the root crate's tests and `server/tests` (included by path);
//! it uses only std, tempfile, rcgen and nix.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The superuser the tests connect as (trust authentication on loopback).
pub const SUPERUSER: &str = "postgres";

/// A running test server.
pub struct PgServer {
    /// Directory holding the socket, the data directory and `ca.pem`.
    pub dir: PathBuf,
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// PEM of the CA that signed the server's TLS certificate (for
    /// `localhost` and `127.0.0.1`).
    pub ca_pem: PathBuf,
    /// `initdb`, `psql`, … live here.
    pub bindir: PathBuf,
    /// Whether the server runs as another user than the tests.
    run_as: Option<String>,
    // Kept open until the process exits: its EOF stops the server.
    _keeper: Child,
}

static SERVER: OnceLock<Result<PgServer, String>> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// The shared test server, or `None` (after printing why) when PostgreSQL is
/// not installed and this is not CI. Panics under `CI=true`, or when the
/// binaries exist but the server cannot be started.
pub fn server() -> Option<&'static PgServer> {
    match SERVER.get_or_init(start) {
        Ok(s) => Some(s),
        Err(why) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("PostgreSQL is required in CI: {why}");
            }
            eprintln!("SKIPPED: {why}");
            None
        }
    }
}

/// Creates a fresh database and returns its URL (as the superuser, no TLS
/// options), or `None` when PostgreSQL is not available (see [`server`]).
pub fn database(prefix: &str) -> Option<String> {
    let s = server()?;
    let name = format!(
        "{prefix}_{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::SeqCst)
    );
    s.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
    Some(s.url(&name))
}

/// The database name in a URL made by [`database`].
pub fn db_name(url: &str) -> &str {
    url.rsplit('/').next().unwrap_or_default()
}

impl PgServer {
    /// URL of `db` as the superuser.
    pub fn url(&self, db: &str) -> String {
        self.url_as(SUPERUSER, db)
    }

    /// URL of `db` as `user`.
    pub fn url_as(&self, user: &str, db: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{db}", self.port)
    }

    /// Runs SQL as the superuser in `db`; returns psql's unaligned output.
    /// Panics on failure.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bindir.join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                SUPERUSER,
                "-d",
                db,
                "-c",
                sql,
            ])
            .env("PGSSLMODE", "disable")
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }
}

fn find_bindir() -> Result<PathBuf, String> {
    if let Ok(d) = std::env::var("MESHID_PG_BINDIR") {
        let d = PathBuf::from(d);
        if !d.join("initdb").exists() {
            return Err(format!("no initdb in MESHID_PG_BINDIR={}", d.display()));
        }
        return Ok(d);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| {
            "PostgreSQL binaries not found (no /usr/lib/postgresql; `apt-get install postgresql`, or set MESHID_PG_BINDIR)".to_string()
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, b)| b)
        .ok_or_else(|| "no initdb under /usr/lib/postgresql/*/bin".to_string())
}

/// Runs `cmd` as `user` (via setpriv) when given.
fn as_user(user: Option<&str>, program: &Path) -> Command {
    match user {
        Some(u) => {
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={u}"),
                "--regid=nogroup",
                "--clear-groups",
                "--",
            ])
            .arg(program);
            c
        }
        None => Command::new(program),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn write_file(path: &Path, data: &[u8], mode: u32) {
    std::fs::write(path, data).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn start() -> Result<PgServer, String> {
    let bindir = find_bindir()?;
    let root = nix::unistd::Uid::effective().is_root();
    let run_as = root.then(|| "nobody".to_string());
    // As root, under /tmp: `nobody` must be able to reach the directory,
    // which a private TMPDIR may not allow. The socket path stays short too.
    let parent = if root {
        PathBuf::from("/tmp")
    } else {
        std::env::temp_dir()
    };
    let dir = tempfile::Builder::new()
        .prefix("meshid-pg-")
        .tempdir_in(parent)
        .map_err(|e| e.to_string())?
        .keep();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| e.to_string())?;
    let owner = if root {
        let u = nix::unistd::User::from_name("nobody")
            .ok()
            .flatten()
            .ok_or("no user `nobody` to run PostgreSQL as")?;
        Some((u.uid, u.gid))
    } else {
        None
    };
    let chown = |p: &Path| {
        if let Some((u, g)) = owner {
            std::os::unix::fs::chown(p, Some(u.as_raw()), Some(g.as_raw())).expect("chown");
        }
    };
    chown(&dir);
    let data = dir.join("data");
    let out = as_user(run_as.as_deref(), &bindir.join("initdb"))
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .output()
        .map_err(|e| format!("initdb: {e}"))?;
    if !out.status.success() {
        panic!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    // TLS: a CA and a server certificate for localhost / 127.0.0.1.
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "meshid test database CA");
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let srv_key = rcgen::KeyPair::generate().expect("key");
    let mut srv_params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("params");
    srv_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let srv = srv_params.signed_by(&srv_key, &issuer).expect("cert");
    let ca_pem = dir.join("ca.pem");
    write_file(&ca_pem, ca.pem().as_bytes(), 0o644);
    let (crt, key) = (data.join("server.crt"), data.join("server.key"));
    write_file(&crt, srv.pem().as_bytes(), 0o644);
    write_file(&key, srv_key.serialize_pem().as_bytes(), 0o600);
    chown(&crt);
    chown(&key);

    let mut last_err = String::new();
    for _ in 0..3 {
        let port = free_port();
        let script = format!(
            "{pg} -D {data} -k {dir} -p {port} -c listen_addresses=127.0.0.1 -c ssl=on \
             -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
             -c max_connections=300 >{dir}/postgres.log 2>&1 & pid=$!; \
             read x; kill -INT $pid; wait $pid; rm -rf {dir}",
            pg = bindir.join("postgres").display(),
            data = data.display(),
            dir = dir.display(),
        );
        let mut keeper = as_user(run_as.as_deref(), Path::new("/bin/sh"))
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("start postgres: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(bindir.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(PgServer {
                    dir,
                    port,
                    ca_pem,
                    bindir,
                    run_as,
                    _keeper: keeper,
                });
            }
            if keeper.try_wait().ok().flatten().is_some() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        last_err = std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default();
        // Postgres failed (most likely the port was taken meanwhile): try
        // another port. Killing the shell leaves the directory in place.
        let _ = keeper.kill();
        let _ = keeper.wait();
    }
    panic!("postgres did not start: {last_err}");
}
