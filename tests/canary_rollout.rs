//! Staged trust changes through the real binaries: a server with four
//! agents activates a CA with a 25% canary stage. A broken CA (its key does
//! not match its certificate, which no chain check before signing can see)
//! is refused by the one canary; the rollout halts, the CA is not
//! activated, the other agents never hear of it, and the halt is audited,
//! counted and shown. A good CA goes through the canary and reaches every
//! agent; a taint is staged the same way; `--no-canary` activates at once.
//! A canary that does not answer halts the rollout at the timeout.

mod common;

use std::io::{Read as _, Write as _};
use std::time::{Duration, SystemTime};

use common::{AgentProc, Server, TD, register_node};
use serde_json::Value;

const AGENTS: usize = 4;

fn ca_show(server: &Server) -> Value {
    serde_json::from_str(&server.ok(&["ca", "show", "--output", "json"])).expect("ca show JSON")
}

fn x509_in_state(server: &Server, state: &str) -> Vec<String> {
    ca_show(server)["authorities"]
        .as_array()
        .expect("authorities")
        .iter()
        .filter(|a| a["kind"] == "x509" && a["state"] == state)
        .filter_map(|a| a["id"].as_str().map(str::to_string))
        .collect()
}

fn metrics(server: &Server) -> String {
    let mut c = std::net::TcpStream::connect(&server.metrics_addr).expect("connect metrics");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        c,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut out = String::new();
    c.read_to_string(&mut out).expect("read");
    out
}

fn rollouts_counted(server: &Server, outcome: &str) -> u64 {
    let prefix = format!("meshid_server_trust_rollouts_total{{outcome=\"{outcome}\"}} ");
    metrics(server)
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
        .unwrap_or(0)
}

fn events(server: &Server, name: &str) -> Vec<Value> {
    server
        .audit()
        .into_iter()
        .filter(|e| e["event"] == name)
        .collect()
}

/// What an agent serves its workload, through the `spiffe` crate: the
/// authority that signed the SVID, and the bundle's roots.
async fn served(agent: &AgentProc) -> (String, Vec<Vec<u8>>) {
    let client = spiffe::WorkloadApiClient::connect_to(&agent.endpoint())
        .await
        .expect("spiffe client");
    let svid = client.fetch_x509_svid().await.expect("X509-SVID");
    let leaf = svid.cert_chain()[0].as_ref().to_vec();
    let td = spiffe::TrustDomain::new(TD).expect("td");
    let bundles = client.fetch_x509_bundles().await.expect("bundles");
    let mut roots: Vec<Vec<u8>> = bundles
        .get(&td)
        .expect("own bundle")
        .authorities()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    roots.sort();
    (
        meshid_identity::svid::authority_key_id(&leaf).expect("authority key id"),
        roots,
    )
}

/// The serial number of the X509-SVID an agent serves now.
async fn leaf_serial(agent: &AgentProc) -> String {
    let client = spiffe::WorkloadApiClient::connect_to(&agent.endpoint())
        .await
        .expect("spiffe client");
    let svid = client.fetch_x509_svid().await.expect("X509-SVID");
    meshid_identity::SvidInfo::from_der(svid.cert_chain()[0].as_ref())
        .expect("leaf")
        .serial
}

/// Whether `roots` hold the authority `id` (its subject key identifier).
fn holds(roots: &[Vec<u8>], id: &str) -> bool {
    roots
        .iter()
        .any(|r| meshid_identity::svid::subject_key_id(r).as_deref() == Some(id))
}

/// Polls every agent until `cond` holds for what each serves.
async fn until_all(
    agents: &[AgentProc],
    what: &str,
    cond: impl Fn(&(String, Vec<Vec<u8>>)) -> bool,
) -> Vec<(String, Vec<Vec<u8>>)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut all = Vec::new();
        for a in agents {
            all.push(served(a).await);
        }
        if all.iter().all(&cond) {
            return all;
        }
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Prints the tail of every log if the test fails.
struct Logs(Vec<std::path::PathBuf>);

