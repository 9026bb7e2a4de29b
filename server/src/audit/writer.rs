//! The audit writer thread: owns the file, chains, rotates and fsyncs, so no
//! write or fsync ever runs on the async runtime. Callers hand it batches
//! over a channel and are answered once their records are durable; whatever
//! is pending when the thread wakes goes out with one fsync (group commit).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};

use serde_json::Value;

use super::record::{self, GENESIS, Hash, NotARecord, PRUNED_EVENT};
use super::{AuditError, AuditSettings, ChainHead, Event, Shared};

/// How a caller wants to hear that its records are durable.
pub(crate) enum Ack {
    /// Nobody waits (rate-limited refusals).
    None,
    /// An async caller.
    Async(tokio::sync::oneshot::Sender<Result<(), AuditError>>),
    /// A blocking caller.
    Blocking(std::sync::mpsc::Sender<Result<(), AuditError>>),
}

impl Ack {
    fn send(self, r: Result<(), AuditError>) {
        match self {
            Self::None => {
                if let Err(e) = r {
                    tracing::error!(error = %e, "cannot write audit log");
                }
            }
            Self::Async(tx) => {
                let _ = tx.send(r);
            }
            Self::Blocking(tx) => {
                let _ = tx.send(r);
            }
        }
    }
}

/// A request to the writer.
pub(crate) enum Msg {
    /// Append events.
    Append(Vec<Event>, Ack),
    /// Continue the chain from (seq, hash), then append the event.
    Rebase(u64, Hash, Event, Ack),
}

/// What recovery found when the log was opened.
pub(crate) struct Opened {
    pub(crate) file: File,
    pub(crate) size: u64,
    pub(crate) first_seq: Option<u64>,
    pub(crate) head: ChainHead,
    pub(crate) notes: Vec<Event>,
}

