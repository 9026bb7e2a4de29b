//! Attacks on the sidecar, each reproduced through real processes (server,
//! agent, `meshid sidecar run`) and now refused:
//!
//! - a TLS session ticket issued by one inbound listener, replayed on another
//!   listener whose allow list does not admit the peer;
//! - a resumed session of a peer whose SVID expired after the ticket was
//!   issued;
//! - HTTP mode: identity-header look-alikes (`X_Spiffe_Id`), headers named in
//!   `Connection`, and identity trailers reaching the application;
//! - idle TCP connections to an inbound listener starving outbound traffic
//!   and `/readyz`.

mod common;
mod sidecar_proc;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::wait_for;
use sidecar_proc::{Mesh, echo_app, echo_line, exchange, free_addr, id, recording_app, resumed};

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: app\r\n\r\n";

/// Finding 1: listener A admits `/validator`, listener B only `/payments`.
/// A full handshake to B with the validator's SVID is refused; before the
/// fix, resuming A's session ticket on B was accepted and B's application
/// saw the validator's ID. Now B cannot decrypt A's ticket (ticket keys are
/// per listener), falls back to a full handshake and refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticket_from_one_listener_does_not_open_another() {
    let mesh = Mesh::start(&["gate"], &[("validator", "1h")]);
    let (app_a, seen_a) = recording_app();
    let (app_b, seen_b) = recording_app();
    let (a, b) = (free_addr(), free_addr());
    let gate = mesh.sidecar(
        "gate",
        &format!(
            "[[inbound]]\nlisten = \"{a}\"\nforward_to = \"{app_a}\"\nmode = \"http\"\nallow = [\"{}\"]\n\
             [[inbound]]\nlisten = \"{b}\"\nforward_to = \"{app_b}\"\nmode = \"http\"\nallow = [\"{}\"]\n",
            id("validator"),
            id("payments"),
        ),
    );
    let svid = mesh.svid("validator", Duration::from_secs(60)).await;
    let cfg = Arc::new(svid.client_config(mesh.bundles(), &id("gate")));

    // A: a full handshake, then a resumed one (the tickets are real).
    for want_resumed in [false, true] {
        let mut tls = sidecar_proc::tls_connect(cfg.clone(), a).await.expect("A");
        assert_eq!(resumed(&tls), want_resumed);
        let resp = exchange(&mut tls, GET).await.expect("A answers");
        assert!(
            resp.ends_with(&format!("caller={}", id("validator"))),
            "{resp}"
        );
    }
    assert_eq!(seen_a.lock().expect("lock").len(), 2);
    assert!(gate.inbound("resumed") >= 1);

    // B with the same client (its cache offers A's ticket): refused.
    let denied_before = gate.inbound("denied");
    let outcome = match sidecar_proc::tls_connect(cfg.clone(), b).await {
        Ok(mut tls) => {
            let was_resumed = resumed(&tls);
            exchange(&mut tls, GET)
                .await
                .map(|r| format!("resumed={was_resumed}: {r}"))
        }
        Err(e) => Err(e.to_string()),
    };
    assert!(
        outcome.is_err(),
        "listener B admitted the validator: {outcome:?}"
    );
    assert!(
        seen_b.lock().expect("lock").is_empty(),
        "B's application must not be reached"
    );
    wait_for("B counts the refusal", Duration::from_secs(10), || {
        (gate.inbound("denied") > denied_before).then_some(())
    });
    // A still resumes: the refusal on B changed nothing for A.
    let mut tls = sidecar_proc::tls_connect(cfg, a).await.expect("A again");
    exchange(&mut tls, GET).await.expect("A answers again");
}

