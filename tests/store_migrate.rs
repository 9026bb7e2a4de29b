//! `meshid server store migrate`, through the real binary: a server on SQLite
//! with an attested agent, entries, a federated bundle and an unused token is
//! moved to PostgreSQL; the server then runs on PostgreSQL with the same data
//! directory and the agent keeps its identity.

mod common;

use std::collections::BTreeMap;
use std::process::Output;
use std::time::Duration;

use common::postgres as pg;
use common::{AgentProc, Server, TD, free_port, meshid, write_server_config};
use spiffe::WorkloadApiClient;

fn migrate(args: &[&str]) -> Output {
    meshid()
        .args(["server", "store", "migrate"])
        .args(args)
        .output()
        .expect("run migrate")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `table -> rows` from the report migrate prints.
fn reported_rows(out: &str) -> BTreeMap<String, u64> {
    out.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (t, n, sum) = (f.next()?, f.next()?, f.next()?);
            (sum.len() == 64).then(|| Some((t.to_string(), n.parse().ok()?)))?
        })
        .collect()
}

const TABLES: [&str; 12] = [
    "entries",
    "agents",
    "bundles",
    "join_tokens",
    "ca_journal",
    "issued_certs",
    "audit_seals",
    "revoked_certs",
    "plans",
    "plan_approvals",
    "changes",
    "recycle",
];

fn target_rows(srv: &pg::PgServer, db: &str) -> BTreeMap<String, u64> {
    TABLES
        .iter()
        .map(|t| {
            let n = srv.psql(db, &format!("SELECT count(*) FROM {t}"));
            (t.to_string(), n.parse().expect("count"))
        })
        .collect()
}