fn io_err(path: &Path, e: &std::io::Error) -> AuditError {
    AuditError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(0o600)
        .open(path)
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// The last record of a complete file, as a chain head.
fn head_of(path: &Path) -> Result<Option<ChainHead>, AuditError> {
    let mut f = File::open(path).map_err(|e| io_err(path, &e))?;
    match record::last_line(&mut f).map_err(|e| io_err(path, &e))? {
        None => Ok(None),
        Some((line, _)) => match record::parse(&line) {
            Ok(p) => Ok(Some(ChainHead {
                seq: p.head.seq,
                hash: p.hash,
            })),
            Err(e) => Err(AuditError::Damaged {
                path: path.to_path_buf(),
                message: format!("its last line is {e}; run `meshid server audit verify`"),
            }),
        },
    }
}

/// Opens the current log, repairing a torn last write and moving an
/// unchained (pre-chaining) log aside, and finds the chain head.
pub(crate) fn open(path: &Path) -> Result<Opened, AuditError> {
    let io = |e: std::io::Error| io_err(path, &e);
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut notes = Vec::new();
    let mut file = open_append(path).map_err(io)?;
    let mut size = file.seek(SeekFrom::End(0)).map_err(io)?;
    let mut head = None;
    if size > 0 {
        match record::last_line(&mut file).map_err(io)? {
            None => {
                return Err(AuditError::Damaged {
                    path: path.to_path_buf(),
                    message: "it holds no complete line".into(),
                });
            }
            Some((line, end)) => {
                if end < size {
                    // A write the process did not finish: never acknowledged,
                    // so nothing it carried was handed out. Cut it and say so.
                    let torn = size - end;
                    tracing::warn!(path = %path.display(), bytes = torn, "audit log ends in an unfinished write; removing it");
                    file.set_len(end).map_err(io)?;
                    file.sync_all().map_err(io)?;
                    size = end;
                    notes.push(
                        Event::new("audit_log_repaired")
                            .with("removed_unterminated_bytes", torn)
                            .with("file", path.display().to_string()),
                    );
                }
                match record::parse(&line) {
                    Ok(p) => {
                        head = Some(ChainHead {
                            seq: p.head.seq,
                            hash: p.hash,
                        });
                    }
                    Err(NotARecord::Unchained) => {
                        let mut aside = path.as_os_str().to_os_string();
                        aside.push(format!(".unchained-{}", super::seal::now_ms() / 1000));
                        let aside = PathBuf::from(aside);
                        drop(file);
                        std::fs::rename(path, &aside).map_err(io)?;
                        sync_dir(path).map_err(io)?;
                        tracing::warn!(from = %path.display(), to = %aside.display(), "the audit log predates hash chaining; moved aside, a new chain starts");
                        notes.push(
                            Event::new("audit_chain_started")
                                .with("unchained_log_moved_to", aside.display().to_string()),
                        );
                        file = open_append(path).map_err(io)?;
                        size = 0;
                    }
                    Err(e) => {
                        return Err(AuditError::Damaged {
                            path: path.to_path_buf(),
                            message: format!(
                                "its last line is {e}; run `meshid server audit verify`"
                            ),
                        });
                    }
                }
            }
        }
    }
    let first_seq = if size > 0 {
        record::first_line(path)
            .map_err(io)?
            .and_then(|l| record::parse(&l).ok())
            .map(|p| p.head.seq)
    } else {
        None
    };
    if head.is_none() {
        // The current file is new or empty: continue from the newest rotated one.
        for (_, p) in record::rotated_files(path).map_err(io)?.iter().rev() {
            if let Some(h) = head_of(p)? {
                head = Some(h);
                break;
            }
        }
    }
    Ok(Opened {
        file,
        size,
        first_seq: first_seq.or(head.map(|h| h.seq + 1)),
        head: head.unwrap_or(ChainHead {
            seq: 0,
            hash: GENESIS,
        }),
        notes,
    })
}

/// The writer's state.
pub(crate) struct Writer {
    path: PathBuf,
    file: File,
    /// Bytes in the current file that are durable.
    size: u64,
    /// Sequence number of the current file's first record.
    first_seq: Option<u64>,
    /// Last record written (durable or pending in `buf`).
    seq: u64,
    hash: Hash,
    buf: Vec<u8>,
    settings: AuditSettings,
    shared: Arc<Shared>,
    /// Set after a failure that could not be undone: every later write fails.
    broken: Option<String>,
}

impl Writer {
    pub(crate) fn new(
        path: PathBuf,
        opened: Opened,
        settings: AuditSettings,
        shared: Arc<Shared>,
    ) -> Self {
        Self {
            path,
            file: opened.file,
            size: opened.size,
            first_seq: opened.first_seq,
            seq: opened.head.seq,
            hash: opened.head.hash,
            buf: Vec::new(),
            settings,
            shared,
            broken: None,
        }
    }

    /// Serves requests until every sender is gone.
    pub(crate) fn run(mut self, rx: &Receiver<Msg>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < 4096 {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            self.commit(batch);
        }
    }

    /// Appends events now (start-up notes); returns once durable.
    pub(crate) fn append_now(&mut self, events: Vec<Event>) -> Result<(), AuditError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.commit(vec![Msg::Append(events, Ack::Blocking(tx))]);
        rx.recv().unwrap_or(Err(AuditError::Stopped))
    }

    fn commit(&mut self, batch: Vec<Msg>) {
        let mut acks = Vec::with_capacity(batch.len());
        let mut result = match &self.broken {
            Some(m) => Err(AuditError::Other(format!(
                "audit log unusable since an earlier write failed ({m}); restart the server"
            ))),
            None => Ok(()),
        };
        let start = (self.seq, self.hash, self.size);
        let mut written = 0u64;
        for msg in batch {
            let (events, ack) = match msg {
                Msg::Append(events, ack) => (events, ack),
                Msg::Rebase(seq, hash, event, ack) => {
                    if result.is_ok() {
                        result = self.flush();
                    }
                    if result.is_ok() {
                        self.seq = seq;
                        self.hash = hash;
                    }
                    (vec![event], ack)
                }
            };
            if result.is_ok() {
                for e in events {
                    if let Err(err) = self.push(e) {
                        result = Err(err);
                        break;
                    }
                    written += 1;
                }
            }
            acks.push(ack);
        }
        if result.is_ok() {
            result = self.flush();
        }
        match &result {
            Ok(()) => {
                let head = ChainHead {
                    seq: self.seq,
                    hash: self.hash,
                };
                if let Ok(mut h) = self.shared.head.lock() {
                    *h = head;
                }
                self.shared.counters.records.inc_by(written);
                let sealed = self.shared.sealed_seq.load(Ordering::SeqCst);
                if head.seq.saturating_sub(sealed) >= self.settings.seal_every_records {
                    self.shared.seal_wanted.notify_one();
                }
            }
            Err(e) => {
                self.shared.counters.write_errors.inc();
                tracing::error!(error = %e, "audit log write failed; the operations waiting on it are refused");
                self.undo(start);
            }
        }
        for a in acks {
            a.send(result.clone());
        }
    }

    /// Puts the writer back to the last durable state after a failure.
    fn undo(&mut self, start: (u64, Hash, u64)) {
        self.buf.clear();
        let durable = self.shared.head.lock().map(|h| *h).ok();
        if let Some(h) = durable {
            self.seq = h.seq;
            self.hash = h.hash;
        } else {
            (self.seq, self.hash, _) = start;
        }
        // Cut whatever part of the failed write reached the current file.
        let cut = self
            .file
            .set_len(self.size)
            .and_then(|()| self.file.sync_all());
        if let Err(e) = cut {
            self.broken = Some(e.to_string());
        }
    }

    /// Chains one event into the pending buffer, rotating first if it would
    /// not fit the current file (a record larger than `max_file_size` gets a
    /// file of its own).
    fn push(&mut self, event: Event) -> Result<(), AuditError> {
        let mut line = record::encode(self.seq + 1, &self.hash, &event.0);
        let pending = self.size + self.buf.len() as u64;
        if pending > 0 && pending + line.len() as u64 + 1 > self.settings.max_file_size {
            self.flush()?;
            self.rotate()?;
            // Chained after whatever the rotation recorded.
            line = record::encode(self.seq + 1, &self.hash, &event.0);
        }
        self.append_line(line);
        Ok(())
    }

    fn append_line(&mut self, line: Vec<u8>) {
        self.seq += 1;
        self.hash = record::hash(&line);
        self.first_seq.get_or_insert(self.seq);
        self.buf.extend_from_slice(&line);
        self.buf.push(b'\n');
    }

    /// Writes and fsyncs the pending buffer.
    fn flush(&mut self) -> Result<(), AuditError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let path = self.path.clone();
        self.file
            .write_all(&self.buf)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| io_err(&path, &e))?;
        self.size += self.buf.len() as u64;
        self.buf.clear();
        if let Ok(mut h) = self.shared.head.lock() {
            // Durable now, even if a later part of this batch fails.
            *h = ChainHead {
                seq: self.seq,
                hash: self.hash,
            };
        }
        Ok(())
    }

    /// Renames the current file after its first sequence number, starts a
    /// new one, and prunes the oldest files beyond `max_files`.
    fn rotate(&mut self) -> Result<(), AuditError> {
        let io = |p: &Path, e: std::io::Error| io_err(p, &e);
        let first = self.first_seq.unwrap_or(self.seq);
        let rotated = record::rotated_name(&self.path, first);
        std::fs::rename(&self.path, &rotated).map_err(|e| io(&self.path, e))?;
        let file = open_append(&self.path).map_err(|e| io(&self.path, e))?;
        sync_dir(&self.path).map_err(|e| io(&self.path, e))?;
        self.file = file;
        self.size = 0;
        self.first_seq = None;
        tracing::info!(rotated = %rotated.display(), "audit log rotated");
        if self.settings.max_files == 0 {
            return Ok(());
        }
        let rotated_files = record::rotated_files(&self.path).map_err(|e| io(&self.path, e))?;
        let keep = self.settings.max_files.saturating_sub(1);
        let excess = rotated_files.len().saturating_sub(keep);
        for (first_seq, old) in rotated_files.into_iter().take(excess) {
            let Some(last) = head_of(&old)? else {
                std::fs::remove_file(&old).map_err(|e| io(&old, e))?;
                continue;
            };
            std::fs::remove_file(&old).map_err(|e| io(&old, e))?;
            sync_dir(&old).map_err(|e| io(&old, e))?;
            tracing::info!(file = %old.display(), first_seq, last_seq = last.seq, "oldest audit log file pruned (max_files)");
            let ev = Event::new(PRUNED_EVENT)
                .with(
                    "file",
                    old.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                )
                .with("first_seq", first_seq)
                .with("last_seq", last.seq)
                .with("last_hash", Value::String(record::hex32(&last.hash)));
            // Goes into the new file, chained like any record.
            let line = record::encode(self.seq + 1, &self.hash, &ev.0);
            self.append_line(line);
        }
        Ok(())
    }
}
