//! The embedded SQLite store (default). WAL journal, `synchronous=FULL`, so an
//! acknowledged change survives a crash. Write transactions start with
//! `BEGIN IMMEDIATE`: a deferred transaction that reads and then writes can
//! fail at once with SQLITE_BUSY when another writer commits in between,
//! whatever the busy timeout.
//!
//! One server owns the file, so its change revision is kept in process.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use prost::Message;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use tokio::sync::watch;

use meshid_proto::types::{Authority, Bundle, Entry};

#[path = "safe_ops_sqlite.rs"]
mod safe_ops;

use super::{
    AgentRecord, AuditSeal, EntryFilter, IssuedRecord, IssuedSummary, JoinTokenRecord, Store,
    StoreError, renew_refusal,
};

/// SQLite-backed [`Store`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    changes: Arc<watch::Sender<u64>>,
}

fn decode_entry(data: &[u8]) -> Result<Entry, StoreError> {
    Entry::decode(data).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn decode_bundle(data: &[u8]) -> Result<Bundle, StoreError> {
    Bundle::decode(data).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn sorted_selectors(e: &Entry) -> Vec<(String, String)> {
    let mut v: Vec<_> = e
        .selectors
        .iter()
        .map(|s| (s.r#type.clone(), s.value.clone()))
        .collect();
    v.sort();
    v
}

pub(crate) fn agent_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<AgentRecord, StoreError> {
    let aliases: String = r.try_get("aliases")?;
    Ok(AgentRecord {
        spiffe_id: r.try_get("spiffe_id")?,
        attestor: r.try_get("attestor")?,
        serial: r.try_get("serial")?,
        prev_serial: r.try_get("prev_serial")?,
        expires_at: r.try_get("expires_at")?,
        banned: r.try_get::<i64, _>("banned")? != 0,
        aliases: serde_json::from_str(&aliases).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        attested_at: r.try_get("attested_at")?,
    })
}

fn issued_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<IssuedRecord, StoreError> {
    Ok(IssuedRecord {
        serial: r.try_get("serial")?,
        spiffe_id: r.try_get("spiffe_id")?,
        entry_id: r.try_get("entry_id")?,
        agent_id: r.try_get("agent_id")?,
        not_after: r.try_get("not_after")?,
        issued_at: r.try_get("issued_at")?,
        ca_id: r.try_get("ca_id")?,
    })
}

impl SqliteStore {
    /// Opens (creating) the database at `path` and runs migrations.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Db(sqlx::Error::Io(e)))?;
        }
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(Self {
            pool,
            changes: Arc::new(watch::channel(0).0),
        })
    }

    /// The migrations this build applies to a SQLite database.
    pub fn migrator() -> sqlx::migrate::Migrator {
        sqlx::migrate!("./migrations/sqlite")
    }

    /// Signals a committed change to subscribers.
    fn changed(&self) {
        self.changes.send_modify(|v| *v += 1);
    }
}

#[async_trait]
impl Store for SqliteStore {
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

    async fn update_authority(&self, a: &Authority, expected: i64) -> Result<(), StoreError> {
        let done = sqlx::query(
            "UPDATE ca_journal SET state = ?, data = ?, revision = ? WHERE id = ? AND revision = ?",
        )
        .bind(&a.state)
        .bind(a.encode_to_vec())
        .bind(a.revision)
        .bind(&a.id)
        .bind(expected)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if done == 1 {
            self.changed();
            Ok(())
        } else {
            Err(StoreError::Conflict(format!(
                "authority {} is not at revision {expected}",
                a.id
            )))
        }
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
                "INSERT INTO issued_certs (serial, spiffe_id, entry_id, agent_id, not_after, issued_at, ca_id) VALUES {}",
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

    async fn revoke_cert(&self, cert: &super::RevokedCert) -> Result<bool, StoreError> {
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

    async fn list_revoked(&self, now: i64) -> Result<Vec<super::RevokedCert>, StoreError> {
        Ok(sqlx::query_as::<_, super::RevokedCert>(
            "SELECT * FROM revoked_certs WHERE not_after >= ? ORDER BY revoked_at, serial",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?)
    }

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

    fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

fn seal_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<AuditSeal, StoreError> {
    Ok(AuditSeal {
        server_id: r.try_get("server_id")?,
        seq: r.try_get("seq")?,
        hash: r.try_get("hash")?,
        sealed_at_ms: r.try_get("sealed_at_ms")?,
        reason: r.try_get("reason")?,
        public_key: r.try_get("public_key")?,
        signature: r.try_get("signature")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshid_proto::types::Selector;

    fn entry(id: &str, parent: &str, uid: &str) -> Entry {
        Entry {
            id: id.into(),
            spiffe_id: "spiffe://td/w".into(),
            parent_id: parent.into(),
            selectors: vec![Selector {
                r#type: "unix".into(),
                value: format!("uid:{uid}"),
            }],
            revision: 1,
            created_at: 1,
            ..Entry::default()
        }
    }

    #[tokio::test]
    async fn entries_tokens_and_atomic_delete() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = SqliteStore::open(&dir.path().join("m.db"))
            .await
            .expect("open");
        s.create_entry(&entry("a", "spiffe://td/agent", "1"))
            .await
            .expect("a");
        assert!(matches!(
            s.create_entry(&entry("b", "spiffe://td/agent", "1")).await,
            Err(StoreError::AlreadyExists(_))
        ));
        s.create_entry(&entry("c", "spiffe://td/agent", "2"))
            .await
            .expect("c");
        assert_eq!(
            s.list_entries_by_parents(&["spiffe://td/agent".into()])
                .await
                .expect("l")
                .len(),
            2
        );
        // A delete that names a missing id deletes nothing.
        assert!(s.delete_entries(&["a".into(), "zzz".into()]).await.is_err());
        assert_eq!(s.count_entries().await.expect("n"), 2);
        // Optimistic concurrency.
        let mut a = s.get_entry("a").await.expect("g").expect("some");
        a.revision = 2;
        s.update_entry(&a, 1).await.expect("update");
        assert!(matches!(
            s.update_entry(&a, 1).await,
            Err(StoreError::Conflict(_))
        ));
        // Tokens are single use.
        let t = JoinTokenRecord {
            token_hash: "h".into(),
            token_id: "i".into(),
            alias_id: String::new(),
            expires_at: 10,
            created_at: 1,
        };
        s.create_join_token(&t).await.expect("tok");
        assert_eq!(s.consume_join_token("h").await.expect("c1"), Some(t));
        assert_eq!(s.consume_join_token("h").await.expect("c2"), None);
    }

    #[tokio::test]
    async fn audit_seals_per_server() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = SqliteStore::open(&dir.path().join("m.db"))
            .await
            .expect("open");
        let seal = |server: &str, seq: i64| AuditSeal {
            server_id: server.into(),
            seq,
            hash: "00".repeat(32),
            sealed_at_ms: seq * 1000,
            reason: "records".into(),
            public_key: vec![1; 32],
            signature: vec![2; 64],
        };
        for (srv, seq) in [("a", 5), ("a", 2), ("b", 9)] {
            s.put_audit_seal(&seal(srv, seq)).await.expect("put");
        }
        assert!(matches!(
            s.put_audit_seal(&seal("a", 5)).await,
            Err(StoreError::AlreadyExists(_))
        ));
        let a = s.list_audit_seals("a").await.expect("list");
        assert_eq!(a.iter().map(|x| x.seq).collect::<Vec<_>>(), [2, 5]);
        assert_eq!(a[1], seal("a", 5));
        assert_eq!(
            s.latest_audit_seal("b").await.expect("l"),
            Some(seal("b", 9))
        );
        assert_eq!(s.latest_audit_seal("c").await.expect("l"), None);
    }
}
