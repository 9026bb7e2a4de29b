//! `meshid helper`: the command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::config::{ConfigFormat, HelperConfig};
use crate::run::{RunOptions, run};

/// `meshid helper …`
#[derive(Debug, Args)]
pub struct HelperCli {
    #[command(subcommand)]
    command: HelperCommand,
}

#[derive(Debug, Subcommand)]
enum HelperCommand {
    /// Keep the SVID, key, bundle and JWT-SVID files up to date, and tell the
    /// application (signal or command) after each renewal.
    Run(RunArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Configuration file: TOML (`*.toml`) or spiffe-helper's HCL (any other name).
    #[arg(long, short = 'c', default_value = "helper.conf")]
    config: PathBuf,
    /// Read the configuration as this format instead of guessing from its name.
    #[arg(long, value_enum)]
    format: Option<ConfigFormat>,
    /// Write every file once and exit 0 (for init containers); exits non-zero
    /// if that does not happen within `--timeout`.
    #[arg(long)]
    once: bool,
    /// With `--once` (or `daemon_mode = false`): how long to wait for the agent.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

impl HelperCli {
    /// Runs the chosen subcommand.
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            HelperCommand::Run(a) => {
                let cfg = HelperConfig::load(&a.config, a.format)?;
                run(
                    cfg,
                    RunOptions {
                        once: a.once,
                        timeout: a.timeout,
                    },
                )
                .await
            }
        }
    }
}
