//! The VM examples in `examples/vm/`: the systemd units are accepted by
//! systemd and stay well hardened, the sample configs load with `--check`,
//! and the README's VM walkthrough (token → bundle → entry → agent from
//! `EnvironmentFile` → `agent api fetch x509`) works with those very configs,
//! relocated into a temp directory.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{AgentProc, Server, TD, meshid};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/vm")
        .join(name)
}

/// `systemd-analyze`, or `None` where systemd is not installed. CI installs
/// it (`.ci/run`), so there the checks always run.
fn systemd_analyze() -> Option<&'static str> {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-analyze is missing in CI; .ci/run must install systemd"
        );
        eprintln!("systemd-analyze not installed: unit checks skipped");
    }
    found.then_some("systemd-analyze")
}

/// Copies the units into `dir` with `ExecStart` pointing at the binary under
/// test (`verify` checks that the command exists and is executable).
fn units_in(dir: &Path) -> Vec<PathBuf> {
    ["meshid-server.service", "meshid-agent.service"]
        .iter()
        .map(|u| {
            let text = std::fs::read_to_string(example(u)).expect("read unit");
            assert!(
                text.contains("/usr/local/bin/meshid"),
                "{u}: ExecStart path"
            );
            let p = dir.join(u);
            std::fs::write(
                &p,
                text.replace("/usr/local/bin/meshid", env!("CARGO_BIN_EXE_meshid")),
            )
            .expect("write unit");
            p
        })
        .collect()
}

#[test]
fn systemd_units_verify_cleanly() {
    let Some(sa) = systemd_analyze() else { return };
    let dir = tempfile::tempdir().expect("tmp");
    let units = units_in(dir.path());
    let out = Command::new(sa)
        .args(["verify", "--man=no"])
        .args(&units)
        .output()
        .expect("run systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // An unknown key is only a warning with exit 0, so stderr must be empty too.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}

#[test]
fn systemd_units_are_hardened() {
    let Some(sa) = systemd_analyze() else { return };
    let dir = tempfile::tempdir().expect("tmp");
    for unit in units_in(dir.path()) {
        // systemd's exposure score runs from 0.0 (locked down) to 10.0 (unsafe);
        // `--threshold` takes it times ten.
        // The server needs nothing but the network; the agent keeps
        // CAP_SYS_PTRACE to read callers' /proc entries.
        let out = Command::new(sa)
            .args(["security", "--offline=yes", "--no-pager", "--threshold=30"])
            .arg(&unit)
            .output()
            .expect("run systemd-analyze security");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let summary = stdout
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or("no summary");
        assert!(
            out.status.success(),
            "{}: exposure above 3.0: {summary}\n{}",
            unit.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for (unit, needles) in [
        (
            "meshid-server.service",
            &[
                "User=meshid-server",
                "StateDirectory=meshid/server",
                "ProtectSystem=strict",
            ][..],
        ),
        (
            "meshid-agent.service",
            &[
                "User=meshid-agent",
                "RuntimeDirectory=meshid/agent",
                "ProtectSystem=strict",
                "CapabilityBoundingSet=CAP_SYS_PTRACE",
                "EnvironmentFile=-/etc/meshid/agent.env",
            ][..],
        ),
    ] {
        let text = std::fs::read_to_string(example(unit)).expect("read unit");
        for n in needles {
            assert!(text.lines().any(|l| l == *n), "{unit} lacks {n}");
        }
    }
}

#[test]
fn sample_configs_pass_check() {
    for (part, file) in [("server", "server.toml"), ("agent", "agent.toml")] {
        let out = meshid()
            .args([part, "run", "--check", "--config"])
            .arg(example(file))
            .output()
            .expect("run meshid");
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The sample configs and the unit's paths, moved under `root`.
fn relocate(file: &str, root: &Path, node_addr: Option<&str>) -> String {
    let r = root.display().to_string();
    let mut text = std::fs::read_to_string(example(file))
        .expect("read config")
        .replace("/var/lib/meshid", &format!("{r}/var/lib/meshid"))
        .replace("/run/meshid", &format!("{r}/run/meshid"))
        .replace("/etc/meshid", &format!("{r}/etc/meshid"))
        .replace("0.0.0.0:8081", "127.0.0.1:0")
        .replace("127.0.0.1:9090", "127.0.0.1:0")
        .replace("127.0.0.1:9091", "127.0.0.1:0");
    if let Some(addr) = node_addr {
        text = text.replace("meshid-server.internal:8081", addr);
    }
    text
}

#[test]
fn vm_walkthrough_yields_an_svid() {
    let dir = tempfile::tempdir().expect("tmp");
    let root = dir.path().to_path_buf();
    for d in ["etc/meshid", "var/lib/meshid/server", "run/meshid/agent"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    let server_toml = root.join("etc/meshid/server.toml");
    std::fs::write(&server_toml, relocate("server.toml", &root, None)).expect("w");
    // The harness talks to `<dir>/admin.sock`; the sample keeps the socket
    // in the data directory (the CLI's default), so point one at the other.
    std::os::unix::fs::symlink(
        root.join("var/lib/meshid/server/admin.sock"),
        root.join("admin.sock"),
    )
    .expect("symlink");
    let server = Server::start_with(dir, server_toml);

    // On the server: a token for the VM, the bundle, an entry for its workload.
    let node = format!("spiffe://{TD}/host/vm1");
    let token = server.ok(&["token", "create", "--spiffe-id", &node, "--ttl", "1h"]);
    std::fs::write(root.join("etc/meshid/bundle.pem"), server.bundle_pem()).expect("bundle");
    let uid = nix::unistd::geteuid().as_raw();
    server.ok(&[
        "entry",
        "create",
        "--parent-id",
        &node,
        "--spiffe-id",
        &format!("spiffe://{TD}/billing"),
        "--selector",
        &format!("unix:uid:{uid}"),
    ]);

    // On the VM: agent.toml plus the token in the environment.
    let agent_toml = root.join("etc/meshid/agent.toml");
    std::fs::write(
        &agent_toml,
        relocate("agent.toml", &root, Some(&server.node_addr)),
    )
    .expect("w");
    let socket = root.join("run/meshid/agent/api.sock");
    let agent_dir = root.join("agent-logs");
    std::fs::create_dir_all(&agent_dir).expect("mkdir");
    let _agent = AgentProc::start_config(&agent_dir, agent_toml, socket.clone(), Some(&token));

    let out = meshid()
        .args(["agent", "api", "fetch", "x509", "--socket"])
        .arg(format!("unix://{}", socket.display()))
        .output()
        .expect("fetch");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fetch x509: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("spiffe://{TD}/billing")),
        "fetch x509 output: {stdout}"
    );
    // The agent's key (with its SVID, in one file) is private to it, as the
    // unit's UMask would also ensure; so is its data directory.
    use std::os::unix::fs::PermissionsExt as _;
    let data = root.join("var/lib/meshid/agent");
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode(&data.join("agent_identity.pem")), 0o600, "agent key");
    assert_eq!(mode(&data), 0o700, "agent data directory");
}
