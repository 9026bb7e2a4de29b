//! The demo's child processes: starting `meshid` subcommands with their logs
//! in the demo directory, waiting for them, and stopping them all.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

pub(super) type Children = Arc<Mutex<Vec<Child>>>;

pub(super) fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(super) fn step(msg: &str) {
    println!("\n== {msg}");
}

pub(super) fn spawn(
    children: &Children,
    dir: &Path,
    log: &str,
    args: &[&str],
) -> anyhow::Result<()> {
    let out = std::fs::File::create(dir.join(log))?;
    let child = Command::new(std::env::current_exe()?)
        .args(args)
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting meshid {}", args.join(" ")))?;
    children
        .lock()
        .map_err(|_| anyhow::anyhow!("lock"))?
        .push(child);
    Ok(())
}

pub(super) fn meshid(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(std::env::current_exe()?).args(args).output()?;
    if !out.status.success() {
        bail!(
            "meshid {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub(super) fn wait_until(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out waiting for {what}")
}

pub(super) fn stop_all(children: &Children, dir: &Path) {
    if let Ok(mut cs) = children.lock() {
        for c in cs.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        cs.clear();
    }
    let _ = std::fs::remove_dir_all(dir);
}
