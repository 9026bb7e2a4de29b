//! `[node_api]`: limits of one node API listener.

use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// `[node_api]`: what one node API listener holds at most. A connection
/// past a limit is closed at accept (counted in
/// `meshid_server_node_tls_refused_total` with reason `connection_limit` or
/// `handshake_limit`); the connections already held are not affected.
///
/// ```toml
/// [node_api]
/// max_connections = 4096        # established and handshaking
/// max_pending_handshakes = 256  # still in the TLS handshake
/// handshake_timeout = "10s"
/// max_concurrent_streams = 64   # HTTP/2 streams per connection
/// max_message_size = 4194304    # bytes, one gRPC request message
/// ```
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct NodeApiLimits {
    /// Connections held at once, handshaking or established.
    pub max_connections: usize,
    /// Connections still in the TLS handshake at once.
    pub max_pending_handshakes: usize,
    /// A handshake not done by then is dropped.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// Largest gRPC request message, in bytes.
    pub max_message_size: usize,
}

impl Default for NodeApiLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_pending_handshakes: 256,
            handshake_timeout: Duration::from_secs(10),
            max_concurrent_streams: 64,
            max_message_size: 4 << 20,
        }
    }
}

impl NodeApiLimits {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(format!("node_api.{m}")));
        if self.max_connections == 0 || self.max_pending_handshakes == 0 {
            return bad("max_connections and max_pending_handshakes must be at least 1");
        }
        if self.max_pending_handshakes > self.max_connections {
            return bad("max_pending_handshakes must not exceed max_connections");
        }
        if self.handshake_timeout.is_zero() {
            return bad("handshake_timeout must be positive");
        }
        if self.max_concurrent_streams == 0 {
            return bad("max_concurrent_streams must be at least 1");
        }
        if self.max_message_size < 1024 {
            return bad("max_message_size must be at least 1024 bytes");
        }
        Ok(())
    }
}
