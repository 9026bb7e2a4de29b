//! Server configuration: one TOML file, unknown keys refused.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use meshid_identity::config_file::ConfigError;

mod attestors;
mod ca;
mod node_api;
mod store;
#[cfg(test)]
mod tests;
mod validate;

pub use attestors::{K8sPsatConfig, NodeAttestorConfig};
pub use ca::{CaRotationConfig, UpstreamConfig};
pub use node_api::NodeApiLimits;
pub use store::{DatabaseUrl, StoreConfig};

/// The server's configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The trust domain name, e.g. `example.org`.
    pub trust_domain: String,
    /// Directory for CA keys, the default SQLite database and the audit log.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Node API (agents) listen address.
    #[serde(default = "default_bind_address")]
    pub bind_address: SocketAddr,
    /// Admin API Unix socket; default `<data_dir>/admin.sock`.
    pub admin_socket: Option<PathBuf>,
    /// Prometheus metrics, `/healthz` and `/readyz`; off when unset.
    pub metrics_address: Option<SocketAddr>,
    /// X509-SVID TTL for entries that set none.
    #[serde(default = "default_svid_ttl", with = "humantime_serde")]
    pub default_svid_ttl: Duration,
    /// Upper bound for any SVID TTL.
    #[serde(default = "default_max_svid_ttl", with = "humantime_serde")]
    pub max_svid_ttl: Duration,
    /// JWT-SVID TTL for entries that set none.
    #[serde(default = "default_jwt_ttl", with = "humantime_serde")]
    pub default_jwt_svid_ttl: Duration,
    /// Agent SVID TTL.
    #[serde(default = "default_svid_ttl", with = "humantime_serde")]
    pub agent_svid_ttl: Duration,
    /// Lifetime of the server's signing CA.
    #[serde(default = "default_ca_ttl", with = "humantime_serde")]
    pub ca_ttl: Duration,
    /// Default join token TTL.
    #[serde(default = "default_join_token_ttl", with = "humantime_serde")]
    pub join_token_ttl: Duration,
    /// Audit log file (JSON lines); default `<data_dir>/audit.log`.
    pub audit_log: Option<PathBuf>,
    /// Largest number of SVIDs signed in one node API call.
    #[serde(default = "default_max_batch")]
    pub max_sign_batch: usize,
    /// How long the CA journal keeps the record of a certificate (and of
    /// its revocation) after the certificate expired; then it is pruned.
    #[serde(default = "default_journal_retention", with = "humantime_serde")]
    pub journal_retention: Duration,
    /// Storage backend.
    #[serde(default)]
    pub store: StoreConfig,
    /// Optional upstream CA.
    pub upstream: Option<UpstreamConfig>,
    /// CA and JWT key rotation.
    #[serde(default)]
    pub ca: CaRotationConfig,
    /// Node attestors besides join tokens, which are always on.
    #[serde(default)]
    pub node_attestor: NodeAttestorConfig,
    /// `[audit]`: rotation of the audit log and sealing of its hash chain.
    #[serde(default)]
    pub audit: crate::audit::AuditSettings,
    /// TLS key exchange on the node API: `hybrid-preferred` (default:
    /// X25519MLKEM768 first, classical groups still accepted),
    /// `hybrid-required` or `classical`.
    #[serde(default)]
    pub tls_key_exchange: meshid_identity::crypto::KeyExchange,
    /// `[node_api]`: connection, handshake, stream and message limits.
    #[serde(default)]
    pub node_api: NodeApiLimits,
    /// `[admin_certs]`: `meshid server x509 mint` policy and the CRL.
    #[serde(default)]
    pub admin_certs: crate::admin_certs::AdminCertsConfig,
    /// `[safe_ops]`: plans, approvals, blast-radius limits and undo.
    #[serde(default)]
    pub safe_ops: crate::safe_ops::SafeOpsConfig,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/meshid/server")
}
fn default_bind_address() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8081))
}
fn default_svid_ttl() -> Duration {
    Duration::from_secs(3600)
}
fn default_max_svid_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_jwt_ttl() -> Duration {
    Duration::from_secs(300)
}
fn default_ca_ttl() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_join_token_ttl() -> Duration {
    Duration::from_secs(600)
}
fn default_journal_retention() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_max_batch() -> usize {
    1000
}

impl ServerConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let cfg: Self = meshid_identity::config_file::load(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = meshid_identity::config_file::parse(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The admin socket path in effect.
    pub fn admin_socket_path(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("admin.sock"))
    }

    /// The audit log path in effect.
    pub fn audit_log_path(&self) -> PathBuf {
        self.audit_log
            .clone()
            .unwrap_or_else(|| self.data_dir.join("audit.log"))
    }

    /// The X.509 CA rotation schedule.
    pub fn x509_policy(&self) -> crate::ca::schedule::Policy {
        crate::ca::schedule::Policy {
            ttl: self.ca_ttl,
            prepare_at: self.ca.prepare_at,
            activate_by: self.ca.activate_by,
            publish_before_use: self.ca.publish_before_use.unwrap_or(self.max_svid_ttl),
            max_credential_ttl: self.max_svid_ttl,
            can_prepare: self.ca.automatic && self.upstream.as_ref().is_none_or(|u| u.has_key()),
        }
    }

    /// The JWT key rotation schedule.
    pub fn jwt_policy(&self) -> crate::ca::schedule::Policy {
        crate::ca::schedule::Policy {
            ttl: self.ca.jwt_key_ttl.unwrap_or(self.ca_ttl),
            can_prepare: self.ca.automatic,
            ..self.x509_policy()
        }
    }

    /// `spiffe://<trust_domain>`.
    pub fn trust_domain_id(&self) -> String {
        meshid_identity::spiffe_id::trust_domain_id(&self.trust_domain)
    }
}
