//! `examples/monitoring/`: the alert rules pass `promtool check rules` and
//! their unit tests (`promtool test rules`), every alert has a unit test, the
//! dashboard's queries are valid PromQL, and every metric the rules and the
//! dashboard use is exported under that name by real server, agent and
//! sidecar processes.

mod common;
mod interop_support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{free_port, sidecar};
use interop_support::{WORKLOAD_ID, http_get, setup, wait_served};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/monitoring")
}

/// `promtool` (Debian package `prometheus`, installed by `.ci/run`).
fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("promtool"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let why = "promtool not found (apt-get install prometheus; .ci/run does it)";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
        eprintln!("SKIPPED: {why}");
    }
    found
}

fn run_promtool(promtool: &Path, args: &[&str], cwd: &Path) -> String {
    let out = Command::new(promtool)
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

fn yaml(file: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(dir().join(file)).expect(file);
    serde_yaml_ng::from_str(&text).expect(file)
}

fn dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(dir().join("grafana-dashboard.json")).expect("dashboard");
    serde_json::from_str(&text).expect("dashboard JSON")
}

/// Every alerting rule's (name, expr).
fn alerts() -> Vec<(String, String)> {
    let rules = yaml("meshid-alerts.yml");
    let mut v = Vec::new();
    for g in rules["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            v.push((
                r["alert"]
                    .as_str()
                    .expect("alerting rules only")
                    .to_string(),
                r["expr"].as_str().expect("expr").to_string(),
            ));
        }
    }
    v
}

/// Every dashboard query, with Grafana's variables filled in.
fn dashboard_queries() -> Vec<(String, String)> {
    let d = dashboard();
    let mut v = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .expect("expr")
                .replace("$__rate_interval", "5m")
                .replace("$instance", ".*");
            v.push((format!("{} / {}", p["title"], t["refId"]), expr));
        }
    }
    v
}

/// `meshid_*` metric names in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("meshid_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn alert_rules_pass_promtool_and_every_alert_is_unit_tested() {
    let Some(promtool) = promtool() else { return };
    let out = run_promtool(&promtool, &["check", "rules", "meshid-alerts.yml"], &dir());
    assert!(out.contains("SUCCESS"), "{out}");
    let out = run_promtool(
        &promtool,
        &["test", "rules", "meshid-alerts.test.yml"],
        &dir(),
    );
    assert!(out.contains("SUCCESS"), "{out}");
    run_promtool(&promtool, &["check", "config", "prometheus.yml"], &dir());

    // Each alert fires in at least one unit test.
    let tests = yaml("meshid-alerts.test.yml");
    let mut fired = BTreeSet::new();
    for t in tests["tests"].as_array().expect("tests") {
        for a in t["alert_rule_test"].as_array().into_iter().flatten() {
            if a["exp_alerts"].as_array().is_some_and(|e| !e.is_empty()) {
                fired.insert(a["alertname"].as_str().expect("alertname").to_string());
            }
        }
    }
    let all: BTreeSet<String> = alerts().into_iter().map(|(n, _)| n).collect();
    assert!(all.len() >= 10, "{all:?}");
    let untested: Vec<_> = all.difference(&fired).collect();
    assert!(
        untested.is_empty(),
        "alerts without a firing unit test: {untested:?}"
    );
}

#[test]
fn dashboard_is_grafana_json_with_valid_promql() {
    let d = dashboard();
    assert_eq!(d["uid"], "meshid-overview");
    let panels = d["panels"].as_array().expect("panels");
    let ids: BTreeSet<i64> = panels
        .iter()
        .map(|p| p["id"].as_i64().expect("id"))
        .collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        assert!(
            p["targets"].as_array().is_some_and(|t| !t.is_empty()),
            "{}",
            p["title"]
        );
    }

    // promtool parses every query, as recording rules.
    let Some(promtool) = promtool() else { return };
    let queries = dashboard_queries();
    let rules: Vec<serde_json::Value> = queries
        .iter()
        .enumerate()
        .map(|(i, (_, expr))| serde_json::json!({"record": format!("dashboard:query_{i}"), "expr": expr}))
        .collect();
    let tmp = tempfile::tempdir().expect("tmp");
    let file = tmp.path().join("dashboard-queries.yml");
    // JSON is YAML.
    std::fs::write(
        &file,
        serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]}).to_string(),
    )
    .expect("write");
    let out = run_promtool(
        &promtool,
        &["check", "rules", "dashboard-queries.yml"],
        tmp.path(),
    );
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", queries.len())),
        "{out}"
    );
}

