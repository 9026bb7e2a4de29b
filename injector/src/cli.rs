//! `meshid injector …` subcommands.

use std::io::Read as _;
use std::path::PathBuf;

use anyhow::Context as _;

use crate::config::InjectorConfig;
use crate::server::{Webhook, review};

/// `meshid injector`
#[derive(Debug, clap::Args)]
pub struct InjectorCli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Serve the mutating admission webhook over HTTPS (POST /mutate).
    Run {
        /// Path to the injector TOML config.
        #[arg(long, short)]
        config: PathBuf,
        /// Only validate the config and exit.
        #[arg(long)]
        check: bool,
    },
    /// Read an AdmissionReview on stdin and print the webhook's answer.
    Patch {
        /// Path to the injector TOML config.
        #[arg(long, short)]
        config: PathBuf,
    },
}

impl InjectorCli {
    /// Runs the subcommand.
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Run { config, check } => {
                let cfg = InjectorConfig::load(&config)?;
                if check {
                    println!(
                        "config OK: listen {}, image {}, socket {}",
                        cfg.listen,
                        cfg.image,
                        cfg.endpoint()
                    );
                    return Ok(());
                }
                let hook = Webhook::bind(cfg).await?;
                let addr = hook.local_addr()?;
                tracing::info!(%addr, "injector webhook listening");
                println!("listening on {addr}");
                tokio::select! {
                    () = hook.run() => Ok(()),
                    r = tokio::signal::ctrl_c() => r.context("signal handler"),
                    () = terminate() => Ok(()),
                }
            }
            Command::Patch { config } => {
                let cfg = InjectorConfig::load(&config)?;
                let mut body = Vec::new();
                std::io::stdin()
                    .take(crate::server::MAX_BODY as u64 + 1)
                    .read_to_end(&mut body)
                    .context("reading stdin")?;
                if body.len() > crate::server::MAX_BODY {
                    anyhow::bail!(
                        "AdmissionReview larger than {} bytes",
                        crate::server::MAX_BODY
                    );
                }
                let answer = review(&body, &cfg).map_err(anyhow::Error::msg)?;
                println!("{}", String::from_utf8_lossy(&answer));
                Ok(())
            }
        }
    }
}

async fn terminate() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}
