//! Renewal of the agent's own SVID, and the time left on the credentials
//! the agent holds (which bounds every retry).

use std::sync::Arc;
use std::time::Duration;

use super::Agent;
use crate::cache::renew_at;
use crate::identity_store::AgentIdentity;
use crate::node_api::{ClientError, RetrySchedule, is_server_failure, new_key_and_csr};

impl Agent {
    /// Renews the agent SVID at `rotation_fraction` of its lifetime (at once
    /// when its authority is tainted), retrying on failure.
    pub(super) async fn renew_agent_loop(self: Arc<Self>, mut id: AgentIdentity) {
        let mut schedule = RetrySchedule::new(self.config.max_backoff);
        let mut at = renew_at(
            self.clock.now(),
            id.info.not_after,
            self.config.rotation_fraction,
        );
        loop {
            let tainted = |id: &AgentIdentity| {
                id.chain
                    .first()
                    .and_then(|l| meshid_identity::svid::authority_key_id(l))
                    .is_some_and(|a| self.snapshot.borrow().tainted.contains(&a))
            };
            if !tainted(&id) {
                tokio::select! {
                    () = tokio::time::sleep(self.clock.until(at)) => {},
                    () = self.renew_kick.notified() => {
                        if !tainted(&id) { continue; }
                    },
                }
            }
            if tainted(&id) {
                tracing::warn!(spiffe_id = %id.info.spiffe_id, "agent SVID was signed by a tainted authority; renewing now");
            }
            let mut generation = None;
            let res: Result<_, ClientError> = async {
                let (key, csr) = new_key_and_csr()?;
                let call = self.node.renew_agent(csr).await;
                generation = Some(call.generation);
                let r = call.result?;
                let svid = r
                    .svid
                    .ok_or_else(|| ClientError::Identity("no SVID in renewal".into()))?;
                let new = AgentIdentity::new(&svid, key)?;
                if let Some(b) = &r.bundle {
                    self.ids.save(&new, b)?;
                }
                Ok(new)
            }
            .await;
            match res {
                Ok(new) => {
                    schedule.succeeded();
                    self.node.set_identity(&new).ok();
                    self.identity.store(Arc::new(new.clone()));
                    id = new;
                    self.metrics
                        .agent_not_after
                        .set(meshid_identity::svid::unix(id.info.not_after));
                    let na = id.info.not_after;
                    self.publish(|s| s.agent_not_after = Some(na));
                    at = renew_at(
                        self.clock.now(),
                        id.info.not_after,
                        self.config.rotation_fraction,
                    );
                    tracing::info!(spiffe_id = %id.info.spiffe_id, serial = %id.info.serial, "agent SVID renewed");
                }
                Err(e) => {
                    self.metrics.agent_renewal_failures.inc();
                    if id.info.not_after <= self.clock.now() {
                        tracing::error!(error = %e, not_after = %humantime::format_rfc3339_seconds(id.info.not_after),
                            "agent SVID has EXPIRED and cannot be renewed; workloads keep their current SVIDs until they expire. Re-attest with a new join token (restart with --join-token)");
                    } else {
                        tracing::warn!(error = %e, "agent SVID renewal failed; retrying");
                    }
                    if let ClientError::Status(s) = &e
                        && is_server_failure(s)
                        && let Some(g) = generation
                    {
                        self.node.fail_over(g);
                    }
                    let now = self.clock.now();
                    let left = id.info.not_after.duration_since(now).ok();
                    at = now + schedule.next_delay(self.node.server_count(), left);
                }
            }
        }
    }

    /// Time left on the soonest-expiring credential still valid: the agent
    /// SVID or a workload SVID. Retries never wait longer than a fraction of
    /// it (see [`RetrySchedule`]).
    pub(super) fn time_left(&self) -> Option<Duration> {
        let now = self.clock.now();
        let snap = self.snapshot.borrow().clone();
        std::iter::once(self.identity.load().info.not_after)
            .chain(snap.svids.values().map(|s| s.not_after))
            .filter_map(|t| t.duration_since(now).ok())
            .filter(|d| !d.is_zero())
            .min()
    }
}
