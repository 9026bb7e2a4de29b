//! Copying a whole SQLite store into PostgreSQL (`meshid server store
//! migrate`), for growing from one server to several without registering
//! anything again.
//!
//! The copy reads the source in one read transaction (a consistent snapshot
//! even if a server is still writing to it) and writes the target in one
//! transaction, which also applies the target's migrations. Before that
//! transaction commits, every table is read back from the target and its row
//! count and checksum compared with the source's; any difference rolls
//! everything back. A dry run does all of this and then rolls back, so it
//! writes nothing but proves the copy would succeed.
//!
//! The checksum of a table is the SHA-256 over the sorted SHA-256 digests of
//! its rows, each row encoded field by field (typed, length-prefixed), so it
//! does not depend on row order or on how each database spells a boolean or
//! a list.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use futures::TryStreamExt as _;
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{Postgres, Transaction};

use super::{PostgresOptions, PostgresStore, SqliteStore, StoreError};

mod rows;
mod tables;

use rows::{Val, check_row, from_postgres, from_sqlite, row_digest, table_checksum};
use tables::Kind::{Blob, Bool, Int, Text, TextList};
pub use tables::copied_columns;
use tables::{TABLES, Table};

/// Why a migration did not happen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// A database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The source cannot be copied as it is.
    #[error("source: {0}")]
    Source(String),
    /// The target holds data and replacing it was not asked for.
    #[error(
        "the target database is not empty ({0}); nothing was written. Use --force to replace its contents"
    )]
    TargetNotEmpty(String),
    /// What was written does not read back as what was read.
    #[error(
        "verification failed for table {table}: source {source_rows} rows ({source_sum}), target {target_rows} rows ({target_sum}); nothing was written"
    )]
    Mismatch {
        /// The table.
        table: &'static str,
        /// Rows in the source.
        source_rows: u64,
        /// Checksum of the source.
        source_sum: String,
        /// Rows in the target.
        target_rows: u64,
        /// Checksum of the target.
        target_sum: String,
    },
}

impl From<sqlx::Error> for MigrateError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(StoreError::Db(e))
    }
}

impl From<sqlx::migrate::MigrateError> for MigrateError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Self::Store(StoreError::Migrate(e))
    }
}

/// What to do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrateOptions {
    /// Copy and verify inside a transaction, then roll it back.
    pub dry_run: bool,
    /// Replace the contents of a non-empty target.
    pub force: bool,
}

/// One copied table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableReport {
    /// Table name.
    pub table: &'static str,
    /// Rows copied (equal in source and target).
    pub rows: u64,
    /// Hex checksum (equal in source and target).
    pub checksum: String,
}

/// The outcome of a migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateReport {
    /// Every table, in copy order.
    pub tables: Vec<TableReport>,
    /// Schema version of the source (its latest migration).
    pub source_schema: i64,
    /// Rows the target held before (replaced under `force`).
    pub target_rows_before: u64,
    /// Nothing was written.
    pub dry_run: bool,
}

/// Rows per INSERT.
const CHUNK: usize = 1000;

