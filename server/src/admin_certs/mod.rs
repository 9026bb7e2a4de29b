//! Admin certificates: X.509 certificates minted on an operator's request
//! (humans, tools, break-glass access) rather than for a registration entry,
//! and the certificate revocation list (CRL) that can withdraw them.
//!
//! - [`AdminCertsConfig`] is the `[admin_certs]` policy: the longest lifetime
//!   and the SPIFFE ID prefixes a minted certificate may have.
//! - [`api`] is the `AdminX509` gRPC service on the admin socket (mint,
//!   revoke, get the CRL); every mint, refusal and revocation is audited.
//! - [`publisher`] signs the CRL with the active X.509 CA, keeps it fresh
//!   (rebuilt every `crl_refresh` and at once after a revocation, long
//!   before its nextUpdate) and serves it on the metrics listener
//!   (`GET /crl`, `GET /crl.pem`).

pub mod api;
pub mod publisher;

use std::time::Duration;

use serde::Deserialize;

/// `[admin_certs]`: what `meshid server x509 mint` may sign, and the CRL.
///
/// ```toml
/// [admin_certs]
/// max_ttl = "7d"                                   # longest lifetime minted
/// allowed_prefixes = ["spiffe://example.org/admin/"] # SPIFFE IDs that may be minted
/// crl_validity = "1h"                              # nextUpdate - thisUpdate
/// crl_refresh = "30s"                              # CRL rebuilt this often
/// ```
///
/// With no `allowed_prefixes` (the default) nothing can be minted.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminCertsConfig {
    /// Longest lifetime of a minted certificate.
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    /// SPIFFE ID prefixes (each `spiffe://<trust domain>/…/`, ending in `/`)
    /// a minted certificate's ID must start with.
    pub allowed_prefixes: Vec<String>,
    /// How long a published CRL is valid (its nextUpdate - thisUpdate).
    /// Sidecars with `crl = "required"` refuse every handshake once the CRL
    /// they hold is past its nextUpdate.
    #[serde(with = "humantime_serde")]
    pub crl_validity: Duration,
    /// How often the CRL is rebuilt from the store (a revocation through
    /// this server rebuilds it at once; one through another server sharing
    /// the store is listed within this interval). At most half of
    /// `crl_validity`.
    #[serde(with = "humantime_serde")]
    pub crl_refresh: Duration,
}

impl Default for AdminCertsConfig {
    fn default() -> Self {
        Self {
            max_ttl: Duration::from_secs(7 * 24 * 3600),
            allowed_prefixes: Vec::new(),
            crl_validity: Duration::from_secs(3600),
            crl_refresh: Duration::from_secs(30),
        }
    }
}

/// Why a mint request is refused by policy.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum MintRefused {
    /// The requested lifetime exceeds `max_ttl`.
    #[error(
        "requested lifetime {requested} exceeds [admin_certs] max_ttl {max}; ask for at most {max}"
    )]
    TtlTooLong {
        /// Requested, human-readable.
        requested: String,
        /// The cap, human-readable.
        max: String,
    },
    /// A lifetime of zero.
    #[error("the lifetime must be at least 1s")]
    TtlZero,
    /// The SPIFFE ID is not under any allowed prefix.
    #[error("SPIFFE ID {id} is not under any [admin_certs] allowed_prefixes ({allowed})")]
    NotAllowed {
        /// The requested ID.
        id: String,
        /// The configured prefixes, comma-separated, or "none configured".
        allowed: String,
    },
    /// The SPIFFE ID is not a canonical workload ID of this trust domain.
    #[error("{0}")]
    BadId(String),
}

impl MintRefused {
    /// A short label for metrics and the audit log.
    pub fn label(&self) -> &'static str {
        match self {
            Self::TtlTooLong { .. } => "ttl_too_long",
            Self::TtlZero => "ttl_zero",
            Self::NotAllowed { .. } => "prefix_not_allowed",
            Self::BadId(_) => "bad_spiffe_id",
        }
    }
}

