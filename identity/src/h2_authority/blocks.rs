//! The rewriting itself: the client preface, frames passed through, and
//! each header block decoded, its `:authority` replaced and re-encoded as
//! literals in frames of at most [`MAX_FRAME`] bytes.

use std::borrow::Cow;
use std::io;

use super::{
    AUTHORITY, AuthorityNormalizer, FLAG_END_HEADERS, FLAG_END_STREAM, FLAG_PADDED, FLAG_PRIORITY,
    FRAME_HEADER, MAX_FRAME, MAX_HEADER_BLOCK, MAX_HEADER_LIST, PREFACE, PendingBlock,
    RefusalError, State, TYPE_CONTINUATION, TYPE_HEADERS, TYPE_PUSH_PROMISE,
};

impl<S> AuthorityNormalizer<S> {
    /// Processes as much of `raw` as possible into `out`.
    pub(super) fn process(&mut self) -> Result<(), RefusalError> {
        loop {
            match self.state {
                State::Preface => {
                    let n = self.raw.len().min(PREFACE.len());
                    if self.raw[..n] != PREFACE[..n] {
                        return Err(RefusalError::BadPreface);
                    }
                    if n < PREFACE.len() {
                        return Ok(());
                    }
                    self.out.extend_from_slice(PREFACE);
                    self.raw.drain(..PREFACE.len());
                    self.state = State::FrameHeader;
                }
                State::Payload { remaining } => {
                    let n = remaining.min(self.raw.len());
                    if n == 0 {
                        return Ok(());
                    }
                    self.out.extend_from_slice(&self.raw[..n]);
                    self.raw.drain(..n);
                    self.state = if remaining == n {
                        State::FrameHeader
                    } else {
                        State::Payload {
                            remaining: remaining - n,
                        }
                    };
                }
                State::FrameHeader => {
                    if self.raw.len() < FRAME_HEADER {
                        return Ok(());
                    }
                    let h = &self.raw[..FRAME_HEADER];
                    let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                    let (ty, flags) = (h[3], h[4]);
                    let stream = u32::from_be_bytes([h[5] & 0x7f, h[6], h[7], h[8]]);
                    if self.block.is_some() && ty != TYPE_CONTINUATION {
                        return Err(RefusalError::Protocol(
                            "a header block was interrupted by another frame",
                        ));
                    }
                    match ty {
                        TYPE_HEADERS | TYPE_CONTINUATION => {
                            if len > MAX_HEADER_BLOCK {
                                return Err(RefusalError::HeaderBlockTooLarge { stream });
                            }
                            if self.raw.len() < FRAME_HEADER + len {
                                return Ok(());
                            }
                            let payload: Vec<u8> = self
                                .raw
                                .drain(..FRAME_HEADER + len)
                                .skip(FRAME_HEADER)
                                .collect();
                            if ty == TYPE_HEADERS {
                                self.headers(stream, flags, &payload)?;
                            } else {
                                self.continuation(stream, flags, &payload)?;
                            }
                        }
                        TYPE_PUSH_PROMISE => {
                            return Err(RefusalError::Protocol("a client sent PUSH_PROMISE"));
                        }
                        _ => {
                            self.out.extend_from_slice(&self.raw[..FRAME_HEADER]);
                            self.raw.drain(..FRAME_HEADER);
                            self.state = if len == 0 {
                                State::FrameHeader
                            } else {
                                State::Payload { remaining: len }
                            };
                        }
                    }
                }
            }
        }
    }

    pub(super) fn headers(
        &mut self,
        stream: u32,
        flags: u8,
        payload: &[u8],
    ) -> Result<(), RefusalError> {
        if stream == 0 {
            return Err(RefusalError::Protocol("HEADERS on stream 0"));
        }
        let mut p = payload;
        let mut pad = 0usize;
        if flags & FLAG_PADDED != 0 {
            let (&n, rest) = p.split_first().ok_or(RefusalError::Protocol(
                "padded HEADERS without a pad length",
            ))?;
            pad = usize::from(n);
            p = rest;
        }
        let mut priority = None;
        if flags & FLAG_PRIORITY != 0 {
            if p.len() < 5 {
                return Err(RefusalError::Protocol("HEADERS too short for its priority"));
            }
            let mut pr = [0u8; 5];
            pr.copy_from_slice(&p[..5]);
            priority = Some(pr);
            p = &p[5..];
        }
        if pad > p.len() {
            return Err(RefusalError::Protocol("HEADERS padding exceeds the frame"));
        }
        self.block = Some(PendingBlock {
            stream,
            end_stream: flags & FLAG_END_STREAM != 0,
            priority,
            fragment: p[..p.len() - pad].to_vec(),
        });
        if flags & FLAG_END_HEADERS != 0 {
            self.finish_block()?;
        }
        Ok(())
    }

