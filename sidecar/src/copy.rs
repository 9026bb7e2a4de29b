//! Moving bytes between an application connection and a TLS peer.
//!
//! Four things keep the copy loop from losing to plaintext by more than the
//! cipher costs:
//!
//! - **reads from the peer's socket are large**: rustls asks its transport
//!   for at most 4 KiB at a time, so a 16 KiB record costs four `read`
//!   calls. [`PeerIo`](crate::peer_io::PeerIo) puts a read-ahead buffer
//!   under the TLS session (one record at first, growing under bulk traffic), so
//!   one `read` brings several records and rustls copies from memory;
//! - **plaintext leaves in large writes**: a TLS stream yields one record's
//!   plaintext (at most 16 KiB) per read. [`FillRead`] keeps reading while
//!   records are ready, so the copy buffer goes to the application in one
//!   write instead of one per record;
//! - **TLS leaves in full records**: the copy buffer hands rustls up to
//!   [`MAX_COPY_BUFFER`] bytes at once, which it cuts into full 16 KiB
//!   records and writes with vectored `write`s ([`SEND_BUFFER_LIMIT`] lets
//!   rustls hold that much, so a full buffer goes out in one `writev`);
//!   nothing flushes per record;
//! - **bulk moves in large steps**: each direction's buffer starts at
//!   [`START_COPY_BUFFER`] and grows (×4, up to [`MAX_COPY_BUFFER`]) each time a
//!   read fills it, so a bulk transfer costs each proxy one wake-up per
//!   256 KiB rather than per 64 KiB (a 3-hop loopback path spends most of
//!   its time in the kernel's per-`read`/`write` TCP work), while idle and
//!   request/response connections keep small buffers.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Buffer size for reads of a tunnelled stream's application connection.
pub const COPY_BUFFER: usize = 64 * 1024;

/// Initial buffer size for each direction of a proxied connection: enough
/// for a request or a small response; bulk grows it in three full reads.
/// (Starting at one TLS record, 16 KiB, cost the inbound sidecar about
/// 19 MiB more at 1,000 keep-alive connections, and bulk moved no faster.)
pub const START_COPY_BUFFER: usize = 4 * 1024;

/// Largest a direction's buffer grows to under bulk traffic (1 MiB was
/// slower than 256 KiB in the bulk bench: a step's buffers left the cache).
pub const MAX_COPY_BUFFER: usize = 256 * 1024;

/// Unsent TLS bytes a proxied connection's rustls session may hold (its
/// default is 64 KiB): a full copy buffer is encrypted and written at once.
pub const SEND_BUFFER_LIMIT: usize = MAX_COPY_BUFFER + 64 * 1024;

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
    let mut to_peer = Direction::Running(CopyBuffer::new());
    let mut to_app = Direction::Running(CopyBuffer::new());
    std::future::poll_fn(|cx| {
        // An error in either direction ends both at once.
        let a = to_peer.poll(cx, &mut *app, &mut peer)?;
        let b = to_app.poll(cx, &mut peer, &mut *app)?;
        // A finished direction stays `Done`, so returning early is fine.
        let a = std::task::ready!(a);
        let b = std::task::ready!(b);
        Poll::Ready(Ok((a, b)))
    })
    .await
}

/// One direction of [`splice`]: copying, then shutting the writer down once
/// the reader ended, then done (as `tokio::io::copy_bidirectional`).
enum Direction {
    Running(CopyBuffer),
    ShuttingDown(u64),
    Done(u64),
}

impl Direction {
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            match self {
                Self::Running(buf) => {
                    let n = std::task::ready!(buf.poll_copy(cx, r, w))?;
                    *self = Self::ShuttingDown(n);
                }
                Self::ShuttingDown(n) => {
                    std::task::ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                    *self = Self::Done(*n);
                }
                Self::Done(n) => return Poll::Ready(Ok(*n)),
            }
        }
    }
}

/// A copy buffer that grows while reads fill it.
struct CopyBuffer {
    buf: Vec<u8>,
    /// `buf[pos..cap]` is read and not yet written.
    pos: usize,
    cap: usize,
    eof: bool,
    need_flush: bool,
    amt: u64,
}

impl CopyBuffer {
    fn new() -> Self {
        Self {
            buf: vec![0; START_COPY_BUFFER],
            pos: 0,
            cap: 0,
            eof: false,
            need_flush: false,
            amt: 0,
        }
    }

    /// Copies until `r` ends and everything is written and flushed; returns
    /// the bytes copied.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            if self.pos == self.cap && !self.eof {
                let mut rb = ReadBuf::new(&mut self.buf);
                match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                    Poll::Pending => {
                        // Nothing to read now: push out what was written.
                        if self.need_flush {
                            std::task::ready!(Pin::new(&mut *w).poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        self.pos = 0;
                        self.cap = n;
                        if n == 0 {
                            self.eof = true;
                        }
                    }
                }
            }
            while self.pos < self.cap {
                let n = std::task::ready!(
                    Pin::new(&mut *w).poll_write(cx, &self.buf[self.pos..self.cap])
                )?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "write zero bytes into writer",
                    )));
                }
                self.pos += n;
                self.amt += n as u64;
                self.need_flush = true;
            }
            // The whole buffer was read at once: more is waiting, read more
            // per step.
            if self.cap == self.buf.len() && self.buf.len() < MAX_COPY_BUFFER {
                let grown = (self.buf.len() * 4).min(MAX_COPY_BUFFER);
                self.buf.resize(grown, 0);
            }
            if self.eof {
                std::task::ready!(Pin::new(&mut *w).poll_flush(cx))?;
                return Poll::Ready(Ok(self.amt));
            }
        }
    }
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
    async fn copy_buffer_grows_while_reads_fill_it() {
        // A slice fills every read completely.
        let data = vec![1u8; 8 << 20];
        let mut r = &data[..];
        let mut w = Vec::new();
        let mut buf = CopyBuffer::new();
        let n = std::future::poll_fn(|cx| buf.poll_copy(cx, &mut r, &mut w))
            .await
            .unwrap();
        assert_eq!(n, 8 << 20);
        assert_eq!(w.len(), 8 << 20);
        assert_eq!(buf.buf.len(), MAX_COPY_BUFFER);

        // Small reads leave it small.
        let mut r = Chunks(vec![b"ping".to_vec(); 100], None);
        let mut buf = CopyBuffer::new();
        let mut w = Vec::new();
        std::future::poll_fn(|cx| buf.poll_copy(cx, &mut r, &mut w))
            .await
            .unwrap();
        assert_eq!(w.len(), 400);
        assert_eq!(buf.buf.len(), START_COPY_BUFFER);
    }

    impl AsyncWrite for Chunks {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn an_error_from_the_peer_ends_splice_while_the_app_is_idle() {
        let (mut app, _app_far) = tokio::io::duplex(1 << 16);
        let e = io::Error::new(io::ErrorKind::UnexpectedEof, "peer gone");
        let peer = Chunks(vec![b"last".to_vec()], Some(e));
        let err = splice(&mut app, peer).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
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
