//! `meshid server ca …`: the CA journal for operators. Shows every X.509 CA
//! and JWT key with its state; moves them by hand (prepare, activate,
//! retire, taint, revoke, import), each with `--dry-run` that prints exactly
//! what would change and which certificates and agents are affected; and
//! checks that the trust material will not expire within a window.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use meshid_proto::admin::{AuthorityActionRequest, ImportAuthorityRequest, ListAuthoritiesRequest};

use super::ca_check::check;
pub(super) use super::ca_output::ts;
use super::ca_output::{report, show};
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
