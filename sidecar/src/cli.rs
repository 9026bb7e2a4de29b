//! `meshid sidecar …` subcommands.

/// `meshid sidecar`
#[derive(Debug, clap::Args)]
pub struct SidecarCli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Not yet available.
    Run,
}

impl SidecarCli {
    /// Runs the subcommand.
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Run => anyhow::bail!("meshid sidecar is not available in this build"),
        }
    }
}
