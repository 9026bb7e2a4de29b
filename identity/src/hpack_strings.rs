//! HPACK Huffman decoding (RFC 7541 §5.2, Appendix B) with tables built at
//! compile time, and [`plain_strings`], which rewrites a header block so that
//! every Huffman-coded string literal becomes a plain one.
//!
//! The `:authority` normalizer ([`crate::h2_authority`]) hands header blocks
//! to `loona_hpack`, whose Huffman decoder builds its code tables (nested hash
//! maps) anew for every string. Passing it [`plain_strings`]'s output instead
//! keeps its dynamic table, size limits and error checks while the Huffman
//! work is a table walk: the decoder reads four bits at a time through a
//! 256-state automaton (one state per internal node of the code tree), so a
//! byte costs two lookups and no allocation beyond the output.

use std::borrow::Cow;

/// Why a header block could not be rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HpackStringError {
    /// A Huffman-coded string contained the EOS symbol.
    #[error("Huffman string contains EOS")]
    EosInString,
    /// A Huffman-coded string ended in padding that is longer than 7 bits or
    /// not a prefix of EOS.
    #[error("invalid Huffman padding")]
    InvalidPadding,
    /// An integer ran past the end of the block or over 5 octets.
    #[error("invalid integer")]
    Integer,
    /// A string literal ran past the end of the block.
    #[error("string literal exceeds the header block")]
    StringTooLong,
}

/// Transition flag: the nibble completed a symbol (`sym`).
const EMIT: u8 = 1;
/// Transition flag: the nibble completed EOS.
const FAIL: u8 = 2;
/// Transition flag: ending the string in `next` is valid padding (at most 7
/// bits, all ones, since the last symbol).
const ACCEPT: u8 = 4;

#[derive(Clone, Copy)]
struct Transition {
    next: u8,
    sym: u8,
    flags: u8,
}

/// `DECODE[state][nibble]`: where four more bits lead from an internal node
/// of the code tree (state 0 is the root).
static DECODE: [[Transition; 16]; 256] = build_decode();

const fn build_decode() -> [[Transition; 16]; 256] {
    // Internal nodes; a child > 0 is an internal node, < 0 is the leaf of
    // symbol -child - 1, 0 is not yet set (the root is nobody's child).
    let mut tree = [[0i16; 2]; 256];
    let mut nodes = 1usize;
    let mut sym = 0usize;
    while sym < 257 {
        let (code, len) = (CODES[sym], LENS[sym]);
        let mut node = 0usize;
        let mut i = len;
        while i > 0 {
            i -= 1;
            let bit = ((code >> i) & 1) as usize;
            if i == 0 {
                assert!(tree[node][bit] == 0, "code is a prefix of another");
                tree[node][bit] = -(sym as i16) - 1;
            } else {
                if tree[node][bit] == 0 {
                    tree[node][bit] = nodes as i16;
                    nodes += 1;
                }
                assert!(tree[node][bit] > 0, "code has another as prefix");
                node = tree[node][bit] as usize;
            }
        }
        sym += 1;
    }
    assert!(nodes == 256, "the code tree is not complete");

    // Valid end states: up to seven 1-bits after a symbol boundary.
    let mut accept = [false; 256];
    let mut node = 0usize;
    let mut depth = 0;
    accept[0] = true;
    while depth < 7 {
        node = tree[node][1] as usize;
        accept[node] = true;
        depth += 1;
    }

    let mut table = [[Transition {
        next: 0,
        sym: 0,
        flags: 0,
    }; 16]; 256];
    let mut state = 0usize;
    while state < 256 {
        let mut nibble = 0usize;
        while nibble < 16 {
            let mut node = state;
            let mut t = Transition {
                next: 0,
                sym: 0,
                flags: 0,
            };
            let mut bit = 4;
            while bit > 0 {
                bit -= 1;
                let child = tree[node][(nibble >> bit) & 1];
                if child < 0 {
                    let s = (-child - 1) as usize;
                    if s == 256 {
                        t.flags |= FAIL;
                        break;
                    }
                    // Codes are at least 5 bits: one symbol per nibble.
                    t.sym = s as u8;
                    t.flags |= EMIT;
                    node = 0;
                } else {
                    node = child as usize;
                }
            }
            t.next = node as u8;
            if accept[node] {
                t.flags |= ACCEPT;
            }
            table[state][nibble] = t;
            nibble += 1;
        }
        state += 1;
    }
    table
}

