//! The node API's calls of a staged trust change (`safe_ops/rollout.rs`):
//! a canary's probe SVID, signed by the authority the change puts to work,
//! and its verdict.

use std::time::SystemTime;

use meshid_identity::svid::unix;
use meshid_proto::node::{
    ReportTrustCheckRequest, ReportTrustCheckResponse, SignTrustProbeRequest,
    SignTrustProbeResponse,
};
use tonic::Status;

use super::admin_ca::ca_status;
use crate::audit::Event;
use crate::state::ServerState;
use crate::store::AgentRecord;

/// `SignTrustProbe`: only for a canary of the running rollout, only for its
/// own ID; audited, not recorded as issued (it is never live).
pub async fn sign_trust_probe(
    st: &ServerState,
    agent: &AgentRecord,
    r: SignTrustProbeRequest,
) -> Result<SignTrustProbeResponse, Status> {
    let authority = st
        .rollouts
        .probe_authority(&agent.spiffe_id, &r.rollout_id)?;
    let journal = st.ca.journal().await.map_err(ca_status)?;
    let svid = st
        .ca
        .sign_probe(
            &authority,
            &journal,
            &r.csr,
            &agent.spiffe_id,
            SystemTime::now(),
        )
        .map_err(ca_status)?;
    st.audit
        .record(vec![
            Event::new("trust_probe_issued")
                .with("rollout", r.rollout_id)
                .with("agent", agent.spiffe_id.clone())
                .with("authority", authority)
                .with("serial", svid.serial.clone())
                .with("not_after", unix(svid.not_after)),
        ])
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    Ok(SignTrustProbeResponse {
        cert_chain: svid.chain,
    })
}

/// `ReportTrustCheck`: a canary's verdict (the first one counts), audited.
pub async fn report_trust_check(
    st: &ServerState,
    agent: &AgentRecord,
    r: ReportTrustCheckRequest,
) -> Result<ReportTrustCheckResponse, Status> {
    st.rollouts
        .report(&agent.spiffe_id, &r.rollout_id, r.ok, &r.reason)?;
    let reason = crate::audit::truncate(&r.reason, 1024).into_owned();
    st.audit
        .record(vec![
            Event::new("trust_check_reported")
                .with("rollout", r.rollout_id)
                .with("agent", agent.spiffe_id.clone())
                .with("ok", r.ok)
                .with("reason", reason.clone()),
        ])
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    if r.ok {
        tracing::info!(agent = %agent.spiffe_id, "canary agent acknowledged the trust change");
    } else {
        tracing::warn!(agent = %agent.spiffe_id, reason = %reason, "canary agent refused the trust change");
    }
    Ok(ReportTrustCheckResponse {})
}