/// Inserts rows with one statement: one array per column, unnested in order.
async fn insert_rows(
    tx: &mut Transaction<'_, Postgres>,
    t: &Table,
    rows: &[Vec<Val>],
) -> Result<(), MigrateError> {
    if rows.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = t.cols.iter().map(|c| c.0).collect();
    let mut args = Vec::new();
    let mut exprs = Vec::new();
    for (i, &(c, k)) in t.cols.iter().enumerate() {
        let ty = match k {
            Text | TextList => "TEXT[]",
            Int => "BIGINT[]",
            Blob => "BYTEA[]",
            Bool => "BOOLEAN[]",
        };
        args.push(format!("${}::{ty}", i + 1));
        exprs.push(if k == TextList {
            format!("ARRAY(SELECT jsonb_array_elements_text(u.{c}::JSONB))")
        } else {
            format!("u.{c}")
        });
    }
    let sql = format!(
        "INSERT INTO {t} ({cols}) SELECT {exprs} FROM UNNEST({args}) WITH ORDINALITY AS u({cols}, ord) ORDER BY ord",
        t = t.name,
        cols = names.join(", "),
        exprs = exprs.join(", "),
        args = args.join(", "),
    );
    let mut q = sqlx::query(&sql);
    for (i, &(_, k)) in t.cols.iter().enumerate() {
        let col = rows.iter().map(|r| &r[i]);
        q = match k {
            Text => q.bind(
                col.map(|v| match v {
                    Val::Text(s) => s.clone(),
                    _ => String::new(),
                })
                .collect::<Vec<_>>(),
            ),
            TextList => q.bind(
                col.map(|v| match v {
                    Val::TextList(l) => serde_json::to_string(l).unwrap_or_default(),
                    _ => "[]".into(),
                })
                .collect::<Vec<_>>(),
            ),
            Int => q.bind(
                col.map(|v| match v {
                    Val::Int(i) => *i,
                    _ => 0,
                })
                .collect::<Vec<_>>(),
            ),
            Blob => q.bind(
                col.map(|v| match v {
                    Val::Blob(b) => b.clone(),
                    _ => Vec::new(),
                })
                .collect::<Vec<_>>(),
            ),
            Bool => q.bind(
                col.map(|v| matches!(v, Val::Bool(true)))
                    .collect::<Vec<_>>(),
            ),
        };
    }
    q.execute(&mut **tx).await?;
    Ok(())
}

/// The source's applied migration versions, checked against this build's.
async fn source_schema(conn: &mut sqlx::SqliteConnection) -> Result<i64, MigrateError> {
    let applied: BTreeSet<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| {
                MigrateError::Source(format!("not a meshid database (no migration table: {e})"))
            })?
            .into_iter()
            .collect();
    let known: BTreeSet<i64> = SqliteStore::migrator().iter().map(|m| m.version).collect();
    if applied != known {
        let have = applied.last().copied().unwrap_or(0);
        let want = known.last().copied().unwrap_or(0);
        return Err(MigrateError::Source(if have < want {
            format!(
                "schema version {have}, this meshid expects {want}: start this version's server on it once to upgrade it, then migrate"
            )
        } else {
            format!(
                "schema version {have} is newer than this meshid knows ({want}); migrate with the meshid version that wrote it"
            )
        }));
    }
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' AND name <> '_sqlx_migrations' ORDER BY name",
    )
    .fetch_all(&mut *conn)
    .await?;
    let unknown: Vec<&String> = tables
        .iter()
        .filter(|t| !TABLES.iter().any(|k| k.name == t.as_str()))
        .collect();
    if !unknown.is_empty() {
        return Err(MigrateError::Source(format!(
            "tables this migration does not know how to copy: {unknown:?}; refusing to leave them behind"
        )));
    }
    let cols: Vec<(String, String)> = sqlx::query_as(
        "SELECT m.name, p.name FROM sqlite_master m, pragma_table_info(m.name) p
         WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%' AND m.name <> '_sqlx_migrations'",
    )
    .fetch_all(&mut *conn)
    .await?;
    let copied = copied_columns();
    if let Some((t, c)) = cols
        .iter()
        .find(|(t, c)| !copied.contains(&(t.as_str(), c.as_str())))
    {
        return Err(MigrateError::Source(format!(
            "column {t}.{c} is not copied by this migration; refusing to leave it behind"
        )));
    }
    Ok(applied.last().copied().unwrap_or(0))
}

