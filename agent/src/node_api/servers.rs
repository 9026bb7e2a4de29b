//! The servers an agent may talk to: resolution of the configured
//! addresses, the connection cursor and fail-over.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rustls_pki_types::ServerName;

/// Longest a single server may take to accept a TCP connection and finish
/// the TLS handshake before the next one is tried.
pub const PER_SERVER_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The servers an agent may talk to and where it is connected.
///
/// Every connection attempt resolves each configured address (a DNS name may
/// stand for several servers) and tries the candidates in turn, starting at
/// the cursor: the server that last accepted a connection, or, after
/// [`TonicNodeApi::fail_over`](super::tonic_client::TonicNodeApi), the one after it. The first cursor is random,
/// so that agents configured alike spread over the servers.
#[derive(Debug)]
pub(crate) struct Servers {
    configured: Vec<String>,
    cursor: AtomicUsize,
    /// Candidates found by the last resolution.
    pub(crate) count: AtomicUsize,
    /// The server of the last successful connection.
    current: Mutex<Option<SocketAddr>>,
}

impl Servers {
    pub(crate) fn new(configured: Vec<String>) -> Self {
        let n = configured.len().max(1);
        Self {
            configured,
            cursor: AtomicUsize::new(rand::random_range(0..n)),
            count: AtomicUsize::new(n),
            current: Mutex::new(None),
        }
    }

    /// Every address the configured names resolve to, in configuration
    /// order, without repeats. Names that do not resolve are logged and left
    /// out.
    pub(crate) async fn resolve(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::new();
        for name in &self.configured {
            match tokio::net::lookup_host(name.as_str()).await {
                Ok(addrs) => {
                    for a in addrs {
                        if !out.contains(&a) {
                            out.push(a);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(server = %name, error = %e, "cannot resolve server address")
                }
            }
        }
        if !out.is_empty() {
            self.count.store(out.len(), Ordering::Relaxed);
        }
        out
    }

    pub(crate) fn current(&self) -> Option<SocketAddr> {
        *self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_current(&self, a: Option<SocketAddr>) {
        *self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = a;
    }

    /// Connects to the first candidate, from the cursor on, that accepts TCP
    /// and completes the TLS handshake (which verifies its node API
    /// certificate) within [`PER_SERVER_CONNECT_TIMEOUT`].
    pub(crate) async fn connect(
        &self,
        connector: &tokio_rustls::TlsConnector,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let candidates = self.resolve().await;
        if candidates.is_empty() {
            return Err(std::io::Error::other(format!(
                "no server address resolves: {}",
                self.configured.join(", ")
            )));
        }
        let start = self.cursor.load(Ordering::Relaxed) % candidates.len();
        let mut errors = Vec::new();
        for i in 0..candidates.len() {
            let idx = (start + i) % candidates.len();
            let addr = candidates[idx];
            let attempt = async {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let name = ServerName::try_from("meshid-server").map_err(std::io::Error::other)?;
                connector.connect(name, tcp).await
            };
            match tokio::time::timeout(PER_SERVER_CONNECT_TIMEOUT, attempt).await {
                Ok(Ok(tls)) => {
                    self.cursor.store(idx, Ordering::Relaxed);
                    if self.current() != Some(addr) {
                        tracing::info!(server = %addr, "connected to server");
                    }
                    self.set_current(Some(addr));
                    return Ok(tls);
                }
                Ok(Err(e)) => {
                    tracing::warn!(server = %addr, error = %e, "server unreachable; trying the next");
                    errors.push(format!("{addr}: {e}"));
                }
                Err(_) => {
                    tracing::warn!(server = %addr, timeout = ?PER_SERVER_CONNECT_TIMEOUT, "server did not answer in time; trying the next");
                    errors.push(format!("{addr}: timed out"));
                }
            }
        }
        Err(std::io::Error::other(errors.join("; ")))
    }

    /// The server of the last connection failed: start the next attempt at
    /// the one after it.
    pub(crate) fn advance(&self) {
        let n = self.count.load(Ordering::Relaxed).max(1);
        let at = self.cursor.load(Ordering::Relaxed);
        self.cursor.store((at + 1) % n, Ordering::Relaxed);
        self.set_current(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_name_resolving_to_several_addresses_gives_every_server() {
        let s = Servers::new(vec![
            "localhost:7001".into(),
            "127.0.0.1:7002".into(),
            "127.0.0.1:7002".into(),
        ]);
        let got = s.resolve().await;
        assert!(
            got.contains(&"127.0.0.1:7001".parse().expect("addr")),
            "{got:?}"
        );
        assert!(
            got.contains(&"127.0.0.1:7002".parse().expect("addr")),
            "{got:?}"
        );
        assert_eq!(
            got.len(),
            s.count.load(Ordering::Relaxed),
            "repeats are dropped and the count follows the resolution"
        );
        let start = s.cursor.load(Ordering::Relaxed);
        s.advance();
        assert_eq!(s.cursor.load(Ordering::Relaxed), (start + 1) % got.len());
    }
}
