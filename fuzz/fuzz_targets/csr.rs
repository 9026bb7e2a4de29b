//! The server's CSR path: parse and verify a PKCS#10 request, then sign an
//! X509-SVID over its key. Whatever the CSR says, an issued SVID carries the
//! entry's SPIFFE ID and nothing of the CSR but its key.
#![no_main]

use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use meshid_identity::svid::SvidInfo;
use meshid_server::ca::SigningCa;
use meshid_server::ca::x509svid::parse_csr;

const ID: &str = "spiffe://example.org/fuzz/workload";

static CA: LazyLock<SigningCa> = LazyLock::new(|| {
    SigningCa::ephemeral(
        "example.org",
        Duration::from_secs(10 * 365 * 86_400),
        SystemTime::now(),
    )
    .expect("ephemeral CA")
});

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(key) = parse_csr(data) else {
        return;
    };
    let svid = CA
        .sign_x509_svid_for_key(&key, ID, &[], Duration::from_secs(60), SystemTime::now())
        .expect("a verified CSR key is signable");
    let info = SvidInfo::from_der(&svid.chain[0]).expect("issued SVID parses");
    assert_eq!(info.spiffe_id.to_string(), ID);
    assert_eq!(svid.spiffe_id, ID);
});