/// Metric sample names in an OpenMetrics/Prometheus text exposition.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[test]
fn every_metric_the_rules_and_dashboard_use_is_exported() {
    let mut used = BTreeSet::new();
    for (_, expr) in alerts().into_iter().chain(dashboard_queries()) {
        used.extend(metric_names(&expr));
    }
    assert!(used.len() >= 20, "{used:?}");

    let s = setup();
    wait_served(&s);

    // A sidecar on the agent: an inbound listener in front of an echo app,
    // an outbound listener to it, and an outbound listener to a closed port.
    let echo = TcpListener::bind("127.0.0.1:0").expect("bind");
    let echo_addr = echo.local_addr().expect("addr");
    std::thread::spawn(move || {
        for c in echo.incoming().take(8) {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let (admin, inbound, outbound, dead) = (free_port(), free_port(), free_port(), free_port());
    let closed = free_port();
    let cfg = format!(
        "workload_api_socket = \"{}\"\nadmin_address = \"127.0.0.1:{admin}\"\n\
         [[inbound]]\nlisten = \"127.0.0.1:{inbound}\"\nforward_to = \"{echo_addr}\"\nallow = [\"{WORKLOAD_ID}\"]\n\
         [[outbound]]\nlisten = \"127.0.0.1:{outbound}\"\nupstream = \"127.0.0.1:{inbound}\"\nserver_id = \"{WORKLOAD_ID}\"\n\
         [[outbound]]\nlisten = \"127.0.0.1:{dead}\"\nupstream = \"127.0.0.1:{closed}\"\nserver_id = \"{WORKLOAD_ID}\"\n",
        s.agent.endpoint()
    );
    let dir = s.server.dir.path();
    let _sidecar = sidecar(dir, "sidecar", &cfg);
    let admin = format!("127.0.0.1:{admin}");
    common::wait_for("sidecar readiness", Duration::from_secs(30), || {
        let mut c = std::net::TcpStream::connect(&admin).ok()?;
        c.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut r = String::new();
        c.read_to_string(&mut r).ok()?;
        r.starts_with("HTTP/1.1 200").then_some(())
    });

    // Traffic through the sidecar, a failed dial, a refused node API
    // handshake, a CA transition, a refused Workload API connection.
    let mut app = std::net::TcpStream::connect(("127.0.0.1", outbound)).expect("outbound");
    app.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    app.write_all(b"ping").expect("write");
    let mut got = [0u8; 4];
    app.read_exact(&mut got).expect("echo through two sidecars");
    assert_eq!(&got, b"ping");
    drop(app);
    let mut d = std::net::TcpStream::connect(("127.0.0.1", dead)).expect("outbound");
    d.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let _ = d.read_to_end(&mut Vec::new());
    let mut n = std::net::TcpStream::connect(&s.server.node_addr).expect("node API");
    n.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    n.write_all(b"this is not TLS\r\n\r\n").expect("write");
    let _ = n.read_to_end(&mut Vec::new());
    // A CA lifecycle step (the next CA prepared by hand) makes
    // meshid_server_ca_transitions_total appear.
    s.server.ok(&["ca", "prepare"]);
    let mut w = std::os::unix::net::UnixStream::connect(&s.agent.socket).expect("agent socket");
    w.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    w.write_all(b"this is not HTTP/2").expect("write");
    let _ = w.read_to_end(&mut Vec::new());

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut have = BTreeSet::new();
        for (addr, path) in [
            (s.server.metrics_addr.as_str(), "/metrics"),
            (s.metrics.as_str(), "/metrics"),
            (admin.as_str(), "/metrics"),
        ] {
            have.extend(exported(&http_get(addr, path)));
        }
        let missing: Vec<_> = used.difference(&have).collect();
        if missing.is_empty() {
            eprintln!("all {} metric names used are exported", used.len());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "used by examples/monitoring but not exported: {missing:?}\nexported: {have:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
