//! The audit log: one JSON object per line, hash-chained, fsynced before the
//! operation it records is acknowledged, sealed into the store. It never
//! holds key material.
//!
//! - [`record`]: the canonical bytes of a record (also in `docs/audit.md`).
//! - [`writer`]: the thread that owns the file: chaining, group-commit
//!   fsync, rotation by size, pruning beyond `max_files`.
//! - [`seal`]: the server's Ed25519 seal key and the task that signs the
//!   chain head into the store.
//! - [`verify`] and [`show`]: `meshid server audit verify|show`.

pub mod record;
pub mod seal;
pub mod show;
pub mod verify;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use serde_json::{Map, Value};

use record::Hash;
use writer::{Ack, Msg};

/// Failure to write (or open) the audit log. Cloneable: one failed group
/// commit answers every caller in it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// An I/O operation failed.
    #[error("audit log {path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        message: String,
    },
    /// The file is not an audit log the server can continue.
    #[error("audit log {path} is damaged: {message}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The writer thread is gone.
    #[error("audit log writer stopped")]
    Stopped,
    /// Anything else.
    #[error("audit log: {0}")]
    Other(String),
}

impl From<std::io::Error> for AuditError {
    fn from(e: std::io::Error) -> Self {
        Self::Other(e.to_string())
    }
}

/// `[audit]` in the server config.
///
/// ```toml
/// [audit]
/// max_file_size = "100MiB"   # rotate the log when it would grow past this
/// max_files = 10             # files kept, the current one included (0: all)
/// seal_every_records = 1000  # seal the chain head after this many records…
/// seal_every = "1m"          # …or this long after the first unsealed record
/// ```
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuditSettings {
    /// Rotate before the current file would exceed this many bytes. An
    /// integer (bytes) or a string with a unit: `"512KiB"`, `"100MiB"`, `"1GB"`.
    #[serde(
        default = "default_max_file_size",
        deserialize_with = "deserialize_size"
    )]
    pub max_file_size: u64,
    /// Files kept, the current one included; the oldest beyond this are
    /// deleted at rotation (and the deletion is recorded in the chain).
    /// 0 keeps every file.
    #[serde(default = "default_max_files")]
    pub max_files: usize,
    /// Seal the chain head after this many new records.
    #[serde(default = "default_seal_every_records")]
    pub seal_every_records: u64,
    /// Seal the chain head this often while there are unsealed records.
    #[serde(default = "default_seal_every", with = "humantime_serde")]
    pub seal_every: Duration,
}

fn default_max_file_size() -> u64 {
    100 << 20
}
fn default_max_files() -> usize {
    10
}
fn default_seal_every_records() -> u64 {
    1000
}
fn default_seal_every() -> Duration {
    Duration::from_secs(60)
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            max_file_size: default_max_file_size(),
            max_files: default_max_files(),
            seal_every_records: default_seal_every_records(),
            seal_every: default_seal_every(),
        }
    }
}

/// Smallest accepted `max_file_size`.
pub const MIN_FILE_SIZE: u64 = 4096;

impl AuditSettings {
    /// Range checks, as config errors.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_file_size < MIN_FILE_SIZE {
            return Err(format!(
                "audit.max_file_size must be at least {MIN_FILE_SIZE} bytes, got {}",
                self.max_file_size
            ));
        }
        if self.seal_every_records == 0 {
            return Err("audit.seal_every_records must be at least 1".into());
        }
        if self.seal_every < Duration::from_secs(1) {
            return Err("audit.seal_every must be at least 1s".into());
        }
        Ok(())
    }
}

/// Parses `"100MiB"`, `"512 KiB"`, `"1GB"`, `"4096"`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like \"100MiB\""))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (B, KB, KiB, MB, MiB, GB, GiB)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn deserialize_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Int(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Int(n) => Ok(n),
        Size::Text(s) => {
            parse_size(&s).map_err(|e| serde::de::Error::custom(format!("max_file_size: {e}")))
        }
    }
}

/// Members every record carries before the event's own; an event field of
/// the same name is stored with a `field_` prefix.
const RESERVED: [&str; 4] = ["seq", "prev", "ts", "event"];

/// Longest string value stored as given; longer ones are cut (see [`truncate`]).
pub const MAX_STRING: usize = 1024;

/// Bytes kept of a caller-controlled value in a refusal record or log line.
pub const MAX_CALLER_FIELD: usize = 256;

/// `s` cut to at most `max` bytes on a character boundary, marked
/// `…[truncated, N bytes]` when cut.
pub fn truncate(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}…[truncated, {} bytes]", &s[..end], s.len()))
}

