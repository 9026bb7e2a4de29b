//! `meshid sidecar run` as a real process: `--check`, then serving with an
//! SVID from an in-process fake Workload API, `/readyz`, and a clean exit on
//! SIGTERM.
#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use meshid_sidecar::CancellationToken;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio::sync::watch;

mod sidecar_support;
use sidecar_support::{Ca, client_config, response, serve, svid_msg, tls_connect};

const BIN: &str = env!("CARGO_BIN_EXE_meshid");

async fn check(config: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.toml");
    std::fs::write(&path, config).unwrap();
    Command::new(BIN)
        .args(["sidecar", "run", "--check", "--config"])
        .arg(&path)
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .output()
        .await
        .unwrap()
}

const VALID: &str = r#"
workload_api_socket = "unix:///run/agent.sock"
[[inbound]]
listen = "127.0.0.1:8443"
forward_to = "127.0.0.1:8080"
allow = ["spiffe://example.org/ns/prod/*"]
"#;

#[tokio::test]
async fn check_validates_config() {
    let out = check(VALID).await;
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("config ok"));

    let out = check(&VALID.replace("allow =", "alow =")).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("alow"), "{err}");

    let out = check(&VALID.replace("ns/prod/*", "ns/prod*")).await;
    assert!(!out.status.success());
}

/// A free loopback port (bound then released).
async fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, text))
}

#[tokio::test]
async fn runs_with_workload_api_and_exits_cleanly_on_sigterm() {
    let ca = Ca::new("ca");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let (_tx, rx) = watch::channel(response(vec![svid_msg(
        &ca,
        "spiffe://example.org/web",
        0x42,
    )]));
    let agent_stop = CancellationToken::new();
    let _agent = serve(&sock, rx, agent_stop.clone());

    // An echo app.
    let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = app.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = app.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });

    let inbound = free_port().await;
    let admin = free_port().await;
    let config = format!(
        r#"
admin_address = "{admin}"
drain_timeout = "5s"
[[inbound]]
listen = "{inbound}"
forward_to = "{app_addr}"
allow = ["spiffe://example.org/ns/prod/*"]
"#
    );
    let path = dir.path().join("sidecar.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(BIN)
        .args(["sidecar", "run", "--config"])
        .arg(&path)
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", sock.display()),
        )
        .env("MESHID_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // Poll the readiness endpoint (the process's own readiness signal).
    let mut ready = None;
    for _ in 0..300 {
        if let Some((200, body)) = http_get(admin, "/readyz").await {
            ready = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body = ready.expect("sidecar never became ready");
    assert!(body.contains("serial: 42"), "{body}");

    let cfg = client_config(
        &ca,
        ca.svid("spiffe://example.org/ns/prod/client", 7),
        "spiffe://example.org/web",
    );
    let mut tls = tls_connect(cfg, inbound).await.unwrap();
    tls.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    tls.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ping");
    drop(tls);

    let (code, metrics) = http_get(admin, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(metrics.contains("meshid_sidecar_svid_not_after_seconds"));

    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    agent_stop.cancel();
}
