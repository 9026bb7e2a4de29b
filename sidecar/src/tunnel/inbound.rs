//! The inbound end of a tunnel: an mTLS connection that negotiated ALPN
//! `h2` on a listener with `tunnel = "h2"`; each CONNECT stream becomes one
//! connection to the application.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio_rustls::server::TlsStream;

use super::{CONNECTION_WINDOW, MAX_FRAME, MAX_STREAMS, STREAM_WINDOW, pump};
use crate::inbound::{InboundCtx, count_bytes, dial};
use crate::metrics::{DirLabels, Direction};
use crate::peer_io::PeerIo;
use crate::shared::{REFUSED_CONNECTIONS, Shared};

/// Serves the CONNECT streams of one tunnel whose peer `peer_id` was
/// verified and authorized by the handshake, until the peer closes it or
/// shutdown drains it.
pub async fn serve(
    shared: Arc<Shared>,
    ctx: Arc<InboundCtx>,
    tls: TlsStream<PeerIo>,
    peer: SocketAddr,
    dst: SocketAddr,
    peer_id: String,
) {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS);
    let mut conn = match b.handshake::<_, Bytes>(tls).await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "tunnel: HTTP/2 handshake failed");
            return;
        }
    };
    shared
        .metrics
        .tunnels_opened
        .get_or_create(&DirLabels {
            direction: Direction::Inbound,
        })
        .inc();
    let peer_id: Arc<str> = peer_id.into();
    let mut draining = false;
    loop {
        let next = if draining {
            conn.accept().await
        } else {
            tokio::select! {
                r = conn.accept() => r,
                () = shared.shutdown.cancelled() => {
                    conn.graceful_shutdown();
                    draining = true;
                    continue;
                }
            }
        };
        match next {
            Some(Ok((req, respond))) => {
                let task = stream(
                    shared.clone(),
                    ctx.clone(),
                    req,
                    respond,
                    peer,
                    dst,
                    peer_id.clone(),
                );
                shared.tracker.spawn(task);
            }
            Some(Err(e)) => {
                tracing::debug!(%peer, error = %e, "tunnel ended with error");
                return;
            }
            None => return,
        }
    }
}

fn reply(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut r = Response::new(());
    *r.status_mut() = status;
    let _ = respond.send_response(r, true);
}

async fn stream(
    shared: Arc<Shared>,
    ctx: Arc<InboundCtx>,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SocketAddr,
    dst: SocketAddr,
    peer_id: Arc<str>,
) {
    let m = &shared.metrics;
    if req.method() != Method::CONNECT {
        reply(&mut respond, StatusCode::METHOD_NOT_ALLOWED);
        return;
    }
    // A stream is a connection to the application: it takes a slot of the
    // inbound budget.
    let Ok(_permit) = shared.budgets.inbound.clone().try_acquire_owned() else {
        m.count_refused(Direction::Inbound, REFUSED_CONNECTIONS);
        reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
        return;
    };
    let Some(mut app) = dial(&shared, ctx.forward_to()).await else {
        reply(&mut respond, StatusCode::BAD_GATEWAY);
        return;
    };
    if ctx.proxy_protocol() {
        let sent = match crate::proxy_protocol::encode_v2(peer, dst, &peer_id) {
            Ok(h) => app.write_all(&h).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, "cannot send PROXY header");
            reply(&mut respond, StatusCode::BAD_GATEWAY);
            return;
        }
    }
    let send = match respond.send_response(Response::new(()), false) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "tunnel stream gone before the answer");
            return;
        }
    };
    let dir = DirLabels {
        direction: Direction::Inbound,
    };
    m.tunnel_streams.get_or_create(&dir).inc();
    let started = std::time::Instant::now();
    m.active.get_or_create(&dir).inc();
    match pump(&mut app, send, req.into_body()).await {
        Ok((from_app, to_app)) => count_bytes(&shared, to_app, from_app),
        Err(e) => tracing::debug!(%peer, error = %e, "tunnelled connection ended with error"),
    }
    m.active.get_or_create(&dir).dec();
    m.duration
        .get_or_create(&dir)
        .observe(started.elapsed().as_secs_f64());
}
