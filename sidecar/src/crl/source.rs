//! Where the CRL comes from (a file, or HTTP from the server) and reading it, bounded.

use std::path::PathBuf;

use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// Largest CRL accepted from a source.
pub const MAX_CRL_BYTES: usize = 16 * 1024 * 1024;

/// Where the CRL is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrlSource {
    /// `http://host:port/path` (the server's metrics listener serves `/crl`).
    /// Plain HTTP is enough: the CRL is signed and its signature verified.
    Http {
        /// `host:port`.
        authority: String,
        /// Path and query.
        path: String,
    },
    /// A file (DER or PEM), e.g. one kept current by another process.
    File(PathBuf),
}

impl std::fmt::Display for CrlSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Http { authority, path } => write!(f, "http://{authority}{path}"),
            Self::File(p) => write!(f, "{}", p.display()),
        }
    }
}

impl CrlSource {
    /// Parses `http://host:port/path`, `file:///abs` or `/abs`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("http://") {
            let (authority, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/crl"),
            };
            if authority.is_empty() || !authority.contains(':') {
                return Err(format!(
                    "crl_source {s:?}: give host and port, like http://meshid-server:9090/crl"
                ));
            }
            return Ok(Self::Http {
                authority: authority.to_string(),
                path: path.to_string(),
            });
        }
        let path = s.strip_prefix("file://").unwrap_or(s);
        if !path.starts_with('/') {
            return Err(format!(
                "crl_source {s:?}: an http:// URL or an absolute file path"
            ));
        }
        Ok(Self::File(PathBuf::from(path)))
    }
}

pub(super) async fn http_get(authority: &str, path: &str) -> Result<Vec<u8>, String> {
    use http_body_util::BodyExt as _;
    let tcp = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| format!("connect {authority}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("http: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, authority)
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("GET http://{authority}{path}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!(
            "GET http://{authority}{path}: HTTP {}",
            resp.status()
        ));
    }
    let body = http_body_util::Limited::new(resp.into_body(), MAX_CRL_BYTES)
        .collect()
        .await
        .map_err(|e| format!("GET http://{authority}{path}: {e}"))?;
    Ok(body.to_bytes().to_vec())
}
