//! Every SPIFFE client works unchanged: the Python SPIFFE library (gRPC
//! C-core, which sends the percent-encoded socket path as `:authority`), raw
//! HTTP/2 requests carrying every `:authority` form gRPC stacks send on a Unix
//! socket (agent Workload API and server admin API), and malformed HTTP/2
//! refused without disturbing anyone else.

mod common;
mod interop_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::TD;
use interop_support::{
    Outcome, PREFACE, RawH2, WORKLOAD_ID, authority_forms, fetch_jwt, frame, http_get, setup,
    wait_served,
};
use meshid_proto::meshid::admin::v1::{HealthRequest, HealthResponse};
use meshid_proto::workload::JwtsvidResponse;
use prost::Message;

/// Asserts a FetchJWTSVID reply carrying this workload's JWT-SVID.
fn assert_jwt_served(what: &str, o: &Outcome) {
    assert_eq!(o.grpc_status(), Some("0"), "{what}: {o:?}");
    assert_eq!(o.header(":status"), Some("200"), "{what}: {o:?}");
    let Outcome::Reply { messages, .. } = o else {
        unreachable!()
    };
    let resp = JwtsvidResponse::decode(&messages[0][..]).expect("JWTSVIDResponse");
    assert_eq!(resp.svids.len(), 1, "{what}");
    assert_eq!(resp.svids[0].spiffe_id, WORKLOAD_ID, "{what}");
    assert_eq!(resp.svids[0].svid.split('.').count(), 3, "{what}: a JWT");
}

#[test]
fn every_authority_form_is_served_on_the_agent_and_admin_sockets() {
    let s = setup();
    wait_served(&s);
    let forms = authority_forms(&s.agent.socket);

    // One connection per form.
    for (what, authority) in &forms {
        let mut c = RawH2::connect(&s.agent.socket);
        let o = fetch_jwt(&mut c, authority.as_deref());
        eprintln!(
            "agent, {what}, :authority {:?}: grpc-status {:?}",
            authority
                .as_ref()
                .map(|a| String::from_utf8_lossy(a).into_owned()),
            o.grpc_status()
        );
        assert_jwt_served(what, &o);
    }

    // All forms on one connection, twice: the client's HPACK encoder now
    // refers to its dynamic table, which the layer must track.
    let mut c = RawH2::connect(&s.agent.socket);
    for _ in 0..2 {
        for (what, authority) in &forms {
            assert_jwt_served(what, &fetch_jwt(&mut c, authority.as_deref()));
        }
    }

    // The admin socket accepts the same forms.
    for (what, authority) in authority_forms(&s.server.admin_socket) {
        let mut c = RawH2::connect(&s.server.admin_socket);
        let o = c.unary(
            "/meshid.admin.v1.Admin/Health",
            authority.as_deref(),
            &[],
            &HealthRequest {}.encode_to_vec(),
        );
        eprintln!("admin, {what}: grpc-status {:?}", o.grpc_status());
        assert_eq!(o.grpc_status(), Some("0"), "admin {what}: {o:?}");
        let Outcome::Reply { messages, .. } = &o else {
            unreachable!()
        };
        let h = HealthResponse::decode(&messages[0][..]).expect("HealthResponse");
        assert_eq!(h.trust_domain, TD);
    }
}

#[test]
fn malformed_http2_is_refused_and_everyone_else_is_served() {
    let s = setup();
    wait_served(&s);
    let sock = &s.agent.socket;
    let encoded = authority_forms(sock)[0].1.clone();

    // A client with an open connection, served.
    let mut bystander = RawH2::connect(sock);
    assert_jwt_served("bystander", &fetch_jwt(&mut bystander, encoded.as_deref()));

    // A HEADERS block that is not valid HPACK (index 63 with an empty
    // dynamic table): the connection is closed, the stream never answered.
    let mut bad = RawH2::connect(sock);
    bad.send(&frame(0x1, 0x4 | 0x1, 1, &[0xbf]));
    bad.expect_closed(1);

    // A header block interrupted by a DATA frame.
    let mut bad = RawH2::connect(sock);
    let block = bad.header_block("/SpiffeWorkloadAPI/FetchJWTSVID", None, &[]);
    let mut out = frame(0x1, 0, 1, &block);
    out.extend(frame(0x0, 0x1, 1, b"\0\0\0\0\0"));
    bad.send(&out);
    bad.expect_closed(1);

    // Bytes that are not HTTP/2 at all.
    let mut raw = std::os::unix::net::UnixStream::connect(sock).expect("connect");
    raw.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    use std::io::{Read, Write};
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut got = Vec::new();
    let _ = raw.read_to_end(&mut got);
    assert!(
        !String::from_utf8_lossy(&got).contains("HTTP/1.1"),
        "no HTTP/1 answer"
    );

    // The open connection and new ones are still served.
    assert_jwt_served(
        "bystander again",
        &fetch_jwt(&mut bystander, encoded.as_deref()),
    );
    let mut fresh = RawH2::connect(sock);
    assert_jwt_served("a new client", &fetch_jwt(&mut fresh, encoded.as_deref()));

    // Counted by reason and logged.
    let metrics = http_get(&s.metrics, "/metrics");
    for reason in ["hpack", "protocol", "bad_preface"] {
        let line =
            format!("meshid_agent_workload_api_connections_refused_total{{reason=\"{reason}\"}} 1");
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    let log = s.agent.log();
    assert!(
        log.contains("HTTP/2 connection refused") && log.contains("invalid HPACK header block"),
        "{log}"
    );

    // The admin socket refuses garbage the same way and keeps serving.
    let mut bad = RawH2::connect(&s.server.admin_socket);
    bad.send(&frame(0x1, 0x4 | 0x1, 1, &[0xbf]));
    bad.expect_closed(1);
    let mut raw = std::os::unix::net::UnixStream::connect(&s.server.admin_socket).expect("connect");
    raw.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    raw.write_all(&PREFACE[..10]).expect("write");
    raw.write_all(b"garbage garbage garbage").expect("write");
    let _ = raw.read_to_end(&mut Vec::new());
    s.server.ok(&["healthcheck"]);
    let log = s.server.log();
    assert!(
        log.contains("HTTP/2 connection refused") && log.contains("admin_api"),
        "{log}"
    );
}

/// The venv `.ci/run` creates with the pinned py-spiffe and grpcio.
fn python() -> Option<PathBuf> {
    let p = std::env::var_os("MESHID_PYTHON").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pyenv/bin/python"),
        PathBuf::from,
    );
    if p.exists() {
        return Some(p);
    }
    let why = format!(
        "no Python venv with py-spiffe at {} (created by .ci/run; or set MESHID_PYTHON)",
        p.display()
    );
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
    eprintln!("SKIPPED: {why}");
    None
}

