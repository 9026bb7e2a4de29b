//! Staged trust changes: an operator's X.509 CA activation or taint goes to
//! a canary share of agents first. Each canary gets a [`TrustCheckRequest`] on its sync
//! stream, has a probe SVID for its own ID signed by the candidate authority
//! (`SignTrustProbe`; for a taint, by the active authority the agents will
//! re-mint under), checks the change locally (its SVIDs against the
//! bundle after the change, the probe against the bundle it holds, an mTLS
//! handshake between the probe and its own SVID) and answers
//! `ReportTrustCheck`. The change is applied only when every canary
//! acknowledged within `[safe_ops] canary_timeout`; otherwise it halts: the
//! authority stays as it was (a candidate stays prepared and is held back
//! from automatic activation),
//! `trust_rollout_halted` is audited with the refusing agents and their
//! reasons, and `meshid_server_trust_rollouts_total{outcome="halted"}` counts it.
//!
//! The state of a rollout lives in memory on the server that runs it (the
//! one that owns the authority, as every CA transition does): canaries
//! synced to another server sharing the store never see the request, time
//! out, and the change halts — the safe direction. `ca show` and
//! `ca rollout status` report the running or latest rollout of the server
//! they ask.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use meshid_identity::svid::unix;
use meshid_proto::admin::{TrustCheckVerdict, TrustRollout};
use meshid_proto::node::TrustCheckRequest;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tonic::Status;

use crate::api::admin_ca::ca_status;
use crate::audit::Event;
use crate::ca::manager::Outcome;
use crate::state::ServerState;

/// A canary's verdict.
pub mod verdict {
    /// Not answered yet.
    pub const PENDING: &str = "pending";
    /// The change checked out.
    pub const OK: &str = "ok";
    /// The canary refused the change.
    pub const REFUSED: &str = "refused";
    /// No answer before the timeout.
    pub const TIMED_OUT: &str = "timed_out";
}

/// A rollout's state.
pub mod rollout_state {
    /// Waiting for the canaries.
    pub const RUNNING: &str = "running";
    /// Applied to every agent.
    pub const COMPLETED: &str = "completed";
    /// Not applied.
    pub const HALTED: &str = "halted";
}

/// The trust changes that can be staged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// `ca activate`: the candidate signs from now on. Probes are signed by
    /// the candidate.
    Activate,
    /// `ca taint`: agents re-mint what the authority signed now, under the
    /// active CA. Probes are signed by the active CA.
    Taint,
}

impl Change {
    /// The name in records and output.
    pub fn label(self) -> &'static str {
        match self {
            Change::Activate => "activate",
            Change::Taint => "taint",
        }
    }
}

/// A staged change waiting for its canaries.
#[derive(Debug)]
struct Running {
    id: String,
    change: Change,
    kind: String,
    /// The authority the change is about.
    authority_id: String,
    /// The authority that signs the canaries' probes.
    probe_signer: String,
    roots: Vec<Vec<u8>>,
    deadline: i64,
    other_agents: i64,
    started_at: i64,
    /// Canary agent -> (verdict, reason).
    verdicts: Mutex<BTreeMap<String, (String, String)>>,
    /// Signalled on each verdict.
    reported: Notify,
}

