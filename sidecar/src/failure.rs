//! How a failed connection is described, labelled and recognised: the
//! operator's message, the metric label, the log-limiter kind, and whether
//! the bytes were plaintext HTTP sent to a TLS port.

/// The operator-facing message for a handshake error.
pub fn describe_io(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(err) => meshid_identity::verify::describe(err),
        None => e.to_string(),
    }
}

/// A finer, bounded kind of a handshake failure, for log rate limiting: a
/// burst of one kind of bad input does not hide a different one.
pub fn failure_detail(e: &std::io::Error) -> &'static str {
    use rustls::{Error as E, InvalidMessage as M};
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(E::InvalidMessage(M::InvalidContentType)) => "not_tls",
        Some(E::InvalidMessage(_)) => "malformed",
        Some(E::PeerIncompatible(_)) => "incompatible",
        Some(E::PeerMisbehaved(_)) => "misbehaved",
        Some(E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. }) => {
            "unexpected_message"
        }
        Some(E::AlertReceived(_)) => "alert",
        Some(E::InvalidCertificate(_) | E::NoCertificatesPresented) => "certificate",
        Some(_) => "other",
        None => "io",
    }
}

/// Whether the first bytes of a connection look like a plaintext HTTP
/// request (an HTTP/1 method or the HTTP/2 preface) rather than TLS.
pub fn looks_like_http(first: &[u8]) -> bool {
    const METHODS: &[&[u8]] = &[
        b"GET ",
        b"POST ",
        b"PUT ",
        b"HEAD ",
        b"DELETE ",
        b"OPTIONS ",
        b"PATCH ",
        b"CONNECT ",
        b"TRACE ",
        b"PRI ",
    ];
    METHODS.iter().any(|m| {
        let n = first.len().min(m.len());
        n >= 4 && first[..n] == m[..n]
    })
}

/// Metric label for a handshake error.
pub fn classify_io(e: &std::io::Error) -> &'static str {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(
            err @ (rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::PeerIncompatible(rustls::PeerIncompatible::NoKxGroupsInCommon)
            | rustls::Error::AlertReceived(_)),
        ) => meshid_identity::verify::classify(err),
        Some(_) => "tls",
        None if e.kind() == std::io::ErrorKind::InvalidData => "tls",
        None => "io",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_http_is_recognised() {
        for yes in [
            &b"GET / HT"[..],
            b"POST /x",
            b"OPTIONS ",
            b"PRI * HT",
            b"DELE",
        ] {
            assert!(looks_like_http(yes), "{yes:?}");
        }
        for no in [
            &b"\x16\x03\x01\x02\x00"[..],
            b"GE",
            b"GETX",
            b"",
            b"\0\0\0\0\0",
        ] {
            assert!(!looks_like_http(no), "{no:?}");
        }
    }
}
