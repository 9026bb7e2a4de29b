//! Sidecar configuration: one TOML file, parsed and validated here.
//!
//! ```toml
//! workload_api_socket = "unix:///run/meshid/agent.sock" # default: $SPIFFE_ENDPOINT_SOCKET
//! admin_address = "127.0.0.1:9901"                      # /healthz /readyz /metrics
//! spiffe_id = "spiffe://example.org/web"                # which SVID to present (default: first)
//! allow_tls12 = false
//! tls_key_exchange = "hybrid-preferred" # or "hybrid-required", "classical"
//! handshake_timeout = "10s"       # deadline for a TLS handshake, in and out
//! connect_timeout = "5s"
//! max_inbound_connections = 10000 # open inbound connections, handshaking ones included
//! max_outbound_connections = 10000
//! max_pending_handshakes = 1024   # inbound connections still in their handshake
//! drain_timeout = "30s"
//!
//! [[inbound]]
//! listen = "0.0.0.0:8443"
//! forward_to = "127.0.0.1:8080"
//! allow = ["spiffe://example.org/ns/prod/*", "spiffe://partner.org"]
//! mode = "http"            # or "tcp"
//! proxy_protocol = false   # tcp mode: send a PROXY v2 header with the peer's SPIFFE ID
//! tunnel = "h2"            # tcp mode: also accept HTTP/2 CONNECT tunnels (ALPN h2)
//!
//! [[outbound]]
//! listen = "127.0.0.1:9000"
//! upstream = "db.internal:8443"
//! server_id = "spiffe://example.org/db"
//! sni = "db.internal"      # optional
//! tunnel = "h2"            # optional: one pooled HTTP/2 tunnel, a CONNECT stream per connection
//! ```

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use meshid_identity::{SpiffeId, spiffe_id};
use serde::Deserialize;

use crate::authz::{Policy, PolicyError};

/// Environment variable holding the default Workload API address.
pub const ENDPOINT_ENV: &str = "SPIFFE_ENDPOINT_SOCKET";

/// Configuration errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML does not parse or has unknown keys.
    #[error("invalid config: {0}")]
    Parse(#[from] toml::de::Error),
    /// A value is invalid.
    #[error("invalid config: {0}")]
    Invalid(String),
    /// An allow rule is invalid.
    #[error("invalid config: inbound {listen}: {source}")]
    Policy {
        /// The inbound listener.
        listen: SocketAddr,
        /// The rule error.
        source: PolicyError,
    },
}

/// What an inbound listener hands to the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Raw TCP after TLS; optionally a PROXY protocol v2 header first.
    #[default]
    Tcp,
    /// HTTP/1.1: each request gets `x-spiffe-id: <peer SPIFFE ID>`.
    Http,
}

/// A sidecar-to-sidecar tunnel protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tunnel {
    /// HTTP/2 CONNECT streams on one pooled mTLS connection (ALPN `h2`).
    H2,
}

/// An mTLS listener forwarding plaintext to a local application.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inbound {
    /// Address to accept TLS on.
    pub listen: SocketAddr,
    /// Plaintext address of the application (`host:port`).
    pub forward_to: String,
    /// Peers allowed in: exact IDs, `spiffe://td`, or `spiffe://td/prefix/*`.
    pub allow: Vec<String>,
    /// `tcp` (default) or `http`.
    #[serde(default)]
    pub mode: Mode,
    /// In tcp mode, send a PROXY protocol v2 header with the peer's address
    /// and SPIFFE ID before any data.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// `"h2"`: also accept HTTP/2 CONNECT tunnels from other sidecars (ALPN
    /// `h2`) on this port, each stream forwarded as its own connection
    /// (tcp mode only).
    #[serde(default)]
    pub tunnel: Option<Tunnel>,
}

/// A localhost plaintext listener that dials an mTLS upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outbound {
    /// Loopback address to accept plaintext on.
    pub listen: SocketAddr,
    /// Upstream `host:port` to dial.
    pub upstream: String,
    /// The SPIFFE ID the upstream must present.
    pub server_id: String,
    /// TLS server name to send; defaults to the upstream host.
    #[serde(default)]
    pub sni: Option<String>,
    /// `"h2"`: carry every connection as an HTTP/2 CONNECT stream on one
    /// pooled mTLS connection to the upstream (an inbound listener with
    /// `tunnel = "h2"`), instead of one TLS connection per connection.
    #[serde(default)]
    pub tunnel: Option<Tunnel>,
}

