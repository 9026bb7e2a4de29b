//! The admin API's CA journal calls: list the authorities, and the manual
//! transitions (prepare, activate, retire, taint, revoke, import), each with
//! a dry run that reports its blast radius. After a change the bundle is
//! republished, which the sync streams push to every agent.

use std::sync::Arc;
use std::time::SystemTime;

use meshid_identity::svid::unix;
use meshid_proto::admin::{
    AuthorityActionRequest, AuthorityActionResponse, AuthorityStatus, ImportAuthorityRequest,
    ListAuthoritiesRequest, ListAuthoritiesResponse, LiveSvid,
};
use tonic::Status;

use crate::ca::CaError;
use crate::ca::manager::Outcome;
use crate::ca::mint::{JWT, X509};
use crate::ca::schedule::state;
use crate::safe_ops::rollout::{self, Change};
use crate::state::ServerState;

/// The one mapping of CA errors to gRPC status codes.
pub fn ca_status(e: CaError) -> Status {
    match e {
        CaError::NotFound(_) => Status::not_found(e.to_string()),
        CaError::Refused(_)
        | CaError::Expired { .. }
        | CaError::NotYetValid { .. }
        | CaError::UntrustedChain(_)
        | CaError::Invalid(_) => Status::failed_precondition(e.to_string()),
        CaError::Audit(_) => Status::unavailable(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

fn kind(k: &str) -> Result<&'static str, Status> {
    match k {
        "" | "x509" => Ok(X509),
        "jwt" => Ok(JWT),
        other => Err(Status::invalid_argument(format!(
            "unknown authority kind {other:?}: x509 or jwt"
        ))),
    }
}

fn response(o: Outcome, dry_run: bool) -> AuthorityActionResponse {
    AuthorityActionResponse {
        changed: o.changed,
        affected: o
            .affected
            .into_iter()
            .map(|r| LiveSvid {
                serial: r.serial,
                spiffe_id: r.spiffe_id,
                agent_id: r.agent_id,
                entry_id: r.entry_id,
                not_after: r.not_after,
            })
            .collect(),
        affected_agents: o.affected_agents,
        dry_run,
        summary: o.summary,
        csr_pem: o.csr_pem,
        needs_confirmation: o.needs_confirmation,
        rollout: None,
    }
}

/// Maps the manager's result, republishes the bundle after a real change
/// (which the sync streams push to every agent), and builds the answer.
async fn finish(
    st: &ServerState,
    outcome: Result<Outcome, CaError>,
    dry_run: bool,
) -> Result<AuthorityActionResponse, Status> {
    let o = outcome.map_err(ca_status)?;
    republish(st, dry_run).await?;
    Ok(response(o, dry_run))
}

async fn republish(st: &ServerState, dry_run: bool) -> Result<(), Status> {
    if dry_run {
        return Ok(());
    }
    st.publish_own_bundle()
        .await
        .map_err(|e| Status::failed_precondition(format!("bundle not published: {e}")))?;
    st.ca_changed.notify_one();
    Ok(())
}

/// `ListAuthorities`.
pub async fn list(
    st: &Arc<ServerState>,
    r: ListAuthoritiesRequest,
) -> Result<ListAuthoritiesResponse, Status> {
    let journal = st.ca.journal().await.map_err(ca_status)?;
    let issued = st.ca.issued_by_authority().await.map_err(ca_status)?;
    let (next_at, next) = st
        .next_transition
        .load()
        .as_ref()
        .clone()
        .unwrap_or_default();
    Ok(ListAuthoritiesResponse {
        trust_domain: st.config.trust_domain.clone(),
        authorities: journal
            .into_iter()
            .filter(|a| r.all || a.state != state::REMOVED)
            .map(|a| {
                let (live, last) = issued.get(&a.id).copied().unwrap_or_default();
                AuthorityStatus {
                    authority: Some(a),
                    live_svids: live,
                    last_svid_not_after: last,
                }
            })
            .collect(),
        next_transition_at: next_at,
        next_transition: next,
        last_rollout: st.rollouts.status(),
    })
}

/// `PrepareAuthority`.
pub async fn prepare(
    st: &Arc<ServerState>,
    r: AuthorityActionRequest,
) -> Result<AuthorityActionResponse, Status> {
    let dry_run = r.dry_run;
    finish(
        st,
        st.ca
            .prepare(kind(&r.kind)?, r.upstream_csr, r.dry_run)
            .await,
        dry_run,
    )
    .await
}

/// The canary share of an activation or taint: none for a dry run, with
/// `no_canary`, or for a JWT key (the canaries' self-test is X.509); else
/// the request's, or `[safe_ops] canary_share`.
fn canary_share(st: &ServerState, r: &AuthorityActionRequest, kind: &str) -> Result<f64, Status> {
    if r.canary_percent > 100 {
        return Err(Status::invalid_argument(
            "canary_percent must be between 1 and 100",
        ));
    }
    Ok(if r.no_canary || r.dry_run || kind != X509 {
        0.0
    } else if r.canary_percent > 0 {
        f64::from(r.canary_percent) / 100.0
    } else {
        st.config.safe_ops.canary_share
    })
}

/// Runs `change` through canary agents first (`safe_ops/rollout.rs`), then
/// republishes.
async fn staged(
    st: &Arc<ServerState>,
    change: Change,
    kind: &str,
    id: &str,
    share: f64,
) -> Result<AuthorityActionResponse, Status> {
    // Its own task: an interrupted command does not leave a rollout
    // half-way (it runs to applied or halted either way).
    let (st2, kind2, id2) = (st.clone(), kind.to_string(), id.to_string());
    let (o, rollout) =
        tokio::spawn(async move { rollout::run_staged(&st2, change, &kind2, &id2, share).await })
            .await
            .map_err(|e| Status::internal(format!("trust rollout task: {e}")))??;
    republish(st, false).await?;
    Ok(AuthorityActionResponse {
        rollout: Some(rollout),
        ..response(o, false)
    })
}

/// `ActivateAuthority`: at once, or (with a canary share from the request
/// or `[safe_ops] canary_share`, and not `no_canary`) staged through canary
/// agents first.
pub async fn activate(
    st: &Arc<ServerState>,
    r: AuthorityActionRequest,
) -> Result<AuthorityActionResponse, Status> {
    let dry_run = r.dry_run;
    let k = kind(&r.kind)?;
    let share = canary_share(st, &r, k)?;
    if share > 0.0 {
        return staged(st, Change::Activate, k, &r.id, share).await;
    }
    finish(st, st.ca.activate(k, &r.id, r.dry_run).await, dry_run).await
}

/// `RetireAuthority`.
pub async fn retire(
    st: &Arc<ServerState>,
    r: AuthorityActionRequest,
) -> Result<AuthorityActionResponse, Status> {
    require_id(&r)?;
    let dry_run = r.dry_run;
    finish(
        st,
        st.ca.retire(kind(&r.kind)?, &r.id, r.dry_run).await,
        dry_run,
    )
    .await
}

/// `TaintAuthority`: at once, or staged through canary agents first (as
/// `ActivateAuthority`).
pub async fn taint(
    st: &Arc<ServerState>,
    r: AuthorityActionRequest,
) -> Result<AuthorityActionResponse, Status> {
    require_id(&r)?;
    let dry_run = r.dry_run;
    let k = kind(&r.kind)?;
    let share = canary_share(st, &r, k)?;
    if share > 0.0 {
        return staged(st, Change::Taint, k, &r.id, share).await;
    }
    finish(st, st.ca.taint(k, &r.id, r.dry_run).await, dry_run).await
}

/// `RevokeAuthority`.
pub async fn revoke(
    st: &Arc<ServerState>,
    r: AuthorityActionRequest,
) -> Result<AuthorityActionResponse, Status> {
    require_id(&r)?;
    if r.force && !r.yes && !r.dry_run {
        return Err(Status::invalid_argument(
            "--force revokes an authority live certificates depend on: it needs --yes",
        ));
    }
    let o = st
        .ca
        .revoke(kind(&r.kind)?, &r.id, r.dry_run, r.force, r.yes)
        .await
        .map_err(ca_status)?;
    let done = !r.dry_run && !o.needs_confirmation;
    republish(st, !done).await?;
    Ok(response(o, r.dry_run))
}

/// `ImportAuthority`.
pub async fn import(
    st: &Arc<ServerState>,
    r: ImportAuthorityRequest,
) -> Result<AuthorityActionResponse, Status> {
    let o = st.ca.import(r.chain, r.dry_run).await.map_err(ca_status)?;
    republish(st, r.dry_run).await?;
    Ok(response(o, r.dry_run))
}

fn require_id(r: &AuthorityActionRequest) -> Result<(), Status> {
    if r.id.is_empty() {
        return Err(Status::invalid_argument(
            "an authority id is required (see `meshid server ca show`)",
        ));
    }
    Ok(())
}

/// Seconds left of the active X.509 CA.
pub fn active_remaining(st: &ServerState) -> i64 {
    unix(st.ca.signer().not_after()) - unix(SystemTime::now())
}
