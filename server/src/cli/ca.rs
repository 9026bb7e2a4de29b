//! `meshid server ca …`: the CA journal for operators. Shows every X.509 CA
//! and JWT key with its state; moves them by hand (prepare, activate,
//! retire, taint, revoke, import), each with `--dry-run` that prints exactly
//! what would change and which certificates and agents are affected; and
//! checks that the trust material will not expire within a window.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use meshid_proto::admin::{
    AuthorityActionRequest, AuthorityActionResponse, HealthRequest, ImportAuthorityRequest,
    ListAuthoritiesRequest, ListAuthoritiesResponse,
};
use meshid_proto::types::Authority;
use serde_json::json;

use super::ca_rollout::{RolloutCmd, parse_percent, rollout_json, rollout_text};
use crate::cli::{AdminArgs, admin_client, status};

/// Which kind of authority.
#[derive(Debug, Clone, Copy, clap::ValueEnum, PartialEq, Eq, Default)]
pub enum Kind {
    /// The X.509 signing CA.
    #[default]
    X509,
    /// The JWT-SVID signing key.
    Jwt,
}

impl Kind {
    fn wire(self) -> String {
        match self {
            Kind::X509 => "x509".into(),
            Kind::Jwt => "jwt".into(),
        }
    }
}

/// Output format of `ca show`.
#[derive(Debug, Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum Output {
    /// A table.
    Text,
    /// One JSON document.
    Json,
}

/// `meshid server ca`.
#[derive(Debug, clap::Subcommand)]
pub enum CaCmd {
    /// Every X.509 CA and JWT key: state, validity, serial, live SVIDs each
    /// signed, and the server's next scheduled transition.
    Show {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// Include removed authorities.
        #[arg(long)]
        all: bool,
    },
    /// Make the next authority now: published in the bundle at once, signing
    /// nothing until activated. With --upstream-csr, make a key and write a
    /// CSR for an offline upstream CA to sign (then `ca import`).
    Prepare {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long, value_enum, default_value_t = Kind::X509)]
        kind: Kind,
        /// Write the CSR for the next intermediate here (PEM).
        #[arg(long, value_name = "FILE")]
        upstream_csr: Option<PathBuf>,
        /// Print what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Activate the prepared authority (or ID): it signs from now on, and
    /// the active one retires; what the old one signed stays valid until it
    /// expires.
    Activate {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long, value_enum, default_value_t = Kind::X509)]
        kind: Kind,
        /// Authority id (default: the prepared one).
        id: Option<String>,
        #[arg(long)]
        dry_run: bool,
        /// Send the activation to this share of agents first (e.g. 25%); it
        /// applies to all only when every canary acknowledged (default: the
        /// server's `[safe_ops] canary_share`).
        #[arg(long, value_name = "N%", value_parser = parse_percent, conflicts_with = "no_canary")]
        canary: Option<u32>,
        /// Activate at once, without a canary stage (emergencies).
        #[arg(long)]
        no_canary: bool,
    },
    /// Staged trust changes (canary agents first).
    Rollout {
        #[command(subcommand)]
        cmd: RolloutCmd,
    },
    /// Retire a prepared or pending authority that must never sign (it
    /// leaves the bundle by itself).
    Retire {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long, value_enum, default_value_t = Kind::X509)]
        kind: Kind,
        /// Authority id.
        id: String,
        #[arg(long)]
        dry_run: bool,
    },
    /// Distrust a non-active authority after a compromise: agents re-mint
    /// everything it signed now. Then `ca revoke` it.
    Taint {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long, value_enum, default_value_t = Kind::X509)]
        kind: Kind,
        /// Authority id.
        id: String,
        #[arg(long)]
        dry_run: bool,
        /// Send the taint to this share of agents first (e.g. 25%) (default:
        /// the server's `[safe_ops] canary_share`).
        #[arg(long, value_name = "N%", value_parser = parse_percent, conflicts_with = "no_canary")]
        canary: Option<u32>,
        /// Taint at once, without a canary stage (emergencies).
        #[arg(long)]
        no_canary: bool,
    },
    /// Remove a non-active authority from the bundle now. Refused while live
    /// SVIDs depend on it, unless --force --yes.
    Revoke {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long, value_enum, default_value_t = Kind::X509)]
        kind: Kind,
        /// Authority id.
        id: String,
        #[arg(long)]
        dry_run: bool,
        /// Revoke although live SVIDs depend on it (they stop verifying).
        #[arg(long)]
        force: bool,
        /// Confirm a revocation that invalidates live SVIDs.
        #[arg(long)]
        yes: bool,
    },
    /// Install an intermediate CA signed offline (PEM: the intermediate,
    /// then any upstream intermediates) for the pending key, as prepared.
    Import {
        #[command(flatten)]
        admin: AdminArgs,
        /// The signed certificate chain (PEM).
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        #[arg(long)]
        dry_run: bool,
    },
    /// Exit non-zero when the trust material needs attention within the
    /// window: the server is not ready, rotation is overdue, or (without
    /// automatic rotation) the CA ends within it, or every root does.
    Check {
        #[command(flatten)]
        admin: AdminArgs,
        /// How far ahead to look, e.g. 24h.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
        warn: Duration,
    },
}

pub(super) fn ts(s: i64) -> String {
    if s <= 0 {
        return "-".into();
    }
    humantime::format_rfc3339_seconds(
        SystemTime::UNIX_EPOCH + Duration::from_secs(s.unsigned_abs()),
    )
    .to_string()
}

