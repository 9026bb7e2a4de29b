//! `meshid server …` subcommands.

/// `meshid server`
#[derive(Debug, clap::Args)]
pub struct ServerCli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Not yet available.
    Run,
}

impl ServerCli {
    /// Runs the subcommand.
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Run => anyhow::bail!("not yet"),
        }
    }
}
