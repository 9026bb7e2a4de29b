//! High availability end to end: two servers on one PostgreSQL, one agent
//! configured with both, a workload streaming from the Workload API and a
//! sidecar pair carrying traffic. The server the agent is synced to is
//! `kill -9`ed; the agent carries on through the other.

mod common;

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::apps::{Traffic, echo_app, http_app};
use common::postgres as pg;
use common::{AgentProc, Server, TD, free_port, sidecar, wait_for};
use tokio_stream::StreamExt as _;

/// `GET path` on `addr` (HTTP/1.0, whole body).
fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut c = std::net::TcpStream::connect(addr).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(c, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut s = String::new();
    c.read_to_string(&mut s).ok()?;
    Some(s)
}

/// The value of an unlabelled metric on a server.
fn metric(server: &Server, name: &str) -> Option<f64> {
    let body = http_get(&server.metrics_addr, "/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
}

/// One update seen on the workload's stream: when, and (SPIFFE ID → (serial,
/// notAfter)) of every SVID in it.
type Update = (Instant, HashMap<String, (String, SystemTime)>);

/// Prints the tails of the logs if the test fails.
struct LogsOnFailure(Vec<std::path::PathBuf>);

impl Drop for LogsOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for p in &self.0 {
                let s = std::fs::read_to_string(p).unwrap_or_default();
                let v: Vec<&str> = s.lines().collect();
                eprintln!(
                    "--- {} (tail) ---\n{}",
                    p.display(),
                    v[v.len().saturating_sub(80)..].join("\n")
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_fails_over_when_its_server_is_killed() {
    let Some(url) = pg::database("ha_failover") else {
        return;
    };
    // 10 s workload SVIDs (rotated every ~7.5 s), a 20 s agent SVID.
    let cfg = format!(
        "max_svid_ttl = \"20s\"\ndefault_svid_ttl = \"10s\"\nagent_svid_ttl = \"20s\"\ndefault_jwt_svid_ttl = \"10s\"\n\
         [store]\nkind = \"postgres\"\nurl = \"{url}\"\npool_size = 4"
    );
    let a = Server::start(&cfg);
    let b = Server::start(&cfg);
    // Each server's CA is in the bundle both publish.
    let bundle = wait_for("both CAs in the bundle", Duration::from_secs(30), || {
        let pa = a.bundle_pem();
        let pb = b.bundle_pem();
        let n = meshid_identity::pem::parse_certs(pa.as_bytes())
            .map(|c| c.len())
            .unwrap_or(0);
        (n >= 2 && pa == pb).then_some(pa)
    });

    let alias = format!("spiffe://{TD}/node/ha");
    let token = a.ok(&["token", "create", "--spiffe-id", &alias]);
    let uid = nix::unistd::geteuid().as_raw();
    let selector = format!("unix:uid:{uid}");
    for n in ["frontend", "payments"] {
        a.ok(&[
            "entry",
            "create",
            "--parent-id",
            &alias,
            "--spiffe-id",
            &format!("spiffe://{TD}/{n}"),
            "--selector",
            &selector,
            "--ttl",
            "10s",
            "--hint",
            n,
        ]);
    }

    // One agent, both servers.
    let dir = a.dir.path().join("agent");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("bootstrap.pem"), &bundle).expect("bundle");
    let socket = dir.join("api.sock");
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"{TD}\"\nserver_address = [\"{}\", \"{}\"]\n\
             trust_bundle_path = \"{d}/bootstrap.pem\"\ndata_dir = \"{d}/data\"\n\
             socket_path = \"{}\"\nmax_backoff = \"2s\"\n",
            a.node_addr,
            b.node_addr,
            socket.display(),
            d = dir.display()
        ),
    )
    .expect("config");
    let agent = AgentProc::start_config(&dir, config, socket, Some(&token));
    let _logs = LogsOnFailure(vec![
        a.dir.path().join("server.log"),
        b.dir.path().join("server.log"),
        dir.join("agent.log"),
    ]);

    // The sidecar pair, frontend → payments, HTTP and TCP.
    let ep = agent.endpoint();
    let http = http_app(Arc::new(Mutex::new(Vec::new())));
    let echo = echo_app();
    let [b_http, b_tcp, b_adm, a_http, a_tcp, a_adm] = [(); 6].map(|()| free_port());
    let sdir = dir.clone();
    let _payments = sidecar(
        &sdir,
        "payments",
        &format!(
            "workload_api_socket = \"{ep}\"\nadmin_address = \"127.0.0.1:{b_adm}\"\nspiffe_id = \"spiffe://{TD}/payments\"\n\
         [[inbound]]\nlisten = \"127.0.0.1:{b_http}\"\nforward_to = \"127.0.0.1:{http}\"\nmode = \"http\"\nallow = [\"spiffe://{TD}/frontend\"]\n\
         [[inbound]]\nlisten = \"127.0.0.1:{b_tcp}\"\nforward_to = \"127.0.0.1:{echo}\"\nmode = \"tcp\"\nallow = [\"spiffe://{TD}/frontend\"]\n"
        ),
    );
    let _frontend = sidecar(
        &sdir,
        "frontend",
        &format!(
            "workload_api_socket = \"{ep}\"\nadmin_address = \"127.0.0.1:{a_adm}\"\nspiffe_id = \"spiffe://{TD}/frontend\"\n\
         [[outbound]]\nlisten = \"127.0.0.1:{a_http}\"\nupstream = \"127.0.0.1:{b_http}\"\nserver_id = \"spiffe://{TD}/payments\"\n\
         [[outbound]]\nlisten = \"127.0.0.1:{a_tcp}\"\nupstream = \"127.0.0.1:{b_tcp}\"\nserver_id = \"spiffe://{TD}/payments\"\n"
        ),
    );
    wait_for(
        "traffic through the sidecars",
        Duration::from_secs(60),
        || common::apps::get(a_http).ok(),
    );

    // A workload streaming its SVIDs.
    let updates: Arc<Mutex<Vec<Update>>> = Arc::default();
    let stream_error: Arc<Mutex<Option<String>>> = Arc::default();
    {
        let client = spiffe::WorkloadApiClient::connect_to(&ep)
            .await
            .expect("spiffe client");
        let mut stream = client.stream_x509_contexts().await.expect("stream");
        let (updates, stream_error) = (updates.clone(), stream_error.clone());
        tokio::spawn(async move {
            loop {
                match stream.next().await {
                    Some(Ok(ctx)) => {
                        let svids = ctx
                            .svids()
                            .iter()
                            .map(|s| {
                                let leaf = s.cert_chain()[0].as_ref();
                                let info = meshid_identity::SvidInfo::from_der(leaf).expect("leaf");
                                (s.spiffe_id().to_string(), (info.serial, info.not_after))
                            })
                            .collect();
                        updates.lock().expect("lock").push((Instant::now(), svids));
                    }
                    Some(Err(e)) => {
                        *stream_error.lock().expect("lock") = Some(e.to_string());
                        return;
                    }
                    None => {
                        *stream_error.lock().expect("lock") = Some("stream ended".into());
                        return;
                    }
                }
            }
        });
    }
    let traffic = Traffic::start(a_tcp, a_http);

    // Which server holds the agent's sync stream?
    let synced = |s: &Server| metric(s, "meshid_server_sync_streams") == Some(1.0);
    let victim_is_a = wait_for(
        "the agent's sync stream",
        Duration::from_secs(30),
        || match (synced(&a), synced(&b)) {
            (true, false) => Some(true),
            (false, true) => Some(false),
            _ => None,
        },
    );
    let (mut victim, survivor) = if victim_is_a { (a, b) } else { (b, a) };
    // Let a rotation happen before the kill.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let killed_at = Instant::now();
    let pid = victim.pid().expect("victim runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9");
    eprintln!(
        "killed the server the agent was synced to ({})",
        victim.node_addr
    );

    // The agent reaches the survivor and keeps rotating through it for more
    // than two workload SVID lifetimes and past an agent SVID renewal.
    let moved = wait_for(
        "sync stream on the survivor",
        Duration::from_secs(30),
        || synced(&survivor).then(|| killed_at.elapsed()),
    );
    eprintln!("sync stream on the survivor {moved:?} after the kill");
    // Two rotations of each workload SVID through the survivor and an
    // agent SVID renewal since the kill (asserted in full below).
    let rotated_through_survivor = |updates: &[Update], id: &str| {
        let mut first_seen: HashMap<&String, Instant> = HashMap::new();
        for (t, svids) in updates {
            if let Some((serial, _)) = svids.get(id) {
                first_seen.entry(serial).or_insert(*t);
            }
        }
        first_seen
            .values()
            .filter(|t| **t > killed_at + moved)
            .count()
    };
    let renewals = |log: &str| {
        log.lines()
            .filter(|l| l.contains("agent SVID renewed"))
            .count()
    };
    let renewals_at_kill = renewals(&agent.log());
    let waited = wait_for(
        "two rotations through the survivor and an agent SVID renewal",
        Duration::from_secs(60),
        || {
            let u = updates.lock().expect("lock");
            let rotated = ["frontend", "payments"]
                .iter()
                .all(|n| rotated_through_survivor(&u, &format!("spiffe://{TD}/{n}")) >= 2);
            (rotated && renewals(&agent.log()) > renewals_at_kill.max(1))
                .then(|| killed_at.elapsed())
        },
    );
    eprintln!("rotations through the survivor complete {waited:?} after the kill");

    // An entry created on the survivor reaches the stream.
    let late = format!("spiffe://{TD}/late");
    let created = Instant::now();
    survivor.ok(&[
        "entry",
        "create",
        "--parent-id",
        &alias,
        "--spiffe-id",
        &late,
        "--selector",
        &selector,
        "--ttl",
        "10s",
    ]);
    let reached = wait_for(
        "the new entry on the stream",
        Duration::from_secs(30),
        || {
            updates
                .lock()
                .expect("lock")
                .iter()
                .find(|(t, svids)| *t >= created && svids.contains_key(&late))
                .map(|(t, _)| *t - created)
        },
    );
    eprintln!("entry created on the survivor -> on the workload's stream: {reached:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;

    let report = traffic.stop();
    let updates = updates.lock().expect("lock").clone();
    assert_eq!(
        *stream_error.lock().expect("lock"),
        None,
        "the workload's stream failed"
    );
    assert!(
        report.requests_failed.is_empty(),
        "{} of {} requests failed: {:?}",
        report.requests_failed.len(),
        report.requests_ok + report.requests_failed.len(),
        report.requests_failed.first()
    );
    assert_eq!(report.stream_error, None, "the keep-alive connection broke");
    assert!(report.requests_ok > 200, "{report:?}");

    // The stream saw only new SVIDs: per ID, each serial once and in order
    // of notAfter, never one it had seen replaced.
    let mut last: HashMap<String, (String, SystemTime)> = HashMap::new();
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    for (_, svids) in &updates {
        for (id, (serial, not_after)) in svids {
            if let Some((ls, lna)) = last.get(id) {
                if ls == serial {
                    continue;
                }
                assert!(not_after >= lna, "{id}: an older SVID after a newer one");
            }
            let s = seen.entry(id.clone()).or_default();
            assert!(
                !s.contains(serial),
                "{id}: SVID {serial} served again after its successor"
            );
            s.push(serial.clone());
            last.insert(id.clone(), (serial.clone(), *not_after));
        }
    }
    // Rotations through the survivor: SVIDs first seen well after the kill.
    for n in ["frontend", "payments"] {
        let id = format!("spiffe://{TD}/{n}");
        assert!(
            rotated_through_survivor(&updates, &id) >= 2,
            "{id}: fewer than two rotations through the survivor: {:?}",
            seen.get(&id)
        );
    }
    // Every SVID the workload holds now still has time left.
    let (_, newest) = updates.last().expect("updates");
    for (id, (_, na)) in newest {
        assert!(*na > SystemTime::now(), "{id} expired");
    }
    // The agent renewed its own SVID through the survivor.
    let log = agent.log();
    assert!(renewals(&log) >= 2, "agent SVID not renewed:\n{log}");
    assert!(
        log.contains(&format!("server={}", survivor.node_addr))
            || log.contains(&format!("server: {}", survivor.node_addr)),
        "the agent never named the survivor"
    );
    // The survivor is ready: at once, or after a store probe that a loaded
    // machine made miss its 3 s deadline has been retried (every 2 s).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let body = http_get(&survivor.metrics_addr, "/readyz").unwrap_or_default();
        if body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the survivor is not ready after 15 s:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "{} requests ok, {} echo lines, {} stream updates; sync moved in {moved:?}; new entry on the stream in {reached:?}",
        report.requests_ok,
        report.stream_lines,
        updates.len()
    );
    victim.stop();
}