/// The whole sidecar configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Workload API address, `unix:///abs/path`; default `$SPIFFE_ENDPOINT_SOCKET`.
    #[serde(default)]
    pub workload_api_socket: Option<String>,
    /// Address for `/healthz`, `/readyz` and `/metrics`.
    #[serde(default)]
    pub admin_address: Option<SocketAddr>,
    /// Which SVID to present when the workload has several (default: first).
    #[serde(default)]
    pub spiffe_id: Option<String>,
    /// Allow TLS 1.2 besides 1.3.
    #[serde(default)]
    pub allow_tls12: bool,
    /// TLS key exchange, inbound and outbound: `hybrid-preferred` (default:
    /// X25519MLKEM768 first, classical groups still accepted),
    /// `hybrid-required` or `classical`.
    #[serde(default)]
    pub tls_key_exchange: meshid_identity::crypto::KeyExchange,
    /// Check presented certificates against the trust domain's CRL:
    /// `off` (default), `optional` or `required` (see [`crate::crl`]).
    #[serde(default)]
    pub crl: crate::crl::CrlMode,
    /// Where the CRL comes from: the server's `http://host:port/crl`, or a
    /// file path.
    #[serde(default)]
    pub crl_source: Option<String>,
    /// How often the CRL is fetched.
    #[serde(default = "crate::crl::default_refresh", with = "humantime_serde")]
    pub crl_refresh: Duration,
    /// Time allowed for a TLS handshake.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Time allowed to connect to `forward_to` or `upstream`.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Open inbound connections (all inbound listeners together, those
    /// still handshaking included); beyond it new ones are closed at accept.
    #[serde(default)]
    pub max_inbound_connections: Option<usize>,
    /// Open outbound connections (all outbound listeners together); beyond
    /// it new ones are closed at accept.
    #[serde(default)]
    pub max_outbound_connections: Option<usize>,
    /// Inbound connections accepted but still in their TLS handshake (each
    /// bounded by `handshake_timeout`); beyond it new ones are closed at
    /// accept, so idle or slow peers cannot hold the inbound budget.
    #[serde(default = "default_max_pending_handshakes")]
    pub max_pending_handshakes: usize,
    /// Deprecated: the default of both `max_inbound_connections` and
    /// `max_outbound_connections` (it used to be one budget for both).
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// On SIGTERM, how long to wait for open connections before exiting.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// mTLS listeners.
    #[serde(default)]
    pub inbound: Vec<Inbound>,
    /// Plaintext-to-mTLS listeners.
    #[serde(default)]
    pub outbound: Vec<Outbound>,
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
/// Default of `max_inbound_connections` and `max_outbound_connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
fn default_max_pending_handshakes() -> usize {
    1024
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}

/// Connection budgets, resolved from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `max_inbound_connections`.
    pub inbound: usize,
    /// `max_outbound_connections`.
    pub outbound: usize,
    /// `max_pending_handshakes`.
    pub pending_handshakes: usize,
}

/// A validated configuration with parsed policies.
#[derive(Debug, Clone)]
pub struct Validated {
    /// Connection budgets.
    pub limits: Limits,
    /// The raw configuration.
    pub config: Config,
    /// Workload API endpoint (`unix:///…`), resolved from the env if unset.
    pub endpoint: Option<String>,
    /// Wanted SVID.
    pub spiffe_id: Option<SpiffeId>,
    /// Inbound listeners, each with its parsed policy.
    pub inbound: Vec<InboundListener>,
    /// Outbound listeners, each with the upstream ID it requires.
    pub outbound: Vec<OutboundListener>,
}

/// An inbound listener's settings with its parsed `allow` policy.
#[derive(Debug, Clone)]
pub struct InboundListener {
    /// The settings as written.
    pub settings: Inbound,
    /// Who may connect.
    pub policy: Policy,
}

/// An outbound listener's settings with its parsed `server_id`.
#[derive(Debug, Clone)]
pub struct OutboundListener {
    /// The settings as written.
    pub settings: Outbound,
    /// The SPIFFE ID the upstream must present.
    pub server_id: SpiffeId,
}

