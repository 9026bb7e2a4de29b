//! Seals of the audit log's hash chain in the SQLite store.

use crate::store::AuditSealStore;
use crate::store::{AuditSeal, StoreError};
use async_trait::async_trait;

use super::*;

#[async_trait]
impl AuditSealStore for SqliteStore {
    async fn put_audit_seal(&self, seal: &AuditSeal) -> Result<(), StoreError> {
        let r = sqlx::query(
            "INSERT INTO audit_seals (server_id, seq, hash, sealed_at_ms, reason, public_key, signature) VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&seal.server_id)
        .bind(seal.seq)
        .bind(&seal.hash)
        .bind(seal.sealed_at_ms)
        .bind(&seal.reason)
        .bind(&seal.public_key)
        .bind(&seal.signature)
        .execute(&self.pool)
        .await;
        match r {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(StoreError::AlreadyExists(format!(
                    "audit seal {} seq {}",
                    seal.server_id, seal.seq
                )))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn list_audit_seals(&self, server_id: &str) -> Result<Vec<AuditSeal>, StoreError> {
        sqlx::query("SELECT * FROM audit_seals WHERE server_id = ? ORDER BY seq")
            .bind(server_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(seal_from_row)
            .collect()
    }

    async fn latest_audit_seal(&self, server_id: &str) -> Result<Option<AuditSeal>, StoreError> {
        sqlx::query("SELECT * FROM audit_seals WHERE server_id = ? ORDER BY seq DESC LIMIT 1")
            .bind(server_id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(seal_from_row)
            .transpose()
    }
}