/// Copies the SQLite store at `from` into the PostgreSQL database `to`.
pub async fn sqlite_to_postgres(
    from: &Path,
    to: &PostgresOptions,
    opts: MigrateOptions,
) -> Result<MigrateReport, MigrateError> {
    if !from.is_file() {
        return Err(MigrateError::Source(format!(
            "{} does not exist or is not a file",
            from.display()
        )));
    }
    // Never create or migrate the source: it is only read.
    let src_pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(
            SqliteConnectOptions::new()
                .filename(from)
                .create_if_missing(false)
                .busy_timeout(Duration::from_secs(10)),
        )
        .await?;
    let mut src = src_pool.begin().await?;
    let source_schema = source_schema(&mut src).await?;

    let dst_pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(to.connect_options()?)
        .await?;
    let mut dst = dst_pool.begin().await?;
    // Inside the transaction: a dry run (or a failure) leaves no schema behind.
    PostgresStore::migrator().run(&mut *dst).await?;

    let mut before = Vec::new();
    let mut target_rows_before = 0u64;
    for t in TABLES {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", t.name))
            .fetch_one(&mut *dst)
            .await?;
        if n > 0 {
            before.push(format!("{} {n}", t.name));
            target_rows_before += n.unsigned_abs();
        }
    }
    if target_rows_before > 0 {
        if !opts.force {
            return Err(MigrateError::TargetNotEmpty(before.join(", ")));
        }
        let names: Vec<&str> = TABLES.iter().map(|t| t.name).collect();
        sqlx::query(&format!("TRUNCATE {}", names.join(", ")))
            .execute(&mut *dst)
            .await?;
    }

    let mut tables = Vec::new();
    for t in TABLES {
        let cols: Vec<&str> = t.cols.iter().map(|c| c.0).collect();
        let mut digests = Vec::new();
        let mut chunk = Vec::with_capacity(CHUNK);
        {
            let select = format!(
                "SELECT {} FROM {} ORDER BY {}",
                cols.join(", "),
                t.name,
                t.order
            );
            let mut rows = sqlx::query(&select).fetch(&mut *src);
            while let Some(r) = rows.try_next().await? {
                let vals = from_sqlite(t, &r)?;
                check_row(t, &vals)?;
                digests.push(row_digest(&vals));
                chunk.push(vals);
                if chunk.len() == CHUNK {
                    insert_rows(&mut dst, t, &chunk).await?;
                    chunk.clear();
                }
            }
        }
        insert_rows(&mut dst, t, &chunk).await?;
        let source_rows = digests.len() as u64;
        let source_sum = table_checksum(digests);

        let select = format!("SELECT {} FROM {}", cols.join(", "), t.name);
        let mut back = Vec::new();
        {
            let mut rows = sqlx::query(&select).fetch(&mut *dst);
            while let Some(r) = rows.try_next().await? {
                back.push(row_digest(&from_postgres(t, &r)?));
            }
        }
        let target_rows = back.len() as u64;
        let target_sum = table_checksum(back);
        if (source_rows, &source_sum) != (target_rows, &target_sum) {
            return Err(MigrateError::Mismatch {
                table: t.name,
                source_rows,
                source_sum,
                target_rows,
                target_sum,
            });
        }
        tables.push(TableReport {
            table: t.name,
            rows: source_rows,
            checksum: source_sum,
        });
    }
    src.rollback().await?;
    // Servers already on the target resync with what was copied.
    sqlx::query("SELECT meshid_note_change('migrated', 'sqlite')")
        .execute(&mut *dst)
        .await?;
    if opts.dry_run {
        dst.rollback().await?;
    } else {
        dst.commit().await?;
    }
    Ok(MigrateReport {
        tables,
        source_schema,
        target_rows_before,
        dry_run: opts.dry_run,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, banned: bool, aliases: &[&str]) -> Vec<Val> {
        vec![
            Val::Text(id.into()),
            Val::Int(7),
            Val::Blob(vec![1, 2]),
            Val::Bool(banned),
            Val::TextList(aliases.iter().map(|s| s.to_string()).collect()),
        ]
    }

    #[test]
    fn checksum_ignores_order_but_not_content() {
        let a = row("a", false, &["x", "y"]);
        let b = row("b", true, &[]);
        let sum = table_checksum(vec![row_digest(&a), row_digest(&b)]);
        assert_eq!(sum, table_checksum(vec![row_digest(&b), row_digest(&a)]));
        for changed in [
            row("a", true, &["x", "y"]),
            row("a", false, &["x"]),
            row("a", false, &["xy"]),
            row("a", false, &["y", "x"]),
            row("A", false, &["x", "y"]),
        ] {
            assert_ne!(
                sum,
                table_checksum(vec![row_digest(&changed), row_digest(&b)]),
                "{changed:?}"
            );
        }
        // A lost row changes the sum.
        assert_ne!(sum, table_checksum(vec![row_digest(&a)]));
        // Field boundaries count: ("ab", "") is not ("a", "b").
        assert_ne!(
            row_digest(&[Val::Text("ab".into()), Val::Text(String::new())]),
            row_digest(&[Val::Text("a".into()), Val::Text("b".into())])
        );
    }
}
