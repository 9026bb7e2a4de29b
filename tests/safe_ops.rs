//! Safe operations end to end through the real binaries: plans bound to the
//! store's state, approval by a second admin identity (the admin socket's
//! peer uid), blast-radius limits, undo reaching a workload's Workload API
//! stream, and the list of changes.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{AgentProc, Server, TD, agent_with_workloads, register_node};
use meshid_proto::workload::X509svidRequest;

/// The second admin identity: the server runs as this uid, the tests as root.
const NOBODY: u32 = 65534;

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Ids of every entry, by SPIFFE ID.
fn entry_id(server: &Server, name: &str) -> String {
    let list: serde_json::Value =
        serde_json::from_str(&server.ok(&["entry", "list", "--output", "json"])).expect("json");
    list.as_array()
        .expect("array")
        .iter()
        .find(|e| e["spiffe_id"] == format!("spiffe://{TD}/{name}"))
        .and_then(|e| e["id"].as_str())
        .expect("entry exists")
        .to_string()
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `applied as change <id>` → id.
fn change_id(applied: &str) -> String {
    applied
        .lines()
        .find_map(|l| l.strip_prefix("applied as change "))
        .expect("change id")
        .trim()
        .to_string()
}

fn changes(server: &Server) -> Vec<serde_json::Value> {
    serde_json::from_str::<serde_json::Value>(&server.ok(&["changes", "list", "--output", "json"]))
        .expect("json")
        .as_array()
        .expect("array")
        .clone()
}

#[test]
fn stale_plans_are_refused_and_wide_deletes_need_yes() {
    let server = Server::start("");
    register_node(&server, "n1", &["a", "b", "c", "d", "e"], None);
    let dir = server.dir.path();

    // A plan of one entry (1 of 5: within the limits) names what it deletes.
    let a = entry_id(&server, "a");
    let f1 = dir.join("a.plan");
    let shown = server.ok(&["entry", "delete", &a, "--plan", path(&f1)]);
    assert!(shown.contains(&a), "{shown}");
    assert!(shown.contains(&format!("spiffe://{TD}/a")), "{shown}");
    assert!(shown.contains("live SVIDs affected: 0"), "{shown}");
    assert!(!shown.contains("over the blast-radius limit"), "{shown}");
    assert!(f1.exists());
    assert_eq!(changes(&server).len(), 0, "a plan changes nothing");
    entry_id(&server, "a");

    // The entry changes after the plan: apply refuses and says what moved.
    server.ok(&["entry", "update", &a, "--hint", "moved"]);
    let out = server.cli(&["apply", path(&f1)]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains(&format!("entry {a} changed since the plan was made")),
        "{}",
        text(&out)
    );
    entry_id(&server, "a");

    // 2 of 5 entries (40% > 25%): shown as over the limit, refused without --yes.
    let (b, c) = (entry_id(&server, "b"), entry_id(&server, "c"));
    let f2 = dir.join("bc.plan");
    let shown = server.ok(&["entry", "delete", &b, &c, "--plan", path(&f2)]);
    assert!(shown.contains("over the blast-radius limit"), "{shown}");
    assert!(shown.contains("40%"), "{shown}");
    let out = server.cli(&["apply", path(&f2)]);
    assert!(!out.status.success());
    assert!(text(&out).contains("--yes"), "{}", text(&out));
    let applied = server.ok(&["apply", path(&f2), "--yes"]);
    let id = change_id(&applied);
    let left: serde_json::Value =
        serde_json::from_str(&server.ok(&["entry", "list", "--output", "json"])).expect("json");
    assert_eq!(left.as_array().expect("array").len(), 3);

    // Applied once only.
    let out = server.cli(&["apply", path(&f2), "--yes"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("applied already"), "{}", text(&out));

    // The change is listed with its counts and actor.
    let list = changes(&server);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["id"], id);
    assert_eq!(list[0]["kind"], "entry_delete");
    assert_eq!(list[0]["entries"], 2);
    assert_eq!(list[0]["actor"], "uid:0");
    assert_eq!(list[0]["undone"], false);
    let table = server.ok(&["changes", "list"]);
    assert!(
        table.contains(&id) && table.contains("entry_delete"),
        "{table}"
    );
}

#[test]
fn approval_must_come_from_another_admin_and_is_audited() {
    let server = Server::start_as(NOBODY, "[safe_ops]\nrequire_approval = true\n");
    register_node(&server, "n1", &["a", "b", "c", "d", "e"], None);
    let a = entry_id(&server, "a");
    let plan = server.dir.path().join("a.plan");
    let shown = server.ok(&["entry", "delete", &a, "--plan", path(&plan)]);
    assert!(shown.contains("approve"), "{shown}");

    // A direct delete would bypass the approval: refused (a dry run is not).
    let out = server.cli(&["entry", "delete", &a]);
    assert!(!out.status.success());
    assert!(text(&out).contains("require_approval"), "{}", text(&out));
    server.ok(&["entry", "delete", &a, "--dry-run"]);
    let out = server.cli_as(NOBODY, &["agent", "evict", "spiffe://example.org/x"]);
    assert!(text(&out).contains("require_approval"), "{}", text(&out));

    // Not approved yet: apply refuses.
    let out = server.cli(&["apply", path(&plan)]);
    assert!(!out.status.success());
    assert!(text(&out).contains("needs the approval"), "{}", text(&out));

    // The author (root) cannot approve its own plan.
    let out = server.cli(&["approve", path(&plan)]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("another admin identity"),
        "{}",
        text(&out)
    );

    // The server's own uid is another admin identity: accepted.
    let out = server.cli_as(NOBODY, &["approve", path(&plan)]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&format!("approved by uid:{NOBODY}")));

    let applied = server.ok(&["apply", path(&plan)]);
    let change = change_id(&applied);
    let audit = server.audit();
    let kinds: Vec<&str> = audit
        .iter()
        .filter_map(|r| r["event"].as_str().or_else(|| r["kind"].as_str()))
        .collect();
    let find = |what: &str| {
        audit
            .iter()
            .find(|r| r.to_string().contains(&format!("\"{what}\"")))
            .unwrap_or_else(|| panic!("no {what} in the audit log: {kinds:?}"))
            .clone()
    };
    let refused = find("plan_approval_refused");
    assert_eq!(refused["approver"], "uid:0", "{refused}");
    let approved = find("plan_approved");
    assert_eq!(approved["approver"], format!("uid:{NOBODY}"), "{approved}");
    assert_eq!(approved["author"], "uid:0", "{approved}");
    let applied = find("plan_applied");
    assert_eq!(applied["change"], change, "{applied}");
    assert!(
        audit
            .iter()
            .any(|r| r.to_string().contains("entry_deleted") && r.to_string().contains(&a)),
        "the deletion itself is audited as always"
    );
}

