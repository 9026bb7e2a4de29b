//! Moving bytes between an application connection and a TLS peer.
//!
//! Three things keep the copy loop from losing to plaintext by more than the
//! cipher costs:
//!
//! - **reads from the peer's socket are large**: rustls asks its transport
//!   for at most 4 KiB at a time, so a 16 KiB record costs four `read`
//!   calls. [`PeerIo`] puts a [`READ_AHEAD`] buffer under the TLS session, so
//!   one `read` brings several records and rustls copies from memory;
//! - **plaintext leaves in large writes**: a TLS stream yields one record's
//!   plaintext (at most 16 KiB) per read. [`FillRead`] keeps reading while
//!   records are ready, so the copy buffer goes to the application in one
//!   write instead of one per record;
//! - **TLS leaves in full records**: the copy buffer hands rustls
//!   [`COPY_BUFFER`] bytes at once, which it cuts into full 16 KiB records
//!   and writes with one vectored `write`; nothing flushes per record.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::net::TcpStream;

/// Buffer size for each direction of a proxied connection.
pub const COPY_BUFFER: usize = 64 * 1024;

/// Bytes read from a TLS peer's socket at once (several TLS records).
pub const READ_AHEAD: usize = 64 * 1024;

/// The transport under a TLS session: the peer's socket with a read-ahead
/// buffer (writes pass straight through).
pub type PeerIo = BufReader<TcpStream>;

/// Wraps a TLS peer's socket in its read-ahead buffer.
pub fn peer_io(tcp: TcpStream) -> PeerIo {
    BufReader::with_capacity(READ_AHEAD, tcp)
}

/// A reader that fills the caller's buffer with everything ready now, not
/// just the first chunk: for a TLS stream, every record already received,
/// not one record per read. Writes pass through.
#[derive(Debug)]
pub struct FillRead<S> {
    inner: S,
    /// An error met after some bytes were already returned; reported next.
    deferred: Option<io::Error>,
}

impl<S> FillRead<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            deferred: None,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FillRead<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.deferred.take() {
            return Poll::Ready(Err(e));
        }
        let start = buf.filled().len();
        loop {
            let before = buf.filled().len();
            match Pin::new(&mut self.inner).poll_read(cx, buf) {
                Poll::Ready(Ok(())) => {
                    let got = buf.filled().len() - before;
                    // End of stream, or the buffer is full: done.
                    if got == 0 || buf.remaining() == 0 {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Err(e)) => {
                    if buf.filled().len() == start {
                        return Poll::Ready(Err(e));
                    }
                    self.deferred = Some(e);
                    return Poll::Ready(Ok(()));
                }
                // Nothing more now: return what we have (the waker is
                // registered, so a later wake-up finds the rest).
                Poll::Pending if buf.filled().len() > start => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FillRead<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Copies both ways between `app` (plaintext) and `peer` (TLS) until both
/// directions end. Returns (bytes from the app to the peer, bytes from the
/// peer to the app).
pub async fn splice<A, P>(app: &mut A, peer: P) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    P: AsyncRead + AsyncWrite + Unpin,
{
    let mut peer = FillRead::new(peer);
    tokio::io::copy_bidirectional_with_sizes(app, &mut peer, COPY_BUFFER, COPY_BUFFER).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A reader handing out one small chunk per read, like a TLS stream
    /// handing out one record.
    struct Chunks(Vec<Vec<u8>>, Option<io::Error>);

    impl AsyncRead for Chunks {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.0.is_empty() {
                return match self.1.take() {
                    Some(e) => Poll::Ready(Err(e)),
                    None => Poll::Ready(Ok(())),
                };
            }
            let c = self.0.remove(0);
            buf.put_slice(&c);
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn fill_read_gathers_every_ready_chunk() {
        let mut r = FillRead::new(Chunks(
            vec![b"ab".to_vec(), b"cd".to_vec(), b"e".to_vec()],
            None,
        ));
        let mut buf = [0u8; 4];
        assert_eq!(r.read(&mut buf).await.unwrap(), 4, "two chunks in one read");
        assert_eq!(&buf, b"abcd");
        assert_eq!(r.read(&mut buf).await.unwrap(), 1);
        assert_eq!(r.read(&mut buf).await.unwrap(), 0, "end of stream");
    }

    #[tokio::test]
    async fn fill_read_reports_an_error_after_the_bytes_before_it() {
        let e = io::Error::new(io::ErrorKind::InvalidData, "bad record");
        let mut r = FillRead::new(Chunks(vec![b"ab".to_vec()], Some(e)));
        let mut buf = [0u8; 8];
        assert_eq!(r.read(&mut buf).await.unwrap(), 2);
        let err = r.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn splice_moves_both_directions() {
        let (mut app, mut app_far) = tokio::io::duplex(1 << 16);
        let (peer, mut peer_far) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn(async move { splice(&mut app, peer).await.unwrap() });
        let big = vec![7u8; 300_000];
        let w = big.clone();
        let writer = tokio::spawn(async move {
            peer_far.write_all(&w).await.unwrap();
            peer_far.shutdown().await.unwrap();
            let mut back = Vec::new();
            peer_far.read_to_end(&mut back).await.unwrap();
            back
        });
        app_far.write_all(b"hello").await.unwrap();
        app_far.shutdown().await.unwrap();
        let mut got = Vec::new();
        app_far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, big);
        assert_eq!(writer.await.unwrap(), b"hello");
        assert_eq!(task.await.unwrap(), (5, 300_000));
    }
}
