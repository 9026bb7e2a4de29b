//! Kubernetes node attestation with projected service-account tokens (PSAT).
//!
//! The agent runs as a DaemonSet pod and sends the token the kubelet projects
//! into it (audience `meshid-server` by default). The server does not trust
//! anything in the token itself: it asks the cluster's API server to review it
//! (TokenReview), then checks that the token was issued for our audience, to
//! an allowed service account, for a pod that is bound to a node. The agent
//! gets `spiffe://<td>/meshid/agent/k8s_psat/<cluster>/<node>` and the
//! cluster alias (`spiffe://<td>/meshid/k8s/<cluster>` unless configured), so
//! one registration entry parented by the alias serves every node.
//!
//! Unlike a join token, a PSAT can be presented again: an agent whose data is
//! lost re-attests as the same node, and its previous SVID stops working.
//! A banned node stays banned; `agent evict` lets it attest afresh.

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;

use crate::config::K8sPsatConfig;
use meshid_identity::kube::{self as kube_api, KubeApi, KubeError};

/// Attestor name on the wire.
pub const ATTESTOR: &str = "k8s_psat";

/// TokenReview `extra` key with the node the pod is bound to (Kubernetes ≥ 1.30).
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// TokenReview `extra` key with the pod's name.
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// TokenReview `extra` key with the pod's UID.
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// What the agent sends: its cluster's name and its projected token.
#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    /// The cluster name, as in both configs.
    pub cluster: String,
    /// The projected service-account token.
    pub token: String,
}

/// Why a PSAT was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PsatError {
    /// The payload is not `{"cluster": …, "token": …}`.
    #[error("k8s_psat payload must be JSON {{\"cluster\", \"token\"}}: {0}")]
    BadPayload(String),
    /// The agent is configured for another cluster.
    #[error("k8s_psat: agent is in cluster {got:?}, this server attests cluster {want:?}")]
    WrongCluster {
        /// The agent's cluster.
        got: String,
        /// Ours.
        want: String,
    },
    /// The API server rejected the token.
    #[error("k8s_psat: the API server did not authenticate the token: {0}")]
    NotAuthenticated(String),
    /// The token was not issued for our audience.
    #[error("k8s_psat: token audiences {got:?} do not include {want:?}")]
    WrongAudience {
        /// Audiences of the token.
        got: Vec<String>,
        /// Ours.
        want: String,
    },
    /// The token belongs to a service account not on the list.
    #[error("k8s_psat: service account {0:?} is not allowed to attest (service_accounts)")]
    ServiceAccountNotAllowed(String),
    /// The token is not bound to a pod on a node.
    #[error("k8s_psat: cannot tell the node: {0}")]
    NoNode(String),
    /// The agent's data is not usable in a SPIFFE ID.
    #[error("k8s_psat: node name {0:?} is not a valid Kubernetes node name")]
    BadNodeName(String),
    /// The API server is unreachable or failed. The caller is told only
    /// that; the details (which may hold the API server's answer) are logged.
    #[error(transparent)]
    Api(#[from] KubeError),
    /// Too many TokenReviews are in flight (`max_concurrent_reviews`).
    #[error(
        "k8s_psat: {0} token reviews are already in flight (max_concurrent_reviews); retry later"
    )]
    Busy(usize),
}

impl PsatError {
    /// Metric label.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::BadPayload(_) => "bad_request",
            Self::WrongCluster { .. } => "wrong_cluster",
            Self::NotAuthenticated(_) | Self::WrongAudience { .. } => "invalid_token",
            Self::ServiceAccountNotAllowed(_) => "not_allowed",
            Self::NoNode(_) | Self::BadNodeName(_) => "no_node",
            Self::Api(_) => "api_error",
            Self::Busy(_) => "busy",
        }
    }

    /// The message for the caller: for API failures a fixed text, never the
    /// API server's answer.
    pub fn public_message(&self) -> String {
        match self {
            Self::Api(KubeError::Unavailable { .. }) => {
                "k8s_psat: the Kubernetes API server is unavailable; retry later".into()
            }
            Self::Api(_) => {
                "k8s_psat: the Kubernetes API server could not review the token (details in the server log)"
                    .into()
            }
            Self::NotAuthenticated(m) => format!(
                "k8s_psat: the API server did not authenticate the token: {}",
                crate::audit::truncate(m, 200)
            ),
            other => crate::audit::truncate(&other.to_string(), 512).into_owned(),
        }
    }
}