fn cap(v: Value) -> Value {
    match v {
        Value::String(s) if s.len() > MAX_STRING => {
            Value::String(truncate(&s, MAX_STRING).into_owned())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(cap).collect()),
        other => other,
    }
}

/// One audit event under construction.
#[derive(Debug, Clone)]
pub struct Event(Map<String, Value>);

impl Event {
    /// A new event of `kind`, e.g. `x509_svid_issued`.
    pub fn new(kind: &str) -> Self {
        let mut m = Map::new();
        m.insert(
            "ts".into(),
            Value::String(
                humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            ),
        );
        m.insert("event".into(), Value::String(kind.into()));
        Self(m)
    }

    /// Adds a field. Strings longer than [`MAX_STRING`] bytes are truncated.
    #[must_use]
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        let key = if RESERVED.contains(&key) {
            format!("field_{key}")
        } else {
            key.to_string()
        };
        self.0.insert(key, cap(value.into()));
        self
    }

    /// The event name.
    pub fn kind(&self) -> &str {
        self.0.get("event").and_then(Value::as_str).unwrap_or("")
    }
}

/// Shorthand for an event with a JSON object of fields.
pub fn event(kind: &str, fields: Value) -> Event {
    let mut e = Event::new(kind);
    if let Value::Object(m) = fields {
        for (k, v) in m {
            e = e.with(&k, v);
        }
    }
    e
}

/// The last durable record: its sequence number and hash (0 and zeros
/// before the first record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainHead {
    /// Sequence number.
    pub seq: u64,
    /// SHA-256 of the record.
    pub hash: Hash,
}

/// Audit counters, registered by [`crate::metrics::Metrics::with_audit`].
#[derive(Debug, Clone, Default)]
pub struct AuditCounters {
    /// Records written.
    pub records: Counter,
    /// Failed writes (each failed group commit once).
    pub write_errors: Counter,
    /// Refusal records left out by the rate limit.
    pub refusals_suppressed: Counter,
    /// Seals stored.
    pub seals_ok: Counter,
    /// Seals that could not be stored.
    pub seals_failed: Counter,
}

/// Limits how many refusals of unauthenticated calls are audited and logged
/// per second; the rest are only counted.
#[derive(Debug)]
pub struct RefusalGate {
    per_second: u32,
    state: Mutex<(Instant, u32, u64)>,
}

/// The gate's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Audit and log it; `suppressed` refusals were left out since the last
    /// admitted one.
    Yes {
        /// Refusals left out before this one.
        suppressed: u64,
    },
    /// Count it only.
    No,
}

/// Refusals audited and logged per second, at most.
pub const REFUSALS_PER_SECOND: u32 = 10;

impl RefusalGate {
    /// A gate admitting `per_second` refusals in each one-second window.
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second,
            state: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    /// Whether to audit and log this refusal.
    pub fn admit(&self) -> Admit {
        let Ok(mut st) = self.state.lock() else {
            return Admit::No;
        };
        let now = Instant::now();
        if now.duration_since(st.0) >= Duration::from_secs(1) {
            st.0 = now;
            st.1 = 0;
        }
        if st.1 < self.per_second {
            st.1 += 1;
            let suppressed = std::mem::take(&mut st.2);
            Admit::Yes { suppressed }
        } else {
            st.2 += 1;
            Admit::No
        }
    }
}

/// State shared by the handles, the writer thread and the sealer.
#[derive(Debug)]
pub struct Shared {
    head: Mutex<ChainHead>,
    /// Highest sequence number sealed into the store.
    pub sealed_seq: AtomicU64,
    /// Signalled by the writer when `seal_every_records` are unsealed.
    pub seal_wanted: tokio::sync::Notify,
    /// Counters.
    pub counters: AuditCounters,
    /// Rate limit for refusal records.
    pub refusals: RefusalGate,
}

