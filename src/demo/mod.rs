//! `meshid demo`: the whole system on one machine, as separate processes,
//! narrated. A server and an agent; a "payments" app behind an inbound
//! sidecar that only admits `frontend`; the demo itself plays the frontend
//! through its outbound sidecar; an "intruder" sidecar is refused; a live
//! rotation happens under an open connection; and a server pointed at an
//! expired intermediate CA refuses to start.

use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use meshid_identity::spiffe_id::id_in;

mod app;
mod fixtures;
mod procs;

use app::{admin_get, http_get, run_app, serial_of};
use fixtures::expired_intermediate;
use procs::{Children, free_port, meshid, spawn, step, stop_all, wait_until};

const TD: &str = "demo.local";

/// `meshid demo`
#[derive(Debug, clap::Args)]
pub struct DemoCli {
    /// Leave everything running after the story (Ctrl-C stops it all).
    #[arg(long)]
    keep_running: bool,
    /// TTL of the demo SVIDs (rotation happens at 75% of it).
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Hidden: run the demo payments app on this address.
    #[arg(long, hide = true)]
    app: Option<String>,
}

impl DemoCli {
    /// Runs the demo.
    pub async fn run(self) -> anyhow::Result<()> {
        if let Some(addr) = self.app {
            return tokio::task::spawn_blocking(move || run_app(&addr)).await?;
        }
        let children: Children = Arc::new(Mutex::new(Vec::new()));
        let dir = std::env::temp_dir().join(format!("meshid-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        {
            let children = children.clone();
            let dir = dir.clone();
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                stop_all(&children, &dir);
                #[expect(
                    clippy::disallowed_methods,
                    reason = "Ctrl-C: the children are stopped; the demo ends with the usual 130"
                )]
                std::process::exit(130);
            });
        }
        let keep = self.keep_running;
        let ttl = self.ttl;
        let d = dir.clone();
        let c = children.clone();
        let result = tokio::task::spawn_blocking(move || story(&d, &c, ttl, keep)).await?;
        if keep && result.is_ok() {
            println!(
                "\nEverything keeps running (logs in {}). Ctrl-C stops it all.",
                dir.display()
            );
            std::future::pending::<()>().await;
        }
        stop_all(&children, &dir);
        match result {
            Ok(()) => Ok(()),
            Err(e) => Err(e.context(format!("demo failed (logs were in {})", dir.display()))),
        }
    }
}

