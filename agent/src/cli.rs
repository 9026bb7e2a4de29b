//! `meshid agent …`: run the agent, and use the Workload API as any client would.

use std::path::PathBuf;

use anyhow::Context as _;
use hyper_util::rt::TokioIo;
use meshid_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use meshid_proto::workload::{JwtsvidRequest, X509svidRequest};
use tonic::transport::{Channel, Endpoint};

use crate::config::AgentConfig;

/// Default Workload API socket.
pub const DEFAULT_SOCKET: &str = "/run/meshid/agent/api.sock";

/// `meshid agent`: node attestation and the SPIFFE Workload API.
#[derive(Debug, clap::Args)]
pub struct AgentCli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct SocketArg {
    /// Workload API socket (`unix:///path` or a path); default from SPIFFE_ENDPOINT_SOCKET.
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: String,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// Join token (overrides join_token in the config); only needed for the first start.
        #[arg(long, env = "MESHID_JOIN_TOKEN", hide_env_values = true)]
        join_token: Option<String>,
        /// Validate the configuration and exit.
        #[arg(long)]
        check: bool,
    },
    /// Exit 0 if the Workload API answers.
    Healthcheck {
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Use the Workload API like any SPIFFE client.
    #[command(subcommand)]
    Api(ApiCmd),
}

#[derive(Debug, clap::Subcommand)]
enum ApiCmd {
    /// Fetch SVIDs.
    #[command(subcommand)]
    Fetch(FetchCmd),
    /// Print every X509-SVID update as it arrives.
    Watch {
        #[command(flatten)]
        socket: SocketArg,
    },
}

#[derive(Debug, clap::Subcommand)]
enum FetchCmd {
    /// Fetch this process's X509-SVIDs.
    X509 {
        #[command(flatten)]
        socket: SocketArg,
        /// Write svid.N.pem, svid.N.key and bundle.N.pem into this directory.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Fetch JWT-SVIDs for an audience.
    Jwt {
        #[command(flatten)]
        socket: SocketArg,
        /// Audience (repeatable).
        #[arg(long, required = true)]
        audience: Vec<String>,
        /// Only this SPIFFE ID.
        #[arg(long)]
        spiffe_id: Option<String>,
    },
}

/// Connects to a Workload API socket.
pub async fn connect(socket: &str) -> anyhow::Result<SpiffeWorkloadApiClient<Channel>> {
    let path = PathBuf::from(socket.strip_prefix("unix://").unwrap_or(socket));
    let p = path.clone();
    let ch = Endpoint::from_static("http://workload.api")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = p.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await
        .with_context(|| {
            format!(
                "cannot reach the Workload API at {} (is `meshid agent run` running?)",
                path.display()
            )
        })?;
    Ok(SpiffeWorkloadApiClient::new(ch))
}

fn req<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    r
}

fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!(
        "{}: {}",
        format!("{:?}", e.code()).to_lowercase(),
        e.message()
    )
}

fn split_certs(der: &[u8]) -> Vec<Vec<u8>> {
    use x509_parser::prelude::FromDer;
    let mut out = Vec::new();
    let mut rest = der;
    while !rest.is_empty() {
        match x509_parser::certificate::X509Certificate::from_der(rest) {
            Ok((r, _)) => {
                out.push(rest[..rest.len() - r.len()].to_vec());
                rest = r;
            }
            Err(_) => break,
        }
    }
    out
}

fn describe(svid: &meshid_proto::workload::X509svid) -> String {
    let certs = split_certs(&svid.x509_svid);
    let info = certs
        .first()
        .and_then(|c| meshid_identity::SvidInfo::from_der(c).ok());
    match info {
        Some(i) => format!(
            "SPIFFE ID: {}\n  serial:    {}\n  notAfter:  {}\n  hint:      {}\n  chain:     {} certificate(s)",
            svid.spiffe_id,
            i.serial,
            humantime::format_rfc3339_seconds(i.not_after),
            if svid.hint.is_empty() {
                "-"
            } else {
                &svid.hint
            },
            certs.len()
        ),
        None => format!("SPIFFE ID: {} (certificate does not parse)", svid.spiffe_id),
    }
}