/// Appends the Huffman decoding of `src` to `dst`.
pub fn decode(src: &[u8], dst: &mut Vec<u8>) -> Result<(), HpackStringError> {
    // A symbol takes at least 5 bits.
    dst.reserve(src.len() * 8 / 5);
    let mut state = 0usize;
    let mut flags = ACCEPT;
    for &b in src {
        for nibble in [b >> 4, b & 0x0f] {
            let t = DECODE[state][usize::from(nibble)];
            if t.flags & FAIL != 0 {
                return Err(HpackStringError::EosInString);
            }
            if t.flags & EMIT != 0 {
                dst.push(t.sym);
            }
            state = usize::from(t.next);
            flags = t.flags;
        }
    }
    if flags & ACCEPT == 0 {
        return Err(HpackStringError::InvalidPadding);
    }
    Ok(())
}

/// Appends the Huffman encoding of `src` to `dst` (padded with the most
/// significant bits of EOS).
#[cfg(test)]
pub(crate) fn encode(src: &[u8], dst: &mut Vec<u8>) {
    let mut acc = 0u64;
    let mut bits = 0u32;
    for &b in src {
        let i = usize::from(b);
        acc = acc << LENS[i] | u64::from(CODES[i]);
        bits += u32::from(LENS[i]);
        while bits >= 8 {
            bits -= 8;
            dst.push((acc >> bits) as u8);
        }
    }
    if bits > 0 {
        dst.push(((acc << (8 - bits)) as u8) | (0xff >> bits));
    }
}

