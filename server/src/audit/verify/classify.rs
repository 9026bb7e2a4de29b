//! Naming the damage where the chain breaks: a record missing, inserted,
//! swapped, edited or replayed, told apart by looking one record ahead.

use std::path::PathBuf;

use super::super::record::hex32;
use super::records::Rec;
use super::{Damage, DamageKind, VerifyError};

pub(super) fn at(files: &[PathBuf], r: &Rec, kind: DamageKind, detail: String) -> VerifyError {
    VerifyError::Damaged(Damage {
        file: files.get(r.file).cloned(),
        line: Some(r.line),
        seq: Some(r.seq),
        kind,
        detail,
    })
}

/// Classifies a record that does not follow `p`, looking one record ahead.
pub(super) fn classify(files: &[PathBuf], p: &Rec, cur: &Rec, next: Option<&Rec>) -> VerifyError {
    let expected = p.seq + 1;
    let next_fits = next.is_some_and(|n| n.seq == expected && n.prev == p.hash);
    if next_fits {
        if cur.seq == expected + 1 && next.is_some_and(|n| cur.prev == n.hash) {
            return at(
                files,
                cur,
                DamageKind::Reordered,
                format!("seq {} comes before seq {expected}", cur.seq),
            );
        }
        return at(
            files,
            cur,
            DamageKind::Inserted,
            format!(
                "this record is not part of the chain: the next line continues from seq {} (inserted, or moved from elsewhere)",
                p.seq
            ),
        );
    }
    if cur.seq == expected {
        // It claims the right place but links elsewhere: the record before it
        // is not the one that was written.
        return at(
            files,
            p,
            DamageKind::Edited,
            format!(
                "the record changed after it was written: its SHA-256 is {}, the next record (line {}) was chained to {}",
                hex32(&p.hash),
                cur.line,
                hex32(&cur.prev)
            ),
        );
    }
    if cur.seq > expected {
        let missing = if cur.seq - 1 == expected {
            format!("record seq {expected} is missing")
        } else {
            format!("records seq {expected}..{} are missing", cur.seq - 1)
        };
        return at(
            files,
            cur,
            DamageKind::Deleted,
            format!("{missing} before this line"),
        );
    }
    if cur.seq == p.seq && cur.prev == p.prev {
        // Two records claim the same place. The one the chain goes on from is
        // genuine; the other was inserted.
        if next.is_some_and(|n| n.prev == cur.hash) {
            return at(
                files,
                p,
                DamageKind::Inserted,
                format!(
                    "two records claim seq {}; the chain continues from the one at line {}",
                    cur.seq, cur.line
                ),
            );
        }
        return at(
            files,
            cur,
            DamageKind::Inserted,
            format!("a second record with seq {} (a copy)", cur.seq),
        );
    }
    at(
        files,
        cur,
        DamageKind::Reordered,
        format!("seq {} follows seq {}", cur.seq, p.seq),
    )
}
