//! `meshid`: workload identity for services — the SPIFFE server, the node
//! agent and the mTLS sidecar, in one binary.

use clap::{Parser, Subcommand, ValueEnum};

mod demo;

/// Workload identity with SPIFFE: server (CA + registry), node agent
/// (Workload API) and mTLS sidecar.
#[derive(Debug, Parser)]
#[command(name = "meshid", version, about, long_about = None)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "MESHID_LOG_FORMAT")]
    log_format: LogFormat,
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `meshid_server=debug`.
    #[arg(long, global = true, default_value = "info", env = "MESHID_LOG")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The trust domain's CA and registry, and its admin CLI.
    Server(meshid_server::cli::ServerCli),
    /// The node agent: node attestation and the SPIFFE Workload API.
    Agent(meshid_agent::cli::AgentCli),
    /// The mTLS sidecar: inbound and outbound proxies with SPIFFE authorization.
    Sidecar(meshid_sidecar::cli::SidecarCli),
    /// Kubernetes sidecar injection: a mutating admission webhook.
    Injector(meshid_injector::cli::InjectorCli),
    /// SVIDs, keys and bundles as files for applications that only read files.
    Helper(meshid_helper::cli::HelperCli),
    /// Run the whole system locally as separate processes and narrate it.
    Demo(demo::DemoCli),
    /// Print the CLI reference as Markdown (docs/cli.md is this output).
    #[command(hide = true)]
    HelpMarkdown,
}

fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: log files and journald get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Re-executes this process with `MALLOC_ARENA_MAX=1`, unless the operator
/// set it (or `GLIBC_TUNABLES`) or it is set already.
///
/// For `agent run`: the agent holds every entry and SVID of its node and
/// replaces them often (each sync message carries the whole entry list), and
/// glibc's per-thread malloc arenas fragment under that churn — with 10,000
/// entries about 70 MiB resident with the default arenas against about
/// 48 MiB with one (`benches/workload_api.rs`, `ENTRIES=10000`). The same
/// process id, arguments and descriptors carry on; if the exec fails the
/// agent runs with the default arenas.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn one_malloc_arena() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("MALLOC_ARENA_MAX").is_some()
        || std::env::var_os("GLIBC_TUNABLES").is_some()
    {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let mut cmd = std::process::Command::new(exe);
    if let Some(arg0) = args.next() {
        cmd.arg0(arg0);
    }
    // Returns only if the exec failed.
    let err = cmd.args(args).env("MALLOC_ARENA_MAX", "1").exec();
    eprintln!("warning: cannot re-execute with one malloc arena ({err}); carrying on");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn one_malloc_arena() {}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Before the runtime starts its threads: the re-exec replaces the
    // process, so nothing should have been set up yet.
    if let Command::Agent(c) = &cli.command
        && c.runs_agent()
    {
        one_malloc_arena();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> std::process::ExitCode {
    init_logging(cli.log_format, &cli.log);
    let result = match cli.command {
        Command::Server(c) => c.run().await,
        Command::Agent(c) => c.run().await,
        Command::Sidecar(c) => c.run().await,
        Command::Injector(c) => c.run().await,
        Command::Helper(c) => c.run().await,
        Command::Demo(c) => c.run().await,
        Command::HelpMarkdown => {
            print!("{}", clap_markdown::help_markdown::<Cli>());
            Ok(())
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
