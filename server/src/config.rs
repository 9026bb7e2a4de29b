//! Server configuration: one TOML file, unknown keys refused.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The TOML is malformed, or has unknown keys or wrong types.
    #[error("invalid config {path}: {message}")]
    Parse {
        /// The path.
        path: PathBuf,
        /// What the parser said (names the key and line).
        message: String,
    },
    /// A value is out of range or inconsistent with another.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// `[store]`: where the registry lives.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum StoreConfig {
    /// Embedded SQLite (default). `path` defaults to `<data_dir>/meshid.db`.
    Sqlite {
        /// Database file.
        path: Option<PathBuf>,
    },
    /// PostgreSQL, shared by several servers.
    ///
    /// ```toml
    /// [store]
    /// kind = "postgres"
    /// url = "postgres://meshid@db.example.org/meshid"  # password: PGPASSWORD or ~/.pgpass
    /// pool_size = 10
    /// ssl_mode = "verify-full"                          # default: as the URL says, else prefer
    /// ssl_root_cert = "/etc/meshid/db-ca.pem"           # default: the Mozilla roots
    /// ```
    Postgres {
        /// Connection URL, e.g. `postgres://user@host/meshid`.
        url: DatabaseUrl,
        /// Largest number of pooled connections.
        #[serde(default = "default_pool_size")]
        pool_size: u32,
        /// `disable`, `allow`, `prefer`, `require`, `verify-ca` or
        /// `verify-full`; overrides the URL's `sslmode`.
        ssl_mode: Option<crate::store::SslMode>,
        /// PEM roots the database's certificate must chain to.
        ssl_root_cert: Option<PathBuf>,
    },
}

/// A database URL; its `Debug` hides it, as it may carry a password.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct DatabaseUrl(pub String);

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatabaseUrl(<redacted>)")
    }
}

fn default_pool_size() -> u32 {
    10
}

impl StoreConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let Self::Postgres {
            url,
            pool_size,
            ssl_mode,
            ssl_root_cert,
        } = self
        else {
            return Ok(());
        };
        if !(url.0.starts_with("postgres://") || url.0.starts_with("postgresql://")) {
            return Err(ConfigError::Invalid(
                "store.url must start with postgres:// or postgresql://".into(),
            ));
        }
        if !(1..=1000).contains(pool_size) {
            return Err(ConfigError::Invalid(format!(
                "store.pool_size must be 1 to 1000, got {pool_size}"
            )));
        }
        if ssl_root_cert.is_some() && *ssl_mode == Some(crate::store::SslMode::Disable) {
            return Err(ConfigError::Invalid(
                "store.ssl_root_cert is set but store.ssl_mode = \"disable\"".into(),
            ));
        }
        Ok(())
    }

    /// Connection options of a PostgreSQL store; `None` for SQLite.
    pub fn postgres_options(&self) -> Option<crate::store::PostgresOptions> {
        match self {
            Self::Sqlite { .. } => None,
            Self::Postgres {
                url,
                pool_size,
                ssl_mode,
                ssl_root_cert,
            } => Some(crate::store::PostgresOptions {
                url: url.0.clone(),
                pool_size: *pool_size,
                ssl_mode: *ssl_mode,
                ssl_root_cert: ssl_root_cert.clone(),
            }),
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self::Sqlite { path: None }
    }
}

/// `[upstream]`: an external CA under which the server keeps its own
/// intermediate signing CA.
///
/// With `cert_path` and `key_path` the server mints and rotates its
/// intermediates by itself. With only `bundle_path` (the root kept offline),
/// an operator prepares each intermediate (`meshid server ca prepare
/// --upstream-csr FILE`), has the offline CA sign the CSR, and imports it
/// (`meshid server ca import --cert FILE`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// PEM: the upstream CA certificate, followed by any intermediates up to
    /// (optionally including) the root.
    pub cert_path: Option<PathBuf>,
    /// PEM private key of the upstream CA certificate.
    pub key_path: Option<PathBuf>,
    /// PEM roots of trust published in the bundle. Defaults to the last
    /// certificate of `cert_path`, which must then be self-signed.
    pub bundle_path: Option<PathBuf>,
    /// Warn (log, metric, `/readyz` detail) when the upstream chain ends
    /// within this window.
    #[serde(default = "default_upstream_warn", with = "humantime_serde")]
    pub warn_before: Duration,
}

