//! Reading the records of an audit log in order across its files: each
//! record's place (file, line), sequence number and chain links, streamed
//! so that memory does not grow with the log.

use std::path::PathBuf;

use super::super::record::{self, Hash, LineReader, PRUNED_EVENT, parse_hex32};
use super::{Damage, DamageKind, VerifyError};

#[derive(Debug, Clone)]
pub(super) struct Rec {
    pub(super) file: usize,
    pub(super) line: u64,
    pub(super) seq: u64,
    pub(super) prev: Hash,
    pub(super) hash: Hash,
    pub(super) pruned: Option<(u64, Hash)>,
}

/// Reads records from the files in order.
pub(super) struct Records<'a> {
    files: &'a [PathBuf],
    explicit: bool,
    idx: usize,
    reader: Option<LineReader<std::io::BufReader<std::fs::File>>>,
    line: u64,
    lines_in_file: u64,
    pub(super) warnings: Vec<String>,
}

impl<'a> Records<'a> {
    pub(super) fn new(files: &'a [PathBuf], explicit: bool) -> Self {
        Self {
            files,
            explicit,
            idx: 0,
            reader: None,
            line: 0,
            lines_in_file: 0,
            warnings: Vec::new(),
        }
    }

    pub(super) fn damage(&self, kind: DamageKind, seq: Option<u64>, detail: String) -> VerifyError {
        VerifyError::Damaged(Damage {
            file: self.files.get(self.idx).cloned(),
            line: Some(self.line),
            seq,
            kind,
            detail,
        })
    }

    pub(super) fn next_rec(&mut self) -> Result<Option<Rec>, VerifyError> {
        loop {
            if self.idx >= self.files.len() {
                return Ok(None);
            }
            let path = &self.files[self.idx];
            let unreadable = |e: std::io::Error| VerifyError::Unreadable {
                path: path.clone(),
                message: e.to_string(),
            };
            if self.reader.is_none() {
                let f = std::fs::File::open(path).map_err(unreadable)?;
                self.reader = Some(LineReader::new(std::io::BufReader::with_capacity(
                    256 * 1024,
                    f,
                )));
                self.line = 0;
                self.lines_in_file = 0;
            }
            let Some(reader) = self.reader.as_mut() else {
                continue;
            };
            let next = match reader.next_line() {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    self.line += 1;
                    return Err(self.damage(DamageKind::NotARecord, None, e.to_string()));
                }
                Err(e) => return Err(unreadable(e)),
            };
            let Some(line) = next else {
                let last = self.idx + 1 == self.files.len();
                if self.lines_in_file == 0 && (self.explicit || !last) {
                    return Err(VerifyError::Damaged(Damage {
                        file: Some(path.clone()),
                        line: None,
                        seq: None,
                        kind: DamageKind::NotARecord,
                        detail: "the file is empty".into(),
                    }));
                }
                self.idx += 1;
                self.reader = None;
                continue;
            };
            self.line += 1;
            self.lines_in_file += 1;
            if !line.terminated {
                if self.idx + 1 == self.files.len() {
                    // The server may be writing it right now.
                    self.warnings.push(format!(
                        "{}:{}: the last line is unfinished (a write in progress or a torn write); not checked",
                        path.display(),
                        self.line
                    ));
                    self.idx += 1;
                    self.reader = None;
                    continue;
                }
                return Err(self.damage(
                    DamageKind::NotARecord,
                    None,
                    "an unterminated line in the middle of the log".into(),
                ));
            }
            let p = record::parse(&line.bytes)
                .map_err(|e| self.damage(DamageKind::NotARecord, None, e.to_string()))?;
            let pruned = if p.head.event.as_deref() == Some(PRUNED_EVENT) {
                match (
                    p.head.last_seq,
                    p.head.last_hash.as_deref().and_then(parse_hex32),
                ) {
                    (Some(s), Some(h)) => Some((s, h)),
                    _ => {
                        return Err(self.damage(
                            DamageKind::NotARecord,
                            Some(p.head.seq),
                            format!("{PRUNED_EVENT} without last_seq and last_hash"),
                        ));
                    }
                }
            } else {
                None
            };
            return Ok(Some(Rec {
                file: self.idx,
                line: self.line,
                seq: p.head.seq,
                prev: p.prev,
                hash: p.hash,
                pruned,
            }));
        }
    }
}
