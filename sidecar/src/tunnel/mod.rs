//! HTTP/2 CONNECT tunnels between sidecars (the shape of Istio ambient's
//! HBONE): an outbound listener with `tunnel = "h2"` keeps one mTLS HTTP/2
//! connection to its upstream (ALPN `h2`) and carries each application
//! connection as one CONNECT stream on it, so an application connection
//! costs no TCP or TLS handshake. An inbound listener with `tunnel = "h2"`
//! accepts such connections besides plain mTLS ones and forwards each stream
//! to its application as its own connection, with the tunnel peer's SPIFFE
//! ID delivered per stream (PROXY v2 when `proxy_protocol = true`).
//!
//! - The peer's identity is checked once per tunnel, by the same TLS
//!   verifiers and policy as a plain connection (and re-verified on
//!   resumption).
//! - A tunnel belongs to one generation of the listener's TLS config: after
//!   an SVID or bundle update the next application connection opens a new
//!   tunnel; the old one carries its open streams to their end and then
//!   closes (it drains).
//! - Every stream holds a connection budget slot of its direction, like a
//!   connection.

pub mod inbound;
pub mod outbound;

use std::io;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::copy::COPY_BUFFER;

/// HTTP/2 flow-control window of one stream: large enough that a single
/// stream can fill the link (the default of 64 KiB caps it at one window
/// per round trip).
pub const STREAM_WINDOW: u32 = 4 << 20;
/// HTTP/2 flow-control window of a whole tunnel.
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// Largest HTTP/2 DATA frame sent.
pub const MAX_FRAME: u32 = 64 << 10;
/// Concurrent streams an inbound listener accepts on one tunnel.
pub const MAX_STREAMS: u32 = 1024;

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::other(e)
    }
}

/// Copies both ways between an application connection and one tunnel
/// stream until both directions end. Returns (bytes app -> stream, bytes
/// stream -> app).
pub async fn pump(
    app: &mut TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
) -> io::Result<(u64, u64)> {
    let (mut ar, mut aw) = app.split();
    let up = async {
        let mut n = 0u64;
        let mut buf = BytesMut::with_capacity(COPY_BUFFER);
        loop {
            if buf.capacity() < COPY_BUFFER / 2 {
                buf.reserve(COPY_BUFFER);
            }
            if ar.read_buf(&mut buf).await? == 0 {
                send.send_data(Bytes::new(), true).map_err(h2_io)?;
                return Ok::<_, io::Error>(n);
            }
            let mut data = buf.split().freeze();
            while !data.is_empty() {
                send.reserve_capacity(data.len());
                let cap = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                    Some(Ok(c)) => c,
                    Some(Err(e)) => return Err(h2_io(e)),
                    None => return Err(io::Error::other("tunnel stream closed")),
                };
                if cap == 0 {
                    continue;
                }
                let chunk = data.split_to(cap.min(data.len()));
                n += chunk.len() as u64;
                send.send_data(chunk, false).map_err(h2_io)?;
            }
        }
    };
    let down = async {
        let mut n = 0u64;
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.map_err(h2_io)?;
            aw.write_all(&chunk).await?;
            let _ = recv.flow_control().release_capacity(chunk.len());
            n += chunk.len() as u64;
        }
        aw.shutdown().await?;
        Ok::<_, io::Error>(n)
    };
    tokio::try_join!(up, down)
}
