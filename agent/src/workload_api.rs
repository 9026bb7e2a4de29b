//! The standard SPIFFE Workload API on a Unix socket.
//!
//! Each call is attested from the caller's peer credentials; a call without
//! the `workload.spiffe.io: true` header is refused with InvalidArgument, a
//! caller with no matching entry with PermissionDenied. Streams send the full
//! current state at once and again on every change (rotation, entry change,
//! bundle change); an identical consecutive message is not re-sent.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
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
use crate::attest::{AttestError, Caller, Pinned, UnixAttestor, WorkloadAttestor};
use crate::cache::{JwtSvidCache, Snapshot, spiffe_id_problem};
use crate::metrics::{OutcomeLabels, RpcLabels};
use crate::peer::{PeerStream, Writers};

/// What the agent knows about the process at the other end of a Workload
/// API connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// SO_PEERCRED at accept, with what was pinned about the process.
    pub caller: Caller,
    /// Why the process could not be pinned at accept, if it could not.
    pub pin_error: Option<AttestError>,
    /// Who wrote on the connection.
    pub writers: Arc<Writers>,
}

impl Peer {
    /// The caller, if calls on this connection may still be attested: no
    /// process other than the connecting one has written on it, and the
    /// connecting process was pinned.
    fn check(&self) -> Result<Caller, AttestError> {
        if let Some(writer) = self.writers.foreign() {
            return Err(AttestError::ForeignWriter {
                connected: self.caller.pid.unwrap_or_default(),
                writer,
            });
        }
        if let Some(e) = &self.pin_error {
            return Err(e.clone());
        }
        Ok(self.caller.clone())
    }

    /// As [`Peer::check`], and the pinned process still exists and runs
    /// the pinned executable (re-checked before each stream message).
    pub(crate) fn verify(&self) -> Result<(), AttestError> {
        let c = self.check()?;
        match &c.pinned {
            Some(p) => p.verify(Path::new("/proc")),
            None => Ok(()),
        }
    }
}

/// A Workload API connection with the caller's kernel credentials. Reads go
/// through [`AuthorityNormalizer`], so any HTTP/2 `:authority` a client
/// sends on the Unix socket is accepted.
pub struct CallerConn {
    inner: AuthorityNormalizer<PeerStream>,
    peer: Option<Peer>,
}

impl CallerConn {
    /// Reads SO_PEERCRED and the peer's pidfd at accept time and pins the
    /// connecting process (start time, executable identity); `on_refused` is
    /// told about a connection closed for malformed HTTP/2.
    pub fn new(inner: UnixStream, on_refused: Option<RefusalHook>) -> Self {
        let cred = inner.peer_cred().ok();
        let pid = cred.and_then(|c| c.pid());
        let pidfd = crate::peer::peer_pidfd(&inner, pid);
        let inner = PeerStream::new(inner, pid);
        let peer = cred.map(|c| {
            let pinned = match pid {
                Some(pid) => Pinned::take(pid, pidfd, Path::new("/proc")).map(Arc::new),
                None => Err(AttestError::NoPid),
            };
            let (pinned, pin_error) = match pinned {
                Ok(p) => (Some(p), None),
                Err(e) => (None, Some(e)),
            };
            Peer {
                caller: Caller {
                    pid,
                    uid: c.uid(),
                    gid: c.gid(),
                    pinned,
                },
                pin_error,
                writers: inner.writers(),
            }
        });
        Self {
            inner: AuthorityNormalizer::new(inner, "workload_api", on_refused),
            peer,
        }
    }
}

