//! The admin API on a Unix socket: mode 0600, and only callers with the
//! server's own uid or root get past accept (SO_PEERCRED).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use meshid_proto::admin::admin_server::AdminServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::ReceiverStream;

use crate::admin_certs::publisher::CrlPublisher;
use crate::api::admin::AdminService;
use crate::state::ServerState;

/// Binds `sock` (replacing a stale one) and serves the admin services until
/// `stop` turns true.
pub(super) fn start(
    state: &Arc<ServerState>,
    crl: &Arc<CrlPublisher>,
    sock: &Path,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>> {
    if let Some(dir) = sock.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if sock.exists() {
        std::fs::remove_file(sock)
            .with_context(|| format!("removing stale socket {}", sock.display()))?;
    }
    let ul = UnixListener::bind(sock)
        .with_context(|| format!("binding admin socket {}", sock.display()))?;
    std::fs::set_permissions(sock, std::fs::Permissions::from_mode(0o600))?;
    let my_uid = nix::unistd::geteuid().as_raw();
    let (admin_tx, admin_rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            match ul.accept().await {
                Ok((s, _)) => {
                    let uid = s.peer_cred().map(|c| c.uid()).ok();
                    if uid == Some(my_uid) || uid == Some(0) {
                        // Any HTTP/2 :authority (gRPC clients disagree on Unix sockets).
                        let s = meshid_identity::h2_authority::AuthorityNormalizer::new(
                            s,
                            "admin_api",
                            None,
                        );
                        if admin_tx.send(Ok::<_, std::io::Error>(s)).await.is_err() {
                            break;
                        }
                    } else {
                        tracing::warn!(
                            ?uid,
                            "admin API connection refused: caller uid is neither the server's nor root"
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "admin socket accept failed"),
            }
        }
    });
    let admin_stop = {
        let mut rx = stop;
        async move {
            let _ = rx.changed().await;
        }
    };
    Ok(tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AdminServer::new(AdminService::new(state.clone())))
            .add_service(
                meshid_proto::admin::admin_safe_ops_server::AdminSafeOpsServer::new(
                    crate::api::admin_safe_ops::SafeOpsService::new(state.clone()),
                ),
            )
            .add_service(
                meshid_proto::admin::admin_x509_server::AdminX509Server::new(
                    crate::admin_certs::api::X509AdminService::new(state.clone(), crl.clone()),
                ),
            )
            .serve_with_incoming_shutdown(ReceiverStream::new(admin_rx), admin_stop),
    ))
}
