//! The `crl`, `crl_source` and `crl_refresh` settings.

use std::time::Duration;

use serde::Deserialize;

use crate::config::Config;

use super::*;

/// How presented certificates are checked against the CRL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CrlMode {
    /// No revocation checking (the default).
    #[default]
    Off,
    /// Listed certificates are refused; a missing or stale CRL is logged
    /// and counted, and handshakes proceed.
    Optional,
    /// Listed certificates are refused, and so is every handshake while the
    /// CRL is missing or past its nextUpdate (fail secure).
    Required,
}

impl CrlMode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Optional => "optional",
            Self::Required => "required",
        }
    }
}

/// The CRL settings of a validated config (`None` when `crl = "off"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlSettings {
    /// `optional` or `required`.
    pub mode: CrlMode,
    /// Where it is fetched.
    pub source: CrlSource,
    /// How often.
    pub refresh: Duration,
}

/// Default `crl_refresh`.
pub fn default_refresh() -> Duration {
    Duration::from_secs(30)
}

/// Checks the `crl*` keys; `None` when `crl = "off"`.
pub fn settings(c: &Config) -> Result<Option<CrlSettings>, String> {
    if c.crl_refresh < Duration::from_secs(1) {
        return Err("crl_refresh must be at least 1s".into());
    }
    if c.crl == CrlMode::Off {
        return Ok(None);
    }
    let source = c.crl_source.as_deref().ok_or_else(|| {
        format!(
            "crl = \"{}\" needs crl_source (the server's http://host:port/crl, or a file)",
            c.crl.as_str()
        )
    })?;
    Ok(Some(CrlSettings {
        mode: c.crl,
        source: CrlSource::parse(source)?,
        refresh: c.crl_refresh,
    }))
}
