//! Trust bundles as operators hand them to the server (PEM certificates or
//! SPIFFE bundle JSON), and PEM certificate lists as every component reads
//! them.
#![no_main]

use meshid_server::bundle_format::{parse, to_pem, to_spiffe_json};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = meshid_identity::pem::parse_certs(data);
    let _ = meshid_identity::pem::parse_key(data);
    let Ok(b) = parse("example.org", data) else {
        return;
    };
    // Every authority accepted is a whole X.509 certificate.
    for der in &b.x509_authorities {
        let (rest, _) = x509_parser::parse_x509_certificate(der).expect("authority parses");
        assert!(rest.is_empty());
    }
    // What was accepted prints in both formats and reads back exactly; the
    // JSON encoder refuses (never drops) an authority a JWK cannot carry.
    let Ok(v) = to_spiffe_json(&b) else {
        return;
    };
    let json = serde_json_bytes(&v);
    let again = parse("example.org", &json).expect("own JSON parses");
    assert_eq!(again.x509_authorities, b.x509_authorities);
    assert_eq!(again.jwt_authorities.len(), b.jwt_authorities.len());
    if !b.x509_authorities.is_empty() {
        let pem = to_pem(&b);
        let from_pem = parse("example.org", pem.as_bytes()).expect("own PEM parses");
        assert_eq!(from_pem.x509_authorities, b.x509_authorities);
    }
});

fn serde_json_bytes(v: &serde_json::Value) -> Vec<u8> {
    v.to_string().into_bytes()
}
