//! The canonical form of one audit record, the files that hold them, and a
//! bounded line reader. `docs/audit.md` describes the same rules for
//! readers in other languages.
//!
//! A record is one line: UTF-8 JSON, an object that begins with
//! `{"seq":<n>,"prev":"<64 hex>",` followed by the event's own members, and
//! ends with a single `\n`. The record's hash is SHA-256 over the line's
//! bytes *without* the `\n`, exactly as stored: a reader never re-serializes.
//! `seq` starts at 1 and grows by one per record; `prev` is the hash of the
//! record with `seq - 1` (64 zeros for seq 1), also across files.

use std::io::{BufRead, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use aws_lc_rs::digest::{SHA256, digest};
use serde::Deserialize;
use serde_json::{Map, Value};

/// A SHA-256 value.
pub type Hash = [u8; 32];

/// `prev` of the first record of a chain.
pub const GENESIS: Hash = [0; 32];

/// Longest line a reader accepts; no real record comes near it.
pub const MAX_LINE: usize = 16 << 20;

/// Event name of the record written when rotation deletes the oldest file.
pub const PRUNED_EVENT: &str = "audit_file_pruned";

/// SHA-256 of a record's bytes (without the newline).
pub fn hash(line: &[u8]) -> Hash {
    let d = digest(&SHA256, line);
    let mut h = [0u8; 32];
    h.copy_from_slice(d.as_ref());
    h
}

/// Lowercase hex of a hash.
pub fn hex32(h: &Hash) -> String {
    hex::encode(h)
}

/// Parses 64 lowercase hex digits.
pub fn parse_hex32(s: &str) -> Option<Hash> {
    if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut h = [0u8; 32];
    hex::decode_to_slice(s, &mut h).ok()?;
    Some(h)
}

/// Encodes a record: `{"seq":…,"prev":"…",` then the members of `body`.
/// Returns the line without its newline.
pub fn encode(seq: u64, prev: &Hash, body: &Map<String, Value>) -> Vec<u8> {
    let mut line = format!("{{\"seq\":{seq},\"prev\":\"{}\"", hex32(prev)).into_bytes();
    // Serializing a map of JSON values cannot fail.
    let rest = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    if rest.len() > 2 {
        line.push(b',');
        line.extend_from_slice(&rest[1..]);
    } else {
        line.push(b'}');
    }
    line
}

/// The members of a record a verifier needs.
#[derive(Debug, Clone, Deserialize)]
pub struct Head {
    /// Sequence number.
    pub seq: u64,
    /// Hex SHA-256 of the previous record.
    pub prev: String,
    /// Event name.
    #[serde(default)]
    pub event: Option<String>,
    /// For `audit_file_pruned`: the last sequence number of the deleted file.
    #[serde(default)]
    pub last_seq: Option<u64>,
    /// For `audit_file_pruned`: the hash of the deleted file's last record.
    #[serde(default)]
    pub last_hash: Option<String>,
}

/// Why a line is not a chained record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotARecord {
    /// NUL bytes or invalid UTF-8.
    Binary,
    /// Valid JSON object without `seq`/`prev`: an audit line from before
    /// hash chaining.
    Unchained,
    /// Anything else, with the parser's message.
    Garbage(String),
}

impl std::fmt::Display for NotARecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Binary => f.write_str("binary data (NUL bytes or invalid UTF-8)"),
            Self::Unchained => {
                f.write_str("a JSON object without \"seq\" and \"prev\" (an unchained audit line)")
            }
            Self::Garbage(m) => write!(f, "not an audit record: {m}"),
        }
    }
}

/// A parsed record line.
#[derive(Debug, Clone)]
pub struct Parsed {
    /// Its members.
    pub head: Head,
    /// `prev` decoded.
    pub prev: Hash,
    /// SHA-256 of the line.
    pub hash: Hash,
}

