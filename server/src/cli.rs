//! `meshid server …`: run the server, and operate it over the admin socket.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use hyper_util::rt::TokioIo;
use meshid_proto::admin::admin_client::AdminClient;
use meshid_proto::admin::{
    AgentActionRequest, CreateEntryRequest, CreateJoinTokenRequest, DeleteEntriesRequest,
    DeleteFederatedBundleRequest, EntryFilter, GetBundleRequest, GetEntryRequest, HealthRequest,
    ListAgentsRequest, ListEntriesRequest, ListFederatedBundlesRequest, SetFederatedBundleRequest,
    UpdateEntryRequest,
};
use meshid_proto::types::{Entry, Selector};
use serde_json::json;
use tonic::transport::{Channel, Endpoint};

use crate::bundle_format;
use crate::config::ServerConfig;

/// Default admin socket, matching the default `data_dir`.
pub const DEFAULT_ADMIN_SOCKET: &str = "/var/lib/meshid/server/admin.sock";

/// `meshid server`: the trust domain's CA and registry.
#[derive(Debug, clap::Args)]
pub struct ServerCli {
    #[command(subcommand)]
    command: Command,
}

/// Where the admin API is.
#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// The server's admin API socket.
    #[arg(long, env = "MESHID_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET)]
    pub admin_socket: PathBuf,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
enum BundleFormat {
    Pem,
    Spiffe,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Run the server (CA, registry, node API, admin API).
    Run {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// Validate the configuration and exit.
        #[arg(long)]
        check: bool,
    },
    /// Check that the server is up and its CA valid (exit 0 if healthy).
    Healthcheck {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print nothing.
        #[arg(long)]
        quiet: bool,
        /// Print health as JSON (includes the bound addresses).
        #[arg(long)]
        json: bool,
    },
    /// Join tokens for node attestation.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Registration entries.
    #[command(subcommand)]
    Entry(EntryCmd),
    /// Trust bundles (own and federated).
    #[command(subcommand)]
    Bundle(BundleCmd),
    /// Attested agents.
    #[command(subcommand)]
    Agent(AgentCmd),
    /// Signing authorities: the CA journal, manual and forced rotation.
    #[command(subcommand)]
    Ca(crate::cli_ca::CaCmd),
    /// The audit log: verify its hash chain and seals; search it.
    #[command(subcommand)]
    Audit(crate::cli_audit::AuditCmd),
    /// The store itself (not through a running server).
    #[command(subcommand)]
    Store(crate::cli_store::StoreCmd),
}

#[derive(Debug, clap::Subcommand)]
enum TokenCmd {
    /// Create a single-use join token; prints the token.
    Create {
        #[command(flatten)]
        admin: AdminArgs,
        /// Alias SPIFFE ID the attested agent also holds (usable as entry parent).
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Token lifetime, e.g. 10m (default: the server's join_token_ttl).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
}

#[derive(Debug, clap::Args)]
struct FilterArgs {
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
enum EntryCmd {
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
    },
}

#[derive(Debug, clap::Subcommand)]
enum BundleCmd {
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
    },
}

#[derive(Debug, clap::Subcommand)]
enum AgentCmd {
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

fn secs(d: Option<Duration>) -> i64 {
    d.map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Connects to the admin socket.
pub async fn admin_client(path: &std::path::Path) -> anyhow::Result<AdminClient<Channel>> {
    let p = path.to_path_buf();
    let channel = Endpoint::from_static("http://admin.sock")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = p.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?)) }
        }))
        .await
        .with_context(|| {
            format!(
                "cannot reach the server's admin socket {} (is `meshid server run` running, and are you its user or root?)",
                path.display()
            )
        })?;
    Ok(AdminClient::new(channel))
}

/// A gRPC status as a CLI error.
pub fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!(
        "{}: {}",
        format!("{:?}", e.code()).to_lowercase(),
        e.message()
    )
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

