//! The pod annotations the injector reads and writes.

/// `"true"` injects the pod, `"false"` opts it out (also under `inject_by_default`).
pub const INJECT: &str = "meshid.io/inject";
/// Name of a ConfigMap in the pod's namespace with the sidecar's `sidecar.toml`.
pub const SIDECAR_CONFIG: &str = "meshid.io/sidecar-config";
/// Set to [`INJECTED`] on injected pods; injection is skipped when present.
pub const STATUS: &str = "meshid.io/status";
/// The value of [`STATUS`] after injection.
pub const INJECTED: &str = "injected";

/// Name of the injected init container.
pub const SIDECAR_CONTAINER: &str = "meshid-sidecar";
/// Name of the socket volume.
pub const SOCKET_VOLUME: &str = "meshid-agent-socket";
/// Name of the config volume.
pub const CONFIG_VOLUME: &str = "meshid-sidecar-config";
/// Where the sidecar config is mounted.
pub const CONFIG_DIR: &str = "/etc/meshid/sidecar";
/// The Workload API address variable every SPIFFE client reads.
pub const ENDPOINT_ENV: &str = "SPIFFE_ENDPOINT_SOCKET";
