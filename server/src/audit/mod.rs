//! The audit log: one JSON object per line, fsynced before the operation it
//! records is acknowledged. It never holds key material.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};

/// Failure to write the audit log.
#[derive(Debug, thiserror::Error)]
#[error("audit log: {0}")]
pub struct AuditError(#[from] std::io::Error);

/// Appends audit events. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    file: Arc<Mutex<File>>,
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

    /// Adds a field.
    #[must_use]
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.0.insert(key.into(), value.into());
        self
    }
}

impl AuditLog {
    /// Opens (appending, creating 0600) the audit log.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(Self {
            file: Arc::new(Mutex::new(file)),
        })
    }

    /// Writes events and fsyncs once for the whole batch.
    pub fn write_all(&self, events: &[Event]) -> Result<(), AuditError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(events.len() * 200);
        for e in events {
            serde_json::to_writer(&mut buf, &Value::Object(e.0.clone()))
                .map_err(std::io::Error::other)?;
            buf.push(b'\n');
        }
        let mut f = self
            .file
            .lock()
            .map_err(|_| std::io::Error::other("audit log lock poisoned"))?;
        f.write_all(&buf)?;
        f.sync_data()?;
        Ok(())
    }

    /// Writes one event and fsyncs.
    pub fn write(&self, event: Event) -> Result<(), AuditError> {
        self.write_all(std::slice::from_ref(&event))
    }

    /// Writes from async code without blocking the runtime.
    pub async fn record(&self, events: Vec<Event>) -> Result<(), AuditError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.write_all(&events))
            .await
            .map_err(|e| AuditError(std::io::Error::other(e)))?
    }
}

/// Shorthand for an event with a JSON object of fields.
pub fn event(kind: &str, fields: Value) -> Event {
    let mut e = Event::new(kind);
    if let Value::Object(m) = fields {
        for (k, v) in m {
            e.0.insert(k, v);
        }
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn writes_json_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("a.log");
        let log = AuditLog::open(&p).expect("open");
        log.write_all(&[
            event("token_created", json!({"spiffe_id": "spiffe://td/x"})),
            Event::new("entry_deleted").with("entry_id", "abc"),
        ])
        .expect("write");
        let text = std::fs::read_to_string(&p).expect("read");
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "token_created");
        assert_eq!(lines[1]["entry_id"], "abc");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
