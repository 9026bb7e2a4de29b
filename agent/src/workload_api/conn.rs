//! A Workload API connection and what the agent knows about the process at
//! its other end: credentials read at accept, the pinned process, and who
//! wrote on it.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use meshid_identity::h2_authority::{AuthorityNormalizer, RefusalHook};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::server::Connected;

use crate::attest::{AttestError, Caller, Pinned};
use crate::peer::{PeerStream, Writers};

/// What the agent knows about the process at the other end of a Workload
/// API connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// SO_PEERCRED at accept, with what was pinned about the process.
    pub caller: Caller,
    /// Why the process could not be pinned at accept, if it could not.
    pub pin_error: Option<AttestError>,
    /// Who wrote on the connection.
    pub writers: Arc<Writers>,
}

impl Peer {
    /// The caller, if calls on this connection may still be attested: no
    /// process other than the connecting one has written on it, and the
    /// connecting process was pinned.
    pub(crate) fn check(&self) -> Result<Caller, AttestError> {
        if let Some(writer) = self.writers.foreign() {
            return Err(AttestError::ForeignWriter {
                connected: self.caller.pid.unwrap_or_default(),
                writer,
            });
        }
        if let Some(e) = &self.pin_error {
            return Err(e.clone());
        }
        Ok(self.caller.clone())
    }

    /// As [`Peer::check`], and the pinned process still exists and runs
    /// the pinned executable (re-checked before each stream message after
    /// the first, which follows the attestation's own check).
    pub(crate) fn verify(&self) -> Result<(), AttestError> {
        let c = self.check()?;
        match &c.pinned {
            Some(p) => p.verify(Path::new("/proc")),
            None => Ok(()),
        }
    }
}

/// A Workload API connection with the caller's kernel credentials. Reads go
/// through [`AuthorityNormalizer`], so any HTTP/2 `:authority` a client
/// sends on the Unix socket is accepted.
pub struct CallerConn {
    inner: AuthorityNormalizer<PeerStream>,
    peer: Option<Peer>,
}

impl CallerConn {
    /// Reads SO_PEERCRED and the peer's pidfd at accept time and pins the
    /// connecting process (start time, executable identity); `on_refused` is
    /// told about a connection closed for malformed HTTP/2.
    pub fn new(inner: UnixStream, on_refused: Option<RefusalHook>) -> Self {
        let cred = inner.peer_cred().ok();
        let pid = cred.and_then(|c| c.pid());
        let pidfd = crate::peer::peer_pidfd(&inner, pid);
        let inner = PeerStream::new(inner, pid);
        let peer = cred.map(|c| {
            let pinned = match pid {
                Some(pid) => Pinned::take(pid, pidfd, Path::new("/proc")).map(Arc::new),
                None => Err(AttestError::NoPid),
            };
            let (pinned, pin_error) = match pinned {
                Ok(p) => (Some(p), None),
                Err(e) => (None, Some(e)),
            };
            Peer {
                caller: Caller {
                    pid,
                    uid: c.uid(),
                    gid: c.gid(),
                    pinned,
                },
                pin_error,
                writers: inner.writers(),
            }
        });
        Self {
            inner: AuthorityNormalizer::new(inner, "workload_api", on_refused),
            peer,
        }
    }
}

impl Connected for CallerConn {
    type ConnectInfo = Option<Peer>;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

impl AsyncRead for CallerConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CallerConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
