//! The CA lifecycle end to end, with real processes: a server whose CA lives
//! 60 s rotates it by itself four times (one of them after a `kill -9` of
//! the agent) while traffic flows through a sidecar pair; a compromised CA is replaced by a forced
//! rotation (taint, then revoke) under traffic; and the chain gate refuses
//! bad intermediates and a bundle that would orphan live SVIDs.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::apps::{Traffic, echo_app, http_app};
use common::{AgentProc, Server, Sidecar, TD, agent_with_workloads, free_port, sidecar, wait_for};
use serde_json::Value;

/// A server, an agent, and a frontend → payments sidecar pair (HTTP and TCP).
struct Mesh {
    server: Server,
    agent: AgentProc,
    _sidecars: Vec<Sidecar>,
    a_http: u16,
    a_tcp: u16,
}

fn mesh(server_cfg: &str, svid_ttl: &str) -> Mesh {
    let server = Server::start(server_cfg);
    let agent = agent_with_workloads(&server, "ca", &["frontend", "payments"], Some(svid_ttl));
    let dir = server.dir.path().to_path_buf();
    let ep = agent.endpoint();
    let http = http_app(Arc::new(Mutex::new(Vec::new())));
    let echo = echo_app();
    let [b_http, b_tcp, b_adm, a_http, a_tcp, a_adm] = [(); 6].map(|()| free_port());
    let b = sidecar(
        &dir,
        "payments",
        &format!(
            "workload_api_socket = \"{ep}\"\nadmin_address = \"127.0.0.1:{b_adm}\"\nspiffe_id = \"spiffe://{TD}/payments\"\n\
         [[inbound]]\nlisten = \"127.0.0.1:{b_http}\"\nforward_to = \"127.0.0.1:{http}\"\nmode = \"http\"\nallow = [\"spiffe://{TD}/frontend\"]\n\
         [[inbound]]\nlisten = \"127.0.0.1:{b_tcp}\"\nforward_to = \"127.0.0.1:{echo}\"\nmode = \"tcp\"\nallow = [\"spiffe://{TD}/frontend\"]\n"
        ),
    );
    let a = sidecar(
        &dir,
        "frontend",
        &format!(
            "workload_api_socket = \"{ep}\"\nadmin_address = \"127.0.0.1:{a_adm}\"\nspiffe_id = \"spiffe://{TD}/frontend\"\n\
         [[outbound]]\nlisten = \"127.0.0.1:{a_http}\"\nupstream = \"127.0.0.1:{b_http}\"\nserver_id = \"spiffe://{TD}/payments\"\n\
         [[outbound]]\nlisten = \"127.0.0.1:{a_tcp}\"\nupstream = \"127.0.0.1:{b_tcp}\"\nserver_id = \"spiffe://{TD}/payments\"\n"
        ),
    );
    wait_for(
        "traffic through the sidecars",
        Duration::from_secs(30),
        || common::apps::get(a_http).ok(),
    );
    Mesh {
        server,
        agent,
        _sidecars: vec![a, b],
        a_http,
        a_tcp,
    }
}

fn ca_show(server: &Server, all: bool) -> Value {
    let mut args = vec!["ca", "show", "--output", "json"];
    if all {
        args.push("--all");
    }
    serde_json::from_str(&server.ok(&args)).expect("ca show JSON")
}

fn authorities(v: &Value, kind: &str, state: &str) -> Vec<Value> {
    v["authorities"]
        .as_array()
        .expect("authorities")
        .iter()
        .filter(|a| a["kind"] == kind && (state.is_empty() || a["state"] == state))
        .cloned()
        .collect()
}

fn active_x509(server: &Server) -> String {
    authorities(&ca_show(server, false), "x509", "active")
        .first()
        .and_then(|a| a["id"].as_str())
        .expect("an active X.509 CA")
        .to_string()
}

/// Prints the tail of the server's and agent's logs if the test fails.
struct LogsOnFailure(Vec<std::path::PathBuf>);

impl LogsOnFailure {
    fn of(m: &Mesh) -> Self {
        Self(vec![
            m.server.dir.path().join("server.log"),
            m.agent.dir.join("agent.log"),
        ])
    }
}

impl Drop for LogsOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for p in &self.0 {
                let s = std::fs::read_to_string(p).unwrap_or_default();
                let v: Vec<&str> = s.lines().collect();
                eprintln!(
                    "--- {} (tail) ---\n{}",
                    p.display(),
                    v[v.len().saturating_sub(60)..].join("\n")
                );
            }
        }
    }
}

