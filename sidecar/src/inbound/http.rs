//! HTTP mode of an inbound listener: one HTTP/1.1 or HTTP/2 connection
//! from the peer, each request forwarded to the application with the
//! peer's SPIFFE ID in `x-spiffe-id` and every header that could pass for
//! an identity (or a hop-by-hop header) removed first.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use http_body_util::Either;
use hyper::HeaderMap;
use hyper::body::Incoming;
use hyper::header::{
    CONNECTION, CONTENT_LENGTH, HOST, HeaderName, HeaderValue, TRAILER, TRANSFER_ENCODING,
};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::server::TlsStream;

use super::{InboundCtx, SPIFFE_ID_HEADER, count_bytes, dial};
use crate::peer_io::PeerIo;
use crate::shared::Shared;

type Upstream = hyper::client::conn::http1::SendRequest<Incoming>;
type Body = Either<Incoming, String>;

pub(super) fn status(code: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(Either::Right(format!("{msg}\n")));
    *r.status_mut() = code;
    r
}

pub(super) async fn forward_http(
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
pub(super) struct Counts {
    rx: AtomicU64,
    tx: AtomicU64,
}

/// A stream that counts the bytes passing through it.
pub(super) struct Counted<S> {
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