/// Finding 1 (related): a peer resumes a session after its SVID expired.
/// Before the fix the resumed session was forwarded with the expired peer's
/// ID; now every resumed session is re-verified (chain, validity window,
/// policy) before anything is forwarded, and refused with `expired`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_session_of_expired_peer_is_refused() {
    let mesh = Mesh::start(&["gate"], &[("validator", "6s")]);
    let (app, seen) = recording_app();
    let a = free_addr();
    let gate = mesh.sidecar(
        "gate",
        &format!(
            "[[inbound]]\nlisten = \"{a}\"\nforward_to = \"{app}\"\nmode = \"http\"\nallow = [\"{}\"]\n",
            id("validator"),
        ),
    );
    let svid = mesh.svid("validator", Duration::from_secs(4)).await;
    let cfg = Arc::new(svid.client_config(mesh.bundles(), &id("gate")));
    let mut tls = sidecar_proc::tls_connect(cfg.clone(), a)
        .await
        .expect("full handshake");
    exchange(&mut tls, GET).await.expect("answer");
    drop(tls);
    assert_eq!(seen.lock().expect("lock").len(), 1);

    // The validity window itself is the condition waited for.
    while SystemTime::now() < svid.info.not_after + Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expired_before = gate.inbound("expired");
    let outcome = match sidecar_proc::tls_connect(cfg, a).await {
        Ok(mut tls) => {
            let was_resumed = resumed(&tls);
            exchange(&mut tls, GET)
                .await
                .map(|r| format!("resumed={was_resumed}: {r}"))
        }
        Err(e) => Err(e.to_string()),
    };
    assert!(outcome.is_err(), "expired peer admitted: {outcome:?}");
    assert_eq!(
        seen.lock().expect("lock").len(),
        1,
        "nothing forwarded for the expired peer"
    );
    wait_for("refusal counted", Duration::from_secs(10), || {
        (gate.inbound("expired") > expired_before).then_some(())
    });
    gate.wait_log(&["resumed session refused", "certificate expired"]);
}

/// Finding 10: HTTP mode removes every look-alike of the identity header
/// (name lower-cased, `_` read as `-`), every header named in `Connection`
/// and the standard hop-by-hop headers, and never forwards an identity
/// trailer; the application sees exactly one `x-spiffe-id`, the proven one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_mode_strips_identity_lookalikes_and_hop_by_hop_headers() {
    let mesh = Mesh::start(&["gate"], &[("frontend", "1h")]);
    let (app, seen) = recording_app();
    let a = free_addr();
    let _gate = mesh.sidecar(
        "gate",
        &format!(
            "[[inbound]]\nlisten = \"{a}\"\nforward_to = \"{app}\"\nmode = \"http\"\nallow = [\"{}\"]\n",
            id("frontend"),
        ),
    );
    let svid = mesh.svid("frontend", Duration::from_secs(60)).await;
    let cfg = Arc::new(svid.client_config(mesh.bundles(), &id("gate")));
    let mut tls = sidecar_proc::tls_connect(cfg, a).await.expect("connect");
    let forged = "spiffe://example.org/admin";
    let requests = [
        format!(
            "GET /one HTTP/1.1\r\nHost: app\r\nX_Spiffe_Id: {forged}\r\nx-spiffe_id: {forged}\r\n\
             X-SPIFFE-ID: {forged}\r\nX-Request-Id: 7\r\n\r\n"
        ),
        format!(
            "GET /two HTTP/1.1\r\nHost: app\r\nConnection: keep-alive, X-Admin, x-spiffe-id\r\n\
             X-Admin: yes\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n\
             Upgrade: websocket\r\nx-spiffe-id: {forged}\r\n\r\n"
        ),
        format!(
            "POST /three HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\
             Trailer: X_Spiffe_Id, x-spiffe-id, X-Checksum\r\n\r\n\
             5\r\nhello\r\n0\r\nx_spiffe_id: {forged}\r\nx-spiffe-id: {forged}\r\nX-Checksum: abc\r\n\r\n"
        ),
    ];
    for r in &requests {
        let resp = exchange(&mut tls, r.as_bytes()).await.expect("answer");
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert!(
            resp.ends_with(&format!("caller={}", id("frontend"))),
            "{resp}"
        );
    }
    let seen = seen.lock().expect("lock").clone();
    eprintln!("the application received: {seen:#?}");
    assert_eq!(seen.len(), 3);
    for (i, s) in seen.iter().enumerate() {
        let lookalikes: Vec<_> = s
            .headers
            .iter()
            .chain(&s.trailers)
            .filter(|(k, _)| k.replace('_', "-") == "x-spiffe-id")
            .collect();
        assert_eq!(
            lookalikes,
            vec![&("x-spiffe-id".to_string(), id("frontend"))],
            "request {i}: {s:?}"
        );
    }
    assert_eq!(seen[0].header("x-request-id"), ["7"], "end-to-end kept");
    for h in [
        "x-admin",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
        "connection",
    ] {
        assert!(
            seen[1].header(h).is_empty(),
            "{h} reached the app: {:?}",
            seen[1]
        );
    }
    assert_eq!(seen[2].body, b"hello");
    assert_eq!(
        seen[2].trailers,
        vec![("x-checksum".to_string(), "abc".to_string())],
        "only the non-identity trailer is forwarded"
    );
}

