//! Any HTTP/2 `:authority` on a Unix socket: a frame-level layer between an
//! accepted stream and the HTTP/2 server.
//!
//! gRPC clients do not agree on what `:authority` to send over a Unix socket:
//! gRPC C-core (Python, Ruby, C++, PHP) sends the percent-encoded socket path
//! (`tmp%2Fmeshid%2Fagent.sock`), grpc-java the raw path, others `localhost`,
//! an empty value or none. The `h2` crate refuses every value that is not a
//! valid URI authority with `RST_STREAM(PROTOCOL_ERROR)`. On a Unix socket
//! the authority carries no meaning (the caller is identified by the kernel),
//! so [`AuthorityNormalizer`] rewrites it before `h2` sees it:
//!
//! - the client preface and every frame other than HEADERS and CONTINUATION
//!   pass through unchanged (without buffering more than one read);
//! - a header block (HEADERS plus its CONTINUATION frames, at most
//!   [`MAX_HEADER_BLOCK`] bytes) is HPACK-decoded with the client's dynamic
//!   table (Huffman strings through [`crate::hpack_strings`]), `:authority`
//!   (when present) becomes `localhost`, and the block is
//!   re-encoded as literals *without indexing*, so the server's decoder never
//!   adds to its dynamic table and stays in step whatever the client indexed;
//!   it is re-framed in frames of at most [`MAX_FRAME`] bytes (the smallest
//!   frame size HTTP/2 allows a peer to advertise), padding dropped, priority
//!   kept;
//! - anything that cannot be decoded or breaks the framing rules (a bad
//!   preface, an interrupted header block, a PUSH_PROMISE from a client, an
//!   oversized block or header list) ends that connection: the read fails,
//!   the server closes the socket, the refusal is logged and reported to the
//!   caller's hook. Other connections are unaffected.
//!
//! Writes (server to client) pass through untouched.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

mod blocks;

/// The HTTP/2 client connection preface.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Largest header block (compressed, all fragments of one HEADERS and its
/// CONTINUATIONs together) that is accepted.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// Largest decoded header list (RFC 9113 §6.5.2 size: name + value + 32 per
/// field) that is accepted.
pub const MAX_HEADER_LIST: usize = 64 * 1024;
/// Largest frame payload this layer emits.
pub const MAX_FRAME: usize = 16_384;
/// HPACK dynamic table size the server advertises (the HTTP/2 default; the
/// servers here do not change `SETTINGS_HEADER_TABLE_SIZE`).
pub const HPACK_TABLE_SIZE: usize = 4096;

/// The value every `:authority` is replaced with.
pub const AUTHORITY: &[u8] = b"localhost";

const FRAME_HEADER: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_PUSH_PROMISE: u8 = 0x5;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
const READ_CHUNK: usize = 16 * 1024;
/// Buffers larger than this are released once drained.
const IDLE_CAPACITY: usize = 4096;

/// Why a connection was refused before reaching the HTTP/2 server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefusalError {
    /// The first bytes were not the HTTP/2 client preface.
    #[error("the connection did not start with the HTTP/2 client preface")]
    BadPreface,
    /// A header block was larger than [`MAX_HEADER_BLOCK`].
    #[error("header block on stream {stream} exceeds {MAX_HEADER_BLOCK} bytes")]
    HeaderBlockTooLarge {
        /// Stream id.
        stream: u32,
    },
    /// A decoded header list was larger than [`MAX_HEADER_LIST`].
    #[error("decoded header list on stream {stream} exceeds {MAX_HEADER_LIST} bytes")]
    HeaderListTooLarge {
        /// Stream id.
        stream: u32,
    },
    /// The header block was not valid HPACK.
    #[error("invalid HPACK header block on stream {stream}: {reason}")]
    Hpack {
        /// Stream id.
        stream: u32,
        /// The decoder's description.
        reason: String,
    },
    /// The frames broke an HTTP/2 framing rule.
    #[error("HTTP/2 framing error: {0}")]
    Protocol(&'static str),
}

