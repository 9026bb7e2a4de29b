//! `meshid server bundle …`: the own bundle and federated bundles.

use std::path::PathBuf;

use anyhow::Context as _;
use meshid_proto::admin::{
    DeleteFederatedBundleRequest, GetBundleRequest, ListFederatedBundlesRequest,
    SetFederatedBundleRequest,
};

use crate::bundle_format;

use super::{AdminArgs, admin_client, status};

#[derive(Debug, Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub(super) enum BundleFormat {
    Pem,
    Spiffe,
}

#[derive(Debug, clap::Subcommand)]
pub(super) enum BundleCmd {
    /// Print this trust domain's bundle.
    Show {
        #[command(flatten)]
        admin: AdminArgs,
        /// pem: the X.509 roots; spiffe: the SPIFFE bundle (JWKS) JSON.
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
    },
    /// Set the bundle of a federated trust domain from a PEM or SPIFFE bundle JSON file.
    Set {
        #[command(flatten)]
        admin: AdminArgs,
        /// Trust domain, e.g. partner.org.
        #[arg(long)]
        trust_domain: String,
        /// File with the bundle (PEM certificates or SPIFFE bundle JSON).
        #[arg(long)]
        path: PathBuf,
    },
    /// List federated bundles.
    List {
        #[command(flatten)]
        admin: AdminArgs,
        /// Output format.
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
    },
    /// Delete a federated bundle.
    Delete {
        #[command(flatten)]
        admin: AdminArgs,
        /// Trust domain.
        #[arg(long)]
        trust_domain: String,
        /// Show what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Save a plan of the change to FILE (what it touches, bound to the
        /// store's state) and change nothing; `meshid server apply FILE` runs it.
        #[arg(long, value_name = "FILE", conflicts_with = "dry_run")]
        plan: Option<std::path::PathBuf>,
    },
}

pub(super) async fn bundle(cmd: BundleCmd) -> anyhow::Result<()> {
    match cmd {
        BundleCmd::Show { admin, format } => {
            let mut c = admin_client(&admin.admin_socket).await?;
            let b = c
                .get_bundle(GetBundleRequest {})
                .await
                .map_err(status)?
                .into_inner();
            match format {
                BundleFormat::Pem => print!("{}", bundle_format::to_pem(&b)),
                BundleFormat::Spiffe => println!(
                    "{}",
                    serde_json::to_string_pretty(&bundle_format::to_spiffe_json(&b)?)?
                ),
            }
        }
        BundleCmd::Set {
            admin,
            trust_domain,
            path,
        } => {
            let data =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let td = meshid_identity::spiffe_id::strip_scheme(&trust_domain).to_string();
            let parsed = bundle_format::parse_with_notes(&td, &data)
                .with_context(|| format!("{}", path.display()))?;
            for why in &parsed.ignored {
                eprintln!("ignored (Trust Domain and Bundle §4.2): {why}");
            }
            let b = parsed.bundle;
            let mut c = admin_client(&admin.admin_socket).await?;
            let b = c
                .set_federated_bundle(SetFederatedBundleRequest { bundle: Some(b) })
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "bundle for {} set: {} X.509 authorit{}, {} JWT key(s), sequence {}",
                meshid_identity::spiffe_id::trust_domain_id(&b.trust_domain),
                b.x509_authorities.len(),
                if b.x509_authorities.len() == 1 {
                    "y"
                } else {
                    "ies"
                },
                b.jwt_authorities.len(),
                b.sequence_number
            );
        }
        BundleCmd::List { admin, format } => {
            let mut c = admin_client(&admin.admin_socket).await?;
            let list = c
                .list_federated_bundles(ListFederatedBundlesRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .bundles;
            for b in &list {
                match format {
                    BundleFormat::Pem => print!(
                        "# {}\n{}",
                        meshid_identity::spiffe_id::trust_domain_id(&b.trust_domain),
                        bundle_format::to_pem(b)
                    ),
                    BundleFormat::Spiffe => println!(
                        "{}\n{}",
                        meshid_identity::spiffe_id::trust_domain_id(&b.trust_domain),
                        serde_json::to_string_pretty(&bundle_format::to_spiffe_json(b)?)?
                    ),
                }
            }
        }
        BundleCmd::Delete {
            admin,
            trust_domain,
            dry_run,
            plan,
        } => {
            if let Some(file) = plan {
                let op = meshid_proto::admin::plan_change_request::Operation::DeleteBundle(
                    DeleteFederatedBundleRequest {
                        trust_domain,
                        dry_run: false,
                    },
                );
                return super::safe_ops::plan(&admin, op, &file).await;
            }
            let mut c = admin_client(&admin.admin_socket).await?;
            let r = c
                .delete_federated_bundle(DeleteFederatedBundleRequest {
                    trust_domain: trust_domain.clone(),
                    dry_run,
                })
                .await
                .map_err(status)?
                .into_inner();
            let verb = if dry_run { "Would delete" } else { "Deleted" };
            println!(
                "{verb} bundle of {trust_domain}; {} entr{} lose it:",
                r.affected_entry_ids.len(),
                if r.affected_entry_ids.len() == 1 {
                    "y"
                } else {
                    "ies"
                }
            );
            for id in r.affected_entry_ids {
                println!("  {id}");
            }
            if dry_run {
                println!("dry run: nothing changed");
            }
        }
    }
    Ok(())
}
