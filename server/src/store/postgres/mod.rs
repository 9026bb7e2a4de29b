//! The PostgreSQL store, for several servers sharing one database.
//!
//! The semantics are those of the SQLite store:
//! - a join token is consumed with `DELETE … RETURNING`, so of any number of
//!   concurrent attempts (on any number of servers) exactly one gets it;
//! - an entry update is `UPDATE … WHERE revision = expected`: PostgreSQL
//!   locks the row, a second concurrent writer waits for the first to commit,
//!   re-checks the condition against the new revision and updates nothing, so
//!   it gets [`StoreError::Conflict`] instead of overwriting the first write;
//! - creating an entry takes a transaction-scoped advisory lock on its
//!   (SPIFFE ID, parent) pair, so two identical entries cannot both be created;
//! - every multi-row change is one transaction.
//!
//! Changes reach the other servers through [`changes`].

mod changes;
mod options;
mod safe_ops;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use meshid_proto::types::{Authority, Bundle, Entry};
use prost::Message;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};
use tokio::sync::watch;

use super::{
    AgentRecord, AuditSeal, EntryFilter, IssuedRecord, IssuedSummary, JoinTokenRecord, Store,
    StoreError,
};
pub use changes::{CHANNEL, PROBE_EVERY, RECHECK, StoreStats};
use changes::{current_revision, listen_loop, note_change, publish};
pub use options::{PostgresOptions, SslMode};

/// PostgreSQL-backed [`Store`]. Cheap to clone; the change listener stops
/// when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    connect: PgConnectOptions,
    changes: watch::Sender<u64>,
    listener: Mutex<Option<tokio::task::JoinHandle<()>>>,
    stats: StoreStats,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(mut l) = self.listener.lock()
            && let Some(h) = l.take()
        {
            h.abort();
        }
    }
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

pub(crate) fn agent_from_row(r: &PgRow) -> Result<AgentRecord, StoreError> {
    Ok(AgentRecord {
        spiffe_id: r.try_get("spiffe_id")?,
        attestor: r.try_get("attestor")?,
        serial: r.try_get("serial")?,
        prev_serial: r.try_get("prev_serial")?,
        expires_at: r.try_get("expires_at")?,
        banned: r.try_get("banned")?,
        aliases: r.try_get("aliases")?,
        attested_at: r.try_get("attested_at")?,
    })
}

pub(crate) fn issued_from_row(r: &PgRow) -> Result<IssuedRecord, StoreError> {
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

impl PostgresStore {
    /// Connects, runs the migrations (serialized between servers by sqlx's
    /// advisory lock) and reads the current change revision.
    pub async fn connect(opts: &PostgresOptions) -> Result<Self, StoreError> {
        Self::connect_with_stats(opts, StoreStats::default()).await
    }

    /// [`PostgresStore::connect`], with the change listener recording into
    /// `stats`.
    pub async fn connect_with_stats(
        opts: &PostgresOptions,
        stats: StoreStats,
    ) -> Result<Self, StoreError> {
        let connect = opts.connect_options()?;
        let pool = PgPoolOptions::new()
            .max_connections(opts.pool_size.max(1))
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(connect.clone())
            .await?;
        Self::migrator().run(&pool).await?;
        let rev = current_revision(&pool).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                connect,
                changes: watch::channel(rev).0,
                listener: Mutex::new(None),
                stats,
            }),
        })
    }

    /// The migrations this build applies to a PostgreSQL database.
    pub fn migrator() -> sqlx::migrate::Migrator {
        sqlx::migrate!("./migrations/postgres")
    }

    /// The connection pool (for operations outside the [`Store`] trait, such
    /// as copying a whole store).
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    fn pool_ref(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Publishes a revision committed through this store.
    fn committed(&self, rev: u64) {
        publish(&self.inner.changes, rev);
    }

    /// Starts the listener once (needs a Tokio runtime).
    fn ensure_listener(&self) {
        let Ok(mut slot) = self.inner.listener.lock() else {
            return;
        };
        if slot.is_some() {
            return;
        }
        let pool = self.inner.pool.clone();
        let connect = self.inner.connect.clone();
        // The task holds no reference to `Inner`: dropping the last store
        // clone aborts it.
        let changes = self.inner.changes.clone();
        let stats = self.inner.stats.clone();
        *slot = Some(tokio::spawn(listen_loop(pool, connect, changes, stats)));
    }
}

