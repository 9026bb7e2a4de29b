//! The Kubernetes manifests in `examples/kubernetes/` are Kubernetes objects:
//! each YAML document deserializes into its k8s-openapi type and serializes
//! back to the same document (so a misspelt field, which k8s-openapi would
//! silently drop, fails here). The embedded meshid configs pass `--check`,
//! and the pieces agree with each other (socket directory, service names,
//! ports, the webhook's path).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/kubernetes")
}

/// Every document of every manifest, as JSON.
fn documents() -> Vec<(String, Value)> {
    let mut files: Vec<_> = std::fs::read_dir(dir())
        .expect("examples/kubernetes")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "manifests: {files:?}");
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read");
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            if !v.is_null() {
                docs.push((
                    f.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    v,
                ));
            }
        }
    }
    docs
}

use serde::Deserialize as _;

/// Drops nulls (k8s-openapi writes absent optionals as nothing, YAML may
/// spell them `~`) so the round trip compares content.
fn normalize(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, normalize(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(normalize).collect()),
        other => other,
    }
}

fn roundtrip<T: DeserializeOwned + Serialize>(file: &str, doc: &Value) -> T {
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{file}: {} {}: {e}", doc["kind"], doc["metadata"]["name"]));
    let back = normalize(serde_json::to_value(&typed).expect("serialize"));
    assert_eq!(
        back,
        normalize(doc.clone()),
        "{file}: {} {} has fields Kubernetes does not know",
        doc["kind"],
        doc["metadata"]["name"]
    );
    typed
}

#[derive(Default)]
struct Objects {
    config_maps: BTreeMap<String, ConfigMap>,
    services: BTreeMap<String, Service>,
    daemon_sets: Vec<DaemonSet>,
    stateful_sets: Vec<StatefulSet>,
    deployments: Vec<Deployment>,
    webhooks: Vec<MutatingWebhookConfiguration>,
}

fn parse_all() -> Objects {
    let mut o = Objects::default();
    for (file, doc) in documents() {
        let key = |v: &Value| {
            format!(
                "{}/{}",
                v["metadata"]["namespace"].as_str().unwrap_or(""),
                v["metadata"]["name"].as_str().unwrap_or("")
            )
        };
        match (doc["apiVersion"].as_str(), doc["kind"].as_str()) {
            (Some("v1"), Some("Namespace")) => {
                roundtrip::<Namespace>(&file, &doc);
            }
            (Some("v1"), Some("ServiceAccount")) => {
                roundtrip::<ServiceAccount>(&file, &doc);
            }
            (Some("v1"), Some("ConfigMap")) => {
                o.config_maps.insert(key(&doc), roundtrip(&file, &doc));
            }
            (Some("v1"), Some("Service")) => {
                o.services.insert(key(&doc), roundtrip(&file, &doc));
            }
            (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRole")) => {
                roundtrip::<ClusterRole>(&file, &doc);
            }
            (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRoleBinding")) => {
                roundtrip::<ClusterRoleBinding>(&file, &doc);
            }
            (Some("apps/v1"), Some("StatefulSet")) => o.stateful_sets.push(roundtrip(&file, &doc)),
            (Some("apps/v1"), Some("DaemonSet")) => o.daemon_sets.push(roundtrip(&file, &doc)),
            (Some("apps/v1"), Some("Deployment")) => o.deployments.push(roundtrip(&file, &doc)),
            (Some("admissionregistration.k8s.io/v1"), Some("MutatingWebhookConfiguration")) => {
                o.webhooks.push(roundtrip(&file, &doc));
            }
            (api, kind) => panic!("{file}: unexpected object {api:?} {kind:?}"),
        }
    }
    o
}

fn data<'a>(o: &'a Objects, cm: &str, key: &str) -> &'a str {
    o.config_maps
        .get(cm)
        .and_then(|c| c.data.as_ref())
        .and_then(|d| d.get(key))
        .unwrap_or_else(|| panic!("ConfigMap {cm} lacks {key}"))
}