/// A node the API server vouched for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestedNode {
    /// The agent's SPIFFE ID.
    pub agent_id: String,
    /// The cluster alias.
    pub alias_id: String,
    /// Node name.
    pub node_name: String,
    /// `namespace:serviceaccount` of the agent.
    pub service_account: String,
    /// The agent pod's UID.
    pub pod_uid: String,
}

/// The configured PSAT attestor for one cluster.
#[derive(Debug)]
pub struct PsatAttestor {
    cluster: String,
    audience: String,
    allowed: HashSet<String>,
    alias_id: String,
    td_id: String,
    api: KubeApi,
    /// Bounds TokenReview (and pod) calls in flight: attestation is
    /// unauthenticated, so nothing else limits how many a caller starts.
    reviews: tokio::sync::Semaphore,
    max_reviews: usize,
}

/// The cluster alias every agent of `cluster` holds unless configured.
pub fn default_alias(td_id: &str, cluster: &str) -> String {
    meshid_identity::spiffe_id::reserved_id(td_id, &["k8s", cluster])
}

/// The agent SPIFFE ID for a node.
pub fn agent_id(td_id: &str, cluster: &str, node: &str) -> String {
    meshid_identity::spiffe_id::agent_id(td_id, ATTESTOR, &[cluster, node])
}

impl PsatAttestor {
    /// Builds the attestor; the API server URL defaults to the in-cluster one.
    pub fn new(cfg: &K8sPsatConfig, td_id: &str) -> Result<Self, KubeError> {
        let url = match &cfg.api_server {
            Some(u) => u.clone(),
            None => kube_api::in_cluster_url().ok_or_else(|| {
                KubeError::Config(
                    "node_attestor.k8s_psat: api_server is unset and KUBERNETES_SERVICE_HOST is \
                     not in the environment (not running in a pod)"
                        .into(),
                )
            })?,
        };
        let api = KubeApi::new(&url, &cfg.ca_path, &cfg.token_path)?;
        Ok(Self {
            cluster: cfg.cluster.clone(),
            audience: cfg.audience.clone(),
            allowed: cfg.service_accounts.iter().cloned().collect(),
            alias_id: cfg
                .alias_id
                .clone()
                .unwrap_or_else(|| default_alias(td_id, &cfg.cluster)),
            td_id: td_id.to_string(),
            api,
            reviews: tokio::sync::Semaphore::new(cfg.max_concurrent_reviews),
            max_reviews: cfg.max_concurrent_reviews,
        })
    }

    /// Reviews the agent's token with the API server. At most
    /// `max_concurrent_reviews` reviews run at once; beyond that the answer
    /// is [`PsatError::Busy`]. API failures are logged here in full (cut to
    /// a bounded length), and reach the caller only as a fixed message.
    pub async fn attest(&self, payload: &[u8]) -> Result<AttestedNode, PsatError> {
        let p: Payload =
            serde_json::from_slice(payload).map_err(|e| PsatError::BadPayload(e.to_string()))?;
        if p.cluster != self.cluster {
            return Err(PsatError::WrongCluster {
                got: p.cluster,
                want: self.cluster.clone(),
            });
        }
        let Ok(_permit) = self.reviews.try_acquire() else {
            return Err(PsatError::Busy(self.max_reviews));
        };
        let r = self.review(p).await;
        if let Err(PsatError::Api(e)) = &r {
            tracing::warn!(error = %crate::audit::truncate(&e.to_string(), 1024), "k8s_psat: Kubernetes API call failed");
        }
        r
    }

