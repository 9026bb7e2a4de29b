//! Agent configuration: one TOML file, unknown keys refused.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use meshid_identity::config_file::ConfigError;

/// One server address or several (tried in order).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum ServerAddresses {
    /// `"host:port"`.
    One(String),
    /// `["host:port", ...]`.
    Many(Vec<String>),
}

impl ServerAddresses {
    /// As a list.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Self::One(a) => vec![a.clone()],
            Self::Many(v) => v.clone(),
        }
    }
}

/// `[node_attestor]`: how the agent proves which node it runs on.
///
/// ```toml
/// [node_attestor]
/// kind = "k8s_psat"
/// cluster = "demo"
/// token_path = "/var/run/secrets/tokens/meshid-agent"
/// ```
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum NodeAttestorConfig {
    /// A single-use join token from `meshid server token create`, passed
    /// with `--join-token`, `MESHID_JOIN_TOKEN` or the `join_token` key.
    #[default]
    JoinToken,
    /// The service-account token Kubernetes projects into the agent's pod,
    /// reviewed by the API server on the server's side. Re-attestation needs
    /// no operator: an agent whose SVID is lost or expired presents it again.
    K8sPsat {
        /// The cluster's name, as in the server's `[node_attestor.k8s_psat]`.
        cluster: String,
        /// The projected token (audience `meshid-server`); re-read on each use.
        #[serde(default = "default_psat_token")]
        token_path: PathBuf,
    },
}

fn default_psat_token() -> PathBuf {
    PathBuf::from("/var/run/secrets/tokens/meshid-agent")
}

/// The agent's configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Trust domain name, e.g. `example.org`.
    pub trust_domain: String,
    /// The server's node API, `host:port` (or a list).
    pub server_address: ServerAddresses,
    /// PEM roots trusted for the first connection (`meshid server bundle show`).
    pub trust_bundle_path: Option<PathBuf>,
    /// Join token for the first attestation.
    pub join_token: Option<String>,
    /// How the agent proves its node: a join token (default) or Kubernetes PSAT.
    #[serde(default)]
    pub node_attestor: NodeAttestorConfig,
    /// Workload attestors besides `unix`: `[workload_attestor.k8s]`.
    #[serde(default)]
    pub workload_attestor: crate::k8s_attestor::WorkloadAttestorConfig,
    /// Agent SVID, key (0600) and bundle are kept here.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The Workload API socket.
    #[serde(default = "default_socket")]
    pub socket_path: PathBuf,
    /// Metrics, `/healthz`, `/readyz`; off when unset.
    pub metrics_address: Option<SocketAddr>,
    /// Fraction of an SVID's lifetime after which it is renewed.
    #[serde(default = "default_rotation")]
    pub rotation_fraction: f64,
    /// Most CSRs per signing call.
    #[serde(default = "default_batch")]
    pub sign_batch_size: usize,
    /// Longest wait between reconnection attempts.
    #[serde(default = "default_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// TLS key exchange to the server: `hybrid-preferred` (default),
    /// `hybrid-required` or `classical`.
    #[serde(default)]
    pub tls_key_exchange: meshid_identity::crypto::KeyExchange,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/meshid/agent")
}
fn default_socket() -> PathBuf {
    PathBuf::from("/run/meshid/agent/api.sock")
}
fn default_rotation() -> f64 {
    0.75
}
fn default_batch() -> usize {
    100
}
fn default_backoff() -> Duration {
    Duration::from_secs(30)
}

impl AgentConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let cfg: Self = meshid_identity::config_file::load(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses and validates TOML text (errors name the file as `<inline>`).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = meshid_identity::config_file::parse(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        meshid_identity::spiffe_id::trust_domain(&self.trust_domain)
            .map_err(|e| ConfigError::Invalid(format!("trust_domain: {e}")))?;
        if self.server_address.to_vec().is_empty() {
            return Err(ConfigError::Invalid("server_address is empty".into()));
        }
        if !(0.1..=0.95).contains(&self.rotation_fraction) {
            return Err(ConfigError::Invalid(
                "rotation_fraction must be within 0.1..=0.95".into(),
            ));
        }
        if self.sign_batch_size == 0 {
            return Err(ConfigError::Invalid("sign_batch_size must be > 0".into()));
        }
        if let NodeAttestorConfig::K8sPsat { cluster, .. } = &self.node_attestor
            && cluster.is_empty()
        {
            return Err(ConfigError::Invalid(
                "node_attestor.cluster must name the Kubernetes cluster".into(),
            ));
        }
        if let Some(k) = &self.workload_attestor.k8s {
            k.validate().map_err(ConfigError::Invalid)?;
        }
        if !self.socket_path.is_absolute() {
            return Err(ConfigError::Invalid("socket_path must be absolute".into()));
        }
        Ok(())
    }

    /// `spiffe://<td>`.
    pub fn td_id(&self) -> String {
        meshid_identity::spiffe_id::trust_domain_id(&self.trust_domain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<AgentConfig, ConfigError> {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("a.toml");
        std::fs::write(&p, s).expect("write");
        AgentConfig::load(&p)
    }

    #[test]
    fn node_attestor_kinds() {
        let base = "trust_domain = \"td\"\nserver_address = \"x:1\"\n";
        let c = parse(base).expect("default");
        assert_eq!(c.node_attestor, NodeAttestorConfig::JoinToken);
        let c = parse(&format!(
            "{base}[node_attestor]\nkind = \"k8s_psat\"\ncluster = \"demo\"\n"
        ))
        .expect("psat");
        assert_eq!(
            c.node_attestor,
            NodeAttestorConfig::K8sPsat {
                cluster: "demo".into(),
                token_path: default_psat_token(),
            }
        );
        for bad in [
            "[node_attestor]\nkind = \"k8s_psat\"\n",
            "[node_attestor]\nkind = \"k8s_psat\"\ncluster = \"\"\n",
            "[node_attestor]\nkind = \"tpm\"\n",
            "[node_attestor]\nkind = \"k8s_psat\"\ncluster = \"d\"\naudience = \"x\"\n",
        ] {
            assert!(parse(&format!("{base}{bad}")).is_err(), "{bad}");
        }
    }

    #[test]
    fn minimal_and_unknown_key() {
        let c = parse("trust_domain = \"td\"\nserver_address = \"127.0.0.1:8081\"").expect("ok");
        assert_eq!(c.server_address.to_vec(), vec!["127.0.0.1:8081"]);
        let e = parse("trust_domain = \"td\"\nserver_address = \"x:1\"\nsocket = \"/x\"")
            .expect_err("unknown");
        assert!(e.to_string().contains("socket"), "{e}");
        let c = parse("trust_domain = \"td\"\nserver_address = [\"a:1\", \"b:2\"]").expect("list");
        assert_eq!(c.server_address.to_vec().len(), 2);
    }
}
