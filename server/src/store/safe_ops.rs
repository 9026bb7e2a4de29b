//! What safe operations persist (`server/src/safe_ops/`): plans, their
//! approvals, the changes applied (each undoable for a while) and the rows a
//! change removed (the recycle area). Both stores implement
//! [`SafeOpsStore`]; rows are read the same way by both (`sqlx::FromRow`).

use async_trait::async_trait;

use super::StoreError;

/// A saved plan: what one destructive operation would change, bound to the
/// fingerprints of the rows it touches.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PlanRow {
    /// Plan id (UUID).
    pub id: String,
    /// `entry_delete`, `agent_ban`, `agent_evict` or `bundle_delete`.
    pub kind: String,
    /// Admin identity that made it (`uid:<n>`).
    pub author: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; the plan cannot be applied after.
    pub expires_at: i64,
    /// The plan itself, JSON.
    pub body: String,
    /// Change that applied it, empty while not applied.
    pub applied_change: String,
}

/// One approval of a plan.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PlanApproval {
    /// The plan.
    pub plan_id: String,
    /// Admin identity that approved (`uid:<n>`).
    pub approver: String,
    /// Unix seconds.
    pub approved_at: i64,
}

/// One applied change.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ChangeRow {
    /// Change id (UUID).
    pub id: String,
    /// Same kinds as [`PlanRow::kind`].
    pub kind: String,
    /// Admin identity that applied it.
    pub actor: String,
    /// Unix seconds.
    pub created_at: i64,
    /// JSON object of counts.
    pub counts: String,
    /// Undo is possible until then, Unix seconds (0: not undoable).
    pub undo_until: i64,
    /// When it was undone, Unix seconds (0: not undone).
    pub undone_at: i64,
}

/// A row a change removed, kept for undo.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RecycleRow {
    /// The change that removed it.
    pub change_id: String,
    /// `entry` (prost-encoded entry) or `agent` (JSON of the agent row).
    pub item_kind: String,
    /// Entry id or agent SPIFFE ID.
    pub item_id: String,
    /// The row's content.
    pub data: Vec<u8>,
    /// Unix seconds; kept until then.
    pub expires_at: i64,
}

/// Storage of safe operations; part of every [`super::Store`].
#[async_trait]
pub trait SafeOpsStore: Send + Sync {
    /// Saves a new plan.
    async fn insert_plan(&self, plan: &PlanRow) -> Result<(), StoreError>;
    /// One plan.
    async fn get_plan(&self, id: &str) -> Result<Option<PlanRow>, StoreError>;
    /// Marks a plan applied by `change_id`; `false` (nothing changes) if it
    /// was applied already or does not exist.
    async fn mark_plan_applied(&self, id: &str, change_id: &str) -> Result<bool, StoreError>;
    /// Records an approval; `false` if that approver approved already.
    async fn add_plan_approval(&self, approval: &PlanApproval) -> Result<bool, StoreError>;
    /// Approvals of one plan, oldest first.
    async fn list_plan_approvals(&self, plan_id: &str) -> Result<Vec<PlanApproval>, StoreError>;
    /// Records a change and the rows it removed, in one transaction.
    async fn record_change(
        &self,
        change: &ChangeRow,
        recycled: &[RecycleRow],
    ) -> Result<(), StoreError>;
    /// The newest changes, newest first, at most `limit`.
    async fn list_changes(&self, limit: i64) -> Result<Vec<ChangeRow>, StoreError>;
    /// One change.
    async fn get_change(&self, id: &str) -> Result<Option<ChangeRow>, StoreError>;
    /// What a change removed.
    async fn list_recycled(&self, change_id: &str) -> Result<Vec<RecycleRow>, StoreError>;
    /// Marks a change undone at `at`; `false` if it was undone already.
    async fn mark_change_undone(&self, id: &str, at: i64) -> Result<bool, StoreError>;
    /// Deletes recycled rows whose undo window ended before `now`; returns
    /// how many.
    async fn purge_recycled(&self, now: i64) -> Result<u64, StoreError>;
    /// Live certificates (as [`super::Store::live_issued_by`] means it) at
    /// `now` issued for one of `entry_ids` or to one of `agent_ids`.
    async fn count_live_issued(
        &self,
        entry_ids: &[String],
        agent_ids: &[String],
        now: i64,
    ) -> Result<i64, StoreError>;
}
