//! The inbound proxy: accept mTLS, authorize the peer's SPIFFE ID, forward
//! plaintext to the local application.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use meshid_identity::SvidInfo;
use rustls::server::Acceptor;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::{Inbound, Mode, Tunnel};
use crate::copy::splice;
use crate::failure::{classify_io, describe_io, failure_detail, looks_like_http};
use crate::identity::{ALPN_H2, InboundTls, PROBE_SNI};
use crate::metrics::{ByteLabels, DirLabels, Direction};
use crate::peer_io::{PeerIo, peer_io};
use crate::shared::{Admission, Shared};

mod http;

use http::forward_http;
pub use http::{is_identity_lookalike, sanitize_request_headers};

/// The header carrying the peer's SPIFFE ID to the application.
pub const SPIFFE_ID_HEADER: &str = "x-spiffe-id";

/// One inbound listener's settings.
#[derive(Debug)]
pub struct InboundCtx {
    tls: Arc<InboundTls>,
    forward_to: String,
    mode: Mode,
    proxy_protocol: bool,
    tunnel: bool,
}

impl InboundCtx {
    /// A listener with settings `ib` and its TLS handle (its policy).
    pub fn new(ib: &Inbound, tls: Arc<InboundTls>) -> Self {
        Self {
            tls,
            forward_to: ib.forward_to.clone(),
            mode: ib.mode,
            proxy_protocol: ib.proxy_protocol,
            tunnel: ib.tunnel == Some(Tunnel::H2),
        }
    }

    /// The application's `host:port`.
    pub fn forward_to(&self) -> &str {
        &self.forward_to
    }

    /// Whether a PROXY v2 header goes first.
    pub fn proxy_protocol(&self) -> bool {
        self.proxy_protocol
    }

    /// The listener's TLS handle.
    pub fn tls(&self) -> &Arc<InboundTls> {
        &self.tls
    }
}

/// Accepts until shutdown; each connection runs in its own task. Accepting
/// never waits for a budget: a connection beyond one is closed at once and
/// counted ([`Shared::admit`]).
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, ctx: Arc<InboundCtx>) {
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "inbound accept failed");
                    // e.g. EMFILE: back off briefly instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shared.shutdown.cancelled() => return,
        };
        let Ok(admission) = shared.admit(Direction::Inbound, peer) else {
            // Dropping the socket closes it; `admit` counted and logged.
            continue;
        };
        let _ = tcp.set_nodelay(true);
        shared
            .tracker
            .spawn(handle(shared.clone(), ctx.clone(), tcp, peer, admission));
    }
}

/// Logs a refused or failed inbound handshake, at most once per kind and
/// [`crate::LogLimiter::INTERVAL`] (every one is counted in the metrics).
fn log_refusal(
    shared: &Shared,
    peer: SocketAddr,
    (outcome, detail): (&'static str, &'static str),
    resumed: bool,
    msg: &str,
) {
    let Some(suppressed) = shared.log_limiter.check(outcome, detail) else {
        return;
    };
    if resumed {
        tracing::info!(%peer, error = msg, outcome, suppressed, "inbound resumed session refused");
    } else {
        tracing::info!(%peer, error = msg, outcome, suppressed, "inbound handshake failed");
    }
}

