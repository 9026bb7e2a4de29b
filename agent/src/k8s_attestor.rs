//! The `k8s` workload attestor: which pod and container a caller runs in.
//!
//! The caller's `/proc/<pid>/cgroup` names its pod UID and container ID
//! (cgroup v1 or v2, systemd or cgroupfs driver). The kubelet's pod list
//! (`GET /pods` on its HTTPS port, with the agent's service-account token)
//! turns those into selectors: `k8s:ns:…`, `k8s:sa:…`, `k8s:pod-name:…`,
//! `k8s:pod-uid:…`, `k8s:node-name:…`, `k8s:pod-label:KEY:VALUE`,
//! `k8s:container-name:…`, `k8s:container-image:…`. A process outside any
//! pod gets no `k8s` selectors; a pod the kubelet does not know (even after
//! one fresh fetch) fails attestation rather than yielding partial selectors.
//!
//! ```toml
//! [workload_attestor.k8s]
//! node_name_env = "MY_NODE_NAME"            # or node_name = "…"
//! kubelet_url = "https://127.0.0.1:10250"
//! skip_kubelet_verification = false         # true: accept a self-signed kubelet cert
//! kubelet_ca_path = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
//! token_path = "/var/run/secrets/kubernetes.io/serviceaccount/token"
//! pod_list_cache = "5s"
//! ```

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use meshid_identity::kube::{IN_CLUSTER_CA, IN_CLUSTER_TOKEN, KubeApi, KubeError};
use meshid_proto::types::Selector;
use serde::Deserialize;

use crate::attest::{AttestError, Caller, WorkloadAttestor};

/// `[workload_attestor]`: attestors added to the always-on `unix` one.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WorkloadAttestorConfig {
    /// `[workload_attestor.k8s]`.
    pub k8s: Option<K8sAttestorConfig>,
}

/// `[workload_attestor.k8s]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct K8sAttestorConfig {
    /// This node's name.
    pub node_name: Option<String>,
    /// Environment variable holding the node's name (downward API).
    pub node_name_env: Option<String>,
    /// The kubelet's HTTPS endpoint.
    #[serde(default = "default_kubelet")]
    pub kubelet_url: String,
    /// Accept any kubelet certificate (many kubelets serve self-signed ones).
    #[serde(default)]
    pub skip_kubelet_verification: bool,
    /// CA for the kubelet's certificate, when verifying.
    #[serde(default = "default_ca")]
    pub kubelet_ca_path: PathBuf,
    /// Bearer token for the kubelet, re-read on each fetch.
    #[serde(default = "default_token")]
    pub token_path: PathBuf,
    /// How long a pod list is reused.
    #[serde(default = "default_cache", with = "humantime_serde")]
    pub pod_list_cache: Duration,
}

fn default_kubelet() -> String {
    "https://127.0.0.1:10250".into()
}
fn default_ca() -> PathBuf {
    PathBuf::from(IN_CLUSTER_CA)
}
fn default_token() -> PathBuf {
    PathBuf::from(IN_CLUSTER_TOKEN)
}
fn default_cache() -> Duration {
    Duration::from_secs(5)
}

impl K8sAttestorConfig {
    /// Checks the section; `Err` names the problem.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.node_name, &self.node_name_env) {
            (Some(_), Some(_)) => {
                return Err(
                    "workload_attestor.k8s: set node_name or node_name_env, not both".into(),
                );
            }
            (None, None) => {
                return Err("workload_attestor.k8s: set node_name or node_name_env".into());
            }
            _ => {}
        }
        if !self.kubelet_url.starts_with("https://") {
            return Err(format!(
                "workload_attestor.k8s: kubelet_url {:?} must be https://",
                self.kubelet_url
            ));
        }
        Ok(())
    }
}

