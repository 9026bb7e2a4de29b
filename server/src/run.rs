//! `meshid server run`: start-up, serving, and shutdown.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use meshid_identity::verify::{Authorizer, SpiffeClientVerifier, TrustBundles};
use meshid_proto::admin::admin_server::AdminServer;
use meshid_proto::node::node_server::NodeServer;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::ReceiverStream;

use crate::api::admin::AdminService;
use crate::api::node::NodeService;
use crate::api::tls::{ServerCertResolver, accept_loop};
use crate::audit::{AuditLog, Event};
use crate::ca::CaManager;
use crate::config::{ServerConfig, StoreConfig};
use crate::metrics::Metrics;
use crate::state::ServerState;
use crate::store::{PostgresStore, SqliteStore, Store};
use meshid_identity::svid::unix;

/// Server SVID lifetime; renewed at half-life.
const SERVER_SVID_TTL: Duration = Duration::from_secs(3600);

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

/// Issues the server's own SVID and returns it as a rustls key.
async fn server_certified_key(
    st: &ServerState,
) -> anyhow::Result<(CertifiedKey, SystemTime, String)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
    let svid = crate::issuance::sign_identity(
        st,
        csr.der(),
        &st.server_id(),
        SERVER_SVID_TTL,
        "server",
        SystemTime::now(),
    )
    .await?;
    let provider = meshid_identity::crypto::provider();
    let signing = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            key.serialize_der(),
        )))?;
    let chain = svid
        .chain
        .iter()
        .map(|d| CertificateDer::from(d.clone()))
        .collect();
    let ca_id = svid
        .chain
        .first()
        .and_then(|l| meshid_identity::svid::authority_key_id(l))
        .unwrap_or_default();
    Ok((CertifiedKey::new(chain, signing), svid.not_after, ca_id))
}

