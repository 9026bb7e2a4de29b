//! Telling servers that share a database about each other's changes.
//!
//! Every change agents must see calls `meshid_note_change()` last in its
//! transaction (see the PostgreSQL migration): it bumps the one-row
//! `store_revision`, whose row lock makes revisions follow commit order,
//! appends to `change_log` and `NOTIFY`s [`CHANNEL`] with the new revision,
//! delivered on commit. Each store keeps one listening connection; after
//! `LISTEN` succeeds (at start and after every reconnect) it reads the
//! revision, so a change committed while the connection was down is caught up,
//! not lost. A periodic check (every [`RECHECK`]) covers a connection that
//! died silently.

use std::collections::HashMap;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};
use tokio::sync::watch;

use crate::store::StoreError;

/// The notification channel servers listen on.
pub const CHANNEL: &str = "meshid_changes";

/// How often a listener re-reads the revision even without a notification,
/// and prunes the change log.
pub const RECHECK: Duration = Duration::from_secs(30);

/// How long the change log keeps a change, in seconds.
const CHANGE_LOG_KEEP_SECS: i64 = 3600;

/// Largest wait between attempts to re-establish the listening connection.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How often the listener measures its notification lag.
pub const PROBE_EVERY: Duration = Duration::from_secs(5);

/// What the change listener measures (shared with the server's metrics).
#[derive(Debug, Clone)]
pub struct StoreStats {
    /// Seconds from a `NOTIFY` sent through the store's pool to its delivery
    /// on the listening connection: the delay every change pays before
    /// servers sharing the database see it. Probed every [`PROBE_EVERY`].
    pub notification_lag: Histogram,
    /// Times the listening connection was lost or could not listen.
    pub listener_reconnects: Counter,
}

impl Default for StoreStats {
    fn default() -> Self {
        Self {
            notification_lag: Histogram::new(exponential_buckets(0.000_5, 2.0, 14)),
            listener_reconnects: Counter::default(),
        }
    }
}

/// Records a change agents must see; call last in the transaction. Returns the
/// new revision (visible to others once the transaction commits).
pub(super) async fn note_change(
    tx: &mut Transaction<'_, Postgres>,
    kind: &str,
    key: &str,
) -> Result<u64, StoreError> {
    let rev: i64 = sqlx::query_scalar("SELECT meshid_note_change($1, $2)")
        .bind(kind)
        .bind(key)
        .fetch_one(&mut **tx)
        .await?;
    Ok(u64::try_from(rev).unwrap_or(0))
}

/// Raises the published revision to `rev` (never lowers it).
pub(super) fn publish(changes: &watch::Sender<u64>, rev: u64) {
    changes.send_if_modified(|v| {
        if rev > *v {
            *v = rev;
            true
        } else {
            false
        }
    });
}

pub(super) async fn current_revision(pool: &PgPool) -> Result<u64, StoreError> {
    let rev: i64 = sqlx::query_scalar("SELECT revision FROM store_revision WHERE id = 1")
        .fetch_one(pool)
        .await?;
    Ok(u64::try_from(rev).unwrap_or(0))
}

/// Keeps one listening connection up for as long as the store lives.
pub(super) async fn listen_loop(
    pool: PgPool,
    connect: PgConnectOptions,
    changes: watch::Sender<u64>,
    stats: StoreStats,
) {
    // A channel of this listener's own for the lag probes.
    let probe_channel = format!("meshid_probe_{}", uuid::Uuid::new_v4().simple());
    // The listener has a pool of one connection of its own: it never takes
    // a connection from the store's pool, and after a loss it must open a
    // new connection (and so LISTEN again) rather than reuse an idle one.
    let lpool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(connect);
    let mut backoff = Duration::from_millis(50);
    loop {
        match listen_once(&pool, &lpool, &changes, &stats, &probe_channel).await {
            Ok(()) => {
                stats.listener_reconnects.inc();
                tracing::warn!("store change listener lost its connection; reconnecting");
                backoff = Duration::from_millis(50);
            }
            Err(e) => {
                stats.listener_reconnects.inc();
                tracing::warn!(error = %e, retry_in = ?backoff, "store change listener cannot listen");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        if pool.is_closed() {
            return;
        }
    }
}

/// LISTENs, catches up, then follows notifications until the connection is
/// lost (`Ok`) or fails (`Err`).
async fn listen_once(
    pool: &PgPool,
    lpool: &PgPool,
    changes: &watch::Sender<u64>,
    stats: &StoreStats,
    probe_channel: &str,
) -> Result<(), StoreError> {
    let mut listener = PgListener::connect_with(lpool).await?;
    listener.eager_reconnect(false);
    listener.listen_all([CHANNEL, probe_channel]).await?;
    let mut probes: HashMap<u64, tokio::time::Instant> = HashMap::new();
    let mut next_probe = 0u64;
    let mut probe = tokio::time::interval(PROBE_EVERY);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Anything committed before LISTEN took effect is in the revision row;
    // anything after is notified.
    publish(changes, current_revision(pool).await?);
    tracing::debug!("store change listener is listening");
    let mut recheck = tokio::time::interval(RECHECK);
    recheck.tick().await;
    loop {
        tokio::select! {
            n = listener.try_recv() => match n? {
                Some(n) if n.channel() == probe_channel => {
                    if let Some(sent) = n.payload().parse::<u64>().ok().and_then(|k| probes.remove(&k)) {
                        stats.notification_lag.observe(sent.elapsed().as_secs_f64());
                    }
                }
                Some(n) => match n.payload().parse::<u64>() {
                    Ok(rev) => publish(changes, rev),
                    Err(_) => publish(changes, current_revision(pool).await?),
                },
                None => return Ok(()),
            },
            _ = probe.tick() => {
                // Unanswered probes older than a few rounds are dropped.
                probes.retain(|k, _| *k + 4 > next_probe);
                probes.insert(next_probe, tokio::time::Instant::now());
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(probe_channel)
                    .bind(next_probe.to_string())
                    .execute(pool)
                    .await?;
                next_probe += 1;
            }
            _ = recheck.tick() => {
                publish(changes, current_revision(pool).await?);
                sqlx::query("DELETE FROM change_log WHERE at < extract(epoch FROM now())::BIGINT - $1")
                    .bind(CHANGE_LOG_KEEP_SECS)
                    .execute(pool)
                    .await?;
            }
        }
    }
}
