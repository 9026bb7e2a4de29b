//! The standard SPIFFE Workload API on a Unix socket.
//!
//! Each call is attested from the caller's peer credentials; a call without
//! the `workload.spiffe.io: true` header is refused with InvalidArgument, a
//! caller with no matching entry with PermissionDenied. Streams send the full
//! current state at once and again on every change (rotation, entry change,
//! bundle change); an identical consecutive message is not re-sent.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use meshid_identity::h2_authority::{AuthorityNormalizer, RefusalHook};
use meshid_proto::node::{JwtSvidParams, SignJwtSvidsRequest};
use meshid_proto::types::{Bundle, Entry, Selector};
use meshid_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApi;
use meshid_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svid, X509svidRequest, X509svidResponse,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};

use crate::agent::Agent;
use crate::attest::{Caller, UnixAttestor, WorkloadAttestor};
use crate::cache::Snapshot;
use crate::metrics::{OutcomeLabels, RpcLabels};

/// A Workload API connection with the caller's kernel credentials. Reads go
/// through [`AuthorityNormalizer`], so any HTTP/2 `:authority` a client
/// sends on the Unix socket is accepted.
pub struct CallerConn {
    inner: AuthorityNormalizer<UnixStream>,
    caller: Option<Caller>,
}

impl CallerConn {
    /// Reads SO_PEERCRED at accept time; `on_refused` is told about a
    /// connection closed for malformed HTTP/2.
    pub fn new(inner: UnixStream, on_refused: Option<RefusalHook>) -> Self {
        let caller = inner.peer_cred().ok().map(|c| Caller {
            pid: c.pid(),
            uid: c.uid(),
            gid: c.gid(),
        });
        Self {
            inner: AuthorityNormalizer::new(inner, "workload_api", on_refused),
            caller,
        }
    }
}

impl Connected for CallerConn {
    type ConnectInfo = Option<Caller>;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.caller
    }
}

impl AsyncRead for CallerConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CallerConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

type JwtKey = (String, Vec<String>);

/// The Workload API service.
pub struct WorkloadApi {
    agent: Arc<Agent>,
    attestor: Arc<dyn WorkloadAttestor>,
    jwt_cache: Mutex<HashMap<JwtKey, (Jwtsvid, SystemTime)>>,
}

impl std::fmt::Debug for WorkloadApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkloadApi")
    }
}

fn concat(ders: &[Vec<u8>]) -> Vec<u8> {
    ders.concat()
}

fn td_key(td: &str) -> String {
    format!("spiffe://{td}")
}

impl WorkloadApi {
    /// A service over the agent's snapshots, attesting with the unix attestor.
    pub fn new(agent: Arc<Agent>) -> Self {
        Self::with_attestor(agent, Arc::new(UnixAttestor::default()))
    }

    /// A service attesting callers with `attestor`.
    pub fn with_attestor(agent: Arc<Agent>, attestor: Arc<dyn WorkloadAttestor>) -> Self {
        Self {
            agent,
            attestor,
            jwt_cache: Mutex::new(HashMap::new()),
        }
    }

