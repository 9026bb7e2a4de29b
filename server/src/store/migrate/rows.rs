//! One copied row: its typed values as read from either database, the
//! digest and table checksum that prove source and target hold the same,
//! and the check that entries, bundles and authorities still decode.

use aws_lc_rs::digest::{Context, SHA256, digest};
use meshid_proto::types::{Authority, Bundle, Entry};
use prost::Message as _;
use sqlx::Row;
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;

use super::MigrateError;
use super::tables::Kind::{Blob, Bool, Int, Text, TextList};
use super::tables::Table;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Val {
    Text(String),
    Int(i64),
    Blob(Vec<u8>),
    Bool(bool),
    TextList(Vec<String>),
}

impl Val {
    pub(super) fn feed(&self, h: &mut Context) {
        let chunk = |h: &mut Context, tag: u8, b: &[u8]| {
            h.update(&[tag]);
            h.update(&(b.len() as u64).to_be_bytes());
            h.update(b);
        };
        match self {
            Self::Text(s) => chunk(h, b'T', s.as_bytes()),
            Self::Int(i) => chunk(h, b'I', &i.to_be_bytes()),
            Self::Blob(b) => chunk(h, b'B', b),
            Self::Bool(b) => chunk(h, b'O', &[u8::from(*b)]),
            Self::TextList(v) => {
                chunk(h, b'L', &(v.len() as u64).to_be_bytes());
                for s in v {
                    chunk(h, b'T', s.as_bytes());
                }
            }
        }
    }
}

pub(super) fn row_digest(vals: &[Val]) -> [u8; 32] {
    let mut h = Context::new(&SHA256);
    for v in vals {
        v.feed(&mut h);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(h.finish().as_ref());
    out
}

/// Order-independent checksum of a table's row digests.
pub(super) fn table_checksum(mut digests: Vec<[u8; 32]>) -> String {
    digests.sort_unstable();
    hex::encode(digest(&SHA256, &digests.concat()))
}

pub(super) fn corrupt(table: &str, col: &str, e: impl std::fmt::Display) -> MigrateError {
    MigrateError::Source(format!("{table}.{col}: {e}"))
}

pub(super) fn from_sqlite(t: &Table, r: &SqliteRow) -> Result<Vec<Val>, MigrateError> {
    t.cols
        .iter()
        .map(|&(c, k)| {
            Ok(match k {
                Text => Val::Text(r.try_get(c)?),
                Int => Val::Int(r.try_get(c)?),
                Blob => Val::Blob(r.try_get(c)?),
                Bool => Val::Bool(r.try_get::<i64, _>(c)? != 0),
                TextList => Val::TextList(
                    serde_json::from_str(&r.try_get::<String, _>(c)?)
                        .map_err(|e| corrupt(t.name, c, e))?,
                ),
            })
        })
        .collect()
}

pub(super) fn from_postgres(t: &Table, r: &PgRow) -> Result<Vec<Val>, MigrateError> {
    t.cols
        .iter()
        .map(|&(c, k)| {
            Ok(match k {
                Text => Val::Text(r.try_get(c)?),
                Int => Val::Int(r.try_get(c)?),
                Blob => Val::Blob(r.try_get(c)?),
                Bool => Val::Bool(r.try_get(c)?),
                TextList => Val::TextList(r.try_get(c)?),
            })
        })
        .collect()
}

/// Refuses rows the server could not read back (entries and bundles are
/// decoded by every reader).
pub(super) fn check_row(t: &Table, vals: &[Val]) -> Result<(), MigrateError> {
    let Some(Val::Blob(b)) = vals.iter().find(|v| matches!(v, Val::Blob(_))) else {
        return Ok(());
    };
    let b = b.as_slice();
    let decoded = match t.name {
        "entries" => Entry::decode(b).map(drop),
        "bundles" => Bundle::decode(b).map(drop),
        "ca_journal" => Authority::decode(b).map(drop),
        _ => Ok(()),
    };
    decoded.map_err(|e| corrupt(t.name, "data", e))
}
