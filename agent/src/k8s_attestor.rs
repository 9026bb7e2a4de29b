//! The `k8s` workload attestor: which pod and container a caller runs in.
//!
//! The caller's `/proc/<pid>/cgroup` names its pod UID and container ID
//! (cgroup v1 or v2, systemd or cgroupfs driver). Only the kubelet's layout
//! anchored at the cgroup root counts, with the container ID as the last
//! segment: anyone with a delegated cgroup subtree can build a look-alike
//! `…/kubepods/pod<uid>/<id>` below it, and pod UIDs and container IDs are
//! readable by everyone; such a path fails attestation. The kubelet's pod list
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

/// A cgroup path that names a pod but is not where the kubelet puts pods.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("cgroup path {path:?} names a pod but is not a kubelet pod cgroup: {reason}")]
pub struct CgroupError {
    /// The offending path.
    pub path: String,
    /// Which rule it breaks.
    pub reason: &'static str,
}

/// Pod UID (36 characters, `-` or, in systemd slice names, `_` between the
/// groups) → canonical form with dashes.
fn pod_uid(s: &str) -> Option<String> {
    let groups: Vec<&str> = s.split(['-', '_']).collect();
    let lens = [8, 4, 4, 4, 12];
    (s.len() == 36
        && groups.len() == 5
        && groups
            .iter()
            .zip(lens)
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit())))
    .then(|| groups.join("-").to_ascii_lowercase())
}

/// A container ID: 64 hex digits, bare (cgroupfs) or as `<runtime>-<id>`.
fn container_id(seg: &str) -> Option<String> {
    let id = match seg.rsplit_once('-') {
        Some((runtime, id))
            if !runtime.is_empty()
                && runtime.bytes().all(|b| b.is_ascii_lowercase() || b == b'-') =>
        {
            id
        }
        Some(_) => return None,
        None => seg,
    };
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
}

const QOS: [&str; 2] = ["burstable", "besteffort"];

/// systemd driver: `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice/<runtime>-<id>.scope`.
/// Each slice is named after its parent plus one `-component`, so the chain
/// is checked link by link; `anchored` (the path starts at the cgroup root)
/// also requires the first slice to be a top-level one.
fn systemd_layout(segs: &[&str], anchored: bool) -> Result<(String, String), &'static str> {
    let (scope, slices) = segs.split_last().ok_or("empty path")?;
    let scope = scope
        .strip_suffix(".scope")
        .ok_or("the last segment is not a container scope")?;
    let cid = container_id(scope).ok_or("the last segment is not a container ID")?;
    let names = slices
        .iter()
        .map(|s| s.strip_suffix(".slice"))
        .collect::<Option<Vec<&str>>>()
        .ok_or("a segment above the container is not a slice")?;
    let pod = names.last().ok_or("no pod slice above the container")?;
    if anchored && names.first().is_some_and(|n| n.contains('-')) {
        return Err("the first slice is not a top-level slice");
    }
    for pair in names.windows(2) {
        let rest = pair[1]
            .strip_prefix(pair[0])
            .and_then(|r| r.strip_prefix('-'))
            .ok_or("a slice is not named after its parent")?;
        if rest.is_empty() || rest.contains('-') {
            return Err("a slice adds more than one level to its parent's name");
        }
    }
    let parts: Vec<&str> = pod.split('-').collect();
    let k = parts
        .iter()
        .position(|p| *p == "kubepods")
        .ok_or("the pod slice is not under a kubepods slice")?;
    let uid = match &parts[k + 1..] {
        [qos, p] if QOS.contains(qos) => p,
        [p] => p,
        _ => return Err("unexpected levels between kubepods and the pod"),
    };
    let uid = uid
        .strip_prefix("pod")
        .and_then(pod_uid)
        .ok_or("the slice above the container is not a pod slice")?;
    Ok((uid, cid))
}

/// cgroupfs driver: `kubepods[/<qos>]/pod<uid>/<id>`, exactly (anchored) or,
/// seen from another cgroup namespace, a tail of it.
fn cgroupfs_layout(segs: &[&str], anchored: bool) -> Result<(String, String), &'static str> {
    let [above @ .., pod, cid] = segs else {
        return Err("too few levels for a pod container");
    };
    let cid = container_id(cid).ok_or("the last segment is not a container ID")?;
    let uid = pod
        .strip_prefix("pod")
        .and_then(pod_uid)
        .ok_or("the segment above the container is not a pod")?;
    let ok = match above {
        ["kubepods"] => true,
        ["kubepods", q] => QOS.contains(q),
        [] => !anchored,
        [q] => !anchored && QOS.contains(q),
        _ => false,
    };
    if !ok {
        return Err("not directly under kubepods[/<qos>]");
    }
    Ok((uid, cid))
}

/// One cgroup path: `Ok(None)` when it does not name a pod at all.
fn pod_of_path(path: &str) -> Result<Option<(String, String)>, CgroupError> {
    let err = |reason| CgroupError {
        path: path.to_string(),
        reason,
    };
    let mut segs: Vec<&str> = match path.strip_prefix('/') {
        Some("") => return Ok(None),
        Some(p) => p.split('/').collect(),
        None => return Err(err("not an absolute path")),
    };
    // Paths of cgroups outside the reader's cgroup namespace start with
    // "/..": the levels above are ancestors of the agent's own cgroup, which
    // only root creates children in. Without them (the agent sees the host's
    // cgroup tree) the layout must start at the root.
    let up = segs.iter().take_while(|s| **s == "..").count();
    segs.drain(..up);
    let mentions_pod = path.contains("kubepods")
        || segs.iter().any(|s| {
            s.find("pod")
                .is_some_and(|i| pod_uid(s[i + 3..].trim_end_matches(".slice")).is_some())
        });
    if segs.iter().any(|s| s.is_empty() || *s == "." || *s == "..") {
        return if mentions_pod {
            Err(err("empty, '.' or '..' segment"))
        } else {
            Ok(None)
        };
    }
    let systemd = segs.last().is_some_and(|s| s.ends_with(".scope"));
    let res = if systemd {
        systemd_layout(&segs, up == 0)
    } else {
        cgroupfs_layout(&segs, up == 0)
    };
    match res {
        Ok(p) => Ok(Some(p)),
        Err(reason) if mentions_pod => Err(err(reason)),
        Err(_) => Ok(None),
    }
}