/// The pod UID and container ID in a `/proc/<pid>/cgroup` file, if any.
pub fn pod_and_container(cgroup: &str) -> Option<(String, String)> {
    cgroup.lines().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        if !path.contains("kubepods") {
            return None;
        }
        let mut pod = None;
        let mut container = None;
        for seg in path.split('/') {
            let seg = seg.strip_suffix(".slice").unwrap_or(seg);
            // cgroupfs: "pod<uid>"; systemd: "kubepods-burstable-pod<uid_with_underscores>".
            if let Some(i) = seg.rfind("pod") {
                let uid = &seg[i + 3..];
                if uid.len() == 36
                    && uid
                        .chars()
                        .all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_')
                {
                    pod = Some(uid.replace('_', "-"));
                    continue;
                }
            }
            let id = seg.strip_suffix(".scope").unwrap_or(seg);
            let id = id.rsplit('-').next().unwrap_or(id);
            if id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit()) {
                container = Some(id.to_string());
            }
        }
        Some((pod?, container?))
    })
}

/// The kubelet's `/pods` answer (a `PodList`); only the items matter.
#[derive(Debug, Deserialize)]
struct PodList {
    #[serde(default)]
    items: Vec<Pod>,
}

/// The attestor.
pub struct K8sAttestor {
    proc_root: PathBuf,
    node_name: String,
    kubelet: KubeApi,
    cache_for: Duration,
    cache: Mutex<Option<(Instant, std::sync::Arc<Vec<Pod>>)>>,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for K8sAttestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("K8sAttestor")
            .field("node_name", &self.node_name)
            .finish_non_exhaustive()
    }
}

fn sel(value: String) -> Selector {
    Selector {
        r#type: "k8s".into(),
        value,
    }
}

impl K8sAttestor {
    /// Builds the attestor; call inside a Tokio runtime.
    pub fn new(cfg: &K8sAttestorConfig, proc_root: PathBuf) -> Result<Self, KubeError> {
        cfg.validate().map_err(KubeError::Config)?;
        let node_name = match (&cfg.node_name, &cfg.node_name_env) {
            (Some(n), _) => n.clone(),
            (None, Some(var)) => std::env::var(var).map_err(|_| {
                KubeError::Config(format!("workload_attestor.k8s: ${var} is not set"))
            })?,
            (None, None) => String::new(),
        };
        let kubelet = if cfg.skip_kubelet_verification {
            tracing::warn!(url = %cfg.kubelet_url, "k8s attestor: kubelet certificate not verified (skip_kubelet_verification)");
            KubeApi::new_unverified(&cfg.kubelet_url, &cfg.token_path)?
        } else {
            KubeApi::new(&cfg.kubelet_url, &cfg.kubelet_ca_path, &cfg.token_path)?
        };
        Ok(Self {
            proc_root,
            node_name,
            kubelet,
            cache_for: cfg.pod_list_cache,
            cache: Mutex::new(None),
            runtime: tokio::runtime::Handle::current(),
        })
    }

    fn pods(&self, fresh: bool) -> Result<std::sync::Arc<Vec<Pod>>, AttestError> {
        if !fresh
            && let Ok(guard) = self.cache.lock()
            && let Some((at, pods)) = guard.as_ref()
            && at.elapsed() < self.cache_for
        {
            return Ok(pods.clone());
        }
        let list: PodList = self
            .runtime
            .block_on(self.kubelet.get("/pods"))
            .map_err(|e| AttestError::Kubelet(e.to_string()))?;
        let pods = std::sync::Arc::new(list.items);
        if let Ok(mut guard) = self.cache.lock() {
            *guard = Some((Instant::now(), pods.clone()));
        }
        Ok(pods)
    }

