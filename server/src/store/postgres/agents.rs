//! Join tokens and attested agents in the PostgreSQL store.

use crate::store::AgentStore;
use crate::store::{AgentRecord, JoinTokenRecord, StoreError};
use async_trait::async_trait;
use changes::note_change;
use sqlx::Row;

use super::*;

#[async_trait]
impl AgentStore for PostgresStore {
    async fn create_join_token(&self, t: &JoinTokenRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO join_tokens (token_hash, token_id, alias_id, expires_at, created_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&t.token_hash)
        .bind(&t.token_id)
        .bind(&t.alias_id)
        .bind(t.expires_at)
        .bind(t.created_at)
        .execute(self.pool_ref())
        .await?;
        Ok(())
    }

    async fn consume_join_token(
        &self,
        token_hash: &str,
    ) -> Result<Option<JoinTokenRecord>, StoreError> {
        // Of concurrent deletes of one row, one deletes it and returns it; the
        // others wait for it to commit and then find nothing.
        sqlx::query(
            "DELETE FROM join_tokens WHERE token_hash = $1
             RETURNING token_hash, token_id, alias_id, expires_at, created_at",
        )
        .bind(token_hash)
        .fetch_optional(self.pool_ref())
        .await?
        .map(|r| {
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
        let mut tx = self.pool_ref().begin().await?;
        // Agents see a change only when the agent is new or its aliases
        // change; a re-attestation (new serial) is not one. FOR UPDATE holds
        // the row against a concurrent ban until this transaction ends.
        let before = sqlx::query("SELECT aliases FROM agents WHERE spiffe_id = $1 FOR UPDATE")
            .bind(&a.spiffe_id)
            .fetch_optional(&mut *tx)
            .await?;
        let visible = match &before {
            None => true,
            Some(r) => r.try_get::<Vec<String>, _>("aliases")? != a.aliases,
        };
        // The WHERE of the upsert refuses a banned agent, also one banned by
        // another server after the read above: the row is left as it is and
        // nothing is returned.
        let written = sqlx::query(
            "INSERT INTO agents (spiffe_id, attestor, serial, prev_serial, expires_at, banned, aliases, attested_at)
             VALUES ($1, $2, $3, $4, $5, false, $6, $7)
             ON CONFLICT (spiffe_id) DO UPDATE SET attestor = excluded.attestor, serial = excluded.serial,
               prev_serial = excluded.prev_serial, expires_at = excluded.expires_at,
               aliases = excluded.aliases, attested_at = excluded.attested_at
             WHERE NOT agents.banned
             RETURNING spiffe_id",
        )
        .bind(&a.spiffe_id)
        .bind(&a.attestor)
        .bind(&a.serial)
        .bind(&a.prev_serial)
        .bind(a.expires_at)
        .bind(&a.aliases)
        .bind(a.attested_at)
        .fetch_optional(&mut *tx)
        .await?;
        if written.is_none() {
            return Err(StoreError::Banned(format!("agent {}", a.spiffe_id)));
        }
        let rev = if visible {
            Some(note_change(&mut tx, "agent", &a.spiffe_id).await?)
        } else {
            None
        };
        tx.commit().await?;
        if let Some(rev) = rev {
            self.committed(rev);
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
        // A concurrent ban, eviction or renewal of the row makes this wait
        // for it to commit, then re-check the condition on the new row.
        let row = sqlx::query(
            "UPDATE agents SET prev_serial = serial, serial = $1, expires_at = $2
             WHERE spiffe_id = $3 AND serial = $4 AND NOT banned RETURNING *",
        )
        .bind(serial)
        .bind(expires_at)
        .bind(spiffe_id)
        .bind(expected_serial)
        .fetch_optional(self.pool_ref())
        .await?;
        if let Some(r) = row {
            return agent_from_row(&r);
        }
        let now = self.get_agent(spiffe_id).await?;
        Err(crate::store::renew_refusal(spiffe_id, expected_serial, now))
    }

    async fn ban_agent(&self, spiffe_id: &str) -> Result<AgentRecord, StoreError> {
        let mut tx = self.pool_ref().begin().await?;
        let was: bool =
            sqlx::query_scalar("SELECT banned FROM agents WHERE spiffe_id = $1 FOR UPDATE")
                .bind(spiffe_id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("agent {spiffe_id}")))?;
        let row = sqlx::query("UPDATE agents SET banned = true WHERE spiffe_id = $1 RETURNING *")
            .bind(spiffe_id)
            .fetch_one(&mut *tx)
            .await?;
        let agent = agent_from_row(&row)?;
        let rev = if was {
            None
        } else {
            Some(note_change(&mut tx, "agent_banned", spiffe_id).await?)
        };
        tx.commit().await?;
        if let Some(rev) = rev {
            self.committed(rev);
        }
        Ok(agent)
    }

    async fn get_agent(&self, spiffe_id: &str) -> Result<Option<AgentRecord>, StoreError> {
        sqlx::query("SELECT * FROM agents WHERE spiffe_id = $1")
            .bind(spiffe_id)
            .fetch_optional(self.pool_ref())
            .await?
            .as_ref()
            .map(agent_from_row)
            .transpose()
    }

    async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        sqlx::query("SELECT * FROM agents ORDER BY attested_at, spiffe_id")
            .fetch_all(self.pool_ref())
            .await?
            .iter()
            .map(agent_from_row)
            .collect()
    }

    async fn delete_agent(&self, spiffe_id: &str) -> Result<(), StoreError> {
        let mut tx = self.pool_ref().begin().await?;
        let res = sqlx::query("DELETE FROM agents WHERE spiffe_id = $1")
            .bind(spiffe_id)
            .execute(&mut *tx)
            .await?;
        if res.rows_affected() != 1 {
            return Err(StoreError::NotFound(format!("agent {spiffe_id}")));
        }
        let rev = note_change(&mut tx, "agent_deleted", spiffe_id).await?;
        tx.commit().await?;
        self.committed(rev);
        Ok(())
    }
}