    pub(super) fn continuation(
        &mut self,
        stream: u32,
        flags: u8,
        payload: &[u8],
    ) -> Result<(), RefusalError> {
        let Some(block) = self.block.as_mut() else {
            return Err(RefusalError::Protocol(
                "CONTINUATION without a header block",
            ));
        };
        if block.stream != stream {
            return Err(RefusalError::Protocol(
                "CONTINUATION on another stream than its HEADERS",
            ));
        }
        if block.fragment.len() + payload.len() > MAX_HEADER_BLOCK {
            return Err(RefusalError::HeaderBlockTooLarge { stream });
        }
        block.fragment.extend_from_slice(payload);
        if flags & FLAG_END_HEADERS != 0 {
            self.finish_block()?;
        }
        Ok(())
    }

    /// Decodes the pending block, rewrites `:authority`, and emits it.
    pub(super) fn finish_block(&mut self) -> Result<(), RefusalError> {
        let Some(block) = self.block.take() else {
            return Ok(());
        };
        let stream = block.stream;
        let mut encoded = Vec::with_capacity(block.fragment.len() + 64);
        let mut list_size = 0usize;
        let mut too_large = false;
        // Huffman strings are decoded here, table-driven; `loona_hpack` then
        // sees plain literals only (its own Huffman decoder builds its tables
        // per string).
        let fragment = crate::hpack_strings::plain_strings(&block.fragment).map_err(|e| {
            RefusalError::Hpack {
                stream,
                reason: e.to_string(),
            }
        })?;
        self.decoder
            .decode_with_cb(&fragment, |name: Cow<[u8]>, value: Cow<[u8]>| {
                if too_large {
                    return;
                }
                let value: &[u8] = if name.as_ref() == b":authority" {
                    AUTHORITY
                } else {
                    &value
                };
                list_size += name.len() + value.len() + 32;
                if list_size > MAX_HEADER_LIST {
                    too_large = true;
                    return;
                }
                encode_literal(&name, value, &mut encoded);
            })
            .map_err(|e| RefusalError::Hpack {
                stream,
                reason: e.to_string(),
            })?;
        if too_large {
            return Err(RefusalError::HeaderListTooLarge { stream });
        }
        self.emit(&block, &encoded);
        Ok(())
    }

    /// Frames `encoded` as one HEADERS and as many CONTINUATIONs as needed.
    pub(super) fn emit(&mut self, block: &PendingBlock, encoded: &[u8]) {
        let first_room = MAX_FRAME - if block.priority.is_some() { 5 } else { 0 };
        let (first, mut rest) = encoded.split_at(encoded.len().min(first_room));
        let mut flags = 0;
        if block.end_stream {
            flags |= FLAG_END_STREAM;
        }
        if block.priority.is_some() {
            flags |= FLAG_PRIORITY;
        }
        if rest.is_empty() {
            flags |= FLAG_END_HEADERS;
        }
        let prio = block.priority.as_ref().map_or(&[][..], |p| &p[..]);
        self.frame(TYPE_HEADERS, flags, block.stream, &[prio, first]);
        while !rest.is_empty() {
            let (chunk, more) = rest.split_at(rest.len().min(MAX_FRAME));
            rest = more;
            let flags = if rest.is_empty() { FLAG_END_HEADERS } else { 0 };
            self.frame(TYPE_CONTINUATION, flags, block.stream, &[chunk]);
        }
    }

    pub(super) fn frame(&mut self, ty: u8, flags: u8, stream: u32, parts: &[&[u8]]) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        // `len` <= MAX_FRAME, so it fits the 24-bit length field.
        let l = (len as u32).to_be_bytes();
        self.out.extend_from_slice(&[l[1], l[2], l[3], ty, flags]);
        self.out.extend_from_slice(&stream.to_be_bytes());
        for p in parts {
            self.out.extend_from_slice(p);
        }
    }

    pub(super) fn refuse(&mut self, e: RefusalError) -> io::Error {
        tracing::warn!(
            listener = self.listener,
            reason = e.reason(),
            error = %e,
            "HTTP/2 connection refused"
        );
        if let Some(h) = &self.hook {
            h(&e);
        }
        let err = io::Error::new(io::ErrorKind::InvalidData, e.clone());
        self.failed = Some(e);
        self.raw = Vec::new();
        err
    }
}

/// HPACK "literal header field without indexing — new name" (RFC 7541
/// §6.2.2), no Huffman coding.
pub(super) fn encode_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0x00);
    for s in [name, value] {
        // Writing into a Vec cannot fail.
        let _ = loona_hpack::encoder::encode_integer_into(s.len(), 7, 0, out);
        out.extend_from_slice(s);
    }
}
