//! The CA journal: authorities, issued certificates and revocations in the PostgreSQL store.

use crate::store::CaJournalStore;
use crate::store::{IssuedRecord, IssuedSummary, StoreError};
use async_trait::async_trait;
use changes::note_change;
use meshid_proto::types::Authority;
use prost::Message;
use sqlx::Row;

use super::*;

#[async_trait]
impl CaJournalStore for PostgresStore {
    async fn list_authorities(&self) -> Result<Vec<Authority>, StoreError> {
        sqlx::query("SELECT data FROM ca_journal ORDER BY seq")
            .fetch_all(self.pool_ref())
            .await?
            .iter()
            .map(|r| {
                Authority::decode(r.try_get::<&[u8], _>("data")?)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))
            })
            .collect()
    }

    async fn insert_authority(&self, a: &Authority) -> Result<(), StoreError> {
        let mut tx = self.pool_ref().begin().await?;
        let done = sqlx::query(
            "INSERT INTO ca_journal (id, kind, owner, state, data, revision)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&a.id)
        .bind(&a.kind)
        .bind(&a.owner)
        .bind(&a.state)
        .bind(a.encode_to_vec())
        .bind(a.revision)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if done != 1 {
            return Err(StoreError::AlreadyExists(format!("authority {}", a.id)));
        }
        let rev = note_change(&mut tx, "authority", &a.id).await?;
        tx.commit().await?;
        self.committed(rev);
        Ok(())
    }

    async fn update_authorities(&self, changes: &[(Authority, i64)]) -> Result<(), StoreError> {
        let mut tx = self.pool_ref().begin().await?;
        let mut rev = None;
        for (a, expected) in changes {
            // As for entries: of two servers applying a transition to the
            // same revision, the second waits for the first and then
            // updates nothing.
            let done = sqlx::query(
                "UPDATE ca_journal SET state = $1, data = $2, revision = $3 WHERE id = $4 AND revision = $5",
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
            rev = Some(note_change(&mut tx, "authority", &a.id).await?);
        }
        tx.commit().await?;
        if let Some(rev) = rev {
            self.committed(rev);
        }
        Ok(())
    }

    async fn live_issued_by(
        &self,
        ca_id: &str,
        now: i64,
        limit: i64,
    ) -> Result<Vec<IssuedRecord>, StoreError> {
        sqlx::query(
            "SELECT i.* FROM issued_certs i WHERE i.ca_id = $1 AND i.not_after > $2
               AND NOT EXISTS (SELECT 1 FROM issued_certs j
                   WHERE j.agent_id = i.agent_id AND j.entry_id = i.entry_id
                     AND j.spiffe_id = i.spiffe_id AND j.seq > i.seq)
             ORDER BY i.seq LIMIT $3",
        )
        .bind(ca_id)
        .bind(now)
        .bind(limit)
        .fetch_all(self.pool_ref())
        .await?
        .iter()
        .map(issued_from_row)
        .collect()
    }

    async fn issued_summary(&self, now: i64) -> Result<Vec<IssuedSummary>, StoreError> {
        sqlx::query(
            "SELECT i.ca_id AS ca_id, MAX(i.not_after) AS last,
                    SUM(CASE WHEN NOT EXISTS (SELECT 1 FROM issued_certs j
                        WHERE j.agent_id = i.agent_id AND j.entry_id = i.entry_id
                          AND j.spiffe_id = i.spiffe_id AND j.seq > i.seq)
                        THEN 1 ELSE 0 END)::BIGINT AS live
             FROM issued_certs i WHERE i.ca_id <> '' AND i.not_after > $1
             GROUP BY i.ca_id ORDER BY i.ca_id COLLATE \"C\"",
        )
        .bind(now)
        .fetch_all(self.pool_ref())
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
        let mut tx = self.pool_ref().begin().await?;
        for chunk in certs.chunks(5000) {
            insert_issued(&mut tx, chunk).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn get_issued(&self, serial: &str) -> Result<Option<IssuedRecord>, StoreError> {
        sqlx::query("SELECT * FROM issued_certs WHERE serial = $1")
            .bind(serial)
            .fetch_optional(self.pool_ref())
            .await?
            .as_ref()
            .map(issued_from_row)
            .transpose()
    }

    async fn revoke_cert(&self, cert: &crate::store::RevokedCert) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "INSERT INTO revoked_certs (serial, spiffe_id, not_after, revoked_at, reason) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (serial) DO NOTHING",
        )
        .bind(&cert.serial)
        .bind(&cert.spiffe_id)
        .bind(cert.not_after)
        .bind(cert.revoked_at)
        .bind(cert.reason)
        .execute(self.pool_ref())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn prune_expired(&self, before: i64, limit: i64) -> Result<u64, StoreError> {
        let mut pruned = 0;
        // SKIP LOCKED: servers pruning at once take disjoint rows instead of
        // waiting on (or deadlocking over) each other's.
        for table in ["issued_certs", "revoked_certs"] {
            pruned += sqlx::query(&format!(
                "DELETE FROM {table} WHERE serial IN \
                 (SELECT serial FROM {table} WHERE not_after < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)"
            ))
            .bind(before)
            .bind(limit)
            .execute(self.pool_ref())
            .await?
            .rows_affected();
        }
        Ok(pruned)
    }

    async fn list_revoked(&self, now: i64) -> Result<Vec<crate::store::RevokedCert>, StoreError> {
        Ok(sqlx::query_as::<_, crate::store::RevokedCert>(
            "SELECT * FROM revoked_certs WHERE not_after >= $1 ORDER BY revoked_at, serial",
        )
        .bind(now)
        .fetch_all(self.pool_ref())
        .await?)
    }
}
