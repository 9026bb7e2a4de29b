//! How the long-running processes (server, agent, sidecar) learn to stop.

/// Resolves on SIGINT (Ctrl-C) or SIGTERM; on SIGINT alone where SIGTERM
/// cannot be watched.
pub async fn signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
