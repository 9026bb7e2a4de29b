//! PROXY protocol v2 as the sidecar writes it to applications: any bytes
//! decode to a header or a typed error; anything encoded decodes to itself.
#![no_main]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use meshid_sidecar::proxy_protocol::{decode_v2, encode_v2};

fn v6(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
        v6 => v6,
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(h) = decode_v2(data) {
        assert!(h.len <= data.len());
    }
    // Round trip: the first bytes choose the addresses, the rest is the ID.
    if data.len() < 37 {
        return;
    }
    let mut a = [0u8; 16];
    a.copy_from_slice(&data[..16]);
    let mut b = [0u8; 16];
    b.copy_from_slice(&data[16..32]);
    let (mut src_ip, mut dst_ip) = (
        IpAddr::from(Ipv6Addr::from(a)),
        IpAddr::from(Ipv6Addr::from(b)),
    );
    if data[36] & 1 == 0 {
        src_ip = IpAddr::from([a[0], a[1], a[2], a[3]]);
    }
    if data[36] & 2 == 0 {
        dst_ip = IpAddr::from([b[0], b[1], b[2], b[3]]);
    }
    let src = SocketAddr::new(src_ip, u16::from_be_bytes([data[32], data[33]]));
    let dst = SocketAddr::new(dst_ip, u16::from_be_bytes([data[34], data[35]]));
    let id = String::from_utf8_lossy(&data[37..]);
    let Ok(enc) = encode_v2(src, dst, &id) else {
        return;
    };
    let dec = decode_v2(&enc).expect("own header decodes");
    assert_eq!(dec.len, enc.len());
    assert_eq!(dec.spiffe_id.as_deref(), Some(&*id));
    if src.is_ipv4() && dst.is_ipv4() {
        assert_eq!((dec.src, dec.dst), (src, dst));
    } else {
        assert_eq!(dec.src, SocketAddr::new(v6(src.ip()), src.port()));
        assert_eq!(dec.dst, SocketAddr::new(v6(dst.ip()), dst.port()));
    }
});
