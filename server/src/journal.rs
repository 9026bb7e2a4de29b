//! Group commit for issuance: concurrent signing calls hand their journal
//! records and audit events to one writer task, which stores everything
//! pending in one store transaction and one audit fsync, both at once, then
//! acknowledges every caller. Nothing is returned to an agent before it is
//! on record in both, and concurrent batches never contend for SQLite's
//! write lock. When one of the two writes fails, the other may hold records
//! of certificates that were signed but never handed out: the record errs
//! on the side of too much, never too little.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::audit::{AuditLog, Event};
use crate::store::{IssuedRecord, Store};

struct Pending {
    records: Vec<IssuedRecord>,
    events: Vec<Event>,
    done: oneshot::Sender<Result<(), JournalError>>,
}

/// Why issued certificates could not be put on record (and so must not be
/// handed out).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// The store did not take the records.
    #[error("journal: {message}")]
    Store {
        /// The store's error.
        message: String,
        /// Whether the database was unreachable (retry later).
        unavailable: bool,
    },
    /// The audit log could not be written: nothing is issued unaudited.
    #[error("audit log not writable, refusing to issue unaudited: {0}")]
    Audit(String),
    /// The writer task is gone (shutting down).
    #[error("journal writer stopped")]
    Stopped,
}

/// Handle to the issuance journal writer.
#[derive(Clone)]
pub struct Journal {
    tx: mpsc::Sender<Pending>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Journal")
    }
}

impl Journal {
    /// Starts the writer task.
    pub fn start(store: Arc<dyn Store>, audit: AuditLog) -> Self {
        let (tx, mut rx) = mpsc::channel::<Pending>(1024);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut group = vec![first];
                while let Ok(p) = rx.try_recv() {
                    group.push(p);
                }
                let mut records = Vec::new();
                let mut events = Vec::new();
                let mut waiters = Vec::with_capacity(group.len());
                for p in group {
                    records.extend(p.records);
                    events.extend(p.events);
                    waiters.push(p.done);
                }
                // Both writes (and their fsyncs) at once: a batch waits for
                // the slower of the two, not for their sum.
                let (stored, audited) =
                    tokio::join!(store.record_issued(&records), audit.record(events));
                let result = match (stored, audited) {
                    (Err(e), _) => Err(JournalError::Store {
                        unavailable: e.is_unavailable(),
                        message: e.to_string(),
                    }),
                    (Ok(()), audited) => audited.map_err(|e| JournalError::Audit(e.to_string())),
                };
                if let Err(e) = &result {
                    tracing::error!(error = %e, "issuance journal write failed");
                }
                for w in waiters {
                    let _ = w.send(result.clone());
                }
            }
        });
        Self { tx }
    }

    /// Records issued certificates and audit events durably.
    pub async fn commit(
        &self,
        records: Vec<IssuedRecord>,
        events: Vec<Event>,
    ) -> Result<(), JournalError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Pending {
                records,
                events,
                done,
            })
            .await
            .map_err(|_| JournalError::Stopped)?;
        wait.await.map_err(|_| JournalError::Stopped)?
    }
}