fn default_upstream_warn() -> Duration {
    Duration::from_secs(30 * 24 * 3600)
}

impl UpstreamConfig {
    /// Whether the server holds the upstream key and can mint by itself.
    pub fn has_key(&self) -> bool {
        self.key_path.is_some()
    }
}

/// `[ca]`: how the signing authorities rotate. The defaults follow the
/// proven schedule: prepare the successor at half the lifetime, activate it
/// once it has been published for `max_svid_ttl`, and by 5/6 at the latest.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CaRotationConfig {
    /// Fraction of the active CA's lifetime at which the next is prepared.
    #[serde(default = "default_prepare_at")]
    pub prepare_at: f64,
    /// Fraction of the active CA's lifetime by which the next is activated.
    #[serde(default = "default_activate_by")]
    pub activate_by: f64,
    /// How long a prepared CA is published before it signs; default
    /// `max_svid_ttl`.
    #[serde(default, with = "humantime_serde")]
    pub publish_before_use: Option<Duration>,
    /// Lifetime of JWT signing keys; default `ca_ttl`.
    #[serde(default, with = "humantime_serde")]
    pub jwt_key_ttl: Option<Duration>,
    /// Rotate automatically (default). Off: only `meshid server ca` moves
    /// authorities, and `/readyz` fails when the active CA nears its end.
    #[serde(default = "default_true")]
    pub automatic: bool,
}

fn default_prepare_at() -> f64 {
    0.5
}
fn default_activate_by() -> f64 {
    5.0 / 6.0
}
fn default_true() -> bool {
    true
}

impl Default for CaRotationConfig {
    fn default() -> Self {
        Self {
            prepare_at: default_prepare_at(),
            activate_by: default_activate_by(),
            publish_before_use: None,
            jwt_key_ttl: None,
            automatic: true,
        }
    }
}

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

/// `[node_api]`: what one node API listener holds at most. A connection
/// past a limit is closed at accept (counted in
/// `meshid_server_node_tls_refused_total` with reason `connection_limit` or
/// `handshake_limit`); the connections already held are not affected.
///
/// ```toml
/// [node_api]
/// max_connections = 4096        # established and handshaking
/// max_pending_handshakes = 256  # still in the TLS handshake
/// handshake_timeout = "10s"
/// max_concurrent_streams = 64   # HTTP/2 streams per connection
/// max_message_size = 4194304    # bytes, one gRPC request message
/// ```
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct NodeApiLimits {
    /// Connections held at once, handshaking or established.
    pub max_connections: usize,
    /// Connections still in the TLS handshake at once.
    pub max_pending_handshakes: usize,
    /// A handshake not done by then is dropped.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// Largest gRPC request message, in bytes.
    pub max_message_size: usize,
}

impl Default for NodeApiLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_pending_handshakes: 256,
            handshake_timeout: Duration::from_secs(10),
            max_concurrent_streams: 64,
            max_message_size: 4 << 20,
        }
    }
}