impl Connected for CallerConn {
    type ConnectInfo = Option<Peer>;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
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

/// At most this many audiences in one FetchJWTSVID request.
pub const MAX_AUDIENCES: usize = 32;
/// At most this many bytes in one audience value.
pub const MAX_AUDIENCE_BYTES: usize = 512;
/// At most this many bytes in all audience values of one request.
pub const MAX_AUDIENCE_TOTAL_BYTES: usize = 4096;
/// At most this many JWT-SVIDs are cached.
pub const JWT_CACHE_CAPACITY: usize = 1024;
/// Entries left out of responses: logged and counted once per entry
/// revision and reason, not on every response.
struct Drops {
    seen: Mutex<HashSet<(String, i64, &'static str)>>,
    metric: prometheus_client::metrics::family::Family<
        crate::metrics::DropLabels,
        prometheus_client::metrics::counter::Counter,
    >,
}

impl Drops {
    fn note(&self, e: &Entry, reason: &'static str, detail: &str) {
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        if seen.len() > 4096 {
            seen.clear();
        }
        if seen.insert((e.id.clone(), e.revision, reason)) {
            self.metric
                .get_or_create(&crate::metrics::DropLabels { reason })
                .inc();
            tracing::warn!(entry = %e.id, revision = e.revision, spiffe_id = %e.spiffe_id.chars().take(256).collect::<String>(), reason, detail, "entry left out of Workload API responses");
        }
    }

    /// The caller's entries the agent can serve, in the server's order: an
    /// entry with a SPIFFE ID that breaks the spec is left out (the others
    /// are still served), and of entries sharing a hint only the first is
    /// kept (Workload API §5.2.1, §6.2.1: hints are unique in a response).
    fn servable<'a>(&self, snap: &'a Snapshot, selectors: &[Selector]) -> Vec<&'a Entry> {
        let mut hints: HashSet<&str> = HashSet::new();
        snap.matching(selectors)
            .into_iter()
            .filter(|e| {
                if let Some(p) = spiffe_id_problem(&e.spiffe_id) {
                    self.note(e, "invalid_spiffe_id", p);
                    return false;
                }
                if !e.hint.is_empty() && !hints.insert(e.hint.as_str()) {
                    self.note(
                        e,
                        "duplicate_hint",
                        "another entry of this caller has the same hint; the first is kept",
                    );
                    return false;
                }
                true
            })
            .collect()
    }
}

/// The Workload API service.
pub struct WorkloadApi {
    agent: Arc<Agent>,
    attestor: Arc<dyn WorkloadAttestor>,
    jwt_cache: Mutex<JwtSvidCache>,
    drops: Arc<Drops>,
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
    /// The agent whose snapshots this service serves.
    pub(crate) fn agent(&self) -> &Arc<Agent> {
        &self.agent
    }

    /// A service over the agent's snapshots, attesting with the unix attestor.
    pub fn new(agent: Arc<Agent>) -> Self {
        Self::with_attestor(agent, Arc::new(UnixAttestor::default()))
    }