#[allow(clippy::too_many_lines)]
fn story(dir: &Path, children: &Children, ttl: Duration, keep: bool) -> anyhow::Result<()> {
    let uid = nix::unistd::geteuid().as_raw();
    let d = dir.display();
    let [
        node,
        app,
        inbound,
        out_front,
        out_intruder,
        adm_b,
        adm_a,
        adm_c,
    ] = [(); 8].map(|()| free_port().unwrap_or(0));
    let admin_sock = format!("{d}/admin.sock");

    step("1. Server: the trust domain's CA and registry");
    std::fs::write(
        dir.join("server.toml"),
        format!(
            "trust_domain = \"{TD}\"\ndata_dir = \"{d}/server\"\nbind_address = \"127.0.0.1:{node}\"\nadmin_socket = \"{admin_sock}\"\n"
        ),
    )?;
    spawn(
        children,
        dir,
        "server.log",
        &["server", "run", "--config", &format!("{d}/server.toml")],
    )?;
    let admin = ["--admin-socket", admin_sock.as_str()];
    wait_until("the server", Duration::from_secs(30), || {
        meshid(&[&["server", "healthcheck"][..], &admin[..]].concat()).is_ok()
    })?;
    println!(
        "{}",
        meshid(&[&["server", "healthcheck"][..], &admin[..]].concat())?
    );

    step(&format!(
        "2. Register the workloads (all run as uid {uid} here; each sidecar picks its identity)"
    ));
    let alias = id_in(TD, "node/demo");
    let token = meshid(
        &[
            &["server", "token", "create", "--spiffe-id", &alias][..],
            &admin[..],
        ]
        .concat(),
    )?;
    println!("join token created for node alias {alias}");
    let ttl_s = format!("{}s", ttl.as_secs().max(4));
    for name in ["frontend", "payments", "intruder"] {
        let id = meshid(
            &[
                &[
                    "server",
                    "entry",
                    "create",
                    "--parent-id",
                    &alias,
                    "--spiffe-id",
                    &id_in(TD, name),
                    "--selector",
                    &format!("unix:uid:{uid}"),
                    "--ttl",
                    &ttl_s,
                    "--hint",
                    name,
                ][..],
                &admin[..],
            ]
            .concat(),
        )?;
        println!("entry {id}: {} (TTL {ttl_s})", id_in(TD, name));
    }

    step("3. Agent: node attestation with the join token, Workload API on a Unix socket");
    std::fs::write(
        dir.join("bundle.pem"),
        meshid(&[&["server", "bundle", "show"][..], &admin[..]].concat())? + "\n",
    )?;
    let sock = format!("{d}/agent/api.sock");
    std::fs::write(
        dir.join("agent.toml"),
        format!(
            "trust_domain = \"{TD}\"\nserver_address = \"127.0.0.1:{node}\"\ntrust_bundle_path = \"{d}/bundle.pem\"\ndata_dir = \"{d}/agent\"\nsocket_path = \"{sock}\"\n"
        ),
    )?;
    spawn(
        children,
        dir,
        "agent.log",
        &[
            "agent",
            "run",
            "--config",
            &format!("{d}/agent.toml"),
            "--join-token",
            &token,
        ],
    )?;
    let endpoint = format!("unix://{sock}");
    let mut svids = String::new();
    wait_until(
        "SVIDs from the agent",
        Duration::from_secs(30),
        || match meshid(&["agent", "api", "fetch", "x509", "--socket", &endpoint]) {
            Ok(s) if s.contains("Received 3") => {
                svids = s;
                true
            }
            _ => false,
        },
    )?;
    println!("{svids}");

    step("4. Payments app behind an inbound sidecar that only admits spiffe://demo.local/frontend");
    spawn(
        children,
        dir,
        "payments.log",
        &["demo", "--app", &format!("127.0.0.1:{app}")],
    )?;
    let sidecar = |name: &str, body: String| -> anyhow::Result<()> {
        let p = dir.join(format!("{name}.toml"));
        std::fs::write(&p, body)?;
        spawn(
            children,
            dir,
            &format!("{name}.log"),
            &["sidecar", "run", "--config", &p.display().to_string()],
        )
    };
    let (payments, frontend, intruder) = (
        id_in(TD, "payments"),
        id_in(TD, "frontend"),
        id_in(TD, "intruder"),
    );
    sidecar(
        "sidecar-payments",
        format!(
            "workload_api_socket = \"{endpoint}\"\nadmin_address = \"127.0.0.1:{adm_b}\"\nspiffe_id = \"{payments}\"\n[[inbound]]\nlisten = \"127.0.0.1:{inbound}\"\nforward_to = \"127.0.0.1:{app}\"\nmode = \"http\"\nallow = [\"{frontend}\"]\n"
        ),
    )?;
    sidecar(
        "sidecar-frontend",
        format!(
            "workload_api_socket = \"{endpoint}\"\nadmin_address = \"127.0.0.1:{adm_a}\"\nspiffe_id = \"{frontend}\"\n[[outbound]]\nlisten = \"127.0.0.1:{out_front}\"\nupstream = \"127.0.0.1:{inbound}\"\nserver_id = \"{payments}\"\n"
        ),
    )?;
    sidecar(
        "sidecar-intruder",
        format!(
            "workload_api_socket = \"{endpoint}\"\nadmin_address = \"127.0.0.1:{adm_c}\"\nspiffe_id = \"{intruder}\"\n[[outbound]]\nlisten = \"127.0.0.1:{out_intruder}\"\nupstream = \"127.0.0.1:{inbound}\"\nserver_id = \"{payments}\"\n"
        ),
    )?;
    let b_admin = format!("127.0.0.1:{adm_b}");
    wait_until(
        "the payments sidecar (/readyz does a real mTLS handshake)",
        Duration::from_secs(30),
        || admin_get(&b_admin, "/readyz").is_some(),
    )?;
    println!(
        "payments sidecar ready: {}",
        admin_get(&b_admin, "/readyz")
            .unwrap_or_default()
            .lines()
            .skip_while(|l| !l.starts_with("ready"))
            .collect::<Vec<_>>()
            .join(" | ")
    );

    step(
        "5. frontend -> (plaintext) -> frontend sidecar -> (mTLS) -> payments sidecar -> payments",
    );
    let mut conn = None;
    wait_until("the frontend sidecar", Duration::from_secs(30), || {
        TcpStream::connect(("127.0.0.1", out_front)).ok().and_then(|mut c| http_get(&mut c, "/pay").ok().map(|b| {
            conn = Some(c);
            println!("response: {b}   (the forged x-spiffe-id header the frontend sent was stripped)");
        })).is_some()
    })?;
    let mut conn = conn.ok_or_else(|| anyhow::anyhow!("no connection"))?;

    step("6. Live rotation: SVIDs renew at 75% of their TTL; this connection stays open");
    let before = serial_of(&admin_get(&b_admin, "/readyz").unwrap_or_default());
    println!("payments presents serial {before}");
    let mut after = before.clone();
    let mut requests = 0;
    let mut failed = 0;
    wait_until("a rotation", ttl * 3, || {
        match http_get(&mut conn, "/pay") {
            Ok(_) => requests += 1,
            Err(_) => failed += 1,
        }
        after = serial_of(&admin_get(&b_admin, "/readyz").unwrap_or_default());
        after != before && after != "?"
    })?;
    if failed > 0 {
        bail!("{failed} requests failed on the open connection during rotation");
    }
    let body = http_get(&mut conn, "/pay").context("the open connection broke during rotation")?;
    println!(
        "rotated: payments now presents serial {after}; {requests} requests on the same connection meanwhile, still served: {body}"
    );
    let mut fresh = TcpStream::connect(("127.0.0.1", out_front))?;
    println!(
        "a new connection handshakes with the new certificate: {}",
        http_get(&mut fresh, "/pay")?
    );

    step("7. A caller that is not allowed: spiffe://demo.local/intruder");
    let denied = TcpStream::connect(("127.0.0.1", out_intruder))
        .ok()
        .map(|mut c| http_get(&mut c, "/pay"));
    match denied {
        Some(Ok(b)) => bail!("the intruder was served: {b}"),
        _ => println!(
            "refused at the mTLS handshake: payments only allows spiffe://{TD}/frontend; the app never saw it"
        ),
    }

    step("8. A CA rotation, live: a new CA is published, activated, and the old one removed");
    let server_cli = |args: &[&str]| meshid(&[&["server"][..], args, &admin[..]].concat());
    let roots = || {
        server_cli(&["bundle", "show", "--format", "pem"])
            .map(|p| p.matches("BEGIN CERTIFICATE").count())
            .unwrap_or(0)
    };
    let show: serde_json::Value =
        serde_json::from_str(&server_cli(&["ca", "show", "--output", "json"])?)?;
    let old_ca = show["authorities"]
        .as_array()
        .and_then(|v| {
            v.iter()
                .find(|a| a["kind"] == "x509" && a["state"] == "active")
        })
        .and_then(|a| a["id"].as_str())
        .unwrap_or_default()
        .to_string();
    println!("active CA {old_ca}; the bundle holds {} CA", roots());
    println!("{}", server_cli(&["ca", "prepare"])?);
    println!(
        "the bundle now holds {} CAs: every workload trusts old and new",
        roots()
    );
    println!("{}", server_cli(&["ca", "activate"])?);
    let before_taint = serial_of(&admin_get(&b_admin, "/readyz").unwrap_or_default());
    println!("{}", server_cli(&["ca", "taint", &old_ca])?);
    let mut ca_requests = 0;
    wait_until(
        "everything re-minted under the new CA",
        Duration::from_secs(30),
        || {
            if http_get(&mut conn, "/pay").is_ok() {
                ca_requests += 1;
            }
            server_cli(&["ca", "revoke", &old_ca, "--dry-run"])
                .is_ok_and(|o| !o.contains("live SVID(s) affected"))
        },
    )?;
    println!("{}", server_cli(&["ca", "revoke", &old_ca])?);
    let after_ca = serial_of(&admin_get(&b_admin, "/readyz").unwrap_or_default());
    let body =
        http_get(&mut conn, "/pay").context("the open connection broke during the CA rotation")?;
    let mut fresh = TcpStream::connect(("127.0.0.1", out_front))?;
    println!(
        "payments re-minted ({before_taint} -> {after_ca}); the bundle holds {} CA again; {ca_requests} requests on the open connection meanwhile, still served: {body}; a new connection: {}",
        roots(),
        http_get(&mut fresh, "/pay")?
    );

    step(
        "9. A CA rotation to an expired intermediate (the payments outage of the incident report)",
    );
    let bad = dir.join("bad");
    std::fs::create_dir_all(&bad)?;
    let (cert, key) = expired_intermediate(&bad)?;
    std::fs::write(
        bad.join("server.toml"),
        format!(
            "trust_domain = \"{TD}\"\ndata_dir = \"{b}/data\"\nbind_address = \"127.0.0.1:0\"\nadmin_socket = \"{b}/admin.sock\"\n[upstream]\ncert_path = \"{}\"\nkey_path = \"{}\"\n",
            cert.display(),
            key.display(),
            b = bad.display()
        ),
    )?;
    let out = Command::new(std::env::current_exe()?)
        .args([
            "server",
            "run",
            "--config",
            &format!("{}/server.toml", bad.display()),
        ])
        .output()?;
    if out.status.success() {
        bail!("a server started on an expired intermediate");
    }
    let err = String::from_utf8_lossy(&out.stderr);
    println!(
        "refused before anything was signed or published:\n  {}",
        err.lines().last().unwrap_or_default()
    );
    if !bad.join("data/ca/keys").exists() {
        println!("no CA was minted under it; no bundle reached any agent or sidecar");
    }

    step("Summary");
    println!(
        "✔ agent attested with a single-use join token; 3 SVIDs issued and served over the SPIFFE Workload API"
    );
    println!(
        "✔ frontend -> payments over mTLS; payments saw the verified caller ID, not the forged header"
    );
    println!(
        "✔ live rotation {before} -> {after} with an open connection and zero failed requests"
    );
    println!("✔ intruder refused at the handshake");
    println!(
        "✔ CA rotated live (prepare, activate, taint, revoke) with an open connection and no failed request"
    );
    println!("✔ expired intermediate CA refused at start-up");
    if !keep {
        println!(
            "\n(run with --keep-running to leave it up; curl http://127.0.0.1:{out_front}/ goes through the frontend sidecar)"
        );
    } else {
        println!(
            "\ncurl http://127.0.0.1:{out_front}/   # through the frontend sidecar to payments"
        );
    }
    Ok(())
}
