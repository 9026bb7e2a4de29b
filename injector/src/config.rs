//! Injector configuration: one TOML file, unknown keys refused.
//!
//! ```toml
//! listen = "0.0.0.0:9443"
//! tls_cert = "/etc/meshid/injector-tls/tls.crt"   # reloaded when it changes
//! tls_key = "/etc/meshid/injector-tls/tls.key"
//! image = "meshid:dev"
//! image_pull_policy = "IfNotPresent"
//! socket_host_dir = "/run/meshid/agent"   # the agent DaemonSet's hostPath
//! socket_name = "api.sock"
//! admin_port = 9901                       # the sidecar's admin_address port (probes)
//! inject_by_default = false               # true: inject pods without the annotation
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use meshid_identity::config_file::ConfigError;

/// The injector's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectorConfig {
    /// HTTPS listen address.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// PEM certificate chain for the webhook's Service name.
    pub tls_cert: PathBuf,
    /// PEM private key.
    pub tls_key: PathBuf,
    /// The meshid image for the sidecar.
    #[serde(default = "default_image")]
    pub image: String,
    /// `Always`, `IfNotPresent` or `Never`.
    #[serde(default = "default_pull")]
    pub image_pull_policy: String,
    /// Host directory holding the agent's Workload API socket.
    #[serde(default = "default_socket_dir")]
    pub socket_host_dir: String,
    /// Socket file name in that directory.
    #[serde(default = "default_socket_name")]
    pub socket_name: String,
    /// Port of the sidecar's `/readyz` (its `admin_address`).
    #[serde(default = "default_admin_port")]
    pub admin_port: u16,
    /// Inject pods that carry no `meshid.io/inject` annotation.
    #[serde(default)]
    pub inject_by_default: bool,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9443))
}
fn default_image() -> String {
    "meshid:dev".into()
}
fn default_pull() -> String {
    "IfNotPresent".into()
}
fn default_socket_dir() -> String {
    "/run/meshid/agent".into()
}
fn default_socket_name() -> String {
    "api.sock".into()
}
fn default_admin_port() -> u16 {
    9901
}

impl InjectorConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        meshid_identity::config_file::load::<Self>(path)?.validated()
    }

    /// Parses and validates TOML text.
    #[cfg(test)]
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        meshid_identity::config_file::parse::<Self>(text)?.validated()
    }

    fn validated(self) -> Result<Self, ConfigError> {
        let c = self;
        if !["Always", "IfNotPresent", "Never"].contains(&c.image_pull_policy.as_str()) {
            return Err(ConfigError::Invalid(format!(
                "image_pull_policy {:?} must be Always, IfNotPresent or Never",
                c.image_pull_policy
            )));
        }
        if c.image.is_empty() {
            return Err(ConfigError::Invalid("image is empty".into()));
        }
        if !c.socket_host_dir.starts_with('/') {
            return Err(ConfigError::Invalid(
                "socket_host_dir must be an absolute path".into(),
            ));
        }
        if c.socket_name.is_empty() || c.socket_name.contains('/') {
            return Err(ConfigError::Invalid(
                "socket_name must be a file name".into(),
            ));
        }
        if c.admin_port == 0 {
            return Err(ConfigError::Invalid("admin_port must not be 0".into()));
        }
        Ok(c)
    }

    /// `unix:///…/api.sock` as the pod sees it (mounted at the same path).
    pub fn endpoint(&self) -> String {
        format!("unix://{}/{}", self.socket_host_dir, self.socket_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors() {
        let c = InjectorConfig::parse("tls_cert = \"/c\"\ntls_key = \"/k\"").expect("ok");
        assert_eq!(c.endpoint(), "unix:///run/meshid/agent/api.sock");
        assert_eq!(c.listen.port(), 9443);
        assert!(!c.inject_by_default);
        for (bad, needle) in [
            ("tls_cert = \"/c\"", "tls_key"),
            (
                "tls_cert = \"/c\"\ntls_key = \"/k\"\nimage_pul = \"x\"",
                "image_pul",
            ),
            (
                "tls_cert = \"/c\"\ntls_key = \"/k\"\nimage_pull_policy = \"Sometimes\"",
                "Sometimes",
            ),
            (
                "tls_cert = \"/c\"\ntls_key = \"/k\"\nsocket_host_dir = \"run\"",
                "absolute",
            ),
        ] {
            let e = InjectorConfig::parse(bad).expect_err(bad);
            assert!(e.to_string().contains(needle), "{bad}: {e}");
        }
    }
}