impl Drop for Logs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for p in &self.0 {
                let s = std::fs::read_to_string(p).unwrap_or_default();
                let v: Vec<&str> = s.lines().collect();
                eprintln!(
                    "--- {} (tail) ---\n{}",
                    p.display(),
                    v[v.len().saturating_sub(40)..].join("\n")
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_halts_a_broken_ca_and_passes_a_good_one() {
    let server = Server::start(
        "ca_ttl = \"1h\"\nmax_svid_ttl = \"10m\"\ndefault_svid_ttl = \"10m\"\nagent_svid_ttl = \"10m\"\n[safe_ops]\ncanary_share = 0.25\ncanary_timeout = \"30s\"\n",
    );
    let mut logs = vec![server.dir.path().join("server.log")];
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        let (_, token) = register_node(&server, &format!("n{i}"), &[&format!("w{i}")], Some("20s"));
        let dir = server.dir.path().join(format!("agent{i}"));
        logs.push(dir.join("agent.log"));
        agents.push(AgentProc::start(&dir, &server, Some(&token)));
    }
    let _logs = Logs(logs);
    let old = x509_in_state(&server, "active").pop().expect("active CA");
    until_all(&agents, "SVIDs served", |(ca, _)| *ca == old).await;

    // A prepared CA whose private key is not the one its certificate
    // certifies: the chain and the journal look right, every signature
    // it makes is wrong.
    server.ok(&["ca", "prepare"]);
    let broken = x509_in_state(&server, "prepared").pop().expect("prepared");
    let key_path = server
        .dir
        .path()
        .join(format!("data/ca/keys/x509-{broken}.key"));
    assert!(key_path.exists(), "{}", key_path.display());
    let wrong = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    std::fs::write(&key_path, wrong.serialize_pem()).expect("replace key");
    // Every agent holds the prepared CA in its bundle before anything is
    // activated.
    let before = until_all(&agents, "the prepared CA in every bundle", |(_, r)| {
        holds(r, &broken)
    })
    .await;

    let out = server.cli(&["ca", "activate", "--canary", "25%"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a broken CA was activated");
    assert!(
        err.contains("halted") && err.contains("NOT applied"),
        "{err}"
    );

    // The CA is not active; the old one still signs.
    assert_eq!(x509_in_state(&server, "active"), vec![old.clone()]);
    assert_eq!(x509_in_state(&server, "prepared"), vec![broken.clone()]);
    // `ca show` and `ca rollout status` say why.
    let show = ca_show(&server);
    let ro = &show["last_rollout"];
    assert_eq!(ro["state"], "halted", "{ro}");
    assert_eq!(ro["authority_id"], broken.as_str());
    assert_eq!(ro["other_agents"], 3);
    let canaries = ro["canaries"].as_array().expect("canaries");
    assert_eq!(canaries.len(), 1, "{ro}");
    assert_eq!(canaries[0]["verdict"], "refused", "{ro}");
    let canary = canaries[0]["agent_id"].as_str().expect("agent").to_string();
    assert!(
        canaries[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains(&broken)
                && r.contains("does not verify against the bundle this agent holds")),
        "{ro}"
    );
    let status = server.ok(&["ca", "rollout", "status"]);
    assert!(
        status.contains("halted") && status.contains(&canary) && status.contains("refused"),
        "{status}"
    );
    // Audited with the refusing agent and its reason; counted.
    let halted = events(&server, "trust_rollout_halted");
    assert_eq!(halted.len(), 1, "{halted:?}");
    assert_eq!(halted[0]["refusing"][0]["agent"], canary.as_str());
    assert!(
        halted[0]["refusing"][0]["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty())
    );
    assert_eq!(rollouts_counted(&server, "halted"), 1);
    // Only the canary was asked: no other agent had a probe or answered.
    for ev in ["trust_probe_issued", "trust_check_reported"] {
        let from: Vec<String> = events(&server, ev)
            .iter()
            .filter_map(|e| e["agent"].as_str().map(str::to_string))
            .collect();
        assert_eq!(from, vec![canary.clone()], "{ev}");
    }
    // No agent received the change: SVIDs still from the old CA once every
    // agent has re-minted since the halt (20 s SVIDs), bundles as they were.
    let mut at_halt = Vec::new();
    for a in &agents {
        at_halt.push(leaf_serial(a).await);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut reminted = true;
        for (a, serial) in agents.iter().zip(&at_halt) {
            reminted &= leaf_serial(a).await != *serial;
        }
        if reminted {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out: every agent re-minting after the halt"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let after = until_all(&agents, "old CA still served", |(ca, _)| *ca == old).await;
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b.1, a.1, "a bundle changed after the halt");
    }
    // The halted CA is held back from automatic activation too; retire it.
    server.ok(&["ca", "retire", &broken]);

    // A good CA goes through the canary (share from the config) and then
    // reaches every agent.
    server.ok(&["ca", "prepare"]);
    let good = x509_in_state(&server, "prepared").pop().expect("prepared");
    until_all(&agents, "the good CA in every bundle", |(_, r)| {
        holds(r, &good)
    })
    .await;
    let out = server.ok(&["ca", "activate"]);
    assert!(out.contains("completed"), "{out}");
    assert_eq!(x509_in_state(&server, "active"), vec![good.clone()]);
    let ro = &ca_show(&server)["last_rollout"];
    assert_eq!(ro["state"], "completed", "{ro}");
    assert_eq!(ro["canaries"][0]["verdict"], "ok", "{ro}");
    assert_eq!(events(&server, "trust_rollout_completed").len(), 1);
    assert_eq!(rollouts_counted(&server, "completed"), 1);
    until_all(&agents, "every agent on the good CA", |(ca, _)| *ca == good).await;

    // A taint of the old CA is staged the same way (probes from the active
    // CA the agents re-mint under), then applies.
    let out = server.ok(&["ca", "taint", &old, "--canary", "25%"]);
    assert!(out.contains("completed"), "{out}");
    let ro = &ca_show(&server)["last_rollout"];
    assert_eq!(ro["change"], "taint", "{ro}");
    assert_eq!(ro["state"], "completed", "{ro}");
    assert_eq!(rollouts_counted(&server, "completed"), 2);
    assert!(
        ca_show(&server)["authorities"]
            .as_array()
            .expect("authorities")
            .iter()
            .any(|a| a["id"] == old.as_str() && a["tainted"] == true)
    );

    // --no-canary: at once, no rollout.
    server.ok(&["ca", "prepare"]);
    let next = x509_in_state(&server, "prepared").pop().expect("prepared");
    let started = events(&server, "trust_rollout_started").len();
    let t0 = SystemTime::now();
    server.ok(&["ca", "activate", "--no-canary"]);
    assert!(t0.elapsed().unwrap_or_default() < Duration::from_secs(10));
    assert_eq!(x509_in_state(&server, "active"), vec![next]);
    assert_eq!(events(&server, "trust_rollout_started").len(), started);
    assert_eq!(rollouts_counted(&server, "halted"), 1);
    assert_eq!(rollouts_counted(&server, "completed"), 2);
}

/// A canary that never answers (its agent is down) halts the rollout at
/// `canary_timeout`: nothing is activated, and the halt names it as timed
/// out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_canary_halts_the_rollout_at_the_timeout() {
    let server = Server::start(
        "ca_ttl = \"1h\"\nmax_svid_ttl = \"10m\"\ndefault_svid_ttl = \"10m\"\nagent_svid_ttl = \"10m\"\n[safe_ops]\ncanary_timeout = \"3s\"\n",
    );
    let (_, token) = register_node(&server, "quiet", &["q"], None);
    let dir = server.dir.path().join("agent");
    let _logs = Logs(vec![
        server.dir.path().join("server.log"),
        dir.join("agent.log"),
    ]);
    let mut agent = AgentProc::start(&dir, &server, Some(&token));
    let old = x509_in_state(&server, "active").pop().expect("active CA");
    until_all(std::slice::from_ref(&agent), "SVID served", |(ca, _)| {
        *ca == old
    })
    .await;
    agent.stop();
    server.ok(&["ca", "prepare"]);
    let t0 = std::time::Instant::now();
    let out = server.cli(&["ca", "activate", "--canary", "100%"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "activated without the canary's answer"
    );
    assert!(err.contains("timed_out"), "{err}");
    assert!(t0.elapsed() >= Duration::from_secs(3));
    assert_eq!(x509_in_state(&server, "active"), vec![old]);
    let ro = &ca_show(&server)["last_rollout"];
    assert_eq!(ro["state"], "halted", "{ro}");
    assert_eq!(ro["canaries"][0]["verdict"], "timed_out", "{ro}");
    assert_eq!(events(&server, "trust_rollout_halted").len(), 1);
    assert_eq!(rollouts_counted(&server, "halted"), 1);
}