async fn wait_svids(agent: &AgentProc, n: usize) -> Vec<spiffe::X509Svid> {
    let client = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .expect("spiffe client");
    let got = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Ok(v) = client.fetch_all_x509_svids().await
                && v.len() == n
            {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    got.unwrap_or_else(|_| panic!("{n} SVIDs not served; agent log:\n{}", agent.log()))
}

fn serial_hex(svid: &spiffe::X509Svid) -> String {
    meshid_identity::svid::SvidInfo::from_der(svid.leaf().as_ref())
        .expect("leaf")
        .serial
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_moves_to_postgres() {
    let Some(url) = pg::database("migrate") else {
        return;
    };
    let srv = pg::server().expect("server");
    let db = pg::db_name(&url).to_string();

    // A populated SQLite server: an attested agent with SVIDs minted for two
    // entries, a third entry, an unused token, a federated bundle.
    let port = free_port();
    let bind = format!("bind_address = \"127.0.0.1:{port}\"");
    let mut server = Server::start(&bind);
    let alias = format!("spiffe://{TD}/node/m1");
    let token = server.ok(&["token", "create", "--spiffe-id", &alias]);
    server.ok(&["token", "create"]);
    let uid = format!("unix:uid:{}", nix::unistd::geteuid().as_raw());
    for name in ["web", "api"] {
        server.ok(&[
            "entry",
            "create",
            "--parent-id",
            &alias,
            "--spiffe-id",
            &format!("spiffe://{TD}/{name}"),
            "--selector",
            &uid,
        ]);
    }
    server.ok(&[
        "entry",
        "create",
        "--parent-id",
        &format!("spiffe://{TD}/node/other"),
        "--spiffe-id",
        &format!("spiffe://{TD}/batch"),
        "--selector",
        "unix:uid:4242",
    ]);
    let fed = rcgen::KeyPair::generate().expect("key");
    let mut fp = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    fp.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    fp.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let partner = server.dir.path().join("partner.pem");
    std::fs::write(&partner, fp.self_signed(&fed).expect("ca").pem()).expect("write");
    server.ok(&[
        "bundle",
        "set",
        "--trust-domain",
        "partner.org",
        "--path",
        partner.to_str().expect("utf-8"),
    ]);
    let agent_dir = server.dir.path().join("agent");
    let mut agent = AgentProc::start(&agent_dir, &server, Some(&token));
    let before = wait_svids(&agent, 2).await;
    let entries_before = server.ok(&["entry", "list", "--output", "json"]);
    let agents_before = server.ok(&["agent", "list", "--output", "json"]);
    let bundle_before = server.bundle_pem();
    // A plan made on SQLite is applied on PostgreSQL after the copy.
    let plan = server.dir.path().join("partner.plan");
    server.ok(&[
        "bundle",
        "delete",
        "--trust-domain",
        "partner.org",
        "--plan",
        plan.to_str().expect("utf-8"),
    ]);
    agent.stop();
    server.stop();

    let sqlite = server.dir.path().join("data/meshid.db");
    let from = sqlite.to_str().expect("utf-8");
    let tables_in_target = "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'".to_string();

    // A dry run copies and verifies, then writes nothing, not even the schema.
    let dry = migrate(&["--from", from, "--to", &url, "--dry-run"]);
    assert!(dry.status.success(), "dry run: {}", text(&dry));
    assert!(text(&dry).contains("nothing was written"), "{}", text(&dry));
    assert_eq!(srv.psql(&db, &tables_in_target), "0");
    let dry_rows = reported_rows(&text(&dry));

    // The copy: what it reports is what the target holds.
    let out = migrate(&["--from", from, "--to", &url]);
    assert!(out.status.success(), "migrate: {}", text(&out));
    let rows = reported_rows(&text(&out));
    assert_eq!(rows, dry_rows);
    assert_eq!(rows, target_rows(srv, &db), "{}", text(&out));
    assert_eq!(rows["entries"], 3);
    assert_eq!(rows["agents"], 1);
    assert_eq!(rows["bundles"], 2);
    assert_eq!(rows["join_tokens"], 1, "the unused token");
    assert_eq!(rows["plans"], 1, "the saved plan");
    assert!(rows["ca_journal"] >= 2, "X.509 CA and JWT key");
    assert!(
        rows["issued_certs"] >= 3,
        "agent SVID and two workload SVIDs"
    );

    // A non-empty target is refused, with or without --dry-run, and untouched.
    for extra in [&[][..], &["--dry-run"][..]] {
        let again = migrate(&[&["--from", from, "--to", &url][..], extra].concat());
        assert!(!again.status.success(), "non-empty target accepted");
        assert!(text(&again).contains("not empty"), "{}", text(&again));
    }
    assert_eq!(target_rows(srv, &db), rows);
    // --force replaces the contents: still an exact copy.
    let forced = migrate(&["--from", from, "--to", &url, "--force"]);
    assert!(forced.status.success(), "force: {}", text(&forced));
    assert_eq!(target_rows(srv, &db), rows);

    // The same server (same data_dir, so the same CA) now on PostgreSQL.
    write_server_config(
        server.dir.path(),
        &format!("{bind}\n[store]\nkind = \"postgres\"\nurl = \"{url}\"\npool_size = 4"),
    );
    server.restart();
    assert_eq!(
        server.ok(&["entry", "list", "--output", "json"]),
        entries_before
    );
    assert_eq!(
        server.ok(&["agent", "list", "--output", "json"]),
        agents_before
    );
    assert_eq!(server.bundle_pem(), bundle_before);

    // The agent comes back with its persisted identity (no token) and is
    // served fresh SVIDs, journaled in PostgreSQL.
    agent.restart();
    let after = wait_svids(&agent, 2).await;
    let ids = |v: &[spiffe::X509Svid]| {
        let mut ids: Vec<String> = v.iter().map(|s| s.spiffe_id().to_string()).collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(&after), ids(&before));
    let applied = server.ok(&["apply", plan.to_str().expect("utf-8"), "--yes"]);
    let change = applied
        .lines()
        .find_map(|l| l.strip_prefix("applied as change "))
        .expect("change id")
        .to_string();
    assert_eq!(
        srv.psql(&db, "SELECT count(*) FROM bundles WHERE federated"),
        "0"
    );
    server.ok(&["undo", &change]);
    assert_eq!(
        srv.psql(&db, "SELECT count(*) FROM bundles WHERE federated"),
        "1",
        "undo restores the bundle in PostgreSQL"
    );
    for s in &after {
        let serial = serial_hex(s);
        assert_eq!(
            srv.psql(
                &db,
                &format!("SELECT count(*) FROM issued_certs WHERE serial = '{serial}'")
            ),
            "1",
            "SVID {serial} journaled in PostgreSQL"
        );
    }
    assert!(
        !server.log().contains("ERROR"),
        "server log:\n{}",
        server.log()
    );
}

#[test]
fn migrate_refuses_a_missing_source_and_a_bad_url() {
    let dir = tempfile::tempdir().expect("tmp");
    let missing = dir.path().join("none.db");
    let out = migrate(&[
        "--from",
        missing.to_str().expect("utf-8"),
        "--to",
        "postgres://127.0.0.1:1/x",
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("does not exist"), "{}", text(&out));
    assert!(!missing.exists(), "the source is never created");
    let out = migrate(&["--from", "/dev/null", "--to", "mysql://x/y"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("not a PostgreSQL URL"),
        "{}",
        text(&out)
    );
}
