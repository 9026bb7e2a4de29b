//! `meshid agent …` subcommands.

/// `meshid agent`
#[derive(Debug, clap::Args)]
pub struct AgentCli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Not yet available.
    Run,
}

impl AgentCli {
    /// Runs the subcommand.
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Run => anyhow::bail!("meshid agent is not available in this build"),
        }
    }
}