/// The pod UID and container ID in a `/proc/<pid>/cgroup` file.
///
/// Only the kubelet's own layout counts (cgroup v1 or v2, systemd or
/// cgroupfs driver), anchored at the cgroup root, with the container ID as
/// the last segment. A path that names a pod anywhere else — a look-alike
/// tree under a delegated subtree, or a cgroup nested below a container — is
/// an error, as are lines (cgroup v1 hierarchies) that disagree.
pub fn pod_and_container(cgroup: &str) -> Result<Option<(String, String)>, CgroupError> {
    let mut found: Option<(String, String)> = None;
    for line in cgroup.lines() {
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        if let Some(p) = pod_of_path(path)? {
            match &found {
                Some(f) if *f != p => {
                    return Err(CgroupError {
                        path: path.to_string(),
                        reason: "cgroup hierarchies name different containers",
                    });
                }
                _ => found = Some(p),
            }
        }
    }
    Ok(found)
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
        let Some((pod_uid, container_id)) =
            pod_and_container(&cgroup).map_err(|e| AttestError::Cgroup {
                pid,
                reason: e.to_string(),
            })?
        else {
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

    const UID: &str = "2c48913c-b29f-11e7-9350-020968147796";
    const UID_: &str = "2c48913c_b29f_11e7_9350_020968147796";

    fn parse(line: &str) -> Result<Option<(String, String)>, CgroupError> {
        pod_and_container(&format!("garbage\n1:name=systemd:/user.slice\n{line}\n"))
    }

    #[test]
    fn cgroup_formats() {
        for line in [
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
            ),
            format!("12:cpu:/kubepods/burstable/pod{UID}/{CID}"),
            format!("12:cpu:/kubepods/pod{UID}/{CID}"),
            format!("0::/kubepods.slice/kubepods-pod{UID_}.slice/docker-{CID}.scope"),
            format!(
                "5:memory:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope"
            ),
            // kubelet with a cgroup root of its own (kind).
            format!(
                "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope"
            ),
            // Seen from the agent's own cgroup namespace (agent in a pod).
            format!("0::/../../kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope"),
            format!(
                "0::/../../../kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
            ),
            format!("0::/../../../burstable/pod{UID}/{CID}"),
        ] {
            assert_eq!(
                parse(&line),
                Ok(Some((UID.to_string(), CID.to_string()))),
                "{line}"
            );
        }
        assert_eq!(
            pod_and_container("0::/user.slice/user-1000.slice/session-2.scope\n"),
            Ok(None)
        );
        assert_eq!(pod_and_container("0::/\n"), Ok(None));
        assert_eq!(pod_and_container(""), Ok(None));
        assert_eq!(
            pod_and_container("0::/system.slice/containerd.service\n"),
            Ok(None)
        );
    }

    /// Issue 12, finding 3: a process with a delegated cgroup subtree builds
    /// the kubelet's layout below it and moves itself in; pod UIDs and
    /// container IDs are readable by everyone in /proc/*/cgroup.
    #[test]
    fn look_alike_and_nested_layouts_are_refused() {
        let delegated = "/user.slice/user-1000.slice/user@1000.service/app.slice/evil";
        for line in [
            format!("0::{delegated}/kubepods/pod{UID}/{CID}"),
            format!("0::{delegated}/kubepods/burstable/pod{UID}/{CID}"),
            format!(
                "0::{delegated}/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
            ),
            format!("0::/evil/kubepods/pod{UID}/{CID}"),
            format!(
                "0::/evil.slice/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope"
            ),
            // Seen from a cgroup namespace: the look-alike is still not
            // directly under an ancestor of the agent.
            format!(
                "0::/../../../user.slice/user-1000.slice/user@1000.service/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope"
            ),
            // Nested below a real container: the ID is not the last segment.
            format!("0::/kubepods/burstable/pod{UID}/{CID}/inner"),
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope/init.scope"
            ),
            // A pod below another pod's container.
            format!(
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod11111111_2222_3333_4444_555555555555.slice/cri-containerd-{}.scope/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
                "a".repeat(64)
            ),
            // Slices whose names do not follow their parents.
            format!(
                "0::/kubepods.slice/other.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
            ),
            format!("0::/kubepods/evil/pod{UID}/{CID}"),
            format!("0::/kubepods/burstable/pod{UID}/../pod{UID}/{CID}"),
            "0::/kubepods/burstable/podnotauid/xyz".to_string(),
        ] {
            assert!(parse(&line).is_err(), "accepted: {line}");
        }
        // cgroup v1 hierarchies naming different containers.
        let two = format!(
            "4:cpu:/kubepods/burstable/pod{UID}/{CID}\n5:memory:/kubepods/burstable/pod{UID}/{}\n",
            "b".repeat(64)
        );
        assert!(pod_and_container(&two).is_err());
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
