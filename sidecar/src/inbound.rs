//! The inbound proxy: accept mTLS, authorize the peer's SPIFFE ID, forward
//! plaintext to the local application.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use http_body_util::Either;
use hyper::HeaderMap;
use hyper::body::Incoming;
use hyper::header::{
    CONNECTION, CONTENT_LENGTH, HOST, HeaderName, HeaderValue, TRAILER, TRANSFER_ENCODING,
};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use meshid_identity::SvidInfo;
use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
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

type Upstream = hyper::client::conn::http1::SendRequest<Incoming>;
type Body = Either<Incoming, String>;

fn status(code: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(Either::Right(format!("{msg}\n")));
    *r.status_mut() = code;
    r
}

async fn forward_http(
    shared: &Arc<Shared>,
    ctx: &Arc<InboundCtx>,
    tls: TlsStream<PeerIo>,
    peer_id: String,
) {
    let Ok(id_value) = HeaderValue::from_str(&peer_id) else {
        return;
    };
    let upstream: Arc<tokio::sync::Mutex<Option<Upstream>>> = Arc::default();
    let svc = {
        let shared = shared.clone();
        let ctx = ctx.clone();
        hyper::service::service_fn(move |mut req: Request<Incoming>| {
            let headers = req.headers_mut();
            // Whatever the client claims is replaced by what TLS proved.
            sanitize_request_headers(headers);
            headers.insert(SPIFFE_ID_HEADER, id_value.clone());
            let upstream = upstream.clone();
            let shared = shared.clone();
            let ctx = ctx.clone();
            async move {
                let mut guard = upstream.lock().await;
                if guard.as_ref().is_none_or(|s| s.is_closed()) {
                    *guard = None;
                    let Some(app) = dial(&shared, &ctx.forward_to).await else {
                        return Ok::<_, std::convert::Infallible>(status(
                            StatusCode::BAD_GATEWAY,
                            "application unreachable",
                        ));
                    };
                    match hyper::client::conn::http1::handshake(TokioIo::new(app)).await {
                        Ok((sender, conn)) => {
                            tokio::spawn(async move {
                                if let Err(e) = conn.await {
                                    tracing::debug!(error = %e, "application connection ended");
                                }
                            });
                            *guard = Some(sender);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "HTTP handshake with application failed");
                            return Ok(status(StatusCode::BAD_GATEWAY, "application error"));
                        }
                    }
                }
                let Some(sender) = guard.as_mut() else {
                    return Ok(status(StatusCode::BAD_GATEWAY, "application unreachable"));
                };
                if let Err(e) = sender.ready().await {
                    tracing::warn!(error = %e, "application connection not usable");
                    *guard = None;
                    return Ok(status(StatusCode::BAD_GATEWAY, "application error"));
                }
                match sender.send_request(req).await {
                    Ok(resp) => Ok(resp.map(Either::Left)),
                    Err(e) => {
                        tracing::warn!(error = %e, "application request failed");
                        *guard = None;
                        Ok(status(StatusCode::BAD_GATEWAY, "application error"))
                    }
                }
            }
        })
    };
    let counts = Arc::new(Counts::default());
    let io = Counted {
        inner: tls,
        counts: counts.clone(),
    };
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let res = tokio::select! {
        r = conn.as_mut() => r,
        () = shared.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = res {
        tracing::debug!(error = %e, "inbound HTTP connection ended with error");
    }
    count_bytes(
        shared,
        counts.rx.load(Ordering::Relaxed),
        counts.tx.load(Ordering::Relaxed),
    );
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) a proxy never forwards, besides
/// those named in `Connection`.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "upgrade",
];

/// Whether `name` would reach an application as the identity header: equal to
/// [`SPIFFE_ID_HEADER`] once lower-cased with `_` read as `-` (CGI, WSGI and
/// many frameworks map both to the same variable, e.g. `HTTP_X_SPIFFE_ID`).
pub fn is_identity_lookalike(name: &str) -> bool {
    name.len() == SPIFFE_ID_HEADER.len()
        && name
            .bytes()
            .map(|b| {
                if b == b'_' {
                    b'-'
                } else {
                    b.to_ascii_lowercase()
                }
            })
            .eq(SPIFFE_ID_HEADER.bytes())
}

