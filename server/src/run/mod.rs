//! `meshid server run`: start-up, serving, and shutdown.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;

use crate::audit::{AuditLog, Event};
use crate::ca::CaManager;
use crate::config::{ServerConfig, StoreConfig};
use crate::metrics::Metrics;
use crate::state::ServerState;
use crate::store::{PostgresStore, SqliteStore, Store};
use meshid_identity::svid::unix;

mod admin_socket;
mod http;
mod node_api;

/// How often each server probes its store, and how long a probe may take.
const STORE_PROBE_EVERY: Duration = Duration::from_secs(2);
const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The store's health as last probed: `None` while it answers, else why not.
type StoreHealth = arc_swap::ArcSwapOption<String>;

/// Probes the store every [`STORE_PROBE_EVERY`]; updates `health`, the
/// `store_*` gauges, and logs each change of state.
fn spawn_store_probe(
    store: Arc<dyn Store>,
    pool: Option<sqlx::PgPool>,
    metrics: Arc<Metrics>,
    health: Arc<StoreHealth>,
) {
    tokio::spawn(async move {
        loop {
            let res = match tokio::time::timeout(STORE_PROBE_TIMEOUT, store.count_entries()).await {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(format!("store unreachable: {e}")),
                Err(_) => Some(format!(
                    "store unreachable: no answer within {STORE_PROBE_TIMEOUT:?}"
                )),
            };
            let was = health.load().as_deref().cloned();
            match (&was, &res) {
                (None, Some(why)) => tracing::error!(
                    reason = %why,
                    "store unreachable: not ready; refusing new node API calls, keeping open streams"
                ),
                (Some(_), None) => tracing::info!("store reachable again; ready"),
                _ => {}
            }
            metrics.store.up.set(i64::from(res.is_none()));
            if let Some(p) = &pool {
                metrics.store.pool_connections.set(i64::from(p.size()));
                metrics
                    .store
                    .pool_idle
                    .set(i64::try_from(p.num_idle()).unwrap_or(i64::MAX));
                metrics
                    .store
                    .pool_max
                    .set(i64::from(p.options().get_max_connections()));
            }
            health.store(res.map(Arc::new));
            tokio::time::sleep(STORE_PROBE_EVERY).await;
        }
    });
}

async fn open_store(
    cfg: &ServerConfig,
    metrics: &Metrics,
) -> anyhow::Result<(Arc<dyn Store>, Option<sqlx::PgPool>)> {
    match &cfg.store {
        StoreConfig::Sqlite { path } => {
            let p = path
                .clone()
                .unwrap_or_else(|| cfg.data_dir.join("meshid.db"));
            let s = SqliteStore::open(&p)
                .await
                .with_context(|| format!("opening SQLite store {}", p.display()))?;
            Ok((Arc::new(s), None))
        }
        StoreConfig::Postgres { .. } => {
            let opts = cfg.store.postgres_options().context("postgres options")?;
            let s = PostgresStore::connect_with_stats(&opts, metrics.store.stats.clone())
                .await
                .context("opening PostgreSQL store")?;
            let pool = s.pool().clone();
            Ok((Arc::new(s), Some(pool)))
        }
    }
}

/// How often expired certificates are pruned from the CA journal, how many
/// rows one statement removes (so no prune holds the database long), and
/// the pause between statements, in which issuance's own writes get the
/// database (a large backlog, e.g. the first start after an upgrade, is
/// worked off in steps instead of back to back).
const JOURNAL_PRUNE_EVERY: Duration = Duration::from_secs(600);
const JOURNAL_PRUNE_BATCH: i64 = 5_000;
const JOURNAL_PRUNE_PAUSE: Duration = Duration::from_millis(100);