/// Appends audit records. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: std::sync::mpsc::Sender<Msg>,
    shared: Arc<Shared>,
    settings: Arc<AuditSettings>,
    path: Arc<PathBuf>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens (appending, creating 0600) the audit log with default settings.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        Self::open_with(path, &AuditSettings::default())
    }

    /// Opens the audit log: repairs an unfinished last write, moves a log
    /// from before hash chaining aside, finds the chain head (in the
    /// current file or the newest rotated one), and starts the writer thread.
    pub fn open_with(path: &Path, settings: &AuditSettings) -> Result<Self, AuditError> {
        let mut opened = writer::open(path)?;
        let notes = std::mem::take(&mut opened.notes);
        let shared = Arc::new(Shared {
            head: Mutex::new(opened.head),
            sealed_seq: AtomicU64::new(0),
            seal_wanted: tokio::sync::Notify::new(),
            counters: AuditCounters::default(),
            refusals: RefusalGate::new(REFUSALS_PER_SECOND),
        });
        let mut w =
            writer::Writer::new(path.to_path_buf(), opened, settings.clone(), shared.clone());
        if !notes.is_empty() {
            w.append_now(notes)?;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("meshid-audit".into())
            .spawn(move || w.run(&rx))
            .map_err(|e| AuditError::Other(format!("cannot start the audit writer: {e}")))?;
        Ok(Self {
            tx,
            shared,
            settings: Arc::new(settings.clone()),
            path: Arc::new(path.to_path_buf()),
        })
    }

    /// The current file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The settings in effect.
    pub fn settings(&self) -> &AuditSettings {
        &self.settings
    }

    /// The last durable record.
    pub fn head(&self) -> ChainHead {
        self.shared.head.lock().map(|h| *h).unwrap_or(ChainHead {
            seq: 0,
            hash: record::GENESIS,
        })
    }

    /// State shared with the writer and the sealer.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The audit counters, for the metrics registry.
    pub fn counters(&self) -> AuditCounters {
        self.shared.counters.clone()
    }

    /// Writes events and returns once they are durable (one fsync for
    /// everything pending). The write happens on the audit thread; this
    /// future only waits.
    pub async fn record(&self, events: Vec<Event>) -> Result<(), AuditError> {
        if events.is_empty() {
            return Ok(());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Msg::Append(events, Ack::Async(tx)))
            .map_err(|_| AuditError::Stopped)?;
        rx.await.map_err(|_| AuditError::Stopped)?
    }

    /// Writes events and blocks until they are durable. Not for async code:
    /// use [`AuditLog::record`] there.
    pub fn write_all(&self, events: &[Event]) -> Result<(), AuditError> {
        if events.is_empty() {
            return Ok(());
        }
        let (tx, rx) = std::sync::mpsc::channel();
        self.tx
            .send(Msg::Append(events.to_vec(), Ack::Blocking(tx)))
            .map_err(|_| AuditError::Stopped)?;
        rx.recv().map_err(|_| AuditError::Stopped)?
    }

    /// Writes one event and blocks until it is durable (see [`AuditLog::write_all`]).
    pub fn write(&self, event: Event) -> Result<(), AuditError> {
        self.write_all(std::slice::from_ref(&event))
    }

    /// Queues an event without waiting (a failure is logged by the writer):
    /// for refusals, which change nothing and must not hold the caller.
    pub fn submit(&self, event: Event) {
        if self.tx.send(Msg::Append(vec![event], Ack::None)).is_err() {
            tracing::error!("cannot write audit log: writer stopped");
        }
    }

    /// Continues the chain from a sealed head beyond the file's last record,
    /// then records `event` (see [`seal::Sealer::start`]).
    pub async fn rebase(&self, seq: u64, hash: Hash, event: Event) -> Result<(), AuditError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Msg::Rebase(seq, hash, event, Ack::Async(tx)))
            .map_err(|_| AuditError::Stopped)?;
        rx.await.map_err(|_| AuditError::Stopped)?
    }

    /// The rate limit for refusal records of unauthenticated calls.
    pub fn refusals(&self) -> &RefusalGate {
        &self.shared.refusals
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lines(p: &Path) -> Vec<Value> {
        std::fs::read_to_string(p)
            .expect("read")
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect()
    }

    #[test]
    fn writes_chained_json_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("a.log");
        let log = AuditLog::open(&p).expect("open");
        log.write_all(&[
            event(
                "token_created",
                json!({"spiffe_id": "spiffe://td/x", "seq": 9}),
            ),
            Event::new("entry_deleted").with("entry_id", "abc"),
        ])
        .expect("write");
        let v = lines(&p);
        assert_eq!(v.len(), 2);
        assert_eq!(v[0]["event"], "token_created");
        assert_eq!(v[0]["seq"], 1);
        assert_eq!(v[0]["field_seq"], 9);
        assert_eq!(v[0]["prev"], "0".repeat(64));
        assert_eq!(v[1]["entry_id"], "abc");
        assert_eq!(v[1]["seq"], 2);
        let text = std::fs::read_to_string(&p).expect("read");
        let first = text.lines().next().expect("line");
        assert_eq!(v[1]["prev"], record::hex32(&record::hash(first.as_bytes())));
        assert_eq!(log.head().seq, 2);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn reopening_continues_and_repairs_a_torn_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("a.log");
        {
            let log = AuditLog::open(&p).expect("open");
            log.write(Event::new("one")).expect("write");
        }
        // An unfinished write after the last record.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .expect("open");
        std::io::Write::write_all(&mut f, b"{\"seq\":2,\"pre").expect("write");
        drop(f);
        let log = AuditLog::open(&p).expect("reopen");
        log.write(Event::new("two")).expect("write");
        let v = lines(&p);
        let events: Vec<_> = v
            .iter()
            .map(|r| r["event"].as_str().expect("event"))
            .collect();
        assert_eq!(events, ["one", "audit_log_repaired", "two"]);
        assert_eq!(v[1]["removed_unterminated_bytes"], 13);
        assert_eq!(v[2]["seq"], 3);
    }

    #[test]
    fn unchained_log_is_moved_aside_and_garbage_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("a.log");
        std::fs::write(&p, "{\"ts\":\"x\",\"event\":\"old\"}\n").expect("write");
        let log = AuditLog::open(&p).expect("open");
        log.write(Event::new("new")).expect("write");
        let v = lines(&p);
        assert_eq!(v[0]["event"], "audit_chain_started");
        assert_eq!(v[0]["seq"], 1);
        let moved = v[0]["unchained_log_moved_to"].as_str().expect("moved");
        assert!(
            std::fs::read_to_string(moved)
                .expect("aside")
                .contains("old")
        );
        drop(log);
        std::fs::write(&p, "garbage\n").expect("write");
        let e = AuditLog::open(&p).expect_err("garbage");
        assert!(e.to_string().contains("damaged"), "{e}");
    }

    #[test]
    fn rotation_continues_the_chain_and_prunes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("a.log");
        let settings = AuditSettings {
            max_file_size: MIN_FILE_SIZE,
            max_files: 3,
            ..AuditSettings::default()
        };
        let log = AuditLog::open_with(&p, &settings).expect("open");
        for i in 0..200 {
            log.write(Event::new("x").with("i", i)).expect("write");
        }
        let files = record::log_files(&p).expect("files");
        assert_eq!(files.len(), 3, "{files:?}");
        for f in &files {
            assert!(std::fs::metadata(f).expect("meta").len() <= MIN_FILE_SIZE);
        }
        // Every file's first record links to the previous file's last one.
        let mut prev: Option<(u64, Hash)> = None;
        let mut pruned = 0;
        for f in &files {
            let text = std::fs::read_to_string(f).expect("read");
            for l in text.lines() {
                let r = record::parse(l.as_bytes()).expect("record");
                if let Some((s, h)) = prev {
                    assert_eq!(r.head.seq, s + 1);
                    assert_eq!(r.prev, h);
                }
                if r.head.event.as_deref() == Some(record::PRUNED_EVENT) {
                    pruned += 1;
                }
                prev = Some((r.head.seq, r.hash));
            }
        }
        assert!(pruned > 0);
        drop(log);
        // Reopened with an empty current file: continues from the newest rotated one.
        std::fs::write(&p, b"").expect("truncate");
        let log = AuditLog::open_with(&p, &settings).expect("reopen");
        let last_rotated = &files[files.len() - 2];
        let text = std::fs::read_to_string(last_rotated).expect("read");
        let last = record::parse(text.lines().last().expect("line").as_bytes()).expect("rec");
        assert_eq!(
            log.head(),
            ChainHead {
                seq: last.head.seq,
                hash: last.hash
            }
        );
    }

    #[test]
    fn sizes_and_truncation() {
        assert_eq!(parse_size("100MiB"), Ok(100 << 20));
        assert_eq!(parse_size("512 KiB"), Ok(512 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("1 parsec").is_err());
        assert_eq!(truncate("abc", 5), "abc");
        let long_e = "é".repeat(300);
        let t = truncate(&long_e, 256);
        assert!(
            t.len() < 300 && t.ends_with("[truncated, 600 bytes]"),
            "{t}"
        );
        let long = "x".repeat(5000);
        let e = Event::new("k").with("f", long.as_str());
        assert!(e.0["f"].as_str().expect("str").len() < 1100);
    }

    #[test]
    fn refusal_gate_limits_per_second() {
        let g = RefusalGate::new(3);
        let got: Vec<_> = (0..5).map(|_| g.admit()).collect();
        assert_eq!(
            got,
            [
                Admit::Yes { suppressed: 0 },
                Admit::Yes { suppressed: 0 },
                Admit::Yes { suppressed: 0 },
                Admit::No,
                Admit::No
            ]
        );
    }
}
