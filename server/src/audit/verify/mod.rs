//! Verifies an audit log: every record's sequence number and link to the
//! record before it, the start of the chain, and the server's seals (their
//! signatures, the records they name, and that none lies beyond the log's
//! end). Streams the files: memory does not grow with the log.

use std::path::{Path, PathBuf};

use super::record::{self, GENESIS, Hash, hex32};
use super::seal;
use crate::store::AuditSeal;

mod classify;
mod records;

use classify::{at, classify};
use records::{Rec, Records};

/// What is wrong at the first bad place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DamageKind {
    /// A record's bytes changed after it was written.
    Edited,
    /// A record that the chain does not contain (or a copy of one).
    Inserted,
    /// Records in the wrong order.
    Reordered,
    /// Records missing from the middle or the start of the log.
    Deleted,
    /// Records missing from the end of the log, before the last seal.
    TailCut,
    /// A seal that the server's key did not make.
    ForgedSeal,
    /// A line that is not an audit record at all.
    NotARecord,
}

impl DamageKind {
    /// Short name, as printed.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Edited => "edited",
            Self::Inserted => "inserted",
            Self::Reordered => "reordered",
            Self::Deleted => "deleted",
            Self::TailCut => "tail cut",
            Self::ForgedSeal => "forged seal",
            Self::NotARecord => "not an audit record",
        }
    }
}

/// The first bad place in a log.
#[derive(Debug, Clone)]
pub struct Damage {
    /// The file (the last file for a cut tail; none for a forged seal).
    pub file: Option<PathBuf>,
    /// 1-based line number in `file`.
    pub line: Option<u64>,
    /// Sequence number concerned.
    pub seq: Option<u64>,
    /// Kind of damage.
    pub kind: DamageKind,
    /// What was found.
    pub detail: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(p) = &self.file {
            write!(f, "{}", p.display())?;
            if let Some(l) = self.line {
                write!(f, ":{l}")?;
            }
            f.write_str(": ")?;
        }
        if let Some(s) = self.seq {
            write!(f, "seq {s}: ")?;
        }
        write!(f, "{}: {}", self.kind.as_str(), self.detail)
    }
}

/// Why verification failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// A file cannot be read.
    #[error("cannot read {path}: {message}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The cause.
        message: String,
    },
    /// There is nothing to verify.
    #[error("{0}")]
    Empty(String),
    /// The log is damaged.
    #[error("audit log damaged: {0}")]
    Damaged(Damage),
}

/// What an intact log holds.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Files read.
    pub files: usize,
    /// Records checked.
    pub records: u64,
    /// First and last sequence numbers.
    pub first_seq: u64,
    /// Last sequence number.
    pub last_seq: u64,
    /// Seals whose signature verified and whose record matched.
    pub seals_checked: usize,
    /// Seals (signature verified) of records before the log's first file,
    /// deleted by rotation.
    pub seals_before_start: usize,
    /// Seq of the last record pruned by rotation, when the log does not
    /// start at seq 1.
    pub pruned_through: Option<u64>,
    /// The newest seal: seq and time (ms).
    pub newest_seal: Option<(u64, i64)>,
    /// Records written after the newest seal (protected by the chain only).
    pub unsealed: u64,
    /// Notes that are not damage.
    pub warnings: Vec<String>,
}

