//! Who is at the other end of a Workload API connection, and who writes on
//! it.
//!
//! `SO_PEERCRED` names the process that *connected*. A socket can outlive
//! that process's image (`execve`) and be used by another process (a child
//! that inherited it, or one it was passed to). So the connection keeps:
//!
//! - a pidfd of the connecting process (`SO_PEERPIDFD`, or `pidfd_open` on
//!   kernels before 6.5), which tells whether *that* process still exists,
//!   so a recycled pid is never attested in its place;
//! - the credentials the kernel attaches to every read (`SO_PASSCRED`,
//!   `SCM_CREDENTIALS`): a stream socket never returns bytes of two writers
//!   in one read, so each read names the process that wrote it. Bytes from
//!   any process other than the connecting one mark the connection, and
//!   every call on it is refused from then on.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::task::{Context, Poll, ready};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, getsockopt, recvmsg, setsockopt, sockopt};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::UnixStream;

/// The first process other than the connecting one seen writing on a
/// connection (none yet: `None`).
#[derive(Debug)]
pub struct Writers {
    foreign: AtomicI64,
}

impl Default for Writers {
    fn default() -> Self {
        Self {
            foreign: AtomicI64::new(-1),
        }
    }
}

impl Writers {
    /// The pid of a process other than the connecting one that wrote on the
    /// connection (0 if the kernel could not name it), if any did.
    pub fn foreign(&self) -> Option<i32> {
        let v = self.foreign.load(Ordering::SeqCst);
        if v < 0 {
            return None;
        }
        i32::try_from(v).ok()
    }

    fn saw(&self, pid: i32) {
        let _ =
            self.foreign
                .compare_exchange(-1, i64::from(pid), Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// Makes the kernel attach the writer's credentials to every read on
/// sockets accepted from `listener` (set before the first accept, so no
/// byte arrives without them).
pub fn pass_credentials<F: AsFd>(listener: &F) -> std::io::Result<()> {
    setsockopt(listener, sockopt::PassCred, &true).map_err(std::io::Error::from)
}

/// A pidfd for the process that connected `stream`: `SO_PEERPIDFD` (Linux
/// 6.5: the very process that called connect), else `pidfd_open(pid)`
/// (Linux 5.3), else none (older kernels: pid reuse is then detected only
/// through the process start time).
pub fn peer_pidfd(stream: &UnixStream, pid: Option<i32>) -> Option<OwnedFd> {
    if let Ok(fd) = getsockopt(stream, sockopt::PeerPidfd) {
        return Some(fd);
    }
    let pid = rustix::process::Pid::from_raw(pid?)?;
    match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
        Ok(fd) => Some(fd),
        Err(e) => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(error = %e, "no pidfd support in this kernel: pid reuse is detected by process start time only");
            });
            None
        }
    }
}

/// A Unix stream whose reads record which process wrote the bytes.
#[derive(Debug)]
pub struct PeerStream {
    inner: UnixStream,
    connected: Option<i32>,
    writers: Arc<Writers>,
}

impl PeerStream {
    /// Wraps an accepted stream whose peer connected as `connected`.
    pub fn new(inner: UnixStream, connected: Option<i32>) -> Self {
        // Normally inherited from the listener; harmless when already set.
        if let Err(e) = setsockopt(&inner, sockopt::PassCred, &true) {
            tracing::warn!(error = %e, "cannot set SO_PASSCRED on a Workload API connection");
        }
        Self {
            inner,
            connected,
            writers: Arc::new(Writers::default()),
        }
    }

    /// The connection's writer record.
    pub fn writers(&self) -> Arc<Writers> {
        self.writers.clone()
    }

    /// One `recvmsg`: bytes read and the writer's pid (0 when the kernel
    /// attached no credentials).
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<(usize, i32)> {
        let mut iov = [std::io::IoSliceMut::new(buf)];
        // Room for the credentials only: file descriptors a peer tries to
        // pass do not fit and are discarded by the kernel.
        let mut cmsg = nix::cmsg_space!(nix::libc::ucred);
        let msg = recvmsg::<()>(
            self.inner.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        )
        .map_err(std::io::Error::from)?;
        let mut writer = 0;
        for c in msg.cmsgs().map_err(std::io::Error::from)? {
            match c {
                ControlMessageOwned::ScmCredentials(cred) => writer = cred.pid(),
                ControlMessageOwned::ScmRights(fds) => {
                    for fd in fds {
                        let _ = nix::unistd::close(fd);
                    }
                }
                _ => {}
            }
        }
        Ok((msg.bytes, writer))
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.inner.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match this
                .inner
                .try_io(Interest::READABLE, || this.recv(unfilled))
            {
                Ok((n, writer)) => {
                    if n > 0 && Some(writer) != this.connected {
                        this.writers.saw(writer);
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for PeerStream {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Reads name their writer; the connecting process's own writes leave
    /// the record clean, anyone else's mark it.
    #[tokio::test]
    async fn reads_record_foreign_writers() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        pass_credentials(&listener).expect("passcred");
        let mut client = UnixStream::connect(&path).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let me = i32::try_from(std::process::id()).expect("pid");
        let cred = server.peer_cred().expect("cred");
        assert_eq!(cred.pid(), Some(me));
        assert!(peer_pidfd(&server, cred.pid()).is_some(), "pidfd");

        let mut s = PeerStream::new(server, Some(me));
        client.write_all(b"hello").await.expect("w");
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).await.expect("r");
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(s.writers().foreign(), None);

        // Pretend the connection was opened by another process: this
        // process's bytes are now foreign.
        let mut s2 = PeerStream {
            connected: Some(me + 1),
            ..s
        };
        client.write_all(b"x").await.expect("w");
        let n = s2.read(&mut buf).await.expect("r");
        assert_eq!(n, 1);
        assert_eq!(s2.writers().foreign(), Some(me));
        // Writes go through.
        s2.write_all(b"pong").await.expect("w");
        let n = client.read(&mut buf).await.expect("r");
        assert_eq!(&buf[..n], b"pong");
    }
}
