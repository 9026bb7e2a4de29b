//! One store test suite, run against both backends: every `suite!` test is a
//! generic body over `Arc<dyn Store>` called once on SQLite (`<name>::sqlite`)
//! and once on PostgreSQL (`<name>::postgres`, a real server started by
//! tests/common/postgres.rs). The PostgreSQL-only tests at the end cover what
//! only a shared database has: changes crossing between stores, a listener
//! losing its connection, TLS.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshid_proto::types::{Authority, Bundle, Entry, Selector};
use meshid_server::store::prelude::*;
use meshid_server::store::{
    AgentRecord, EntryFilter, IssuedRecord, IssuedSummary, JoinTokenRecord, PostgresOptions,
    PostgresStore, RevokedCert, SqliteStore, SslMode, Store, StoreError,
};

#[path = "../../tests/common/postgres.rs"]
mod pg;
#[path = "store/safe_ops.rs"]
mod safe_ops;
use safe_ops::safe_ops_plans_changes_recycle;

/// A database both store instances of a test can open.
enum Db {
    Sqlite(tempfile::TempDir),
    Postgres(String),
}

impl Db {
    fn sqlite() -> Self {
        Self::Sqlite(tempfile::tempdir().expect("tempdir"))
    }

    fn postgres() -> Option<Self> {
        pg::database("store").map(Self::Postgres)
    }

    /// Opens a store instance (each with its own connection pool).
    async fn open(&self) -> Arc<dyn Store> {
        match self {
            Self::Sqlite(dir) => Arc::new(
                SqliteStore::open(&dir.path().join("meshid.db"))
                    .await
                    .expect("open sqlite"),
            ),
            Self::Postgres(url) => Arc::new(
                PostgresStore::connect(&PostgresOptions::new(url.clone()))
                    .await
                    .expect("open postgres"),
            ),
        }
    }
}

/// `mod name { sqlite, postgres }` calling the generic body `name(Db)`.
macro_rules! suite {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                super::$name(super::Db::sqlite()).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                if let Some(db) = super::Db::postgres() {
                    super::$name(db).await;
                }
            }
        }
    )*};
}

suite!(
    safe_ops_plans_changes_recycle,
    entries_crud_filters_and_order,
    entry_update_is_optimistic,
    delete_is_all_or_nothing,
    join_tokens_are_single_use,
    agents_round_trip,
    bundles_own_and_federated,
    ca_journal,
    authority_transitions_are_all_or_nothing,
    issuance_journal_and_live_certificates,
    changes_are_published,
    join_token_race_consumed_once,
    racing_entry_updates_never_lose_a_write,
    racing_identical_creates_make_one_entry,
    racing_authority_transitions_apply_once,
    racing_ban_and_renewal_ban_always_holds,
    racing_evict_and_renewal_stays_evicted,
    racing_ban_and_reattestation_ban_always_holds,
    revocations_listed_until_not_after,
    expired_certificates_are_pruned,
);

fn sel(t: &str, v: &str) -> Selector {
    Selector {
        r#type: t.into(),
        value: v.into(),
    }
}

fn entry(id: &str, spiffe_id: &str, parent: &str, uid: &str) -> Entry {
    Entry {
        id: id.into(),
        spiffe_id: spiffe_id.into(),
        parent_id: parent.into(),
        selectors: vec![sel("unix", &format!("uid:{uid}")), sel("unix", "gid:0")],
        revision: 1,
        created_at: 1_700_000_000,
        dns_names: vec!["w.example.org".into()],
        ..Entry::default()
    }
}

fn agent(id: &str, serial: &str) -> AgentRecord {
    AgentRecord {
        spiffe_id: id.into(),
        attestor: "join_token".into(),
        serial: serial.into(),
        prev_serial: String::new(),
        expires_at: 1_800_000_000,
        banned: false,
        aliases: vec!["spiffe://td/alias/a".into(), "spiffe://td/alias/b".into()],
        attested_at: 1_700_000_000,
    }
}

fn token(hash: &str) -> JoinTokenRecord {
    JoinTokenRecord {
        token_hash: hash.into(),
        token_id: format!("id-{hash}"),
        alias_id: "spiffe://td/alias".into(),
        expires_at: 1_800_000_000,
        created_at: 1_700_000_000,
    }
}

fn ids(v: &[Entry]) -> Vec<&str> {
    v.iter().map(|e| e.id.as_str()).collect()
}

