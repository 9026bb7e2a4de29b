//! `[safe_ops]`: approvals, blast-radius limits, how long undo and plans last.

use std::time::Duration;

use serde::Deserialize;

/// `[safe_ops]` of the server config.
///
/// ```toml
/// [safe_ops]
/// require_approval = false      # plans need a second admin's approval
/// max_blast_radius_count = 10   # entries or agents one change may touch
/// max_blast_radius_share = 0.25 # share of all entries or agents
/// undo_window = "24h"
/// plan_ttl = "1h"
/// canary_share = 0.0            # CA activations reach this share of agents first
/// canary_timeout = "60s"        # how long the canaries have to answer
/// ```
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SafeOpsConfig {
    /// A plan must be approved by an admin other than its author before
    /// it is applied.
    pub require_approval: bool,
    /// A change touching more entries or agents than this is over the limit.
    pub max_blast_radius_count: u64,
    /// A change touching more than this share of all entries or agents
    /// is over the limit.
    pub max_blast_radius_share: f64,
    /// How long deleted entries and evicted agents can be restored.
    #[serde(with = "humantime_serde")]
    pub undo_window: Duration,
    /// How long a plan can be applied after it was made.
    #[serde(with = "humantime_serde")]
    pub plan_ttl: Duration,
    /// Share of agents (0 to 1) an operator's CA activation is sent to
    /// first, as a self-test; 0 activates at once.
    pub canary_share: f64,
    /// How long the canary agents have to acknowledge a trust change
    /// before it halts.
    #[serde(with = "humantime_serde")]
    pub canary_timeout: Duration,
}

impl Default for SafeOpsConfig {
    fn default() -> Self {
        Self {
            require_approval: false,
            max_blast_radius_count: 10,
            max_blast_radius_share: 0.25,
            undo_window: Duration::from_secs(24 * 3600),
            plan_ttl: Duration::from_secs(3600),
            canary_share: 0.0,
            canary_timeout: Duration::from_secs(60),
        }
    }
}

impl SafeOpsConfig {
    /// Checks the section; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.max_blast_radius_share > 0.0 && self.max_blast_radius_share <= 1.0) {
            return Err("safe_ops.max_blast_radius_share must be in (0, 1]".into());
        }
        if !(0.0..=1.0).contains(&self.canary_share) {
            return Err("safe_ops.canary_share must be in [0, 1]".into());
        }
        if self.canary_timeout < Duration::from_secs(1) {
            return Err("safe_ops.canary_timeout must be at least 1s".into());
        }
        if self.plan_ttl < Duration::from_secs(1) {
            return Err("safe_ops.plan_ttl must be at least 1s".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Wrap {
        safe_ops: SafeOpsConfig,
    }

    #[test]
    fn parses_humantime_and_refuses_unknown_keys() {
        let w: Wrap = toml::from_str(
            "[safe_ops]\nrequire_approval = true\nundo_window = \"2h\"\nplan_ttl = \"5m\"\n",
        )
        .expect("parse");
        assert!(w.safe_ops.require_approval);
        assert_eq!(w.safe_ops.undo_window, Duration::from_secs(7200));
        assert_eq!(w.safe_ops.plan_ttl, Duration::from_secs(300));
        assert_eq!(w.safe_ops.max_blast_radius_count, 10);
        assert!(toml::from_str::<Wrap>("[safe_ops]\nbogus = 1\n").is_err());
        let bad = SafeOpsConfig {
            max_blast_radius_share: 1.5,
            ..SafeOpsConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}
