//! `[node_attestor]`: the node attestors besides join tokens.

use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;

/// `[node_attestor]`: how agents may prove which node they run on.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeAttestorConfig {
    /// `[node_attestor.k8s_psat]`: Kubernetes projected service-account tokens.
    pub k8s_psat: Option<K8sPsatConfig>,
}

/// `[node_attestor.k8s_psat]`: agents in one Kubernetes cluster attest with the
/// service-account token projected into their pod, reviewed by the API server.
///
/// ```toml
/// [node_attestor.k8s_psat]
/// cluster = "demo"
/// service_accounts = ["meshid-system:meshid-agent"]
/// # audience = "meshid-server"
/// # api_server = "https://kubernetes.default.svc"   # default: in-cluster
/// # alias_id = "spiffe://example.org/meshid/k8s/demo" # default shown
/// ```
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct K8sPsatConfig {
    /// The cluster's name; agents send the same name, and it is part of their IDs.
    pub cluster: String,
    /// `namespace:serviceaccount` pairs whose tokens may attest agents.
    pub service_accounts: Vec<String>,
    /// The audience the agent's projected token must be issued for.
    #[serde(default = "default_psat_audience")]
    pub audience: String,
    /// Most TokenReview calls in flight at once; further attestations are
    /// answered `Unavailable` (agents retry with backoff).
    #[serde(default = "default_max_concurrent_reviews")]
    pub max_concurrent_reviews: usize,
    /// API server URL; default from `KUBERNETES_SERVICE_HOST`/`_PORT` in a pod.
    pub api_server: Option<String>,
    /// CA certificates (PEM) of the API server.
    #[serde(default = "default_kube_ca")]
    pub ca_path: PathBuf,
    /// The server's own token for the TokenReview call (re-read on each call).
    #[serde(default = "default_kube_token")]
    pub token_path: PathBuf,
    /// The alias every agent of this cluster holds, to parent entries by;
    /// default `spiffe://<td>/meshid/k8s/<cluster>`.
    pub alias_id: Option<String>,
}

fn default_max_concurrent_reviews() -> usize {
    8
}
fn default_psat_audience() -> String {
    "meshid-server".into()
}
fn default_kube_ca() -> PathBuf {
    PathBuf::from(meshid_identity::kube::IN_CLUSTER_CA)
}
fn default_kube_token() -> PathBuf {
    PathBuf::from(meshid_identity::kube::IN_CLUSTER_TOKEN)
}

impl K8sPsatConfig {
    pub(super) fn validate(&self, trust_domain: &str) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(format!("node_attestor.k8s_psat: {m}")));
        if self.cluster.is_empty()
            || !self
                .cluster
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return bad(format!(
                "cluster {:?} must be non-empty letters, digits, '-', '_' or '.'",
                self.cluster
            ));
        }
        if self.service_accounts.is_empty() {
            return bad("service_accounts is empty: no agent could attest".into());
        }
        for sa in &self.service_accounts {
            match sa.split_once(':') {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains(':') => {}
                _ => return bad(format!("service account {sa:?} is not namespace:name")),
            }
        }
        if self.audience.is_empty() {
            return bad("audience is empty".into());
        }
        if self.max_concurrent_reviews == 0 {
            return bad("max_concurrent_reviews must be at least 1".into());
        }
        if let Some(url) = &self.api_server
            && !url.starts_with("https://")
        {
            return bad(format!("api_server {url:?} must be an https:// URL"));
        }
        if let Some(alias) = &self.alias_id
            && !alias.starts_with(&meshid_identity::spiffe_id::trust_domain_prefix(
                trust_domain,
            ))
        {
            return bad(format!(
                "alias_id {alias:?} is not in trust domain {trust_domain}"
            ));
        }
        Ok(())
    }
}