/// (notAfter, subject key id) of each PEM certificate.
fn roots_of(pem: &str) -> Vec<(SystemTime, String)> {
    meshid_identity::pem::parse_certs(pem.as_bytes())
        .expect("PEM")
        .iter()
        .map(|c| {
            let (_, x) = x509_parser::parse_x509_certificate(c).expect("cert");
            (
                meshid_identity::svid::to_system_time(x.validity().not_after),
                meshid_identity::svid::subject_key_id(c).expect("ski"),
            )
        })
        .collect()
}

/// A SPIFFE client nobody here wrote (the `spiffe` crate) fetches its SVID
/// and bundle, and the SVID verifies against that bundle.
async fn spiffe_client_verifies(endpoint: &str) {
    let client = spiffe::WorkloadApiClient::connect_to(endpoint)
        .await
        .expect("spiffe client");
    let svid = client.fetch_x509_svid().await.expect("X509-SVID");
    let td = spiffe::TrustDomain::new(TD).expect("td");
    let bundles = client.fetch_x509_bundles().await.expect("bundles");
    let bundle = bundles.get(&td).expect("own bundle");
    let roots: Vec<Vec<u8>> = bundle
        .authorities()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    let chain: Vec<Vec<u8>> = svid
        .cert_chain()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    meshid_identity::chain::verify_chain(&chain, &roots, SystemTime::now())
        .expect("the SVID verifies against the bundle the client was given");
}

