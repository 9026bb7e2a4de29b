//! Issuance: the one path every certificate and token the server hands out
//! takes. For each request, in this order:
//!
//! 1. **authorize**: the entry exists and is parented by the calling agent
//!    (or one of its aliases);
//! 2. **TTL policy**: the entry's TTL, else the configured default, never
//!    above `max_svid_ttl` (the CA and JWT key cap it again at their own end);
//! 3. **sign** with the CA manager's signer in use (CSR checks and the SPIFFE
//!    ID's validity happen inside the signer);
//! 4. **record**: the issuance journal (serial, SPIFFE ID, entry, agent,
//!    notAfter, signing CA) and the audit events are committed together,
//!    before anything is returned — nothing leaves unrecorded;
//! 5. **count**: issued/refused metrics and the signing latency.
//!
//! The node API only translates between the wire and these types. Time is a
//! parameter (`now`), so tests choose it.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use meshid_identity::svid::unix;
use meshid_proto::types::Entry;

use crate::audit::Event;
use crate::ca::jwt::SignedJwt;
use crate::ca::{IssueError, IssuedSvid};
use crate::journal::JournalError;
use crate::metrics::OutcomeLabels;
use crate::signing_pool::PoolError;
use crate::state::ServerState;
use crate::store::{AgentRecord, IssuedRecord, StoreError};

