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
use crate::ca::{JwtSigner, SigningCa};
use crate::config::{ServerConfig, StoreConfig};
use crate::metrics::Metrics;
use crate::state::ServerState;
use crate::store::{CaRecord, PostgresStore, SqliteStore, Store};
use meshid_identity::svid::unix;

/// Server SVID lifetime; renewed at half-life.
const SERVER_SVID_TTL: Duration = Duration::from_secs(3600);

async fn open_store(cfg: &ServerConfig) -> anyhow::Result<Arc<dyn Store>> {
    match &cfg.store {
        StoreConfig::Sqlite { path } => {
            let p = path
                .clone()
                .unwrap_or_else(|| cfg.data_dir.join("meshid.db"));
            let s = SqliteStore::open(&p)
                .await
                .with_context(|| format!("opening SQLite store {}", p.display()))?;
            Ok(Arc::new(s))
        }
        StoreConfig::Postgres { .. } => {
            let opts = cfg.store.postgres_options().context("postgres options")?;
            let s = PostgresStore::connect(&opts)
                .await
                .context("opening PostgreSQL store")?;
            Ok(Arc::new(s))
        }
    }
}

fn ca_record(ca: &SigningCa, kind: &str) -> CaRecord {
    use x509_parser::prelude::*;
    let (serial, subject, nb) = X509Certificate::from_der(ca.cert_der())
        .map(|(_, c)| {
            (
                hex::encode(c.raw_serial()),
                c.subject().to_string(),
                c.validity().not_before.timestamp(),
            )
        })
        .unwrap_or_default();
    CaRecord {
        serial,
        kind: kind.into(),
        subject,
        not_before: nb,
        not_after: unix(ca.not_after()),
        state: "active".into(),
    }
}

/// Issues the server's own SVID and returns it as a rustls key.
async fn server_certified_key(st: &ServerState) -> anyhow::Result<(CertifiedKey, SystemTime)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
    let svid = st
        .issue_identity(
            csr.der(),
            &st.server_id(),
            SERVER_SVID_TTL,
            &st.server_id(),
            "server",
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
    Ok((CertifiedKey::new(chain, signing), svid.not_after))
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

/// Runs the server until SIGINT or SIGTERM.
pub async fn run(cfg: ServerConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data_dir {}", cfg.data_dir.display()))?;
    std::fs::set_permissions(&cfg.data_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("securing data_dir {}", cfg.data_dir.display()))?;
    let audit = AuditLog::open(&cfg.audit_log_path())
        .with_context(|| format!("opening audit log {}", cfg.audit_log_path().display()))?;
    let store = open_store(&cfg).await?;
    let (ca, created) = SigningCa::load_or_create(
        &cfg.data_dir,
        &cfg.trust_domain,
        cfg.ca_ttl,
        cfg.upstream.as_ref(),
        SystemTime::now(),
    )
    .context("the signing CA cannot be used; refusing to start")?;
    let kind = if cfg.upstream.is_some() {
        "intermediate"
    } else {
        "self_signed"
    };
    let rec = ca_record(&ca, kind);
    store.put_ca(&rec).await?;
    audit.write(
        Event::new(if created { "ca_created" } else { "ca_loaded" })
            .with("kind", kind)
            .with("serial", rec.serial.clone())
            .with("not_after", rec.not_after),
    )?;
    tracing::info!(kind, serial = %rec.serial, not_after = %humantime::format_rfc3339_seconds(ca.not_after()), created, "signing CA ready");
    let jwt = JwtSigner::load_or_create(&cfg.data_dir)?;
    let metrics = Metrics::new();
    metrics.ca_not_after.set(unix(ca.not_after()));
    let (changes, _) = tokio::sync::watch::channel(0u64);
    let journal = crate::journal::Journal::start(store.clone(), audit.clone());
    let state = Arc::new(ServerState {
        config: cfg.clone(),
        journal,
        ca: Arc::new(ca),
        jwt: Arc::new(jwt),
        store,
        audit,
        metrics: metrics.clone(),
        changes,
        node_address: Default::default(),
        metrics_address: Default::default(),
    });
    let bundle = state.publish_own_bundle().await?;
    state.refresh_gauges().await;
    // Changes committed through the store, by this server or by any other
    // sharing its database, wake this server's sync streams.
    let mut store_changes = state.store.subscribe_changes();
    let weak = Arc::downgrade(&state);
    tokio::spawn(async move {
        while store_changes.changed().await.is_ok() {
            let Some(st) = weak.upgrade() else { break };
            st.notify_change();
            st.refresh_gauges().await;
        }
    });

    // Node API.
    let (ck, not_after) = server_certified_key(&state).await?;
    let resolver = ServerCertResolver::new(ck);
    let provider = meshid_identity::crypto::provider();
    let mut bundles = TrustBundles::new();
    let roots: Vec<CertificateDer<'static>> = bundle
        .x509_authorities
        .iter()
        .map(|d| CertificateDer::from(d.clone()))
        .collect();
    bundles.add(&cfg.trust_domain, &roots);
    let verifier = SpiffeClientVerifier::new(bundles, Authorizer::Any, &provider, false);
    let mut tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(meshid_identity::crypto::versions(false))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver.clone());
    tls.alpn_protocols = vec![b"h2".to_vec()];
    // No resumption: every connection presents the agent's current SVID.
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    let listener = TcpListener::bind(cfg.bind_address)
        .await
        .with_context(|| format!("binding node API on {}", cfg.bind_address))?;
    let node_addr = listener.local_addr()?;
    let _ = state.node_address.set(node_addr.to_string());
    let incoming = ReceiverStream::new(accept_loop(listener, Arc::new(tls), metrics.clone()));
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
    let node_server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(NodeServer::new(NodeService::new(state.clone(), psat)))
        .serve_with_incoming_shutdown(incoming, node_stop);
    let node_task = tokio::spawn(node_server);

    // Server SVID renewal at half-life.
    {
        let state = state.clone();
        let resolver = resolver.clone();
        let mut not_after = not_after;
        tokio::spawn(async move {
            loop {
                let left = not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                tokio::time::sleep((left / 2).max(Duration::from_secs(1))).await;
                match server_certified_key(&state).await {
                    Ok((ck, na)) => {
                        resolver.set(ck);
                        not_after = na;
                        tracing::info!("server SVID renewed");
                    }
                    Err(e) => tracing::error!(error = %e, "server SVID renewal failed; retrying"),
                }
            }
        });
    }

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
                get(|State(s): State<Arc<ServerState>>| async move {
                    s.refresh_gauges().await;
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        s.metrics.encode(),
                    )
                }),
            )
            .route("/healthz", get(|| async { "ok\n" }))
            .route(
                "/readyz",
                get(|State(s): State<Arc<ServerState>>| async move {
                    match s.ca.revalidate(SystemTime::now()) {
                        Err(e) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("CA not usable: {e}\n"),
                        ),
                        Ok(()) => match s.store.count_entries().await {
                            Ok(_) => (StatusCode::OK, "ready\n".to_string()),
                            Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}\n")),
                        },
                    }
                }),
            )
            .with_state(state.clone());
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
    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = node_task.await;
        let _ = admin_task.await;
    })
    .await;
    let _ = std::fs::remove_file(&sock);
    Ok(())
}
