//! `meshid server store …`: operations on the store itself, run beside (not
//! through) a server.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::store::PostgresOptions;
use crate::store::migrate::{MigrateOptions, sqlite_to_postgres};

/// `meshid server store`.
#[derive(Debug, clap::Subcommand)]
pub enum StoreCmd {
    /// Copy a SQLite store into PostgreSQL: entries, agents, bundles, join
    /// tokens, the CA journal and the issuance journal, verified by row
    /// counts and checksums in one transaction.
    ///
    /// Stop the SQLite server first (or expect changes made after the copy's
    /// snapshot to be missing). The CA private keys and the server's
    /// instance id stay in its data_dir, not in the store: run the first
    /// server on PostgreSQL with that data_dir, so it keeps signing with the
    /// authorities the journal names as its own.
    Migrate {
        /// The SQLite database, e.g. /var/lib/meshid/server/meshid.db.
        #[arg(long)]
        from: PathBuf,
        /// The PostgreSQL URL, e.g. postgres://meshid@db/meshid. TLS options
        /// go in the URL (`?sslmode=verify-full&sslrootcert=/path/ca.pem`);
        /// the password is best left to PGPASSWORD or ~/.pgpass.
        #[arg(long, env = "MESHID_STORE_URL")]
        to: String,
        /// Copy and verify, then roll back: writes nothing.
        #[arg(long)]
        dry_run: bool,
        /// Replace the contents of a target that is not empty.
        #[arg(long)]
        force: bool,
    },
}

impl StoreCmd {
    /// Runs the subcommand.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Self::Migrate {
                from,
                to,
                dry_run,
                force,
            } => {
                let target = PostgresOptions::new(to);
                let where_to = target
                    .connect_options()
                    .map(|o| {
                        format!(
                            "{}:{}/{}",
                            o.get_host(),
                            o.get_port(),
                            o.get_database().unwrap_or_default()
                        )
                    })
                    .context("--to is not a PostgreSQL URL")?;
                let r = sqlite_to_postgres(&from, &target, MigrateOptions { dry_run, force })
                    .await
                    .with_context(|| format!("migrating {} to {where_to}", from.display()))?;
                println!(
                    "source {} (schema {}) -> target {where_to}",
                    from.display(),
                    r.source_schema
                );
                println!("{:<14} {:>10}  sha256", "table", "rows");
                for t in &r.tables {
                    println!("{:<14} {:>10}  {}", t.table, t.rows, t.checksum);
                }
                if r.target_rows_before > 0 {
                    println!(
                        "replaced {} rows the target held before (--force)",
                        r.target_rows_before
                    );
                }
                if r.dry_run {
                    println!(
                        "dry run: copied and verified in a transaction that was rolled back; nothing was written"
                    );
                } else {
                    println!("copied and verified: counts and checksums equal; committed");
                }
                Ok(())
            }
        }
    }
}