    /// A service attesting callers with `attestor`.
    pub fn with_attestor(agent: Arc<Agent>, attestor: Arc<dyn WorkloadAttestor>) -> Self {
        let drops = Arc::new(Drops {
            seen: Mutex::new(HashSet::new()),
            metric: agent.metrics.entries_dropped.clone(),
        });
        Self {
            agent,
            attestor,
            jwt_cache: Mutex::new(JwtSvidCache::new(JWT_CACHE_CAPACITY)),
            drops,
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
                let attestor = self.attestor.clone();
                tokio::task::spawn_blocking(move || attestor.attest(&caller))
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?
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

    /// The X.509 response for `entries` (already servable). Only an SVID
    /// minted for the entry's current revision, naming the entry's SPIFFE
    /// ID, is served: after an entry change the old SVID is never sent,
    /// the new one follows as soon as it is minted.
    fn x509_response(
        snap: &Snapshot,
        entries: &[&Entry],
        drops: &Drops,
    ) -> Option<X509svidResponse> {
        let bundle = snap.bundle.as_ref()?;
        let bundle_der = concat(&bundle.x509_authorities);
        let mut hints = HashSet::new();
        let mut svids = Vec::new();
        let mut federated = BTreeMap::new();
        for e in entries {
            let Some(s) = snap.svids.get(&e.id) else {
                continue;
            };
            if s.entry_revision != e.revision || s.spiffe_id != e.spiffe_id {
                continue;
            }
            if let Some(p) = spiffe_id_problem(&s.spiffe_id) {
                drops.note(e, "invalid_svid", p);
                continue;
            }
            if !e.hint.is_empty() && !hints.insert(e.hint.clone()) {
                drops.note(e, "duplicate_hint", "hint already in the response");
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

    pub(crate) fn bundles_for<'a>(snap: &'a Snapshot, entries: &[&Entry]) -> Vec<&'a Bundle> {
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
    fn stream<T, F>(
        &self,
        (selectors, peer): (Vec<Selector>, Peer),
        build: F,
    ) -> ReceiverStream<Result<T, Status>>
    where
        T: prost::Message + Send + 'static,
        F: Fn(&Snapshot, &[&Entry], &Drops) -> Result<Option<T>, Status> + Send + 'static,
    {
        let mut rx = self.agent.snapshot.subscribe();
        let (tx, out) = tokio::sync::mpsc::channel(4);
        let drops = self.drops.clone();
        tokio::spawn(async move {
            let mut last: Option<Vec<u8>> = None;
            let started = tokio::time::Instant::now();
            loop {
                let snap = rx.borrow_and_update().clone();
                let entries = drops.servable(&snap, &selectors);
                let msg = if entries.is_empty() {
                    Err(Status::permission_denied(
                        "no identity issued to this caller",
                    ))
                } else {
                    build(&snap, &entries, &drops)
                };
                match msg {
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                    Ok(Some(m)) => {
                        let bytes = m.encode_to_vec();
                        if last.as_ref() != Some(&bytes) {
                            // Still the process, and the executable, that
                            // was attested.
                            if let Err(e) = peer.verify() {
                                tracing::info!(pid = ?peer.caller.pid, error = %e, "Workload API stream ended: caller changed");
                                let _ = tx
                                    .send(Err(Status::permission_denied(format!(
                                        "workload attestation failed: {e}"
                                    ))))
                                    .await;
                                return;
                            }
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
            if self.entitled(&snap, &sel.0).is_empty() {
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
        Ok(Response::new(self.stream(sel, |snap, entries, drops| {
            Ok(Self::x509_response(snap, entries, drops))
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
        Ok(Response::new(self.stream(sel, |snap, entries, _| {
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
        Ok(Response::new(self.stream(sel, |snap, entries, _| {
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
            let (sel, _) = sel?;
            let r = req.get_ref();
            if r.audience.is_empty() {
                return Err(Status::invalid_argument("audience must be specified"));
            }
            if r.audience.len() > MAX_AUDIENCE_BYTES {
                return Err(Status::invalid_argument(format!(
                    "audience is longer than {MAX_AUDIENCE_BYTES} bytes"
                )));
            }
            if r.svid.is_empty() {
                return Err(Status::invalid_argument("svid must be specified"));
            }
            let snap = self.agent.snapshot.borrow().clone();
            let entries = self.entitled(&snap, &sel);
            let bundles = Self::bundles_for(&snap, &entries);
            let (sub, claims) =
                crate::jwt::validate(&r.svid, &r.audience, bundles, SystemTime::now()).map_err(
                    |e| {
                        // The token itself is never logged.
                        tracing::info!(error = %e, "JWT-SVID validation refused");
                        Status::invalid_argument(e.to_string())
                    },
                )?;
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

/// The request's audience, checked against the limits, sorted and deduped
/// (the cache key).
fn checked_audience(audience: &[String]) -> Result<Vec<String>, Status> {
    if audience.is_empty() || audience.iter().any(String::is_empty) {
        return Err(Status::invalid_argument("audience must be specified"));
    }
    if audience.len() > MAX_AUDIENCES {
        return Err(Status::invalid_argument(format!(
            "too many audiences: {} (at most {MAX_AUDIENCES})",
            audience.len()
        )));
    }
    if audience.iter().any(|a| a.len() > MAX_AUDIENCE_BYTES) {
        return Err(Status::invalid_argument(format!(
            "an audience is longer than {MAX_AUDIENCE_BYTES} bytes"
        )));
    }
    if audience.iter().map(String::len).sum::<usize>() > MAX_AUDIENCE_TOTAL_BYTES {
        return Err(Status::invalid_argument(format!(
            "audiences are longer than {MAX_AUDIENCE_TOTAL_BYTES} bytes in total"
        )));
    }
    let mut aud = audience.to_vec();
    aud.sort();
    aud.dedup();
    Ok(aud)
}

impl WorkloadApi {
    async fn fetch_jwt_inner(
        &self,
        req: Request<JwtsvidRequest>,
    ) -> Result<JwtsvidResponse, Status> {
        let (sel, _) = self.authenticate(&req).await?;
        let r = req.into_inner();
        let aud = checked_audience(&r.audience)?;
        let snap = self.agent.snapshot.borrow().clone();
        let mut entries = self.entitled(&snap, &sel);
        if !r.spiffe_id.is_empty() {
            entries.retain(|e| e.spiffe_id == r.spiffe_id);
        }
        if entries.is_empty() {
            return Err(Status::permission_denied(
                "no identity issued to this caller",
            ));
        }
        let current =
            |id: &str, rev: i64| snap.entries.iter().any(|e| e.id == id && e.revision == rev);
        let now = SystemTime::now();
        let mut out = Vec::new();
        let mut missing = Vec::new();
        {
            let mut cache = self
                .jwt_cache
                .lock()
                .map_err(|_| Status::internal("cache poisoned"))?;
            for e in &entries {
                match cache.get(&(e.id.clone(), e.revision, aud.clone()), now) {
                    Some(svid) if svid.spiffe_id == e.spiffe_id => out.push((
                        e.id.clone(),
                        Jwtsvid {
                            hint: e.hint.clone(),
                            ..svid
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
            cache.retain_current(current);
            for (e, res) in missing.iter().zip(resp.results) {
                let Some(j) = res.svid else { continue };
                if let Some(p) = spiffe_id_problem(&j.spiffe_id) {
                    self.drops.note(e, "invalid_svid", p);
                    continue;
                }
                let svid = Jwtsvid {
                    spiffe_id: j.spiffe_id,
                    svid: j.token,
                    hint: e.hint.clone(),
                };
                // Signed for the entry as the server has it now; cached only
                // when that is the revision this agent serves.
                if svid.spiffe_id == e.spiffe_id {
                    let half = u64::try_from((j.expires_at - j.issued_at) / 2).unwrap_or(0);
                    cache.insert(
                        (e.id.clone(), e.revision, aud.clone()),
                        svid.clone(),
                        now + Duration::from_secs(half),
                        now,
                        current,
                    );
                }
                out.push((e.id.clone(), svid));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CachedSvid;

    fn drops() -> Drops {
        Drops {
            seen: Mutex::new(HashSet::new()),
            metric: Default::default(),
        }
    }

    fn sel() -> Selector {
        Selector {
            r#type: "unix".into(),
            value: "uid:1".into(),
        }
    }

    fn entry(id: &str, spiffe_id: &str, hint: &str, revision: i64) -> Entry {
        Entry {
            id: id.into(),
            spiffe_id: spiffe_id.into(),
            hint: hint.into(),
            revision,
            selectors: vec![sel()],
            ..Entry::default()
        }
    }

    fn svid(e: &Entry, revision: i64, spiffe_id: &str) -> Arc<CachedSvid> {
        Arc::new(CachedSvid {
            entry_id: e.id.clone(),
            entry_revision: revision,
            spiffe_id: spiffe_id.into(),
            chain: vec![vec![1]],
            key: vec![2],
            serial: "01".into(),
            not_after: SystemTime::now(),
            renew_at: SystemTime::now(),
            authority: String::new(),
        })
    }

    /// SPIFFE-ID §2.1 (lowercase scheme and trust domain), §2.3 (2048
    /// bytes), X509-SVID §2 (a workload ID has a path); issue 16 item 1: an
    /// entry that breaks them is left out, the caller's others are served.
    #[test]
    fn unservable_spiffe_ids() {
        for bad in [
            "SPIFFE://EXAMPLE.ORG/Upper".to_string(),
            "spiffe://Example.org/x".to_string(),
            "spiffe://example.org".to_string(),
            "spiffe://example.org/".to_string(),
            format!("spiffe://example.org/{}", "a".repeat(2100)),
            "spiffe://example.org/a//b".to_string(),
            "https://example.org/x".to_string(),
        ] {
            assert!(spiffe_id_problem(&bad).is_some(), "{bad}");
        }
        assert_eq!(spiffe_id_problem("spiffe://example.org/Upper/ok-1"), None);
    }

    /// Workload API §5.2.1/§6.2.1 (hints unique in a response), issue 16
    /// items 1 and 4, issue 12 finding 8 (never an SVID of an older entry
    /// revision).
    #[test]
    fn servable_entries_and_x509_response() {
        let good = entry("a", "spiffe://example.org/a", "h", 1);
        let bad = entry("b", "SPIFFE://EXAMPLE.ORG/B", "", 1);
        let dup = entry("c", "spiffe://example.org/c", "h", 1);
        let other = entry("d", "spiffe://example.org/d", "", 3);
        let mut snap = Snapshot {
            entries: vec![bad.clone(), good.clone(), dup.clone(), other.clone()],
            bundle: Some(Bundle {
                trust_domain: "example.org".into(),
                x509_authorities: vec![vec![9]],
                ..Bundle::default()
            }),
            ..Snapshot::default()
        };
        let d = drops();
        let ids: Vec<&str> = d
            .servable(&snap, &[sel()])
            .iter()
            .map(|e| e.id.as_str())
            .collect();
        assert_eq!(ids, ["a", "d"]);
        assert_eq!(
            d.metric
                .get_or_create(&crate::metrics::DropLabels {
                    reason: "invalid_spiffe_id"
                })
                .get(),
            1
        );
        // Counted once per entry revision, not per response.
        d.servable(&snap, &[sel()]);
        assert_eq!(
            d.metric
                .get_or_create(&crate::metrics::DropLabels {
                    reason: "duplicate_hint"
                })
                .get(),
            1
        );

        // d's SVID was minted for revision 2; the entry is at 3 now.
        snap.svids
            .insert("a".into(), svid(&good, 1, &good.spiffe_id));
        snap.svids
            .insert("d".into(), svid(&other, 2, "spiffe://example.org/old-d"));
        let entries = [&good, &other];
        let r = WorkloadApi::x509_response(&snap, &entries, &d).expect("response");
        let got: Vec<&str> = r.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
        assert_eq!(got, ["spiffe://example.org/a"]);
        // Once minted for revision 3 it is served.
        snap.svids
            .insert("d".into(), svid(&other, 3, &other.spiffe_id));
        let r = WorkloadApi::x509_response(&snap, &entries, &d).expect("response");
        assert_eq!(r.svids.len(), 2);
        // Only stale SVIDs: nothing to send yet.
        snap.svids.clear();
        snap.svids
            .insert("d".into(), svid(&other, 2, "spiffe://example.org/old-d"));
        assert!(WorkloadApi::x509_response(&snap, &entries, &d).is_none());
    }

    /// Issue 12 finding 8: audiences are bounded (count and bytes) with a
    /// clear InvalidArgument.
    #[test]
    fn audience_limits() {
        assert_eq!(
            checked_audience(&["b".into(), "a".into(), "b".into()]).expect("ok"),
            ["a", "b"]
        );
        for bad in [
            vec![],
            vec![String::new()],
            vec!["x".repeat(MAX_AUDIENCE_BYTES + 1)],
            (0..=MAX_AUDIENCES).map(|i| i.to_string()).collect(),
            (0..10).map(|i| format!("{i}{}", "x".repeat(500))).collect(),
        ] {
            let e = checked_audience(&bad).expect_err("refused");
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
        }
    }
}
