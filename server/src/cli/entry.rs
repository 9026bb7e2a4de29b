//! `meshid server entry …`: registration entries.

use std::time::Duration;

use meshid_proto::admin::plan_change_request::Operation;
use meshid_proto::admin::{
    CreateEntryRequest, DeleteEntriesRequest, EntryFilter, GetEntryRequest, ListEntriesRequest,
    UpdateEntryRequest,
};
use meshid_proto::types::{Entry, Selector};
use serde_json::json;

use super::{AdminArgs, Output, admin_client, secs, status};

#[derive(Debug, clap::Args)]
pub(super) struct FilterArgs {
    /// Only entries with this parent ID.
    #[arg(long)]
    parent_id: Option<String>,
    /// Only entries with this SPIFFE ID.
    #[arg(long)]
    spiffe_id: Option<String>,
    /// Only entries with all of these selectors (type:key:value).
    #[arg(long = "selector", value_parser = parse_selector)]
    selectors: Vec<Selector>,
}

impl FilterArgs {
    fn to_filter(&self) -> EntryFilter {
        EntryFilter {
            parent_id: self.parent_id.clone().unwrap_or_default(),
            spiffe_id: self.spiffe_id.clone().unwrap_or_default(),
            selectors: self.selectors.clone(),
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub(super) enum EntryCmd {
    /// Create a registration entry; prints its id.
    Create {
        #[command(flatten)]
        admin: AdminArgs,
        /// SPIFFE ID of the agent (or agent alias) that may mint it.
        #[arg(long)]
        parent_id: String,
        /// SPIFFE ID the workload receives.
        #[arg(long)]
        spiffe_id: String,
        /// Workload selector, type:key:value, e.g. unix:uid:1000 (repeatable; all must match).
        #[arg(long = "selector", required = true, value_parser = parse_selector)]
        selectors: Vec<Selector>,
        /// X509-SVID TTL, e.g. 1h (default: the server's default_svid_ttl).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// JWT-SVID TTL (default: the server's default_jwt_svid_ttl).
        #[arg(long, value_parser = humantime::parse_duration)]
        jwt_ttl: Option<Duration>,
        /// DNS SAN (repeatable).
        #[arg(long = "dns")]
        dns_names: Vec<String>,
        /// Hint telling the workload what this SVID is for.
        #[arg(long)]
        hint: Option<String>,
        /// Trust domain whose bundle the workload receives (repeatable).
        #[arg(long = "federates-with")]
        federates_with: Vec<String>,
        /// Mark the entry as an admin workload.
        #[arg(long)]
        admin_entry: bool,
    },
    /// List entries.
    List {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        filter: FilterArgs,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Show one entry.
    Show {
        #[command(flatten)]
        admin: AdminArgs,
        /// Entry id.
        id: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Update an entry: only the fields given change (repeatable flags replace the list).
    Update {
        #[command(flatten)]
        admin: AdminArgs,
        /// Entry id.
        id: String,
        #[arg(long)]
        /// New parent ID.
        parent_id: Option<String>,
        /// New SPIFFE ID.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// New selectors (replace all).
        #[arg(long = "selector", value_parser = parse_selector)]
        selectors: Vec<Selector>,
        /// New X509-SVID TTL.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// New JWT-SVID TTL.
        #[arg(long, value_parser = humantime::parse_duration)]
        jwt_ttl: Option<Duration>,
        /// New DNS names (replace all).
        #[arg(long = "dns")]
        dns_names: Vec<String>,
        /// New hint.
        #[arg(long)]
        hint: Option<String>,
        /// New federated trust domains (replace all).
        #[arg(long = "federates-with")]
        federates_with: Vec<String>,
        /// Show what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete entries by id, or every entry matching a filter.
    Delete {
        #[command(flatten)]
        admin: AdminArgs,
        /// Entry ids.
        ids: Vec<String>,
        #[command(flatten)]
        filter: FilterArgs,
        /// Required to delete every entry (an empty filter).
        #[arg(long)]
        all: bool,
        /// Show exactly which entries would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Save a plan of the change to FILE (what it touches, bound to the
        /// store's state) and change nothing; `meshid server apply FILE` runs it.
        #[arg(long, value_name = "FILE", conflicts_with = "dry_run")]
        plan: Option<std::path::PathBuf>,
    },
}

/// Parses a `type:value` selector as the CLI takes it (`unix:uid:1000`:
/// type `unix`, value `uid:1000`); the admin API checks it again.
pub fn parse_selector(s: &str) -> Result<Selector, String> {
    match s.split_once(':') {
        Some((t, v)) if !t.is_empty() && !v.is_empty() => Ok(Selector {
            r#type: t.into(),
            value: v.into(),
        }),
        _ => Err(format!(
            "selector {s:?} must look like type:key:value, e.g. unix:uid:1000"
        )),
    }
}

fn fmt_ttl(s: i64) -> String {
    if s == 0 {
        "default".into()
    } else {
        humantime::format_duration(Duration::from_secs(s.unsigned_abs())).to_string()
    }
}

fn entry_json(e: &Entry) -> serde_json::Value {
    json!({
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "parent_id": e.parent_id,
        "selectors": e.selectors.iter().map(|s| format!("{}:{}", s.r#type, s.value)).collect::<Vec<_>>(),
        "x509_svid_ttl": e.x509_svid_ttl,
        "jwt_svid_ttl": e.jwt_svid_ttl,
        "dns_names": e.dns_names,
        "hint": e.hint,
        "federates_with": e.federates_with,
        "admin": e.admin,
        "revision": e.revision,
        "created_at": e.created_at,
    })
}

fn entry_text(e: &Entry) -> String {
    let mut s = format!(
        "Entry ID       : {}\nSPIFFE ID      : {}\nParent ID      : {}\nRevision       : {}\nX509-SVID TTL  : {}\nJWT-SVID TTL   : {}\n",
        e.id,
        e.spiffe_id,
        e.parent_id,
        e.revision,
        fmt_ttl(e.x509_svid_ttl),
        fmt_ttl(e.jwt_svid_ttl)
    );
    for sel in &e.selectors {
        s += &format!("Selector       : {}:{}\n", sel.r#type, sel.value);
    }
    for d in &e.dns_names {
        s += &format!("DNS name       : {d}\n");
    }
    for f in &e.federates_with {
        s += &format!("Federates with : {f}\n");
    }
    if !e.hint.is_empty() {
        s += &format!("Hint           : {}\n", e.hint);
    }
    if e.admin {
        s += "Admin          : true\n";
    }
    s
}

fn entry_diff(a: &Entry, b: &Entry) -> Vec<String> {
    let (ja, jb) = (entry_json(a), entry_json(b));
    let mut out = Vec::new();
    for k in [
        "spiffe_id",
        "parent_id",
        "selectors",
        "x509_svid_ttl",
        "jwt_svid_ttl",
        "dns_names",
        "hint",
        "federates_with",
        "admin",
    ] {
        if ja[k] != jb[k] {
            out.push(format!("  {k}: {} -> {}", ja[k], jb[k]));
        }
    }
    out
}

pub(super) async fn entry(cmd: EntryCmd) -> anyhow::Result<()> {
    match cmd {
        EntryCmd::Create {
            admin,
            parent_id,
            spiffe_id,
            selectors,
            ttl,
            jwt_ttl,
            dns_names,
            hint,
            federates_with,
            admin_entry,
        } => {
            let mut c = admin_client(&admin.admin_socket).await?;
            let e = Entry {
                spiffe_id,
                parent_id,
                selectors,
                x509_svid_ttl: secs(ttl),
                jwt_svid_ttl: secs(jwt_ttl),
                dns_names,
                hint: hint.unwrap_or_default(),
                federates_with,
                admin: admin_entry,
                ..Entry::default()
            };
            let e = c
                .create_entry(CreateEntryRequest { entry: Some(e) })
                .await
                .map_err(status)?
                .into_inner();
            println!("{}", e.id);
        }
        EntryCmd::List {
            admin,
            filter,
            output,
        } => {
            let mut c = admin_client(&admin.admin_socket).await?;
            let list = c
                .list_entries(ListEntriesRequest {
                    filter: Some(filter.to_filter()),
                })
                .await
                .map_err(status)?
                .into_inner()
                .entries;
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::Value::Array(list.iter().map(entry_json).collect())
                ),
                Output::Text => {
                    println!(
                        "Found {} entr{}",
                        list.len(),
                        if list.len() == 1 { "y" } else { "ies" }
                    );
                    for e in &list {
                        println!("\n{}", entry_text(e).trim_end());
                    }
                }
            }
        }
        EntryCmd::Show { admin, id, output } => {
            let mut c = admin_client(&admin.admin_socket).await?;
            let e = c
                .get_entry(GetEntryRequest { id })
                .await
                .map_err(status)?
                .into_inner();
            match output {
                Output::Json => println!("{}", entry_json(&e)),
                Output::Text => print!("{}", entry_text(&e)),
            }
        }
        EntryCmd::Update {
            admin,
            id,
            parent_id,
            spiffe_id,
            selectors,
            ttl,
            jwt_ttl,
            dns_names,
            hint,
            federates_with,
            dry_run,
        } => {
            let mut c = admin_client(&admin.admin_socket).await?;
            let mut e = c
                .get_entry(GetEntryRequest { id })
                .await
                .map_err(status)?
                .into_inner();
            if let Some(p) = parent_id {
                e.parent_id = p;
            }
            if let Some(s) = spiffe_id {
                e.spiffe_id = s;
            }
            if !selectors.is_empty() {
                e.selectors = selectors;
            }
            if ttl.is_some() {
                e.x509_svid_ttl = secs(ttl);
            }
            if jwt_ttl.is_some() {
                e.jwt_svid_ttl = secs(jwt_ttl);
            }
            if !dns_names.is_empty() {
                e.dns_names = dns_names;
            }
            if let Some(h) = hint {
                e.hint = h;
            }
            if !federates_with.is_empty() {
                e.federates_with = federates_with;
            }
            let r = c
                .update_entry(UpdateEntryRequest {
                    entry: Some(e),
                    dry_run,
                })
                .await
                .map_err(status)?
                .into_inner();
            let (before, after) = (r.before.unwrap_or_default(), r.after.unwrap_or_default());
            let diff = entry_diff(&before, &after);
            let verb = if dry_run { "Would update" } else { "Updated" };
            println!(
                "{verb} entry {} ({} field{} changed)",
                after.id,
                diff.len(),
                if diff.len() == 1 { "" } else { "s" }
            );
            for d in diff {
                println!("{d}");
            }
            if dry_run {
                println!("dry run: nothing changed");
            }
        }
        EntryCmd::Delete {
            admin,
            ids,
            filter,
            all,
            dry_run,
            plan,
        } => {
            let req = DeleteEntriesRequest {
                ids,
                filter: Some(filter.to_filter()),
                all,
                dry_run,
            };
            if let Some(file) = plan {
                return super::safe_ops::plan(&admin, Operation::DeleteEntries(req), &file).await;
            }
            let mut c = admin_client(&admin.admin_socket).await?;
            let r = c.delete_entries(req).await.map_err(status)?.into_inner();
            let n = r.entries.len();
            let verb = if dry_run { "Would delete" } else { "Deleted" };
            println!("{verb} {n} entr{}:", if n == 1 { "y" } else { "ies" });
            for e in &r.entries {
                let sels: Vec<String> = e
                    .selectors
                    .iter()
                    .map(|s| format!("{}:{}", s.r#type, s.value))
                    .collect();
                println!(
                    "  {}  {}  parent={}  selectors={}",
                    e.id,
                    e.spiffe_id,
                    e.parent_id,
                    sels.join(",")
                );
            }
            if dry_run {
                println!("dry run: nothing changed");
            }
        }
    }
    Ok(())
}
