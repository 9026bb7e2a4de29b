//! The agent's schedules in paused tokio time, against the in-process node
//! API of `node_api/fake.rs`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use meshid_proto::types::{Entry, Selector};

use super::Agent;
use crate::cache::Snapshot;
use crate::clock::{SharedClock, TokioClock};
use crate::config::AgentConfig;
use crate::identity_store::IdentityStore;
use crate::jwt_svids::JwtSvids;
use crate::node_api::NodeApi;
use crate::node_api::fake::{FakeNode, TD};
use crate::node_api::retry::MIN_RETRY;

/// A whole second, so certificate times (seconds) are exact.
fn start() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn entry(id: &str) -> Entry {
    Entry {
        id: id.into(),
        spiffe_id: meshid_identity::spiffe_id::id_in(TD, id),
        selectors: vec![Selector {
            r#type: "unix".into(),
            value: "uid:1000".into(),
        }],
        revision: 1,
        ..Entry::default()
    }
}

struct Harness {
    agent: Arc<Agent>,
    node: Arc<FakeNode>,
    clock: SharedClock,
    _dir: tempfile::TempDir,
}

impl Harness {
    /// An agent on a fake node serving `entries`, SVIDs of 100 s.
    fn new(entries: Vec<Entry>) -> Self {
        let clock: SharedClock = Arc::new(TokioClock::starting_at(start()));
        let node = Arc::new(FakeNode::new(clock.clone()));
        node.set_entries(entries);
        let dir = tempfile::tempdir().expect("dir");
        let config: AgentConfig = toml::from_str(&format!(
            "trust_domain = \"{TD}\"\nserver_address = \"127.0.0.1:1\"\ndata_dir = \"{}\"\n",
            dir.path().display()
        ))
        .expect("config");
        let id = node.agent_identity();
        let agent = Agent::spawn(
            config,
            node.clone() as Arc<dyn NodeApi>,
            clock.clone(),
            IdentityStore::new(dir.path()),
            id,
        )
        .expect("agent");
        Self {
            agent,
            node,
            clock,
            _dir: dir,
        }
    }

    /// Time since the start.
    fn elapsed(&self) -> Duration {
        self.clock
            .now()
            .duration_since(start())
            .expect("after start")
    }

    /// Waits (in paused time, at most an hour) until `f` holds for the
    /// published snapshot; returns the time since the start.
    async fn until(&self, f: impl Fn(&Snapshot) -> bool) -> Duration {
        let mut rx = self.agent.snapshot.subscribe();
        tokio::time::timeout(Duration::from_secs(3600), async {
            loop {
                if f(&rx.borrow_and_update()) {
                    return;
                }
                rx.changed().await.expect("agent alive");
            }
        })
        .await
        .expect("in time");
        self.elapsed()
    }
}

fn serial(s: &Snapshot, id: &str) -> Option<String> {
    s.svids.get(id).map(|c| c.serial.clone())
}

/// A workload SVID of 100 s is minted at once and re-minted at 75% of its
/// lifetime less up to 5% jitter: between 70 s and 75 s, never before.
#[tokio::test(start_paused = true)]
async fn a_workload_svid_is_reminted_at_three_quarters_of_its_lifetime() {
    let h = Harness::new(vec![entry("web")]);
    let minted = h.until(|s| s.svids.contains_key("web")).await;
    assert_eq!(minted, Duration::ZERO, "minted at once");
    let first = serial(&h.agent.snapshot.borrow(), "web").expect("minted");
    let at = h
        .until(|s| serial(s, "web").is_some_and(|s| s != first))
        .await;
    assert!(
        at >= Duration::from_secs(69) && at <= Duration::from_secs(75),
        "re-minted at {at:?}"
    );
    assert_eq!(h.node.counts.x509_signed.load(Ordering::Relaxed), 2);
}

