//! How fast the audit log is written and verified.
//!
//! `cargo bench -p meshid-server --bench audit_verify` (`RECORDS`, default
//! 100000; `BATCH`, default 100). Writes RECORDS issuance-sized records
//! through the real writer (chained, fsynced once per batch, rotated at
//! 16 MiB), seals every 1000 records into a real SQLite store, then verifies
//! the whole log against the seals as `meshid server audit verify` does.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::Instant;

use meshid_server::audit::seal::{SealKey, Sealer};
use meshid_server::audit::{AuditLog, AuditSettings, Event, record, verify};
use meshid_server::store::{SqliteStore, Store};

#[tokio::main]
async fn main() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let n = env("RECORDS", 100_000);
    let batch = env("BATCH", 100).max(1);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let settings = AuditSettings {
        max_file_size: 16 << 20,
        max_files: 0,
        ..AuditSettings::default()
    };
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&data.join("meshid.db")).await.unwrap());
    let log_path = data.join("audit.log");
    let log = AuditLog::open_with(&log_path, &settings).unwrap();
    let (key, _) = SealKey::load_or_create(data).unwrap();
    let public_key = key.public_key().to_vec();
    let chain_id = key.chain_id().to_string();
    let sealer = Sealer::start(key, store.clone(), log.clone())
        .await
        .unwrap();

    let start = Instant::now();
    let mut written = 0usize;
    while written < n {
        let k = batch.min(n - written);
        let events = (0..k)
            .map(|i| {
                let s = written + i;
                Event::new("x509_svid_issued")
                    .with("serial", format!("{s:032x}"))
                    .with(
                        "spiffe_id",
                        format!("spiffe://example.org/ns/prod/sa/w{}", s % 1000),
                    )
                    .with("entry_id", "6d1f3f0e-8a55-4c1b-9d7e-5f2b1a7c9e01")
                    .with(
                        "agent",
                        "spiffe://example.org/meshid/agent/join_token/0123456789abcdef",
                    )
                    .with("not_after", 1_900_000_000)
            })
            .collect();
        log.record(events).await.unwrap();
        written += k;
        if written % 1000 < batch {
            sealer.seal("records").await;
        }
    }
    sealer.close().await;
    let write_s = start.elapsed().as_secs_f64();
    drop(log);

    let files = record::log_files(&log_path).unwrap();
    let bytes: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    let seals = store.list_audit_seals(&chain_id).await.unwrap();
    let start = Instant::now();
    let report = verify::verify(&files, false, &seals, &public_key).unwrap();
    let verify_s = start.elapsed().as_secs_f64();
    assert_eq!(report.records as usize, n);

    println!(
        "audit write   {:>10.0} records/s  ({n} records in batches of {batch}, one fsync per batch)",
        n as f64 / write_s
    );
    println!(
        "audit verify  {:>10.0} records/s  {:>7.1} MB/s  ({n} records, {} files, {:.1} MB, {} seals) in {:.3} s",
        n as f64 / verify_s,
        bytes as f64 / 1e6 / verify_s,
        files.len(),
        bytes as f64 / 1e6,
        report.seals_checked,
        verify_s
    );
}