/// The node API's TLS configuration: the server SVID from `resolver`, and
/// agents' client certificates verified against `roots` (the own bundle as
/// last published, so the verifier follows every CA rotation).
fn node_tls_config(
    cfg: &ServerConfig,
    roots: &[Vec<u8>],
    resolver: Arc<ServerCertResolver>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let td = cfg.trust_domain.as_str();
    let provider = meshid_identity::crypto::provider_for(cfg.tls_key_exchange);
    let mut bundles = TrustBundles::new();
    let ders: Vec<CertificateDer<'static>> = roots
        .iter()
        .map(|d| CertificateDer::from(d.clone()))
        .collect();
    bundles.add(td, &ders);
    let verifier = SpiffeClientVerifier::new(bundles, Authorizer::Any, &provider, false);
    let mut tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(meshid_identity::crypto::versions(false))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    tls.alpn_protocols = vec![b"h2".to_vec()];
    // No resumption: every connection presents the agent's current SVID.
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    Ok(Arc::new(tls))
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
    state.refresh_gauges().await;
    // The sync streams' shared read of the store, then one per change.
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
    let (ck, not_after, svid_ca) = server_certified_key(&state).await?;
    let resolver = ServerCertResolver::new(ck);
    let tls = Arc::new(arc_swap::ArcSwap::new(node_tls_config(
        &cfg,
        &bundle.x509_authorities,
        resolver.clone(),
    )?));
    {
        let (state, tls, resolver) = (state.clone(), tls.clone(), resolver.clone());
        let mut changes = state.changes.subscribe();
        let mut roots = bundle.x509_authorities.clone();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let Ok(b) = state.own_bundle().await else {
                    continue;
                };
                if b.x509_authorities == roots {
                    continue;
                }
                match node_tls_config(&state.config, &b.x509_authorities, resolver.clone()) {
                    Ok(c) => {
                        tls.store(c);
                        roots = b.x509_authorities;
                        tracing::info!(roots = roots.len(), "node API now trusts the new bundle");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot rebuild the node API TLS configuration")
                    }
                }
            }
        });
    }
    let listener = TcpListener::bind(cfg.bind_address)
        .await
        .with_context(|| format!("binding node API on {}", cfg.bind_address))?;
    let node_addr = listener.local_addr()?;
    let _ = state.node_address.set(node_addr.to_string());
    let incoming = ReceiverStream::new(accept_loop(listener, tls, metrics.clone(), &cfg.node_api));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let node_stop = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.changed().await;
        }
    };
    let psat = match &cfg.node_attestor.k8s_psat {
        Some(c) => {
            let a = crate::attest::k8s_psat::PsatAttestor::new(c, &state.td_id())
                .context("node_attestor.k8s_psat")?;
            tracing::info!(cluster = %c.cluster, "Kubernetes PSAT node attestation enabled");
            Some(Arc::new(a))
        }
        None => None,
    };
    // While the store is unreachable, new calls are refused (Unavailable:
    // an agent tries another server); open sync streams stay.
    let gate = {
        let health = store_health.clone();
        move |req: tonic::Request<()>| match health.load().as_deref() {
            None => Ok(req),
            Some(why) => Err(tonic::Status::unavailable(format!(
                "this server cannot reach its store; try another server ({why})"
            ))),
        }
    };
    let node_server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .max_concurrent_streams(Some(cfg.node_api.max_concurrent_streams))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            NodeServer::new(NodeService::new(state.clone(), psat))
                .max_decoding_message_size(cfg.node_api.max_message_size),
            gate,
        ))
        .serve_with_incoming_shutdown(incoming, node_stop);
    let node_task = tokio::spawn(node_server);

    // Server SVID renewal at half-life, and at once when the signing CA
    // changed or the one that signed it is tainted.
    let renew = Arc::new(tokio::sync::Notify::new());
    {
        let state = state.clone();
        let resolver = resolver.clone();
        let renew = renew.clone();
        let mut not_after = not_after;
        let mut svid_ca = svid_ca;
        tokio::spawn(async move {
            loop {
                let left = not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                let stale =
                    svid_ca != state.ca.signer().id() || state.tainted.load().contains(&svid_ca);
                if !stale {
                    tokio::select! {
                        () = tokio::time::sleep((left / 2).max(Duration::from_secs(1))) => {},
                        () = renew.notified() => {
                            let stale = svid_ca != state.ca.signer().id()
                                || state.tainted.load().contains(&svid_ca);
                            if !stale { continue; }
                        },
                    }
                }
                match server_certified_key(&state).await {
                    Ok((ck, na, ca)) => {
                        resolver.set(ck);
                        not_after = na;
                        svid_ca = ca;
                        tracing::info!(ca = %svid_ca, "server SVID renewed");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "server SVID renewal failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
    }
    spawn_ca_loop(state.clone(), renew);
    let crl = crate::admin_certs::publisher::CrlPublisher::start(state.clone())
        .await
        .context("cannot sign the first CRL; refusing to start")?;

    // Admin API on a Unix socket, 0600, own uid or root only.
    let sock = cfg.admin_socket_path();
    if let Some(dir) = sock.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if sock.exists() {
        std::fs::remove_file(&sock)
            .with_context(|| format!("removing stale socket {}", sock.display()))?;
    }
    let ul = UnixListener::bind(&sock)
        .with_context(|| format!("binding admin socket {}", sock.display()))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    let my_uid = nix::unistd::geteuid().as_raw();
    let (admin_tx, admin_rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            match ul.accept().await {
                Ok((s, _)) => {
                    let uid = s.peer_cred().map(|c| c.uid()).ok();
                    if uid == Some(my_uid) || uid == Some(0) {
                        // Any HTTP/2 :authority (gRPC clients disagree on Unix sockets).
                        let s = meshid_identity::h2_authority::AuthorityNormalizer::new(
                            s,
                            "admin_api",
                            None,
                        );
                        if admin_tx.send(Ok::<_, std::io::Error>(s)).await.is_err() {
                            break;
                        }
                    } else {
                        tracing::warn!(
                            ?uid,
                            "admin API connection refused: caller uid is neither the server's nor root"
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "admin socket accept failed"),
            }
        }
    });
    let admin_stop = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.changed().await;
        }
    };
    let admin_task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AdminServer::new(AdminService::new(state.clone())))
            .add_service(
                meshid_proto::admin::admin_safe_ops_server::AdminSafeOpsServer::new(
                    crate::api::admin_safe_ops::SafeOpsService::new(state.clone()),
                ),
            )
            .add_service(
                meshid_proto::admin::admin_x509_server::AdminX509Server::new(
                    crate::admin_certs::api::X509AdminService::new(state.clone(), crl.clone()),
                ),
            )
            .serve_with_incoming_shutdown(ReceiverStream::new(admin_rx), admin_stop),
    );

    // Metrics, /healthz, /readyz.
    if let Some(addr) = cfg.metrics_address {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding metrics on {addr}"))?;
        let _ = state.metrics_address.set(l.local_addr()?.to_string());
        let app = axum::Router::new()
            .route(
                "/metrics",
                get(
                    |State((s, _)): State<(Arc<ServerState>, Arc<StoreHealth>)>| async move {
                        s.refresh_gauges().await;
                        (
                            [(
                                "content-type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            s.metrics.encode(),
                        )
                    },
                ),
            )
            .route("/healthz", get(|| async { "ok\n" }))
            .route(
                "/readyz",
                get(
                    |State((s, health)): State<(Arc<ServerState>, Arc<StoreHealth>)>| async move {
                        let r = s.ca.readiness(SystemTime::now()).await;
                        let left = crate::api::admin_ca::active_remaining(&s);
                        let mut body =
                            format!("active CA {} expires in {left}s\n", s.ca.signer().id());
                        for w in &r.warnings {
                            body.push_str(&format!("warning: {w}\n"));
                        }
                        let mut fatal = r.fatal.clone();
                        if let Some(why) = health.load().as_deref() {
                            fatal.push(format!(
                                "{why} (open sync streams are kept; new node API calls are refused)"
                            ));
                        }
                        if !fatal.is_empty() {
                            for f in &fatal {
                                body.push_str(&format!("not ready: {f}\n"));
                            }
                            return (StatusCode::SERVICE_UNAVAILABLE, body);
                        }
                        (StatusCode::OK, format!("ready\nstore: reachable\n{body}"))
                    },
                ),
            )
            .with_state((state.clone(), store_health.clone()))
            .merge(crl.routes());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(l, app).await {
                tracing::error!(error = %e, "metrics server failed");
            }
        });
    }

    tracing::info!(
        trust_domain = %cfg.trust_domain,
        node_api = %node_addr,
        admin_socket = %sock.display(),
        "meshid server ready"
    );
    meshid_identity::shutdown::signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = node_task.await;
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
