//! TLS for the node API: the server presents its own SVID
//! (`spiffe://<td>/meshid/server`, renewed in the background through one
//! resolver), and accepts an optional agent SVID. Handshakes run concurrently
//! with a deadline; a failed handshake is logged and counted and affects no
//! other connection.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::config::NodeApiLimits;
use crate::metrics::{Metrics, ReasonLabels};

/// The current server certificate; swapped on renewal.
#[derive(Debug)]
pub struct ServerCertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl ServerCertResolver {
    /// A resolver serving `key`.
    pub fn new(key: CertifiedKey) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwap::from_pointee(key),
        })
    }

    /// Replaces the certificate for every later handshake.
    pub fn set(&self, key: CertifiedKey) {
        self.current.store(Arc::new(key));
    }
}

impl ResolvesServerCert for ServerCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// What the node API knows about a connection's peer.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The verified client certificate chain (leaf first), if one was sent.
    pub certs: Option<Arc<Vec<Vec<u8>>>>,
}

/// A TLS connection with its peer info, for tonic.
pub struct NodeConn {
    inner: TlsStream<TcpStream>,
    info: PeerInfo,
    _slot: ConnectionSlot,
}

/// One of `max_connections`, held for the life of a connection.
struct ConnectionSlot {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.metrics.node_connections.dec();
    }
}

impl Connected for NodeConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for NodeConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for NodeConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TCP connections and completes TLS handshakes concurrently with the
/// configuration current at accept time; yields
/// established connections on the returned channel. A connection past
/// `limits.max_connections`, or past `limits.max_pending_handshakes` while
/// handshaking, is closed at once and counted; the others are unaffected.
pub fn accept_loop(
    listener: TcpListener,
    config: Arc<ArcSwap<rustls::ServerConfig>>,
    metrics: Arc<Metrics>,
    limits: &NodeApiLimits,
) -> mpsc::Receiver<Result<NodeConn, io::Error>> {
    let (tx, rx) = mpsc::channel(128);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let handshakes = Arc::new(Semaphore::new(limits.max_pending_handshakes));
    let handshake_timeout = limits.handshake_timeout;
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "node API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                break;
            }
            let refuse = |reason: &'static str| {
                metrics
                    .tls_refused
                    .get_or_create(&ReasonLabels { reason })
                    .inc();
                tracing::warn!(peer = %addr, reason, "node API connection refused: limit reached");
            };
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                refuse("connection_limit");
                continue;
            };
            let Ok(handshaking) = handshakes.clone().try_acquire_owned() else {
                refuse("handshake_limit");
                continue;
            };
            metrics.node_connections.inc();
            let slot = ConnectionSlot {
                _permit: permit,
                metrics: metrics.clone(),
            };
            let _ = tcp.set_nodelay(true);
            // The configuration as of now: a bundle change applies to every
            // later handshake.
            let acceptor = TlsAcceptor::from(config.load_full());
            let tx = tx.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let done = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await;
                drop(handshaking);
                match done {
                    Ok(Ok(tls)) => {
                        metrics
                            .key_exchanges
                            .get_or_create(&crate::metrics::KxLabels {
                                group: meshid_identity::crypto::group_label(
                                    tls.get_ref().1.negotiated_key_exchange_group(),
                                ),
                            })
                            .inc();
                        let certs =
                            tls.get_ref().1.peer_certificates().map(|c| {
                                Arc::new(c.iter().map(|d| d.to_vec()).collect::<Vec<_>>())
                            });
                        let conn = NodeConn {
                            inner: tls,
                            info: PeerInfo { certs },
                            _slot: slot,
                        };
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => {
                        let reason = e
                            .get_ref()
                            .and_then(|i| i.downcast_ref::<rustls::Error>())
                            .map_or("io", meshid_identity::verify::classify);
                        metrics
                            .tls_refused
                            .get_or_create(&ReasonLabels { reason })
                            .inc();
                        tracing::info!(peer = %addr, reason, error = %e, "node API TLS handshake refused");
                    }
                    Err(_) => {
                        metrics
                            .tls_refused
                            .get_or_create(&ReasonLabels { reason: "timeout" })
                            .inc();
                        tracing::info!(peer = %addr, "node API TLS handshake timed out");
                    }
                }
            });
        }
    });
    rx
}
