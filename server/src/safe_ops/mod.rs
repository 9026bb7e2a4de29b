//! Safe operations: destructive admin changes (entry delete, agent ban and
//! evict, bundle delete) as **plans** bound to the fingerprints of the rows
//! they touch, **approved** by a second admin identity when
//! `[safe_ops] require_approval` is set, **applied** only if nothing they
//! touch moved, refused over the **blast-radius** limits unless confirmed,
//! and **undone** within the undo window from the recycle area.
//!
//! - [`plan`]: the plan, its file, fingerprints, what moved
//! - [`blast_radius`]: the limits
//! - [`service`]: planning, approval and apply against the store
//! - [`undo`]: the recycle area and undo
//! - [`rollout`]: staged trust changes (canary agents first, halt on refusal)
//!
//! The admin socket's peer uid (SO_PEERCRED) is the admin identity
//! (`uid:<n>`); the gRPC service is `api/admin_safe_ops.rs`.

pub mod blast_radius;
pub mod config;
pub mod plan;
pub mod rollout;
pub mod service;
pub mod undo;

pub use blast_radius::BlastRadius;
pub use config::SafeOpsConfig;
pub use plan::Plan;
pub use service::SafeOps;

use tonic::Status;

use crate::audit::Event;
use crate::state::ServerState;

/// Unix seconds now.
pub(crate) fn now() -> i64 {
    meshid_identity::svid::unix(std::time::SystemTime::now())
}

/// Seconds of a duration, saturating.
pub(crate) fn secs(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// Records audit events; a failed write fails the call.
pub(crate) async fn audit(st: &ServerState, events: Vec<Event>) -> Result<(), Status> {
    st.audit
        .record(events)
        .await
        .map_err(|e| Status::internal(e.to_string()))
}

/// Marks an admin API request made by [`SafeOps`] while applying a plan
/// (a request extension: never set by anything arriving on the socket).
#[derive(Debug, Clone, Copy)]
pub struct Planned;

/// A request carrying the [`Planned`] mark.
pub(crate) fn planned<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.extensions_mut().insert(Planned);
    r
}

/// Whether an admin API request comes from applying a plan.
pub fn is_planned<T>(req: &tonic::Request<T>) -> bool {
    req.extensions().get::<Planned>().is_some()
}

/// With `require_approval`, a destructive admin call that is not a dry run
/// must come from an approved plan: a direct call would bypass the approval.
pub fn refuse_unplanned(st: &ServerState, planned: bool, dry_run: bool) -> Result<(), Status> {
    if st.config.safe_ops.require_approval && !planned && !dry_run {
        return Err(Status::failed_precondition(
            "[safe_ops] require_approval is on: make a plan with --plan FILE, have another \
             admin approve it (`meshid server approve FILE`), then `meshid server apply FILE`",
        ));
    }
    Ok(())
}