impl ServerCli {
    /// Runs the subcommand.
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Run { config, check } => {
                let cfg = ServerConfig::load(&config)?;
                if check {
                    println!(
                        "config OK: trust domain {}, node API {}, admin socket {}, store {:?}",
                        cfg.trust_domain,
                        cfg.bind_address,
                        cfg.admin_socket_path().display(),
                        cfg.store
                    );
                    return Ok(());
                }
                crate::run::run(cfg).await
            }
            Command::Healthcheck { admin, quiet, json } => {
                let mut c = admin_client(&admin.admin_socket).await?;
                let h = c
                    .health(HealthRequest {})
                    .await
                    .map_err(status)?
                    .into_inner();
                if json {
                    println!(
                        "{}",
                        json!({"trust_domain": h.trust_domain, "ca_not_after": h.ca_not_after, "entries": h.entries,
                               "agents": h.agents, "node_address": h.node_address, "metrics_address": h.metrics_address,
                               "next_ca_not_after": h.next_ca_not_after, "warnings": h.warnings})
                    );
                } else if !quiet {
                    let left =
                        h.ca_not_after - meshid_identity::svid::unix(std::time::SystemTime::now());
                    println!(
                        "server is healthy: trust domain {}, {} entries, {} agents, active CA expires in {}{}",
                        h.trust_domain,
                        h.entries,
                        h.agents,
                        humantime::format_duration(Duration::from_secs(left.max(0).unsigned_abs())),
                        if h.next_ca_not_after > 0 {
                            ", next CA prepared"
                        } else {
                            ""
                        }
                    );
                    for w in &h.warnings {
                        println!("warning: {w}");
                    }
                }
                Ok(())
            }
            Command::Token(TokenCmd::Create {
                admin,
                spiffe_id,
                ttl,
            }) => {
                let mut c = admin_client(&admin.admin_socket).await?;
                let t = c
                    .create_join_token(CreateJoinTokenRequest {
                        ttl: secs(ttl),
                        spiffe_id: spiffe_id.unwrap_or_default(),
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                println!("{}", t.token);
                Ok(())
            }
            Command::Entry(cmd) => entry(cmd).await,
            Command::Bundle(cmd) => bundle(cmd).await,
            Command::Agent(cmd) => agent(cmd).await,
            Command::Ca(cmd) => crate::cli_ca::run(cmd).await,
            Command::Audit(cmd) => crate::cli_audit::run(cmd).await,
            Command::Store(cmd) => cmd.run().await,
        }
    }
}

async fn entry(cmd: EntryCmd) -> anyhow::Result<()> {
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
        } => {
            let mut c = admin_client(&admin.admin_socket).await?;
            let r = c
                .delete_entries(DeleteEntriesRequest {
                    ids,
                    filter: Some(filter.to_filter()),
                    all,
                    dry_run,
                })
                .await
                .map_err(status)?
                .into_inner();
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

async fn bundle(cmd: BundleCmd) -> anyhow::Result<()> {
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
                    serde_json::to_string_pretty(&bundle_format::to_spiffe_json(&b))?
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
            let td = trust_domain.trim_start_matches("spiffe://").to_string();
            let b =
                bundle_format::parse(&td, &data).with_context(|| format!("{}", path.display()))?;
            let mut c = admin_client(&admin.admin_socket).await?;
            let b = c
                .set_federated_bundle(SetFederatedBundleRequest { bundle: Some(b) })
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "bundle for spiffe://{} set: {} X.509 authorit{}, {} JWT key(s), sequence {}",
                b.trust_domain,
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
                        "# spiffe://{}\n{}",
                        b.trust_domain,
                        bundle_format::to_pem(b)
                    ),
                    BundleFormat::Spiffe => println!(
                        "spiffe://{}\n{}",
                        b.trust_domain,
                        serde_json::to_string_pretty(&bundle_format::to_spiffe_json(b))?
                    ),
                }
            }
        }
        BundleCmd::Delete {
            admin,
            trust_domain,
            dry_run,
        } => {
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

async fn agent(cmd: AgentCmd) -> anyhow::Result<()> {
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
        } => agent_action(&admin, spiffe_id, dry_run, true).await?,
        AgentCmd::Evict {
            admin,
            spiffe_id,
            dry_run,
        } => agent_action(&admin, spiffe_id, dry_run, false).await?,
    }
    Ok(())
}

async fn agent_action(
    admin: &AdminArgs,
    spiffe_id: String,
    dry_run: bool,
    ban: bool,
) -> anyhow::Result<()> {
    let mut c = admin_client(&admin.admin_socket).await?;
    let req = AgentActionRequest {
        spiffe_id: spiffe_id.clone(),
        dry_run,
    };
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