/// The server is unreachable from before the re-mint until 2 s before the
/// SVID expires: the retries come ever closer together as the expiry nears
/// (each wait at most a quarter of the time left), so the SVID is renewed
/// once the server is back, before it expires.
#[tokio::test(start_paused = true)]
async fn retries_near_expiry_are_bounded_by_the_time_left() {
    let h = Harness::new(vec![entry("web")]);
    h.until(|s| s.svids.contains_key("web")).await;
    let first = serial(&h.agent.snapshot.borrow(), "web").expect("minted");
    let expiry = start() + Duration::from_secs(100);
    let back = start() + Duration::from_secs(98);
    h.node.unreachable_until(back);
    let renewed = h
        .until(|s| serial(s, "web").is_some_and(|s| s != first))
        .await;
    assert!(
        renewed >= Duration::from_secs(98) && renewed < Duration::from_secs(100),
        "renewed at {renewed:?}, before the expiry at 100 s"
    );
    let times = h.node.x509_times.lock().expect("lock").clone();
    // The attempts after the first mint (at 0 s) until the server was back.
    let failed: Vec<SystemTime> = times
        .iter()
        .copied()
        .filter(|t| *t > start() && *t < back)
        .collect();
    assert!(failed.len() > 3, "retried: {failed:?}");
    for w in failed.windows(2) {
        let left = expiry.duration_since(w[0]).expect("before expiry");
        let gap = w[1].duration_since(w[0]).expect("ordered");
        // (+1 ms: tokio's timer rounds up to whole milliseconds)
        assert!(
            gap <= (left / 4).max(MIN_RETRY) + Duration::from_millis(1),
            "{left:?} left, waited {gap:?}"
        );
    }
    // Denser as the expiry nears: the last wait before the server came
    // back is shorter than the longest one.
    let gaps: Vec<Duration> = failed
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).expect("ordered"))
        .collect();
    let longest = gaps.iter().max().expect("gaps");
    let last = gaps.last().expect("gaps");
    assert!(last < longest, "{gaps:?}");
}

/// Entries added on the sync stream are minted, entries removed are
/// dropped with their SVIDs; the others are left alone.
#[tokio::test(start_paused = true)]
async fn entries_on_the_sync_stream_are_minted_and_dropped() {
    let h = Harness::new(vec![entry("web")]);
    h.until(|s| s.svids.contains_key("web")).await;
    let web = serial(&h.agent.snapshot.borrow(), "web");

    h.node.set_entries(vec![entry("web"), entry("db")]);
    let at = h.until(|s| s.svids.contains_key("db")).await;
    assert!(at < Duration::from_secs(1), "minted at once: {at:?}");
    assert_eq!(serial(&h.agent.snapshot.borrow(), "web"), web);

    h.node.set_entries(vec![entry("db")]);
    h.until(|s| !s.svids.contains_key("web") && s.entries.len() == 1)
        .await;
    assert!(h.agent.snapshot.borrow().svids.contains_key("db"));
    assert_eq!(h.node.counts.x509_signed.load(Ordering::Relaxed), 2);
}

/// The agent's own SVID (100 s) is renewed at 75% of its lifetime less
/// jitter, not before.
#[tokio::test(start_paused = true)]
async fn the_agent_svid_is_renewed_at_three_quarters_of_its_lifetime() {
    let h = Harness::new(vec![]);
    let first = h.agent.snapshot.borrow().agent_not_after;
    let at = h.until(|s| s.agent_not_after != first).await;
    assert!(
        at >= Duration::from_secs(69) && at <= Duration::from_secs(75),
        "renewed at {at:?}"
    );
    assert_eq!(h.node.counts.renew.load(Ordering::Relaxed), 1);
    // A new SVID of 100 s (notAfter in whole seconds).
    let not_after = h.agent.snapshot.borrow().agent_not_after.expect("set");
    let renewed = start() + at;
    assert!(
        not_after > renewed + Duration::from_secs(99)
            && not_after <= renewed + Duration::from_secs(100),
        "{not_after:?}"
    );
}