    fn count(&self, rpc: &'static str, r: &Result<(), Status>) {
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

    /// Header check and attestation: the caller's selectors.
    async fn authenticate<T>(&self, req: &Request<T>) -> Result<Vec<Selector>, Status> {
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
        let caller = req
            .extensions()
            .get::<Option<Caller>>()
            .copied()
            .flatten()
            .ok_or_else(|| Status::permission_denied("no peer credentials for caller"))?;
        let attestor = self.attestor.clone();
        let res = tokio::task::spawn_blocking(move || attestor.attest(&caller))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        match res {
            Ok(s) => Ok(s),
            Err(e) => {
                self.agent
                    .metrics
                    .attestations
                    .get_or_create(&OutcomeLabels { outcome: e.label() })
                    .inc();
                tracing::info!(uid = caller.uid, pid = ?caller.pid, error = %e, "workload attestation failed");
                Err(Status::permission_denied(format!(
                    "workload attestation failed: {e}"
                )))
            }
        }
    }

    fn entitled<'a>(&self, snap: &'a Snapshot, selectors: &[Selector]) -> Vec<&'a Entry> {
        snap.matching(selectors)
    }

    fn x509_response(snap: &Snapshot, entries: &[&Entry]) -> Option<X509svidResponse> {
        let bundle = snap.bundle.as_ref()?;
        let bundle_der = concat(&bundle.x509_authorities);
        let mut hints = HashSet::new();
        let mut svids = Vec::new();
        let mut federated = BTreeMap::new();
        for e in entries {
            let Some(s) = snap.svids.get(&e.id) else {
                continue;
            };
            if !e.hint.is_empty() && !hints.insert(e.hint.clone()) {
                tracing::warn!(entry = %e.id, hint = %e.hint, "duplicate hint; SVID left out of the response");
                continue;
            }
            svids.push(X509svid {
                spiffe_id: s.spiffe_id.clone(),
                x509_svid: concat(&s.chain),
                x509_svid_key: s.key.clone(),
                bundle: bundle_der.clone(),
                hint: e.hint.clone(),
            });
            for td in &e.federates_with {
                let name = td.trim_start_matches("spiffe://");
                if let Some(b) = snap.federated.get(name) {
                    federated.insert(td_key(name), concat(&b.x509_authorities));
                }
            }
        }
        (!svids.is_empty()).then(|| X509svidResponse {
            svids,
            crl: vec![],
            federated_bundles: federated.into_iter().collect(),
        })
    }

    fn bundles_for<'a>(snap: &'a Snapshot, entries: &[&Entry]) -> Vec<&'a Bundle> {
        let mut out: Vec<&Bundle> = snap.bundle.iter().collect();
        let mut seen = HashSet::new();
        for e in entries {
            for td in &e.federates_with {
                let name = td.trim_start_matches("spiffe://");
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
    fn stream<T, F>(&self, selectors: Vec<Selector>, build: F) -> ReceiverStream<Result<T, Status>>
    where
        T: prost::Message + Send + 'static,
        F: Fn(&Snapshot, &[&Entry]) -> Result<Option<T>, Status> + Send + 'static,
    {
        let mut rx = self.agent.snapshot.subscribe();
        let (tx, out) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut last: Option<Vec<u8>> = None;
            let started = tokio::time::Instant::now();
            loop {
                let snap = rx.borrow_and_update().clone();
                let entries = snap.matching(&selectors);
                let msg = if entries.is_empty() {
                    Err(Status::permission_denied(
                        "no identity issued to this caller",
                    ))
                } else {
                    build(&snap, &entries)
                };
                match msg {
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                    Ok(Some(m)) => {
                        let bytes = m.encode_to_vec();
                        if last.as_ref() != Some(&bytes) {
                            if tx.send(Ok(m)).await.is_err() {
                                return;
                            }
                            last = Some(bytes);
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
        let r = self.authenticate(&req).await.and_then(|sel| {
            let snap = self.agent.snapshot.borrow().clone();
            if self.entitled(&snap, &sel).is_empty() {
                return Err(Status::permission_denied(
                    "no identity issued to this caller",
                ));
            }
            Ok(sel)
        });
        self.count(
            "FetchX509SVID",
            &r.as_ref().map(|_| ()).map_err(Clone::clone),
        );
        let sel = r.inspect_err(|_| {
            self.agent
                .metrics
                .attestations
                .get_or_create(&OutcomeLabels { outcome: "denied" })
                .inc();
        })?;
        self.agent
            .metrics
            .attestations
            .get_or_create(&OutcomeLabels { outcome: "ok" })
            .inc();
        Ok(Response::new(self.stream(sel, |snap, entries| {
            Ok(Self::x509_response(snap, entries))
        })))
    }

    type FetchX509BundlesStream = ReceiverStream<Result<X509BundlesResponse, Status>>;

    async fn fetch_x509_bundles(
        &self,
        req: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let r = self.authenticate(&req).await;
        self.count(
            "FetchX509Bundles",
            &r.as_ref().map(|_| ()).map_err(Clone::clone),
        );
        let sel = r?;
        Ok(Response::new(self.stream(sel, |snap, entries| {
            let bundles = Self::bundles_for(snap, entries)
                .into_iter()
                .map(|b| (td_key(&b.trust_domain), concat(&b.x509_authorities)))
                .collect();
            Ok(snap.bundle.as_ref().map(|_| X509BundlesResponse {
                crl: vec![],
                bundles,
            }))
        })))
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
        let r = self.authenticate(&req).await;
        self.count(
            "FetchJWTBundles",
            &r.as_ref().map(|_| ()).map_err(Clone::clone),
        );
        let sel = r?;
        Ok(Response::new(self.stream(sel, |snap, entries| {
            let bundles = Self::bundles_for(snap, entries)
                .into_iter()
                .map(|b| (td_key(&b.trust_domain), crate::jwt::jwks(b)))
                .collect();
            Ok(snap.bundle.as_ref().map(|_| JwtBundlesResponse { bundles }))
        })))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        let sel = self.authenticate(&req).await;
        let res = (|| {
            let sel = sel?;
            let r = req.get_ref();
            if r.audience.is_empty() {
                return Err(Status::invalid_argument("audience must be specified"));
            }
            if r.svid.is_empty() {
                return Err(Status::invalid_argument("svid must be specified"));
            }
            let snap = self.agent.snapshot.borrow().clone();
            let entries = snap.matching(&sel);
            let bundles = Self::bundles_for(&snap, &entries);
            let (sub, claims) =
                crate::jwt::validate(&r.svid, &r.audience, bundles, SystemTime::now())
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let claims = match crate::jwt::to_prost(&claims).kind {
                Some(prost_types::value::Kind::StructValue(s)) => Some(s),
                _ => None,
            };
            Ok(ValidateJwtsvidResponse {
                spiffe_id: sub,
                claims,
            })
        })();
        self.count(
            "ValidateJWTSVID",
            &res.as_ref().map(|_| ()).map_err(Clone::clone),
        );
        res.map(Response::new)
    }
}

impl WorkloadApi {
    async fn fetch_jwt_inner(
        &self,
        req: Request<JwtsvidRequest>,
    ) -> Result<JwtsvidResponse, Status> {
        let sel = self.authenticate(&req).await?;
        let r = req.into_inner();
        if r.audience.is_empty() || r.audience.iter().any(String::is_empty) {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        let snap = self.agent.snapshot.borrow().clone();
        let mut entries = snap.matching(&sel);
        if !r.spiffe_id.is_empty() {
            entries.retain(|e| e.spiffe_id == r.spiffe_id);
        }
        if entries.is_empty() {
            return Err(Status::permission_denied(
                "no identity issued to this caller",
            ));
        }
        let mut aud = r.audience.clone();
        aud.sort();
        let now = SystemTime::now();
        let mut out = Vec::new();
        let mut missing = Vec::new();
        {
            let cache = self
                .jwt_cache
                .lock()
                .map_err(|_| Status::internal("cache poisoned"))?;
            for e in &entries {
                match cache.get(&(e.id.clone(), aud.clone())) {
                    Some((svid, refresh)) if *refresh > now => out.push((
                        e.id.clone(),
                        Jwtsvid {
                            hint: e.hint.clone(),
                            ..svid.clone()
                        },
                    )),
                    _ => missing.push(*e),
                }
            }
        }
        if !missing.is_empty() {
            let params = missing
                .iter()
                .map(|e| JwtSvidParams {
                    entry_id: e.id.clone(),
                    audience: r.audience.clone(),
                })
                .collect();
            let resp = self
                .agent
                .client
                .node()
                .sign_jwt_svids(SignJwtSvidsRequest { params })
                .await
                .map_err(|s| {
                    Status::unavailable(format!(
                        "cannot reach the server to sign a JWT-SVID: {}",
                        s.message()
                    ))
                })?
                .into_inner();
            let mut cache = self
                .jwt_cache
                .lock()
                .map_err(|_| Status::internal("cache poisoned"))?;
            cache.retain(|_, (_, refresh)| *refresh > now);
            for (e, res) in missing.iter().zip(resp.results) {
                if let Some(j) = res.svid {
                    let svid = Jwtsvid {
                        spiffe_id: j.spiffe_id,
                        svid: j.token,
                        hint: e.hint.clone(),
                    };
                    let half = u64::try_from((j.expires_at - j.issued_at) / 2).unwrap_or(0);
                    cache.insert(
                        (e.id.clone(), aud.clone()),
                        (svid.clone(), now + Duration::from_secs(half)),
                    );
                    out.push((e.id.clone(), svid));
                }
            }
        }
        // Keep the entries' order: the first is the default.
        let order: Vec<&String> = entries.iter().map(|e| &e.id).collect();
        out.sort_by_key(|(id, _)| order.iter().position(|o| *o == id));
        if out.is_empty() {
            return Err(Status::unavailable("the server issued no JWT-SVID"));
        }
        Ok(JwtsvidResponse {
            svids: out.into_iter().map(|(_, s)| s).collect(),
        })
    }
}
