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

mod agents;
mod audit_seals;
mod bundles;
mod ca_journal;
mod changes;
mod entries;
mod options;
mod safe_ops;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};
use tokio::sync::watch;

use super::{AgentRecord, AuditSeal, IssuedRecord, Store, StoreError};
pub use changes::{CHANNEL, PROBE_EVERY, RECHECK, StoreStats};
use changes::{current_revision, listen_loop, publish};
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

use crate::store::{decode_bundle, decode_entry, sorted_selectors};

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
    fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.ensure_listener();
        self.inner.changes.subscribe()
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
