//! The helper's loops: X.509 context updates to files, JWT-SVIDs and the JWT
//! bundle to files, and the process told after each renewal.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use futures::StreamExt as _;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use spiffe::{WorkloadApiClient, X509Context};
use tokio::sync::{mpsc, watch};

use crate::config::{HelperConfig, JwtSvidFile};
use crate::publish::Publisher;
use crate::render::{Material, Rendered, render};

/// How the helper runs.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    /// Write every file once and exit (init containers).
    pub once: bool,
    /// With `once`: give up after this long.
    pub timeout: Duration,
}

const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What has been written at least once.
#[derive(Debug, Default, Clone)]
struct Ready {
    x509: bool,
    jwt: Vec<bool>,
    jwt_bundle: bool,
}

async fn connect(endpoint: &str) -> WorkloadApiClient {
    let mut backoff = MIN_BACKOFF;
    loop {
        match WorkloadApiClient::connect_to(endpoint).await {
            Ok(c) => return c,
            Err(e) => {
                tracing::warn!(%endpoint, error = %e, retry_in = ?backoff, "Workload API not reachable");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

fn material(ctx: &X509Context, hint: Option<&str>) -> Option<Material> {
    let svid = match hint {
        Some(h) => ctx.svids().iter().find(|s| s.hint() == Some(h)),
        None => ctx.default_svid(),
    }?;
    let bundles = ctx
        .bundle_set()
        .iter()
        .map(|(td, b)| {
            (
                td.to_string(),
                b.authorities()
                    .iter()
                    .map(|c| c.as_bytes().to_vec())
                    .collect(),
            )
        })
        .collect();
    Some(Material {
        chain: svid
            .cert_chain()
            .iter()
            .map(|c| c.as_bytes().to_vec())
            .collect(),
        key_pkcs8: svid.private_key().as_bytes().to_vec(),
        trust_domain: svid.spiffe_id().trust_domain().to_string(),
        bundles,
    })
}

/// Tells the configured process that new files are there.
struct Notifier {
    cmd: Option<(String, Vec<String>)>,
    child_pid: Option<i32>,
    children: mpsc::UnboundedSender<tokio::process::Child>,
    pid_file: Option<PathBuf>,
    signal: Signal,
}

impl Notifier {
    fn renewed(&mut self) {
        if let Some(pid) = self.child_pid {
            match kill(Pid::from_raw(pid), self.signal) {
                Ok(()) => tracing::info!(pid, signal = %self.signal, "command signalled"),
                Err(e) => tracing::warn!(pid, error = %e, "cannot signal the command"),
            }
        } else if let Some((cmd, args)) = &self.cmd {
            match tokio::process::Command::new(cmd).args(args).spawn() {
                Ok(child) => {
                    self.child_pid = child.id().and_then(|p| i32::try_from(p).ok());
                    tracing::info!(%cmd, pid = ?self.child_pid, "command started");
                    let _ = self.children.send(child);
                }
                Err(e) => tracing::error!(%cmd, error = %e, "cannot start the command"),
            }
        }
        if let Some(f) = &self.pid_file {
            let pid = std::fs::read_to_string(f)
                .map_err(|e| e.to_string())
                .and_then(|s| {
                    s.trim()
                        .parse::<i32>()
                        .map_err(|_| format!("{:?} is not a pid", s.trim()))
                })
                .and_then(|p| {
                    if p > 0 {
                        Ok(p)
                    } else {
                        Err(format!("{p} is not a pid"))
                    }
                });
            match pid {
                Ok(p) => match kill(Pid::from_raw(p), self.signal) {
                    Ok(()) => tracing::info!(pid = p, signal = %self.signal, "process signalled"),
                    Err(e) => tracing::warn!(pid = p, error = %e, "cannot signal the process"),
                },
                Err(e) => {
                    tracing::warn!(pid_file = %f.display(), error = %e, "no process to signal");
                }
            }
        }
    }
}

async fn x509_loop(
    cfg: Arc<HelperConfig>,
    ready: watch::Sender<Ready>,
    mut notifier: Option<Notifier>,
) {
    let mut publisher = Publisher::new(
        cfg.cert_dir.clone(),
        cfg.owner.map(|u| u.as_raw()),
        cfg.group.map(|g| g.as_raw()),
    );
    let mut last: Option<Rendered> = None;
    let mut backoff = MIN_BACKOFF;
    loop {
        let client = connect(&cfg.agent_address).await;
        let mut stream = match client.stream_x509_contexts().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "X.509 context stream refused");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        while let Some(item) = stream.next().await {
            let ctx = match item {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "X.509 context update refused");
                    continue;
                }
            };
            backoff = MIN_BACKOFF;
            let Some(m) = material(&ctx, cfg.hint.as_deref()) else {
                tracing::warn!(hint = ?cfg.hint, "no SVID with the configured hint");
                continue;
            };
            let rendered = match render(&cfg, &m, SystemTime::now()) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "cannot build the files");
                    continue;
                }
            };
            if last.as_ref().is_some_and(|l| l.same_as(&rendered)) {
                continue;
            }
            let files = rendered.files.clone();
            let mut p = publisher;
            let (p_back, res) = match tokio::task::spawn_blocking(move || {
                let r = p.publish(&files);
                (p, r)
            })
            .await
            {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(error = %e, "writer task failed");
                    return;
                }
            };
            publisher = p_back;
            if let Err(e) = res {
                tracing::error!(dir = %cfg.cert_dir.display(), error = %e, "cannot write the files; the previous ones stay");
                continue;
            }
            let not_after = humantime::format_rfc3339_seconds(rendered.not_after);
            tracing::info!(
                serial = %rendered.serial,
                %not_after,
                expired_authorities_left_out = rendered.expired_dropped,
                files = rendered.files.len(),
                "X.509 files written"
            );
            last = Some(rendered);
            ready.send_modify(|r| r.x509 = true);
            if let Some(n) = notifier.as_mut() {
                n.renewed();
            }
        }
        tracing::warn!(retry_in = ?backoff, "X.509 context stream ended; reconnecting");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// When to fetch again: half the remaining lifetime, at least a second.
