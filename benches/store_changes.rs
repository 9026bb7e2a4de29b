//! How fast a change committed through one store reaches another store's
//! `subscribe_changes()`: two `PostgresStore`s (two pools and listeners, as
//! two servers would have) on one throwaway PostgreSQL, with SQLite's
//! in-process publication beside it as the baseline. Sequential entry
//! updates, then the same with concurrent writers.
//!
//! `cargo bench --bench store_changes` (env: CHANGES, WRITERS). Needs
//! PostgreSQL's binaries (`apt-get install postgresql`).

#[path = "../tests/common/mod.rs"]
mod common;

use common::bench::{env, pct};

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshid_proto::types::{Entry, Selector};
use meshid_server::store::{PostgresOptions, PostgresStore, SqliteStore, Store};

fn entry(id: &str) -> Entry {
    Entry {
        id: id.into(),
        spiffe_id: format!("spiffe://example.org/{id}"),
        parent_id: "spiffe://example.org/agent".into(),
        selectors: vec![Selector {
            r#type: "unix".into(),
            value: format!("uid:{id}"),
        }],
        revision: 1,
        created_at: 1,
        ..Entry::default()
    }
}

/// `writers` tasks each update their own entry `changes / writers` times
/// through `a`; returns, per change, the time from the start of the update
/// until `b`'s subscription shows a revision at least as high.
async fn run(
    a: Arc<dyn Store>,
    b: Arc<dyn Store>,
    changes: usize,
    writers: usize,
) -> Vec<Duration> {
    let rx = b.subscribe_changes();
    let per = changes / writers;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (a, mut rx) = (a.clone(), rx.clone());
        tasks.push(tokio::spawn(async move {
            let id = format!("w{w}-of-{writers}");
            let mut e = entry(&id);
            a.create_entry(&e).await.expect("create");
            let mut lat = Vec::with_capacity(per);
            for _ in 0..per {
                let t0 = Instant::now();
                let expected = e.revision;
                e.revision += 1;
                a.update_entry(&e, expected).await.expect("update");
                let mine = *a.subscribe_changes().borrow();
                rx.wait_for(|v| *v >= mine).await.expect("open");
                lat.push(t0.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    all.sort();
    all
}

fn print(label: &str, lat: &[Duration], wall: Duration) {
    println!(
        "{label:<44} n={:<5} p50 {:>9.3?}  p99 {:>9.3?}  max {:>9.3?}  ({:.0} changes/s)",
        lat.len(),
        pct(lat, 0.5),
        pct(lat, 0.99),
        lat.last().copied().unwrap_or_default(),
        lat.len() as f64 / wall.as_secs_f64()
    );
}

#[tokio::main]
async fn main() {
    let changes = env("CHANGES", 500);
    let writers = env("WRITERS", 8);
    println!("update committed through A -> visible in B's subscribe_changes()");

    let dir = tempfile::tempdir().expect("tmp");
    let s: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&dir.path().join("b.db"))
            .await
            .expect("sqlite"),
    );
    for w in [1, writers] {
        let t0 = Instant::now();
        let lat = run(s.clone(), s.clone(), changes, w).await;
        print(
            &format!("sqlite, one store (in process), {w} writer(s)"),
            &lat,
            t0.elapsed(),
        );
    }

    let Some(url) = common::postgres::database("bench") else {
        eprintln!("PostgreSQL not available; only the SQLite baseline ran");
        return;
    };
    let open = || async {
        Arc::new(
            PostgresStore::connect(&PostgresOptions::new(url.clone()))
                .await
                .expect("postgres"),
        ) as Arc<dyn Store>
    };
    let (a, b) = (open().await, open().await);
    // Warm up: B's listener is up once it has seen a change made through A.
    let mut rx = b.subscribe_changes();
    a.create_entry(&entry("warm-up")).await.expect("warm-up");
    let target = *a.subscribe_changes().borrow();
    rx.wait_for(|v| *v >= target).await.expect("open");
    for w in [1, writers] {
        let t0 = Instant::now();
        let lat = run(a.clone(), b.clone(), changes, w).await;
        print(
            &format!("postgres, store A -> store B, {w} writer(s)"),
            &lat,
            t0.elapsed(),
        );
    }
}
