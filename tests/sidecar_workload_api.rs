//! The sidecar's production identity path: `run_workload_api` against an
//! in-process fake SPIFFE Workload API on a Unix socket (the real agent is
//! tested end to end elsewhere). Checks the first SVID, a rotation, SVID
//! selection by SPIFFE ID, and that the last SVID survives the agent going
//! away.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use meshid_sidecar::CancellationToken;
use meshid_sidecar::identity::{Identity, TlsSettings, run_workload_api};
use meshid_sidecar::metrics::Metrics;
use tokio::sync::watch;

mod sidecar_support;
use sidecar_support::{Ca, response, serve, svid_msg};

fn identity() -> (Arc<Identity>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let settings = TlsSettings {
        allow_tls12: false,
        key_exchange: meshid_identity::crypto::KeyExchange::default(),
    };
    let identity = Identity::new(settings, metrics.clone());
    identity
        .inbound_listener(meshid_identity::Authorizer::Any, vec![])
        .unwrap();
    (identity, metrics)
}

#[tokio::test]
async fn first_svid_then_rotation_from_workload_api() {
    let ca = Ca::new("ca");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let (tx, rx) = watch::channel(response(vec![svid_msg(&ca, "spiffe://example.org/web", 1)]));
    let agent_stop = CancellationToken::new();
    let agent = serve(&sock, rx, agent_stop.clone());

    let (identity, metrics) = identity();
    assert!(
        identity.current().is_none(),
        "not ready before the first SVID"
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(run_workload_api(
        identity.clone(),
        format!("unix://{}", sock.display()),
        None,
        stop.clone(),
    ));
    tokio::time::timeout(Duration::from_secs(20), identity.ready())
        .await
        .unwrap();
    let first = identity.current().unwrap();
    assert_eq!(first.svid.spiffe_id.to_string(), "spiffe://example.org/web");
    assert_eq!(first.svid.serial, "01");

    // Rotation: the agent pushes a new SVID on the open stream.
    let mut gen_rx = identity.subscribe();
    tx.send(response(vec![svid_msg(&ca, "spiffe://example.org/web", 2)]))
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), gen_rx.wait_for(|g| *g >= 2))
        .await
        .unwrap()
        .unwrap();
    let second = identity.current().unwrap();
    assert_eq!(second.svid.serial, "02");
    assert!(!Arc::ptr_eq(&first, &second));
    assert_eq!(metrics.rotations.get(), 2);

    // The agent goes away (its streams end, then it stops): the last SVID
    // stays in place.
    drop(tx);
    agent_stop.cancel();
    tokio::time::timeout(Duration::from_secs(20), agent)
        .await
        .unwrap()
        .unwrap();
    let _ = std::fs::remove_file(&sock);
    tokio::task::yield_now().await;
    assert_eq!(identity.current().unwrap().svid.serial, "02");

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn picks_the_configured_spiffe_id() {
    let ca = Ca::new("ca");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let (_tx, rx) = watch::channel(response(vec![
        svid_msg(&ca, "spiffe://example.org/first", 1),
        svid_msg(&ca, "spiffe://example.org/second", 2),
    ]));
    let agent_stop = CancellationToken::new();
    let _agent = serve(&sock, rx, agent_stop.clone());

    let (identity, _) = identity();
    let stop = CancellationToken::new();
    let want = meshid_identity::SpiffeId::new("spiffe://example.org/second").unwrap();
    tokio::spawn(run_workload_api(
        identity.clone(),
        format!("unix://{}", sock.display()),
        Some(want),
        stop.clone(),
    ));
    tokio::time::timeout(Duration::from_secs(20), identity.ready())
        .await
        .unwrap();
    let snap = identity.current().unwrap();
    assert_eq!(
        snap.svid.spiffe_id.to_string(),
        "spiffe://example.org/second"
    );
    stop.cancel();
    agent_stop.cancel();
}