/// Why a whole batch was refused or could not be recorded.
#[derive(Debug, thiserror::Error)]
pub enum IssuanceError {
    /// The batch is empty or larger than `max_sign_batch`.
    #[error("a batch holds 1 to {max} requests, got {got}")]
    BatchSize {
        /// The configured maximum.
        max: usize,
        /// What the caller sent.
        got: usize,
    },
    /// The store could not be read.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The CSR or the SPIFFE ID could not be signed.
    #[error(transparent)]
    Invalid(#[from] IssueError),
    /// The journal or the audit log could not record the issuance, so
    /// nothing was handed out.
    #[error("not recorded, so not issued: {0}")]
    NotRecorded(#[from] JournalError),
    /// The signing threads failed the batch (nothing was handed out).
    #[error("signing: {0}")]
    Signing(#[from] PoolError),
}

/// Why one request of a batch was not served (the others still are).
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// No such entry.
    #[error("entry {0:?} does not exist")]
    NoEntry(String),
    /// The entry exists but is not parented by the calling agent.
    #[error("entry {0} is not parented by this agent")]
    NotParented(String),
    /// A JWT request without an audience.
    #[error("audience is required")]
    NoAudience,
    /// The CSR or the entry could not be signed.
    #[error(transparent)]
    Invalid(#[from] IssueError),
    /// The JWT key could not sign.
    #[error("signing failed: {0}")]
    Signing(String),
}

impl Refusal {
    /// The metric outcome label.
    fn outcome(&self) -> &'static str {
        match self {
            Refusal::NoEntry(_) => "not_found",
            Refusal::NotParented(_) => "denied",
            Refusal::NoAudience | Refusal::Invalid(_) | Refusal::Signing(_) => "invalid",
        }
    }
}

/// One X509-SVID request: an entry and the workload's CSR (DER).
#[derive(Debug, Clone)]
pub struct X509Request {
    /// The registration entry to sign for.
    pub entry_id: String,
    /// PKCS#10 DER, made on the node.
    pub csr: Vec<u8>,
}

/// One JWT-SVID request.
#[derive(Debug, Clone)]
pub struct JwtRequest {
    /// The registration entry to sign for.
    pub entry_id: String,
    /// The token's audiences (at least one).
    pub audience: Vec<String>,
}

/// A signed JWT-SVID and the SPIFFE ID it names.
#[derive(Debug, Clone)]
pub struct IssuedJwt {
    /// The entry's SPIFFE ID (`sub`).
    pub spiffe_id: String,
    /// The token and its times.
    pub jwt: SignedJwt,
}

/// The TTL an entry's X509-SVID gets: its own, else the default, never above
/// `max_svid_ttl`.
pub fn x509_ttl(st: &ServerState, entry: &Entry) -> Duration {
    ttl_or(entry.x509_svid_ttl, st.config.default_svid_ttl).min(st.config.max_svid_ttl)
}

/// The TTL an entry's JWT-SVID gets: its own, else the default, never above
/// `max_svid_ttl`.
pub fn jwt_ttl(st: &ServerState, entry: &Entry) -> Duration {
    ttl_or(entry.jwt_svid_ttl, st.config.default_jwt_svid_ttl).min(st.config.max_svid_ttl)
}

fn ttl_or(secs: i64, default: Duration) -> Duration {
    match u64::try_from(secs) {
        Ok(0) | Err(_) => default,
        Ok(s) => Duration::from_secs(s),
    }
}

/// Step 1: the entries a batch names, each authorized for `agent`.
async fn authorize(
    st: &ServerState,
    agent: &AgentRecord,
    ids: Vec<String>,
) -> Result<Vec<Result<Entry, Refusal>>, IssuanceError> {
    let max = st.config.max_sign_batch;
    if ids.is_empty() || ids.len() > max {
        return Err(IssuanceError::BatchSize {
            max,
            got: ids.len(),
        });
    }
    let found: HashMap<String, Entry> = st
        .store
        .get_entries(&ids)
        .await?
        .into_iter()
        .map(|e| (e.id.clone(), e))
        .collect();
    let parents = agent.parent_ids();
    Ok(ids
        .into_iter()
        .map(|id| {
            let entry = found
                .get(&id)
                .cloned()
                .ok_or_else(|| Refusal::NoEntry(id.clone()))?;
            if !parents.contains(&entry.parent_id) {
                tracing::warn!(agent = %agent.spiffe_id, entry = %id, "signing refused: entry not parented by agent");
                return Err(Refusal::NotParented(id));
            }
            Ok(entry)
        })
        .collect())
}

/// The audit event of a refusal worth recording (an agent asking for what
/// it may not have); other refusals are only counted.
fn refusal_event(kind: &str, agent: &AgentRecord, r: &Refusal) -> Option<Event> {
    match r {
        Refusal::NotParented(id) => Some(
            Event::new(&format!("{kind}_svid_refused"))
                .with("agent", agent.spiffe_id.clone())
                .with("entry_id", id.clone())
                .with("reason", r.to_string()),
        ),
        _ => None,
    }
}

/// Smallest share of a batch worth a thread of its own (about 1 ms of
/// signing); below it a batch is one job.
const MIN_PER_SIGNING_THREAD: usize = 16;

/// How many jobs a batch of `n` is cut into: one per signing thread, each
/// with at least [`MIN_PER_SIGNING_THREAD`] certificates.
fn signing_jobs(n: usize, threads: usize) -> usize {
    threads.min(n / MIN_PER_SIGNING_THREAD).max(1)
}

/// One X.509 request as the signing threads take it.
type X509Job = ((Result<Entry, Refusal>, Vec<u8>), Duration);

/// Signs one request (CSR verification included) on a signing thread.
fn sign_one(
    ca: &crate::ca::SigningCa,
    ((entry, csr), ttl): X509Job,
    now: SystemTime,
) -> (Option<String>, Result<IssuedSvid, Refusal>) {
    match entry {
        Err(r) => (None, Err(r)),
        Ok(e) => (
            Some(e.id.clone()),
            ca.sign_x509_svid(&csr, &e.spiffe_id, &e.dns_names, ttl, now)
                .map_err(Refusal::from),
        ),
    }
}

/// Signs a batch of X509-SVIDs for `agent`: one result per request, in
/// order. Refused requests do not stop the others; nothing is returned
/// unless the journal and the audit log recorded every issued SVID.
pub async fn sign_x509(
    st: &ServerState,
    agent: &AgentRecord,
    requests: Vec<X509Request>,
    now: SystemTime,
) -> Result<Vec<Result<IssuedSvid, Refusal>>, IssuanceError> {
    let started = Instant::now();
    let (ids, csrs): (Vec<String>, Vec<Vec<u8>>) =
        requests.into_iter().map(|r| (r.entry_id, r.csr)).unzip();
    let authorized = authorize(st, agent, ids).await?;
    let ca = st.ca.signer();
    let jobs: Vec<(Result<Entry, Refusal>, Vec<u8>)> = authorized.into_iter().zip(csrs).collect();
    let ttls: Vec<Duration> = jobs
        .iter()
        .map(|(e, _)| e.as_ref().map_or(Duration::ZERO, |e| x509_ttl(st, e)))
        .collect();
    // Signing is CPU work: on the signing pool (one thread per core, first
    // come first served), a large batch cut into one job per thread, the
    // results put back in request order.
    let signed: Vec<(Option<String>, Result<IssuedSvid, Refusal>)> = {
        let mut rest: Vec<X509Job> = jobs.into_iter().zip(ttls).collect();
        let n = rest.len();
        let size = n.div_ceil(signing_jobs(n, st.signing.threads()));
        let mut queued = Vec::new();
        while !rest.is_empty() {
            let tail = rest.split_off(size.min(rest.len()));
            let part = std::mem::replace(&mut rest, tail);
            let ca = ca.clone();
            queued.push(st.signing.submit(move || {
                part.into_iter()
                    .map(|job| sign_one(&ca, job, now))
                    .collect::<Vec<_>>()
            })?);
        }
        let mut out = Vec::with_capacity(n);
        for part in queued {
            out.extend(part.await?);
        }
        out
    };
    let mut records = Vec::new();
    let mut events = Vec::new();
    for (entry_id, r) in &signed {
        match r {
            Ok(s) => {
                let rec = IssuedRecord {
                    serial: s.serial.clone(),
                    spiffe_id: s.spiffe_id.clone(),
                    entry_id: entry_id.clone().unwrap_or_default(),
                    agent_id: agent.spiffe_id.clone(),
                    not_after: unix(s.not_after),
                    issued_at: unix(now),
                    ca_id: ca.id().to_string(),
                };
                events.push(
                    Event::new("x509_svid_issued")
                        .with("serial", rec.serial.clone())
                        .with("spiffe_id", rec.spiffe_id.clone())
                        .with("entry_id", rec.entry_id.clone())
                        .with("agent", rec.agent_id.clone())
                        .with("not_after", rec.not_after),
                );
                records.push(rec);
            }
            Err(r) => events.extend(refusal_event("x509", agent, r)),
        }
    }
    let ok = records.len() as u64;
    let recorded = st.journal.commit(records, events).await;
    let m = &st.metrics;
    let latency = |outcome| {
        m.sign_latency
            .get_or_create(&OutcomeLabels { outcome })
            .observe(started.elapsed().as_secs_f64());
    };
    if let Err(e) = recorded {
        m.issued("x509", "error", ok);
        latency("error");
        return Err(IssuanceError::NotRecorded(e));
    }
    m.issued("x509", "ok", ok);
    for (_, r) in &signed {
        if let Err(r) = r {
            m.issued("x509", r.outcome(), 1);
        }
    }
    latency(if ok as usize == signed.len() {
        "ok"
    } else {
        "partial"
    });
    Ok(signed.into_iter().map(|(_, r)| r).collect())
}

/// Signs a batch of JWT-SVIDs for `agent`, one result per request, in
/// order; the audit events are recorded before anything is returned.
pub async fn sign_jwt(
    st: &ServerState,
    agent: &AgentRecord,
    requests: Vec<JwtRequest>,
    now: SystemTime,
) -> Result<Vec<Result<IssuedJwt, Refusal>>, IssuanceError> {
    let ids = requests.iter().map(|r| r.entry_id.clone()).collect();
    let authorized = authorize(st, agent, ids).await?;
    let key = st.ca.jwt_signer();
    let max_exp = now + st.config.max_svid_ttl;
    let mut events = Vec::new();
    let results: Vec<Result<IssuedJwt, Refusal>> = authorized
        .into_iter()
        .zip(requests)
        .map(|(entry, req)| {
            let e = entry?;
            if req.audience.is_empty() || req.audience.iter().any(String::is_empty) {
                return Err(Refusal::NoAudience);
            }
            let jwt = key
                .sign(&e.spiffe_id, &req.audience, jwt_ttl(st, &e), now, max_exp)
                .map_err(|err| Refusal::Signing(err.to_string()))?;
            events.push(
                Event::new("jwt_svid_issued")
                    .with("spiffe_id", e.spiffe_id.clone())
                    .with("entry_id", e.id.clone())
                    .with("agent", agent.spiffe_id.clone())
                    .with("audience", req.audience)
                    .with("kid", key.kid())
                    .with("expires_at", jwt.expires_at),
            );
            Ok(IssuedJwt {
                spiffe_id: e.spiffe_id,
                jwt,
            })
        })
        .collect();
    for r in &results {
        if let Err(r) = r {
            events.extend(refusal_event("jwt", agent, r));
        }
    }
    st.journal
        .commit(Vec::new(), events)
        .await
        .map_err(IssuanceError::NotRecorded)?;
    let m = &st.metrics;
    for r in &results {
        m.issued("jwt", r.as_ref().map_or_else(Refusal::outcome, |_| "ok"), 1);
    }
    Ok(results)
}

/// Signs an agent's or the server's own SVID (no registration entry: the
/// caller has authenticated the subject), then records it like any other.
/// `kind` is the metric and audit label (`agent`, `server`).
pub async fn sign_identity(
    st: &ServerState,
    csr: &[u8],
    spiffe_id: &str,
    ttl: Duration,
    kind: &'static str,
    now: SystemTime,
) -> Result<IssuedSvid, IssuanceError> {
    let ttl = ttl.min(st.config.max_svid_ttl);
    let ca = st.ca.signer();
    let svid = match ca.sign_x509_svid(csr, spiffe_id, &[], ttl, now) {
        Ok(s) => s,
        Err(e) => {
            st.metrics.issued(kind, "invalid", 1);
            return Err(IssuanceError::from(e));
        }
    };
    let rec = IssuedRecord {
        serial: svid.serial.clone(),
        spiffe_id: svid.spiffe_id.clone(),
        entry_id: String::new(),
        agent_id: spiffe_id.to_string(),
        not_after: unix(svid.not_after),
        issued_at: unix(now),
        ca_id: ca.id().to_string(),
    };
    let ev = Event::new("x509_svid_issued")
        .with("kind", kind)
        .with("serial", rec.serial.clone())
        .with("spiffe_id", rec.spiffe_id.clone())
        .with("agent", spiffe_id)
        .with("not_after", rec.not_after);
    if let Err(e) = st.journal.commit(vec![rec], vec![ev]).await {
        tracing::error!(error = %e, "cannot record an issued certificate; not handing it out");
        st.metrics.issued(kind, "error", 1);
        return Err(IssuanceError::NotRecorded(e));
    }
    st.metrics.issued(kind, "ok", 1);
    Ok(svid)
}
