//! PROXY protocol v2 header carrying the TLS peer's address and SPIFFE ID.
//!
//! Layout (HAProxy spec, section 2.2): 12-byte signature, version/command
//! `0x21` (v2, PROXY), family `0x11` (TCP/IPv4) or `0x21` (TCP/IPv6), the
//! length of what follows, the addresses, then TLVs. The SPIFFE ID goes in a
//! TLV of type [`TLV_SPIFFE_ID`] (`0xE0`, the first type the spec reserves
//! for custom use), as UTF-8 bytes.

use std::net::{IpAddr, SocketAddr};

/// The v2 signature.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// TLV type carrying the peer's SPIFFE ID (`PP2_TYPE_MIN_CUSTOM`).
pub const TLV_SPIFFE_ID: u8 = 0xE0;

/// PROXY header errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyHeaderError {
    /// The TLV value does not fit a 16-bit length.
    #[error("TLV value of {0} bytes is too long")]
    TooLong(usize),
    /// Fewer bytes than the header announces (read more and try again).
    #[error("incomplete PROXY header: {have} of {need} bytes")]
    Incomplete {
        /// Bytes available.
        have: usize,
        /// Bytes needed so far.
        need: usize,
    },
    /// The first 12 bytes are not the v2 signature.
    #[error("not a PROXY protocol v2 header")]
    BadSignature,
    /// A version, command or address family this encoder never sends.
    #[error("unsupported PROXY header: {0}")]
    Unsupported(&'static str),
    /// The announced length does not hold the addresses, or a TLV is cut.
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
}

/// A v2 PROXY header as an application behind the sidecar reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHeader {
    /// The TLS peer's address.
    pub src: SocketAddr,
    /// The address the peer connected to.
    pub dst: SocketAddr,
    /// The SPIFFE ID TLV, if present.
    pub spiffe_id: Option<String>,
    /// Header length in bytes: application data starts here.
    pub len: usize,
}

/// Decodes the v2 PROXY header at the start of `buf` (the inverse of
/// [`encode_v2`]; also what an application written in Rust can use to read
/// it). Only `PROXY` over TCP/IPv4 or TCP/IPv6 is accepted; unknown TLVs are
/// skipped; a second SPIFFE ID TLV or one that is not UTF-8 is refused.
pub fn decode_v2(buf: &[u8]) -> Result<ProxyHeader, ProxyHeaderError> {
    use ProxyHeaderError::{BadSignature, Incomplete, Malformed, Unsupported};
    let fixed = buf.get(..16).ok_or(Incomplete {
        have: buf.len(),
        need: 16,
    })?;
    if fixed[..12] != SIGNATURE {
        return Err(BadSignature);
    }
    if fixed[12] != 0x21 {
        return Err(Unsupported("only version 2 with the PROXY command"));
    }
    let family = fixed[13];
    let body_len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    let len = 16 + body_len;
    let body = buf.get(16..len).ok_or(Incomplete {
        have: buf.len(),
        need: len,
    })?;
    let (src, dst, rest) = match family {
        0x11 => {
            let a = body
                .get(..12)
                .ok_or(Malformed("IPv4 addresses cut short"))?;
            let ip = |o: usize| IpAddr::from([a[o], a[o + 1], a[o + 2], a[o + 3]]);
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            (
                SocketAddr::new(ip(0), port(8)),
                SocketAddr::new(ip(4), port(10)),
                &body[12..],
            )
        }
        0x21 => {
            let a = body
                .get(..36)
                .ok_or(Malformed("IPv6 addresses cut short"))?;
            let ip = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&a[o..o + 16]);
                IpAddr::from(b)
            };
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            (
                SocketAddr::new(ip(0), port(32)),
                SocketAddr::new(ip(16), port(34)),
                &body[36..],
            )
        }
        _ => return Err(Unsupported("address family other than TCP over IPv4/IPv6")),
    };
    let mut spiffe_id = None;
    let mut tlvs = rest;
    while !tlvs.is_empty() {
        let head = tlvs.get(..3).ok_or(Malformed("TLV header cut short"))?;
        let vlen = usize::from(u16::from_be_bytes([head[1], head[2]]));
        let value = tlvs
            .get(3..3 + vlen)
            .ok_or(Malformed("TLV value cut short"))?;
        if head[0] == TLV_SPIFFE_ID {
            if spiffe_id.is_some() {
                return Err(Malformed("more than one SPIFFE ID TLV"));
            }
            let id = std::str::from_utf8(value).map_err(|_| Malformed("SPIFFE ID is not UTF-8"))?;
            spiffe_id = Some(id.to_string());
        }
        tlvs = &tlvs[3 + vlen..];
    }
    Ok(ProxyHeader {
        src,
        dst,
        spiffe_id,
        len,
    })
}

