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
    fn too_long_id_is_refused() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let long = "x".repeat(70_000);
        assert!(matches!(
            encode_v2(a, a, &long),
            Err(ProxyHeaderError::TooLong(_))
        ));
    }
}
