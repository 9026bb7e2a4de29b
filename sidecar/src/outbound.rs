//! The outbound proxy: accept plaintext on loopback, dial the upstream,
//! mTLS with the current SVID, and require the upstream's SPIFFE ID.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

use crate::COPY_BUFFER;
use crate::config::{Outbound, split_host_port};
use crate::failure::classify_io;
use crate::metrics::{ByteLabels, DirLabels, Direction};
use crate::shared::{Admission, Shared};

/// One outbound listener's settings.
#[derive(Debug)]
pub struct OutboundCtx {
    idx: usize,
    upstream: String,
    server_name: ServerName<'static>,
}

impl OutboundCtx {
    /// Settings of outbound listener number `idx`. The TLS server name is
    /// `sni`, else the upstream host (the SPIFFE ID is what gets verified).
    pub fn new(idx: usize, ob: &Outbound) -> Self {
        let host = ob
            .sni
            .clone()
            .or_else(|| split_host_port(&ob.upstream).map(|(h, _)| h.to_string()))
            .unwrap_or_default();
        let server_name = ServerName::try_from(host)
            .unwrap_or_else(|_| ServerName::try_from("upstream.invalid").expect("valid name"));
        Self {
            idx,
            upstream: ob.upstream.clone(),
            server_name,
        }
    }
}

/// Accepts until shutdown; each connection runs in its own task. A
/// connection beyond `max_outbound_connections` is closed at once and
/// counted ([`Shared::admit`]).
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, ctx: Arc<OutboundCtx>) {
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "outbound accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shared.shutdown.cancelled() => return,
        };
        let Ok(admission) = shared.admit(Direction::Outbound, peer) else {
            // Dropping the socket closes it; `admit` counted and logged.
            continue;
        };
        let _ = tcp.set_nodelay(true);
        shared
            .tracker
            .spawn(handle(shared.clone(), ctx.clone(), tcp, peer, admission));
    }
}

async fn handle(
    shared: Arc<Shared>,
    ctx: Arc<OutboundCtx>,
    mut local: TcpStream,
    peer: SocketAddr,
    admission: Admission,
) {
    let Admission {
        connection: _connection,
        pending,
    } = admission;
    let m = &shared.metrics;
    let dir = DirLabels {
        direction: Direction::Outbound,
    };
    let Some(cfg) = shared
        .identity
        .current()
        .and_then(|s| s.outbound.get(ctx.idx).cloned())
    else {
        m.handshake(Direction::Outbound, "not_ready");
        return;
    };
    let up = match tokio::time::timeout(shared.connect_timeout, TcpStream::connect(&ctx.upstream))
        .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            m.dial_errors.get_or_create(&dir).inc();
            tracing::warn!(upstream = ctx.upstream, error = %e, "cannot reach upstream");
            return;
        }
        Err(_) => {
            m.dial_errors.get_or_create(&dir).inc();
            tracing::warn!(upstream = ctx.upstream, "timed out connecting to upstream");
            return;
        }
    };
    let _ = up.set_nodelay(true);
    let connect = TlsConnector::from(cfg).connect(ctx.server_name.clone(), up);
    let res = tokio::time::timeout(shared.handshake_timeout, connect).await;
    drop(pending);
    let mut tls = match res {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            let outcome = classify_io(&e);
            m.handshake(Direction::Outbound, outcome);
            tracing::warn!(upstream = ctx.upstream, error = %crate::describe_io(&e), outcome, "outbound handshake failed");
            return;
        }
        Err(_) => {
            m.handshake(Direction::Outbound, "timeout");
            tracing::warn!(upstream = ctx.upstream, "outbound handshake timed out");
            return;
        }
    };
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    if resumed
        && let Some(snap) = shared.identity.current()
        && let Err(e) = snap.reverify_resumed_upstream(
            ctx.idx,
            tls.get_ref().1.peer_certificates().unwrap_or_default(),
        )
    {
        // The session cache held an upstream chain that no longer passes.
        let outcome = meshid_identity::verify::classify(&e);
        m.handshake(Direction::Outbound, outcome);
        tracing::warn!(
            upstream = ctx.upstream,
            error = %meshid_identity::verify::describe(&e),
            outcome,
            "outbound resumed session refused"
        );
        return;
    }
    m.handshake(Direction::Outbound, if resumed { "resumed" } else { "ok" });
    m.key_exchange(
        Direction::Outbound,
        tls.get_ref().1.negotiated_key_exchange_group(),
    );

    let started = Instant::now();
    m.active.get_or_create(&dir).inc();
    match tokio::io::copy_bidirectional_with_sizes(&mut local, &mut tls, COPY_BUFFER, COPY_BUFFER)
        .await
    {
        Ok((to_peer, from_peer)) => {
            m.bytes
                .get_or_create(&ByteLabels {
                    direction: Direction::Outbound,
                    flow: "tx",
                })
                .inc_by(to_peer);
            m.bytes
                .get_or_create(&ByteLabels {
                    direction: Direction::Outbound,
                    flow: "rx",
                })
                .inc_by(from_peer);
        }
        Err(e) => tracing::debug!(%peer, error = %e, "outbound connection ended with error"),
    }
    m.active.get_or_create(&dir).dec();
    m.duration
        .get_or_create(&dir)
        .observe(started.elapsed().as_secs_f64());
}
