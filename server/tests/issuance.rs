//! One SVID followed through the issuance service, in process: a real SQLite
//! store, the real CA manager and audit log, and a clock the test chooses
//! (issuance takes `now` as a parameter). No tonic, no network.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshid_identity::svid::unix;
use meshid_proto::types::{Entry, Selector};
use meshid_server::audit::AuditLog;
use meshid_server::ca::CaManager;
use meshid_server::config::ServerConfig;
use meshid_server::issuance::{self, IssuanceError, JwtRequest, Refusal, X509Request};
use meshid_server::metrics::Metrics;
use meshid_server::state::{AgentAuthError, ServerState};
use meshid_server::store::{AgentRecord, SqliteStore, Store};
use tonic::{Code, Status};
use x509_parser::prelude::*;

const AGENT: &str = "spiffe://example.org/spire/agent/join_token/t1";

struct Fixture {
    _dir: tempfile::TempDir,
    st: Arc<ServerState>,
    audit_path: std::path::PathBuf,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = ServerConfig::parse(&format!(
        "trust_domain = \"example.org\"\ndata_dir = {:?}\ndefault_svid_ttl = \"1h\"\n\
         max_svid_ttl = \"4h\"\ndefault_jwt_svid_ttl = \"5m\"\nca_ttl = \"1d\"\n",
        dir.path()
    ))
    .expect("config");
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&dir.path().join("meshid.db"))
            .await
            .expect("store"),
    );
    let audit = AuditLog::open(&cfg.audit_log_path()).expect("audit");
    let metrics = Metrics::with_audit(audit.counters());
    let ca = CaManager::start(&cfg, store.clone(), audit.clone(), metrics.clone())
        .await
        .expect("CA");
    let audit_path = cfg.audit_log_path();
    let st = ServerState::new(cfg, ca, store, audit, metrics);
    for (id, path, parent, ttl) in [
        ("e-web", "/web", AGENT, 0),
        ("e-long", "/long", AGENT, 86_400),
        ("e-short", "/short", AGENT, 600),
        (
            "e-other",
            "/other",
            "spiffe://example.org/spire/agent/join_token/t2",
            0,
        ),
    ] {
        st.store
            .create_entry(&Entry {
                id: id.into(),
                spiffe_id: format!("spiffe://example.org{path}"),
                parent_id: parent.into(),
                selectors: vec![Selector {
                    r#type: "unix".into(),
                    value: "uid:1000".into(),
                }],
                x509_svid_ttl: ttl,
                revision: 1,
                ..Entry::default()
            })
            .await
            .expect("entry");
    }
    Fixture {
        _dir: dir,
        st,
        audit_path,
    }
}

fn agent() -> AgentRecord {
    AgentRecord {
        spiffe_id: AGENT.into(),
        attestor: "join_token".into(),
        serial: "01".into(),
        prev_serial: String::new(),
        expires_at: 0,
        banned: false,
        aliases: vec![],
        attested_at: 0,
    }
}

fn csr() -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    rcgen::CertificateParams::default()
        .serialize_request(&key)
        .expect("csr")
        .der()
        .to_vec()
}

fn x509(entry: &str) -> X509Request {
    X509Request {
        entry_id: entry.into(),
        csr: csr(),
    }
}

/// An SVID goes: authorize → TTL policy → sign → journal + audit → metrics,
/// at a time the test picks; what comes out names the entry's SPIFFE ID,
/// lives exactly the TTL the policy gives from that time, chains to the
/// signer in use, and is on record (journal row with its CA, audit line)
/// before it is returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_svid_through_issuance_at_a_chosen_time() {
    let f = fixture().await;
    let st = &f.st;
    let now = SystemTime::now() + Duration::from_secs(3 * 3600);
    let out = issuance::sign_x509(st, &agent(), vec![x509("e-web")], now)
        .await
        .expect("batch");
    let svid = out.into_iter().next().expect("one").expect("signed");
    assert_eq!(svid.spiffe_id, "spiffe://example.org/web");
    assert_eq!(
        unix(svid.not_after),
        unix(now) + 3600,
        "default TTL from now"
    );

    let (_, leaf) = X509Certificate::from_der(&svid.chain[0]).expect("leaf");
    let uris: Vec<String> = leaf
        .subject_alternative_name()
        .expect("san")
        .expect("present")
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(uris, ["spiffe://example.org/web"]);
    let signer = st.ca.signer();
    let ca_der = signer.cert_der().to_vec();
    let (_, ca) = X509Certificate::from_der(&ca_der).expect("ca");
    leaf.verify_signature(Some(ca.public_key()))
        .expect("signed by the CA in use");

    let recs = st
        .store
        .live_issued_by(signer.id(), unix(SystemTime::now()), 10)
        .await
        .expect("journal");
    assert!(
        recs.iter()
            .any(|r| r.serial == svid.serial && r.entry_id == "e-web" && r.agent_id == AGENT),
        "journal row for {} under CA {}: {recs:?}",
        svid.serial,
        signer.id()
    );
    let audit = std::fs::read_to_string(&f.audit_path).expect("audit log");
    assert!(
        audit.contains("x509_svid_issued") && audit.contains(&svid.serial),
        "audit line for the serial"
    );
}

