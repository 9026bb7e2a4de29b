//! `meshid sidecar …` subcommands.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ENDPOINT_ENV};
use crate::identity::{Identity, run_workload_api};
use crate::metrics::Metrics;
use crate::{Sidecar, tls_settings};

/// `meshid sidecar`
#[derive(Debug, clap::Args)]
pub struct SidecarCli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Runs the mTLS sidecar.
    Run {
        /// Path to the sidecar TOML config.
        #[arg(long, short)]
        config: PathBuf,
        /// Only validate the config and exit.
        #[arg(long)]
        check: bool,
    },
}

impl SidecarCli {
    /// Runs the subcommand.
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Run { config, check } => run(config, check).await,
        }
    }
}

async fn run(path: PathBuf, check: bool) -> anyhow::Result<()> {
    let v = Config::load(&path)?.validate(std::env::var(ENDPOINT_ENV).ok())?;
    if v.config.max_connections.is_some() {
        tracing::warn!(
            inbound = v.limits.inbound,
            outbound = v.limits.outbound,
            "max_connections is deprecated: it now sets both max_inbound_connections and \
             max_outbound_connections (separate budgets); set those instead"
        );
    }
    if check {
        println!(
            "config ok: {} inbound, {} outbound listener(s)",
            v.config.inbound.len(),
            v.config.outbound.len()
        );
        return Ok(());
    }
    let endpoint = v.endpoint.clone().with_context(|| {
        format!("no Workload API address: set workload_api_socket or ${ENDPOINT_ENV}")
    })?;
    let metrics = Arc::new(Metrics::new());
    let identity = Identity::new(tls_settings(&v), metrics.clone());
    let shutdown = CancellationToken::new();
    crate::crl::start(
        crate::crl::settings(&v.config).map_err(anyhow::Error::msg)?,
        &identity,
        &metrics.crl,
        shutdown.clone(),
    );
    let sidecar = Sidecar::bind(&v, identity.clone(), metrics, shutdown.clone()).await?;
    tracing::info!(
        inbound = ?sidecar.inbound_addrs(),
        outbound = ?sidecar.outbound_addrs(),
        admin = ?sidecar.admin_addr(),
        "sidecar listening; connections are refused until the first SVID arrives"
    );
    let source = tokio::spawn(run_workload_api(
        identity,
        endpoint,
        v.spiffe_id.clone(),
        shutdown.clone(),
    ));
    let signals = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            meshid_identity::shutdown::signal().await;
            tracing::info!("shutdown requested: no new connections, draining");
            shutdown.cancel();
        })
    };
    let cut = sidecar.run().await?;
    signals.abort();
    shutdown.cancel();
    let _ = source.await;
    if cut > 0 {
        tracing::warn!(
            cut,
            "exited with connections still open after drain_timeout"
        );
    }
    Ok(())
}
