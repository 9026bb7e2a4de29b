//! `meshid server ca rollout …` and the output of staged trust changes
//! (`ca activate` / `ca taint` with `--canary`): the canaries, their
//! verdicts, and why a rollout halted.

use meshid_proto::admin::TrustRollout;
use serde_json::json;

use super::ca::{Output, ts};
use crate::cli::AdminArgs;

/// `meshid server ca rollout`.
#[derive(Debug, clap::Subcommand)]
pub enum RolloutCmd {
    /// The running or latest staged trust change: its canaries, their
    /// verdicts, and why it halted.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

/// `25%` or `25`: a share of agents, 1 to 100.
pub(super) fn parse_percent(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .trim()
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{s:?} is not a percentage (e.g. 25%)"))?;
    if (1..=100).contains(&n) {
        Ok(n)
    } else {
        Err("the canary share must be between 1% and 100%".into())
    }
}

pub(super) fn rollout_json(r: &TrustRollout) -> serde_json::Value {
    json!({
        "id": r.id, "change": r.change, "kind": r.kind, "authority_id": r.authority_id,
        "state": r.state, "reason": r.reason, "other_agents": r.other_agents,
        "started_at": r.started_at, "finished_at": r.finished_at,
        "canaries": r.canaries.iter().map(|c| json!({
            "agent_id": c.agent_id, "verdict": c.verdict, "reason": c.reason,
        })).collect::<Vec<_>>(),
    })
}

pub(super) fn rollout_text(r: &TrustRollout) {
    println!(
        "Trust rollout {}: {} {} authority {}: {} (started {}{})",
        r.id,
        r.change,
        r.kind,
        r.authority_id,
        r.state,
        ts(r.started_at),
        if r.finished_at > 0 {
            format!(", finished {}", ts(r.finished_at))
        } else {
            String::new()
        }
    );
    if !r.reason.is_empty() {
        println!("  why: {}", r.reason);
    }
    for c in &r.canaries {
        println!(
            "  canary {}: {}{}",
            c.agent_id,
            c.verdict,
            if c.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", c.reason)
            }
        );
    }
    println!(
        "  {} other agent(s) {}",
        r.other_agents,
        if r.state == "completed" {
            "received the change"
        } else {
            "did not receive the change"
        }
    );
}