#[test]
fn manifests_are_kubernetes_objects_that_agree() {
    let o = parse_all();
    assert_eq!(o.stateful_sets.len(), 1);
    assert_eq!(o.daemon_sets.len(), 1);
    assert_eq!(o.webhooks.len(), 1);

    // The agent's socket directory is what the injector mounts into pods.
    let agent_toml = data(&o, "meshid-system/meshid-agent", "agent.toml");
    let injector_toml = data(&o, "meshid-system/meshid-injector", "injector.toml");
    let agent: toml::Value = toml::from_str(agent_toml).expect("agent toml");
    let injector: toml::Value = toml::from_str(injector_toml).expect("injector toml");
    let socket = agent["socket_path"].as_str().expect("socket_path");
    let host_dir = injector["socket_host_dir"]
        .as_str()
        .expect("socket_host_dir");
    assert_eq!(
        format!(
            "{host_dir}/{}",
            injector["socket_name"].as_str().unwrap_or("")
        ),
        socket
    );
    let ds = &o.daemon_sets[0];
    let pod = ds.spec.template.spec.as_ref().expect("ds pod");
    assert_eq!(pod.host_pid, Some(true), "the agent must see workload pids");
    let host_paths: Vec<&str> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.host_path.as_ref().map(|h| h.path.as_str()))
        .collect();
    assert!(host_paths.contains(&host_dir), "{host_paths:?}");
    let projected = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.projected.as_ref())
        .flat_map(|p| p.sources.iter().flatten())
        .filter_map(|s| s.service_account_token.as_ref())
        .next()
        .expect("projected token");
    assert_eq!(projected.audience.as_deref(), Some("meshid-server"));
    assert_eq!(
        agent["node_attestor"]["token_path"].as_str(),
        Some(format!("/var/run/secrets/tokens/{}", projected.path).as_str())
    );

    // The agent dials the server's Service on the port the server binds.
    let server: toml::Value =
        toml::from_str(data(&o, "meshid-system/meshid-server", "server.toml"))
            .expect("server toml");
    let bind_port = server["bind_address"]
        .as_str()
        .and_then(|a| a.rsplit(':').next())
        .expect("port");
    let svc = &o.services["meshid-system/meshid-server"];
    let port = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .map(|p| p[0].port)
        .expect("port");
    assert_eq!(port.to_string(), bind_port);
    assert_eq!(
        agent["server_address"].as_str(),
        Some(format!("meshid-server.meshid-system.svc:{port}").as_str())
    );
    assert_eq!(
        server["node_attestor"]["k8s_psat"]["cluster"].as_str(),
        agent["node_attestor"]["cluster"].as_str()
    );

    // The webhook points at the injector's Service, path /mutate, v1 reviews.
    let hook = &o.webhooks[0].webhooks.as_ref().expect("webhooks")[0];
    let target = hook.client_config.service.as_ref().expect("service");
    assert_eq!(target.path.as_deref(), Some("/mutate"));
    let isvc = &o.services[&format!("{}/{}", target.namespace, target.name)];
    assert!(
        isvc.spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .expect("ports")
            .iter()
            .any(|p| Some(p.port) == target.port)
    );
    assert_eq!(hook.admission_review_versions, vec!["v1".to_string()]);
    assert_eq!(hook.failure_policy.as_deref(), Some("Fail"));

    // The Service reaches the port the injector listens on.
    let listen_port = injector["listen"]
        .as_str()
        .and_then(|a| a.rsplit(':').next())
        .expect("injector listen");
    let webhook_port = isvc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|p| p.iter().find(|p| Some(p.port) == target.port))
        .and_then(|p| p.target_port.clone())
        .expect("targetPort");
    assert_eq!(
        webhook_port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(
            listen_port.parse().expect("port")
        )
    );
    // The injector's own namespace is never sent to it (its pods would wait
    // for themselves under failurePolicy: Fail).
    let excluded = hook
        .namespace_selector
        .as_ref()
        .and_then(|s| s.match_expressions.as_ref())
        .into_iter()
        .flatten()
        .any(|e| {
            e.key == "kubernetes.io/metadata.name"
                && e.operator == "NotIn"
                && e.values.iter().flatten().any(|v| v == &target.namespace)
        });
    assert!(excluded, "the webhook must exclude {}", target.namespace);
    // The injector Deployment mounts the TLS Secret where its config reads it.
    let inj = o
        .deployments
        .iter()
        .find(|d| d.metadata.name.as_deref() == Some("meshid-injector"))
        .expect("injector deployment");
    let inj_pod = inj.spec.template.spec.as_ref().expect("pod");
    let tls_volume = inj_pod
        .volumes
        .iter()
        .flatten()
        .find(|v| {
            v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some("meshid-injector-tls")
        })
        .expect("TLS secret volume");
    let tls_dir = inj_pod.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == tls_volume.name)
        .map(|m| m.mount_path.clone())
        .expect("TLS mount");
    for key in ["tls_cert", "tls_key"] {
        let path = injector[key].as_str().expect(key);
        assert!(
            path.starts_with(&format!("{tls_dir}/")),
            "{key} {path} outside {tls_dir}"
        );
    }

    // Injected sidecars are probed on the pod IP at the injector's admin_port.
    let admin_port = injector
        .get("admin_port")
        .and_then(toml::Value::as_integer)
        .unwrap_or(9901);
    let mut sidecars = 0;
    for (name, cm) in &o.config_maps {
        if let Some(text) = cm.data.as_ref().and_then(|d| d.get("sidecar.toml")) {
            let sc: toml::Value = toml::from_str(text).expect("sidecar toml");
            assert_eq!(
                sc["admin_address"].as_str(),
                Some(format!("0.0.0.0:{admin_port}").as_str()),
                "{name}"
            );
            sidecars += 1;
        }
    }
    assert_eq!(sidecars, 2);

    // Every annotated demo pod names a ConfigMap that exists in its namespace.
    for d in &o.deployments {
        let ns = d.metadata.namespace.clone().unwrap_or_default();
        let ann = d
            .spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.clone())
            .unwrap_or_default();
        if let Some(cm) = ann.get("meshid.io/sidecar-config") {
            data(&o, &format!("{ns}/{cm}"), "sidecar.toml");
        }
    }
}

#[test]
fn embedded_configs_pass_check() {
    let o = parse_all();
    let tmp = tempfile::tempdir().expect("tmp");
    let mut checked = 0;
    for (name, cm) in &o.config_maps {
        for (key, text) in cm.data.iter().flatten() {
            let part = match key.as_str() {
                "server.toml" => "server",
                "agent.toml" => "agent",
                "injector.toml" => "injector",
                "sidecar.toml" => "sidecar",
                _ => continue,
            };
            let path = tmp.path().join(format!("{}-{key}", name.replace('/', "_")));
            std::fs::write(&path, text).expect("w");
            let out = common::meshid()
                .args([part, "run", "--check", "--config"])
                .arg(&path)
                // The sidecar takes the socket from the env the injector sets.
                .env(
                    "SPIFFE_ENDPOINT_SOCKET",
                    "unix:///run/meshid/agent/api.sock",
                )
                .output()
                .expect("run meshid");
            assert!(
                out.status.success(),
                "{name} {key}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert_eq!(
        checked, 5,
        "server, agent, injector and two sidecar configs"
    );
}