async fn svid_ids(
    stream: &mut tonic::Streaming<meshid_proto::workload::X509svidResponse>,
    want: usize,
) -> Vec<String> {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let m = stream.message().await.expect("msg").expect("some");
            if m.svids.len() == want {
                let mut ids: Vec<String> = m.svids.into_iter().map(|s| s.spiffe_id).collect();
                ids.sort();
                return ids;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no response with {want} SVIDs"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undo_restores_a_deleted_entry_to_its_workload() {
    let server = Server::start("");
    let agent: AgentProc = agent_with_workloads(&server, "n1", &["web", "db"], None);
    let mut client = meshid_agent::cli::connect(&agent.endpoint())
        .await
        .expect("connect");
    let mut req = tonic::Request::new(X509svidRequest {});
    req.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    let mut stream = client
        .fetch_x509svid(req)
        .await
        .expect("stream")
        .into_inner();
    let both = svid_ids(&mut stream, 2).await;
    assert_eq!(
        both,
        [format!("spiffe://{TD}/db"), format!("spiffe://{TD}/web")]
    );

    let db = entry_id(&server, "db");
    let before = server.ok(&["entry", "show", &db, "--output", "json"]);
    let plan = server.dir.path().join("db.plan");
    let shown = server.ok(&["entry", "delete", &db, "--plan", path(&plan)]);
    assert!(shown.contains("live SVIDs affected: 1"), "{shown}");
    assert!(
        shown.contains(&format!("spiffe://{TD}/node/n1")) || shown.contains("affected agents (1)"),
        "{shown}"
    );
    let id = change_id(&server.ok(&["apply", path(&plan), "--yes"]));
    assert_eq!(
        svid_ids(&mut stream, 1).await,
        [format!("spiffe://{TD}/web")]
    );

    let undone = server.ok(&["undo", &id]);
    assert!(undone.contains("restored 1 entries"), "{undone}");
    assert!(undone.contains(&db), "{undone}");
    assert_eq!(
        server.ok(&["entry", "show", &db, "--output", "json"]),
        before,
        "restored exactly: same id, selectors, TTLs, parent"
    );
    assert_eq!(svid_ids(&mut stream, 2).await, both);

    let list = changes(&server);
    assert_eq!(list[0]["id"], id);
    assert_eq!(list[0]["undone"], true);
    let out = server.cli(&["undo", &id]);
    assert!(!out.status.success());
    assert!(text(&out).contains("undone already"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evictions_are_undone_and_bans_are_not() {
    let server = Server::start("");
    let _agent = agent_with_workloads(&server, "n1", &["web"], None);
    let agents = server.ok(&["agent", "list", "--output", "json"]);
    let list: serde_json::Value = serde_json::from_str(&agents).expect("json");
    let agent_id = list[0]["spiffe_id"].as_str().expect("agent").to_string();
    let web = entry_id(&server, "web");

    let plan = server.dir.path().join("evict.plan");
    let shown = server.ok(&["agent", "evict", &agent_id, "--plan", path(&plan)]);
    assert!(shown.contains(&web), "affected entry listed: {shown}");
    assert!(
        shown.contains("over the blast-radius limit"),
        "1 of 1 agents: {shown}"
    );
    let id = change_id(&server.ok(&["apply", path(&plan), "--yes"]));
    let gone: serde_json::Value =
        serde_json::from_str(&server.ok(&["agent", "list", "--output", "json"])).expect("json");
    assert_eq!(gone.as_array().expect("array").len(), 0);
    server.ok(&["undo", &id]);
    assert_eq!(
        server.ok(&["agent", "list", "--output", "json"]),
        agents,
        "the agent row is back as it was"
    );

    let plan = server.dir.path().join("ban.plan");
    server.ok(&["agent", "ban", &agent_id, "--plan", path(&plan)]);
    let id = change_id(&server.ok(&["apply", path(&plan), "--yes"]));
    let out = server.cli(&["undo", &id]);
    assert!(!out.status.success());
    assert!(text(&out).contains("cannot be undone"), "{}", text(&out));
    let kinds: Vec<String> = changes(&server)
        .iter()
        .map(|c| c["kind"].as_str().expect("kind").to_string())
        .collect();
    assert_eq!(kinds, ["agent_ban", "agent_evict"]);
}

#[test]
fn plans_expire_after_plan_ttl() {
    let server = Server::start("[safe_ops]\nplan_ttl = \"1s\"\n");
    register_node(&server, "n1", &["a"], None);
    let a = entry_id(&server, "a");
    let plan = server.dir.path().join("a.plan");
    server.ok(&["entry", "delete", &a, "--plan", path(&plan)]);
    // Expiry is wall-clock time in whole seconds: nothing to wait on but it.
    std::thread::sleep(Duration::from_millis(2100));
    let out = server.cli(&["apply", path(&plan), "--yes"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("expired"), "{}", text(&out));
    entry_id(&server, "a");
}