#[async_trait]
impl Store for PostgresStore {
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
        Err(super::renew_refusal(spiffe_id, expected_serial, now))
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

    async fn update_authority(&self, a: &Authority, expected: i64) -> Result<(), StoreError> {
        let mut tx = self.pool_ref().begin().await?;
        // As for entries: of two servers applying a transition to the same
        // revision, the second waits for the first and then updates nothing.
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
            return Err(StoreError::Conflict(format!(
                "authority {} is not at revision {expected}",
                a.id
            )));
        }
        let rev = note_change(&mut tx, "authority", &a.id).await?;
        tx.commit().await?;
        self.committed(rev);
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

    async fn revoke_cert(&self, cert: &super::RevokedCert) -> Result<bool, StoreError> {
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

    async fn list_revoked(&self, now: i64) -> Result<Vec<super::RevokedCert>, StoreError> {
        Ok(sqlx::query_as::<_, super::RevokedCert>(
            "SELECT * FROM revoked_certs WHERE not_after >= $1 ORDER BY revoked_at, serial",
        )
        .bind(now)
        .fetch_all(self.pool_ref())
        .await?)
    }

    fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.ensure_listener();
        self.inner.changes.subscribe()
    }

    async fn put_audit_seal(&self, seal: &AuditSeal) -> Result<(), StoreError> {
        let r = sqlx::query(
            "INSERT INTO audit_seals (server_id, seq, hash, sealed_at_ms, reason, public_key, signature) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&seal.server_id)
        .bind(seal.seq)
        .bind(&seal.hash)
        .bind(seal.sealed_at_ms)
        .bind(&seal.reason)
        .bind(&seal.public_key)
        .bind(&seal.signature)
        .execute(self.pool_ref())
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
        sqlx::query("SELECT * FROM audit_seals WHERE server_id = $1 ORDER BY seq")
            .bind(server_id)
            .fetch_all(self.pool_ref())
            .await?
            .iter()
            .map(seal_from_row)
            .collect()
    }

    async fn latest_audit_seal(&self, server_id: &str) -> Result<Option<AuditSeal>, StoreError> {
        sqlx::query("SELECT * FROM audit_seals WHERE server_id = $1 ORDER BY seq DESC LIMIT 1")
            .bind(server_id)
            .fetch_optional(self.pool_ref())
            .await?
            .as_ref()
            .map(seal_from_row)
            .transpose()
    }
}

fn seal_from_row(r: &PgRow) -> Result<AuditSeal, StoreError> {
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

/// Inserts journal records with one statement.
pub(crate) async fn insert_issued(
    tx: &mut Transaction<'_, Postgres>,
    certs: &[IssuedRecord],
) -> Result<(), StoreError> {
    let col = |f: fn(&IssuedRecord) -> &str| certs.iter().map(f).collect::<Vec<_>>();
    // In array order, so that seq follows the order of the batch.
    sqlx::query(
        "INSERT INTO issued_certs (serial, spiffe_id, entry_id, agent_id, not_after, issued_at, ca_id)
         SELECT s, i, e, a, n, t, c FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[],
             $5::BIGINT[], $6::BIGINT[], $7::TEXT[]) WITH ORDINALITY AS u(s, i, e, a, n, t, c, ord)
         ORDER BY ord",
    )
    .bind(col(|c| &c.serial))
    .bind(col(|c| &c.spiffe_id))
    .bind(col(|c| &c.entry_id))
    .bind(col(|c| &c.agent_id))
    .bind(certs.iter().map(|c| c.not_after).collect::<Vec<_>>())
    .bind(certs.iter().map(|c| c.issued_at).collect::<Vec<_>>())
    .bind(col(|c| &c.ca_id))
    .execute(&mut **tx)
    .await?;
    Ok(())
}
