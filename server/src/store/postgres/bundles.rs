//! Trust bundles (own and federated) in the PostgreSQL store.

use crate::store::BundleStore;
use crate::store::StoreError;
use async_trait::async_trait;
use changes::note_change;
use meshid_proto::types::Bundle;
use prost::Message;
use sqlx::Row;

use super::*;

#[async_trait]
impl BundleStore for PostgresStore {
    async fn put_bundle(&self, b: &Bundle, federated: bool) -> Result<(), StoreError> {
        let mut tx = self.pool_ref().begin().await?;
        // Returns a row only when something changed.
        let changed = sqlx::query(
            "INSERT INTO bundles (trust_domain, federated, data, updated_at)
             VALUES ($1, $2, $3, extract(epoch FROM now())::BIGINT)
             ON CONFLICT (trust_domain) DO UPDATE SET federated = excluded.federated,
               data = excluded.data, updated_at = excluded.updated_at
             WHERE bundles.federated IS DISTINCT FROM excluded.federated
                OR bundles.data IS DISTINCT FROM excluded.data
             RETURNING trust_domain",
        )
        .bind(&b.trust_domain)
        .bind(federated)
        .bind(b.encode_to_vec())
        .fetch_optional(&mut *tx)
        .await?;
        let rev = match changed {
            Some(_) => Some(note_change(&mut tx, "bundle", &b.trust_domain).await?),
            None => None,
        };
        tx.commit().await?;
        if let Some(rev) = rev {
            self.committed(rev);
        }
        Ok(())
    }

    async fn get_bundle(&self, trust_domain: &str) -> Result<Option<Bundle>, StoreError> {
        sqlx::query("SELECT data FROM bundles WHERE trust_domain = $1")
            .bind(trust_domain)
            .fetch_optional(self.pool_ref())
            .await?
            .map(|r| decode_bundle(r.try_get::<&[u8], _>("data")?))
            .transpose()
    }

    async fn list_federated_bundles(&self) -> Result<Vec<Bundle>, StoreError> {
        sqlx::query("SELECT data FROM bundles WHERE federated ORDER BY trust_domain COLLATE \"C\"")
            .fetch_all(self.pool_ref())
            .await?
            .iter()
            .map(|r| decode_bundle(r.try_get::<&[u8], _>("data")?))
            .collect()
    }

    async fn delete_bundle(&self, trust_domain: &str) -> Result<(), StoreError> {
        let mut tx = self.pool_ref().begin().await?;
        let res = sqlx::query("DELETE FROM bundles WHERE trust_domain = $1 AND federated")
            .bind(trust_domain)
            .execute(&mut *tx)
            .await?;
        if res.rows_affected() != 1 {
            return Err(StoreError::NotFound(format!(
                "federated bundle {trust_domain}"
            )));
        }
        let rev = note_change(&mut tx, "bundle_deleted", trust_domain).await?;
        tx.commit().await?;
        self.committed(rev);
        Ok(())
    }
}