#[test]
fn python_spiffe_library_works_unchanged() {
    let Some(python) = python() else { return };
    let s = setup();
    wait_served(&s);
    let out_dir = s.server.dir.path().join("py");
    std::fs::create_dir_all(&out_dir).expect("mkdir");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/spiffe_client.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(&out_dir)
        .arg("python-test")
        .env("SPIFFE_ENDPOINT_SOCKET", s.agent.endpoint())
        // gRPC C-core's transport trace shows the :authority it sends.
        .env("GRPC_TRACE", "http")
        .env("GRPC_VERBOSITY", "debug")
        .output()
        .expect("run python");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "py-spiffe failed: {}\n{}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        stderr.lines().rev().take(40).collect::<Vec<_>>().join("\n"),
        s.agent.log()
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
    eprintln!("py-spiffe summary: {r}");

    // The client sent the percent-encoded socket path, as C-core >= 1.57 does.
    let encoded = s
        .agent
        .socket
        .display()
        .to_string()
        .trim_start_matches('/')
        .replace('/', "%2F");
    assert!(
        stderr.contains(&format!(":authority: {encoded}")),
        "grpcio's trace shows :authority {encoded}"
    );
    let grpcio: Vec<u32> = r["grpcio"]
        .as_str()
        .expect("grpcio version")
        .split('.')
        .take(2)
        .map(|p| p.parse().expect("number"))
        .collect();
    assert!(grpcio >= vec![1, 57], "grpcio {:?}", r["grpcio"]);

    assert_eq!(r["x509_spiffe_id"], WORKLOAD_ID);
    assert_eq!(r["x509_svids"], 1);
    assert_eq!(r["key_matches_leaf"], true);
    assert_eq!(r["bundle_trust_domains"], serde_json::json!([TD]));
    assert_eq!(r["jwt_spiffe_id"], WORKLOAD_ID);
    assert_eq!(r["jwt_validated_by_agent"], WORKLOAD_ID);
    assert_eq!(r["jwt_validated_locally"], WORKLOAD_ID);
    assert_eq!(r["wrong_audience_refused"], true);

    // The SVID py-spiffe received verifies against the bundle it received.
    let v = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(out_dir.join("bundle.pem"))
        .arg(out_dir.join("svid.pem"))
        .output()
        .expect("openssl");
    assert!(
        v.status.success() && String::from_utf8_lossy(&v.stdout).contains(": OK"),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    let san = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(out_dir.join("svid.pem"))
        .output()
        .expect("openssl");
    assert!(String::from_utf8_lossy(&san.stdout).contains(&format!("URI:{WORKLOAD_ID}")));

    // The README's Python quick start, as written, does the same.
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README");
    let start = readme
        .find("```python\n")
        .expect("README has a Python snippet")
        + 10;
    let snippet = &readme[start..start + readme[start..].find("```").expect("closed")];
    let qs = s.server.dir.path().join("quickstart");
    std::fs::create_dir_all(&qs).expect("mkdir");
    std::fs::write(qs.join("app.py"), snippet).expect("write");
    let out = Command::new(&python)
        .arg("app.py")
        .current_dir(&qs)
        .env("SPIFFE_ENDPOINT_SOCKET", s.agent.endpoint())
        .output()
        .expect("run README snippet");
    assert!(
        out.status.success(),
        "README snippet: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = Command::new("openssl")
        .args(["verify", "-CAfile", "bundle.pem", "svid.pem"])
        .current_dir(&qs)
        .output()
        .expect("openssl");
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
}
