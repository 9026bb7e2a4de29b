//! `meshid agent run`: serve the Workload API and metrics until a signal.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use meshid_identity::h2_authority::RefusalHook;
use meshid_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use tokio::net::UnixListener;

use crate::agent::Agent;
use crate::attest::{Attestors, UnixAttestor, WorkloadAttestor};
use crate::config::AgentConfig;
use crate::k8s_attestor::K8sAttestor;
use crate::metrics::ReasonLabels;
use crate::workload_api::{CallerConn, WorkloadApi};

fn ready(agent: &Agent) -> Result<(), String> {
    let s = agent.snapshot.borrow().clone();
    let now = agent.clock.now();
    match s.agent_not_after {
        Some(t) if t > now => {}
        _ => return Err("agent SVID missing or expired".into()),
    }
    if s.bundle.is_none() {
        return Err("no trust bundle from the server yet".into());
    }
    Ok(())
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(cfg: AgentConfig, join_token: Option<String>) -> anyhow::Result<()> {
    let sock = cfg.socket_path.clone();
    let metrics_address = cfg.metrics_address;
    let agent = Agent::start(cfg, join_token).await?;

    if let Some(dir) = sock.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if sock.exists() {
        std::fs::remove_file(&sock)
            .with_context(|| format!("removing stale socket {}", sock.display()))?;
    }
    let listener = UnixListener::bind(&sock)
        .with_context(|| format!("binding Workload API socket {}", sock.display()))?;
    // Any local process may connect; attestation decides what it gets.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777))?;
    // Every read names its writer (inherited by accepted connections).
    crate::peer::pass_credentials(&listener).context("SO_PASSCRED on the Workload API socket")?;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let refused = agent.metrics.connections_refused.clone();
    let on_refused: RefusalHook = Arc::new(move |e| {
        refused
            .get_or_create(&ReasonLabels { reason: e.reason() })
            .inc();
    });
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((s, _)) => {
                    if tx
                        .send(Ok::<_, std::io::Error>(CallerConn::new(
                            s,
                            Some(on_refused.clone()),
                        )))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "Workload API accept failed"),
            }
        }
    });
    let mut attestors: Vec<Arc<dyn WorkloadAttestor>> = vec![Arc::new(UnixAttestor::default())];
    if let Some(k) = &agent.config.workload_attestor.k8s {
        let a = K8sAttestor::new(k, "/proc".into()).context("workload_attestor.k8s")?;
        tracing::info!(kubelet = %k.kubelet_url, "k8s workload attestor enabled");
        attestors.push(Arc::new(a));
    }
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let workload_api = Arc::new(WorkloadApi::with_attestor(
        agent.clone(),
        Arc::new(Attestors(attestors)),
    ));
    let api = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SpiffeWorkloadApiServer::from_arc(workload_api.clone()))
            // Envoy SDS on the same socket, same attestation.
            .add_service(crate::sds::server(workload_api))
            .add_service(reflection_v1()?)
            .add_service(reflection_v1alpha()?)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::ReceiverStream::new(rx),
                async move {
                    let _ = stop_rx.changed().await;
                },
            ),
    );

    if let Some(addr) = metrics_address {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding metrics on {addr}"))?;
        let app = axum::Router::new()
            .route(
                "/metrics",
                get(|State(a): State<Arc<Agent>>| async move { a.metrics.encode() }),
            )
            .route("/healthz", get(|| async { "ok\n" }))
            .route(
                "/readyz",
                get(|State(a): State<Arc<Agent>>| async move {
                    match ready(&a) {
                        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
                    }
                }),
            )
            .with_state(agent.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(l, app).await {
                tracing::error!(error = %e, "metrics server failed");
            }
        });
    }
    tracing::info!(socket = %sock.display(), "meshid agent ready; Workload API serving");
    meshid_identity::shutdown::signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), api).await;
    let _ = std::fs::remove_file(&sock);
    Ok(())
}

/// gRPC server reflection (Workload Endpoint §7 SHOULD), in the `v1` and
/// the older `v1alpha` protocol that many tools still speak. It describes
/// the Workload API only; it needs no `workload.spiffe.io` header and no
/// attestation, since it reveals nothing but the public schema.
fn reflection_v1() -> anyhow::Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(meshid_proto::WORKLOAD_FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the gRPC reflection service")
}

/// See [`reflection_v1`].
fn reflection_v1alpha() -> anyhow::Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(meshid_proto::WORKLOAD_FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("building the gRPC reflection service")
}