/// Parses one line (without its newline) as a chained record.
pub fn parse(line: &[u8]) -> Result<Parsed, NotARecord> {
    if line.contains(&0) || std::str::from_utf8(line).is_err() {
        return Err(NotARecord::Binary);
    }
    if !line.starts_with(b"{\"seq\":") {
        return Err(match serde_json::from_slice::<Value>(line) {
            Ok(Value::Object(_)) => NotARecord::Unchained,
            Ok(_) => NotARecord::Garbage("not a JSON object".into()),
            Err(e) => NotARecord::Garbage(e.to_string()),
        });
    }
    let head: Head =
        serde_json::from_slice(line).map_err(|e| NotARecord::Garbage(e.to_string()))?;
    let prev = parse_hex32(&head.prev)
        .ok_or_else(|| NotARecord::Garbage("\"prev\" is not 64 lowercase hex digits".into()))?;
    if head.seq == 0 {
        return Err(NotARecord::Garbage("\"seq\" must be at least 1".into()));
    }
    Ok(Parsed {
        head,
        prev,
        hash: hash(line),
    })
}

/// One line as read from a file.
#[derive(Debug)]
pub struct Line {
    /// Bytes without the newline.
    pub bytes: Vec<u8>,
    /// Whether a newline ended it (false only for a file's last line).
    pub terminated: bool,
}

/// Reads lines of at most [`MAX_LINE`] bytes.
#[derive(Debug)]
pub struct LineReader<R> {
    inner: R,
}

/// A line longer than [`MAX_LINE`].
#[derive(Debug, thiserror::Error)]
#[error("line longer than {} MiB: not an audit log", MAX_LINE >> 20)]
pub struct LineTooLong;

impl<R: BufRead> LineReader<R> {
    /// Wraps a buffered reader.
    pub fn new(inner: R) -> Self {
        Self { inner }
    }

    /// The next line, or `None` at the end.
    pub fn next_line(&mut self) -> std::io::Result<Option<Line>> {
        let mut bytes = Vec::new();
        loop {
            let buf = self.inner.fill_buf()?;
            if buf.is_empty() {
                return Ok((!bytes.is_empty()).then_some(Line {
                    bytes,
                    terminated: false,
                }));
            }
            let (take, done) = match memchr(buf) {
                Some(i) => (i, true),
                None => (buf.len(), false),
            };
            if bytes.len() + take > MAX_LINE {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    LineTooLong,
                ));
            }
            bytes.extend_from_slice(&buf[..take]);
            self.inner.consume(if done { take + 1 } else { take });
            if done {
                return Ok(Some(Line {
                    bytes,
                    terminated: true,
                }));
            }
        }
    }
}

fn memchr(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'\n')
}

/// The last complete line of a file and the offset just past it (where a
/// torn, unterminated tail begins), or `None` if the file holds no newline.
pub fn last_line(file: &mut std::fs::File) -> std::io::Result<Option<(Vec<u8>, u64)>> {
    let len = file.seek(SeekFrom::End(0))?;
    let mut end = len;
    let mut chunk = 64 * 1024u64;
    // Find the last newline.
    let mut nl = None;
    let mut pos = len;
    while pos > 0 && nl.is_none() {
        let start = pos.saturating_sub(chunk);
        let mut buf = vec![0u8; usize::try_from(pos - start).unwrap_or(0)];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buf)?;
        if let Some(i) = buf.iter().rposition(|&c| c == b'\n') {
            nl = Some(start + i as u64);
        }
        pos = start;
    }
    let Some(nl) = nl else { return Ok(None) };
    end = end.min(nl + 1);
    // The line before that newline.
    let mut begin = nl;
    let mut found = false;
    while begin > 0 && !found {
        let start = begin.saturating_sub(chunk);
        let mut buf = vec![0u8; usize::try_from(begin - start).unwrap_or(0)];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buf)?;
        match buf.iter().rposition(|&c| c == b'\n') {
            Some(i) => {
                begin = start + i as u64 + 1;
                found = true;
            }
            None => begin = start,
        }
        if nl - begin > MAX_LINE as u64 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                LineTooLong,
            ));
        }
        chunk *= 2;
    }
    let mut line = vec![0u8; usize::try_from(nl - begin).unwrap_or(0)];
    file.seek(SeekFrom::Start(begin))?;
    file.read_exact(&mut line)?;
    Ok(Some((line, end)))
}

/// The first line of a file, if it has a complete one.
pub fn first_line(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    let f = std::fs::File::open(path)?;
    let mut r = LineReader::new(std::io::BufReader::new(f));
    Ok(r.next_line()?.filter(|l| l.terminated).map(|l| l.bytes))
}