async fn entries_crud_filters_and_order(db: Db) {
    let s = db.open().await;
    // Same second, ids not in creation order: listings keep insertion order.
    for (id, uid) in [("m", "1"), ("c", "2"), ("x", "3"), ("a", "4")] {
        s.create_entry(&entry(id, "spiffe://td/w", "spiffe://td/agent", uid))
            .await
            .expect("create");
    }
    s.create_entry(&entry("z", "spiffe://td/other", "spiffe://td/agent2", "1"))
        .await
        .expect("create");
    let dup = s
        .create_entry(&entry("b", "spiffe://td/w", "spiffe://td/agent", "1"))
        .await;
    assert!(
        matches!(&dup, Err(StoreError::AlreadyExists(m)) if m.contains("entry m")),
        "{dup:?}"
    );
    // The same selectors in another order are the same set.
    let mut reordered = entry("b", "spiffe://td/w", "spiffe://td/agent", "1");
    reordered.selectors.reverse();
    assert!(matches!(
        s.create_entry(&reordered).await,
        Err(StoreError::AlreadyExists(_))
    ));
    // An existing id is refused too.
    assert!(
        s.create_entry(&entry("m", "spiffe://td/new", "spiffe://td/agent", "9"))
            .await
            .is_err()
    );

    let all = s.list_entries(&EntryFilter::default()).await.expect("list");
    assert_eq!(ids(&all), ["m", "c", "x", "a", "z"]);
    assert_eq!(
        all[0],
        entry("m", "spiffe://td/w", "spiffe://td/agent", "1")
    );
    assert_eq!(s.count_entries().await.expect("count"), 5);

    let by_parent = EntryFilter {
        parent_id: Some("spiffe://td/agent2".into()),
        ..EntryFilter::default()
    };
    assert_eq!(ids(&s.list_entries(&by_parent).await.expect("l")), ["z"]);
    let by_id_and_sel = EntryFilter {
        spiffe_id: Some("spiffe://td/w".into()),
        selectors: vec![sel("unix", "uid:3")],
        ..EntryFilter::default()
    };
    assert_eq!(
        ids(&s.list_entries(&by_id_and_sel).await.expect("l")),
        ["x"]
    );
    let nothing = EntryFilter {
        parent_id: Some("spiffe://td/agent2".into()),
        spiffe_id: Some("spiffe://td/w".into()),
        ..EntryFilter::default()
    };
    assert!(s.list_entries(&nothing).await.expect("l").is_empty());

    let by_parents = s
        .list_entries_by_parents(&["spiffe://td/agent".into(), "spiffe://td/agent2".into()])
        .await
        .expect("by parents");
    assert_eq!(ids(&by_parents), ["m", "c", "x", "a", "z"]);
    assert!(
        s.list_entries_by_parents(&[])
            .await
            .expect("none")
            .is_empty()
    );

    let got = s
        .get_entries(&["a".into(), "nope".into(), "m".into()])
        .await
        .expect("get");
    let mut got = ids(&got);
    got.sort();
    assert_eq!(got, ["a", "m"]);
    assert!(s.get_entry("nope").await.expect("get").is_none());
    assert_eq!(
        s.get_entry("z").await.expect("get").expect("z").spiffe_id,
        "spiffe://td/other"
    );
}

