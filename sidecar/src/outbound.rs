//! The outbound proxy: accept plaintext on loopback, dial the upstream,
//! mTLS with the current SVID, and require the upstream's SPIFFE ID. With
//! `tunnel = "h2"` connections ride one pooled tunnel instead
//! ([`crate::tunnel`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::config::{Outbound, Tunnel, split_host_port};
use crate::copy::splice;
use crate::failure::{classify_io, describe_io};
use crate::identity::OutboundTls;
use crate::metrics::{ByteLabels, DirLabels, Direction};
use crate::peer_io::{PeerIo, peer_io};
use crate::shared::{Admission, Shared};
use crate::tunnel::outbound::Pool;

/// One outbound listener's settings.
#[derive(Debug)]
pub struct OutboundCtx {
    tls: Arc<OutboundTls>,
    upstream: String,
    server_name: ServerName<'static>,
    tunnel: Option<Pool>,
}

impl OutboundCtx {
    /// A listener with settings `ob` and its TLS handle (the upstream ID it
    /// requires). The TLS server name is `sni`, else the upstream host (the
    /// SPIFFE ID is what gets verified).
    pub fn new(ob: &Outbound, tls: Arc<OutboundTls>) -> Self {
        let host = ob
            .sni
            .clone()
            .or_else(|| split_host_port(&ob.upstream).map(|(h, _)| h.to_string()))
            .unwrap_or_default();
        let server_name = ServerName::try_from(host)
            .unwrap_or_else(|_| ServerName::try_from("upstream.invalid").expect("valid name"));
        Self {
            tls,
            upstream: ob.upstream.clone(),
            server_name,
            tunnel: (ob.tunnel == Some(Tunnel::H2)).then(Pool::default),
        }
    }

    /// The listener's TLS handle.
    pub fn tls(&self) -> &Arc<OutboundTls> {
        &self.tls
    }

    /// The upstream `host:port`.
    pub fn upstream(&self) -> &str {
        &self.upstream
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

/// Dials the upstream and completes an mTLS handshake with `cfg`, checking
/// the upstream's SPIFFE ID (re-verified on resumption). Counts and logs
/// every outcome; `None` when there is no verified connection.
pub(crate) async fn connect_tls(
    shared: &Shared,
    ctx: &OutboundCtx,
    cfg: Arc<ClientConfig>,
) -> Option<TlsStream<PeerIo>> {
    let m = &shared.metrics;
    let dir = DirLabels {
        direction: Direction::Outbound,
    };
    let up = match tokio::time::timeout(shared.connect_timeout, TcpStream::connect(&ctx.upstream))
        .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            m.dial_errors.get_or_create(&dir).inc();
            tracing::warn!(upstream = ctx.upstream, error = %e, "cannot reach upstream");
            return None;
        }
        Err(_) => {
            m.dial_errors.get_or_create(&dir).inc();
            tracing::warn!(upstream = ctx.upstream, "timed out connecting to upstream");
            return None;
        }
    };
    let _ = up.set_nodelay(true);
    let connect = TlsConnector::from(cfg).connect(ctx.server_name.clone(), peer_io(up));
    let tls = match tokio::time::timeout(shared.handshake_timeout, connect).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            let outcome = classify_io(&e);
            m.handshake(Direction::Outbound, outcome);
            tracing::warn!(upstream = ctx.upstream, error = %describe_io(&e), outcome, "outbound handshake failed");
            return None;
        }
        Err(_) => {
            m.handshake(Direction::Outbound, "timeout");
            tracing::warn!(upstream = ctx.upstream, "outbound handshake timed out");
            return None;
        }
    };
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    if resumed
        && let Some(now) = ctx.tls.current()
        && let Err(e) =
            now.reverify_resumed_upstream(tls.get_ref().1.peer_certificates().unwrap_or_default())
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
        return None;
    }
    m.handshake(Direction::Outbound, if resumed { "resumed" } else { "ok" });
    m.key_exchange(
        Direction::Outbound,
        tls.get_ref().1.negotiated_key_exchange_group(),
    );
    Some(tls)
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
    if let Some(pool) = &ctx.tunnel {
        drop(pending);
        crate::tunnel::outbound::handle(&shared, &ctx, pool, local).await;
        return;
    }
    let Some(cfg) = ctx.tls.current().map(|c| c.config.clone()) else {
        m.handshake(Direction::Outbound, "not_ready");
        return;
    };
    let tls = connect_tls(&shared, &ctx, cfg).await;
    drop(pending);
    let Some(mut tls) = tls else {
        return;
    };
    tls.get_mut()
        .1
        .set_buffer_limit(Some(crate::copy::SEND_BUFFER_LIMIT));

    let started = Instant::now();
    m.active.get_or_create(&dir).inc();
    match splice(&mut local, tls).await {
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
