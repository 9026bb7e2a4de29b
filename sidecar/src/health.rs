//! Admin endpoints: `/healthz` (liveness), `/readyz` (a real mTLS handshake
//! against the first inbound listener with the current SVID) and
//! `/metrics` (Prometheus text).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use meshid_identity::SvidInfo;
use rustls_pki_types::ServerName;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket};
use tokio_rustls::TlsConnector;

use crate::identity::PROBE_SNI;
use crate::shared::Shared;

/// Serves the admin endpoints until shutdown.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener) -> std::io::Result<()> {
    let token = shared.shutdown.clone();
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared);
    axum::serve(listener, app)
        .with_graceful_shutdown(token.cancelled_owned())
        .await
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.encode(),
    )
}

async fn readyz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let crl_status = || {
        shared
            .identity
            .crl()
            .map(|c| c.readiness(rustls_pki_types::UnixTime::now()))
            .unwrap_or_default()
    };
    let (crl, crl_problem) = crl_status();
    if let Some(why) = crl_problem {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n{crl}"),
        );
    }
    match probe(&shared).await {
        Ok(svid) => (
            StatusCode::OK,
            format!(
                "ready\nspiffe_id: {}\nserial: {}\nnot_after: {}\n{crl}",
                svid.spiffe_id,
                svid.serial,
                svid.not_after_unix()
            ),
        ),
        Err(reason) => {
            // The CRL may have gone stale during the probe: say so rather
            // than quote the probe's handshake error.
            let (crl, crl_problem) = crl_status();
            let reason = crl_problem.unwrap_or(reason);
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n{crl}"),
            )
        }
    }
}

/// Checks readiness: an SVID is installed and, if there is an inbound
/// listener, a full (never resumed) mTLS handshake with it succeeds in both
/// directions and the listener presents the current SVID. Probe connections
/// are exempt from the inbound budgets (at most [`crate::Probes::MAX`] at
/// once), so a flood of idle peers does not make the sidecar look unready.
pub async fn probe(shared: &Shared) -> Result<SvidInfo, String> {
    let snap = shared
        .identity
        .current()
        .ok_or("no SVID from the Workload API yet")?;
    let Some(target) = shared.probe_target else {
        return Ok(snap.svid.clone());
    };
    let t = shared.handshake_timeout;
    let _slot = tokio::time::timeout(t, shared.probes.slots.acquire())
        .await
        .map_err(|_| "too many readiness probes at once".to_string())?
        .map_err(|e| e.to_string())?;
    // The listener exempts our probes from its connection budgets by their
    // source address, so bind before connecting and register it.
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .and_then(|s| {
        s.bind(SocketAddr::new(target.ip(), 0))?;
        Ok(s)
    })
    .map_err(|e| format!("probe socket: {e}"))?;
    let source = socket
        .local_addr()
        .map_err(|e| format!("probe socket: {e}"))?;
    let _registered = shared.probes.register(source);
    let tcp = tokio::time::timeout(t, socket.connect(target))
        .await
        .map_err(|_| format!("connect {target}: timeout"))?
        .map_err(|e| format!("connect {target}: {e}"))?;
    let name = ServerName::try_from(PROBE_SNI).map_err(|e| e.to_string())?;
    let mut tls = tokio::time::timeout(
        t,
        TlsConnector::from(snap.probe_client.clone()).connect(name, tcp),
    )
    .await
    .map_err(|_| "handshake: timeout".to_string())?
    .map_err(|e| format!("handshake: {e}"))?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("listener presented no certificate")?;
    let presented = SvidInfo::from_der(leaf).map_err(|e| e.to_string())?;
    // In TLS 1.3 the server checks our certificate after our Finished: wait
    // for its verdict (close_notify = accepted, an alert = refused).
    let mut buf = [0u8; 1];
    match tokio::time::timeout(t, tls.read(&mut buf)).await {
        Ok(Ok(0)) => {}
        Ok(Ok(_)) => return Err("listener sent unexpected data".into()),
        Ok(Err(e)) => return Err(format!("listener refused our SVID: {e}")),
        Err(_) => return Err("listener verdict: timeout".into()),
    }
    let now = shared.identity.current().unwrap_or(snap);
    if presented.serial != now.svid.serial {
        return Err(format!(
            "listener presents serial {}, current SVID is {}",
            presented.serial, now.svid.serial
        ));
    }
    Ok(now.svid.clone())
}