/// Name of the file a rotation turns the current log into: the log's name
/// and the sequence number of its first record, e.g. `audit.log.000000000001`.
pub fn rotated_name(current: &Path, first_seq: u64) -> PathBuf {
    let mut name = current
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".{first_seq:012}"));
    current.with_file_name(name)
}

/// Rotated files of the log at `current`, oldest first, as (first seq, path).
pub fn rotated_files(current: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let dir = match current.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let Some(base) = current.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{base}.");
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for ent in rd {
        let ent = ent?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(num) = name.strip_prefix(&prefix)
            && !num.is_empty()
            && num.bytes().all(|b| b.is_ascii_digit())
            && let Ok(n) = num.parse::<u64>()
        {
            out.push((n, dir.join(name)));
        }
    }
    out.sort();
    Ok(out)
}

/// Every file of the log at `current`, oldest first: rotated files, then
/// the current one if it exists.
pub fn log_files(current: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = rotated_files(current)?
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    if current.exists() {
        files.push(current.to_path_buf());
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_then_parse() {
        let mut m = Map::new();
        m.insert("event".into(), "x".into());
        m.insert("ts".into(), "2026-01-01T00:00:00Z".into());
        let line = encode(7, &GENESIS, &m);
        let text = String::from_utf8(line.clone()).expect("utf8");
        assert!(text.starts_with(&format!("{{\"seq\":7,\"prev\":\"{}\",", "0".repeat(64))));
        let p = parse(&line).expect("parses");
        assert_eq!(p.head.seq, 7);
        assert_eq!(p.prev, GENESIS);
        assert_eq!(p.hash, hash(&line));
        assert_eq!(p.head.event.as_deref(), Some("x"));
        let empty = encode(1, &GENESIS, &Map::new());
        assert!(parse(&empty).is_ok(), "{}", String::from_utf8_lossy(&empty));
    }

    #[test]
    fn not_records() {
        assert!(matches!(parse(b"\x00\x01\x02"), Err(NotARecord::Binary)));
        assert_eq!(
            parse(br#"{"ts":"x","event":"y"}"#).map(|_| ()),
            Err(NotARecord::Unchained)
        );
        assert!(matches!(parse(b"hello"), Err(NotARecord::Garbage(_))));
        assert!(matches!(
            parse(br#"{"seq":1,"prev":"zz"}"#),
            Err(NotARecord::Garbage(_))
        ));
        assert!(matches!(
            parse(format!("{{\"seq\":0,\"prev\":\"{}\"}}", "0".repeat(64)).as_bytes()),
            Err(NotARecord::Garbage(_))
        ));
    }

    #[test]
    fn last_line_and_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        std::fs::write(&p, b"one\ntwo\nthr").expect("write");
        let mut f = std::fs::File::open(&p).expect("open");
        let (line, end) = last_line(&mut f).expect("read").expect("some");
        assert_eq!(line, b"two");
        assert_eq!(end, 8);
        std::fs::write(&p, b"no newline").expect("write");
        let mut f = std::fs::File::open(&p).expect("open");
        assert!(last_line(&mut f).expect("read").is_none());
        let long = format!("{}\n{}\n", "a".repeat(200_000), "b".repeat(150_000));
        std::fs::write(&p, &long).expect("write");
        let mut f = std::fs::File::open(&p).expect("open");
        let (line, end) = last_line(&mut f).expect("read").expect("some");
        assert_eq!(line.len(), 150_000);
        assert_eq!(end, long.len() as u64);
    }

    #[test]
    fn rotated_names_sort_by_first_seq() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cur = dir.path().join("audit.log");
        for n in [1001u64, 1, 20] {
            std::fs::write(rotated_name(&cur, n), b"").expect("write");
        }
        std::fs::write(dir.path().join("audit.log.unchained"), b"").expect("write");
        std::fs::write(&cur, b"").expect("write");
        let files = log_files(&cur).expect("list");
        let names: Vec<_> = files
            .iter()
            .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "audit.log.000000000001",
                "audit.log.000000000020",
                "audit.log.000000001001",
                "audit.log"
            ]
        );
    }
}
