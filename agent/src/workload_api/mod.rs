//! The standard SPIFFE Workload API on a Unix socket.
//!
//! Each call is attested from the caller's peer credentials; a call without
//! the `workload.spiffe.io: true` header is refused with InvalidArgument, a
//! caller with no matching entry with PermissionDenied. Streams send the full
//! current state at once and again on every change (rotation, entry change,
//! bundle change); an identical consecutive message is not re-sent.
//!
//! A caller's selectors are reused for a few seconds per process image
//! ([`AttestCache`]: its pinned process is re-checked on every call), and
//! what a snapshot serves to a selector set is worked out once and shared
//! by every call and stream with that set (`served.rs`).
//!
//! `conn.rs`: the connection and its caller; `selection.rs`: which entries
//! can be served; `served.rs`: what is shared per snapshot and selector set;
//! `x509.rs` and `jwt.rs`: the calls of each kind.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshid_identity::spiffe_id;
use meshid_proto::types::{Bundle, Entry, Selector};
use meshid_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApi;
use meshid_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svidRequest,
    X509svidResponse,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::agent::Agent;
use crate::attest::WorkloadAttestor;
use crate::attest_cache::AttestCache;
use crate::cache::Snapshot;
use crate::jwt_svids::JwtSvids;
use crate::metrics::{OutcomeLabels, RpcLabels};

mod conn;
mod jwt;
mod selection;
mod served;
mod x509;

pub use crate::jwt_svids::JWT_CACHE_CAPACITY;
pub use conn::{CallerConn, Peer};
use selection::Drops;
use served::{Encoded, Served, ServedCache};

/// The Workload API service.
pub struct WorkloadApi {
    agent: Arc<Agent>,
    attestor: Arc<dyn WorkloadAttestor>,
    jwt_svids: JwtSvids,
    drops: Arc<Drops>,
    attestations: AttestCache,
    served: Arc<ServedCache>,
}

impl std::fmt::Debug for WorkloadApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkloadApi")
    }
}

impl WorkloadApi {
    /// The agent whose snapshots this service serves.
    pub(crate) fn agent(&self) -> &Arc<Agent> {
        &self.agent
    }

    /// A service attesting callers with `attestor`.
    pub fn with_attestor(agent: Arc<Agent>, attestor: Arc<dyn WorkloadAttestor>) -> Self {
        let drops = Arc::new(Drops {
            seen: Mutex::new(HashSet::new()),
            metric: agent.metrics.entries_dropped.clone(),
        });
        let jwt_svids = JwtSvids::new(agent.node.clone(), agent.clock.clone(), JWT_CACHE_CAPACITY);
        Self {
            agent,
            attestor,
            jwt_svids,
            drops,
            attestations: AttestCache::default(),
            served: Arc::new(ServedCache::default()),
        }
    }

    pub(crate) fn count(&self, rpc: &'static str, r: &Result<(), Status>) {
        let code = match r {
            Ok(()) => "ok".to_string(),
            Err(s) => format!("{:?}", s.code()).to_lowercase(),
        };
        self.agent
            .metrics
            .requests
            .get_or_create(&RpcLabels { rpc, code })
            .inc();
    }

    /// Header check and attestation: the caller's selectors, and the peer
    /// for streams to re-check.
    async fn authenticate<T>(&self, req: &Request<T>) -> Result<(Vec<Selector>, Peer), Status> {
        let ok = req
            .metadata()
            .get("workload.spiffe.io")
            .and_then(|v| v.to_str().ok())
            == Some("true");
        if !ok {
            return Err(Status::invalid_argument(
                "security header missing from request",
            ));
        }
        self.attest_peer(req.extensions().get::<Option<Peer>>().cloned().flatten())
            .await
    }

    /// Attestation of the caller from its kernel credentials alone (no
    /// security header): its selectors, and the peer for streams to re-check.
    pub(crate) async fn attest_peer(
        &self,
        peer: Option<Peer>,
    ) -> Result<(Vec<Selector>, Peer), Status> {
        let peer =
            peer.ok_or_else(|| Status::permission_denied("no peer credentials for caller"))?;
        let res = match peer.check() {
            Ok(caller) => {
                self.attestations
                    .attest(caller, self.attestor.clone(), Path::new("/proc"))
                    .await
            }
            Err(e) => Err(e),
        };
        match res {
            Ok(s) => Ok((s, peer)),
            Err(e) => {
                self.agent
                    .metrics
                    .attestations
                    .get_or_create(&OutcomeLabels { outcome: e.label() })
                    .inc();
                tracing::info!(uid = peer.caller.uid, pid = ?peer.caller.pid, error = %e, "workload attestation failed");
                Err(Status::permission_denied(format!(
                    "workload attestation failed: {e}"
                )))
            }
        }
    }

