//! Registration entries in the PostgreSQL store.

use crate::store::EntryStore;
use crate::store::{EntryFilter, StoreError};
use async_trait::async_trait;
use changes::note_change;
use meshid_proto::types::Entry;
use prost::Message;
use sqlx::Row;

use super::*;

#[async_trait]
impl EntryStore for PostgresStore {
    async fn create_entry(&self, entry: &Entry) -> Result<(), StoreError> {
        let mut tx = self.pool_ref().begin().await?;
        // Serializes creations of the same (SPIFFE ID, parent) pair, so the
        // duplicate check below cannot race another server's insert.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1 || chr(10) || $2, 0))")
            .bind(&entry.spiffe_id)
            .bind(&entry.parent_id)
            .execute(&mut *tx)
            .await?;
        let rows = sqlx::query("SELECT data FROM entries WHERE spiffe_id = $1 AND parent_id = $2")
            .bind(&entry.spiffe_id)
            .bind(&entry.parent_id)
            .fetch_all(&mut *tx)
            .await?;
        let want = sorted_selectors(entry);
        for r in rows {
            let existing = decode_entry(r.try_get::<&[u8], _>("data")?)?;
            if sorted_selectors(&existing) == want {
                return Err(StoreError::AlreadyExists(format!(
                    "entry {} has the same SPIFFE ID, parent and selectors",
                    existing.id
                )));
            }
        }
        let res = sqlx::query(
            "INSERT INTO entries (id, spiffe_id, parent_id, data, revision, created_at)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&entry.id)
        .bind(&entry.spiffe_id)
        .bind(&entry.parent_id)
        .bind(entry.encode_to_vec())
        .bind(entry.revision)
        .bind(entry.created_at)
        .execute(&mut *tx)
        .await?;
        if res.rows_affected() != 1 {
            return Err(StoreError::AlreadyExists(format!("entry id {}", entry.id)));
        }
        let rev = note_change(&mut tx, "entry_created", &entry.id).await?;
        tx.commit().await?;
        self.committed(rev);
        Ok(())
    }

    async fn get_entry(&self, id: &str) -> Result<Option<Entry>, StoreError> {
        sqlx::query("SELECT data FROM entries WHERE id = $1")
            .bind(id)
            .fetch_optional(self.pool_ref())
            .await?
            .map(|r| decode_entry(r.try_get::<&[u8], _>("data")?))
            .transpose()
    }

    async fn get_entries(&self, ids: &[String]) -> Result<Vec<Entry>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        sqlx::query("SELECT data FROM entries WHERE id = ANY($1) ORDER BY created_at, seq")
            .bind(ids)
            .fetch_all(self.pool_ref())
            .await?
            .iter()
            .map(|r| decode_entry(r.try_get::<&[u8], _>("data")?))
            .collect()
    }

    async fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<Entry>, StoreError> {
        let rows = sqlx::query(
            "SELECT data FROM entries
             WHERE ($1::TEXT IS NULL OR parent_id = $1) AND ($2::TEXT IS NULL OR spiffe_id = $2)
             ORDER BY created_at, seq",
        )
        .bind(filter.parent_id.as_deref())
        .bind(filter.spiffe_id.as_deref())
        .fetch_all(self.pool_ref())
        .await?;
        let mut out = Vec::new();
        for r in rows {
            let e = decode_entry(r.try_get::<&[u8], _>("data")?)?;
            if filter.matches(&e) {
                out.push(e);
            }
        }
        Ok(out)
    }

    async fn list_entries_by_parents(&self, parents: &[String]) -> Result<Vec<Entry>, StoreError> {
        if parents.is_empty() {
            return Ok(Vec::new());
        }
        sqlx::query("SELECT data FROM entries WHERE parent_id = ANY($1) ORDER BY created_at, seq")
            .bind(parents)
            .fetch_all(self.pool_ref())
            .await?
            .iter()
            .map(|r| decode_entry(r.try_get::<&[u8], _>("data")?))
            .collect()
    }

    async fn update_entry(&self, entry: &Entry, expected_revision: i64) -> Result<(), StoreError> {
        let mut tx = self.pool_ref().begin().await?;
        // A concurrent writer of the same row blocks here until the first
        // commits, then finds the revision changed and updates nothing.
        let res = sqlx::query(
            "UPDATE entries SET spiffe_id = $1, parent_id = $2, data = $3, revision = $4
             WHERE id = $5 AND revision = $6",
        )
        .bind(&entry.spiffe_id)
        .bind(&entry.parent_id)
        .bind(entry.encode_to_vec())
        .bind(entry.revision)
        .bind(&entry.id)
        .bind(expected_revision)
        .execute(&mut *tx)
        .await?;
        if res.rows_affected() == 1 {
            let rev = note_change(&mut tx, "entry_updated", &entry.id).await?;
            tx.commit().await?;
            self.committed(rev);
            return Ok(());
        }
        tx.rollback().await?;
        if self.get_entry(&entry.id).await?.is_some() {
            Err(StoreError::Conflict(format!(
                "entry {} was changed concurrently",
                entry.id
            )))
        } else {
            Err(StoreError::NotFound(format!("entry {}", entry.id)))
        }
    }

    async fn delete_entries(&self, ids: &[String]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool_ref().begin().await?;
        let deleted: Vec<String> =
            sqlx::query_scalar("DELETE FROM entries WHERE id = ANY($1) RETURNING id")
                .bind(ids)
                .fetch_all(&mut *tx)
                .await?;
        if deleted.len() != ids.len() {
            // Dropping the transaction rolls it back: nothing is deleted.
            let mut seen = std::collections::HashSet::new();
            let missing = ids
                .iter()
                .find(|id| !deleted.contains(id) || !seen.insert(id.as_str()))
                .cloned()
                .unwrap_or_default();
            return Err(StoreError::NotFound(format!("entry {missing}")));
        }
        let key = match ids {
            [one] => one.clone(),
            many => format!("{} entries", many.len()),
        };
        let rev = note_change(&mut tx, "entries_deleted", &key).await?;
        tx.commit().await?;
        self.committed(rev);
        Ok(())
    }

    async fn count_entries(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM entries")
            .fetch_one(self.pool_ref())
            .await?)
    }
}