/// Verifies `files` (oldest first) against `seals` of the chain signed by
/// `public_key`. `explicit`: the files were named by the user, so an empty
/// one is an error even at the end.
pub fn verify(
    files: &[PathBuf],
    explicit: bool,
    seals: &[AuditSeal],
    public_key: &[u8],
) -> Result<Report, VerifyError> {
    if files.is_empty() {
        return Err(VerifyError::Empty("no audit log files to verify".into()));
    }
    // Seals first: a forged one is damage whatever the log says.
    let mut checked_seals = Vec::with_capacity(seals.len());
    for s in seals {
        match seal::verify(s, public_key) {
            Ok((seq, hash)) => checked_seals.push((seq, hash, s.sealed_at_ms)),
            Err(e) => {
                return Err(VerifyError::Damaged(Damage {
                    file: None,
                    line: None,
                    seq: u64::try_from(s.seq).ok(),
                    kind: DamageKind::ForgedSeal,
                    detail: format!(
                        "the seal stored for seq {} at {} ms is not genuine: {e}",
                        s.seq, s.sealed_at_ms
                    ),
                }));
            }
        }
    }
    checked_seals.sort_by_key(|s| s.0);
    let mut report = Report {
        files: files.len(),
        newest_seal: checked_seals.last().map(|s| (s.0, s.2)),
        ..Report::default()
    };

    let mut recs = Records::new(files, explicit);
    let mut cur = recs.next_rec()?;
    let mut prev: Option<Rec> = None;
    let mut start: Option<Rec> = None;
    let mut prunes: Vec<(u64, Hash)> = Vec::new();
    let mut seal_idx = 0usize;
    while let Some(c) = cur {
        let next = recs.next_rec();
        let peek = next.as_ref().ok().and_then(Option::as_ref);
        match &prev {
            None => start = Some(c.clone()),
            Some(p) => {
                if !(c.seq == p.seq + 1 && c.prev == p.hash) {
                    return Err(classify(files, p, &c, peek));
                }
            }
        }
        if let Some(pr) = c.pruned {
            prunes.push(pr);
        }
        // Seals of records before this one's seq that never matched a record
        // (only possible before the start: pruned or deleted).
        while seal_idx < checked_seals.len() && checked_seals[seal_idx].0 < c.seq {
            if prev.is_some() {
                // Cannot happen: sequence numbers here are contiguous.
                break;
            }
            report.seals_before_start += 1;
            seal_idx += 1;
        }
        while seal_idx < checked_seals.len() && checked_seals[seal_idx].0 == c.seq {
            if checked_seals[seal_idx].1 != c.hash {
                // The sealed record itself may follow: then this one, which
                // claims its place and links the same way, was inserted.
                if let Some(n) = peek.filter(|n| {
                    n.seq == c.seq && n.prev == c.prev && n.hash == checked_seals[seal_idx].1
                }) {
                    return Err(at(
                        files,
                        &c,
                        DamageKind::Inserted,
                        format!(
                            "this record claims seq {}, which was sealed for the record at line {}",
                            c.seq, n.line
                        ),
                    ));
                }
                return Err(at(
                    files,
                    &c,
                    DamageKind::Edited,
                    format!(
                        "the record changed after it was sealed: the seal of {} ms holds SHA-256 {}, the record's is {}",
                        checked_seals[seal_idx].2,
                        hex32(&checked_seals[seal_idx].1),
                        hex32(&c.hash)
                    ),
                ));
            }
            report.seals_checked += 1;
            seal_idx += 1;
        }
        report.records += 1;
        prev = Some(c);
        cur = next?;
    }
    report.warnings = std::mem::take(&mut recs.warnings);
    let (Some(first), Some(last)) = (start, prev) else {
        return Err(VerifyError::Empty(format!(
            "no audit records in {}",
            files
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    report.first_seq = first.seq;
    report.last_seq = last.seq;

    // The start: seq 1 from nothing, or right after a file rotation pruned.
    if !(first.seq == 1 && first.prev == GENESIS) {
        if prunes
            .iter()
            .any(|(s, h)| s + 1 == first.seq && *h == first.prev)
        {
            report.pruned_through = Some(first.seq - 1);
        } else {
            let detail = if first.seq == 1 {
                "the first record does not start a chain (prev is not zero)".to_string()
            } else {
                format!(
                    "the log starts at seq {} but records 1..{} are missing, and no rotation pruned them",
                    first.seq,
                    first.seq - 1
                )
            };
            return Err(at(files, &first, DamageKind::Deleted, detail));
        }
    }

    // The end: no seal may lie beyond the last record.
    if let Some(&(seq, _, at_ms)) = checked_seals.last()
        && seq > last.seq
    {
        let missing = if seq == last.seq + 1 {
            format!("record seq {seq} is missing")
        } else {
            format!("records seq {}..{seq} are missing", last.seq + 1)
        };
        return Err(VerifyError::Damaged(Damage {
            file: files.get(last.file).cloned(),
            line: Some(last.line),
            seq: Some(last.seq),
            kind: DamageKind::TailCut,
            detail: format!(
                "the log ends here, but the server sealed seq {seq} at {at_ms} ms: {missing}"
            ),
        }));
    }
    report.unsealed = last.seq - checked_seals.last().map_or(0, |s| s.0.max(first.seq - 1));
    Ok(report)
}

/// The files of the log at `current` (rotated ones, then the current one).
pub fn default_files(current: &Path) -> Result<Vec<PathBuf>, VerifyError> {
    record::log_files(current).map_err(|e| VerifyError::Unreadable {
        path: current.to_path_buf(),
        message: e.to_string(),
    })
}