    async fn review(&self, p: Payload) -> Result<AttestedNode, PsatError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: p.token,
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let review: TokenReview = self
            .api
            .post("/apis/authentication.k8s.io/v1/tokenreviews", &review)
            .await?;
        let status = review.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(PsatError::NotAuthenticated(
                status
                    .error
                    .unwrap_or_else(|| "authenticated: false".into()),
            ));
        }
        let audiences = status.audiences.unwrap_or_default();
        if !audiences.contains(&self.audience) {
            return Err(PsatError::WrongAudience {
                got: audiences,
                want: self.audience.clone(),
            });
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let service_account = username
            .strip_prefix("system:serviceaccount:")
            .unwrap_or_default()
            .to_string();
        if service_account.is_empty() || !self.allowed.contains(&service_account) {
            return Err(PsatError::ServiceAccountNotAllowed(username));
        }
        let extra = user.extra.unwrap_or_default();
        let pod_uid = first(&extra, EXTRA_POD_UID)
            .ok_or_else(|| PsatError::NoNode("the token is not bound to a pod".into()))?;
        let node_name = match first(&extra, EXTRA_NODE_NAME) {
            Some(n) => n,
            None => self.node_of_pod(&service_account, &extra, &pod_uid).await?,
        };
        if !is_node_name(&node_name) {
            return Err(PsatError::BadNodeName(node_name));
        }
        Ok(AttestedNode {
            agent_id: agent_id(&self.td_id, &self.cluster, &node_name),
            alias_id: self.alias_id.clone(),
            node_name,
            service_account,
            pod_uid,
        })
    }

    /// Before Kubernetes 1.30 the review names the pod but not its node: ask
    /// for the pod, and check it is the very pod the token was bound to.
    async fn node_of_pod(
        &self,
        service_account: &str,
        extra: &BTreeMap<String, Vec<String>>,
        pod_uid: &str,
    ) -> Result<String, PsatError> {
        let namespace = service_account.split(':').next().unwrap_or_default();
        let pod_name = first(extra, EXTRA_POD_NAME)
            .ok_or_else(|| PsatError::NoNode("the token names no pod".into()))?;
        let pod: Pod = self
            .api
            .get(&format!("/api/v1/namespaces/{namespace}/pods/{pod_name}"))
            .await?;
        if pod.metadata.uid.as_deref() != Some(pod_uid) {
            return Err(PsatError::NoNode(format!(
                "pod {namespace}/{pod_name} is no longer the pod the token was issued to"
            )));
        }
        pod.spec
            .and_then(|s| s.node_name)
            .ok_or_else(|| PsatError::NoNode(format!("pod {namespace}/{pod_name} has no node")))
    }
}

fn first(extra: &BTreeMap<String, Vec<String>>, key: &str) -> Option<String> {
    extra
        .get(key)
        .and_then(|v| v.first())
        .filter(|s| !s.is_empty())
        .cloned()
}

/// A DNS-1123 subdomain, as Kubernetes requires of node names.
fn is_node_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        assert!(is_node_name("ip-10-0-0-1.ec2.internal"));
        assert!(!is_node_name("../etc"));
        assert!(!is_node_name("Node"));
        assert!(!is_node_name(""));
        assert!(!is_node_name("a/b"));
    }

    #[test]
    fn payload_is_strict() {
        let ok: Payload = serde_json::from_str(r#"{"cluster":"c","token":"t"}"#).expect("ok");
        assert_eq!(ok.cluster, "c");
        assert!(serde_json::from_str::<Payload>(r#"{"cluster":"c"}"#).is_err());
        assert!(serde_json::from_str::<Payload>(r#"{"cluster":"c","token":"t","x":1}"#).is_err());
    }
}
