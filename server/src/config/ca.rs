//! `[upstream]` and `[ca]`: where the signing CA comes from and how it rotates.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

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
