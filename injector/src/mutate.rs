//! The injection decision and the JSON Patch, as a pure function of the
//! AdmissionRequest and the injector's configuration.
//!
//! Contract:
//! - only `CREATE` of a pod is mutated; everything else is admitted unchanged;
//! - `meshid.io/inject: "false"` opts a pod out; `"true"` opts it in; without
//!   the annotation the pod is injected only under `inject_by_default` (the
//!   MutatingWebhookConfiguration's namespaceSelector limits which namespaces
//!   reach the webhook at all);
//! - a pod that already has `meshid.io/status: injected` or a container named
//!   `meshid-sidecar` is not changed again (idempotent: reinvocation, or a pod
//!   re-created from an injected spec);
//! - the sidecar's config comes from the ConfigMap named by
//!   `meshid.io/sidecar-config`; a pod that asks for injection without it is
//!   admitted unchanged with a warning kubectl shows, since without a policy
//!   there is nothing the sidecar could enforce;
//! - a pod that already has a volume named `meshid-agent-socket` or
//!   `meshid-sidecar-config` (without being injected) is admitted unchanged
//!   with a warning, since a duplicate volume name would fail the pod;
//! - a pod object that cannot be read is refused: injection was asked for
//!   and cannot be done, and admitting the pod without its sidecar would
//!   leave it running without the mTLS it expects.
//!
//! Injection adds (every missing list or map is created whole, since a JSON
//! Patch `add` to `/x/-` fails when `/x` does not exist):
//! - the init container `meshid-sidecar`, first, with `restartPolicy: Always`
//!   (a native sidecar, Kubernetes ≥ 1.29): `meshid sidecar run --config
//!   /etc/meshid/sidecar/sidecar.toml`, `SPIFFE_ENDPOINT_SOCKET`, the socket
//!   directory (read-only) and the ConfigMap mounted, non-root (65532) with a
//!   read-only root filesystem and no capabilities, and startup/readiness
//!   probes on `GET /readyz` at the configured admin port (so the sidecar's
//!   `admin_address` must be `0.0.0.0:<admin_port>`: the kubelet probes the
//!   pod IP);
//! - the volumes `meshid-agent-socket` (hostPath of the agent's socket
//!   directory, type `Directory`) and `meshid-sidecar-config` (the ConfigMap);
//! - on every app container, `SPIFFE_ENDPOINT_SOCKET` unless already set, and
//!   the socket directory mounted read-only at the same path;
//! - the annotation `meshid.io/status: injected`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, EnvVar, HTTPGetAction, HostPathVolumeSource,
    Pod, Probe, ResourceRequirements, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};

use crate::annotations as ann;
use crate::config::InjectorConfig;
use crate::review::AdmissionRequest;

/// What to answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Admit unchanged, for this reason (logged), with optional user warnings.
    Unchanged {
        /// Why nothing changes.
        reason: &'static str,
        /// Warnings for the user (kubectl prints them).
        warnings: Vec<String>,
    },
    /// Admit with this RFC 6902 patch.
    Patch(Vec<Value>),
    /// Refuse the pod.
    Refuse(String),
}

fn unchanged(reason: &'static str) -> Decision {
    Decision::Unchanged {
        reason,
        warnings: vec![],
    }
}

/// Escapes a JSON Pointer token (RFC 6901).
fn pointer_token(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

/// Decides and builds the patch for one request.
pub fn mutate(req: &AdmissionRequest, cfg: &InjectorConfig) -> Decision {
    if req.operation != "CREATE" {
        return unchanged("not a CREATE");
    }
    let Some(object) = &req.object else {
        return Decision::Refuse("meshid injector: the review carries no pod object".into());
    };
    let pod: Pod = match serde_json::from_value(object.clone()) {
        Ok(p) => p,
        Err(e) => {
            return Decision::Refuse(format!("meshid injector: cannot read the pod: {e}"));
        }
    };
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    match annotations.get(ann::INJECT).map(String::as_str) {
        Some("false") => return unchanged("opted out"),
        Some("true") => {}
        None if cfg.inject_by_default => {}
        None => return unchanged("not annotated for injection"),
        Some(other) => {
            return Decision::Unchanged {
                reason: "bad inject annotation",
                warnings: vec![format!(
                    "meshid: annotation {}={other:?} is neither \"true\" nor \"false\"; sidecar not injected",
                    ann::INJECT
                )],
            };
        }
    }
    let spec = pod.spec.clone().unwrap_or_default();
    let already = annotations.get(ann::STATUS).map(String::as_str) == Some(ann::INJECTED)
        || spec
            .init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
            .any(|c| c.name == ann::SIDECAR_CONTAINER);
    if already {
        return unchanged("already injected");
    }
    let Some(config_map) = annotations
        .get(ann::SIDECAR_CONFIG)
        .filter(|s| !s.is_empty())
    else {
        return Decision::Unchanged {
            reason: "no sidecar config",
            warnings: vec![format!(
                "meshid: pod asks for injection but has no {} annotation naming the ConfigMap with sidecar.toml; sidecar not injected",
                ann::SIDECAR_CONFIG
            )],
        };
    };
    // Adding a second volume of the same name would make the API server
    // reject the pod: leave it alone and say why.
    if let Some(v) = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == ann::SOCKET_VOLUME || v.name == ann::CONFIG_VOLUME)
    {
        return Decision::Unchanged {
            reason: "volume name taken",
            warnings: vec![format!(
                "meshid: the pod already has a volume named {:?}, which the injector adds; sidecar not injected",
                v.name
            )],
        };
    }
    Decision::Patch(patch(&pod, config_map, cfg))
}

