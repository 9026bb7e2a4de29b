//! The transport under a TLS session: the peer's socket with a read-ahead
//! buffer. rustls asks its transport for at most 4 KiB at a time, so
//! without one a 16 KiB record costs four `read` calls; with it one `read`
//! brings several records and rustls copies from memory.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Initial read-ahead from a TLS peer's socket (one full record). Starting
/// at 4 KiB saved about 6 MiB per 1,000 idle connections but cost request/
/// response traffic 5-9% of its requests/s in the sidecar bench.
pub const READ_AHEAD: usize = 16 * 1024 + 256;

/// Largest the read-ahead grows to. Larger (1 MiB) was slower in the bulk
/// bench: the buffers of a step no longer stay in the CPU's cache.
pub const MAX_READ_AHEAD: usize = 64 * 1024;

/// The transport under a TLS session: the peer's socket with a read-ahead
/// buffer that grows (×4, up to [`MAX_READ_AHEAD`]) each time a read fills
/// it; writes pass straight through.
#[derive(Debug)]
pub struct PeerIo {
    tcp: TcpStream,
    buf: Vec<u8>,
    /// `buf[pos..filled]` is read from the socket, not yet handed out.
    pos: usize,
    filled: usize,
}

/// Wraps a TLS peer's socket in its read-ahead buffer.
pub fn peer_io(tcp: TcpStream) -> PeerIo {
    PeerIo {
        tcp,
        buf: vec![0; READ_AHEAD],
        pos: 0,
        filled: 0,
    }
}

impl AsyncRead for PeerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos == this.filled {
            let mut rb = ReadBuf::new(&mut this.buf);
            std::task::ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            this.pos = 0;
            this.filled = n;
            if n == this.buf.len() && n < MAX_READ_AHEAD {
                let grown = (n * 4).min(MAX_READ_AHEAD);
                this.buf.resize(grown, 0);
            }
        }
        let n = out.remaining().min(this.filled - this.pos);
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for PeerIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn peer_io_read_ahead_grows_under_bulk_and_keeps_every_byte() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let data: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(&sent).await.unwrap();
        });
        let mut io = peer_io(TcpStream::connect(addr).await.unwrap());
        // rustls-sized reads.
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = io.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        writer.await.unwrap();
        assert_eq!(got, data);
        assert!(io.buf.len() > READ_AHEAD, "read-ahead did not grow");
        assert_eq!(io.buf.len(), MAX_READ_AHEAD);
    }
}
