//! [`SafeOpsStore`] for PostgreSQL.

use async_trait::async_trait;

use super::PostgresStore;
use crate::store::StoreError;
use crate::store::safe_ops::{ChangeRow, PlanApproval, PlanRow, RecycleRow, SafeOpsStore};

#[async_trait]
impl SafeOpsStore for PostgresStore {
    async fn insert_plan(&self, p: &PlanRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO plans (id, kind, author, created_at, expires_at, body, applied_change)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&p.id)
        .bind(&p.kind)
        .bind(&p.author)
        .bind(p.created_at)
        .bind(p.expires_at)
        .bind(&p.body)
        .bind(&p.applied_change)
        .execute(self.pool_ref())
        .await?;
        Ok(())
    }

    async fn get_plan(&self, id: &str) -> Result<Option<PlanRow>, StoreError> {
        Ok(sqlx::query_as("SELECT * FROM plans WHERE id = $1")
            .bind(id)
            .fetch_optional(self.pool_ref())
            .await?)
    }

    async fn mark_plan_applied(&self, id: &str, change_id: &str) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE plans SET applied_change = $1 WHERE id = $2 AND applied_change = ''",
        )
        .bind(change_id)
        .bind(id)
        .execute(self.pool_ref())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn add_plan_approval(&self, a: &PlanApproval) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "INSERT INTO plan_approvals (plan_id, approver, approved_at) VALUES ($1, $2, $3)
             ON CONFLICT (plan_id, approver) DO NOTHING",
        )
        .bind(&a.plan_id)
        .bind(&a.approver)
        .bind(a.approved_at)
        .execute(self.pool_ref())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn list_plan_approvals(&self, plan_id: &str) -> Result<Vec<PlanApproval>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT * FROM plan_approvals WHERE plan_id = $1 ORDER BY approved_at, approver",
        )
        .bind(plan_id)
        .fetch_all(self.pool_ref())
        .await?)
    }

    async fn record_change(
        &self,
        c: &ChangeRow,
        recycled: &[RecycleRow],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool_ref().begin().await?;
        sqlx::query(
            "INSERT INTO changes (id, kind, actor, created_at, counts, undo_until, undone_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&c.id)
        .bind(&c.kind)
        .bind(&c.actor)
        .bind(c.created_at)
        .bind(&c.counts)
        .bind(c.undo_until)
        .bind(c.undone_at)
        .execute(&mut *tx)
        .await?;
        for r in recycled {
            sqlx::query(
                "INSERT INTO recycle (change_id, item_kind, item_id, data, expires_at)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&r.change_id)
            .bind(&r.item_kind)
            .bind(&r.item_id)
            .bind(&r.data)
            .bind(r.expires_at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn list_changes(&self, limit: i64) -> Result<Vec<ChangeRow>, StoreError> {
        Ok(
            sqlx::query_as("SELECT id, kind, actor, created_at, counts, undo_until, undone_at FROM changes ORDER BY created_at DESC, seq DESC LIMIT $1")
                .bind(limit)
                .fetch_all(self.pool_ref())
                .await?,
        )
    }

    async fn get_change(&self, id: &str) -> Result<Option<ChangeRow>, StoreError> {
        Ok(sqlx::query_as("SELECT id, kind, actor, created_at, counts, undo_until, undone_at FROM changes WHERE id = $1")
            .bind(id)
            .fetch_optional(self.pool_ref())
            .await?)
    }

    async fn list_recycled(&self, change_id: &str) -> Result<Vec<RecycleRow>, StoreError> {
        Ok(
            sqlx::query_as(
                "SELECT * FROM recycle WHERE change_id = $1 ORDER BY item_kind, item_id",
            )
            .bind(change_id)
            .fetch_all(self.pool_ref())
            .await?,
        )
    }

    async fn mark_change_undone(&self, id: &str, at: i64) -> Result<bool, StoreError> {
        let r = sqlx::query("UPDATE changes SET undone_at = $1 WHERE id = $2 AND undone_at = 0")
            .bind(at)
            .bind(id)
            .execute(self.pool_ref())
            .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn purge_recycled(&self, now: i64) -> Result<u64, StoreError> {
        let r = sqlx::query("DELETE FROM recycle WHERE expires_at < $1")
            .bind(now)
            .execute(self.pool_ref())
            .await?;
        Ok(r.rows_affected())
    }

    async fn count_live_issued(
        &self,
        entry_ids: &[String],
        agent_ids: &[String],
        now: i64,
    ) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM issued_certs i WHERE i.not_after > $1
               AND (i.entry_id = ANY($2)
                    OR i.agent_id = ANY($3))
               AND NOT EXISTS (SELECT 1 FROM issued_certs j
                   WHERE j.agent_id = i.agent_id AND j.entry_id = i.entry_id
                     AND j.spiffe_id = i.spiffe_id AND j.seq > i.seq)",
        )
        .bind(now)
        .bind(entry_ids)
        .bind(agent_ids)
        .fetch_one(self.pool_ref())
        .await?)
    }
}