fn refresh_in(expiry: SystemTime) -> Duration {
    let left = expiry.duration_since(SystemTime::now()).unwrap_or_default();
    (left / 2).max(Duration::from_secs(1))
}

async fn jwt_loop(
    cfg: Arc<HelperConfig>,
    index: usize,
    want: JwtSvidFile,
    ready: watch::Sender<Ready>,
) {
    let path = cfg.cert_dir.join(&want.file_name);
    let mut backoff = MIN_BACKOFF;
    let mut client: Option<WorkloadApiClient> = None;
    loop {
        let c = match &client {
            Some(c) => c.clone(),
            None => {
                let c = connect(&cfg.agent_address).await;
                client = Some(c.clone());
                c
            }
        };
        let fetched = c.fetch_all_jwt_svids(&want.audiences, None).await;
        let svid = fetched.map_err(|e| e.to_string()).and_then(|v| {
            match cfg.hint.as_deref() {
                Some(h) => v.into_iter().find(|s| s.hint() == Some(h)),
                None => v.into_iter().next(),
            }
            .ok_or_else(|| "no JWT-SVID with the configured hint".to_string())
        });
        let svid = match svid {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(audience = ?want.audiences, error = %e, retry_in = ?backoff, "JWT-SVID fetch failed");
                client = None;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = MIN_BACKOFF;
        let token = svid.token().as_bytes().to_vec();
        let (p, mode) = (path.clone(), cfg.jwt_svid_mode);
        let owner = (cfg.owner.map(|u| u.as_raw()), cfg.group.map(|g| g.as_raw()));
        let written = tokio::task::spawn_blocking(move || write_owned(&p, &token, mode, owner))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
        let expiry: SystemTime = svid.expiry().into();
        match written {
            Ok(()) => {
                tracing::info!(file = %path.display(), audience = ?want.audiences, expires = %humantime::format_rfc3339_seconds(expiry), "JWT-SVID written");
                ready.send_modify(|r| {
                    if let Some(s) = r.jwt.get_mut(index) {
                        *s = true;
                    }
                });
            }
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "cannot write the JWT-SVID");
                tokio::time::sleep(backoff).await;
                continue;
            }
        }
        tokio::time::sleep(refresh_in(expiry)).await;
    }
}

fn write_owned(
    path: &std::path::Path,
    data: &[u8],
    mode: u32,
    (owner, group): (Option<u32>, Option<u32>),
) -> std::io::Result<()> {
    meshid_identity::files::write_atomic(path, data, mode)?;
    if owner.is_some() || group.is_some() {
        std::os::unix::fs::chown(path, owner, group)?;
    }
    Ok(())
}

/// JSON: trust domain -> base64 of its JWKS document (spiffe-helper's format).
fn jwt_bundle_json(set: &spiffe::JwtBundleSet) -> Vec<u8> {
    use base64::Engine as _;
    let mut out = serde_json::Map::new();
    for (td, b) in set.iter() {
        let keys: Vec<serde_json::Value> = b
            .jwt_authorities()
            .filter_map(|a| serde_json::from_slice(a.jwk_json()).ok())
            .collect();
        let jwks = serde_json::json!({ "keys": keys }).to_string();
        out.insert(
            td.to_string(),
            serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(jwks)),
        );
    }
    serde_json::Value::Object(out).to_string().into_bytes()
}

