//! What `meshid server ca …` prints: the journal as a table or JSON, and
//! the result of an action (what changed, which live SVIDs and agents it
//! touches).

use std::time::{Duration, SystemTime};

use meshid_proto::admin::{AuthorityActionResponse, ListAuthoritiesResponse};
use meshid_proto::types::Authority;
use serde_json::json;

use super::ca::Output;
use super::ca_rollout::{rollout_json, rollout_text};

pub(super) fn ts(s: i64) -> String {
    if s <= 0 {
        return "-".into();
    }
    humantime::format_rfc3339_seconds(
        SystemTime::UNIX_EPOCH + Duration::from_secs(s.unsigned_abs()),
    )
    .to_string()
}

pub(super) fn now() -> i64 {
    meshid_identity::svid::unix(SystemTime::now())
}

pub(super) fn authority_json(a: &Authority, live: i64, last: i64) -> serde_json::Value {
    json!({
        "id": a.id, "kind": a.kind, "state": a.state, "tainted": a.tainted, "owner": a.owner,
        "serial": a.serial, "origin": a.origin,
        "not_before": a.not_before, "not_after": a.not_after,
        "prepared_at": a.prepared_at, "activated_at": a.activated_at,
        "retired_at": a.retired_at, "tainted_at": a.tainted_at, "removed_at": a.removed_at,
        "live_svids": live, "last_svid_not_after": last,
    })
}

pub(super) fn show(r: &ListAuthoritiesResponse, output: Output) {
    if output == Output::Json {
        println!(
            "{}",
            json!({
                "trust_domain": r.trust_domain,
                "spiffe_id": meshid_identity::spiffe_id::trust_domain_id(&r.trust_domain),
                "next_transition": r.next_transition,
                "next_transition_at": r.next_transition_at,
                "authorities": r.authorities.iter().filter_map(|s| s.authority.as_ref().map(|a| authority_json(a, s.live_svids, s.last_svid_not_after))).collect::<Vec<_>>(),
                "last_rollout": r.last_rollout.as_ref().map(rollout_json),
            })
        );
        return;
    }
    println!(
        "Trust domain {}",
        meshid_identity::spiffe_id::trust_domain_id(&r.trust_domain)
    );
    if !r.next_transition.is_empty() {
        println!(
            "Next transition: {} at {} (in {}s)",
            r.next_transition,
            ts(r.next_transition_at),
            (r.next_transition_at - now()).max(0)
        );
    }
    println!(
        "\n{:<5} {:<9} {:<8} {:<42} {:<21} {:<21} {:>5}",
        "KIND", "STATE", "TAINTED", "ID", "NOT BEFORE", "NOT AFTER", "LIVE"
    );
    for s in &r.authorities {
        let Some(a) = &s.authority else { continue };
        println!(
            "{:<5} {:<9} {:<8} {:<42} {:<21} {:<21} {:>5}",
            a.kind,
            a.state,
            if a.tainted { "yes" } else { "no" },
            a.id,
            ts(a.not_before),
            ts(a.not_after),
            s.live_svids
        );
    }
    if let Some(ro) = &r.last_rollout {
        println!();
        rollout_text(ro);
    }
}

pub(super) fn report(r: &AuthorityActionResponse) {
    println!("{}", r.summary);
    for a in &r.changed {
        println!(
            "  {} {} -> {}{} (until {})",
            a.kind,
            a.id,
            a.state,
            if a.tainted { ", tainted" } else { "" },
            ts(a.not_after)
        );
    }
    if !r.affected.is_empty() {
        println!(
            "{} live SVID(s) affected, held by {} agent(s):",
            r.affected.len(),
            r.affected_agents.len()
        );
        for s in r.affected.iter().take(50) {
            println!(
                "  {} serial {} (agent {}, until {})",
                s.spiffe_id,
                s.serial,
                s.agent_id,
                ts(s.not_after)
            );
        }
        if r.affected.len() > 50 {
            println!("  … and {} more", r.affected.len() - 50);
        }
    }
    if let Some(ro) = &r.rollout {
        rollout_text(ro);
    }
    if r.dry_run {
        println!("dry run: nothing changed");
    }
}