async fn handle(
    shared: Arc<Shared>,
    ctx: Arc<InboundCtx>,
    tcp: TcpStream,
    peer: SocketAddr,
    admission: Admission,
) {
    let Admission {
        connection: _connection,
        pending,
    } = admission;
    let m = &shared.metrics;
    if shared.identity.current().is_none() {
        // Not ready: close before any TLS byte, the client sees a reset/EOF.
        m.handshake(Direction::Inbound, "not_ready");
        return;
    }
    let local = tcp.local_addr().ok();
    // The first bytes, to name plaintext HTTP when the handshake fails.
    let mut first = [0u8; 8];
    let mut first_len = 0;
    let hs = async {
        first_len = tcp.peek(&mut first).await?;
        let start = LazyConfigAcceptor::new(Acceptor::default(), peer_io(tcp)).await?;
        let probe = start.client_hello().server_name() == Some(PROBE_SNI);
        // Load the snapshot at ClientHello time: the newest SVID and policy.
        let Some(snap) = shared.identity.current() else {
            return Err(std::io::Error::other("no SVID"));
        };
        let cfg = if probe {
            snap.probe_server.clone()
        } else {
            match ctx.tls.current() {
                Some(c) => c.config.clone(),
                None => return Err(std::io::Error::other("no config for listener")),
            }
        };
        let stream = start.into_stream(cfg).await?;
        Ok((stream, probe))
    };
    let res = tokio::time::timeout(shared.handshake_timeout, hs).await;
    drop(pending);
    let (mut tls, probe) = match res {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            let detail = failure_detail(&e);
            if detail == "not_tls" && looks_like_http(&first[..first_len.min(first.len())]) {
                m.handshake(Direction::Inbound, "plaintext_http");
                let msg = "plaintext HTTP on an mTLS port: the caller must use mTLS (e.g. through its outbound sidecar)";
                log_refusal(&shared, peer, ("plaintext_http", detail), false, msg);
                return;
            }
            let outcome = classify_io(&e);
            m.handshake(Direction::Inbound, outcome);
            log_refusal(&shared, peer, (outcome, detail), false, &describe_io(&e));
            return;
        }
        Err(_) => {
            m.handshake(Direction::Inbound, "timeout");
            let msg = format!(
                "no complete TLS handshake within handshake_timeout ({:?})",
                shared.handshake_timeout
            );
            log_refusal(&shared, peer, ("timeout", "timeout"), false, &msg);
            return;
        }
    };
    if probe {
        m.handshake(Direction::Inbound, "probe");
        let _ = tls.shutdown().await;
        return;
    }
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let peer_id = if resumed {
        // The ticket carried the peer's chain; hold it to today's rules
        // before a byte is forwarded.
        let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
        let verdict = match ctx.tls.current() {
            Some(now) => now.reverify_resumed(chain),
            None => Err(rustls::Error::General("no config for listener".into())),
        };
        match verdict {
            Ok(id) => id.to_string(),
            Err(e) => {
                let outcome = meshid_identity::verify::classify(&e);
                m.handshake(Direction::Inbound, outcome);
                log_refusal(
                    &shared,
                    peer,
                    (outcome, "resumed"),
                    true,
                    &meshid_identity::verify::describe(&e),
                );
                return;
            }
        }
    } else {
        let Some(id) = peer_spiffe_id(&tls) else {
            // The verifier admitted the peer, so this cannot happen.
            m.handshake(Direction::Inbound, "other");
            return;
        };
        id
    };
    m.handshake(Direction::Inbound, if resumed { "resumed" } else { "ok" });
    m.key_exchange(
        Direction::Inbound,
        tls.get_ref().1.negotiated_key_exchange_group(),
    );
    tracing::debug!(%peer, peer_id, resumed, "inbound connection authorized");
    if ctx.tunnel && tls.get_ref().1.alpn_protocol() == Some(ALPN_H2) {
        let dst = local.unwrap_or(peer);
        crate::tunnel::inbound::serve(shared.clone(), ctx.clone(), tls, peer, dst, peer_id).await;
        return;
    }

    let dir = DirLabels {
        direction: Direction::Inbound,
    };
    let started = Instant::now();
    m.active.get_or_create(&dir).inc();
    match ctx.mode {
        Mode::Tcp => {
            let dst = local.unwrap_or(peer);
            forward_tcp(&shared, &ctx, tls, peer, dst, &peer_id).await;
        }
        Mode::Http => forward_http(&shared, &ctx, tls, peer_id).await,
    }
    m.active.get_or_create(&dir).dec();
    m.duration
        .get_or_create(&dir)
        .observe(started.elapsed().as_secs_f64());
}

/// The SPIFFE ID of the verified peer.
fn peer_spiffe_id(tls: &TlsStream<PeerIo>) -> Option<String> {
    let leaf = tls.get_ref().1.peer_certificates()?.first()?;
    SvidInfo::from_der(leaf)
        .ok()
        .map(|i| i.spiffe_id.to_string())
}

pub(crate) async fn dial(shared: &Shared, addr: &str) -> Option<TcpStream> {
    let res = tokio::time::timeout(shared.connect_timeout, TcpStream::connect(addr)).await;
    match res {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Some(s)
        }
        Ok(Err(e)) => {
            tracing::warn!(addr, error = %e, "cannot reach application");
            None
        }
        Err(_) => {
            tracing::warn!(addr, "timed out connecting to application");
            None
        }
    }
    .or_else(|| {
        shared
            .metrics
            .dial_errors
            .get_or_create(&DirLabels {
                direction: Direction::Inbound,
            })
            .inc();
        None
    })
}

async fn forward_tcp(
    shared: &Shared,
    ctx: &InboundCtx,
    mut tls: TlsStream<PeerIo>,
    peer: SocketAddr,
    dst: SocketAddr,
    peer_id: &str,
) {
    let Some(mut app) = dial(shared, &ctx.forward_to).await else {
        let _ = tls.shutdown().await;
        return;
    };
    if ctx.proxy_protocol {
        let header = match crate::proxy_protocol::encode_v2(peer, dst, peer_id) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode PROXY header");
                return;
            }
        };
        if let Err(e) = app.write_all(&header).await {
            tracing::warn!(error = %e, "cannot write PROXY header");
            return;
        }
    }
    tls.get_mut()
        .1
        .set_buffer_limit(Some(crate::copy::SEND_BUFFER_LIMIT));
    match splice(&mut app, tls).await {
        Ok((to_peer, from_peer)) => count_bytes(shared, from_peer, to_peer),
        Err(e) => tracing::debug!(%peer, error = %e, "inbound connection ended with error"),
    }
}

pub(crate) fn count_bytes(shared: &Shared, rx: u64, tx: u64) {
    let m = &shared.metrics;
    m.bytes
        .get_or_create(&ByteLabels {
            direction: Direction::Inbound,
            flow: "rx",
        })
        .inc_by(rx);
    m.bytes
        .get_or_create(&ByteLabels {
            direction: Direction::Inbound,
            flow: "tx",
        })
        .inc_by(tx);
}
