//! `meshid server audit verify|show`: check the audit log's hash chain and
//! seals, and answer "who issued what, when". Both read the files and the
//! store directly (no admin socket), as the server's user.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context as _;

use crate::audit::{record, seal, show, verify};
use crate::config::{ServerConfig, StoreConfig};
use crate::store::{SqliteStore, Store};

/// Output format.
#[derive(Debug, Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum Output {
    /// For people.
    Text,
    /// One JSON object per line (`show`) or one JSON report (`verify`).
    Json,
}

/// `meshid server audit …`.
#[derive(Debug, clap::Subcommand)]
pub enum AuditCmd {
    /// Verify the audit log: hash chain, sequence, and the server's signed
    /// seals in the store. Exit 0 if intact; otherwise names the first bad
    /// record (file, line, sequence) and the kind of damage, and exits 1.
    Verify {
        /// The server's configuration file (for data_dir, the log and the store).
        #[arg(long, short)]
        config: PathBuf,
        /// Verify these files, oldest first, as the whole log (default: the
        /// configured log and its rotated files). Repeatable.
        #[arg(long = "file")]
        files: Vec<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Print audit records matching every filter given (does not verify).
    Show {
        /// The server's configuration file (for the log's location).
        #[arg(long, short, required_unless_present = "files")]
        config: Option<PathBuf>,
        /// Read these files, oldest first (default: the configured log and
        /// its rotated files). Repeatable.
        #[arg(long = "file")]
        files: Vec<PathBuf>,
        /// Only records at or after this time: RFC 3339 (2026-01-02T15:04:05Z)
        /// or a duration ago (30m, 2h, 7d).
        #[arg(long, value_parser = parse_since)]
        since: Option<SystemTime>,
        /// Only records naming this SPIFFE ID (issued, agent, entry, parent or alias).
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Only records by this actor: `admin`, `server`, `unauthenticated`
        /// or an agent's SPIFFE ID; a trailing `*` matches a prefix.
        #[arg(long)]
        actor: Option<String>,
        /// Only records of this event, e.g. `x509_svid_issued`; a trailing
        /// `*` matches a prefix (`entry_*`).
        #[arg(long)]
        action: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

fn parse_since(s: &str) -> Result<SystemTime, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t);
    }
    let d = humantime::parse_duration(s)
        .map_err(|_| format!("{s:?} is neither an RFC 3339 time nor a duration like 2h"))?;
    SystemTime::now()
        .checked_sub(d)
        .ok_or_else(|| format!("{s:?} reaches before the epoch"))
}

fn load(config: &std::path::Path) -> anyhow::Result<ServerConfig> {
    ServerConfig::load(config).map_err(anyhow::Error::from)
}

fn files_of(
    cfg: Option<&ServerConfig>,
    files: Vec<PathBuf>,
) -> anyhow::Result<(Vec<PathBuf>, bool)> {
    if !files.is_empty() {
        return Ok((files, true));
    }
    let cfg = cfg.context("give --config or --file")?;
    let current = cfg.audit_log_path();
    let found = record::log_files(&current)
        .with_context(|| format!("listing audit log files next to {}", current.display()))?;
    anyhow::ensure!(
        !found.is_empty(),
        "no audit log at {} (nor rotated files next to it)",
        current.display()
    );
    Ok((found, false))
}

async fn open_store(cfg: &ServerConfig) -> anyhow::Result<Arc<dyn Store>> {
    match &cfg.store {
        StoreConfig::Sqlite { path } => {
            let p = path
                .clone()
                .unwrap_or_else(|| cfg.data_dir.join("meshid.db"));
            anyhow::ensure!(p.exists(), "no store at {}", p.display());
            Ok(Arc::new(SqliteStore::open(&p).await.with_context(
                || format!("opening SQLite store {}", p.display()),
            )?))
        }
        StoreConfig::Postgres { .. } => {
            let opts = cfg
                .store
                .postgres_options()
                .context("[store] kind = \"postgres\" needs its url")?;
            Ok(Arc::new(
                crate::store::PostgresStore::connect(&opts)
                    .await
                    .context("connecting to the PostgreSQL store")?,
            ))
        }
    }
}

