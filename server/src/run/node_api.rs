//! The node API listener: its TLS (the server SVID, renewed at half-life
//! and at once when the signing CA changes; agents verified against the
//! bundle as last published), the accept loop with its limits, and the gRPC
//! service behind the store-health gate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use meshid_identity::verify::{Authorizer, SpiffeClientVerifier, TrustBundles};
use meshid_proto::node::node_server::NodeServer;
use meshid_proto::types::Bundle;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;

use super::StoreHealth;
use crate::api::node::NodeService;
use crate::api::tls::{ServerCertResolver, accept_loop};
use crate::config::ServerConfig;
use crate::state::ServerState;

/// Server SVID lifetime; renewed at half-life.
const SERVER_SVID_TTL: Duration = Duration::from_secs(3600);

/// A started node API.
pub(super) struct NodeApi {
    /// The address bound.
    pub addr: SocketAddr,
    /// The gRPC server; ends after `stop`.
    pub task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    /// Wakes the server SVID's renewal (the signing CA changed).
    pub renew: Arc<tokio::sync::Notify>,
}

/// Binds and serves the node API until `stop` turns true.
pub(super) async fn start(
    state: &Arc<ServerState>,
    bundle: &Bundle,
    store_health: Arc<StoreHealth>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<NodeApi> {
    let cfg = &state.config;
    let (ck, not_after, svid_ca) = server_certified_key(state).await?;
    let resolver = ServerCertResolver::new(ck);
    let tls = Arc::new(arc_swap::ArcSwap::new(node_tls_config(
        cfg,
        &bundle.x509_authorities,
        resolver.clone(),
    )?));
    {
        let (state, tls, resolver) = (state.clone(), tls.clone(), resolver.clone());
        let mut changes = state.changes.subscribe();
        let mut roots = bundle.x509_authorities.clone();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let Ok(b) = state.own_bundle().await else {
                    continue;
                };
                if b.x509_authorities == roots {
                    continue;
                }
                match node_tls_config(&state.config, &b.x509_authorities, resolver.clone()) {
                    Ok(c) => {
                        tls.store(c);
                        roots = b.x509_authorities;
                        tracing::info!(roots = roots.len(), "node API now trusts the new bundle");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot rebuild the node API TLS configuration")
                    }
                }
            }
        });
    }
    let listener = TcpListener::bind(cfg.bind_address)
        .await
        .with_context(|| format!("binding node API on {}", cfg.bind_address))?;
    let node_addr = listener.local_addr()?;
    let _ = state.node_address.set(node_addr.to_string());
    let incoming = ReceiverStream::new(accept_loop(
        listener,
        tls,
        state.metrics.clone(),
        &cfg.node_api,
    ));
    let node_stop = {
        let mut rx = stop;
        async move {
            let _ = rx.changed().await;
        }
    };
    let psat = match &cfg.node_attestor.k8s_psat {
        Some(c) => {
            let a = crate::attest::k8s_psat::PsatAttestor::new(c, &state.td_id())
                .context("node_attestor.k8s_psat")?;
            tracing::info!(cluster = %c.cluster, "Kubernetes PSAT node attestation enabled");
            Some(Arc::new(a))
        }
        None => None,
    };
    // While the store is unreachable, new calls are refused (Unavailable:
    // an agent tries another server); open sync streams stay.
    let gate = {
        let health = store_health.clone();
        move |req: tonic::Request<()>| match health.load().as_deref() {
            None => Ok(req),
            Some(why) => Err(tonic::Status::unavailable(format!(
                "this server cannot reach its store; try another server ({why})"
            ))),
        }
    };
    let node_server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .max_concurrent_streams(Some(cfg.node_api.max_concurrent_streams))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            NodeServer::new(NodeService::new(state.clone(), psat))
                .max_decoding_message_size(cfg.node_api.max_message_size),
            gate,
        ))
        .serve_with_incoming_shutdown(incoming, node_stop);
    let node_task = tokio::spawn(node_server);

    // Server SVID renewal at half-life, and at once when the signing CA
    // changed or the one that signed it is tainted.
    let renew = Arc::new(tokio::sync::Notify::new());
    {
        let state = state.clone();
        let resolver = resolver.clone();
        let renew = renew.clone();
        let mut not_after = not_after;
        let mut svid_ca = svid_ca;
        tokio::spawn(async move {
            loop {
                let left = not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                let stale =
                    svid_ca != state.ca.signer().id() || state.tainted.load().contains(&svid_ca);
                if !stale {
                    tokio::select! {
                        () = tokio::time::sleep((left / 2).max(Duration::from_secs(1))) => {},
                        () = renew.notified() => {
                            let stale = svid_ca != state.ca.signer().id()
                                || state.tainted.load().contains(&svid_ca);
                            if !stale { continue; }
                        },
                    }
                }
                match server_certified_key(&state).await {
                    Ok((ck, na, ca)) => {
                        resolver.set(ck);
                        not_after = na;
                        svid_ca = ca;
                        tracing::info!(ca = %svid_ca, "server SVID renewed");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "server SVID renewal failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
    }
    Ok(NodeApi {
        addr: node_addr,
        task: node_task,
        renew,
    })
}

/// Issues the server's own SVID and returns it as a rustls key.
async fn server_certified_key(
    st: &ServerState,
) -> anyhow::Result<(CertifiedKey, SystemTime, String)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
    let svid = crate::issuance::sign_identity(
        st,
        csr.der(),
        &st.server_id(),
        SERVER_SVID_TTL,
        "server",
        SystemTime::now(),
    )
    .await?;
    let provider = meshid_identity::crypto::provider();
    let signing = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            key.serialize_der(),
        )))?;
    let chain = svid
        .chain
        .iter()
        .map(|d| CertificateDer::from(d.clone()))
        .collect();
    let ca_id = svid
        .chain
        .first()
        .and_then(|l| meshid_identity::svid::authority_key_id(l))
        .unwrap_or_default();
    Ok((CertifiedKey::new(chain, signing), svid.not_after, ca_id))
}

/// The node API's TLS configuration: the server SVID from `resolver`, and
/// agents' client certificates verified against `roots` (the own bundle as
/// last published, so the verifier follows every CA rotation).
fn node_tls_config(
    cfg: &ServerConfig,
    roots: &[Vec<u8>],
    resolver: Arc<ServerCertResolver>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let td = cfg.trust_domain.as_str();
    let provider = meshid_identity::crypto::provider_for(cfg.tls_key_exchange);
    let mut bundles = TrustBundles::new();
    let ders: Vec<CertificateDer<'static>> = roots
        .iter()
        .map(|d| CertificateDer::from(d.clone()))
        .collect();
    bundles.add(td, &ders);
    let verifier = SpiffeClientVerifier::new(bundles, Authorizer::Any, &provider, false);
    let mut tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(meshid_identity::crypto::versions(false))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    tls.alpn_protocols = vec![b"h2".to_vec()];
    // No resumption: every connection presents the agent's current SVID.
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    Ok(Arc::new(tls))
}