/// Decodes an HPACK integer with a `prefix`-bit prefix at the start of
/// `buf`; returns it and the octets it took. Like `loona_hpack`, at most 5
/// octets.
fn integer(buf: &[u8], prefix: u8) -> Result<(usize, usize), HpackStringError> {
    let mask = (1u16 << prefix) as usize - 1;
    let first = buf.first().ok_or(HpackStringError::Integer)?;
    let mut value = usize::from(*first) & mask;
    if value < mask {
        return Ok((value, 1));
    }
    let mut shift = 0;
    for (i, &b) in buf.iter().enumerate().skip(1).take(4) {
        value += usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    Err(HpackStringError::Integer)
}

/// Writes an HPACK integer with a `prefix`-bit prefix; `flags` fills the
/// bits above it.
fn write_integer(value: usize, prefix: u8, flags: u8, out: &mut Vec<u8>) {
    let mask = (1u16 << prefix) as usize - 1;
    if value < mask {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | mask as u8);
    let mut rest = value - mask;
    while rest >= 0x80 {
        out.push(0x80 | (rest & 0x7f) as u8);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// The header block `block` with every Huffman-coded string literal replaced
/// by its plain form; every other octet (indexes, size updates, plain
/// strings) is kept as it is. Borrowed when there was nothing to replace.
///
/// Only the representations are walked: indexes are not resolved and the
/// dynamic table is not touched, so the result must still go through a full
/// HPACK decoder, which sees exactly the header list `block` encodes.
pub fn plain_strings(block: &[u8]) -> Result<Cow<'_, [u8]>, HpackStringError> {
    let mut out: Option<Vec<u8>> = None;
    let mut decoded = Vec::new();
    // `block[kept..pos]` is not yet copied to `out`.
    let mut kept = 0;
    let mut pos = 0;
    while pos < block.len() {
        let b = block[pos];
        let (literal_prefix, int_prefix) = match b {
            _ if b & 0x80 != 0 => (false, 7),
            _ if b & 0x40 != 0 => (true, 6),
            _ if b & 0x20 != 0 => (false, 5),
            _ => (true, 4),
        };
        let (index, n) = integer(&block[pos..], int_prefix)?;
        pos += n;
        if !literal_prefix {
            continue;
        }
        let strings = if index == 0 { 2 } else { 1 };
        for _ in 0..strings {
            let huffman = block.get(pos).is_some_and(|b| b & 0x80 != 0);
            let (len, n) = integer(&block[pos..], 7)?;
            let end = (pos + n)
                .checked_add(len)
                .filter(|&e| e <= block.len())
                .ok_or(HpackStringError::StringTooLong)?;
            if huffman {
                decoded.clear();
                decode(&block[pos + n..end], &mut decoded)?;
                let out = out.get_or_insert_with(|| Vec::with_capacity(block.len() * 2));
                out.extend_from_slice(&block[kept..pos]);
                write_integer(decoded.len(), 7, 0, out);
                out.extend_from_slice(&decoded);
                kept = end;
            }
            pos = end;
        }
    }
    Ok(match out {
        None => Cow::Borrowed(block),
        Some(mut out) => {
            out.extend_from_slice(&block[kept..]);
            Cow::Owned(out)
        }
    })
}

const CODES: [u32; 257] = [
    0x1ff8, 0x7fffd8, 0xfffffe2, 0xfffffe3, 0xfffffe4, 0xfffffe5, 0xfffffe6, 0xfffffe7, 0xfffffe8,
    0xffffea, 0x3ffffffc, 0xfffffe9, 0xfffffea, 0x3ffffffd, 0xfffffeb, 0xfffffec, 0xfffffed,
    0xfffffee, 0xfffffef, 0xffffff0, 0xffffff1, 0xffffff2, 0x3ffffffe, 0xffffff3, 0xffffff4,
    0xffffff5, 0xffffff6, 0xffffff7, 0xffffff8, 0xffffff9, 0xffffffa, 0xffffffb, 0x14, 0x3f8,
    0x3f9, 0xffa, 0x1ff9, 0x15, 0xf8, 0x7fa, 0x3fa, 0x3fb, 0xf9, 0x7fb, 0xfa, 0x16, 0x17, 0x18,
    0x0, 0x1, 0x2, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f, 0x5c, 0xfb, 0x7ffc, 0x20, 0xffb,
    0x3fc, 0x1ffa, 0x21, 0x5d, 0x5e, 0x5f, 0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68,
    0x69, 0x6a, 0x6b, 0x6c, 0x6d, 0x6e, 0x6f, 0x70, 0x71, 0x72, 0xfc, 0x73, 0xfd, 0x1ffb, 0x7fff0,
    0x1ffc, 0x3ffc, 0x22, 0x7ffd, 0x3, 0x23, 0x4, 0x24, 0x5, 0x25, 0x26, 0x27, 0x6, 0x74, 0x75,
    0x28, 0x29, 0x2a, 0x7, 0x2b, 0x76, 0x2c, 0x8, 0x9, 0x2d, 0x77, 0x78, 0x79, 0x7a, 0x7b, 0x7ffe,
    0x7fc, 0x3ffd, 0x1ffd, 0xffffffc, 0xfffe6, 0x3fffd2, 0xfffe7, 0xfffe8, 0x3fffd3, 0x3fffd4,
    0x3fffd5, 0x7fffd9, 0x3fffd6, 0x7fffda, 0x7fffdb, 0x7fffdc, 0x7fffdd, 0x7fffde, 0xffffeb,
    0x7fffdf, 0xffffec, 0xffffed, 0x3fffd7, 0x7fffe0, 0xffffee, 0x7fffe1, 0x7fffe2, 0x7fffe3,
    0x7fffe4, 0x1fffdc, 0x3fffd8, 0x7fffe5, 0x3fffd9, 0x7fffe6, 0x7fffe7, 0xffffef, 0x3fffda,
    0x1fffdd, 0xfffe9, 0x3fffdb, 0x3fffdc, 0x7fffe8, 0x7fffe9, 0x1fffde, 0x7fffea, 0x3fffdd,
    0x3fffde, 0xfffff0, 0x1fffdf, 0x3fffdf, 0x7fffeb, 0x7fffec, 0x1fffe0, 0x1fffe1, 0x3fffe0,
    0x1fffe2, 0x7fffed, 0x3fffe1, 0x7fffee, 0x7fffef, 0xfffea, 0x3fffe2, 0x3fffe3, 0x3fffe4,
    0x7ffff0, 0x3fffe5, 0x3fffe6, 0x7ffff1, 0x3ffffe0, 0x3ffffe1, 0xfffeb, 0x7fff1, 0x3fffe7,
    0x7ffff2, 0x3fffe8, 0x1ffffec, 0x3ffffe2, 0x3ffffe3, 0x3ffffe4, 0x7ffffde, 0x7ffffdf,
    0x3ffffe5, 0xfffff1, 0x1ffffed, 0x7fff2, 0x1fffe3, 0x3ffffe6, 0x7ffffe0, 0x7ffffe1, 0x3ffffe7,
    0x7ffffe2, 0xfffff2, 0x1fffe4, 0x1fffe5, 0x3ffffe8, 0x3ffffe9, 0xffffffd, 0x7ffffe3, 0x7ffffe4,
    0x7ffffe5, 0xfffec, 0xfffff3, 0xfffed, 0x1fffe6, 0x3fffe9, 0x1fffe7, 0x1fffe8, 0x7ffff3,
    0x3fffea, 0x3fffeb, 0x1ffffee, 0x1ffffef, 0xfffff4, 0xfffff5, 0x3ffffea, 0x7ffff4, 0x3ffffeb,
    0x7ffffe6, 0x3ffffec, 0x3ffffed, 0x7ffffe7, 0x7ffffe8, 0x7ffffe9, 0x7ffffea, 0x7ffffeb,
    0xffffffe, 0x7ffffec, 0x7ffffed, 0x7ffffee, 0x7ffffef, 0x7fffff0, 0x3ffffee, 0x3fffffff,
];

const LENS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
];

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    fn huff(s: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        decode(s, &mut v).expect("decodes");
        v
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(Vec<u8>, Vec<u8>)> {
        list.iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn rfc7541_c4_strings() {
        assert_eq!(
            huff(&hex("f1e3 c2e5 f23a 6ba0 ab90 f4ff")),
            b"www.example.com"
        );
        assert_eq!(huff(&hex("a8eb 1064 9cbf")), b"no-cache");
        assert_eq!(huff(&hex("25a8 49e9 5ba9 7d7f")), b"custom-key");
        assert_eq!(huff(&hex("25a8 49e9 5bb8 e8b4 bf")), b"custom-value");
        assert_eq!(huff(&[]), b"");
    }

    /// RFC 7541 C.4.1–C.4.3: three requests on one connection, Huffman
    /// coded, through `plain_strings` and then `loona_hpack`.
    #[test]
    fn rfc7541_c4_requests_decode_through_plain_strings() {
        let mut d = loona_hpack::Decoder::new();
        let blocks = [
            "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
            "8286 84be 5886 a8eb 1064 9cbf",
            "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
        ];
        let want = [
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ]),
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache"),
            ]),
            pairs(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value"),
            ]),
        ];
        for (block, want) in blocks.iter().zip(want) {
            let block = hex(block);
            let plain = plain_strings(&block).expect("valid");
            assert!(matches!(plain, Cow::Owned(_)));
            assert_eq!(d.decode(&plain).expect("decodes"), want);
        }
    }

    /// A small deterministic generator, enough for test inputs.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn every_octet_round_trips() {
        let all: Vec<u8> = (0..=255).collect();
        let mut enc = Vec::new();
        encode(&all, &mut enc);
        assert_eq!(huff(&enc), all);
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        for len in 0..300 {
            let s: Vec<u8> = (0..len).map(|_| xorshift(&mut seed) as u8).collect();
            let mut enc = Vec::new();
            encode(&s, &mut enc);
            assert_eq!(huff(&enc), s);
        }
    }

    /// On arbitrary input this decoder and `loona_hpack`'s accept and refuse
    /// the same strings and agree on the result.
    #[test]
    fn agrees_with_loona_hpack_on_arbitrary_input() {
        let mut seed = 0x2545_f491_4f6c_dd1d;
        let mut accepted = 0;
        for i in 0..20_000 {
            let len = (i % 12) + 1;
            let mut s: Vec<u8> = (0..len).map(|_| xorshift(&mut seed) as u8).collect();
            if i % 2 == 0 {
                // Mostly valid: a real encoding with a random last octet.
                let plain: Vec<u8> = s.iter().map(|b| b'a' + b % 26).collect();
                s.clear();
                encode(&plain, &mut s);
                if let Some(last) = s.last_mut() {
                    *last = xorshift(&mut seed) as u8;
                }
            }
            let mut ours = Vec::new();
            let ours = decode(&s, &mut ours).map(|()| ours);
            let theirs = loona_hpack::huffman::HuffmanDecoder::new().decode(&s);
            assert_eq!(ours.is_ok(), theirs.is_ok(), "input {s:02x?}");
            if let (Ok(a), Ok(b)) = (ours, theirs) {
                assert_eq!(a, b);
                accepted += 1;
            }
        }
        assert!(accepted > 1000, "too few valid inputs: {accepted}");
    }

    #[test]
    fn padding_and_eos_rules() {
        // '0' is 00000 (5 bits): three 1-bits of padding are valid.
        assert_eq!(huff(&[0x07]), b"0");
        // Padding of zeros is not a prefix of EOS.
        let mut v = Vec::new();
        assert_eq!(
            decode(&[0x00], &mut v),
            Err(HpackStringError::InvalidPadding)
        );
        // A whole octet of 1s after a symbol boundary: padding > 7 bits.
        assert_eq!(
            decode(&[0x07, 0xff], &mut v),
            Err(HpackStringError::InvalidPadding)
        );
        // EOS (30 ones) in the string.
        assert_eq!(
            decode(&[0xff, 0xff, 0xff, 0xfc], &mut v),
            Err(HpackStringError::EosInString)
        );
    }

    /// Blocks from `loona_hpack`'s encoder (plain strings) pass unchanged;
    /// the same blocks with every string Huffman-coded come back to them.
    #[test]
    fn encoder_blocks_round_trip() {
        let mut enc = loona_hpack::Encoder::new();
        let long = "v".repeat(300);
        let headers = pairs(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
            (":authority", "tmp%2Fmeshid%2Fagent.sock"),
            ("content-type", "application/grpc"),
            ("workload.spiffe.io", "true"),
            ("x-long", &long),
        ]);
        for _ in 0..2 {
            let block = enc.encode(headers.iter().map(|(n, v)| (&n[..], &v[..])));
            assert!(matches!(plain_strings(&block), Ok(Cow::Borrowed(_))));
            let coded = huffman_code_strings(&block);
            assert_ne!(coded, block);
            assert_eq!(&plain_strings(&coded).expect("valid")[..], &block[..]);
        }
    }

    /// Rewrites every plain string literal of `block` Huffman-coded (the
    /// inverse of `plain_strings`).
    fn huffman_code_strings(block: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < block.len() {
            let b = block[pos];
            let (literal, prefix) = match b {
                _ if b & 0x80 != 0 => (false, 7),
                _ if b & 0x40 != 0 => (true, 6),
                _ if b & 0x20 != 0 => (false, 5),
                _ => (true, 4),
            };
            let (index, n) = integer(&block[pos..], prefix).expect("integer");
            out.extend_from_slice(&block[pos..pos + n]);
            pos += n;
            if !literal {
                continue;
            }
            for _ in 0..if index == 0 { 2 } else { 1 } {
                let (len, n) = integer(&block[pos..], 7).expect("length");
                let mut coded = Vec::new();
                encode(&block[pos + n..pos + n + len], &mut coded);
                write_integer(coded.len(), 7, 0x80, &mut out);
                out.extend_from_slice(&coded);
                pos += n + len;
            }
        }
        out
    }

    #[test]
    fn truncated_blocks_are_errors() {
        // A literal whose string length runs past the end.
        assert_eq!(
            plain_strings(&[0x00, 0x85, 0xff]),
            Err(HpackStringError::StringTooLong)
        );
        // An integer that never ends.
        assert_eq!(
            plain_strings(&[0x3f, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Err(HpackStringError::Integer)
        );
        assert_eq!(plain_strings(&[0x40]), Err(HpackStringError::Integer));
        // Integers and their writer agree.
        for v in [0, 1, 126, 127, 128, 255, 16_384, 1 << 21] {
            let mut out = Vec::new();
            write_integer(v, 7, 0, &mut out);
            assert_eq!(integer(&out, 7), Ok((v, out.len())));
        }
    }
}