/// Prunes the CA journal of certificates expired longer than `retention`
/// ago, at start and every [`JOURNAL_PRUNE_EVERY`]: without it the journal
/// grows by every SVID ever signed. Several servers sharing a database may
/// all prune; deleting what another already deleted is a no-op.
fn spawn_journal_pruner(store: Arc<dyn Store>, retention: Duration, metrics: Arc<Metrics>) {
    let retention = i64::try_from(retention.as_secs()).unwrap_or(i64::MAX);
    tokio::spawn(async move {
        loop {
            let before = unix(SystemTime::now()).saturating_sub(retention);
            match prune_journal(store.as_ref(), before, JOURNAL_PRUNE_BATCH).await {
                Ok(0) => {}
                Ok(n) => {
                    metrics.store.journal_pruned.inc_by(n);
                    tracing::info!(
                        records = n,
                        expired_before = before,
                        "pruned expired certificates from the CA journal"
                    );
                }
                Err((n, e)) => {
                    metrics.store.journal_pruned.inc_by(n);
                    tracing::warn!(error = %e, "pruning the CA journal failed; retried later");
                }
            }
            tokio::time::sleep(JOURNAL_PRUNE_EVERY).await;
        }
    });
}

/// Prunes in batches of `batch` rows, [`JOURNAL_PRUNE_PAUSE`] apart, until
/// a batch comes back short; how many rows went (also when a batch failed).
async fn prune_journal(
    store: &dyn Store,
    before: i64,
    batch: i64,
) -> Result<u64, (u64, crate::store::StoreError)> {
    let mut total = 0;
    loop {
        match store.prune_expired(before, batch).await {
            Ok(n) => {
                total += n;
                if n < u64::try_from(batch).unwrap_or(u64::MAX) {
                    return Ok(total);
                }
            }
            Err(e) => return Err((total, e)),
        }
        tokio::time::sleep(JOURNAL_PRUNE_PAUSE).await;
    }
}

/// The CA loop: runs the journal's due transitions, republishes the bundle
/// when anything changed (which the sync streams push to every agent), and
/// sleeps until the next transition, a manual change, or 10 s (a failed
/// transition is retried; other servers sharing the store may have changed
/// the journal).
fn spawn_ca_loop(state: Arc<ServerState>, renew: Arc<tokio::sync::Notify>) {
    tokio::spawn(async move {
        loop {
            let now = SystemTime::now();
            let next = match state.ca.tick(now).await {
                Ok((next, changed)) => {
                    if changed {
                        renew.notify_one();
                    }
                    next
                }
                Err(e) => {
                    tracing::error!(error = %e, "CA schedule failed; retrying");
                    None
                }
            };
            if let Err(e) = state.publish_own_bundle().await {
                tracing::error!(error = %e, "bundle publication failed; retrying");
            }
            state.next_transition.store(Arc::new(next.clone()));
            let wait = next
                .map(|(at, _)| {
                    Duration::from_secs(u64::try_from(at - unix(SystemTime::now())).unwrap_or(0))
                })
                .unwrap_or(Duration::from_secs(10))
                .clamp(Duration::from_millis(200), Duration::from_secs(10));
            tokio::select! {
                () = tokio::time::sleep(wait) => {},
                () = state.ca_changed.notified() => renew.notify_one(),
            }
        }
    });
}