impl NodeApiLimits {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(format!("node_api.{m}")));
        if self.max_connections == 0 || self.max_pending_handshakes == 0 {
            return bad("max_connections and max_pending_handshakes must be at least 1");
        }
        if self.max_pending_handshakes > self.max_connections {
            return bad("max_pending_handshakes must not exceed max_connections");
        }
        if self.handshake_timeout.is_zero() {
            return bad("handshake_timeout must be positive");
        }
        if self.max_concurrent_streams == 0 {
            return bad("max_concurrent_streams must be at least 1");
        }
        if self.max_message_size < 1024 {
            return bad("max_message_size must be at least 1024 bytes");
        }
        Ok(())
    }
}

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
    fn validate(&self, trust_domain: &str) -> Result<(), ConfigError> {
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
fn default_max_batch() -> usize {
    1000
}

impl ServerConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<inline>"),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        meshid_identity::spiffe_id::trust_domain(&self.trust_domain)
            .map_err(|e| ConfigError::Invalid(format!("trust_domain: {e}")))?;
        self.admin_certs
            .validate(&self.trust_domain)
            .map_err(ConfigError::Invalid)?;
        self.safe_ops.validate().map_err(ConfigError::Invalid)?;
        if meshid_identity::spiffe_id::strip_scheme(&self.trust_domain) != self.trust_domain {
            return Err(ConfigError::Invalid(
                "trust_domain is a name like \"example.org\", without spiffe://".into(),
            ));
        }
        let min = Duration::from_secs(1);
        for (name, d) in [
            ("default_svid_ttl", self.default_svid_ttl),
            ("max_svid_ttl", self.max_svid_ttl),
            ("agent_svid_ttl", self.agent_svid_ttl),
            ("default_jwt_svid_ttl", self.default_jwt_svid_ttl),
            ("ca_ttl", self.ca_ttl),
            ("join_token_ttl", self.join_token_ttl),
        ] {
            if d < min {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1s")));
            }
        }
        if self.default_svid_ttl > self.max_svid_ttl {
            return Err(ConfigError::Invalid(format!(
                "default_svid_ttl ({}) exceeds max_svid_ttl ({})",
                humantime::format_duration(self.default_svid_ttl),
                humantime::format_duration(self.max_svid_ttl)
            )));
        }
        for (name, d) in [
            ("default_svid_ttl", self.default_svid_ttl),
            ("agent_svid_ttl", self.agent_svid_ttl),
            ("default_jwt_svid_ttl", self.default_jwt_svid_ttl),
        ] {
            if d > self.max_svid_ttl {
                return Err(ConfigError::Invalid(format!(
                    "{name} ({}) exceeds max_svid_ttl ({})",
                    humantime::format_duration(d),
                    humantime::format_duration(self.max_svid_ttl)
                )));
            }
        }
        // A CA must live long enough for its successor to be published for a
        // whole SVID lifetime before it signs, and for the last SVIDs it signed
        // to expire before it does: no overlap is possible below 2x.
        if self.ca_ttl < self.max_svid_ttl * 2 {
            return Err(ConfigError::Invalid(format!(
                "ca_ttl ({}) must be at least twice max_svid_ttl ({}): the next CA has to be \
                 published for one SVID lifetime before it signs, and the old one has to outlive \
                 the SVIDs it signed; raise ca_ttl or lower max_svid_ttl",
                humantime::format_duration(self.ca_ttl),
                humantime::format_duration(self.max_svid_ttl)
            )));
        }
        let r = &self.ca;
        if !(0.1..=0.9).contains(&r.prepare_at)
            || !(0.1..=0.95).contains(&r.activate_by)
            || r.activate_by <= r.prepare_at
        {
            return Err(ConfigError::Invalid(format!(
                "ca.prepare_at ({}) and ca.activate_by ({}) must satisfy 0.1 <= prepare_at < \
                 activate_by <= 0.95",
                r.prepare_at, r.activate_by
            )));
        }
        if let Some(p) = r.publish_before_use
            && p > self.ca_ttl.mul_f64(r.activate_by - r.prepare_at)
        {
            return Err(ConfigError::Invalid(format!(
                "ca.publish_before_use ({}) is longer than the window between preparation and \
                 the latest activation ({})",
                humantime::format_duration(p),
                humantime::format_duration(self.ca_ttl.mul_f64(r.activate_by - r.prepare_at))
            )));
        }
        if let Some(j) = r.jwt_key_ttl
            && j < self.max_svid_ttl * 2
        {
            return Err(ConfigError::Invalid(format!(
                "ca.jwt_key_ttl ({}) must be at least twice max_svid_ttl ({})",
                humantime::format_duration(j),
                humantime::format_duration(self.max_svid_ttl)
            )));
        }
        if let Some(u) = &self.upstream {
            if u.key_path.is_some() != u.cert_path.is_some() && u.key_path.is_some() {
                return Err(ConfigError::Invalid(
                    "upstream.key_path needs upstream.cert_path".into(),
                ));
            }
            if u.cert_path.is_none() && u.bundle_path.is_none() {
                return Err(ConfigError::Invalid(
                    "[upstream] needs cert_path and key_path (the server mints intermediates), \
                     or bundle_path alone (an offline root signs them)"
                        .into(),
                ));
            }
        }
        if let Some(psat) = &self.node_attestor.k8s_psat {
            psat.validate(&self.trust_domain)?;
        }
        self.store.validate()?;
        if self.max_sign_batch == 0 {
            return Err(ConfigError::Invalid("max_sign_batch must be > 0".into()));
        }
        self.node_api.validate()?;
        self.audit.validate().map_err(ConfigError::Invalid)?;
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k8s_psat_section() {
        let base = "trust_domain = \"example.org\"\n[node_attestor.k8s_psat]\n";
        let c = ServerConfig::parse(&format!(
            "{base}cluster = \"demo\"\nservice_accounts = [\"meshid-system:meshid-agent\"]\n"
        ))
        .expect("parses");
        let p = c.node_attestor.k8s_psat.expect("psat");
        assert_eq!(p.audience, "meshid-server");
        assert_eq!(
            p.token_path,
            PathBuf::from(meshid_identity::kube::IN_CLUSTER_TOKEN)
        );
        for (bad, needle) in [
            (
                "cluster = \"demo\"\nservice_accounts = []",
                "service_accounts is empty",
            ),
            ("cluster = \"a/b\"\nservice_accounts = [\"a:b\"]", "cluster"),
            (
                "cluster = \"demo\"\nservice_accounts = [\"agent\"]",
                "namespace:name",
            ),
            (
                "cluster = \"demo\"\nservice_accounts = [\"a:b\"]\napi_server = \"http://x\"",
                "https://",
            ),
            (
                "cluster = \"demo\"\nservice_accounts = [\"a:b\"]\nalias_id = \"spiffe://other.org/x\"",
                "not in trust domain",
            ),
            (
                "cluster = \"demo\"\nservice_accounts = [\"a:b\"]\ntokn = \"x\"",
                "tokn",
            ),
        ] {
            let e = ServerConfig::parse(&format!("{base}{bad}\n")).expect_err(bad);
            assert!(e.to_string().contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = ServerConfig::parse("trust_domain = \"example.org\"").expect("parses");
        assert_eq!(c.default_svid_ttl, Duration::from_secs(3600));
        // Defaults that can overlap: a 7-day CA, SVIDs of at most a day.
        assert_eq!(c.max_svid_ttl, Duration::from_secs(86400));
        assert_eq!(c.ca_ttl, Duration::from_secs(7 * 86400));
        assert_eq!(c.store, StoreConfig::Sqlite { path: None });
        assert!(c.ca.automatic);
    }

    #[test]
    fn lifetimes_that_cannot_overlap_are_refused() {
        // The short lifetimes tests use are fine.
        let c = ServerConfig::parse(
            "trust_domain = \"td\"\nca_ttl = \"60s\"\nmax_svid_ttl = \"8s\"\ndefault_svid_ttl = \"8s\"\nagent_svid_ttl = \"8s\"\ndefault_jwt_svid_ttl = \"8s\"",
        )
        .expect("60 s CA with 8 s SVIDs");
        assert_eq!(c.x509_policy().publish_before_use, Duration::from_secs(8));
        let e = ServerConfig::parse("trust_domain = \"td\"\nca_ttl = \"36h\"")
            .expect_err("36 h CA with 24 h SVIDs cannot overlap");
        assert!(e.to_string().contains("at least twice max_svid_ttl"), "{e}");
        let e =
            ServerConfig::parse("trust_domain = \"td\"\n[ca]\nprepare_at = 0.9\nactivate_by = 0.5")
                .expect_err("activation before preparation");
        assert!(e.to_string().contains("prepare_at"), "{e}");
        let e = ServerConfig::parse("trust_domain = \"td\"\n[upstream]\nwarn_before = \"1d\"")
            .expect_err("upstream without certificate or bundle");
        assert!(e.to_string().contains("bundle_path"), "{e}");
    }

    #[test]
    fn durations_and_store() {
        let c = ServerConfig::parse(
            "trust_domain = \"td\"\ndefault_svid_ttl = \"30s\"\nca_ttl = \"2d\"\n[store]\nkind = \"sqlite\"\npath = \"/tmp/x.db\"\n",
        )
        .expect("parses");
        assert_eq!(c.default_svid_ttl, Duration::from_secs(30));
        assert_eq!(c.ca_ttl, Duration::from_secs(2 * 86400));
    }

    #[test]
    fn audit_section_and_key_exchange() {
        let c = ServerConfig::parse("trust_domain = \"td\"").expect("parses");
        assert_eq!(c.audit, crate::audit::AuditSettings::default());
        assert_eq!(
            c.tls_key_exchange,
            meshid_identity::crypto::KeyExchange::HybridPreferred
        );
        let c = ServerConfig::parse(
            "trust_domain = \"td\"\ntls_key_exchange = \"hybrid-required\"\n[audit]\nmax_file_size = \"2MiB\"\nmax_files = 3\nseal_every_records = 10\nseal_every = \"5s\"\n",
        )
        .expect("parses");
        assert_eq!(c.audit.max_file_size, 2 << 20);
        assert_eq!(c.audit.max_files, 3);
        assert_eq!(c.audit.seal_every_records, 10);
        assert_eq!(c.audit.seal_every, Duration::from_secs(5));
        assert_eq!(
            c.tls_key_exchange,
            meshid_identity::crypto::KeyExchange::HybridRequired
        );
        for (bad, needle) in [
            ("tls_key_exchange = \"pq\"", "tls_key_exchange"),
            ("[audit]\nmax_file_size = \"2 parsecs\"", "max_file_size"),
            ("[audit]\nmax_file_size = 10", "max_file_size"),
            ("[audit]\nseal_every_records = 0", "seal_every_records"),
            ("[audit]\nseal_every = \"0s\"", "seal_every"),
            ("[audit]\nmax_filez = 3", "max_filez"),
        ] {
            let e = ServerConfig::parse(&format!("trust_domain = \"td\"\n{bad}\n")).expect_err(bad);
            assert!(e.to_string().contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn postgres_store() {
        let base = "trust_domain = \"td\"\n[store]\nkind = \"postgres\"\n";
        let c = ServerConfig::parse(&format!(
            "{base}url = \"postgres://m:secret@db/meshid\"\npool_size = 4\nssl_mode = \"verify-full\"\nssl_root_cert = \"/etc/ca.pem\"\n"
        ))
        .expect("parses");
        let o = c.store.postgres_options().expect("postgres");
        assert_eq!(o.pool_size, 4);
        assert_eq!(o.ssl_mode, Some(crate::store::SslMode::VerifyFull));
        assert_eq!(o.ssl_root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert!(
            !format!("{c:?}").contains("secret"),
            "the URL is not in Debug"
        );
        let d =
            ServerConfig::parse(&format!("{base}url = \"postgres://db/m\"\n")).expect("defaults");
        let o = d.store.postgres_options().expect("postgres");
        assert_eq!((o.pool_size, o.ssl_mode, o.ssl_root_cert), (10, None, None));
        for (bad, needle) in [
            ("url = \"mysql://db/m\"", "postgres://"),
            ("url = \"postgres://db/m\"\npool_size = 0", "pool_size"),
            (
                "url = \"postgres://db/m\"\nssl_mode = \"sometimes\"",
                "sometimes",
            ),
            (
                "url = \"postgres://db/m\"\nssl_mode = \"disable\"\nssl_root_cert = \"/x\"",
                "ssl_root_cert",
            ),
            ("url = \"postgres://db/m\"\npath = \"/x\"", "path"),
        ] {
            let e = ServerConfig::parse(&format!("{base}{bad}\n")).expect_err(bad);
            assert!(e.to_string().contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn unknown_key_is_an_error() {
        let e = ServerConfig::parse("trust_domain = \"td\"\nbind_adress = \"1.2.3.4:1\"")
            .expect_err("unknown key");
        assert!(e.to_string().contains("bind_adress"), "{e}");
    }

    #[test]
    fn bad_trust_domain_and_ttls() {
        assert!(ServerConfig::parse("trust_domain = \"Bad TD\"").is_err());
        assert!(
            ServerConfig::parse(
                "trust_domain = \"td\"\ndefault_svid_ttl = \"8d\"\nmax_svid_ttl = \"7d\""
            )
            .is_err()
        );
    }
}
