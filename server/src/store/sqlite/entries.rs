//! Registration entries in the SQLite store.

use crate::store::EntryStore;
use crate::store::{EntryFilter, StoreError};
use async_trait::async_trait;
use meshid_proto::types::Entry;
use prost::Message;
use sqlx::Row;

use super::*;

#[async_trait]
impl EntryStore for SqliteStore {
    async fn create_entry(&self, entry: &Entry) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let rows = sqlx::query("SELECT data FROM entries WHERE spiffe_id = ? AND parent_id = ?")
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
        sqlx::query(
            "INSERT INTO entries (id, spiffe_id, parent_id, data, revision, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&entry.id)
        .bind(&entry.spiffe_id)
        .bind(&entry.parent_id)
        .bind(entry.encode_to_vec())
        .bind(entry.revision)
        .bind(entry.created_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.changed();
        Ok(())
    }

    async fn get_entry(&self, id: &str) -> Result<Option<Entry>, StoreError> {
        let row = sqlx::query("SELECT data FROM entries WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| decode_entry(r.try_get::<&[u8], _>("data")?))
            .transpose()
    }

    async fn get_entries(&self, ids: &[String]) -> Result<Vec<Entry>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let q = format!(
                "SELECT data FROM entries WHERE id IN ({})",
                vec!["?"; chunk.len()].join(",")
            );
            let mut query = sqlx::query(&q);
            for id in chunk {
                query = query.bind(id);
            }
            for r in query.fetch_all(&self.pool).await? {
                out.push(decode_entry(r.try_get::<&[u8], _>("data")?)?);
            }
        }
        Ok(out)
    }

    async fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<Entry>, StoreError> {
        let rows = sqlx::query("SELECT data FROM entries ORDER BY created_at, rowid")
            .fetch_all(&self.pool)
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
        let q = format!(
            "SELECT data FROM entries WHERE parent_id IN ({}) ORDER BY created_at, rowid",
            vec!["?"; parents.len()].join(",")
        );
        let mut query = sqlx::query(&q);
        for p in parents {
            query = query.bind(p);
        }
        query
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| decode_entry(r.try_get::<&[u8], _>("data")?))
            .collect()
    }

    async fn update_entry(&self, entry: &Entry, expected_revision: i64) -> Result<(), StoreError> {
        let res = sqlx::query(
            "UPDATE entries SET spiffe_id = ?, parent_id = ?, data = ?, revision = ? WHERE id = ? AND revision = ?",
        )
        .bind(&entry.spiffe_id)
        .bind(&entry.parent_id)
        .bind(entry.encode_to_vec())
        .bind(entry.revision)
        .bind(&entry.id)
        .bind(expected_revision)
        .execute(&self.pool)
        .await?;
        if res.rows_affected() == 1 {
            self.changed();
            Ok(())
        } else if self.get_entry(&entry.id).await?.is_some() {
            Err(StoreError::Conflict(format!(
                "entry {} was changed concurrently",
                entry.id
            )))
        } else {
            Err(StoreError::NotFound(format!("entry {}", entry.id)))
        }
    }

    async fn delete_entries(&self, ids: &[String]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for id in ids {
            let res = sqlx::query("DELETE FROM entries WHERE id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            if res.rows_affected() != 1 {
                return Err(StoreError::NotFound(format!("entry {id}")));
            }
        }
        tx.commit().await?;
        if !ids.is_empty() {
            self.changed();
        }
        Ok(())
    }

    async fn count_entries(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM entries")
            .fetch_one(&self.pool)
            .await?)
    }
}
