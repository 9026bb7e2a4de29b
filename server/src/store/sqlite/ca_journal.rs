//! The CA journal: authorities, issued certificates and revocations in the SQLite store.

use crate::store::CaJournalStore;
use crate::store::{IssuedRecord, IssuedSummary, StoreError};
use async_trait::async_trait;
use meshid_proto::types::Authority;
use prost::Message;
use sqlx::Row;

use super::*;

#[async_trait]
impl CaJournalStore for SqliteStore {
    async fn list_authorities(&self) -> Result<Vec<Authority>, StoreError> {
        sqlx::query("SELECT data FROM ca_journal ORDER BY rowid")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                Authority::decode(r.try_get::<&[u8], _>("data")?)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))
            })
            .collect()
    }

    async fn insert_authority(&self, a: &Authority) -> Result<(), StoreError> {
        let r = sqlx::query(
            "INSERT INTO ca_journal (id, kind, owner, state, data, revision) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&a.id)
        .bind(&a.kind)
        .bind(&a.owner)
        .bind(&a.state)
        .bind(a.encode_to_vec())
        .bind(a.revision)
        .execute(&self.pool)
        .await;
        match r {
            Ok(_) => {
                self.changed();
                Ok(())
            }
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(StoreError::AlreadyExists(format!("authority {}", a.id)))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn update_authorities(&self, changes: &[(Authority, i64)]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for (a, expected) in changes {
            let done = sqlx::query(
                "UPDATE ca_journal SET state = ?, data = ?, revision = ? WHERE id = ? AND revision = ?",
            )
            .bind(&a.state)
            .bind(a.encode_to_vec())
            .bind(a.revision)
            .bind(&a.id)
            .bind(expected)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if done != 1 {
                // Dropping the transaction rolls back what was updated.
                return Err(StoreError::Conflict(format!(
                    "authority {} is not at revision {expected}",
                    a.id
                )));
            }
        }
        tx.commit().await?;
        self.changed();
        Ok(())
    }

    async fn live_issued_by(
        &self,
        ca_id: &str,
        now: i64,
        limit: i64,
    ) -> Result<Vec<IssuedRecord>, StoreError> {
        sqlx::query(
            "SELECT i.* FROM issued_certs i WHERE i.ca_id = ? AND i.not_after > ?
               AND NOT EXISTS (SELECT 1 FROM issued_certs j
                   WHERE j.agent_id = i.agent_id AND j.entry_id = i.entry_id
                     AND j.spiffe_id = i.spiffe_id AND j.rowid > i.rowid)
             ORDER BY i.rowid LIMIT ?",
        )
        .bind(ca_id)
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(issued_from_row)
        .collect()
    }

    async fn issued_summary(&self, now: i64) -> Result<Vec<IssuedSummary>, StoreError> {
        sqlx::query(
            "SELECT i.ca_id AS ca_id, MAX(i.not_after) AS last,
                    SUM(CASE WHEN i.not_after > ? AND NOT EXISTS (SELECT 1 FROM issued_certs j
                        WHERE j.agent_id = i.agent_id AND j.entry_id = i.entry_id
                          AND j.spiffe_id = i.spiffe_id AND j.rowid > i.rowid)
                        THEN 1 ELSE 0 END) AS live
             FROM issued_certs i WHERE i.ca_id != '' AND i.not_after > ? GROUP BY i.ca_id",
        )
        .bind(now)
        .bind(now)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok(IssuedSummary {
                ca_id: r.try_get("ca_id")?,
                live: r.try_get("live")?,
                last_not_after: r.try_get("last")?,
            })
        })
        .collect()
    }

    async fn record_issued(&self, certs: &[IssuedRecord]) -> Result<(), StoreError> {
        if certs.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for chunk in certs.chunks(500) {
            let q = format!(
                // OR FAIL: a conflict stops the statement and the whole
                // transaction is rolled back below, so SQLite need not keep
                // a statement journal to undo just this statement.
                "INSERT OR FAIL INTO issued_certs (serial, spiffe_id, entry_id, agent_id, not_after, issued_at, ca_id) VALUES {}",
                vec!["(?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(",")
            );
            let mut query = sqlx::query(&q);
            for c in chunk {
                query = query
                    .bind(&c.serial)
                    .bind(&c.spiffe_id)
                    .bind(&c.entry_id)
                    .bind(&c.agent_id)
                    .bind(c.not_after)
                    .bind(c.issued_at)
                    .bind(&c.ca_id);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn get_issued(&self, serial: &str) -> Result<Option<IssuedRecord>, StoreError> {
        sqlx::query("SELECT * FROM issued_certs WHERE serial = ?")
            .bind(serial)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(issued_from_row)
            .transpose()
    }

    async fn revoke_cert(&self, cert: &crate::store::RevokedCert) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "INSERT INTO revoked_certs (serial, spiffe_id, not_after, revoked_at, reason) \
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (serial) DO NOTHING",
        )
        .bind(&cert.serial)
        .bind(&cert.spiffe_id)
        .bind(cert.not_after)
        .bind(cert.revoked_at)
        .bind(cert.reason)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn prune_expired(&self, before: i64, limit: i64) -> Result<u64, StoreError> {
        let mut pruned = 0;
        for table in ["issued_certs", "revoked_certs"] {
            pruned += sqlx::query(&format!(
                "DELETE FROM {table} WHERE serial IN \
                 (SELECT serial FROM {table} WHERE not_after < ? LIMIT ?)"
            ))
            .bind(before)
            .bind(limit)
            .execute(&self.pool)
            .await?
            .rows_affected();
        }
        Ok(pruned)
    }

    async fn list_revoked(&self, now: i64) -> Result<Vec<crate::store::RevokedCert>, StoreError> {
        Ok(sqlx::query_as::<_, crate::store::RevokedCert>(
            "SELECT * FROM revoked_certs WHERE not_after >= ? ORDER BY revoked_at, serial",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?)
    }
}
