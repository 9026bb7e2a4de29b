//! Join tokens and attested agents in the SQLite store.

use crate::store::AgentStore;
use crate::store::{AgentRecord, JoinTokenRecord, StoreError, renew_refusal};
use async_trait::async_trait;
use sqlx::Row;

use super::*;

#[async_trait]
impl AgentStore for SqliteStore {
    async fn create_join_token(&self, t: &JoinTokenRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO join_tokens (token_hash, token_id, alias_id, expires_at, created_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&t.token_hash)
        .bind(&t.token_id)
        .bind(&t.alias_id)
        .bind(t.expires_at)
        .bind(t.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn consume_join_token(
        &self,
        token_hash: &str,
    ) -> Result<Option<JoinTokenRecord>, StoreError> {
        let row = sqlx::query(
            "DELETE FROM join_tokens WHERE token_hash = ? RETURNING token_hash, token_id, alias_id, expires_at, created_at",
        )
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(JoinTokenRecord {
                token_hash: r.try_get("token_hash")?,
                token_id: r.try_get("token_id")?,
                alias_id: r.try_get("alias_id")?,
                expires_at: r.try_get("expires_at")?,
                created_at: r.try_get("created_at")?,
            })
        })
        .transpose()
    }

    async fn attest_agent(&self, a: &AgentRecord) -> Result<(), StoreError> {
        let aliases =
            serde_json::to_string(&a.aliases).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        // BEGIN IMMEDIATE takes the write lock first: no ban can commit
        // between the read below and the write.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        // Agents see a change only when the agent is new or its aliases
        // change; a re-attestation (new serial) is not one.
        let before = sqlx::query("SELECT aliases FROM agents WHERE spiffe_id = ?")
            .bind(&a.spiffe_id)
            .fetch_optional(&mut *tx)
            .await?;
        let visible = match &before {
            None => true,
            Some(r) => r.try_get::<String, _>("aliases")? != aliases,
        };
        // The WHERE of the upsert is what refuses a banned agent: the row is
        // left as it is and nothing is returned.
        let written = sqlx::query(
            "INSERT INTO agents (spiffe_id, attestor, serial, prev_serial, expires_at, banned, aliases, attested_at)
             VALUES (?, ?, ?, ?, ?, 0, ?, ?)
             ON CONFLICT(spiffe_id) DO UPDATE SET attestor = excluded.attestor, serial = excluded.serial,
               prev_serial = excluded.prev_serial, expires_at = excluded.expires_at,
               aliases = excluded.aliases, attested_at = excluded.attested_at
             WHERE agents.banned = 0
             RETURNING spiffe_id",
        )
        .bind(&a.spiffe_id)
        .bind(&a.attestor)
        .bind(&a.serial)
        .bind(&a.prev_serial)
        .bind(a.expires_at)
        .bind(aliases)
        .bind(a.attested_at)
        .fetch_optional(&mut *tx)
        .await?;
        if written.is_none() {
            return Err(StoreError::Banned(format!("agent {}", a.spiffe_id)));
        }
        tx.commit().await?;
        if visible {
            self.changed();
        }
        Ok(())
    }

    async fn renew_agent(
        &self,
        spiffe_id: &str,
        expected_serial: &str,
        serial: &str,
        expires_at: i64,
    ) -> Result<AgentRecord, StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let row = sqlx::query(
            "UPDATE agents SET prev_serial = serial, serial = ?, expires_at = ?
             WHERE spiffe_id = ? AND serial = ? AND banned = 0 RETURNING *",
        )
        .bind(serial)
        .bind(expires_at)
        .bind(spiffe_id)
        .bind(expected_serial)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(r) = row {
            let agent = agent_from_row(&r)?;
            tx.commit().await?;
            return Ok(agent);
        }
        // Nothing matched: say why, from the same transaction.
        let now = sqlx::query("SELECT * FROM agents WHERE spiffe_id = ?")
            .bind(spiffe_id)
            .fetch_optional(&mut *tx)
            .await?
            .as_ref()
            .map(agent_from_row)
            .transpose()?;
        Err(renew_refusal(spiffe_id, expected_serial, now))
    }

    async fn ban_agent(&self, spiffe_id: &str) -> Result<AgentRecord, StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let was = sqlx::query("SELECT banned FROM agents WHERE spiffe_id = ?")
            .bind(spiffe_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("agent {spiffe_id}")))?
            .try_get::<i64, _>("banned")?
            != 0;
        let row = sqlx::query("UPDATE agents SET banned = 1 WHERE spiffe_id = ? RETURNING *")
            .bind(spiffe_id)
            .fetch_one(&mut *tx)
            .await?;
        let agent = agent_from_row(&row)?;
        tx.commit().await?;
        if !was {
            self.changed();
        }
        Ok(agent)
    }

    async fn get_agent(&self, spiffe_id: &str) -> Result<Option<AgentRecord>, StoreError> {
        sqlx::query("SELECT * FROM agents WHERE spiffe_id = ?")
            .bind(spiffe_id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(agent_from_row)
            .transpose()
    }

    async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        sqlx::query("SELECT * FROM agents ORDER BY attested_at, spiffe_id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(agent_from_row)
            .collect()
    }

    async fn delete_agent(&self, spiffe_id: &str) -> Result<(), StoreError> {
        let res = sqlx::query("DELETE FROM agents WHERE spiffe_id = ?")
            .bind(spiffe_id)
            .execute(&self.pool)
            .await?;
        if res.rows_affected() == 1 {
            self.changed();
            Ok(())
        } else {
            Err(StoreError::NotFound(format!("agent {spiffe_id}")))
        }
    }
}