impl Running {
    fn verdicts(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (String, String)>> {
        self.verdicts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn snapshot(&self, state: &str, finished_at: i64, reason: String) -> TrustRollout {
        TrustRollout {
            id: self.id.clone(),
            change: self.change.label().into(),
            kind: self.kind.clone(),
            authority_id: self.authority_id.clone(),
            state: state.into(),
            canaries: self
                .verdicts()
                .iter()
                .map(|(a, (v, r))| TrustCheckVerdict {
                    agent_id: a.clone(),
                    verdict: v.clone(),
                    reason: r.clone(),
                })
                .collect(),
            other_agents: self.other_agents,
            started_at: self.started_at,
            finished_at,
            reason,
        }
    }
}

/// The staged trust changes of this server: at most one running, and the
/// latest finished one.
#[derive(Debug, Default)]
pub struct Rollouts {
    running: ArcSwapOption<Running>,
    last: Mutex<Option<TrustRollout>>,
    one_at_a_time: tokio::sync::Mutex<()>,
}

/// The first `share` of `agents` by the SHA-256 of their ID (at least one
/// when there are agents): the same agents for the same set, whichever
/// server or run selects them.
pub fn select_canaries(agents: &[String], share: f64) -> Vec<String> {
    if agents.is_empty() || share <= 0.0 {
        return Vec::new();
    }
    let mut ranked: Vec<([u8; 32], &String)> = agents
        .iter()
        .map(|a| (Sha256::digest(a.as_bytes()).into(), a))
        .collect();
    ranked.sort();
    ranked.dedup_by(|x, y| x.1 == y.1);
    let len = ranked.len();
    // A small allowance so that 0.1 × 10 is one agent, not two.
    let n = ((share.min(1.0) * len as f64) - 1e-9).ceil().max(1.0) as usize;
    ranked
        .into_iter()
        .take(n.min(len))
        .map(|(_, a)| a.clone())
        .collect()
}

impl Rollouts {
    /// What `agent`'s sync message asks of it: a check, while it is a
    /// canary of a running change that has not had its answer.
    pub fn check_for(&self, agent: &str) -> Option<TrustCheckRequest> {
        let r = self.running.load_full()?;
        let pending = r
            .verdicts()
            .get(agent)
            .is_some_and(|(v, _)| v == verdict::PENDING);
        pending.then(|| TrustCheckRequest {
            rollout_id: r.id.clone(),
            authority_id: r.probe_signer.clone(),
            change: r.change.label().into(),
            x509_roots: r.roots.clone(),
            deadline: r.deadline,
        })
    }

    /// The authority a canary's probe is signed by; refused for anyone but
    /// a canary of the running change.
    pub fn probe_authority(&self, agent: &str, rollout_id: &str) -> Result<String, Status> {
        let r = self
            .running
            .load_full()
            .filter(|r| r.id == rollout_id)
            .ok_or_else(|| Status::failed_precondition("no such trust rollout is running"))?;
        if !r.verdicts().contains_key(agent) {
            return Err(Status::permission_denied(
                "this agent is not a canary of the trust rollout",
            ));
        }
        Ok(r.probe_signer.clone())
    }

    /// Records a canary's verdict (the first one counts).
    pub fn report(
        &self,
        agent: &str,
        rollout_id: &str,
        ok: bool,
        reason: &str,
    ) -> Result<(), Status> {
        let r = self
            .running
            .load_full()
            .filter(|r| r.id == rollout_id)
            .ok_or_else(|| Status::failed_precondition("no such trust rollout is running"))?;
        let mut v = r.verdicts();
        let slot = v.get_mut(agent).ok_or_else(|| {
            Status::permission_denied("this agent is not a canary of the trust rollout")
        })?;
        if slot.0 == verdict::PENDING {
            let reason = crate::audit::truncate(reason, 1024).into_owned();
            *slot = if ok {
                (verdict::OK.into(), String::new())
            } else {
                (verdict::REFUSED.into(), reason)
            };
            drop(v);
            r.reported.notify_one();
        }
        Ok(())
    }

    /// The running rollout, else the latest finished one.
    pub fn status(&self) -> Option<TrustRollout> {
        if let Some(r) = self.running.load_full() {
            return Some(r.snapshot(rollout_state::RUNNING, 0, String::new()));
        }
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn finish(&self, r: &Running, state: &str, reason: String) -> TrustRollout {
        let done = r.snapshot(state, unix(SystemTime::now()), reason);
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(done.clone());
        self.running.store(None);
        done
    }
}

fn describe(r: &TrustRollout) -> String {
    r.canaries
        .iter()
        .filter(|c| c.verdict != verdict::OK)
        .map(|c| {
            if c.reason.is_empty() {
                format!("{} {}", c.agent_id, c.verdict)
            } else {
                format!("{} {}: {}", c.agent_id, c.verdict, c.reason)
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// `ca activate` or `ca taint` of an X.509 authority with a canary stage:
/// checks the change as its dry run would, sends it to `share` of the
/// agents, waits for their verdicts, and applies it only when every canary
/// acknowledged in time.
pub async fn run_staged(
    st: &Arc<ServerState>,
    change: Change,
    kind: &str,
    id: &str,
    share: f64,
) -> Result<(Outcome, TrustRollout), Status> {
    let rollouts = &st.rollouts;
    let _one = rollouts.one_at_a_time.try_lock().map_err(|_| {
        Status::failed_precondition(
            "another trust rollout is running (see `meshid server ca rollout status`)",
        )
    })?;
    // Everything the change itself would refuse is refused now.
    let dry = match change {
        Change::Activate => st.ca.activate(kind, id, true).await,
        Change::Taint => st.ca.taint(kind, id, true).await,
    }
    .map_err(ca_status)?;
    let candidate = dry
        .changed
        .iter()
        .find(|a| a.state == crate::ca::schedule::state::ACTIVE || change == Change::Taint)
        .map(|a| a.id.clone())
        .ok_or_else(|| Status::internal("the change names no authority"))?;
    let probe_signer = match change {
        Change::Activate => candidate.clone(),
        Change::Taint => st.ca.signer().id().to_string(),
    };
    let label = change.label();
    let now = SystemTime::now();
    let t = unix(now);
    let agents: Vec<String> = st
        .store
        .list_agents()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?
        .into_iter()
        .filter(|a| !a.banned && a.expires_at > t)
        .map(|a| a.spiffe_id)
        .collect();
    let canaries = select_canaries(&agents, share);
    let material = st.ca.bundle_material(now).await.map_err(ca_status)?;
    let timeout = st.config.safe_ops.canary_timeout;
    let running = Arc::new(Running {
        id: uuid::Uuid::new_v4().simple().to_string(),
        change,
        kind: kind.into(),
        authority_id: candidate.clone(),
        probe_signer,
        roots: material.x509.roots,
        deadline: t + super::secs(timeout),
        other_agents: i64::try_from(agents.len() - canaries.len()).unwrap_or(i64::MAX),
        started_at: t,
        verdicts: Mutex::new(
            canaries
                .iter()
                .map(|a| (a.clone(), (verdict::PENDING.into(), String::new())))
                .collect(),
        ),
        reported: Notify::new(),
    });
    super::audit(
        st,
        vec![
            Event::new("trust_rollout_started")
                .with("rollout", running.id.clone())
                .with("change", label)
                .with("kind", kind)
                .with("authority", candidate.clone())
                .with("canaries", canaries.clone())
                .with("other_agents", running.other_agents),
        ],
    )
    .await?;
    tracing::info!(rollout = %running.id, authority = %candidate, canaries = ?canaries, "trust rollout started: canary agents check the change first");
    rollouts.running.store(Some(running.clone()));
    st.notify_change();
    let until = tokio::time::Instant::now() + timeout;
    loop {
        if running
            .verdicts()
            .values()
            .all(|(v, _)| v != verdict::PENDING)
        {
            break;
        }
        if tokio::time::timeout_at(until, running.reported.notified())
            .await
            .is_err()
        {
            for (v, r) in running.verdicts().values_mut() {
                if v == verdict::PENDING {
                    *v = verdict::TIMED_OUT.into();
                    *r = format!("no answer within {}", humantime::format_duration(timeout));
                }
            }
            break;
        }
    }
    let all_ok = running.verdicts().values().all(|(v, _)| v == verdict::OK);
    if !all_ok {
        if change == Change::Activate {
            st.ca.hold(&candidate);
        }
        let why = describe(&running.snapshot(rollout_state::HALTED, 0, String::new()));
        let done = rollouts.finish(
            &running,
            rollout_state::HALTED,
            format!("canary agents refused the change: {why}"),
        );
        st.notify_change();
        st.metrics.trust_rollout(rollout_state::HALTED);
        let refusing: Vec<serde_json::Value> = done
            .canaries
            .iter()
            .filter(|c| c.verdict != verdict::OK)
            .map(|c| serde_json::json!({"agent": c.agent_id, "verdict": c.verdict, "reason": c.reason}))
            .collect();
        super::audit(
            st,
            vec![
                Event::new("trust_rollout_halted")
                    .with("rollout", done.id.clone())
                    .with("change", label)
                    .with("kind", kind)
                    .with("authority", candidate.clone())
                    .with("refusing", serde_json::Value::Array(refusing))
                    .with("other_agents", done.other_agents),
            ],
        )
        .await?;
        tracing::error!(rollout = %done.id, authority = %candidate, reasons = %why, "trust rollout halted: the change was not applied");
        return Err(Status::failed_precondition(format!(
            "trust rollout {} halted: {}; {label} of {kind} authority {candidate} was NOT applied \
             and no other agent received the change (see `meshid server ca rollout status`)",
            done.id, done.reason
        )));
    }
    let applied = match change {
        Change::Activate => st.ca.activate(kind, &candidate, false).await,
        Change::Taint => st.ca.taint(kind, &candidate, false).await,
    };
    let outcome = match applied {
        Ok(o) => o,
        Err(e) => {
            let done = rollouts.finish(
                &running,
                rollout_state::HALTED,
                format!("the {label} failed after the canaries acknowledged: {e}"),
            );
            st.notify_change();
            st.metrics.trust_rollout(rollout_state::HALTED);
            super::audit(
                st,
                vec![
                    Event::new("trust_rollout_halted")
                        .with("rollout", done.id.clone())
                        .with("authority", candidate.clone())
                        .with("reason", done.reason.clone()),
                ],
            )
            .await?;
            return Err(ca_status(e));
        }
    };
    let done = rollouts.finish(&running, rollout_state::COMPLETED, String::new());
    st.notify_change();
    st.metrics.trust_rollout(rollout_state::COMPLETED);
    super::audit(
        st,
        vec![
            Event::new("trust_rollout_completed")
                .with("rollout", done.id.clone())
                .with("change", label)
                .with("kind", kind)
                .with("authority", candidate.clone())
                .with("canaries", canaries)
                .with("other_agents", done.other_agents),
        ],
    )
    .await?;
    tracing::info!(rollout = %done.id, authority = %candidate, "trust rollout completed: the change applies to every agent");
    Ok((outcome, done))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("spiffe://example.org/meshid/agent/join_token/{i}"))
            .collect()
    }

    #[test]
    fn canaries_are_a_deterministic_share_and_at_least_one() {
        assert!(select_canaries(&[], 0.25).is_empty());
        assert!(select_canaries(&ids(4), 0.0).is_empty());
        assert_eq!(select_canaries(&ids(4), 0.25).len(), 1);
        assert_eq!(select_canaries(&ids(3), 0.01).len(), 1);
        assert_eq!(select_canaries(&ids(10), 0.1).len(), 1);
        assert_eq!(select_canaries(&ids(10), 0.15).len(), 2);
        assert_eq!(select_canaries(&ids(5), 1.0).len(), 5);
        // Order of the input does not matter.
        let mut rev = ids(8);
        rev.reverse();
        assert_eq!(select_canaries(&ids(8), 0.5), select_canaries(&rev, 0.5));
    }

    #[test]
    fn only_canaries_of_the_running_rollout_are_asked_and_answer() {
        let r = Rollouts::default();
        assert!(r.check_for("a").is_none());
        r.running.store(Some(Arc::new(Running {
            id: "r1".into(),
            change: Change::Activate,
            kind: "x509".into(),
            authority_id: "ca".into(),
            probe_signer: "ca".into(),
            roots: vec![],
            deadline: 0,
            other_agents: 1,
            started_at: 0,
            verdicts: Mutex::new(BTreeMap::from([(
                "a".to_string(),
                (verdict::PENDING.to_string(), String::new()),
            )])),
            reported: Notify::new(),
        })));
        assert_eq!(r.check_for("a").map(|c| c.rollout_id), Some("r1".into()));
        assert!(r.check_for("b").is_none());
        assert!(r.probe_authority("b", "r1").is_err());
        assert!(r.probe_authority("a", "r0").is_err());
        assert_eq!(r.probe_authority("a", "r1").ok(), Some("ca".into()));
        assert!(r.report("b", "r1", true, "").is_err());
        r.report("a", "r1", false, "bad signature").expect("report");
        // The first verdict counts; the check is no longer asked.
        r.report("a", "r1", true, "").expect("report");
        assert!(r.check_for("a").is_none());
        let s = r.status().expect("status");
        assert_eq!(s.canaries[0].verdict, verdict::REFUSED);
        assert_eq!(s.canaries[0].reason, "bad signature");
    }
}