    fn selectors(&self, pod: &Pod, container_id: &str) -> Option<Vec<Selector>> {
        let status = pod.status.as_ref()?;
        let all = status
            .container_statuses
            .iter()
            .flatten()
            .chain(status.init_container_statuses.iter().flatten())
            .chain(status.ephemeral_container_statuses.iter().flatten());
        let c = all.into_iter().find(|c| {
            c.container_id
                .as_deref()
                .and_then(|id| id.split("://").nth(1))
                == Some(container_id)
        })?;
        let m = &pod.metadata;
        let mut out = vec![
            sel(format!("ns:{}", m.namespace.clone().unwrap_or_default())),
            sel(format!(
                "sa:{}",
                pod.spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_default()
            )),
            sel(format!("pod-name:{}", m.name.clone().unwrap_or_default())),
            sel(format!("pod-uid:{}", m.uid.clone().unwrap_or_default())),
            sel(format!("node-name:{}", self.node_name)),
            sel(format!("container-name:{}", c.name)),
            sel(format!("container-image:{}", c.image)),
        ];
        for (k, v) in m.labels.iter().flatten() {
            out.push(sel(format!("pod-label:{k}:{v}")));
        }
        Some(out)
    }
}

impl WorkloadAttestor for K8sAttestor {
    fn name(&self) -> &'static str {
        "k8s"
    }

    fn attest(&self, caller: &Caller) -> Result<Vec<Selector>, AttestError> {
        let pid = caller.pid.ok_or(AttestError::NoPid)?;
        let cgroup = std::fs::read_to_string(self.proc_root.join(pid.to_string()).join("cgroup"))
            .map_err(|e| AttestError::Proc {
            pid,
            reason: format!("cgroup: {e}"),
        })?;
        let Some((pod_uid, container_id)) = pod_and_container(&cgroup) else {
            return Ok(vec![]);
        };
        // A pod newer than the cached list gets exactly one fresh fetch.
        for fresh in [false, true] {
            let pods = self.pods(fresh)?;
            if let Some(pod) = pods
                .iter()
                .find(|p| p.metadata.uid.as_deref() == Some(pod_uid.as_str()))
                && let Some(s) = self.selectors(pod, &container_id)
            {
                return Ok(s);
            }
        }
        Err(AttestError::UnknownPod {
            pod_uid,
            container_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";

    #[test]
    fn cgroup_formats() {
        let uid = "2c48913c-b29f-11e7-9350-020968147796";
        for line in [
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod2c48913c_b29f_11e7_9350_020968147796.slice/cri-containerd-{CID}.scope"
            ),
            format!("12:cpu:/kubepods/burstable/pod{uid}/{CID}"),
            format!(
                "0::/kubepods.slice/kubepods-pod2c48913c_b29f_11e7_9350_020968147796.slice/docker-{CID}.scope"
            ),
            format!(
                "5:memory:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod2c48913c_b29f_11e7_9350_020968147796.slice/crio-{CID}.scope"
            ),
        ] {
            let text = format!("garbage\n1:name=systemd:/user.slice\n{line}\n");
            assert_eq!(
                pod_and_container(&text),
                Some((uid.to_string(), CID.to_string())),
                "{line}"
            );
        }
        assert_eq!(
            pod_and_container("0::/user.slice/user-1000.slice/session-2.scope\n"),
            None
        );
        assert_eq!(
            pod_and_container("0::/kubepods/burstable/podnotauid/xyz\n"),
            None
        );
        assert_eq!(pod_and_container(""), None);
    }

    #[test]
    fn config_rules() {
        let parse = |s: &str| toml::from_str::<WorkloadAttestorConfig>(s);
        let c = parse("[k8s]\nnode_name_env = \"N\"\n").expect("ok");
        let k = c.k8s.expect("k8s");
        assert_eq!(k.kubelet_url, "https://127.0.0.1:10250");
        assert!(k.validate().is_ok());
        let both = parse("[k8s]\nnode_name = \"a\"\nnode_name_env = \"N\"\n").expect("parses");
        assert!(both.k8s.expect("k8s").validate().is_err());
        assert!(parse("[k8s]\nnode_name = \"a\"\nkubelet = \"x\"\n").is_err());
    }
}