/// The TTL policy: an entry's own TTL, capped at `max_svid_ttl`; and never
/// past the CA's own end, whatever the clock says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_policy_caps_at_max_and_at_the_ca() {
    let f = fixture().await;
    let st = &f.st;
    let now = SystemTime::now();
    let out = issuance::sign_x509(st, &agent(), vec![x509("e-long"), x509("e-short")], now)
        .await
        .expect("batch");
    let t: Vec<i64> = out
        .iter()
        .map(|r| unix(r.as_ref().expect("signed").not_after) - unix(now))
        .collect();
    assert_eq!(t, [4 * 3600, 600], "capped at max_svid_ttl; own TTL kept");

    let ca_end = st.ca.signer().not_after();
    let late = ca_end - Duration::from_secs(1800);
    let out = issuance::sign_x509(st, &agent(), vec![x509("e-web")], late)
        .await
        .expect("batch");
    let s = out.into_iter().next().expect("one").expect("signed");
    assert_eq!(unix(s.not_after), unix(ca_end), "never past the CA");
}

/// Refusals are per request and in order: the others are still served; an
/// agent asking for another agent's entry is audited; an empty or
/// oversized batch is refused whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_per_request_and_audited() {
    let f = fixture().await;
    let st = &f.st;
    let now = SystemTime::now();
    let bad_csr = X509Request {
        entry_id: "e-web".into(),
        csr: b"not a csr".to_vec(),
    };
    let out = issuance::sign_x509(
        st,
        &agent(),
        vec![x509("e-other"), x509("nope"), bad_csr, x509("e-web")],
        now,
    )
    .await
    .expect("batch");
    assert!(
        matches!(out[0], Err(Refusal::NotParented(_))),
        "{:?}",
        out[0]
    );
    assert!(matches!(out[1], Err(Refusal::NoEntry(_))), "{:?}", out[1]);
    assert!(matches!(out[2], Err(Refusal::Invalid(_))), "{:?}", out[2]);
    assert!(out[3].is_ok(), "{:?}", out[3]);
    let audit = std::fs::read_to_string(&f.audit_path).expect("audit log");
    assert!(audit.contains("x509_svid_refused") && audit.contains("e-other"));

    let empty = issuance::sign_x509(st, &agent(), vec![], now).await;
    assert!(matches!(
        empty,
        Err(IssuanceError::BatchSize { got: 0, .. })
    ));
    let max = st.config.max_sign_batch;
    let many = (0..=max).map(|_| x509("e-web")).collect();
    let over = issuance::sign_x509(st, &agent(), many, now).await;
    assert!(matches!(over, Err(IssuanceError::BatchSize { .. })));
}

/// JWT-SVIDs take the same path: authorized, the JWT TTL policy from the
/// chosen time, an audience required, audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_svids_take_the_same_path() {
    let f = fixture().await;
    let st = &f.st;
    let now = SystemTime::now() + Duration::from_secs(600);
    let out = issuance::sign_jwt(
        st,
        &agent(),
        vec![
            JwtRequest {
                entry_id: "e-web".into(),
                audience: vec!["payments".into()],
            },
            JwtRequest {
                entry_id: "e-web".into(),
                audience: vec![],
            },
            JwtRequest {
                entry_id: "e-other".into(),
                audience: vec!["payments".into()],
            },
        ],
        now,
    )
    .await
    .expect("batch");
    let j = out[0].as_ref().expect("signed");
    assert_eq!(j.spiffe_id, "spiffe://example.org/web");
    assert_eq!(j.jwt.issued_at, unix(now));
    assert_eq!(
        j.jwt.expires_at,
        unix(now) + 300,
        "default JWT TTL from now"
    );
    assert!(matches!(out[1], Err(Refusal::NoAudience)));
    assert!(matches!(out[2], Err(Refusal::NotParented(_))));
    let audit = std::fs::read_to_string(&f.audit_path).expect("audit log");
    assert!(audit.contains("jwt_svid_issued") && audit.contains("jwt_svid_refused"));
}