impl AdminCertsConfig {
    /// Checks the section against the trust domain `td` (a name, without
    /// scheme); the error names the key.
    pub fn validate(&self, td: &str) -> Result<(), String> {
        if self.max_ttl < Duration::from_secs(1) {
            return Err("admin_certs.max_ttl must be at least 1s".into());
        }
        if self.crl_validity < Duration::from_secs(2) {
            return Err("admin_certs.crl_validity must be at least 2s".into());
        }
        if self.crl_refresh < Duration::from_secs(1) || self.crl_refresh > self.crl_validity / 2 {
            return Err(format!(
                "admin_certs.crl_refresh ({}) must be between 1s and half of crl_validity ({}), \
                 so a CRL is always replaced well before its nextUpdate",
                humantime::format_duration(self.crl_refresh),
                humantime::format_duration(self.crl_validity)
            ));
        }
        let want = meshid_identity::spiffe_id::trust_domain_prefix(td);
        for p in &self.allowed_prefixes {
            let canonical = p.ends_with('/')
                && p.starts_with(&want)
                && p.len() > want.len()
                && meshid_identity::spiffe_id::workload_id(p.trim_end_matches('/')).is_ok();
            if !canonical {
                return Err(format!(
                    "admin_certs.allowed_prefixes: {p:?} must be a canonical SPIFFE ID path of \
                     this trust domain ending in \"/\", like \"{want}admin/\""
                ));
            }
            if p.starts_with(&format!("{want}meshid/")) {
                return Err(format!(
                    "admin_certs.allowed_prefixes: {p:?} is under /meshid/, which is reserved \
                     for meshid's own components"
                ));
            }
        }
        Ok(())
    }

    /// Whether `spiffe_id` may be minted for `ttl`.
    pub fn check_mint(&self, td: &str, spiffe_id: &str, ttl: Duration) -> Result<(), MintRefused> {
        let id = meshid_identity::spiffe_id::workload_id(spiffe_id)
            .map_err(|e| MintRefused::BadId(format!("SPIFFE ID {spiffe_id:?}: {e}")))?;
        if id.trust_domain().as_str() != td {
            return Err(MintRefused::BadId(format!(
                "SPIFFE ID {spiffe_id} is not in trust domain {td}"
            )));
        }
        if !self
            .allowed_prefixes
            .iter()
            .any(|p| spiffe_id.starts_with(p.as_str()))
        {
            return Err(MintRefused::NotAllowed {
                id: spiffe_id.into(),
                allowed: if self.allowed_prefixes.is_empty() {
                    "none configured".into()
                } else {
                    self.allowed_prefixes.join(", ")
                },
            });
        }
        if ttl.is_zero() {
            return Err(MintRefused::TtlZero);
        }
        if ttl > self.max_ttl {
            return Err(MintRefused::TtlTooLong {
                requested: humantime::format_duration(ttl).to_string(),
                max: humantime::format_duration(self.max_ttl).to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cfg() -> AdminCertsConfig {
        AdminCertsConfig {
            allowed_prefixes: vec!["spiffe://td/admin/".into()],
            ..AdminCertsConfig::default()
        }
    }

    #[test]
    fn policy_caps_ttl_and_prefix() {
        let c = cfg();
        let day = Duration::from_secs(86_400);
        assert_eq!(
            c.check_mint("td", "spiffe://td/admin/alice", 7 * day),
            Ok(())
        );
        assert_eq!(
            c.check_mint("td", "spiffe://td/admin/alice", 8 * day)
                .unwrap_err()
                .label(),
            "ttl_too_long"
        );
        // A prefix matches whole path segments only.
        for id in [
            "spiffe://td/adminx/alice",
            "spiffe://td/web",
            "spiffe://td/admin",
        ] {
            assert_eq!(
                c.check_mint("td", id, day).unwrap_err().label(),
                "prefix_not_allowed",
                "{id}"
            );
        }
        assert_eq!(
            c.check_mint("td", "spiffe://other/admin/a", day)
                .unwrap_err()
                .label(),
            "bad_spiffe_id"
        );
        assert_eq!(
            c.check_mint("td", "spiffe://td/admin/../x", day)
                .unwrap_err()
                .label(),
            "bad_spiffe_id"
        );
        assert_eq!(
            c.check_mint("td", "spiffe://td/admin/a", Duration::ZERO)
                .unwrap_err()
                .label(),
            "ttl_zero"
        );
        let none = AdminCertsConfig::default();
        assert!(
            none.check_mint("td", "spiffe://td/admin/a", day)
                .unwrap_err()
                .to_string()
                .contains("none configured")
        );
    }

    #[test]
    fn validate_names_the_bad_key() {
        assert_eq!(cfg().validate("td"), Ok(()));
        for bad in [
            "spiffe://td/admin",
            "spiffe://other/admin/",
            "spiffe://td/",
            "spiffe://td//x/",
            "spiffe://td/meshid/",
        ] {
            let c = AdminCertsConfig {
                allowed_prefixes: vec![bad.into()],
                ..cfg()
            };
            assert!(
                c.validate("td").unwrap_err().contains("allowed_prefixes"),
                "{bad}"
            );
        }
        let c = AdminCertsConfig {
            crl_refresh: Duration::from_secs(3000),
            ..cfg()
        };
        assert!(c.validate("td").unwrap_err().contains("crl_refresh"));
    }
}