/// A cached JWT-SVID (100 s) is served until half its lifetime and never
/// past it: then a new one is signed.
#[tokio::test(start_paused = true)]
async fn a_cached_jwt_svid_is_refreshed_at_half_its_lifetime() {
    let clock: SharedClock = Arc::new(TokioClock::starting_at(start()));
    let node = Arc::new(FakeNode::new(clock.clone()));
    let e = entry("web");
    node.set_entries(vec![e.clone()]);
    let jwt = JwtSvids::new(node.clone(), clock, 16);
    let snap = Snapshot {
        entries: vec![e.clone()].into(),
        ..Snapshot::default()
    };
    let aud = vec!["db".to_string()];
    let fetch = || async {
        let got = jwt
            .fetch(&snap, &[&e], &aud, &aud, |_, p| panic!("{p}"))
            .await
            .expect("signed");
        assert_eq!(got.len(), 1);
        got[0].svid.clone()
    };
    let first = fetch().await;
    assert_eq!(node.counts.jwt_calls.load(Ordering::Relaxed), 1);
    tokio::time::sleep(Duration::from_millis(49_999)).await;
    assert_eq!(fetch().await, first, "cached before half its lifetime");
    assert_eq!(node.counts.jwt_calls.load(Ordering::Relaxed), 1);
    tokio::time::sleep(Duration::from_millis(1)).await;
    let second = fetch().await;
    assert_ne!(second, first, "not served past half its lifetime");
    assert_eq!(node.counts.jwt_calls.load(Ordering::Relaxed), 2);
    assert_eq!(fetch().await, second, "the new one is cached");
}

/// A JWT-SVID request during a server outage fails over like the X.509
/// path and is tried at once on the next server; with no other server the
/// caller gets Unavailable, and the next call goes to the next connection.
#[tokio::test(start_paused = true)]
async fn a_jwt_svid_request_fails_over_to_the_next_server() {
    let clock: SharedClock = Arc::new(TokioClock::starting_at(start()));
    let node = Arc::new(FakeNode::new(clock.clone()));
    let e = entry("web");
    node.set_entries(vec![e.clone()]);
    let jwt = JwtSvids::new(node.clone(), clock, 16);
    let snap = Snapshot {
        entries: vec![e.clone()].into(),
        ..Snapshot::default()
    };
    let aud = vec!["db".to_string()];

    node.set_server_count(2);
    node.fail_next(1);
    let got = jwt
        .fetch(&snap, &[&e], &aud, &aud, |_, p| panic!("{p}"))
        .await
        .expect("signed by the second server");
    assert_eq!(got.len(), 1);
    assert_eq!(node.counts.jwt_calls.load(Ordering::Relaxed), 2);
    assert_eq!(node.generation(), 1, "failed over once");

    node.set_server_count(1);
    node.fail_next(1);
    let other = vec!["queue".to_string()];
    let err = jwt
        .fetch(&snap, &[&e], &other, &other, |_, p| panic!("{p}"))
        .await
        .expect_err("the only server is down");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert_eq!(
        node.generation(),
        2,
        "the failure moved to the next connection"
    );
}

/// A canary's self-test: a change whose bundle keeps every SVID verifying
/// and whose candidate authority signs a probe that verifies and completes
/// an mTLS handshake with the agent's own SVID is acknowledged, once per
/// rollout; a bundle after the change that would orphan the agent's SVIDs
/// is refused, saying why.
#[tokio::test(start_paused = true)]
async fn a_canary_checks_a_trust_change_and_reports_once() {
    use meshid_proto::node::TrustCheckRequest;
    let h = Harness::new(vec![entry("web")]);
    h.until(|s| s.svids.contains_key("web") && s.bundle.is_some())
        .await;
    let req = TrustCheckRequest {
        rollout_id: "r1".into(),
        authority_id: "candidate".into(),
        x509_roots: vec![h.node.root()],
        deadline: 0,
        change: "activate".into(),
    };
    h.agent
        .check_trust(&req)
        .await
        .expect("a good change checks out");
    let elsewhere = FakeNode::new(h.clock.clone()).root();
    let err = h
        .agent
        .check_trust(&TrustCheckRequest {
            x509_roots: vec![elsewhere],
            ..req.clone()
        })
        .await
        .expect_err("a bundle that orphans the agent's SVID");
    assert!(err.contains("would not verify"), "{err}");

    h.node.set_trust_check(Some(req.clone()));
    tokio::time::timeout(Duration::from_secs(60), async {
        while h.node.trust_reports.lock().expect("lock").is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("reported");
    // The same rollout again on the stream (another change arrives): not
    // checked again.
    h.node.set_entries(vec![entry("web"), entry("db")]);
    h.until(|s| s.svids.contains_key("db")).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let reports = h.node.trust_reports.lock().expect("lock").clone();
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert!(
        reports[0].ok && reports[0].rollout_id == "r1",
        "{reports:?}"
    );
}