/// Before anything is issued the node API authenticates the calling agent
/// from its client certificate: the agent must be known, not banned, and
/// present its current SVID or the one just before it (a renewal in
/// flight). Each refusal has its own error, and its gRPC code is chosen in
/// one place (`api/status.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_authenticate_with_their_current_or_previous_svid() {
    let f = fixture().await;
    let st = &f.st;
    let now = SystemTime::now();
    let ttl = Duration::from_secs(3600);
    let mut svids = Vec::new();
    for _ in 0..3 {
        svids.push(
            issuance::sign_identity(st, &csr(), AGENT, ttl, "agent", now)
                .await
                .expect("agent SVID"),
        );
    }
    let leaf = |i: usize| svids[i].chain[0].clone();

    // Not attested yet.
    let e = st.authenticate_agent(&leaf(0)).await.expect_err("unknown");
    assert!(matches!(e, AgentAuthError::Unknown(_)), "{e}");
    assert_eq!(Status::from(e).code(), Code::PermissionDenied);

    let mut rec = agent();
    rec.serial = svids[0].serial.clone();
    st.store.attest_agent(&rec).await.expect("attest");
    let a = st.authenticate_agent(&leaf(0)).await.expect("current SVID");
    assert_eq!(a.spiffe_id, AGENT);

    // Renewed once: the previous SVID still authenticates, the new one too.
    let exp = unix(now) + 3600;
    st.store
        .renew_agent(AGENT, &svids[0].serial, &svids[1].serial, exp)
        .await
        .expect("renew");
    st.authenticate_agent(&leaf(0))
        .await
        .expect("previous SVID");
    st.authenticate_agent(&leaf(1)).await.expect("current SVID");

    // Renewed twice: the first SVID is superseded.
    st.store
        .renew_agent(AGENT, &svids[1].serial, &svids[2].serial, exp)
        .await
        .expect("renew");
    let e = st
        .authenticate_agent(&leaf(0))
        .await
        .expect_err("superseded");
    assert!(matches!(e, AgentAuthError::Superseded { .. }), "{e}");
    st.authenticate_agent(&leaf(2)).await.expect("current SVID");

    // Not a certificate at all.
    let e = st
        .authenticate_agent(b"not a certificate")
        .await
        .expect_err("garbage");
    assert!(matches!(e, AgentAuthError::BadCertificate(_)), "{e}");
    assert_eq!(Status::from(e).code(), Code::Unauthenticated);

    // Banned, then evicted.
    st.store.ban_agent(AGENT).await.expect("ban");
    let e = st.authenticate_agent(&leaf(2)).await.expect_err("banned");
    assert!(matches!(e, AgentAuthError::Banned(_)), "{e}");
    assert_eq!(Status::from(e).code(), Code::PermissionDenied);
    st.store.delete_agent(AGENT).await.expect("evict");
    let e = st.authenticate_agent(&leaf(2)).await.expect_err("evicted");
    assert!(matches!(e, AgentAuthError::Unknown(_)), "{e}");
}

/// A large batch is signed on every core and still answered in request
/// order, each result for its own request (refusals in their places).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_keeps_request_order() {
    let f = fixture().await;
    let st = &f.st;
    let ids = ["e-web", "e-long", "e-other", "e-short"];
    let reqs: Vec<X509Request> = (0..64).map(|i| x509(ids[i % ids.len()])).collect();
    let out = issuance::sign_x509(st, &agent(), reqs, SystemTime::now())
        .await
        .expect("batch");
    assert_eq!(out.len(), 64);
    let mut serials = std::collections::HashSet::new();
    for (i, r) in out.iter().enumerate() {
        match (ids[i % ids.len()], r) {
            ("e-other", Err(Refusal::NotParented(id))) => assert_eq!(id, "e-other"),
            (id, Ok(s)) => {
                let path = id.trim_start_matches("e-");
                assert_eq!(s.spiffe_id, format!("spiffe://example.org/{path}"), "#{i}");
                assert!(serials.insert(s.serial.clone()), "serials are unique");
            }
            (id, other) => panic!("#{i} ({id}): {other:?}"),
        }
    }
    assert_eq!(serials.len(), 48);
}