impl AgentCli {
    /// Whether this is `agent run` (the long-running agent, not a check or a
    /// client command).
    pub fn runs_agent(&self) -> bool {
        matches!(self.command, Command::Run { check: false, .. })
    }

    /// Runs the subcommand.
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Run {
                config,
                join_token,
                check,
            } => {
                let cfg = AgentConfig::load(&config)?;
                if check {
                    println!(
                        "config OK: trust domain {}, server {:?}, socket {}",
                        cfg.trust_domain,
                        cfg.server_address.to_vec(),
                        cfg.socket_path.display()
                    );
                    return Ok(());
                }
                crate::run::run(cfg, join_token).await
            }
            Command::Healthcheck { socket } => {
                let mut c = connect(&socket.socket).await?;
                let mut s = c
                    .fetch_x509_bundles(req(meshid_proto::workload::X509BundlesRequest {}))
                    .await;
                match &mut s {
                    Ok(st) => {
                        st.get_mut().message().await.map_err(status)?;
                        println!("agent is healthy");
                    }
                    // The API answered: the caller simply has no identity.
                    Err(e) if e.code() == tonic::Code::PermissionDenied => {
                        println!("agent is healthy (caller has no identity)")
                    }
                    Err(e) => return Err(status(e.clone())),
                }
                Ok(())
            }
            Command::Api(ApiCmd::Fetch(FetchCmd::X509 { socket, write })) => {
                let mut c = connect(&socket.socket).await?;
                let mut st = c
                    .fetch_x509svid(req(X509svidRequest {}))
                    .await
                    .map_err(status)?
                    .into_inner();
                let r = st
                    .message()
                    .await
                    .map_err(status)?
                    .ok_or_else(|| anyhow::anyhow!("stream closed"))?;
                println!("Received {} SVID(s)", r.svids.len());
                for (i, s) in r.svids.iter().enumerate() {
                    println!("{}", describe(s));
                    if let Some(dir) = &write {
                        std::fs::create_dir_all(dir)?;
                        let pem = meshid_identity::pem::encode_certs(
                            split_certs(&s.x509_svid).iter().map(Vec::as_slice),
                        );
                        std::fs::write(dir.join(format!("svid.{i}.pem")), pem)?;
                        use std::io::Write;
                        use std::os::unix::fs::OpenOptionsExt;
                        let mut f = std::fs::OpenOptions::new()
                            .create(true)
                            .write(true)
                            .truncate(true)
                            .mode(0o600)
                            .open(dir.join(format!("svid.{i}.key")))?;
                        f.write_all(
                            meshid_identity::pem::encode("PRIVATE KEY", &s.x509_svid_key)
                                .as_bytes(),
                        )?;
                        let b = meshid_identity::pem::encode_certs(
                            split_certs(&s.bundle).iter().map(Vec::as_slice),
                        );
                        std::fs::write(dir.join(format!("bundle.{i}.pem")), b)?;
                    }
                }
                for td in r.federated_bundles.keys() {
                    println!("Federated bundle: {td}");
                }
                if let Some(dir) = write {
                    println!("written to {}", dir.display());
                }
                Ok(())
            }
            Command::Api(ApiCmd::Fetch(FetchCmd::Jwt {
                socket,
                audience,
                spiffe_id,
            })) => {
                let mut c = connect(&socket.socket).await?;
                let r = c
                    .fetch_jwtsvid(req(JwtsvidRequest {
                        audience,
                        spiffe_id: spiffe_id.unwrap_or_default(),
                    }))
                    .await
                    .map_err(status)?
                    .into_inner();
                for s in r.svids {
                    println!("{}\n{}", s.spiffe_id, s.svid);
                }
                Ok(())
            }
            Command::Api(ApiCmd::Watch { socket }) => {
                let mut c = connect(&socket.socket).await?;
                let mut st = c
                    .fetch_x509svid(req(X509svidRequest {}))
                    .await
                    .map_err(status)?
                    .into_inner();
                while let Some(r) = st.message().await.map_err(status)? {
                    println!("--- update: {} SVID(s)", r.svids.len());
                    for s in &r.svids {
                        println!("{}", describe(s));
                    }
                }
                Ok(())
            }
        }
    }
}
