//! `meshid server …`: run the server, and operate it over the admin socket.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use hyper_util::rt::TokioIo;
use meshid_proto::admin::admin_client::AdminClient;
use meshid_proto::admin::{CreateJoinTokenRequest, HealthRequest};
use serde_json::json;
use tonic::transport::{Channel, Endpoint};

use crate::config::ServerConfig;

mod agent;
mod audit;
mod bundle;
mod ca;
mod ca_check;
mod ca_output;
mod ca_rollout;
mod entry;
mod safe_ops;
mod store;
mod x509;

use agent::{AgentCmd, agent};
use bundle::{BundleCmd, bundle};
pub use entry::parse_selector;
use entry::{EntryCmd, entry};

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
    Ca(ca::CaCmd),
    /// The audit log: verify its hash chain and seals; search it.
    #[command(subcommand)]
    Audit(audit::AuditCmd),
    /// The store itself (not through a running server).
    #[command(subcommand)]
    Store(store::StoreCmd),
    /// Admin certificates (mint, revoke) and the CRL.
    #[command(subcommand)]
    X509(x509::X509Cmd),
    #[command(flatten)]
    SafeOps(safe_ops::SafeOpsCmd),
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

fn secs(d: Option<Duration>) -> i64 {
    d.map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Connects to the admin socket.
pub async fn admin_client(path: &std::path::Path) -> anyhow::Result<AdminClient<Channel>> {
    Ok(AdminClient::new(admin_channel(path).await?))
}

/// A channel to the admin socket (every admin service is served on it).
pub async fn admin_channel(path: &std::path::Path) -> anyhow::Result<Channel> {
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
    Ok(channel)
}

/// A gRPC status as a CLI error.
pub fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!(
        "{}: {}",
        format!("{:?}", e.code()).to_lowercase(),
        e.message()
    )
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
            Command::Ca(cmd) => ca::run(cmd).await,
            Command::Audit(cmd) => audit::run(cmd).await,
            Command::Store(cmd) => cmd.run().await,
            Command::X509(cmd) => x509::run(cmd).await,
            Command::SafeOps(cmd) => safe_ops::run(cmd).await,
        }
    }
}