impl Config {
    /// Reads and parses a file (does not validate).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses TOML (does not validate).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        Ok(toml::from_str(text)?)
    }

    /// Validates, with `env_endpoint` as the fallback Workload API address.
    pub fn validate(self, env_endpoint: Option<String>) -> Result<Validated, ConfigError> {
        let bad = |m: String| ConfigError::Invalid(m);
        if self.inbound.is_empty() && self.outbound.is_empty() {
            return Err(bad("no [[inbound]] or [[outbound]] listener".into()));
        }
        let default = self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        let limits = Limits {
            inbound: self.max_inbound_connections.unwrap_or(default),
            outbound: self.max_outbound_connections.unwrap_or(default),
            pending_handshakes: self.max_pending_handshakes,
        };
        for (key, v) in [
            ("max_connections", self.max_connections.unwrap_or(1)),
            ("max_inbound_connections", limits.inbound),
            ("max_outbound_connections", limits.outbound),
            ("max_pending_handshakes", limits.pending_handshakes),
        ] {
            if v == 0 {
                return Err(bad(format!("{key} must be at least 1")));
            }
        }
        crate::crl::settings(&self).map_err(bad)?;
        if self.handshake_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(bad("timeouts must be greater than zero".into()));
        }
        if self.allow_tls12
            && self.tls_key_exchange == meshid_identity::crypto::KeyExchange::HybridRequired
        {
            return Err(bad(
                "allow_tls12 = true contradicts tls_key_exchange = \"hybrid-required\": \
                 TLS 1.2 has no hybrid key exchange"
                    .into(),
            ));
        }
        let endpoint = self.workload_api_socket.clone().or(env_endpoint);
        if let Some(ep) = &endpoint {
            check_endpoint(ep).map_err(|m| bad(format!("workload_api_socket {ep:?}: {m}")))?;
        }
        let spiffe_id = self
            .spiffe_id
            .as_deref()
            .map(|s| spiffe_id::any_id(s).map_err(|e| bad(format!("spiffe_id {s:?}: {e}"))))
            .transpose()?;
        let mut listens = std::collections::HashSet::new();
        let mut inbound = Vec::new();
        for ib in &self.inbound {
            if ib.listen.port() != 0 && !listens.insert(ib.listen) {
                return Err(bad(format!("listen address {} used twice", ib.listen)));
            }
            if ib.tunnel.is_some() && ib.mode != Mode::Tcp {
                return Err(bad(format!(
                    "inbound {}: tunnel needs mode = \"tcp\"",
                    ib.listen
                )));
            }
            if ib.proxy_protocol && ib.mode != Mode::Tcp {
                return Err(bad(format!(
                    "inbound {}: proxy_protocol needs mode = \"tcp\"",
                    ib.listen
                )));
            }
            check_host_port(&ib.forward_to)
                .map_err(|m| bad(format!("inbound {}: forward_to: {m}", ib.listen)))?;
            let policy = Policy::parse(&ib.allow).map_err(|source| ConfigError::Policy {
                listen: ib.listen,
                source,
            })?;
            inbound.push(InboundListener {
                settings: ib.clone(),
                policy,
            });
        }
        let mut outbound = Vec::new();
        for ob in &self.outbound {
            if ob.listen.port() != 0 && !listens.insert(ob.listen) {
                return Err(bad(format!("listen address {} used twice", ob.listen)));
            }
            if !ob.listen.ip().is_loopback() {
                return Err(bad(format!(
                    "outbound {}: listen must be a loopback address (it accepts plaintext)",
                    ob.listen
                )));
            }
            check_host_port(&ob.upstream)
                .map_err(|m| bad(format!("outbound {}: upstream: {m}", ob.listen)))?;
            let id = spiffe_id::any_id(&ob.server_id)
                .map_err(|e| bad(format!("outbound {}: server_id: {e}", ob.listen)))?;
            if id.path().is_empty() {
                return Err(bad(format!(
                    "outbound {}: server_id must be a workload ID, not a trust domain",
                    ob.listen
                )));
            }
            if let Some(sni) = &ob.sni {
                rustls_pki_types::ServerName::try_from(sni.as_str())
                    .map_err(|e| bad(format!("outbound {}: sni {sni:?}: {e}", ob.listen)))?;
            }
            outbound.push(OutboundListener {
                settings: ob.clone(),
                server_id: id,
            });
        }
        Ok(Validated {
            limits,
            config: self,
            endpoint,
            spiffe_id,
            inbound,
            outbound,
        })
    }
}

fn check_endpoint(ep: &str) -> Result<(), String> {
    let path = ep
        .strip_prefix("unix://")
        .ok_or("must look like unix:///absolute/path")?;
    if !path.starts_with('/') || path.len() < 2 {
        return Err("the socket path must be absolute (unix:///path)".into());
    }
    Ok(())
}

/// Splits `host:port` (IPv6 as `[::1]:port`).
pub fn split_host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    Some((host, port))
}