fn patch(pod: &Pod, config_map: &str, cfg: &InjectorConfig) -> Vec<Value> {
    let spec = pod.spec.clone().unwrap_or_default();
    let mut ops = Vec::new();
    let mut add =
        |path: String, value: Value| ops.push(json!({"op": "add", "path": path, "value": value}));

    if pod.metadata.annotations.is_none() {
        add(
            "/metadata/annotations".into(),
            json!({ ann::STATUS: ann::INJECTED }),
        );
    } else {
        add(
            format!("/metadata/annotations/{}", pointer_token(ann::STATUS)),
            json!(ann::INJECTED),
        );
    }

    let sidecar = to_value(&sidecar_container(cfg));
    if spec.init_containers.as_ref().is_none_or(Vec::is_empty) {
        add("/spec/initContainers".into(), json!([sidecar]));
    } else {
        // First, so it runs before any other init container that may need it.
        add("/spec/initContainers/0".into(), sidecar);
    }

    let volumes = [
        Volume {
            name: ann::SOCKET_VOLUME.into(),
            host_path: Some(HostPathVolumeSource {
                path: cfg.socket_host_dir.clone(),
                type_: Some("Directory".into()),
            }),
            ..Volume::default()
        },
        Volume {
            name: ann::CONFIG_VOLUME.into(),
            config_map: Some(ConfigMapVolumeSource {
                name: config_map.to_string(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
    ]
    .map(|v| to_value(&v));
    if spec.volumes.as_ref().is_none_or(Vec::is_empty) {
        add("/spec/volumes".into(), json!(volumes));
    } else {
        for v in volumes {
            add("/spec/volumes/-".into(), v);
        }
    }

    // App containers may use the Workload API directly too.
    let env = to_value(&endpoint_env(cfg));
    let mount = to_value(&socket_mount(cfg));
    for (i, c) in spec.containers.iter().enumerate() {
        let has_env = c.env.iter().flatten().any(|e| e.name == ann::ENDPOINT_ENV);
        if !has_env {
            if c.env.as_ref().is_none_or(Vec::is_empty) {
                add(format!("/spec/containers/{i}/env"), json!([env]));
            } else {
                add(format!("/spec/containers/{i}/env/-"), env.clone());
            }
        }
        let has_mount = c
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path == cfg.socket_host_dir || m.name == ann::SOCKET_VOLUME);
        if !has_mount {
            if c.volume_mounts.as_ref().is_none_or(Vec::is_empty) {
                add(format!("/spec/containers/{i}/volumeMounts"), json!([mount]));
            } else {
                add(
                    format!("/spec/containers/{i}/volumeMounts/-"),
                    mount.clone(),
                );
            }
        }
    }
    ops
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    // k8s-openapi types always serialize.
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn endpoint_env(cfg: &InjectorConfig) -> EnvVar {
    EnvVar {
        name: ann::ENDPOINT_ENV.into(),
        value: Some(cfg.endpoint()),
        ..EnvVar::default()
    }
}

fn socket_mount(cfg: &InjectorConfig) -> VolumeMount {
    VolumeMount {
        name: ann::SOCKET_VOLUME.into(),
        mount_path: cfg.socket_host_dir.clone(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

/// The native sidecar: an init container that keeps running.
pub fn sidecar_container(cfg: &InjectorConfig) -> Container {
    let probe = |failure_threshold| Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/readyz".into()),
            port: IntOrString::Int(i32::from(cfg.admin_port)),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(2),
        failure_threshold: Some(failure_threshold),
        ..Probe::default()
    };
    Container {
        name: ann::SIDECAR_CONTAINER.into(),
        image: Some(cfg.image.clone()),
        image_pull_policy: Some(cfg.image_pull_policy.clone()),
        restart_policy: Some("Always".into()),
        args: Some(vec![
            "sidecar".into(),
            "run".into(),
            "--config".into(),
            format!("{}/sidecar.toml", ann::CONFIG_DIR),
        ]),
        env: Some(vec![endpoint_env(cfg)]),
        volume_mounts: Some(vec![
            socket_mount(cfg),
            VolumeMount {
                name: ann::CONFIG_VOLUME.into(),
                mount_path: ann::CONFIG_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        // The app starts once the sidecar holds an SVID (a real handshake).
        startup_probe: Some(probe(60)),
        readiness_probe: Some(probe(3)),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("10m".into())),
                ("memory".to_string(), Quantity("16Mi".into())),
            ])),
            ..ResourceRequirements::default()
        }),
        ..Container::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> InjectorConfig {
        InjectorConfig::parse("tls_cert = \"/c\"\ntls_key = \"/k\"").expect("cfg")
    }

    fn req(op: &str, pod: Value) -> AdmissionRequest {
        AdmissionRequest {
            uid: "u".into(),
            operation: op.into(),
            namespace: Some("demo".into()),
            object: Some(pod),
        }
    }

    fn annotated(extra: Value) -> Value {
        let mut pod = json!({
            "metadata": {"name": "p", "annotations": {
                "meshid.io/inject": "true", "meshid.io/sidecar-config": "p-sidecar"}},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]}
        });
        if let (Some(p), Some(e)) = (pod.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                p.insert(k.clone(), v.clone());
            }
        }
        pod
    }

    #[test]
    fn plain_pod_gets_every_piece() {
        let Decision::Patch(ops) = mutate(&req("CREATE", annotated(json!({}))), &cfg()) else {
            panic!("expected a patch");
        };
        let paths: Vec<&str> = ops.iter().filter_map(|o| o["path"].as_str()).collect();
        assert_eq!(
            paths,
            [
                "/metadata/annotations/meshid.io~1status",
                "/spec/initContainers",
                "/spec/volumes",
                "/spec/containers/0/env",
                "/spec/containers/0/volumeMounts",
            ]
        );
        let sidecar = &ops[1]["value"][0];
        assert_eq!(sidecar["restartPolicy"], "Always");
        assert_eq!(sidecar["name"], "meshid-sidecar");
    }

    #[test]
    fn skips() {
        let c = cfg();
        let opted_out = json!({"metadata": {"annotations": {"meshid.io/inject": "false"}}, "spec": {"containers": []}});
        assert!(matches!(
            mutate(&req("CREATE", opted_out), &c),
            Decision::Unchanged {
                reason: "opted out",
                ..
            }
        ));
        let plain = json!({"metadata": {}, "spec": {"containers": [{"name": "a"}]}});
        assert!(matches!(
            mutate(&req("CREATE", plain.clone()), &c),
            Decision::Unchanged {
                reason: "not annotated for injection",
                ..
            }
        ));
        let mut all = c.clone();
        all.inject_by_default = true;
        // By default, yet without a config: admitted, with a warning.
        match mutate(&req("CREATE", plain), &all) {
            Decision::Unchanged { reason, warnings } => {
                assert_eq!(reason, "no sidecar config");
                assert_eq!(warnings.len(), 1);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            mutate(&req("UPDATE", annotated(json!({}))), &c),
            Decision::Unchanged {
                reason: "not a CREATE",
                ..
            }
        ));
        let injected = annotated(
            json!({"spec": {"initContainers": [{"name": "meshid-sidecar"}], "containers": [{"name": "a"}]}}),
        );
        assert!(matches!(
            mutate(&req("CREATE", injected), &c),
            Decision::Unchanged {
                reason: "already injected",
                ..
            }
        ));
        let taken = annotated(json!({"spec": {
            "volumes": [{"name": "meshid-agent-socket", "emptyDir": {}}],
            "containers": [{"name": "a"}]}}));
        match mutate(&req("CREATE", taken), &c) {
            Decision::Unchanged { reason, warnings } => {
                assert_eq!(reason, "volume name taken");
                assert!(warnings[0].contains("meshid-agent-socket"), "{warnings:?}");
            }
            other => panic!("{other:?}"),
        }
        let not_a_pod = json!({"spec": {"containers": "nope"}});
        assert!(matches!(
            mutate(&req("CREATE", not_a_pod), &c),
            Decision::Refuse(_)
        ));
    }

    #[test]
    fn existing_lists_are_appended_to() {
        let pod = annotated(json!({"spec": {
            "initContainers": [{"name": "migrate", "image": "m"}],
            "volumes": [{"name": "data", "emptyDir": {}}],
            "containers": [{"name": "app", "env": [{"name": "A", "value": "1"}],
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]
        }}));
        let Decision::Patch(ops) = mutate(&req("CREATE", pod), &cfg()) else {
            panic!("patch");
        };
        let paths: Vec<&str> = ops.iter().filter_map(|o| o["path"].as_str()).collect();
        assert_eq!(
            paths,
            [
                "/metadata/annotations/meshid.io~1status",
                "/spec/initContainers/0",
                "/spec/volumes/-",
                "/spec/volumes/-",
                "/spec/containers/0/env/-",
                "/spec/containers/0/volumeMounts/-",
            ]
        );
    }

    /// Applies the decision's patch to `pod`, as the API server would.
    fn apply(pod: &Value, c: &InjectorConfig) -> Value {
        let Decision::Patch(ops) = mutate(&req("CREATE", pod.clone()), c) else {
            panic!("expected a patch for {pod}");
        };
        let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops)).expect("RFC 6902");
        let mut doc = pod.clone();
        json_patch::patch(&mut doc, &patch).unwrap_or_else(|e| panic!("{pod}: {e}"));
        doc
    }

    #[test]
    fn patches_apply_to_every_pod_shape() {
        let mut all = cfg();
        all.inject_by_default = true;
        let shapes = [
            // No inject annotation (injected by default), no env, volumes
            // or init containers. (An injected pod always has annotations:
            // the ConfigMap's name is one.)
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}]}}),
            // No metadata at all but the ConfigMap's name; two containers.
            json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}]}}),
            // Empty lists are replaced, not appended to.
            json!({"metadata": {"annotations": {}},
                   "spec": {"initContainers": [], "volumes": [],
                            "containers": [{"name": "a", "env": [], "volumeMounts": []}]}}),
        ];
        for pod in shapes {
            let mut pod = pod;
            // The ConfigMap annotation, wherever the annotations map is.
            let ann = pod
                .pointer_mut("/metadata/annotations")
                .and_then(Value::as_object_mut);
            let with_cfg = match ann {
                Some(a) => {
                    a.insert("meshid.io/sidecar-config".into(), json!("cm"));
                    pod.clone()
                }
                None => {
                    let mut p = pod.clone();
                    p["metadata"] = json!({"annotations": {"meshid.io/sidecar-config": "cm"}});
                    p
                }
            };
            let out = apply(&with_cfg, &all);
            let typed: Pod = serde_json::from_value(out.clone()).expect("a Pod");
            let spec = typed.spec.expect("spec");
            let inits = spec.init_containers.expect("inits");
            assert_eq!(inits.len(), 1);
            assert_eq!(inits[0].restart_policy.as_deref(), Some("Always"));
            assert_eq!(spec.volumes.map(|v| v.len()), Some(2));
            for c in &spec.containers {
                assert_eq!(c.env.as_ref().map(Vec::len), Some(1), "{}", c.name);
                assert_eq!(c.volume_mounts.as_ref().map(Vec::len), Some(1));
            }
            assert_eq!(
                out["metadata"]["annotations"]["meshid.io/status"],
                "injected"
            );
            // And the result is left alone the second time.
            assert!(matches!(
                mutate(&req("CREATE", out), &all),
                Decision::Unchanged {
                    reason: "already injected",
                    ..
                }
            ));
        }
    }

    #[test]
    fn existing_endpoint_env_and_mount_are_kept() {
        let pod = annotated(json!({"spec": {"containers": [{
            "name": "a",
            "env": [{"name": "SPIFFE_ENDPOINT_SOCKET", "value": "unix:///custom.sock"}],
            "volumeMounts": [{"name": "mine", "mountPath": "/run/meshid/agent"}]}],
            "volumes": [{"name": "mine", "emptyDir": {}}]}}));
        let out = apply(&pod, &cfg());
        let c = &out["spec"]["containers"][0];
        assert_eq!(
            c["env"],
            json!([{"name": "SPIFFE_ENDPOINT_SOCKET", "value": "unix:///custom.sock"}])
        );
        assert_eq!(c["volumeMounts"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn status_annotation_alone_marks_injected_and_bad_values_warn() {
        let c = cfg();
        let mut pod = annotated(json!({}));
        pod["metadata"]["annotations"]["meshid.io/status"] = json!("injected");
        assert!(matches!(
            mutate(&req("CREATE", pod), &c),
            Decision::Unchanged {
                reason: "already injected",
                ..
            }
        ));
        let mut pod = annotated(json!({}));
        pod["metadata"]["annotations"]["meshid.io/inject"] = json!("yes");
        match mutate(&req("CREATE", pod), &c) {
            Decision::Unchanged { warnings, .. } => {
                assert!(warnings[0].contains("\"yes\""), "{warnings:?}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(pointer_token("a/b~c"), "a~1b~0c");
    }
}
