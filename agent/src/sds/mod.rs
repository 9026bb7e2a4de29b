//! Envoy's Secret Discovery Service (SDS v3) on the Workload API socket.
//!
//! Envoy fetches its certificates and trust bundles from the agent with
//! `envoy.service.secret.v3.SecretDiscoveryService`, state of the world:
//! `StreamSecrets` answers each new set of resource names and pushes again
//! whenever the answer changes (SVID rotation, entry change, bundle change);
//! `FetchSecrets` answers once. `DeltaSecrets` is not served.
//!
//! Callers are attested as on the Workload API, from the kernel's peer
//! credentials of the connection; Envoy sends no security header and none
//! is required. Resource names: see [`resources`].
//!
//! Versions and nonces: every response on a stream has a new version (a
//! counter) and a random nonce. A request carrying a nonce other than the
//! last one sent is stale and ignored. A request with `error_detail` is a
//! NACK: logged and counted (`meshid_agent_sds_nacks_total`), and answered
//! with nothing, so a secret Envoy refuses is not sent again in a loop; the
//! next change or new set of names is sent as usual.

pub mod resources;

use std::collections::BTreeSet;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::pb::google::protobuf::Any;
use meshid_proto::types::Selector;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::cache::Snapshot;
use crate::workload_api::{Peer, WorkloadApi};
use resources::{CallerView, Resolved, secret_type_url};

/// The SDS service; it shares attestation and the snapshot subscription
/// with the Workload API it is served next to.
pub struct Sds {
    api: Arc<WorkloadApi>,
}

impl std::fmt::Debug for Sds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sds")
    }
}

/// The SDS service for the agent's socket, over the same Workload API
/// service (attestation, entries, snapshots).
pub fn server(api: Arc<WorkloadApi>) -> SecretDiscoveryServiceServer<Sds> {
    SecretDiscoveryServiceServer::new(Sds { api })
}

/// At most this many resource names in one request.
pub const MAX_RESOURCE_NAMES: usize = 256;
/// At most this many bytes in one resource name.
pub const MAX_RESOURCE_NAME_BYTES: usize = 2048;

fn check_request(r: &DiscoveryRequest) -> Result<(), Status> {
    if !r.type_url.is_empty() && r.type_url != secret_type_url() {
        return Err(Status::invalid_argument(format!(
            "this service serves {}, not {}",
            secret_type_url(),
            r.type_url.chars().take(256).collect::<String>()
        )));
    }
    if r.resource_names.len() > MAX_RESOURCE_NAMES {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_RESOURCE_NAMES} resource names per request"
        )));
    }
    if r.resource_names
        .iter()
        .any(|n| n.len() > MAX_RESOURCE_NAME_BYTES)
    {
        return Err(Status::invalid_argument(format!(
            "a resource name is longer than {MAX_RESOURCE_NAME_BYTES} bytes"
        )));
    }
    Ok(())
}

/// The secrets `names` resolve to for a caller with `selectors`.
fn resolve(
    api: &WorkloadApi,
    snap: &Snapshot,
    selectors: &[Selector],
    names: &[String],
) -> Resolved {
    let entries = api.entitled(snap, selectors);
    let svids = entries
        .iter()
        .map(|e| {
            snap.svids
                .get(&e.id)
                .filter(|s| s.entry_revision == e.revision && s.spiffe_id == e.spiffe_id)
                .map(|s| &**s)
        })
        .collect();
    let view = CallerView {
        svids,
        own: snap.bundle.as_ref(),
        bundles: WorkloadApi::bundles_for(snap, &entries),
    };
    view.resolve(names)
}

fn nonce() -> String {
    hex::encode(rand::random::<[u8; 8]>())
}

fn short(s: &str) -> String {
    s.chars().take(512).collect()
}

/// One `StreamSecrets` stream's state of the world.
struct StreamState {
    /// The names of the last accepted request; `None` before the first.
    names: Option<Vec<String>>,
    /// The version of the last response sent (0: none yet).
    version: u64,
    /// The nonce of the last response sent.
    nonce: String,
    /// The resources of the last response sent.
    sent: Option<Vec<Any>>,
    /// Unknown names already logged, so a push does not log them again.
    logged_unknown: BTreeSet<String>,
}

impl StreamState {
    /// Takes a request; true if it asks for a (new) answer.
    fn on_request(&mut self, r: &DiscoveryRequest, api: &WorkloadApi, pid: Option<i32>) -> bool {
        if let Some(e) = &r.error_detail {
            api.agent().metrics.sds_nacks.inc();
            tracing::warn!(
                pid = ?pid,
                version = %short(&r.version_info),
                nonce = %short(&r.response_nonce),
                names = ?r.resource_names.iter().map(|n| short(n)).collect::<Vec<_>>(),
                code = e.code,
                error = %short(&e.message),
                "Envoy refused the secrets sent (SDS NACK); not sending them again"
            );
        }
        if !self.nonce.is_empty() && r.response_nonce != self.nonce {
            tracing::debug!(pid = ?pid, nonce = %short(&r.response_nonce), expected = %self.nonce, "stale SDS request ignored");
            return false;
        }
        let mut names = r.resource_names.clone();
        names.sort();
        names.dedup();
        if self.names.as_ref() == Some(&names) {
            // ACK, or NACK of the current names: nothing new to send.
            return false;
        }
        self.names = Some(names);
        true
    }

