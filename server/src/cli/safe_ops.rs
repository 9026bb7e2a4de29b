//! Safe operations from the command line: `--plan FILE` on `entry delete`,
//! `agent ban|evict` and `bundle delete`; `meshid server approve|apply FILE`,
//! `undo <change-id>`, `changes list`.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use meshid_proto::admin::admin_safe_ops_client::AdminSafeOpsClient;
use meshid_proto::admin::plan_change_request::Operation;
use meshid_proto::admin::{
    ApplyPlanRequest, ApprovePlanRequest, ListChangesRequest, PlanChangeRequest, UndoChangeRequest,
};
use serde_json::json;

use super::{AdminArgs, Output, admin_channel, status};
use crate::safe_ops::Plan;

/// Safe-operation commands of `meshid server`.
#[derive(Debug, clap::Subcommand)]
pub(super) enum SafeOpsCmd {
    /// Approve a plan made by another admin (required before apply with
    /// `[safe_ops] require_approval`).
    Approve {
        #[command(flatten)]
        admin: AdminArgs,
        /// The plan file (from `--plan FILE`).
        file: PathBuf,
    },
    /// Apply a plan, only if nothing it touches changed since it was made.
    Apply {
        #[command(flatten)]
        admin: AdminArgs,
        /// The plan file (from `--plan FILE`).
        file: PathBuf,
        /// Apply a plan over the blast-radius limits (after reviewing it).
        #[arg(long)]
        yes: bool,
    },
    /// Restore what a change deleted or evicted (within `undo_window`).
    Undo {
        #[command(flatten)]
        admin: AdminArgs,
        /// The change id (`meshid server changes list`).
        change_id: String,
    },
    /// Changes applied through plans.
    #[command(subcommand)]
    Changes(ChangesCmd),
}

/// `meshid server changes …`.
#[derive(Debug, clap::Subcommand)]
pub(super) enum ChangesCmd {
    /// List changes, newest first: id, time, kind, actor, counts, undone.
    List {
        #[command(flatten)]
        admin: AdminArgs,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

async fn client(
    admin: &AdminArgs,
) -> anyhow::Result<AdminSafeOpsClient<tonic::transport::Channel>> {
    Ok(AdminSafeOpsClient::new(
        admin_channel(&admin.admin_socket).await?,
    ))
}

fn read_plan(file: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(file).with_context(|| format!("reading plan {}", file.display()))
}

/// Makes a plan of `op` on the server, prints it and saves it to `file`.
pub(super) async fn plan(admin: &AdminArgs, op: Operation, file: &Path) -> anyhow::Result<()> {
    let r = client(admin)
        .await?
        .plan_change(PlanChangeRequest {
            operation: Some(op),
        })
        .await
        .map_err(status)?
        .into_inner();
    std::fs::write(file, &r.plan).with_context(|| format!("writing plan {}", file.display()))?;
    let p = Plan::from_file(&r.plan).context("the server's plan does not parse")?;
    for line in p.summary() {
        println!("{line}");
    }
    println!("plan saved to {}; nothing changed yet", file.display());
    if r.require_approval {
        println!(
            "next: another admin runs `meshid server approve {f}`, then `meshid server apply {f}`",
            f = file.display()
        );
    } else if !r.over_limit.is_empty() {
        println!(
            "next: `meshid server apply {} --yes` (over the blast-radius limit)",
            file.display()
        );
    } else {
        println!("next: `meshid server apply {}`", file.display());
    }
    Ok(())
}

/// Runs a safe-operation command.
pub(super) async fn run(cmd: SafeOpsCmd) -> anyhow::Result<()> {
    match cmd {
        SafeOpsCmd::Approve { admin, file } => {
            let r = client(&admin)
                .await?
                .approve_plan(ApprovePlanRequest {
                    plan: read_plan(&file)?,
                })
                .await
                .map_err(status)?
                .into_inner();
            println!("plan {} approved by {}", r.plan_id, r.approver);
        }
        SafeOpsCmd::Apply { admin, file, yes } => {
            let r = client(&admin)
                .await?
                .apply_plan(ApplyPlanRequest {
                    plan: read_plan(&file)?,
                    yes,
                })
                .await
                .map_err(status)?
                .into_inner();
            println!("applied as change {}", r.change_id);
            if r.undo_until > 0 {
                println!(
                    "undo until {} with `meshid server undo {}`",
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH
                            + std::time::Duration::from_secs(r.undo_until.unsigned_abs())
                    ),
                    r.change_id
                );
            }
        }
        SafeOpsCmd::Undo { admin, change_id } => {
            let r = client(&admin)
                .await?
                .undo_change(UndoChangeRequest {
                    change_id: change_id.clone(),
                })
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "undid change {change_id}: restored {} entries, {} agents, {} bundles",
                r.restored_entry_ids.len(),
                r.restored_agents.len(),
                r.restored_bundles.len()
            );
            for id in r
                .restored_entry_ids
                .iter()
                .chain(&r.restored_agents)
                .chain(&r.restored_bundles)
            {
                println!("  {id}");
            }
        }
        SafeOpsCmd::Changes(ChangesCmd::List {
            admin,
            limit,
            output,
        }) => {
            let list = client(&admin)
                .await?
                .list_changes(ListChangesRequest { limit })
                .await
                .map_err(status)?
                .into_inner()
                .changes;
            let time = |t: i64| {
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.unsigned_abs()),
                )
                .to_string()
            };
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::Value::Array(
                        list.iter()
                            .map(|c| json!({"id": c.id, "time": c.created_at, "kind": c.kind,
                                            "actor": c.actor, "entries": c.entries, "agents": c.agents,
                                            "live_svids": c.live_svids, "undone": c.undone,
                                            "undo_until": c.undo_until, "plan": c.plan_id}))
                            .collect()
                    )
                ),
                Output::Text => {
                    println!(
                        "{:<36}  {:<20}  {:<13}  {:<10}  {:>7}  {:>6}  {:>10}  UNDONE",
                        "ID", "TIME", "KIND", "ACTOR", "ENTRIES", "AGENTS", "LIVE_SVIDS"
                    );
                    for c in &list {
                        println!(
                            "{:<36}  {:<20}  {:<13}  {:<10}  {:>7}  {:>6}  {:>10}  {}",
                            c.id,
                            time(c.created_at),
                            c.kind,
                            c.actor,
                            c.entries,
                            c.agents,
                            c.live_svids,
                            if c.undone { "yes" } else { "no" }
                        );
                    }
                }
            }
        }
    }
    Ok(())
}
