//! Trust bundles (own and federated) in the SQLite store.

use crate::store::BundleStore;
use crate::store::StoreError;
use async_trait::async_trait;
use meshid_proto::types::Bundle;
use prost::Message;
use sqlx::Row;

use super::*;

#[async_trait]
impl BundleStore for SqliteStore {
    async fn put_bundle(&self, b: &Bundle, federated: bool) -> Result<(), StoreError> {
        // Returns a row only when something changed.
        let changed = sqlx::query(
            "INSERT INTO bundles (trust_domain, federated, data, updated_at) VALUES (?, ?, ?, strftime('%s','now'))
             ON CONFLICT(trust_domain) DO UPDATE SET federated = excluded.federated, data = excluded.data, updated_at = excluded.updated_at
             WHERE bundles.federated IS NOT excluded.federated OR bundles.data IS NOT excluded.data
             RETURNING trust_domain",
        )
        .bind(&b.trust_domain)
        .bind(i64::from(federated))
        .bind(b.encode_to_vec())
        .fetch_optional(&self.pool)
        .await?;
        if changed.is_some() {
            self.changed();
        }
        Ok(())
    }

    async fn get_bundle(&self, trust_domain: &str) -> Result<Option<Bundle>, StoreError> {
        sqlx::query("SELECT data FROM bundles WHERE trust_domain = ?")
            .bind(trust_domain)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| decode_bundle(r.try_get::<&[u8], _>("data")?))
            .transpose()
    }

    async fn list_federated_bundles(&self) -> Result<Vec<Bundle>, StoreError> {
        sqlx::query("SELECT data FROM bundles WHERE federated = 1 ORDER BY trust_domain")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| decode_bundle(r.try_get::<&[u8], _>("data")?))
            .collect()
    }

    async fn delete_bundle(&self, trust_domain: &str) -> Result<(), StoreError> {
        let res = sqlx::query("DELETE FROM bundles WHERE trust_domain = ? AND federated = 1")
            .bind(trust_domain)
            .execute(&self.pool)
            .await?;
        if res.rows_affected() == 1 {
            self.changed();
            Ok(())
        } else {
            Err(StoreError::NotFound(format!(
                "federated bundle {trust_domain}"
            )))
        }
    }
}