impl RefusalError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BadPreface => "bad_preface",
            Self::HeaderBlockTooLarge { .. } => "header_block_too_large",
            Self::HeaderListTooLarge { .. } => "header_list_too_large",
            Self::Hpack { .. } => "hpack",
            Self::Protocol(_) => "protocol",
        }
    }
}

/// Called once per refused connection, after the refusal is logged.
pub type RefusalHook = Arc<dyn Fn(&RefusalError) + Send + Sync>;

enum State {
    Preface,
    FrameHeader,
    Payload { remaining: usize },
}

struct PendingBlock {
    stream: u32,
    /// END_STREAM of the HEADERS frame.
    end_stream: bool,
    /// Stream dependency and weight, when the HEADERS frame had PRIORITY.
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// Wraps the server side of an accepted HTTP/2 connection; see the module
/// documentation.
pub struct AuthorityNormalizer<S> {
    inner: S,
    listener: &'static str,
    hook: Option<RefusalHook>,
    state: State,
    /// Bytes read from `inner`, not yet processed.
    raw: Vec<u8>,
    /// Processed bytes for the server, from `out_pos` on.
    out: Vec<u8>,
    out_pos: usize,
    decoder: loona_hpack::Decoder<'static>,
    block: Option<PendingBlock>,
    eof: bool,
    failed: Option<RefusalError>,
}

impl<S> std::fmt::Debug for AuthorityNormalizer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityNormalizer")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

impl<S> AuthorityNormalizer<S> {
    /// Wraps `inner`; `listener` names the socket in log lines; `hook` is
    /// told about each refused connection (for a metric).
    pub fn new(inner: S, listener: &'static str, hook: Option<RefusalHook>) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HPACK_TABLE_SIZE);
        Self {
            inner,
            listener,
            hook,
            state: State::Preface,
            raw: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            decoder,
            block: None,
            eof: false,
            failed: None,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityNormalizer<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_pos);
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out_pos = 0;
                    // Idle connections keep no large buffers.
                    if this.out.capacity() > IDLE_CAPACITY {
                        this.out = Vec::new();
                    } else {
                        this.out.clear();
                    }
                    if this.raw.is_empty() && this.raw.capacity() > IDLE_CAPACITY {
                        this.raw = Vec::new();
                    }
                }
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = &this.failed {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e.clone())));
            }
            if this.eof || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    if rb.filled().is_empty() {
                        this.eof = true;
                        continue;
                    }
                    this.raw.extend_from_slice(rb.filled());
                    if let Err(e) = this.process() {
                        return Poll::Ready(Err(this.refuse(e)));
                    }
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityNormalizer<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
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

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityNormalizer<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let l = (payload.len() as u32).to_be_bytes();
        let mut v = vec![l[1], l[2], l[3], ty, flags];
        v.extend_from_slice(&stream.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// Runs `input` through the layer in `step`-byte reads; returns the
    /// output or the refusal.
    async fn run(input: &[u8], step: usize) -> Result<Vec<u8>, RefusalError> {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let hook_seen = Arc::new(std::sync::Mutex::new(None));
        let seen = hook_seen.clone();
        let hook: RefusalHook = Arc::new(move |e| {
            *seen.lock().expect("lock") = Some(e.clone());
        });
        let mut n = AuthorityNormalizer::new(server, "test", Some(hook));
        let input = input.to_vec();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for c in input.chunks(step) {
                if client.write_all(c).await.is_err() {
                    return;
                }
            }
            let _ = client.shutdown().await;
        });
        let mut out = Vec::new();
        let r = n.read_to_end(&mut out).await;
        writer.await.expect("writer");
        match r {
            Ok(_) => Ok(out),
            Err(e) => {
                let seen = hook_seen.lock().expect("lock").clone().expect("hook told");
                let inner = e
                    .into_inner()
                    .expect("inner")
                    .downcast::<RefusalError>()
                    .expect("typed");
                assert_eq!(*inner, seen);
                Err(seen)
            }
        }
    }

    /// Splits the layer's output into frames, decoding header blocks with a
    /// fresh decoder whose dynamic table must stay empty.
    fn frames(out: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert_eq!(&out[..24], PREFACE);
        let mut p = &out[24..];
        let mut v = Vec::new();
        while !p.is_empty() {
            let len = usize::from(p[0]) << 16 | usize::from(p[1]) << 8 | usize::from(p[2]);
            let sid = u32::from_be_bytes([p[5], p[6], p[7], p[8]]);
            v.push((p[3], p[4], sid, p[9..9 + len].to_vec()));
            p = &p[9 + len..];
        }
        v
    }

    fn request(authority: Option<&[u8]>, enc: &mut loona_hpack::Encoder<'_>) -> Vec<u8> {
        let mut h: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
        ];
        if let Some(a) = authority {
            h.push((b":authority", a));
        }
        h.push((b"content-type", b"application/grpc"));
        enc.encode(h)
    }

    fn decode_all(frames: &[(u8, u8, u32, Vec<u8>)]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut d = loona_hpack::Decoder::new();
        // The server's table never grows: a zero-size table must decode it.
        d.set_max_table_size(0);
        let mut lists = Vec::new();
        let mut block = Vec::new();
        for (ty, flags, _, payload) in frames {
            if *ty == TYPE_HEADERS {
                let skip = if flags & FLAG_PRIORITY != 0 { 5 } else { 0 };
                block = payload[skip..].to_vec();
            } else if *ty == TYPE_CONTINUATION {
                block.extend_from_slice(payload);
            } else {
                continue;
            }
            if flags & FLAG_END_HEADERS != 0 {
                lists.push(d.decode(&block).expect("decodes"));
            }
        }
        lists
    }

    #[tokio::test]
    async fn rewrites_every_authority_form_and_keeps_other_frames() {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100])); // SETTINGS
        let forms: [Option<&[u8]>; 5] = [
            Some(b"tmp%2Fmeshid%2Fagent.sock"),
            Some(b"/tmp/meshid/agent.sock"),
            Some(b"localhost"),
            Some(b""),
            None,
        ];
        for (i, a) in forms.iter().enumerate() {
            let sid = 1 + 2 * i as u32;
            // Twice per form: the second time the client's encoder refers
            // to its dynamic table.
            for _ in 0..2 {
                input.extend(frame(
                    TYPE_HEADERS,
                    FLAG_END_HEADERS,
                    sid,
                    &request(*a, &mut enc),
                ));
            }
            input.extend(frame(0x0, FLAG_END_STREAM, sid, b"\0\0\0\0\0"));
        }
        for step in [1, 7, 4096] {
            let out = run(&input, step).await.expect("accepted");
            let f = frames(&out);
            assert_eq!(f[0], (0x4, 0, 0, vec![0, 3, 0, 0, 0, 100]));
            let lists = decode_all(&f);
            assert_eq!(lists.len(), 10);
            for (i, l) in lists.iter().enumerate() {
                let auth: Vec<_> = l.iter().filter(|(n, _)| n == b":authority").collect();
                if forms[i / 2].is_some() {
                    assert_eq!(auth, vec![&(b":authority".to_vec(), b"localhost".to_vec())]);
                } else {
                    assert!(auth.is_empty());
                }
                assert_eq!(l[2].1, b"/SpiffeWorkloadAPI/FetchX509SVID");
            }
            let data: Vec<_> = f.iter().filter(|x| x.0 == 0).collect();
            assert_eq!(data.len(), 5);
        }
    }

    #[tokio::test]
    async fn huffman_coded_headers_are_decoded() {
        // What gRPC C-core sends: Huffman-coded values, name indexes.
        let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
        for (index, value) in [
            (1u8, &b"tmp%2Fmeshid%2Fagent.sock"[..]), // :authority
            (4, b"/SpiffeWorkloadAPI/FetchX509SVID"), // :path
        ] {
            let mut coded = Vec::new();
            crate::hpack_strings::encode(value, &mut coded);
            block.push(index); // literal without indexing, indexed name
            block.push(0x80 | coded.len() as u8);
            block.extend_from_slice(&coded);
        }
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
        let out = run(&input, 3).await.expect("accepted");
        let lists = decode_all(&frames(&out));
        assert_eq!(lists[0][2], (b":authority".to_vec(), b"localhost".to_vec()));
        assert_eq!(lists[0][3].1, b"/SpiffeWorkloadAPI/FetchX509SVID");

        // A Huffman string with bad padding is refused as HPACK.
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &[0x01, 0x81, 0x00],
        ));
        assert_eq!(
            run(&input, 64).await.expect_err("refused").reason(),
            "hpack"
        );
    }

    #[tokio::test]
    async fn padded_prioritised_continued_blocks_are_reframed() {
        let mut enc = loona_hpack::Encoder::new();
        let big = vec![b'x'; 40_000];
        let block = enc.encode(vec![
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", b"/p"),
            (b":authority", b"/raw/path.sock"),
            (b"x-big", &big[..]),
        ]);
        let mut payload = vec![3u8]; // pad length
        payload.extend_from_slice(&[0x80, 0, 0, 0, 7]); // exclusive dep 0, weight 7
        payload.extend_from_slice(&block[..100]);
        payload.extend_from_slice(&[0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
            3,
            &payload,
        ));
        input.extend(frame(TYPE_CONTINUATION, 0, 3, &block[100..20_000]));
        input.extend(frame(
            TYPE_CONTINUATION,
            FLAG_END_HEADERS,
            3,
            &block[20_000..],
        ));
        let out = run(&input, 1000).await.expect("accepted");
        let f = frames(&out);
        assert!(f.len() >= 3);
        assert_eq!(f[0].0, TYPE_HEADERS);
        assert_eq!(f[0].1, FLAG_PRIORITY | FLAG_END_STREAM);
        assert_eq!(&f[0].3[..5], &[0x80, 0, 0, 0, 7]);
        assert!(f.iter().all(|x| x.3.len() <= MAX_FRAME));
        assert_eq!(f.last().expect("last").1, FLAG_END_HEADERS);
        let lists = decode_all(&f);
        assert_eq!(lists[0][3], (b":authority".to_vec(), b"localhost".to_vec()));
        assert_eq!(lists[0][4].1, big);
    }

    #[tokio::test]
    async fn garbage_is_refused_with_a_typed_reason() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ));
        let e = run(&input, 64).await.expect_err("refused");
        assert_eq!(e.reason(), "hpack");

        let e = run(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 5)
            .await
            .expect_err("refused");
        assert_eq!(e, RefusalError::BadPreface);

        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, 0, 1, &[0x82]));
        input.extend(frame(0x0, 0, 1, b""));
        let e = run(&input, 64).await.expect_err("refused");
        assert_eq!(e.reason(), "protocol");

        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &[0x82]));
        assert_eq!(
            run(&input, 64).await.expect_err("refused").reason(),
            "protocol"
        );

        let mut input = PREFACE.to_vec();
        input.extend(frame(
            TYPE_PUSH_PROMISE,
            FLAG_END_HEADERS,
            1,
            &[0, 0, 0, 2, 0x82],
        ));
        assert_eq!(
            run(&input, 64).await.expect_err("refused").reason(),
            "protocol"
        );

        let mut input = PREFACE.to_vec();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &vec![0; MAX_HEADER_BLOCK + 1],
        ));
        assert_eq!(
            run(&input, 4096).await.expect_err("refused"),
            RefusalError::HeaderBlockTooLarge { stream: 1 }
        );

        // A size update above the advertised table size.
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &[0x3f, 0xe1, 0xff, 0x03, 0x82],
        ));
        assert_eq!(
            run(&input, 64).await.expect_err("refused").reason(),
            "hpack"
        );
    }

    #[tokio::test]
    async fn an_hpack_bomb_is_refused_by_its_decoded_size() {
        // One 4000-byte entry in the client's table, then referenced
        // thousands of times from a small block.
        let mut enc = loona_hpack::Encoder::new();
        let v = vec![b'a'; 4000];
        let first = enc.encode(vec![(&b"x-a"[..], &v[..])]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &first));
        let refs = vec![0x80 | 62u8; 1000];
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 3, &refs));
        assert_eq!(
            run(&input, 4096).await.expect_err("refused"),
            RefusalError::HeaderListTooLarge { stream: 3 }
        );
    }
}
