//! `meshid server ca check`: whether the trust material (active and
//! published CAs, JWT keys) outlives a warning window, for monitoring.

use std::time::Duration;

use meshid_proto::admin::{HealthRequest, ListAuthoritiesRequest};
use meshid_proto::types::Authority;

use super::ca_output::{now, ts};
use crate::cli::{AdminArgs, admin_client, status};

pub(super) async fn check(admin: &AdminArgs, warn: Duration) -> anyhow::Result<()> {
    let mut c = admin_client(&admin.admin_socket).await?;
    let mut problems = Vec::new();
    let health = c.health(HealthRequest {}).await;
    let warnings = match health {
        Ok(h) => h.into_inner().warnings,
        Err(e) => {
            problems.push(format!("server not ready: {}", e.message()));
            Vec::new()
        }
    };
    let list = c
        .list_authorities(ListAuthoritiesRequest { all: false })
        .await
        .map_err(status)?
        .into_inner();
    let horizon = now() + i64::try_from(warn.as_secs()).unwrap_or(i64::MAX);
    let rotating = !list.next_transition.is_empty();
    if rotating && list.next_transition_at < now() - 60 {
        problems.push(format!(
            "rotation is overdue: {} was due at {}",
            list.next_transition,
            ts(list.next_transition_at)
        ));
    }
    let usable: Vec<&Authority> = list
        .authorities
        .iter()
        .filter_map(|s| s.authority.as_ref())
        .filter(|a| {
            a.kind == "x509" && (a.state == "active" || a.state == "prepared") && !a.tainted
        })
        .collect();
    let latest = usable.iter().map(|a| a.not_after).max().unwrap_or(0);
    if !rotating && latest < horizon {
        problems.push(format!(
            "the X.509 CA ends at {} (within {}) and nothing rotates it automatically",
            ts(latest),
            humantime::format_duration(warn)
        ));
    }
    // Roots the bundle publishes (the CA itself, or the upstream roots).
    let mut roots_na = Vec::new();
    for a in &usable {
        for r in &a.roots {
            if let Ok((_, cert)) = x509_parser::parse_x509_certificate(r) {
                roots_na.push(cert.validity().not_after.timestamp());
            }
        }
    }
    if let Some(max) = roots_na.iter().max()
        && *max < horizon
        && usable.iter().any(|a| a.origin != "self_signed")
    {
        problems.push(format!(
            "every upstream root ends by {} (within {})",
            ts(*max),
            humantime::format_duration(warn)
        ));
    }
    for w in &warnings {
        println!("warning: {w}");
    }
    if problems.is_empty() {
        println!(
            "trust material OK for the next {}: CA valid until {}{}",
            humantime::format_duration(warn),
            ts(latest),
            if rotating {
                format!(
                    ", next transition {} at {}",
                    list.next_transition,
                    ts(list.next_transition_at)
                )
            } else {
                String::new()
            }
        );
        Ok(())
    } else {
        for p in &problems {
            println!("problem: {p}");
        }
        anyhow::bail!(
            "trust material needs attention within {}",
            humantime::format_duration(warn)
        )
    }
}
