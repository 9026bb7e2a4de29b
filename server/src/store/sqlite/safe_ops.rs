//! [`SafeOpsStore`] for SQLite.

use async_trait::async_trait;

use super::SqliteStore;
use crate::store::StoreError;
use crate::store::safe_ops::{ChangeRow, PlanApproval, PlanRow, RecycleRow, SafeOpsStore};

fn json_list(ids: &[String]) -> Result<String, StoreError> {
    serde_json::to_string(ids).map_err(|e| StoreError::Corrupt(e.to_string()))
}

#[async_trait]
impl SafeOpsStore for SqliteStore {
    async fn insert_plan(&self, p: &PlanRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO plans (id, kind, author, created_at, expires_at, body, applied_change)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&p.id)
        .bind(&p.kind)
        .bind(&p.author)
        .bind(p.created_at)
        .bind(p.expires_at)
        .bind(&p.body)
        .bind(&p.applied_change)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn get_plan(&self, id: &str) -> Result<Option<PlanRow>, StoreError> {
        Ok(sqlx::query_as("SELECT * FROM plans WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn mark_plan_applied(&self, id: &str, change_id: &str) -> Result<bool, StoreError> {
        let r =
            sqlx::query("UPDATE plans SET applied_change = ? WHERE id = ? AND applied_change = ''")
                .bind(change_id)
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn add_plan_approval(&self, a: &PlanApproval) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "INSERT INTO plan_approvals (plan_id, approver, approved_at) VALUES (?, ?, ?)
             ON CONFLICT (plan_id, approver) DO NOTHING",
        )
        .bind(&a.plan_id)
        .bind(&a.approver)
        .bind(a.approved_at)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn list_plan_approvals(&self, plan_id: &str) -> Result<Vec<PlanApproval>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT * FROM plan_approvals WHERE plan_id = ? ORDER BY approved_at, approver",
        )
        .bind(plan_id)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn record_change(
        &self,
        c: &ChangeRow,
        recycled: &[RecycleRow],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query(
            "INSERT INTO changes (id, kind, actor, created_at, counts, undo_until, undone_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
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
                 VALUES (?, ?, ?, ?, ?)",
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
            sqlx::query_as("SELECT * FROM changes ORDER BY created_at DESC, rowid DESC LIMIT ?")
                .bind(limit)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    async fn get_change(&self, id: &str) -> Result<Option<ChangeRow>, StoreError> {
        Ok(sqlx::query_as("SELECT * FROM changes WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn list_recycled(&self, change_id: &str) -> Result<Vec<RecycleRow>, StoreError> {
        Ok(
            sqlx::query_as("SELECT * FROM recycle WHERE change_id = ? ORDER BY rowid")
                .bind(change_id)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    async fn mark_change_undone(&self, id: &str, at: i64) -> Result<bool, StoreError> {
        let r = sqlx::query("UPDATE changes SET undone_at = ? WHERE id = ? AND undone_at = 0")
            .bind(at)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn purge_recycled(&self, now: i64) -> Result<u64, StoreError> {
        let r = sqlx::query("DELETE FROM recycle WHERE expires_at < ?")
            .bind(now)
            .execute(&self.pool)
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
            "SELECT COUNT(*) FROM issued_certs i WHERE i.not_after > ?
               AND (i.entry_id IN (SELECT value FROM json_each(?))
                    OR i.agent_id IN (SELECT value FROM json_each(?)))
               AND NOT EXISTS (SELECT 1 FROM issued_certs j
                   WHERE j.agent_id = i.agent_id AND j.entry_id = i.entry_id
                     AND j.spiffe_id = i.spiffe_id AND j.rowid > i.rowid)",
        )
        .bind(now)
        .bind(json_list(entry_ids)?)
        .bind(json_list(agent_ids)?)
        .fetch_one(&self.pool)
        .await?)
    }
}
