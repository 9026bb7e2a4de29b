//! The HTTP endpoint: `/metrics` (OpenMetrics), `/healthz`, `/readyz` (the
//! CA's readiness and the store's health, with the reason when not ready)
//! and the admin certificates' CRL.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;

use super::StoreHealth;
use crate::admin_certs::publisher::CrlPublisher;
use crate::state::ServerState;

/// Binds `addr` and serves until the process ends.
pub(super) async fn start(
    state: &Arc<ServerState>,
    store_health: Arc<StoreHealth>,
    crl: &Arc<CrlPublisher>,
    addr: SocketAddr,
) -> anyhow::Result<()> {
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
                    let mut body = format!("active CA {} expires in {left}s\n", s.ca.signer().id());
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
    Ok(())
}