/// The two-replica Kubernetes manifest: typed Kubernetes objects, two
/// replicas on PostgreSQL spread over nodes, a headless Service agents
/// resolve to every ready replica, a disruption budget, and a server config
/// that passes `meshid server run --check`.
#[test]
fn two_replica_kubernetes_manifest_is_consistent() {
    use k8s_openapi::api::apps::v1::StatefulSet;
    use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use serde::Deserialize as _;

    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/kubernetes/ha/server-postgres.yaml"
    );
    let text = std::fs::read_to_string(path).expect("manifest");
    let (mut sts, mut cms, mut svcs, mut pdbs, mut secrets) =
        (vec![], vec![], vec![], vec![], vec![]);
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v = serde_json::Value::deserialize(doc).expect("YAML document");
        match v["kind"].as_str().expect("kind") {
            "StatefulSet" => {
                sts.push(serde_json::from_value::<StatefulSet>(v).expect("StatefulSet"))
            }
            "ConfigMap" => cms.push(serde_json::from_value::<ConfigMap>(v).expect("ConfigMap")),
            "Service" => svcs.push(serde_json::from_value::<Service>(v).expect("Service")),
            "PodDisruptionBudget" => {
                pdbs.push(serde_json::from_value::<PodDisruptionBudget>(v).expect("PDB"))
            }
            "Secret" => secrets.push(serde_json::from_value::<Secret>(v).expect("Secret")),
            k => panic!("unexpected kind {k}"),
        }
    }
    let [st] = sts.as_slice() else {
        panic!("one StatefulSet")
    };
    let spec = &st.spec;
    assert_eq!(spec.replicas, Some(2));
    let headless = svcs
        .iter()
        .find(|s| s.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None"))
        .expect("a headless Service");
    assert_eq!(
        spec.service_name.as_deref(),
        headless.metadata.name.as_deref()
    );
    let labels = spec.selector.match_labels.clone().expect("labels");
    assert_eq!(
        headless.spec.as_ref().and_then(|s| s.selector.clone()),
        Some(labels.clone())
    );
    let pod = spec.template.spec.as_ref().expect("pod");
    assert!(
        pod.affinity
            .as_ref()
            .and_then(|a| a.pod_anti_affinity.as_ref())
            .is_some(),
        "replicas spread over nodes"
    );
    let c = &pod.containers[0];
    let env = c.env.clone().unwrap_or_default();
    let pw = env
        .iter()
        .find(|e| e.name == "PGPASSWORD")
        .expect("PGPASSWORD");
    let secret_ref = pw
        .value_from
        .as_ref()
        .and_then(|v| v.secret_key_ref.as_ref())
        .expect("from a Secret");
    assert!(
        secrets
            .iter()
            .any(|s| s.metadata.name.as_deref() == Some(secret_ref.name.as_str()))
    );
    assert_eq!(
        c.readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.as_deref()),
        Some("/readyz")
    );
    let [pdb] = pdbs.as_slice() else {
        panic!("one PodDisruptionBudget")
    };
    assert_eq!(
        pdb.spec
            .as_ref()
            .and_then(|s| s.selector.clone())
            .and_then(|s| s.match_labels),
        Some(labels)
    );
    // The embedded server config is valid and on PostgreSQL.
    let cfg = cms
        .iter()
        .find_map(|c| c.data.as_ref()?.get("server.toml").cloned())
        .expect("server.toml");
    assert!(cfg.contains("kind = \"postgres\""), "{cfg}");
    let tmp = tempfile::tempdir().expect("tmp");
    let p = tmp.path().join("server.toml");
    std::fs::write(&p, &cfg).expect("write");
    let out = common::meshid()
        .args(["server", "run", "--check", "--config"])
        .arg(&p)
        .output()
        .expect("meshid");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
