//! Blast-radius limits: how much of the registry one change may touch
//! before it needs `--yes` (or, with approvals on, an approval).

use serde::{Deserialize, Serialize};

use super::SafeOpsConfig;

/// How much of the registry a change touches.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BlastRadius {
    /// Entries the change removes or cuts off.
    pub entries: u64,
    /// All entries in the registry.
    pub total_entries: u64,
    /// Agents the change bans or evicts.
    pub agents: u64,
    /// All agents.
    pub total_agents: u64,
}

impl BlastRadius {
    /// Why the change is over the limits of `cfg`, or `None` within them.
    /// A change is over when it touches more than `max_blast_radius_count`
    /// entries (or agents), or more than `max_blast_radius_share` of all
    /// entries (or of all agents).
    pub fn over_limit(&self, cfg: &SafeOpsConfig) -> Option<String> {
        let mut why = Vec::new();
        for (what, n, total) in [
            ("entries", self.entries, self.total_entries),
            ("agents", self.agents, self.total_agents),
        ] {
            if n > cfg.max_blast_radius_count {
                why.push(format!(
                    "{n} {what} is more than max_blast_radius_count ({})",
                    cfg.max_blast_radius_count
                ));
            }
            if total > 0 && share(n, total) > cfg.max_blast_radius_share {
                why.push(format!(
                    "{n} of {total} {what} ({:.0}%) is more than max_blast_radius_share ({:.0}%)",
                    share(n, total) * 100.0,
                    cfg.max_blast_radius_share * 100.0
                ));
            }
        }
        (!why.is_empty()).then(|| why.join("; "))
    }
}

#[allow(clippy::cast_precision_loss)] // counts far below 2^52
fn share(n: u64, total: u64) -> f64 {
    n as f64 / total as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn radius(entries: u64, total_entries: u64) -> BlastRadius {
        BlastRadius {
            entries,
            total_entries,
            agents: 0,
            total_agents: 0,
        }
    }

    #[test]
    fn count_or_share_over_the_limit() {
        let cfg = SafeOpsConfig::default();
        assert_eq!(radius(2, 10).over_limit(&cfg), None);
        assert_eq!(radius(10, 100).over_limit(&cfg), None);
        let why = radius(4, 10).over_limit(&cfg).expect("40% is over 25%");
        assert!(why.contains("40%"), "{why}");
        let why = radius(11, 1000).over_limit(&cfg).expect("11 is over 10");
        assert!(why.contains("max_blast_radius_count"), "{why}");
        let agents = BlastRadius {
            entries: 0,
            total_entries: 0,
            agents: 1,
            total_agents: 2,
        };
        assert!(agents.over_limit(&cfg).is_some());
    }
}