    /// The response to send now, if any: on `force` (new names) or when
    /// the resources differ from the last ones sent; never an empty one for
    /// named resources (Envoy would take it as a missing secret).
    fn response(
        &mut self,
        resolved: Resolved,
        force: bool,
        pid: Option<i32>,
    ) -> Option<DiscoveryResponse> {
        for n in &resolved.unknown {
            if self.logged_unknown.len() < 64 && self.logged_unknown.insert(n.clone()) {
                tracing::info!(pid = ?pid, name = %short(n), "SDS resource name unknown to this caller; left out");
            }
        }
        let names = self.names.as_ref()?;
        if resolved.resources.is_empty() && !names.is_empty() {
            return None;
        }
        if !force && self.sent.as_ref() == Some(&resolved.resources) {
            return None;
        }
        self.version += 1;
        self.nonce = nonce();
        self.sent = Some(resolved.resources.clone());
        Some(DiscoveryResponse {
            version_info: self.version.to_string(),
            resources: resolved.resources,
            type_url: secret_type_url(),
            nonce: self.nonce.clone(),
            ..Default::default()
        })
    }
}

impl Sds {
    async fn attest<T>(&self, req: &Request<T>) -> Result<(Vec<Selector>, Peer), Status> {
        self.api
            .attest_peer(req.extensions().get::<Option<Peer>>().cloned().flatten())
            .await
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type DeltaSecretsStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_secrets(
        &self,
        _req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        let r = Err(Status::unimplemented(
            "incremental SDS is not served; use StreamSecrets (state of the world)",
        ));
        self.api.count("DeltaSecrets", &r);
        r.map(|()| Response::new(ReceiverStream::new(tokio::sync::mpsc::channel(1).1)))
    }

    type StreamSecretsStream = ReceiverStream<Result<DiscoveryResponse, Status>>;

    async fn stream_secrets(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let r = self.attest(&req).await;
        self.api.count(
            "StreamSecrets",
            &r.as_ref().map(|_| ()).map_err(Clone::clone),
        );
        let (selectors, peer) = r?;
        let mut inbound = req.into_inner();
        let api = self.api.clone();
        let mut snapshots = api.agent().snapshot.subscribe();
        let (tx, out) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let pid = peer.caller.pid;
            let mut st = StreamState {
                names: None,
                version: 0,
                nonce: String::new(),
                sent: None,
                logged_unknown: BTreeSet::new(),
            };
            loop {
                let force = tokio::select! {
                    m = inbound.message() => match m {
                        Ok(Some(r)) => {
                            if let Err(s) = check_request(&r) {
                                let _ = tx.send(Err(s)).await;
                                return;
                            }
                            if !st.on_request(&r, &api, pid) {
                                continue;
                            }
                            true
                        }
                        Ok(None) => return,
                        Err(e) => {
                            tracing::debug!(pid = ?pid, error = %e, "SDS stream ended by the caller");
                            return;
                        }
                    },
                    c = snapshots.changed() => {
                        if c.is_err() {
                            return;
                        }
                        false
                    }
                    () = tx.closed() => return,
                };
                let snap = snapshots.borrow_and_update().clone();
                let Some(names) = st.names.clone() else {
                    continue;
                };
                let resolved = resolve(&api, &snap, &selectors, &names);
                let Some(resp) = st.response(resolved, force, pid) else {
                    continue;
                };
                // Still the process, and the executable, that was attested.
                if let Err(e) = peer.verify() {
                    tracing::info!(pid = ?pid, error = %e, "SDS stream ended: caller changed");
                    let _ = tx
                        .send(Err(Status::permission_denied(format!(
                            "workload attestation failed: {e}"
                        ))))
                        .await;
                    return;
                }
                tracing::debug!(pid = ?pid, version = %resp.version_info, resources = resp.resources.len(), "SDS response sent");
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(out)))
    }

    async fn fetch_secrets(
        &self,
        req: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let r = async {
            check_request(req.get_ref())?;
            let (selectors, _) = self.attest(&req).await?;
            let snap = self.api.agent().snapshot.borrow().clone();
            let resolved = resolve(&self.api, &snap, &selectors, &req.get_ref().resource_names);
            Ok(DiscoveryResponse {
                resources: resolved.resources,
                type_url: secret_type_url(),
                ..Default::default()
            })
        }
        .await;
        self.api.count(
            "FetchSecrets",
            &r.as_ref().map(|_| ()).map_err(Clone::clone),
        );
        r.map(Response::new)
    }
}