async fn entry_update_is_optimistic(db: Db) {
    let s = db.open().await;
    s.create_entry(&entry("e", "spiffe://td/w", "spiffe://td/agent", "1"))
        .await
        .expect("create");
    let mut e = s.get_entry("e").await.expect("get").expect("e");
    e.revision = 2;
    e.parent_id = "spiffe://td/agent2".into();
    s.update_entry(&e, 1).await.expect("update");
    assert_eq!(s.get_entry("e").await.expect("get"), Some(e.clone()));
    // The parent column follows the update.
    assert_eq!(
        ids(&s
            .list_entries_by_parents(&["spiffe://td/agent2".into()])
            .await
            .expect("l")),
        ["e"]
    );
    // A writer that read revision 1 gets Conflict and changes nothing.
    let mut stale = e.clone();
    stale.revision = 2;
    stale.hint = "stale".into();
    assert!(matches!(
        s.update_entry(&stale, 1).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(s.get_entry("e").await.expect("get"), Some(e));
    let mut missing = entry("gone", "spiffe://td/w", "spiffe://td/agent", "1");
    missing.revision = 2;
    assert!(matches!(
        s.update_entry(&missing, 1).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn delete_is_all_or_nothing(db: Db) {
    let s = db.open().await;
    for (id, uid) in [("a", "1"), ("b", "2"), ("c", "3")] {
        s.create_entry(&entry(id, "spiffe://td/w", "spiffe://td/agent", uid))
            .await
            .expect("create");
    }
    let r = s.delete_entries(&["a".into(), "zzz".into()]).await;
    assert!(
        matches!(&r, Err(StoreError::NotFound(m)) if m.contains("zzz")),
        "{r:?}"
    );
    assert_eq!(s.count_entries().await.expect("n"), 3);
    // Naming one id twice deletes nothing either.
    assert!(matches!(
        s.delete_entries(&["a".into(), "a".into()]).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(s.count_entries().await.expect("n"), 3);
    s.delete_entries(&["a".into(), "c".into()])
        .await
        .expect("delete");
    assert_eq!(
        ids(&s.list_entries(&EntryFilter::default()).await.expect("l")),
        ["b"]
    );
    s.delete_entries(&[]).await.expect("empty delete");
}

async fn join_tokens_are_single_use(db: Db) {
    let s = db.open().await;
    s.create_join_token(&token("h1")).await.expect("create");
    s.create_join_token(&token("h2")).await.expect("create");
    assert!(
        s.create_join_token(&token("h1")).await.is_err(),
        "duplicate hash"
    );
    assert_eq!(
        s.consume_join_token("h1").await.expect("consume"),
        Some(token("h1"))
    );
    assert_eq!(s.consume_join_token("h1").await.expect("again"), None);
    assert_eq!(
        s.consume_join_token("unknown").await.expect("unknown"),
        None
    );
    // Another instance on the same database sees the consumption.
    let other = db.open().await;
    assert_eq!(other.consume_join_token("h1").await.expect("other"), None);
    assert_eq!(
        other.consume_join_token("h2").await.expect("other"),
        Some(token("h2"))
    );
}

async fn agents_round_trip(db: Db) {
    let s = db.open().await;
    let mut a = agent("spiffe://td/meshid/agent/join_token/1", "01");
    s.attest_agent(&a).await.expect("insert");
    let mut b = agent("spiffe://td/meshid/agent/join_token/2", "02");
    b.aliases.clear();
    b.attested_at += 10;
    s.attest_agent(&b).await.expect("insert");
    assert_eq!(
        s.get_agent(&a.spiffe_id).await.expect("get"),
        Some(a.clone())
    );
    a.prev_serial = "01".into();
    a.serial = "03".into();
    a.expires_at += 60;
    assert_eq!(
        s.renew_agent(&a.spiffe_id, "01", "03", a.expires_at)
            .await
            .expect("renew"),
        a
    );
    // A renewal from a serial that is no longer current changes nothing.
    assert!(matches!(
        s.renew_agent(&a.spiffe_id, "01", "04", 1).await,
        Err(StoreError::Conflict(_))
    ));
    a.banned = true;
    assert_eq!(s.ban_agent(&a.spiffe_id).await.expect("ban"), a);
    assert_eq!(
        s.get_agent(&a.spiffe_id).await.expect("get"),
        Some(a.clone())
    );
    // A banned agent neither renews nor attests again.
    assert!(matches!(
        s.renew_agent(&a.spiffe_id, "03", "05", 1).await,
        Err(StoreError::Banned(_))
    ));
    let mut again = agent(&a.spiffe_id, "06");
    again.aliases.clear();
    assert!(matches!(
        s.attest_agent(&again).await,
        Err(StoreError::Banned(_))
    ));
    assert_eq!(
        s.get_agent(&a.spiffe_id).await.expect("get"),
        Some(a.clone())
    );
    assert!(matches!(
        s.ban_agent("spiffe://td/none").await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        s.list_agents().await.expect("list"),
        vec![a.clone(), b.clone()]
    );
    s.delete_agent(&a.spiffe_id).await.expect("delete");
    assert!(matches!(
        s.delete_agent(&a.spiffe_id).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(s.list_agents().await.expect("list"), vec![b]);
    assert_eq!(s.get_agent("spiffe://td/none").await.expect("get"), None);
}

fn bundle(td: &str, seq: i64) -> Bundle {
    Bundle {
        trust_domain: td.into(),
        x509_authorities: vec![vec![1, 2, 3], vec![4, 5]],
        sequence_number: seq,
        refresh_hint: 300,
        ..Bundle::default()
    }
}

async fn bundles_own_and_federated(db: Db) {
    let s = db.open().await;
    s.put_bundle(&bundle("td", 1), false).await.expect("own");
    s.put_bundle(&bundle("zeta.org", 1), true)
        .await
        .expect("fed");
    s.put_bundle(&bundle("alpha.org", 1), true)
        .await
        .expect("fed");
    s.put_bundle(&bundle("td", 2), false).await.expect("own");
    assert_eq!(
        s.get_bundle("td").await.expect("get"),
        Some(bundle("td", 2))
    );
    assert_eq!(s.get_bundle("none").await.expect("get"), None);
    assert_eq!(
        s.list_federated_bundles().await.expect("list"),
        vec![bundle("alpha.org", 1), bundle("zeta.org", 1)]
    );
    // The own bundle is not federated and cannot be deleted as one.
    assert!(matches!(
        s.delete_bundle("td").await,
        Err(StoreError::NotFound(_))
    ));
    s.delete_bundle("zeta.org").await.expect("delete");
    assert!(matches!(
        s.delete_bundle("zeta.org").await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        s.list_federated_bundles().await.expect("list"),
        vec![bundle("alpha.org", 1)]
    );
}

fn issued(serial: &str) -> IssuedRecord {
    IssuedRecord {
        serial: serial.into(),
        spiffe_id: "spiffe://td/w".into(),
        entry_id: "e1".into(),
        agent_id: "spiffe://td/meshid/agent/x".into(),
        not_after: 1_800_000_000,
        issued_at: 1_700_000_000,
        ca_id: "c1".into(),
    }
}

fn authority(id: &str, kind: &str, owner: &str) -> Authority {
    Authority {
        id: id.into(),
        kind: kind.into(),
        owner: owner.into(),
        state: "prepared".into(),
        chain: vec![vec![0x30, 1, 2]],
        roots: vec![vec![0x30, 3]],
        not_before: 1_700_000_000,
        not_after: 1_800_000_000,
        prepared_at: 1_700_000_000,
        origin: "self_signed".into(),
        revision: 1,
        serial: format!("{id}-serial"),
        ..Authority::default()
    }
}

async fn ca_journal(db: Db) {
    let s = db.open().await;
    let a1 = authority("a1", "x509", "server-1");
    let a2 = authority("a2", "x509", "server-2");
    let j1 = authority("j1", "jwt", "server-1");
    for a in [&a1, &a2, &j1] {
        s.insert_authority(a).await.expect("insert");
    }
    assert!(matches!(
        s.insert_authority(&a1).await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert_eq!(
        s.list_authorities().await.expect("list"),
        vec![a1.clone(), a2.clone(), j1.clone()],
        "insertion order"
    );
    let mut active = a1.clone();
    active.state = "active".into();
    active.activated_at = 1_750_000_000;
    active.revision = 2;
    s.update_authority(&active, 1).await.expect("activate");
    // A transition from a revision that is no longer current is refused.
    let mut stale = a1.clone();
    stale.state = "retired".into();
    stale.revision = 2;
    assert!(matches!(
        s.update_authority(&stale, 1).await,
        Err(StoreError::Conflict(_))
    ));
    let mut missing = authority("nope", "x509", "server-1");
    missing.revision = 2;
    assert!(matches!(
        s.update_authority(&missing, 1).await,
        Err(StoreError::Conflict(_))
    ));
    // Another instance (another server) sees the journal as it is.
    let other = db.open().await;
    assert_eq!(
        other.list_authorities().await.expect("list"),
        vec![active, a2, j1]
    );
}

/// The retirement of one authority and the activation of the next are one
/// write: a conflict on either leaves both as they were.
async fn authority_transitions_are_all_or_nothing(db: Db) {
    let s = db.open().await;
    let mut old = authority("old", "x509", "server-1");
    old.state = "active".into();
    let new = authority("new", "x509", "server-1");
    for a in [&old, &new] {
        s.insert_authority(a).await.expect("insert");
    }
    let moved = |a: &Authority, state: &str| {
        let mut m = a.clone();
        m.state = state.into();
        m.revision += 1;
        m
    };
    // The second change names a revision the store no longer holds: nothing
    // is applied, not even the first.
    let refused = s
        .update_authorities(&[(moved(&old, "retired"), 1), (moved(&new, "active"), 7)])
        .await;
    assert!(
        matches!(refused, Err(StoreError::Conflict(_))),
        "{refused:?}"
    );
    assert_eq!(
        s.list_authorities().await.expect("list"),
        vec![old.clone(), new.clone()]
    );
    // Both at once.
    s.update_authorities(&[(moved(&old, "retired"), 1), (moved(&new, "active"), 1)])
        .await
        .expect("transition");
    let states: Vec<(String, String)> = db
        .open()
        .await
        .list_authorities()
        .await
        .expect("list")
        .into_iter()
        .map(|a| (a.id, a.state))
        .collect();
    assert_eq!(
        states,
        vec![
            ("old".to_string(), "retired".to_string()),
            ("new".to_string(), "active".to_string())
        ]
    );
}

fn cert(serial: &str, agent: &str, entry: &str, ca: &str, not_after: i64) -> IssuedRecord {
    IssuedRecord {
        serial: serial.into(),
        spiffe_id: format!("spiffe://td/{entry}"),
        entry_id: entry.into(),
        agent_id: agent.into(),
        not_after,
        issued_at: 10,
        ca_id: ca.into(),
    }
}

async fn issuance_journal_and_live_certificates(db: Db) {
    let s = db.open().await;
    // Slot (A, e1): 01 renewed by 02. Slot (A, e2): 03 expired. Slot (B, e1):
    // 04 by c2. Slot (A, e3): 05 by c1 renewed by 06 from c2. An agent SVID
    // with no authority recorded.
    s.record_issued(&[
        cert("01", "A", "e1", "c1", 100),
        cert("03", "A", "e2", "c1", 50),
    ])
    .await
    .expect("batch 1");
    s.record_issued(&[
        cert("02", "A", "e1", "c1", 200),
        cert("04", "B", "e1", "c2", 300),
        cert("05", "A", "e3", "c1", 150),
    ])
    .await
    .expect("batch 2");
    s.record_issued(&[
        cert("06", "A", "e3", "c2", 250),
        cert("07", "A", "", "", 400),
    ])
    .await
    .expect("batch 3");
    s.record_issued(&[]).await.expect("empty batch");
    let now = 60;
    let serials = |v: Vec<IssuedRecord>| v.into_iter().map(|c| c.serial).collect::<Vec<_>>();
    assert_eq!(
        serials(s.live_issued_by("c1", now, 100).await.expect("c1")),
        ["02"]
    );
    assert_eq!(
        serials(s.live_issued_by("c2", now, 100).await.expect("c2")),
        ["04", "06"]
    );
    assert_eq!(
        serials(s.live_issued_by("c2", now, 1).await.expect("limit")),
        ["04"]
    );
    assert_eq!(
        serials(s.live_issued_by("c1", 250, 100).await.expect("later")),
        Vec::<String>::new()
    );
    let mut summary = s.issued_summary(now).await.expect("summary");
    summary.sort_by(|a, b| a.ca_id.cmp(&b.ca_id));
    assert_eq!(
        summary,
        vec![
            IssuedSummary {
                ca_id: "c1".into(),
                live: 1,
                last_not_after: 200,
            },
            IssuedSummary {
                ca_id: "c2".into(),
                live: 2,
                last_not_after: 300,
            },
        ]
    );
    assert_eq!(
        s.get_issued("06").await.expect("get"),
        Some(cert("06", "A", "e3", "c2", 250))
    );
    assert_eq!(s.get_issued("ff").await.expect("get"), None);

    let batch: Vec<_> = (0..1200).map(|i| issued(&format!("b{i:04x}"))).collect();
    s.record_issued(&batch).await.expect("large batch");
    assert_eq!(
        s.get_issued("b04af").await.expect("get"),
        Some(issued("b04af"))
    );
    // A batch with a duplicate serial is refused whole.
    assert!(
        s.record_issued(&[issued("new1"), issued("b0001")])
            .await
            .is_err()
    );
    assert_eq!(s.get_issued("new1").await.expect("get"), None);
}

/// Waits until the subscription shows a revision above `after`.
async fn next_change(rx: &mut tokio::sync::watch::Receiver<u64>, after: u64) -> u64 {
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|v| *v > after))
        .await
        .expect("change within 10 s")
        .map(|v| *v)
        .expect("subscription open")
}

async fn changes_are_published(db: Db) {
    let s = db.open().await;
    let mut rx = s.subscribe_changes();
    let mut rev = *rx.borrow_and_update();
    let e = entry("e", "spiffe://td/w", "spiffe://td/agent", "1");
    s.create_entry(&e).await.expect("create");
    rev = next_change(&mut rx, rev).await;
    let mut e2 = e.clone();
    e2.revision = 2;
    s.update_entry(&e2, 1).await.expect("update");
    rev = next_change(&mut rx, rev).await;
    let a = agent("spiffe://td/meshid/agent/1", "01");
    s.attest_agent(&a).await.expect("new agent");
    rev = next_change(&mut rx, rev).await;
    s.put_bundle(&bundle("fed.org", 1), true).await.expect("b");
    rev = next_change(&mut rx, rev).await;
    let mut ca = authority("c1", "x509", "server-1");
    s.insert_authority(&ca).await.expect("authority");
    rev = next_change(&mut rx, rev).await;
    ca.state = "active".into();
    ca.revision = 2;
    s.update_authority(&ca, 1).await.expect("activate");
    rev = next_change(&mut rx, rev).await;

    // Not changes agents see: a renewal, the same bundle again, tokens, the
    // journal, a refused update.
    s.renew_agent(&a.spiffe_id, "01", "02", a.expires_at + 60)
        .await
        .expect("renewal");
    s.put_bundle(&bundle("fed.org", 1), true)
        .await
        .expect("same");
    s.create_join_token(&token("t")).await.expect("token");
    s.consume_join_token("t").await.expect("consume");
    s.record_issued(&[issued("01")]).await.expect("journal");
    assert!(s.update_entry(&e2, 1).await.is_err());
    assert!(s.update_authority(&ca, 1).await.is_err());
    // A visible change after them: exactly one step if nothing above counted.
    s.ban_agent(&a.spiffe_id).await.expect("ban");
    let after_ban = next_change(&mut rx, rev).await;
    assert_eq!(
        after_ban,
        rev + 1,
        "only the ban counted since the bundle change"
    );
    rev = after_ban;
    s.delete_entries(&["e".into()]).await.expect("delete");
    rev = next_change(&mut rx, rev).await;
    s.delete_bundle("fed.org").await.expect("delete bundle");
    rev = next_change(&mut rx, rev).await;
    s.delete_agent(&a.spiffe_id).await.expect("evict");
    next_change(&mut rx, rev).await;
}

/// Of many concurrent attempts, through two store instances (two connection
/// pools, as two servers would have), exactly one consumes each token.
async fn join_token_race_consumed_once(db: Db) {
    let a = db.open().await;
    let b = db.open().await;
    const TOKENS: usize = 20;
    const RACERS: usize = 16;
    for t in 0..TOKENS {
        a.create_join_token(&token(&format!("race-{t}")))
            .await
            .expect("create");
    }
    for t in 0..TOKENS {
        let hash = format!("race-{t}");
        let start = Arc::new(tokio::sync::Barrier::new(RACERS));
        let tasks: Vec<_> = (0..RACERS)
            .map(|i| {
                let s = if i % 2 == 0 { a.clone() } else { b.clone() };
                let (hash, start) = (hash.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    s.consume_join_token(&hash).await
                })
            })
            .collect();
        let mut winners = 0;
        for t in tasks {
            if let Some(rec) = t.await.expect("task").expect("consume") {
                assert_eq!(rec, token(&hash));
                winners += 1;
            }
        }
        assert_eq!(winners, 1, "token {hash} consumed {winners} times");
    }
}

/// Two kinds of racing admins on one entry, through two store instances.
///
/// 1. Blind writers that all read revision 1 and write revision 2: exactly
///    one wins, the rest get `Conflict` and the stored entry is the winner's.
///    Which one wins is the first to commit; everyone else's
///    `UPDATE … WHERE revision = 1` then matches no row (SQLite serializes
///    writers; PostgreSQL makes the later writers wait on the row lock and
///    re-check the condition against the committed row).
/// 2. Read-modify-write admins that retry on `Conflict`: every one of their
///    changes ends up in the entry — no write is lost.
async fn racing_entry_updates_never_lose_a_write(db: Db) {
    let a = db.open().await;
    let b = db.open().await;
    a.create_entry(&entry("e", "spiffe://td/w", "spiffe://td/agent", "1"))
        .await
        .expect("create");
    const WRITERS: usize = 12;

    let start = Arc::new(tokio::sync::Barrier::new(WRITERS));
    let base = a.get_entry("e").await.expect("get").expect("e");
    let tasks: Vec<_> = (0..WRITERS)
        .map(|i| {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            let (start, mut e) = (start.clone(), base.clone());
            tokio::spawn(async move {
                e.revision = 2;
                e.hint = format!("writer-{i}");
                start.wait().await;
                (e.hint.clone(), s.update_entry(&e, 1).await)
            })
        })
        .collect();
    let mut winners = Vec::new();
    for t in tasks {
        match t.await.expect("task") {
            (hint, Ok(())) => winners.push(hint),
            (_, Err(StoreError::Conflict(_))) => {}
            (_, Err(e)) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let stored = b.get_entry("e").await.expect("get").expect("e");
    assert_eq!((stored.revision, &stored.hint), (2, &winners[0]));

    let start = Arc::new(tokio::sync::Barrier::new(WRITERS));
    let tasks: Vec<_> = (0..WRITERS)
        .map(|i| {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                let mut conflicts = 0u32;
                loop {
                    let mut e = s.get_entry("e").await.expect("get").expect("e");
                    let expected = e.revision;
                    e.revision += 1;
                    e.dns_names.push(format!("w{i}.example.org"));
                    match s.update_entry(&e, expected).await {
                        Ok(()) => return conflicts,
                        Err(StoreError::Conflict(_)) => conflicts += 1,
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
            })
        })
        .collect();
    let mut conflicts = 0;
    for t in tasks {
        conflicts += t.await.expect("task");
    }
    let stored = a.get_entry("e").await.expect("get").expect("e");
    let names: HashSet<_> = stored.dns_names.iter().cloned().collect();
    for i in 0..WRITERS {
        assert!(
            names.contains(&format!("w{i}.example.org")),
            "write of admin {i} lost: {names:?}"
        );
    }
    assert_eq!(stored.revision, 2 + WRITERS as i64);
    eprintln!("{WRITERS} read-modify-write admins: {conflicts} conflicts retried");
}

/// Two servers creating the same entry at once make one entry.
async fn racing_identical_creates_make_one_entry(db: Db) {
    let a = db.open().await;
    let b = db.open().await;
    const CREATORS: usize = 8;
    let start = Arc::new(tokio::sync::Barrier::new(CREATORS));
    let tasks: Vec<_> = (0..CREATORS)
        .map(|i| {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                s.create_entry(&entry(
                    &format!("id{i}"),
                    "spiffe://td/w",
                    "spiffe://td/agent",
                    "1",
                ))
                .await
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(()) => ok += 1,
            Err(StoreError::AlreadyExists(_)) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(a.count_entries().await.expect("count"), 1);
}

/// The two schemas hold the same tables and columns (PostgreSQL has its
/// change tables besides), and `store migrate` copies every SQLite table: a
/// table added to one schema but not to the other, or not to the migration,
/// fails here.
#[tokio::test]
async fn schemas_and_migration_cover_the_same_tables() {
    let Some(url) = pg::database("schema") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("m.db");
    drop(SqliteStore::open(&path).await.expect("sqlite"));
    let sqlite = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("sqlite pool");
    let sqlite_cols: Vec<(String, String)> = sqlx::query_as(
        "SELECT m.name, p.name FROM sqlite_master m, pragma_table_info(m.name) p
         WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%' AND m.name <> '_sqlx_migrations'
         ORDER BY 1, 2",
    )
    .fetch_all(&sqlite)
    .await
    .expect("sqlite columns");
    let pg = pg_store(&url).await;
    let pg_cols: HashSet<(String, String)> = sqlx::query_as(
        "SELECT table_name::TEXT, column_name::TEXT FROM information_schema.columns
         WHERE table_schema = 'public'",
    )
    .fetch_all(pg.pool())
    .await
    .expect("pg columns")
    .into_iter()
    .collect();
    for c in &sqlite_cols {
        assert!(pg_cols.contains(c), "{c:?} is in SQLite but not PostgreSQL");
    }
    let sqlite_cols: std::collections::BTreeSet<(&str, &str)> = sqlite_cols
        .iter()
        .map(|(t, c)| (t.as_str(), c.as_str()))
        .collect();
    let copied: std::collections::BTreeSet<(&str, &str)> =
        meshid_server::store::migrate::copied_columns()
            .into_iter()
            .collect();
    assert_eq!(copied, sqlite_cols, "store migrate copies every column");
}

/// Two servers applying the same CA transition: one applies it, the others
/// get `Conflict` (and would re-read the journal).
async fn racing_authority_transitions_apply_once(db: Db) {
    let a = db.open().await;
    let b = db.open().await;
    a.insert_authority(&authority("c1", "x509", "server-1"))
        .await
        .expect("insert");
    const SERVERS: usize = 8;
    let start = Arc::new(tokio::sync::Barrier::new(SERVERS));
    let tasks: Vec<_> = (0..SERVERS)
        .map(|i| {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            let start = start.clone();
            tokio::spawn(async move {
                let mut next = authority("c1", "x509", "server-1");
                next.state = "active".into();
                next.activated_at = i as i64;
                next.revision = 2;
                start.wait().await;
                (i as i64, s.update_authority(&next, 1).await)
            })
        })
        .collect();
    let mut winners = Vec::new();
    for t in tasks {
        match t.await.expect("task") {
            (i, Ok(())) => winners.push(i),
            (_, Err(StoreError::Conflict(_))) => {}
            (_, Err(e)) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    let stored = b.list_authorities().await.expect("list");
    assert_eq!(
        (stored[0].revision, stored[0].activated_at),
        (2, winners[0])
    );
}

// ---- PostgreSQL only -------------------------------------------------------

async fn pg_store(url: &str) -> PostgresStore {
    PostgresStore::connect(&PostgresOptions::new(url))
        .await
        .expect("connect")
}

/// A change through store A reaches store B's subscription (two servers on
/// one database).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_change_reaches_other_store() {
    let Some(url) = pg::database("changes") else {
        return;
    };
    let a = pg_store(&url).await;
    let b = pg_store(&url).await;
    let mut rx = b.subscribe_changes();
    let mut rev = *rx.borrow_and_update();
    let mut latencies = Vec::new();
    for i in 0..20 {
        let t0 = Instant::now();
        a.create_entry(&entry(
            &format!("e{i}"),
            "spiffe://td/w",
            "spiffe://td/agent",
            &i.to_string(),
        ))
        .await
        .expect("create");
        let committed = t0.elapsed();
        rev = next_change(&mut rx, rev).await;
        latencies.push(t0.elapsed() - committed);
    }
    latencies.sort();
    eprintln!(
        "commit on A -> seen by B: p50 {:?}, max {:?} (20 changes)",
        latencies[10], latencies[19]
    );
    // B reads what A wrote.
    assert_eq!(b.count_entries().await.expect("count"), 20);
}

/// B's listening connection is killed and cannot come back for a while; a
/// change committed meanwhile is caught up when it does, not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_missed_notification_is_caught_up() {
    let Some(url) = pg::database("catchup") else {
        return;
    };
    let srv = pg::server().expect("server");
    let db = pg::db_name(&url).to_string();
    let role = format!("{db}_b");
    srv.psql(&db, &format!("CREATE ROLE \"{role}\" SUPERUSER LOGIN"));
    let a = pg_store(&url).await;
    let b = pg_store(&srv.url_as(&role, &db)).await;
    let mut rx = b.subscribe_changes();
    let listening = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = '{role}' AND query LIKE 'LISTEN%'"
    );
    let wait_listeners = |n: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while srv.psql("postgres", &listening) != n {
            assert!(Instant::now() < deadline, "B's listeners never became {n}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_listeners("1");
    let before = *rx.borrow_and_update();
    a.create_entry(&entry("e0", "spiffe://td/w", "spiffe://td/agent", "0"))
        .await
        .expect("create");
    let rev = next_change(&mut rx, before).await;

    // Keep B from reconnecting, then kill its listener.
    srv.psql("postgres", &format!("ALTER ROLE \"{role}\" NOLOGIN"));
    let killed = srv.psql(
        "postgres",
        &format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE usename = '{role}' AND query LIKE 'LISTEN%'"
        ),
    );
    assert_eq!(killed, "1");
    wait_listeners("0");
    // Committed while B has no listener: no notification reaches B.
    a.create_entry(&entry("e1", "spiffe://td/w", "spiffe://td/agent", "1"))
        .await
        .expect("create");
    let committed = a.subscribe_changes().borrow().to_owned();
    assert!(committed > rev);
    srv.psql("postgres", &format!("ALTER ROLE \"{role}\" LOGIN"));
    let seen = next_change(&mut rx, rev).await;
    assert!(
        seen >= committed,
        "B caught up to {seen}, A is at {committed}"
    );
    wait_listeners("1");
}

/// TLS with rustls: `verify-full` against the database's CA connects; against
/// another CA it is refused; `require` without a root connects.
#[tokio::test]
async fn postgres_tls_modes() {
    let Some(url) = pg::database("tls") else {
        return;
    };
    let srv = pg::server().expect("server");
    let opts = |mode: SslMode, root: Option<std::path::PathBuf>| PostgresOptions {
        url: url.replace("127.0.0.1", "localhost"),
        pool_size: 2,
        ssl_mode: Some(mode),
        ssl_root_cert: root,
    };
    let s = PostgresStore::connect(&opts(SslMode::VerifyFull, Some(srv.ca_pem.clone())))
        .await
        .expect("verify-full with the right CA");
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(s.pool())
        .await
        .expect("pg_stat_ssl");
    assert!(ssl, "the connection uses TLS");

    let other = tempfile::tempdir().expect("tmp");
    let other_ca = other.path().join("other.pem");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&other_ca, p.self_signed(&key).expect("ca").pem()).expect("write");
    let err = PostgresStore::connect(&opts(SslMode::VerifyFull, Some(other_ca)))
        .await
        .expect_err("an untrusted server certificate is refused");
    assert!(matches!(err, StoreError::Db(_)), "{err}");

    let s = PostgresStore::connect(&opts(SslMode::Require, None))
        .await
        .expect("require");
    assert_eq!(s.count_entries().await.expect("count"), 0);
}

/// What the node API does on RenewAgent, through `s`: read the agent (as
/// authentication does), refuse a banned or unknown one, then record the
/// renewal conditionally. Renews until refused; returns the refusal and the
/// number of renewals recorded.
async fn renew_until_refused(s: Arc<dyn Store>, id: String) -> (StoreError, u32) {
    let mut n = 0u32;
    loop {
        let Some(a) = s.get_agent(&id).await.expect("get") else {
            return (StoreError::NotFound(id), n);
        };
        if a.banned {
            return (StoreError::Banned(id), n);
        }
        n += 1;
        let serial = format!("{n:04x}");
        match s
            .renew_agent(&id, &a.serial, &serial, a.expires_at + 1)
            .await
        {
            Ok(after) => {
                assert_eq!((after.serial, after.prev_serial), (serial, a.serial));
                assert!(!after.banned);
            }
            Err(e @ (StoreError::Banned(_) | StoreError::NotFound(_))) => return (e, n),
            Err(e) => panic!("unexpected {e}"),
        }
        if n > 5_000 {
            panic!("never refused");
        }
    }
}

/// `agent ban` racing RenewAgent, many times, through two store instances
/// (two servers on PostgreSQL): the ban always holds, the renewer is refused
/// with `Banned`, and the banned agent can neither renew nor attest again.
/// (With a renewal that wrote back the whole row it had read, the ban was
/// undone in about half of the trials.)
async fn racing_ban_and_renewal_ban_always_holds(db: Db) {
    let a = db.open().await;
    let b = db.open().await;
    for trial in 0..40u64 {
        let id = format!("spiffe://td/meshid/agent/k8s_psat/c/node-{trial}");
        a.attest_agent(&agent(&id, "00")).await.expect("attest");
        let renewer = tokio::spawn(renew_until_refused(a.clone(), id.clone()));
        // Let a few renewals through first, varying with the trial.
        for _ in 0..(trial % 7) {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_micros(200 * (trial % 5))).await;
        let banned = b.ban_agent(&id).await.expect("ban");
        assert!(banned.banned);
        let (refusal, renewals) = renewer.await.expect("renewer");
        assert!(
            matches!(refusal, StoreError::Banned(_)),
            "trial {trial}: {refusal} after {renewals} renewals"
        );
        let stored = a.get_agent(&id).await.expect("get").expect("agent");
        assert!(stored.banned, "trial {trial}: the ban was undone");
        assert!(matches!(
            b.renew_agent(&id, &stored.serial, "ffff", 1).await,
            Err(StoreError::Banned(_))
        ));
        assert!(matches!(
            a.attest_agent(&agent(&id, "fffe")).await,
            Err(StoreError::Banned(_))
        ));
        assert_eq!(
            b.get_agent(&id).await.expect("get"),
            Some(stored),
            "trial {trial}: refused calls changed nothing"
        );
    }
}

/// `agent evict` racing RenewAgent: the renewal never re-inserts the agent.
async fn racing_evict_and_renewal_stays_evicted(db: Db) {
    let a = db.open().await;
    let b = db.open().await;
    for trial in 0..40u64 {
        let id = format!("spiffe://td/meshid/agent/join_token/t{trial}");
        a.attest_agent(&agent(&id, "00")).await.expect("attest");
        let renewer = tokio::spawn(renew_until_refused(a.clone(), id.clone()));
        for _ in 0..(trial % 7) {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_micros(200 * (trial % 5))).await;
        b.delete_agent(&id).await.expect("evict");
        let (refusal, renewals) = renewer.await.expect("renewer");
        assert!(
            matches!(refusal, StoreError::NotFound(_)),
            "trial {trial}: {refusal} after {renewals} renewals"
        );
        assert_eq!(a.get_agent(&id).await.expect("get"), None, "trial {trial}");
        assert!(matches!(
            b.renew_agent(&id, "00", "ffff", 1).await,
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(b.get_agent(&id).await.expect("get"), None);
    }
}

/// A PSAT node re-attesting in a loop while it is banned: the conditional
/// upsert never clears the ban, whichever commits first.
async fn racing_ban_and_reattestation_ban_always_holds(db: Db) {
    let a = db.open().await;
    let b = db.open().await;
    for trial in 0..40u64 {
        let id = format!("spiffe://td/meshid/agent/k8s_psat/c/re-{trial}");
        a.attest_agent(&agent(&id, "00")).await.expect("attest");
        let attester = {
            let (s, id) = (a.clone(), id.clone());
            tokio::spawn(async move {
                for n in 1..5_000u32 {
                    match s.attest_agent(&agent(&id, &format!("{n:04x}"))).await {
                        Ok(()) => {}
                        Err(StoreError::Banned(_)) => return n,
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
                panic!("never refused");
            })
        };
        for _ in 0..(trial % 7) {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_micros(200 * (trial % 5))).await;
        b.ban_agent(&id).await.expect("ban");
        attester.await.expect("attester");
        let stored = a.get_agent(&id).await.expect("get").expect("agent");
        assert!(stored.banned, "trial {trial}: the ban was undone");
    }
}

/// A revocation is recorded once, listed while the certificate is unexpired
/// (oldest first), and a second revocation of the same serial changes nothing.
/// A revocation (reason 1) of certificate `serial`.
fn rc(serial: &str, not_after: i64, revoked_at: i64) -> RevokedCert {
    RevokedCert {
        serial: serial.into(),
        spiffe_id: format!("spiffe://td/admin/{serial}"),
        not_after,
        revoked_at,
        reason: 1,
    }
}

async fn revocations_listed_until_not_after(db: Db) {
    let s = db.open().await;
    assert!(s.list_revoked(0).await.expect("list").is_empty());
    assert!(s.revoke_cert(&rc("0b", 2_000, 20)).await.expect("revoke"));
    assert!(s.revoke_cert(&rc("0a", 1_000, 10)).await.expect("revoke"));
    let again = RevokedCert {
        reason: 4,
        ..rc("0a", 1_000, 99)
    };
    assert!(!s.revoke_cert(&again).await.expect("revoke again"));
    let all = s.list_revoked(500).await.expect("list");
    assert_eq!(all, vec![rc("0a", 1_000, 10), rc("0b", 2_000, 20)]);
    // 0a's notAfter has passed: it no longer needs to be listed.
    let later = s.list_revoked(1_001).await.expect("list");
    assert_eq!(later, vec![rc("0b", 2_000, 20)]);
    // Another store instance on the same database sees them.
    let other = db.open().await;
    assert_eq!(other.list_revoked(1_000).await.expect("list").len(), 2);
}

async fn expired_certificates_are_pruned(db: Db) {
    let s = db.open().await;
    s.record_issued(&[
        cert("01", "A", "e1", "c1", 100),
        cert("02", "A", "e1", "c1", 200),
        cert("03", "A", "e2", "c1", 99),
        cert("04", "B", "e1", "c2", 300),
        cert("05", "B", "e2", "c2", 50),
    ])
    .await
    .expect("record");
    assert!(s.revoke_cert(&rc("01", 100, 10)).await.expect("revoke"));
    assert!(s.revoke_cert(&rc("04", 300, 10)).await.expect("revoke"));

    // Expired before 101: 01, 03, 05 and the revocation of 01; at most two
    // of each table per call.
    assert_eq!(s.prune_expired(101, 2).await.expect("prune"), 3);
    assert_eq!(s.prune_expired(101, 2).await.expect("prune"), 1);
    assert_eq!(s.prune_expired(101, 2).await.expect("prune again"), 0);
    for gone in ["01", "03", "05"] {
        assert_eq!(s.get_issued(gone).await.expect("get"), None, "{gone}");
    }
    // What expires at or after the cut is kept, with its revocation.
    assert_eq!(
        s.get_issued("02").await.expect("get"),
        Some(cert("02", "A", "e1", "c1", 200))
    );
    assert_eq!(
        s.list_revoked(0).await.expect("list"),
        vec![rc("04", 300, 10)]
    );
    let live = s.live_issued_by("c2", 101, 10).await.expect("live");
    assert_eq!(live, vec![cert("04", "B", "e1", "c2", 300)]);
}
