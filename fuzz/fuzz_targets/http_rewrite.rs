//! The sidecar's HTTP identity-header rewrite: a request head as a peer
//! sends it (parsed as hyper parses it), sanitized, then given the proven ID.
//! Afterwards the application sees exactly one identity header, the proven
//! one, no look-alike, and nothing the request named in `Connection`.
#![no_main]

use http::header::{
    CONNECTION, CONTENT_LENGTH, HOST, HeaderMap, HeaderName, HeaderValue, TRAILER,
    TRANSFER_ENCODING,
};
use meshid_sidecar::inbound::{is_identity_lookalike, sanitize_request_headers};

const PROVEN: &str = "spiffe://example.org/proven";

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut raw = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut raw);
    if !matches!(req.parse(data), Ok(httparse::Status::Complete(_))) {
        return;
    }
    let mut headers = HeaderMap::new();
    for h in req.headers.iter() {
        let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return;
        };
        headers.append(n, v);
    }
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
        .filter(|n| *n != HOST && *n != CONTENT_LENGTH && *n != TRANSFER_ENCODING)
        .collect();
    sanitize_request_headers(&mut headers);
    headers.insert("x-spiffe-id", HeaderValue::from_static(PROVEN));

    let ids: Vec<&HeaderValue> = headers.get_all("x-spiffe-id").iter().collect();
    assert_eq!(ids, [&HeaderValue::from_static(PROVEN)]);
    for k in headers.keys() {
        assert!(
            k == "x-spiffe-id" || !is_identity_lookalike(k.as_str()),
            "look-alike {k} kept"
        );
        assert!(
            !named.contains(k) || k == "x-spiffe-id",
            "{k} named in Connection kept"
        );
    }
    assert!(!headers.contains_key(CONNECTION));
    for v in headers.get_all(TRAILER) {
        for t in v.as_bytes().split(|b| *b == b',') {
            assert!(
                !is_identity_lookalike(&String::from_utf8_lossy(t.trim_ascii())),
                "identity trailer kept"
            );
        }
    }
});