    pub(crate) fn entitled<'a>(
        &self,
        snap: &'a Snapshot,
        selectors: &[Selector],
    ) -> Vec<&'a Entry> {
        self.drops.servable(snap, selectors)
    }

    /// What `snap` serves to `selectors`, shared with every other call and
    /// stream asking the same of the same snapshot.
    pub(crate) fn served(&self, snap: &Arc<Snapshot>, selectors: &[Selector]) -> Arc<Served> {
        self.served.get(snap, selectors, &self.drops)
    }

    /// The bundles a caller may see ([`Self::bundles_for`]), keyed by trust
    /// domain ID, each rendered by `render` (X.509 roots or a JWKS).
    pub(crate) fn bundle_map<V, C: FromIterator<(String, V)>>(
        snap: &Snapshot,
        entries: &[&Entry],
        render: impl Fn(&Bundle) -> V,
    ) -> C {
        Self::bundles_for(snap, entries)
            .into_iter()
            .map(|b| {
                (
                    meshid_identity::spiffe_id::trust_domain_id(&b.trust_domain),
                    render(b),
                )
            })
            .collect()
    }

    pub(crate) fn bundles_for<'a>(snap: &'a Snapshot, entries: &[&Entry]) -> Vec<&'a Bundle> {
        let mut out: Vec<&Bundle> = snap.bundle.iter().collect();
        let mut seen = HashSet::new();
        for e in entries {
            for td in &e.federates_with {
                let name = spiffe_id::strip_scheme(td);
                if seen.insert(name.to_string())
                    && let Some(b) = snap.federated.get(name)
                {
                    out.push(b);
                }
            }
        }
        out
    }

    /// Streams `build(snapshot)` to the caller on every change, skipping
    /// identical consecutive messages. `build` returning `Err` ends the stream.
    /// Each message but the first is sent only after re-checking that the
    /// caller still is the pinned process running the pinned executable; the
    /// first goes out right after the attestation, which checked the same.
    fn stream<T, F>(
        &self,
        (selectors, peer): (Vec<Selector>, Peer),
        build: F,
    ) -> ReceiverStream<Result<T, Status>>
    where
        T: prost::Message + Clone + Send + Sync + 'static,
        F: Fn(&Snapshot, &Served, &Drops) -> Result<Option<Arc<Encoded<T>>>, Status>
            + Send
            + 'static,
    {
        let mut rx = self.agent.snapshot.subscribe();
        let (tx, out) = tokio::sync::mpsc::channel(4);
        let drops = self.drops.clone();
        let shared = self.served.clone();
        tokio::spawn(async move {
            let mut last: Option<Arc<Encoded<T>>> = None;
            let started = tokio::time::Instant::now();
            // The first pass runs right after the attestation, whose own
            // check of the pinned process covers its message.
            let mut checked = true;
            loop {
                let snap = rx.borrow_and_update().clone();
                let served = shared.get(&snap, &selectors, &drops);
                let msg = if served.is_empty() {
                    Err(Status::permission_denied(
                        "no identity issued to this caller",
                    ))
                } else {
                    build(&snap, &served, &drops)
                };
                match msg {
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                    Ok(Some(m)) => {
                        let same = last
                            .as_ref()
                            .is_some_and(|l| Arc::ptr_eq(l, &m) || l.bytes == m.bytes);
                        if !same {
                            // Still the process, and the executable, that
                            // was attested.
                            let now_ok = if checked { Ok(()) } else { peer.verify() };
                            if let Err(e) = now_ok {
                                tracing::info!(pid = ?peer.caller.pid, error = %e, "Workload API stream ended: caller changed");
                                let _ = tx
                                    .send(Err(Status::permission_denied(format!(
                                        "workload attestation failed: {e}"
                                    ))))
                                    .await;
                                return;
                            }
                            if tx.send(Ok(m.msg.clone())).await.is_err() {
                                return;
                            }
                            last = Some(m);
                        }
                    }
                    Ok(None) => {
                        // Entitled, but nothing minted yet: wait for the cache.
                        if last.is_none() && started.elapsed() > Duration::from_secs(30) {
                            let _ = tx
                                .send(Err(Status::unavailable("SVIDs are not yet available")))
                                .await;
                            return;
                        }
                    }
                }
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    () = tx.closed() => return,
                    () = tokio::time::sleep(Duration::from_secs(5)), if last.is_none() => {},
                }
                checked = false;
            }
        });
        ReceiverStream::new(out)
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = ReceiverStream<Result<X509svidResponse, Status>>;

    async fn fetch_x509svid(
        &self,
        req: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        self.fetch_x509svid_stream(req).await
    }

    type FetchX509BundlesStream = ReceiverStream<Result<X509BundlesResponse, Status>>;

    async fn fetch_x509_bundles(
        &self,
        req: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        self.fetch_x509_bundles_stream(req).await
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let res = self.fetch_jwt_inner(req).await;
        self.count(
            "FetchJWTSVID",
            &res.as_ref().map(|_| ()).map_err(Clone::clone),
        );
        res.map(Response::new)
    }

    type FetchJWTBundlesStream = ReceiverStream<Result<JwtBundlesResponse, Status>>;

    async fn fetch_jwt_bundles(
        &self,
        req: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.fetch_jwt_bundles_stream(req).await
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        self.validate_jwtsvid_inner(req).await
    }
}
