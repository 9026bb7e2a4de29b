//! The outbound end of a tunnel: one pooled mTLS HTTP/2 connection per
//! outbound listener, one CONNECT stream per application connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use super::{CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW, pump};
use crate::metrics::{ByteLabels, DirLabels, Direction};
use crate::outbound::OutboundCtx;
use crate::shared::Shared;

/// The tunnel of one outbound listener, opened on first use.
#[derive(Debug, Default)]
pub struct Pool {
    slot: Mutex<Option<Tunnel>>,
}

#[derive(Debug)]
struct Tunnel {
    /// The listener config generation it was opened with.
    generation: u64,
    send: SendRequest<Bytes>,
    /// Set when the connection has ended.
    closed: Arc<AtomicBool>,
}

/// Why a stream could not be opened (already counted and logged).
#[derive(Debug)]
pub struct Failed;

impl Pool {
    /// A CONNECT stream to the upstream on the current tunnel, opening a
    /// new tunnel first when there is none, it has closed, or the
    /// listener's TLS config changed since it was opened (so an SVID or
    /// bundle update drains the old one).
    async fn stream(
        &self,
        shared: &Shared,
        ctx: &OutboundCtx,
    ) -> Result<(SendStream<Bytes>, RecvStream), Failed> {
        let m = &shared.metrics;
        // One retry: a tunnel that the peer just closed (GOAWAY) is replaced.
        for attempt in 0..2 {
            let send = {
                let mut slot = self.slot.lock().await;
                let Some(cfg) = ctx.tls().current() else {
                    m.handshake(Direction::Outbound, "not_ready");
                    return Err(Failed);
                };
                let usable = slot.as_ref().is_some_and(|t| {
                    t.generation == cfg.generation && !t.closed.load(Ordering::Acquire)
                });
                if !usable {
                    // Dropping our handle lets the old tunnel close once its
                    // streams have ended.
                    *slot = None;
                    let tls = crate::outbound::connect_tls(shared, ctx, cfg.config.clone())
                        .await
                        .ok_or(Failed)?;
                    let mut b = h2::client::Builder::new();
                    b.initial_window_size(STREAM_WINDOW)
                        .initial_connection_window_size(CONNECTION_WINDOW)
                        .max_frame_size(MAX_FRAME)
                        .enable_push(false);
                    let (send, conn) = match b.handshake::<_, Bytes>(tls).await {
                        Ok(v) => v,
                        Err(e) => {
                            tracing::warn!(upstream = ctx.upstream(), error = %e, "tunnel: HTTP/2 handshake failed");
                            return Err(Failed);
                        }
                    };
                    let closed = Arc::new(AtomicBool::new(false));
                    let done = closed.clone();
                    let upstream = ctx.upstream().to_string();
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(upstream, error = %e, "tunnel ended with error");
                        }
                        done.store(true, Ordering::Release);
                    });
                    m.tunnels_opened
                        .get_or_create(&DirLabels {
                            direction: Direction::Outbound,
                        })
                        .inc();
                    *slot = Some(Tunnel {
                        generation: cfg.generation,
                        send,
                        closed,
                    });
                }
                match slot.as_ref() {
                    Some(t) => t.send.clone(),
                    None => return Err(Failed),
                }
            };
            match open(send, ctx.upstream()).await {
                Ok(s) => return Ok(s),
                Err(e) => {
                    if attempt == 0 {
                        tracing::debug!(upstream = ctx.upstream(), error = %e, "tunnel refused a stream; opening a new tunnel");
                        let mut slot = self.slot.lock().await;
                        if let Some(t) = slot.as_ref() {
                            t.closed.store(true, Ordering::Release);
                        }
                        *slot = None;
                    } else {
                        tracing::warn!(upstream = ctx.upstream(), error = %e, "tunnel stream failed");
                    }
                }
            }
        }
        Err(Failed)
    }
}

async fn open(
    send: SendRequest<Bytes>,
    authority: &str,
) -> Result<(SendStream<Bytes>, RecvStream), String> {
    let mut send = send.ready().await.map_err(|e| e.to_string())?;
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority)
        .body(())
        .map_err(|e| e.to_string())?;
    let (resp, stream) = send.send_request(req, false).map_err(|e| e.to_string())?;
    let resp = resp.await.map_err(|e| e.to_string())?;
    if resp.status() != http::StatusCode::OK {
        return Err(format!("upstream answered {}", resp.status()));
    }
    Ok((stream, resp.into_body()))
}

/// Carries one application connection through the listener's tunnel.
pub async fn handle(shared: &Shared, ctx: &OutboundCtx, pool: &Pool, mut local: TcpStream) {
    let m = &shared.metrics;
    let Ok((send, recv)) = pool.stream(shared, ctx).await else {
        return;
    };
    let dir = DirLabels {
        direction: Direction::Outbound,
    };
    m.tunnel_streams.get_or_create(&dir).inc();
    let started = std::time::Instant::now();
    m.active.get_or_create(&dir).inc();
    match pump(&mut local, send, recv).await {
        Ok((tx, rx)) => {
            for (flow, n) in [("tx", tx), ("rx", rx)] {
                m.bytes
                    .get_or_create(&ByteLabels {
                        direction: Direction::Outbound,
                        flow,
                    })
                    .inc_by(n);
            }
        }
        Err(e) => tracing::debug!(error = %e, "tunnelled connection ended with error"),
    }
    m.active.get_or_create(&dir).dec();
    m.duration
        .get_or_create(&dir)
        .observe(started.elapsed().as_secs_f64());
}