async fn jwt_bundle_loop(cfg: Arc<HelperConfig>, name: String, ready: watch::Sender<Ready>) {
    let path = cfg.cert_dir.join(&name);
    let mut backoff = MIN_BACKOFF;
    loop {
        let client = connect(&cfg.agent_address).await;
        match client.stream_jwt_bundles().await {
            Ok(mut stream) => {
                while let Some(item) = stream.next().await {
                    let set = match item {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!(error = %e, "JWT bundle update refused");
                            continue;
                        }
                    };
                    backoff = MIN_BACKOFF;
                    let data = jwt_bundle_json(&set);
                    let (p, mode) = (path.clone(), cfg.jwt_bundle_mode);
                    let owner = (cfg.owner.map(|u| u.as_raw()), cfg.group.map(|g| g.as_raw()));
                    let res =
                        tokio::task::spawn_blocking(move || write_owned(&p, &data, mode, owner))
                            .await
                            .map_err(std::io::Error::other)
                            .and_then(|r| r);
                    match res {
                        Ok(()) => {
                            tracing::info!(file = %path.display(), trust_domains = set.len(), "JWT bundle written");
                            ready.send_modify(|r| r.jwt_bundle = true);
                        }
                        Err(e) => {
                            tracing::error!(file = %path.display(), error = %e, "cannot write the JWT bundle");
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "JWT bundle stream refused"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn all_ready(cfg: &HelperConfig, r: &Ready) -> bool {
    (!cfg.x509.any() || r.x509)
        && r.jwt.iter().all(|b| *b)
        && (cfg.jwt_bundle.is_none() || r.jwt_bundle)
}

fn missing(cfg: &HelperConfig, r: &Ready) -> Vec<String> {
    let mut m = Vec::new();
    if cfg.x509.any() && !r.x509 {
        m.push("X.509 files".to_string());
    }
    for (j, done) in cfg.jwt_svids.iter().zip(&r.jwt) {
        if !done {
            m.push(j.file_name.clone());
        }
    }
    if let Some(b) = &cfg.jwt_bundle
        && !r.jwt_bundle
    {
        m.push(b.clone());
    }
    m
}

/// Runs the helper until it is stopped, its command exits, or (with
/// `once`) every file has been written once.
pub async fn run(cfg: HelperConfig, opts: RunOptions) -> anyhow::Result<()> {
    let meta = std::fs::metadata(&cfg.cert_dir)
        .with_context(|| format!("cert_dir {}", cfg.cert_dir.display()))?;
    anyhow::ensure!(
        meta.is_dir(),
        "cert_dir {} is not a directory",
        cfg.cert_dir.display()
    );
    let once = opts.once || !cfg.daemon_mode;
    let cfg = Arc::new(cfg);
    let (ready_tx, mut ready_rx) = watch::channel(Ready {
        jwt: vec![false; cfg.jwt_svids.len()],
        ..Ready::default()
    });
    let (child_tx, mut child_rx) = mpsc::unbounded_channel();
    let notifier = (!once).then(|| Notifier {
        cmd: cfg.cmd.clone(),
        child_pid: None,
        children: child_tx,
        pid_file: cfg.pid_file.clone(),
        signal: cfg.renew_signal,
    });
    let mut tasks = tokio::task::JoinSet::new();
    if cfg.x509.any() {
        tasks.spawn(x509_loop(cfg.clone(), ready_tx.clone(), notifier));
    }
    for (i, j) in cfg.jwt_svids.iter().enumerate() {
        tasks.spawn(jwt_loop(cfg.clone(), i, j.clone(), ready_tx.clone()));
    }
    if let Some(b) = &cfg.jwt_bundle {
        tasks.spawn(jwt_bundle_loop(cfg.clone(), b.clone(), ready_tx.clone()));
    }
    tracing::info!(agent = %cfg.agent_address, cert_dir = %cfg.cert_dir.display(), once, "helper started");

    if once {
        let done = tokio::time::timeout(opts.timeout, ready_rx.wait_for(|r| all_ready(&cfg, r)))
            .await
            .is_ok_and(|r| r.is_ok());
        tasks.abort_all();
        return match done {
            true => {
                tracing::info!("every file written; exiting");
                Ok(())
            }
            _ => {
                let r = ready_rx.borrow().clone();
                anyhow::bail!(
                    "timed out after {} waiting for {} from the Workload API at {}",
                    humantime::format_duration(opts.timeout),
                    missing(&cfg, &r).join(", "),
                    cfg.agent_address
                )
            }
        };
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut child: Option<tokio::process::Child> = None;
    loop {
        tokio::select! {
            Some(c) = child_rx.recv() => child = Some(c),
            status = async {
                match child.as_mut() {
                    Some(c) => c.wait().await,
                    None => std::future::pending().await,
                }
            } => {
                tasks.abort_all();
                let status = status.context("waiting for the command")?;
                tracing::info!(%status, "command exited; stopping");
                anyhow::ensure!(status.success(), "command exited: {status}");
                return Ok(());
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    tasks.abort_all();
    if let Some(mut c) = child {
        if let Some(pid) = c.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), c.wait()).await;
    }
    tracing::info!("helper stopped");
    Ok(())
}