fn now() -> i64 {
    meshid_identity::svid::unix(SystemTime::now())
}

fn authority_json(a: &Authority, live: i64, last: i64) -> serde_json::Value {
    json!({
        "id": a.id, "kind": a.kind, "state": a.state, "tainted": a.tainted, "owner": a.owner,
        "serial": a.serial, "origin": a.origin,
        "not_before": a.not_before, "not_after": a.not_after,
        "prepared_at": a.prepared_at, "activated_at": a.activated_at,
        "retired_at": a.retired_at, "tainted_at": a.tainted_at, "removed_at": a.removed_at,
        "live_svids": live, "last_svid_not_after": last,
    })
}

fn show(r: &ListAuthoritiesResponse, output: Output) {
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

fn report(r: &AuthorityActionResponse) {
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

/// Runs `meshid server ca …`.
pub async fn run(cmd: CaCmd) -> anyhow::Result<()> {
    let req = |kind: Kind, id: Option<String>, dry_run: bool| AuthorityActionRequest {
        kind: kind.wire(),
        id: id.unwrap_or_default(),
        dry_run,
        ..AuthorityActionRequest::default()
    };
    match cmd {
        CaCmd::Show { admin, output, all } => {
            let mut c = admin_client(&admin.admin_socket).await?;
            let r = c
                .list_authorities(ListAuthoritiesRequest { all })
                .await
                .map_err(status)?
                .into_inner();
            show(&r, output);
        }
        CaCmd::Prepare {
            admin,
            kind,
            upstream_csr,
            dry_run,
        } => {
            let mut c = admin_client(&admin.admin_socket).await?;
            let r = c
                .prepare_authority(AuthorityActionRequest {
                    upstream_csr: upstream_csr.is_some(),
                    ..req(kind, None, dry_run)
                })
                .await
                .map_err(status)?
                .into_inner();
            if let Some(path) = upstream_csr
                && !r.csr_pem.is_empty()
            {
                std::fs::write(&path, &r.csr_pem)
                    .with_context(|| format!("writing the CSR to {}", path.display()))?;
                println!(
                    "CSR for the next intermediate written to {}",
                    path.display()
                );
            }
            report(&r);
        }
        CaCmd::Activate {
            admin,
            kind,
            id,
            dry_run,
            canary,
            no_canary,
        } => {
            let mut c = admin_client(&admin.admin_socket).await?;
            let r = c
                .activate_authority(AuthorityActionRequest {
                    canary_percent: canary.unwrap_or(0),
                    no_canary,
                    ..req(kind, id, dry_run)
                })
                .await
                .map_err(status)?
                .into_inner();
            report(&r);
        }
        CaCmd::Retire {
            admin,
            kind,
            id,
            dry_run,
        } => {
            let mut c = admin_client(&admin.admin_socket).await?;
            let r = c
                .retire_authority(req(kind, Some(id), dry_run))
                .await
                .map_err(status)?
                .into_inner();
            report(&r);
        }
        CaCmd::Taint {
            admin,
            kind,
            id,
            dry_run,
            canary,
            no_canary,
        } => {
            let mut c = admin_client(&admin.admin_socket).await?;
            let r = c
                .taint_authority(AuthorityActionRequest {
                    canary_percent: canary.unwrap_or(0),
                    no_canary,
                    ..req(kind, Some(id), dry_run)
                })
                .await
                .map_err(status)?
                .into_inner();
            report(&r);
        }
        CaCmd::Revoke {
            admin,
            kind,
            id,
            dry_run,
            force,
            yes,
        } => {
            let mut c = admin_client(&admin.admin_socket).await?;
            let r = c
                .revoke_authority(AuthorityActionRequest {
                    force,
                    yes,
                    ..req(kind, Some(id), dry_run)
                })
                .await
                .map_err(status)?
                .into_inner();
            report(&r);
            if r.needs_confirmation && !r.dry_run {
                anyhow::bail!("not revoked: confirm with --yes");
            }
        }
        CaCmd::Import {
            admin,
            cert,
            dry_run,
        } => {
            let pem =
                std::fs::read(&cert).with_context(|| format!("reading {}", cert.display()))?;
            let chain: Vec<Vec<u8>> = meshid_identity::pem::parse_certs(&pem)
                .with_context(|| format!("{} holds no PEM certificate", cert.display()))?
                .into_iter()
                .map(|c| c.to_vec())
                .collect();
            let mut c = admin_client(&admin.admin_socket).await?;
            let r = c
                .import_authority(ImportAuthorityRequest { chain, dry_run })
                .await
                .map_err(status)?
                .into_inner();
            report(&r);
        }
        CaCmd::Check { admin, warn } => check(&admin, warn).await?,
        CaCmd::Rollout {
            cmd: RolloutCmd::Status { admin, output },
        } => {
            let mut c = admin_client(&admin.admin_socket).await?;
            let r = c
                .list_authorities(ListAuthoritiesRequest { all: false })
                .await
                .map_err(status)?
                .into_inner();
            match (&r.last_rollout, output) {
                (Some(ro), Output::Json) => println!("{}", rollout_json(ro)),
                (None, Output::Json) => println!("null"),
                (Some(ro), Output::Text) => rollout_text(ro),
                (None, Output::Text) => println!("no staged trust change has run on this server"),
            }
        }
    }
    Ok(())
}

async fn check(admin: &AdminArgs, warn: Duration) -> anyhow::Result<()> {
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
