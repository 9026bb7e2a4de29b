//! Group commit for issuance: concurrent signing calls hand their journal
//! records and audit events to one writer task, which stores everything
//! pending in one SQLite transaction and one audit fsync, then acknowledges
//! every caller. Nothing is returned to an agent before it is on record, and
//! concurrent batches never contend for SQLite's write lock.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::audit::{AuditLog, Event};
use crate::store::{IssuedRecord, Store};

struct Pending {
    records: Vec<IssuedRecord>,
    events: Vec<Event>,
    done: oneshot::Sender<Result<(), String>>,
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
                let result = match store.record_issued(&records).await {
                    Err(e) => Err(format!("journal: {e}")),
                    Ok(()) => audit.record(events).await.map_err(|e| e.to_string()),
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
    ) -> Result<(), String> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Pending {
                records,
                events,
                done,
            })
            .await
            .map_err(|_| "journal writer stopped".to_string())?;
        wait.await
            .map_err(|_| "journal writer stopped".to_string())?
    }
}