fn ms(t: i64) -> String {
    u64::try_from(t)
        .ok()
        .map(|ms| {
            humantime::format_rfc3339_millis(
                SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms),
            )
            .to_string()
        })
        .unwrap_or_else(|| t.to_string())
}

/// Runs an `audit` subcommand.
pub async fn run(cmd: AuditCmd) -> anyhow::Result<()> {
    match cmd {
        AuditCmd::Verify {
            config,
            files,
            output,
        } => {
            let cfg = load(&config)?;
            let key = seal::SealKey::load(&cfg.data_dir)?;
            let store = open_store(&cfg).await?;
            // Seals first, then the files: a record written meanwhile is
            // only more than the seals cover.
            let seals = store
                .list_audit_seals(key.chain_id())
                .await
                .context("reading audit seals")?;
            let (files, explicit) = files_of(Some(&cfg), files)?;
            let public_key = key.public_key().to_vec();
            let chain_id = key.chain_id().to_string();
            let names = files.clone();
            let report = tokio::task::spawn_blocking(move || {
                verify::verify(&names, explicit, &seals, &public_key)
            })
            .await
            .context("verifier stopped")?;
            match report {
                Ok(r) => {
                    match output {
                        Output::Json => println!(
                            "{}",
                            serde_json::json!({
                                "intact": true,
                                "chain_id": chain_id,
                                "files": files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
                                "records": r.records,
                                "first_seq": r.first_seq,
                                "last_seq": r.last_seq,
                                "seals_checked": r.seals_checked,
                                "seals_before_start": r.seals_before_start,
                                "pruned_through": r.pruned_through,
                                "unsealed_records": r.unsealed,
                                "warnings": r.warnings,
                            })
                        ),
                        Output::Text => {
                            println!(
                                "audit log intact: {} records (seq {}..{}) in {} file(s), {} seal(s) checked",
                                r.records, r.first_seq, r.last_seq, r.files, r.seals_checked
                            );
                            println!("chain id: {chain_id}");
                            match r.newest_seal {
                                Some((seq, at)) => println!(
                                    "newest seal: seq {seq} at {}; {} record(s) after it are protected by the chain only",
                                    ms(at),
                                    r.unsealed
                                ),
                                None => println!("no seals yet: the chain alone protects the log"),
                            }
                            if let Some(p) = r.pruned_through {
                                println!(
                                    "records 1..{p} were deleted by rotation (max_files), as the log records"
                                );
                            }
                            if r.seals_before_start > 0 {
                                println!(
                                    "{} seal(s) cover records deleted by rotation",
                                    r.seals_before_start
                                );
                            }
                        }
                    }
                    for w in &r.warnings {
                        eprintln!("warning: {w}");
                    }
                    Ok(())
                }
                Err(verify::VerifyError::Damaged(d)) => {
                    if output == Output::Json {
                        println!(
                            "{}",
                            serde_json::json!({
                                "intact": false,
                                "chain_id": chain_id,
                                "file": d.file.as_ref().map(|p| p.display().to_string()),
                                "line": d.line,
                                "seq": d.seq,
                                "kind": d.kind.as_str(),
                                "detail": d.detail,
                            })
                        );
                    }
                    anyhow::bail!("audit log damaged: {d}")
                }
                Err(e) => Err(e.into()),
            }
        }
        AuditCmd::Show {
            config,
            files,
            since,
            spiffe_id,
            actor,
            action,
            output,
        } => {
            let cfg = config.as_deref().map(load).transpose()?;
            let (files, _) = files_of(cfg.as_ref(), files)?;
            let filter = show::Filter {
                since,
                spiffe_id,
                actor,
                action,
            };
            let (recs, warnings) = tokio::task::spawn_blocking(move || show::show(&files, &filter))
                .await
                .context("reader stopped")?
                .context("reading the audit log")?;
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            for r in &recs {
                match output {
                    Output::Json => println!("{}", r.raw),
                    Output::Text => println!("{}", show::text_line(&r.value)),
                }
            }
            if output == Output::Text {
                eprintln!("{} record(s)", recs.len());
            }
            Ok(())
        }
    }
}
