//! The `AdminSafeOps` service on the admin socket: wire <-> `safe_ops`.
//! The caller's identity is its peer uid (SO_PEERCRED), as `uid:<n>`.

use std::sync::Arc;

use meshid_proto::admin::admin_safe_ops_server::AdminSafeOps;
use meshid_proto::admin::{
    ApplyPlanRequest, ApplyPlanResponse, ApprovePlanRequest, ApprovePlanResponse, Change,
    ListChangesRequest, ListChangesResponse, PlanChangeRequest, PlanChangeResponse,
    UndoChangeRequest, UndoChangeResponse,
};
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use crate::safe_ops::SafeOps;
use crate::state::ServerState;
use crate::store::safe_ops::ChangeRow;

/// The safe-operations service.
#[derive(Debug, Clone)]
pub struct SafeOpsService {
    ops: SafeOps,
    require_approval: bool,
}

impl SafeOpsService {
    /// A service over the shared state.
    pub fn new(state: Arc<ServerState>) -> Self {
        Self {
            require_approval: state.config.safe_ops.require_approval,
            ops: SafeOps::new(state),
        }
    }
}

/// The admin identity of a request: `uid:<n>` of the socket's peer.
fn actor<T>(req: &Request<T>) -> Result<String, Status> {
    req.extensions()
        .get::<UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .map(|c| format!("uid:{}", c.uid()))
        .ok_or_else(|| Status::permission_denied("no peer credentials on the admin socket"))
}

fn change_to_proto(c: ChangeRow) -> Change {
    let counts: serde_json::Value = serde_json::from_str(&c.counts).unwrap_or_default();
    let n = |k: &str| counts[k].as_i64().unwrap_or(0);
    Change {
        entries: n("entries"),
        agents: n("agents"),
        live_svids: n("live_svids"),
        plan_id: counts["plan"].as_str().unwrap_or_default().to_string(),
        id: c.id,
        created_at: c.created_at,
        kind: c.kind,
        actor: c.actor,
        undone: c.undone_at != 0,
        undo_until: c.undo_until,
    }
}

#[tonic::async_trait]
impl AdminSafeOps for SafeOpsService {
    async fn plan_change(
        &self,
        req: Request<PlanChangeRequest>,
    ) -> Result<Response<PlanChangeResponse>, Status> {
        let who = actor(&req)?;
        let op = req
            .into_inner()
            .operation
            .ok_or_else(|| Status::invalid_argument("an operation is required"))?;
        let p = self.ops.plan(&who, op).await?;
        Ok(Response::new(PlanChangeResponse {
            plan_id: p.id.clone(),
            plan: p.to_file(),
            over_limit: p.over_limit.unwrap_or_default(),
            require_approval: self.require_approval,
        }))
    }

    async fn approve_plan(
        &self,
        req: Request<ApprovePlanRequest>,
    ) -> Result<Response<ApprovePlanResponse>, Status> {
        let who = actor(&req)?;
        let plan_id = self.ops.approve(&who, &req.into_inner().plan).await?;
        Ok(Response::new(ApprovePlanResponse {
            plan_id,
            approver: who,
        }))
    }

    async fn apply_plan(
        &self,
        req: Request<ApplyPlanRequest>,
    ) -> Result<Response<ApplyPlanResponse>, Status> {
        let who = actor(&req)?;
        let r = req.into_inner();
        let c = self.ops.apply(&who, &r.plan, r.yes).await?;
        Ok(Response::new(ApplyPlanResponse {
            change_id: c.id,
            undo_until: c.undo_until,
        }))
    }

    async fn undo_change(
        &self,
        req: Request<UndoChangeRequest>,
    ) -> Result<Response<UndoChangeResponse>, Status> {
        let who = actor(&req)?;
        let r = self.ops.undo(&who, &req.into_inner().change_id).await?;
        Ok(Response::new(UndoChangeResponse {
            restored_entry_ids: r.entries,
            restored_agents: r.agents,
            restored_bundles: r.bundles,
        }))
    }

    async fn list_changes(
        &self,
        req: Request<ListChangesRequest>,
    ) -> Result<Response<ListChangesResponse>, Status> {
        let limit = match req.into_inner().limit {
            n if n <= 0 => 100,
            n => n.min(10_000),
        };
        let changes = self.ops.list_changes(limit).await?;
        Ok(Response::new(ListChangesResponse {
            changes: changes.into_iter().map(change_to_proto).collect(),
        }))
    }
}
