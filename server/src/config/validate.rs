//! Checks of a parsed configuration: ranges, and values that must agree.

use std::time::Duration;

use super::{ConfigError, ServerConfig};

impl ServerConfig {
    /// Refuses values out of range or inconsistent with one another.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
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
        if self.journal_retention > Duration::from_secs(3650 * 24 * 3600) {
            return Err(ConfigError::Invalid(
                "journal_retention must be at most 3650 days".into(),
            ));
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
}