/// Removes from a request everything that could pass for the peer's identity
/// or must not cross a proxy: every look-alike of the identity header, every
/// header named in `Connection` (except `host` and the message framing,
/// which the proxy rewrites itself), the standard hop-by-hop headers, and
/// identity look-alikes declared in `Trailer` (only declared trailers are
/// forwarded, so identity trailers never reach the application).
pub fn sanitize_request_headers(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
        .filter(|n| *n != HOST && *n != CONTENT_LENGTH && *n != TRANSFER_ENCODING)
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in HOP_BY_HOP {
        headers.remove(*n);
    }
    let lookalikes: Vec<HeaderName> = headers
        .keys()
        .filter(|k| is_identity_lookalike(k.as_str()))
        .cloned()
        .collect();
    for n in lookalikes {
        headers.remove(n);
    }
    // Keep only the declared trailers that are not identity look-alikes.
    if headers.contains_key(TRAILER) {
        let kept: Vec<String> = headers
            .get_all(TRAILER)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
            .filter(|n| !is_identity_lookalike(n.as_str()))
            .map(|n| n.as_str().to_string())
            .collect();
        headers.remove(TRAILER);
        if let Ok(v) = HeaderValue::from_str(&kept.join(", "))
            && !kept.is_empty()
        {
            headers.insert(TRAILER, v);
        }
    }
}

/// Bytes read from and written to the TLS peer.
#[derive(Debug, Default)]
struct Counts {
    rx: AtomicU64,
    tx: AtomicU64,
}

/// A stream that counts the bytes passing through it.
struct Counted<S> {
    inner: S,
    counts: Arc<Counts>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        self.counts.rx.fetch_add(n as u64, Ordering::Relaxed);
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            self.counts.tx.fetch_add(n as u64, Ordering::Relaxed);
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<String> {
        let mut v: Vec<String> = h.keys().map(|k| k.as_str().to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn lookalikes_of_the_identity_header() {
        for yes in ["x-spiffe-id", "X_SPIFFE_ID", "x_spiffe-id", "X-Spiffe_Id"] {
            assert!(is_identity_lookalike(yes), "{yes}");
        }
        for no in [
            "x-spiffe-ids",
            "x-spiffe",
            "xspiffe-id",
            "x-spiffe-id-",
            "spiffe-id",
            "",
        ] {
            assert!(!is_identity_lookalike(no), "{no}");
        }
    }

    #[test]
    fn sanitize_removes_lookalikes_connection_named_and_hop_by_hop() {
        let mut h = map(&[
            ("host", "app"),
            ("x_spiffe_id", "forged"),
            ("x-spiffe_id", "forged"),
            ("x-spiffe-id", "forged"),
            ("connection", "keep-alive, X-Admin , ,x-other"),
            ("connection", "host, content-length, transfer-encoding"),
            ("x-admin", "1"),
            ("x-other", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("content-length", "5"),
            ("x-request-id", "7"),
        ]);
        sanitize_request_headers(&mut h);
        assert_eq!(names(&h), ["content-length", "host", "x-request-id"]);
    }

    #[test]
    fn sanitize_keeps_only_non_identity_trailers() {
        let mut h = map(&[
            ("trailer", "X_Spiffe_Id, x-checksum"),
            ("trailer", "x-spiffe-id"),
        ]);
        sanitize_request_headers(&mut h);
        assert_eq!(h.get_all(TRAILER).iter().count(), 1);
        assert_eq!(h.get(TRAILER).unwrap(), "x-checksum");
        let mut h = map(&[("trailer", "x-spiffe-id")]);
        sanitize_request_headers(&mut h);
        assert!(h.get(TRAILER).is_none());
    }

    #[test]
    fn sanitize_survives_non_utf8_connection_values() {
        let mut h = HeaderMap::new();
        h.insert(
            CONNECTION,
            HeaderValue::from_bytes(b"x-a, \xff\xfe").unwrap(),
        );
        h.insert("x-a", HeaderValue::from_static("1"));
        sanitize_request_headers(&mut h);
        assert!(h.is_empty(), "{h:?}");
    }
}
