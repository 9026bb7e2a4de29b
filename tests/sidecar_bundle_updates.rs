//! Bundle updates through the sidecar's production path: the `spiffe`
//! crate's `X509Source` reading a Workload API on a Unix socket (an
//! in-process server, because a meshid server cannot yet be made to publish
//! a bundle that orphans live SVIDs) feeding `Identity` and a running
//! inbound listener.
//!
//! A bundle that would stop verifying the sidecar's own SVID is refused and
//! the last good one kept (peers under it are still admitted); during a CA
//! rotation a bundle with both roots is taken, and a new SVID arriving with a
//! new bundle in one update is taken.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use meshid_proto::workload::X509svid;
use meshid_sidecar::config::Config;
use meshid_sidecar::identity::{Identity, run_workload_api};
use meshid_sidecar::metrics::Metrics;
use meshid_sidecar::{CancellationToken, Sidecar, tls_settings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

mod sidecar_support;
use sidecar_support::{Ca, TD, response, serve, tls_connect};

const ME: &str = "spiffe://example.org/web";
const PEER: &str = "spiffe://example.org/client";

fn msg(svid: &sidecar_support::Svid, roots: &[&Ca]) -> X509svid {
    X509svid {
        spiffe_id: ME.into(),
        x509_svid: svid.chain.iter().flat_map(|c| c.to_vec()).collect(),
        x509_svid_key: svid.key.secret_der().to_vec(),
        bundle: roots.iter().flat_map(|c| c.der.to_vec()).collect(),
        hint: String::new(),
    }
}

async fn echo() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Whether a peer with an SVID from `ca` gets through the inbound listener.
async fn admitted(ca: &Ca, server_ca: &Ca, addr: std::net::SocketAddr) -> bool {
    let mut server_roots = server_ca.bundles();
    server_roots.add(TD, std::slice::from_ref(&ca.der));
    let provider = meshid_identity::crypto::provider();
    let verifier = meshid_identity::verify::SpiffeServerVerifier::new(
        server_roots,
        meshid_identity::Authorizer::Exact(ME.parse().unwrap()),
        &provider,
    );
    let svid = ca.svid(PEER, 77);
    let cfg = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(meshid_identity::crypto::versions(false))
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(svid.chain, svid.key)
            .unwrap(),
    );
    async {
        let mut tls = tls_connect(cfg, addr).await?;
        tls.write_all(b"ping").await?;
        let mut b = [0u8; 4];
        tls.read_exact(&mut b).await?;
        Ok::<_, std::io::Error>(b == *b"ping")
    }
    .await
    .unwrap_or(false)
}

#[tokio::test]
async fn bundle_that_orphans_our_svid_is_refused_and_rotation_is_taken() {
    let old = Ca::new("old root");
    let new = Ca::new("new root");
    let first = old.svid(ME, 1);

    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let (tx, rx) = watch::channel(response(vec![msg(&first, &[&old])]));
    let agent_stop = CancellationToken::new();
    let _agent = serve(&sock, rx, agent_stop.clone());

    let app = echo().await;
    let v = Config::parse(&format!(
        "[[inbound]]\nlisten = \"127.0.0.1:0\"\nforward_to = \"{app}\"\nallow = [\"{PEER}\"]\n"
    ))
    .unwrap()
    .validate(None)
    .unwrap();
    let metrics = Arc::new(Metrics::new());
    let identity = Identity::new(tls_settings(&v), metrics.clone());
    let shutdown = CancellationToken::new();
    let sidecar = Sidecar::bind(&v, identity.clone(), metrics.clone(), shutdown.clone())
        .await
        .unwrap();
    let inbound = sidecar.inbound_addrs()[0];
    tokio::spawn(sidecar.run());
    tokio::spawn(run_workload_api(
        identity.clone(),
        format!("unix://{}", sock.display()),
        None,
        shutdown.clone(),
    ));
    tokio::time::timeout(Duration::from_secs(20), identity.ready())
        .await
        .unwrap();
    assert_eq!(identity.current().unwrap().generation, 1);
    assert!(admitted(&old, &old, inbound).await);

    // The same SVID with a bundle that lacks its root: refused, counted, the
    // last good bundle stays, peers under the old root still get in.
    tx.send(response(vec![msg(&first, &[&new])])).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while metrics.bundle_updates_refused.get() == 0 {
        assert!(std::time::Instant::now() < deadline, "refusal not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let snap = identity.current().unwrap();
    assert_eq!(snap.generation, 1, "no new snapshot");
    assert_eq!(snap.bundles, old.bundles());
    assert!(admitted(&old, &old, inbound).await);
    assert!(!admitted(&new, &old, inbound).await);

    // Rotation, first step: both roots, SVID still under the old one.
    let mut gen_rx = identity.subscribe();
    tx.send(response(vec![msg(&first, &[&old, &new])])).unwrap();
    tokio::time::timeout(Duration::from_secs(20), gen_rx.wait_for(|g| *g >= 2))
        .await
        .unwrap()
        .unwrap();
    assert!(admitted(&old, &old, inbound).await);
    assert!(admitted(&new, &old, inbound).await);

    // Second step: a new SVID under the new root with the new root alone,
    // in one update.
    tx.send(response(vec![msg(&new.svid(ME, 2), &[&new])]))
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), gen_rx.wait_for(|g| *g >= 3))
        .await
        .unwrap()
        .unwrap();
    let snap = identity.current().unwrap();
    assert_eq!(snap.svid.serial, "02");
    assert_eq!(snap.bundles, new.bundles());
    assert!(admitted(&new, &new, inbound).await);
    assert!(!admitted(&old, &new, inbound).await, "old root gone");
    assert_eq!(metrics.bundle_updates_refused.get(), 1);
    assert_eq!(metrics.svid_updates_refused.get(), 0);

    // An SVID under a root in neither bundle: refused whole.
    let stranger = Ca::new("stranger");
    tx.send(response(vec![msg(&stranger.svid(ME, 3), &[&new])]))
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while metrics.svid_updates_refused.get() == 0 {
        assert!(std::time::Instant::now() < deadline, "refusal not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(identity.current().unwrap().svid.serial, "02");
    shutdown.cancel();
    agent_stop.cancel();
}