/// A 60 s CA with 8 s SVIDs, through at least four rotations, under traffic:
/// no failed request, no reset connection, a bundle that held old and new CA
/// at once, never an expired CA served, and an agent `kill -9`ed after two
/// rotations that comes back on its persisted identity and bundle and follows
/// the next rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_rotates_by_itself_four_times_under_traffic() {
    let cfg = "ca_ttl = \"60s\"\nmax_svid_ttl = \"8s\"\ndefault_svid_ttl = \"8s\"\nagent_svid_ttl = \"8s\"\ndefault_jwt_svid_ttl = \"8s\"\n";
    let mut m = mesh(cfg, "8s");
    let _logs = LogsOnFailure::of(&m);
    let first_ca = active_x509(&m.server);
    let bootstrap_pem =
        std::fs::read_to_string(m.agent.dir.join("bootstrap.pem")).expect("bootstrap");
    let traffic = Traffic::start(m.a_tcp, m.a_http);

    // How long each bundle change took from publication on the server to
    // the agent (which pushes it to every open stream in the same step).
    let at = |log: &str, marker: &str| -> Vec<(i64, SystemTime)> {
        log.lines()
            .filter(|l| l.contains(marker))
            .filter_map(|l| {
                let ts = humantime::parse_rfc3339_weak(
                    l.split_whitespace().next()?.trim_end_matches('Z'),
                )
                .ok()?;
                let seq = l
                    .split("sequence_number=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()?;
                Some((seq, ts))
            })
            .collect()
    };
    let lags_of = |m: &Mesh| -> Vec<Duration> {
        let pubs = at(&m.server.log(), "bundle published");
        let received = at(&m.agent.log(), "bundle updated");
        received
            .iter()
            .filter_map(|(seq, r)| {
                let (_, p) = pubs.iter().find(|(s, _)| s == seq)?;
                r.duration_since(*p).ok()
            })
            .collect()
    };
    let audit_count = |audit: &[Value], kind: &str| {
        audit
            .iter()
            .filter(|e| e["event"] == kind || e["kind"] == kind)
            .count()
    };

    // The run lasts until everything asserted below has had the chance to
    // happen (at least four rotations, one of them after the agent's
    // restart; three removals; six bundle changes; 1,000 echoed lines), at
    // most 185 s (three CA lifetimes). The CA schedule itself over many
    // lifetimes is covered in paused time by the manager's and the
    // schedule's own tests (server/src/ca/manager/tests.rs, schedule.rs).
    let started = Instant::now();
    let mut active_seen: Vec<String> = vec![first_ca.clone()];
    let mut activation_lag = Vec::new();
    let mut max_roots = 0usize;
    let mut both_at_once = false;
    let mut restarted = false;
    let mut checks = 0usize;
    let mut published: BTreeSet<String> = BTreeSet::new();
    let mut seen_after_restart = 0usize;
    while started.elapsed() < Duration::from_secs(185) {
        // What the server publishes: never an expired CA.
        let pem = m.server.bundle_pem();
        let now = SystemTime::now();
        let roots = roots_of(&pem);
        for (na, id) in &roots {
            assert!(
                *na > now,
                "the bundle served expired CA {id}:\n{}\nserver log:\n{}",
                m.server.ok(&["ca", "show", "--all"]),
                m.server.log()
            );
            published.insert(id.clone());
        }
        max_roots = max_roots.max(roots.len());
        let active = active_x509(&m.server);
        if roots.len() >= 2 && roots.iter().any(|(_, id)| id == &active) {
            both_at_once = true;
        }
        if active_seen.last() != Some(&active) {
            activation_lag.push(started.elapsed());
            active_seen.push(active.clone());
        }
        // After two rotations: kill -9 the agent and bring it back on what
        // it persisted (the bootstrap bundle no longer holds any live CA).
        if !restarted && active_seen.len() >= 3 {
            let boot_ids: Vec<String> = roots_of(&bootstrap_pem).into_iter().map(|r| r.1).collect();
            assert!(
                !roots.iter().any(|(_, id)| boot_ids.contains(id)),
                "the bootstrap CA should have left the bundle by now"
            );
            m.agent.kill9();
            m.agent.start_again();
            restarted = true;
            seen_after_restart = active_seen.len();
        }
        checks += 1;
        if restarted
            && active_seen.len() >= 5
            && active_seen.len() > seen_after_restart
            && both_at_once
            && traffic.stream_lines() > 1000
        {
            let audit = m.server.audit();
            if audit_count(&audit, "ca_activated") >= 4
                && audit_count(&audit, "ca_removed") >= 3
                && lags_of(&m).len() >= 6
            {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let report = traffic.stop();
    assert!(restarted, "the agent was never restarted: {active_seen:?}");
    assert!(
        active_seen.len() >= 5,
        "expected at least four rotations in three lifetimes, saw {active_seen:?}"
    );
    assert!(
        active_seen.len() > seen_after_restart,
        "no rotation after the agent's restart: {active_seen:?}"
    );
    assert!(
        both_at_once,
        "the bundle never held the old and the new CA together"
    );
    assert!(max_roots <= 3, "the bundle held {max_roots} CAs at once");
    assert!(
        report.requests_failed.is_empty(),
        "{} of {} requests failed: {:?}",
        report.requests_failed.len(),
        report.requests_ok + report.requests_failed.len(),
        report.requests_failed.first()
    );
    assert_eq!(report.stream_error, None, "the keep-alive connection broke");
    assert!(report.stream_lines > 1000, "{report:?}");
    // Every transition is in the audit log.
    let audit = m.server.audit();
    assert!(audit_count(&audit, "ca_activated") >= 4, "audit: {audit:?}");
    assert!(audit_count(&audit, "ca_removed") >= 3);
    // The agent came back without a join token and kept serving.
    assert!(
        m.agent
            .log()
            .matches("resuming with persisted agent SVID")
            .count()
            >= 1,
        "{}",
        m.agent.log()
    );
    spiffe_client_verifies(&m.agent.endpoint()).await;
    let lags = lags_of(&m);
    assert!(
        lags.len() >= 6,
        "bundle changes seen by the agent: {lags:?}"
    );
    println!(
        "bundle propagation server -> agent over {} changes: max {:?}, all {:?}",
        lags.len(),
        lags.iter().max(),
        lags
    );
    println!(
        "rotations: {} CAs in {:?} ({} checks; activations at {:?}); {} CAs published in all; \
         {} requests ok, {} stream lines",
        active_seen.len(),
        started.elapsed(),
        checks,
        activation_lag,
        published.len(),
        report.requests_ok,
        report.stream_lines
    );
}

/// After a compromise: prepare and activate a new CA, taint the old one so
/// that everything it signed is re-minted now, then revoke it from the
/// bundle. Under traffic, with no failed request; `--dry-run` changes
/// nothing; revoke is refused while live SVIDs depend on the old CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_rotation_taint_then_revoke_under_traffic() {
    let cfg = "ca_ttl = \"1h\"\nmax_svid_ttl = \"10m\"\ndefault_svid_ttl = \"10m\"\nagent_svid_ttl = \"10m\"\n";
    let m = mesh(cfg, "10m");
    let _logs = LogsOnFailure::of(&m);
    let traffic = Traffic::start(m.a_tcp, m.a_http);
    let old = active_x509(&m.server);
    let journal = |s: &Server| {
        let mut v = ca_show(s, true);
        v["next_transition_at"] = Value::Null;
        for a in v["authorities"].as_array_mut().expect("array") {
            a["live_svids"] = Value::Null;
            a["last_svid_not_after"] = Value::Null;
        }
        v
    };

    // The active CA cannot be tainted or revoked.
    for verb in ["taint", "revoke"] {
        let out = m.server.cli(&["ca", verb, &old]);
        assert!(
            !out.status.success(),
            "{verb} of the active CA must be refused"
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("is active"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Dry runs change nothing.
    let before = journal(&m.server);
    let out = m.server.ok(&["ca", "prepare", "--dry-run"]);
    assert!(out.contains("dry run: nothing changed"), "{out}");
    assert_eq!(
        journal(&m.server),
        before,
        "prepare --dry-run changed the journal"
    );

    m.server.ok(&["ca", "prepare"]);
    let prepared = authorities(&ca_show(&m.server, false), "x509", "prepared");
    assert_eq!(prepared.len(), 1);
    let new = prepared[0]["id"].as_str().expect("id").to_string();
    let before = journal(&m.server);
    let out = m.server.ok(&["ca", "activate", "--dry-run"]);
    assert!(out.contains(&new) && out.contains("dry run"), "{out}");
    assert_eq!(
        journal(&m.server),
        before,
        "activate --dry-run changed the journal"
    );
    m.server.ok(&["ca", "activate"]);
    assert_eq!(active_x509(&m.server), new);

    // The old CA still has live SVIDs (10 min ones): revoke is refused, and
    // says how many and for whom; nothing changes.
    let before = journal(&m.server);
    let out = m.server.cli(&["ca", "revoke", &old]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("live certificate(s)") && err.contains("still depend"),
        "{err}"
    );
    assert_eq!(
        journal(&m.server),
        before,
        "a refused revoke changed the journal"
    );
    let out = m.server.ok(&["ca", "revoke", &old, "--dry-run"]);
    assert!(
        out.contains("would revoke") && out.contains("live SVID(s) affected"),
        "{out}"
    );
    assert_eq!(journal(&m.server), before);

    // Taint: the dry run lists the blast radius; the real one makes every
    // holder re-mint under the new CA now.
    let out = m.server.ok(&["ca", "taint", &old, "--dry-run"]);
    assert!(
        out.contains("would taint") && out.contains(&format!("spiffe://{TD}/frontend")),
        "{out}"
    );
    assert_eq!(journal(&m.server), before);
    let tainted_at = Instant::now();
    m.server.ok(&["ca", "taint", &old]);
    let live_of = |s: &Server, id: &str| {
        authorities(&ca_show(s, false), "x509", "")
            .iter()
            .find(|a| a["id"] == id)
            .map(|a| a["live_svids"].as_i64().unwrap_or(-1))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while live_of(&m.server, &old) != Some(0) {
        assert!(
            Instant::now() < deadline,
            "still live under the tainted CA:\n{}\nagent log:\n{}",
            m.server.ok(&["ca", "revoke", &old, "--dry-run"]),
            m.agent.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let reminted_in = tainted_at.elapsed();

    // Now nothing depends on it: revoke removes it from the bundle.
    let out = m.server.ok(&["ca", "revoke", &old]);
    assert!(out.contains("revoked"), "{out}");
    let roots: Vec<String> = roots_of(&m.server.bundle_pem())
        .into_iter()
        .map(|r| r.1)
        .collect();
    assert_eq!(
        roots,
        vec![new.clone()],
        "the bundle must hold only the new CA"
    );
    // Fresh connections keep working under the new bundle.
    wait_for(
        "a request after the revocation",
        Duration::from_secs(10),
        || common::apps::get(m.a_http).ok(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = traffic.stop();
    assert!(
        report.requests_failed.is_empty(),
        "{} requests failed during the forced rotation: {:?}",
        report.requests_failed.len(),
        report.requests_failed.first()
    );
    assert_eq!(report.stream_error, None);
    let audit = m.server.audit();
    for ev in ["ca_prepared", "ca_activated", "ca_tainted", "ca_revoked"] {
        assert!(
            audit.iter().any(|e| e["event"] == ev),
            "no {ev} in the audit log"
        );
    }
    assert!(
        m.agent.log().contains("tainted"),
        "the agent should say why it renewed early"
    );
    spiffe_client_verifies(&m.agent.endpoint()).await;
    println!(
        "forced rotation: re-minted under the new CA {reminted_in:?} after the taint; {} requests ok",
        report.requests_ok
    );
}
