//! The embedded SQLite store (default). WAL journal, `synchronous=FULL`, so an
//! acknowledged change survives a crash. Write transactions start with
//! `BEGIN IMMEDIATE`: a deferred transaction that reads and then writes can
//! fail at once with SQLITE_BUSY when another writer commits in between,
//! whatever the busy timeout.
//!
//! One server owns the file, so its change revision is kept in process.
//!
//! Each connection keeps up to 16 MiB of pages (`cache_size`) and its
//! temporary structures in memory (`temp_store`): the issuance journal
//! inserts rows at random places of its serial index, which a 2 MiB cache
//! (SQLite's default) re-reads from the file once it outgrows it. The WAL is
//! checkpointed into the database every 10,000 pages (40 MiB) rather than
//! every 1,000: a page rewritten by many commits in between (an index's
//! last leaf, its parents) is copied once per checkpoint, not ten times.

mod agents;
mod audit_seals;
mod bundles;
mod ca_journal;
mod entries;
mod safe_ops;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use tokio::sync::watch;

use super::{AgentRecord, AuditSeal, IssuedRecord, Store, StoreError};

/// SQLite-backed [`Store`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    changes: Arc<watch::Sender<u64>>,
}

use crate::store::{decode_bundle, decode_entry, sorted_selectors};

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
            .foreign_keys(true)
            .pragma("cache_size", "-16384")
            .pragma("temp_store", "memory")
            .pragma("wal_autocheckpoint", "10000");
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
    use crate::store::JoinTokenRecord;
    use crate::store::prelude::*;
    use meshid_proto::types::Entry;
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
