//! `meshid server agent …`: attested agents (list, ban, evict).

use meshid_proto::admin::{AgentActionRequest, ListAgentsRequest};
use serde_json::json;

use super::{AdminArgs, Output, admin_client, status};

#[derive(Debug, clap::Subcommand)]
pub(super) enum AgentCmd {
    /// List attested agents.
    List {
        #[command(flatten)]
        admin: AdminArgs,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Ban an agent: it can no longer renew or sign anything.
    Ban {
        #[command(flatten)]
        admin: AdminArgs,
        /// Agent SPIFFE ID.
        spiffe_id: String,
        /// Show what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Save a plan of the change to FILE (what it touches, bound to the
        /// store's state) and change nothing; `meshid server apply FILE` runs it.
        #[arg(long, value_name = "FILE", conflicts_with = "dry_run")]
        plan: Option<std::path::PathBuf>,
    },
    /// Evict an agent: forget it; it must attest again (a new join token, or its Kubernetes token).
    Evict {
        #[command(flatten)]
        admin: AdminArgs,
        /// Agent SPIFFE ID.
        spiffe_id: String,
        /// Show what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Save a plan of the change to FILE (what it touches, bound to the
        /// store's state) and change nothing; `meshid server apply FILE` runs it.
        #[arg(long, value_name = "FILE", conflicts_with = "dry_run")]
        plan: Option<std::path::PathBuf>,
    },
}

pub(super) async fn agent(cmd: AgentCmd) -> anyhow::Result<()> {
    match cmd {
        AgentCmd::List { admin, output } => {
            let mut c = admin_client(&admin.admin_socket).await?;
            let list = c
                .list_agents(ListAgentsRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .agents;
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::Value::Array(
                        list.iter()
                            .map(|a| json!({"spiffe_id": a.spiffe_id, "attestor": a.attestor, "serial": a.serial,
                                            "expires_at": a.expires_at, "banned": a.banned, "aliases": a.aliases,
                                            "attested_at": a.attested_at}))
                            .collect()
                    )
                ),
                Output::Text => {
                    println!("Found {} agent{}", list.len(), if list.len() == 1 { "" } else { "s" });
                    for a in &list {
                        println!(
                            "\nSPIFFE ID   : {}\nAttestor    : {}\nSerial      : {}\nExpires at  : {}\nBanned      : {}\nAliases     : {}",
                            a.spiffe_id, a.attestor, a.serial, a.expires_at, a.banned, a.aliases.join(", ")
                        );
                    }
                }
            }
        }
        AgentCmd::Ban {
            admin,
            spiffe_id,
            dry_run,
            plan,
        } => agent_action(&admin, spiffe_id, dry_run, true, plan).await?,
        AgentCmd::Evict {
            admin,
            spiffe_id,
            dry_run,
            plan,
        } => agent_action(&admin, spiffe_id, dry_run, false, plan).await?,
    }
    Ok(())
}

async fn agent_action(
    admin: &AdminArgs,
    spiffe_id: String,
    dry_run: bool,
    ban: bool,
    plan: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let req = AgentActionRequest {
        spiffe_id: spiffe_id.clone(),
        dry_run,
    };
    if let Some(file) = plan {
        use meshid_proto::admin::plan_change_request::Operation;
        let op = if ban {
            Operation::BanAgent(req)
        } else {
            Operation::EvictAgent(req)
        };
        return super::safe_ops::plan(admin, op, &file).await;
    }
    let mut c = admin_client(&admin.admin_socket).await?;
    let r = if ban {
        c.ban_agent(req).await
    } else {
        c.evict_agent(req).await
    }
    .map_err(status)?
    .into_inner();
    let verb = match (ban, dry_run) {
        (true, true) => "Would ban",
        (true, false) => "Banned",
        (false, true) => "Would evict",
        (false, false) => "Evicted",
    };
    let n = r.affected_entry_ids.len();
    println!(
        "{verb} agent {spiffe_id}; {n} entr{} it parents can no longer be renewed through it:",
        if n == 1 { "y" } else { "ies" }
    );
    for id in r.affected_entry_ids {
        println!("  {id}");
    }
    if dry_run {
        println!("dry run: nothing changed");
    }
    Ok(())
}