fn check_host_port(s: &str) -> Result<(), String> {
    split_host_port(s)
        .map(|_| ())
        .ok_or_else(|| format!("{s:?} is not host:port"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
workload_api_socket = "unix:///run/agent.sock"
admin_address = "127.0.0.1:9901"
handshake_timeout = "3s"

[[inbound]]
listen = "0.0.0.0:8443"
forward_to = "127.0.0.1:8080"
allow = ["spiffe://td/ns/prod/*", "spiffe://partner.org"]
mode = "http"

[[inbound]]
listen = "0.0.0.0:8444"
forward_to = "localhost:5432"
allow = ["spiffe://td/db-client"]
proxy_protocol = true

[[outbound]]
listen = "127.0.0.1:9000"
upstream = "db.internal:8443"
server_id = "spiffe://td/db"
"#;

    #[test]
    fn parses_and_validates_good_config() {
        let v = Config::parse(GOOD).unwrap().validate(None).unwrap();
        assert_eq!(v.config.handshake_timeout, Duration::from_secs(3));
        assert_eq!(v.config.drain_timeout, Duration::from_secs(30));
        assert_eq!(v.config.inbound[0].mode, Mode::Http);
        assert_eq!(v.config.inbound[1].mode, Mode::Tcp);
        assert_eq!(v.inbound.len(), 2);
        assert_eq!(v.outbound[0].server_id.to_string(), "spiffe://td/db");
        assert_eq!(v.endpoint.as_deref(), Some("unix:///run/agent.sock"));
        assert!(!v.config.allow_tls12);
        assert_eq!(
            v.limits,
            Limits {
                inbound: DEFAULT_MAX_CONNECTIONS,
                outbound: DEFAULT_MAX_CONNECTIONS,
                pending_handshakes: 1024
            }
        );
    }

    #[test]
    fn connection_budgets_per_direction() {
        let with = |extra: &str| {
            Config::parse(&format!(
                "{extra}
{GOOD}"
            ))
            .unwrap()
            .validate(None)
        };
        let v = with(
            "max_inbound_connections = 10
max_outbound_connections = 20
max_pending_handshakes = 3",
        )
        .unwrap();
        assert_eq!(
            v.limits,
            Limits {
                inbound: 10,
                outbound: 20,
                pending_handshakes: 3
            }
        );
        // The old single key still works as the default of both.
        let v = with(
            "max_connections = 50
max_outbound_connections = 7",
        )
        .unwrap();
        assert_eq!((v.limits.inbound, v.limits.outbound), (50, 7));
        for zero in [
            "max_connections = 0",
            "max_inbound_connections = 0",
            "max_outbound_connections = 0",
            "max_pending_handshakes = 0",
        ] {
            let err = with(zero).unwrap_err().to_string();
            assert!(err.contains(zero.split(' ').next().unwrap()), "{err}");
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let top = format!("bogus = 1\n{GOOD}");
        assert!(matches!(Config::parse(&top), Err(ConfigError::Parse(_))));
        let nested = GOOD.replace("mode = \"http\"", "mode = \"http\"\nallowed = []");
        let err = Config::parse(&nested).unwrap_err().to_string();
        assert!(err.contains("allowed"), "{err}");
    }

    #[test]
    fn endpoint_falls_back_to_env_and_must_be_unix_abs() {
        let no_sock = GOOD.replace("workload_api_socket = \"unix:///run/agent.sock\"\n", "");
        let v = Config::parse(&no_sock)
            .unwrap()
            .validate(Some("unix:///tmp/a.sock".into()))
            .unwrap();
        assert_eq!(v.endpoint.as_deref(), Some("unix:///tmp/a.sock"));
        for bad in ["/run/a.sock", "unix://run/a.sock", "tcp://1.2.3.4:1"] {
            let c = Config::parse(&no_sock).unwrap();
            assert!(c.validate(Some(bad.into())).is_err(), "{bad}");
        }
    }

    #[test]
    fn refuses_invalid_values() {
        let cases = [
            GOOD.replace("127.0.0.1:9000", "0.0.0.0:9000"),
            GOOD.replace("spiffe://td/db\"", "spiffe://td\""),
            GOOD.replace("\"spiffe://td/db-client\"", ""),
            GOOD.replace("spiffe://td/db-client", "spiffe://td/*"),
            GOOD.replace("mode = \"http\"", "mode = \"http\"\nproxy_protocol = true"),
            GOOD.replace("localhost:5432", "localhost"),
            GOOD.replace("0.0.0.0:8444", "0.0.0.0:8443"),
        ];
        for c in cases {
            assert!(
                Config::parse(&c).unwrap().validate(None).is_err(),
                "should refuse:\n{c}"
            );
        }
    }

    #[test]
    fn host_port_split() {
        assert_eq!(split_host_port("a.b:80"), Some(("a.b", 80)));
        assert_eq!(split_host_port("[::1]:80"), Some(("::1", 80)));
        assert_eq!(split_host_port(":80"), None);
        assert_eq!(split_host_port("a"), None);
    }
}