/// Encodes a v2 PROXY header for a TCP connection from `src` to `dst`
/// whose TLS peer proved `spiffe_id`.
pub fn encode_v2(
    src: SocketAddr,
    dst: SocketAddr,
    spiffe_id: &str,
) -> Result<Vec<u8>, ProxyHeaderError> {
    let id = spiffe_id.as_bytes();
    let id_len = u16::try_from(id.len()).map_err(|_| ProxyHeaderError::TooLong(id.len()))?;
    let mut addrs = Vec::with_capacity(36);
    let family = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            addrs.extend_from_slice(&s.octets());
            addrs.extend_from_slice(&d.octets());
            0x11
        }
        (s, d) => {
            addrs.extend_from_slice(&to_v6(s).octets());
            addrs.extend_from_slice(&to_v6(d).octets());
            0x21
        }
    };
    addrs.extend_from_slice(&src.port().to_be_bytes());
    addrs.extend_from_slice(&dst.port().to_be_bytes());
    let body_len = addrs.len() + 3 + id.len();
    let body_len_u16 = u16::try_from(body_len).map_err(|_| ProxyHeaderError::TooLong(id.len()))?;
    let mut out = Vec::with_capacity(16 + body_len);
    out.extend_from_slice(&SIGNATURE);
    out.push(0x21);
    out.push(family);
    out.extend_from_slice(&body_len_u16.to_be_bytes());
    out.extend_from_slice(&addrs);
    out.push(TLV_SPIFFE_ID);
    out.extend_from_slice(&id_len.to_be_bytes());
    out.extend_from_slice(id);
    Ok(out)
}

fn to_v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_layout() {
        let src: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let dst: SocketAddr = "10.0.0.2:8443".parse().unwrap();
        let h = encode_v2(src, dst, "spiffe://td/web").unwrap();
        assert_eq!(&h[..12], &SIGNATURE);
        assert_eq!(h[12], 0x21);
        assert_eq!(h[13], 0x11);
        let len = u16::from_be_bytes([h[14], h[15]]) as usize;
        assert_eq!(h.len(), 16 + len);
        assert_eq!(&h[16..20], &[10, 0, 0, 1]);
        assert_eq!(&h[20..24], &[10, 0, 0, 2]);
        assert_eq!(u16::from_be_bytes([h[24], h[25]]), 40000);
        assert_eq!(u16::from_be_bytes([h[26], h[27]]), 8443);
        assert_eq!(h[28], TLV_SPIFFE_ID);
        let tlv_len = u16::from_be_bytes([h[29], h[30]]) as usize;
        assert_eq!(&h[31..31 + tlv_len], b"spiffe://td/web");
        assert_eq!(31 + tlv_len, h.len());
    }

    #[test]
    fn mixed_families_use_ipv6() {
        let src: SocketAddr = "[2001:db8::1]:1".parse().unwrap();
        let dst: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let h = encode_v2(src, dst, "spiffe://td/x").unwrap();
        assert_eq!(h[13], 0x21);
        let len = u16::from_be_bytes([h[14], h[15]]) as usize;
        assert_eq!(len, 36 + 3 + "spiffe://td/x".len());
        assert_eq!(
            &h[32..48],
            &"::ffff:127.0.0.1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
    }

    #[test]
    fn decode_inverts_encode() {
        let src: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let dst: SocketAddr = "[2001:db8::2]:8443".parse().unwrap();
        let mut h = encode_v2(src, dst, "spiffe://td/web").unwrap();
        let n = h.len();
        h.extend_from_slice(b"app data");
        let d = decode_v2(&h).unwrap();
        assert_eq!(d.src, SocketAddr::new(IpAddr::V6(to_v6(src.ip())), 40000));
        assert_eq!(d.dst, dst);
        assert_eq!(d.spiffe_id.as_deref(), Some("spiffe://td/web"));
        assert_eq!(d.len, n);
        assert!(matches!(
            decode_v2(&h[..n - 1]),
            Err(ProxyHeaderError::Incomplete { .. })
        ));
        h[0] = b'x';
        assert_eq!(decode_v2(&h), Err(ProxyHeaderError::BadSignature));
    }

    #[test]
    fn too_long_id_is_refused() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let long = "x".repeat(70_000);
        assert!(matches!(
            encode_v2(a, a, &long),
            Err(ProxyHeaderError::TooLong(_))
        ));
    }
}