/// Runs the server until SIGINT or SIGTERM.
pub async fn run(cfg: ServerConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data_dir {}", cfg.data_dir.display()))?;
    std::fs::set_permissions(&cfg.data_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("securing data_dir {}", cfg.data_dir.display()))?;
    let audit = AuditLog::open_with(&cfg.audit_log_path(), &cfg.audit)
        .with_context(|| format!("opening audit log {}", cfg.audit_log_path().display()))?;
    let metrics = Metrics::with_audit(audit.counters());
    let (store, pool) = open_store(&cfg, &metrics).await?;
    let store_health: Arc<StoreHealth> = Arc::default();
    spawn_store_probe(store.clone(), pool, metrics.clone(), store_health.clone());
    spawn_journal_pruner(store.clone(), cfg.journal_retention, metrics.clone());
    let sealer = start_sealer(&cfg, store.clone(), audit.clone()).await?;
    let ca = CaManager::start(&cfg, store.clone(), audit.clone(), metrics.clone())
        .await
        .context("the signing CA cannot be used; refusing to start")?;
    {
        let x = ca.signer();
        tracing::info!(id = %x.id(), not_after = %humantime::format_rfc3339_seconds(x.not_after()), owner = %ca.owner(), "signing CA ready");
    }
    audit
        .record(vec![
            Event::new(if ca.created_at_start() {
                "ca_created"
            } else {
                "ca_loaded"
            })
            .with("owner", ca.owner().to_string())
            .with("ca", ca.signer().id().to_string())
            .with("jwt_kid", ca.jwt_signer().kid().to_string()),
        ])
        .await?;
    let state = ServerState::new(cfg.clone(), ca, store, audit, metrics.clone());
    let bundle = state.publish_own_bundle().await?;
    // The sync streams' shared read of the store (it also sets the entry and
    // agent gauges), then one per change.
    state.sync_view.refresh(&state).await?;
    crate::sync_view::spawn_refresher(&state);
    // Changes committed through the store, by this server or by any other
    // sharing its database, wake this server's sync streams.
    let mut store_changes = state.store.subscribe_changes();
    let weak = Arc::downgrade(&state);
    tokio::spawn(async move {
        while store_changes.changed().await.is_ok() {
            let Some(st) = weak.upgrade() else { break };
            // The sync view's refresher reads the store and sets the
            // entry and agent gauges.
            st.notify_change();
        }
    });

    // Node API: the verifier follows the published bundle.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let node = node_api::start(&state, &bundle, store_health.clone(), stop_rx.clone()).await?;
    spawn_ca_loop(state.clone(), node.renew.clone());
    let crl = crate::admin_certs::publisher::CrlPublisher::start(state.clone())
        .await
        .context("cannot sign the first CRL; refusing to start")?;

    // Admin API on a Unix socket, 0600, own uid or root only.
    let sock = cfg.admin_socket_path();
    let admin_task = admin_socket::start(&state, &crl, &sock, stop_rx.clone())?;

    // Metrics, /healthz, /readyz.
    if let Some(addr) = cfg.metrics_address {
        http::start(&state, store_health.clone(), &crl, addr).await?;
    }

    tracing::info!(
        trust_domain = %cfg.trust_domain,
        node_api = %node.addr,
        admin_socket = %sock.display(),
        "meshid server ready"
    );
    meshid_identity::shutdown::signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = node.task.await;
        let _ = admin_task.await;
    })
    .await;
    let _ = std::fs::remove_file(&sock);
    if let Some(seq) = sealer.close().await {
        tracing::info!(seq, "audit chain head sealed");
    }
    Ok(())
}

/// Loads (or makes) the audit seal key and starts sealing the chain head.
async fn start_sealer(
    cfg: &ServerConfig,
    store: Arc<dyn Store>,
    audit: AuditLog,
) -> anyhow::Result<crate::audit::seal::Sealer> {
    let (key, created) = crate::audit::seal::SealKey::load_or_create(&cfg.data_dir)
        .context("the audit seal key cannot be used; refusing to start")?;
    let chain_id = key.chain_id().to_string();
    if created {
        audit
            .record(vec![
                Event::new("audit_seal_key_created").with("chain_id", chain_id.clone()),
            ])
            .await?;
    }
    let sealer = crate::audit::seal::Sealer::start(key, store, audit)
        .await
        .context("starting the audit sealer")?;
    tracing::info!(chain_id, "audit log chained and sealed");
    Ok(sealer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::IssuedRecord;
    use crate::store::prelude::*;

    #[tokio::test]
    async fn journal_is_pruned_in_batches_and_keeps_what_is_live() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = SqliteStore::open(&dir.path().join("meshid.db"))
            .await
            .expect("store");
        let rec = |i: i64, not_after: i64| IssuedRecord {
            serial: format!("{i:04x}"),
            spiffe_id: format!("spiffe://td/w{i}"),
            entry_id: format!("e{i}"),
            agent_id: "spiffe://td/agent".into(),
            not_after,
            issued_at: 1,
            ca_id: "c1".into(),
        };
        let certs: Vec<_> = (0..30)
            .map(|i| rec(i, if i < 25 { 100 } else { 500 }))
            .collect();
        store.record_issued(&certs).await.expect("record");
        assert_eq!(prune_journal(&store, 200, 10).await.expect("prune"), 25);
        assert_eq!(prune_journal(&store, 200, 10).await.expect("again"), 0);
        assert_eq!(store.get_issued("0000").await.expect("get"), None);
        for i in 25..30 {
            assert_eq!(
                store.get_issued(&format!("{i:04x}")).await.expect("get"),
                Some(rec(i, 500))
            );
        }
    }
}