/// Finding 9: idle TCP connections to an inbound listener fill only the
/// bounded pool of connections still handshaking (each refused beyond it is
/// counted); outbound traffic and `/readyz` are not affected, and once the
/// idle connections are gone the listener serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_inbound_connections_do_not_starve_outbound_or_readyz() {
    let mesh = Mesh::start(&["gate", "peer"], &[("frontend", "1h")]);
    let echo = echo_app();
    let (peer_in, gate_in, gate_out) = (free_addr(), free_addr(), free_addr());
    let _peer = mesh.sidecar(
        "peer",
        &format!(
            "[[inbound]]\nlisten = \"{peer_in}\"\nforward_to = \"{echo}\"\nallow = [\"{}\"]\n",
            id("gate")
        ),
    );
    let gate = mesh.sidecar(
        "gate",
        &format!(
            "handshake_timeout = \"60s\"\nmax_pending_handshakes = 4\nmax_inbound_connections = 16\n\
             [[inbound]]\nlisten = \"{gate_in}\"\nforward_to = \"{echo}\"\nallow = [\"{}\"]\n\
             [[outbound]]\nlisten = \"{gate_out}\"\nupstream = \"{peer_in}\"\nserver_id = \"{}\"\n",
            id("frontend"),
            id("peer"),
        ),
    );
    // Forty idle connections: never a TLS byte.
    let idle: Vec<std::net::TcpStream> = (0..40)
        .map(|_| std::net::TcpStream::connect(gate_in).expect("idle connect"))
        .collect();
    let refused = "meshid_sidecar_connections_refused_total{direction=\"inbound\",reason=\"pending_handshakes\"}";
    wait_for("refusals counted", Duration::from_secs(20), || {
        (gate.metric(refused) >= 36).then_some(())
    });
    gate.wait_log(&["inbound connection refused", "pending_handshakes"]);

    // Outbound and readiness are unaffected (success, not timing).
    assert_eq!(
        echo_line(gate_out, "through the gate"),
        Ok("through the gate".into())
    );
    let (code, body) = gate.get("/readyz");
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        gate.metric("meshid_sidecar_pending_handshakes{direction=\"inbound\"}"),
        4
    );

    // The idle connections go; a good inbound client is served again.
    drop(idle);
    let svid = mesh.svid("frontend", Duration::from_secs(60)).await;
    let cfg = Arc::new(svid.client_config(mesh.bundles(), &id("gate")));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut tls = sidecar_proc::tls_connect(cfg.clone(), gate_in).await?;
            tls.write_all(b"after the flood\n").await?;
            let mut back = [0u8; 16];
            tls.read_exact(&mut back).await?;
            Ok::<_, std::io::Error>(back)
        }
        .await;
        match attempt {
            Ok(r) if &r == b"after the flood\n" => break,
            other => assert!(
                std::time::Instant::now() < deadline,
                "inbound not serving after the idle connections closed: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
