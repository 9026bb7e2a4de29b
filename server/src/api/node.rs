//! The node API: node attestation, agent SVID renewal, the sync stream and
//! batched signing. Every call but `Attest` requires the agent's SVID.

use std::sync::Arc;
use std::time::SystemTime;

use meshid_proto::node::node_server::Node;
use meshid_proto::node::{
    AttestRequest, AttestResponse, JwtSvid, JwtSvidResult, RenewAgentRequest, RenewAgentResponse,
    ReportTrustCheckRequest, ReportTrustCheckResponse, SignJwtSvidsRequest, SignJwtSvidsResponse,
    SignTrustProbeRequest, SignTrustProbeResponse, SignX509SvidsRequest, SignX509SvidsResponse,
    SyncRequest, SyncResponse, X509SvidResult,
};
use meshid_proto::types::Status as ItemStatus;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};

use super::status::refusal_code;
use super::tls::PeerInfo;
use crate::attest::join_token;
use crate::attest::k8s_psat::{self, PsatAttestor};
use crate::audit::Event;
use crate::issuance::{self, JwtRequest, X509Request};
use crate::state::{ServerState, svid_to_proto};
use crate::store::{AgentRecord, StoreError};
use meshid_identity::svid::unix;

/// The node API service.
#[derive(Debug, Clone)]
pub struct NodeService {
    state: Arc<ServerState>,
    psat: Option<Arc<PsatAttestor>>,
}

/// Who a node attestor says the agent is.
struct NodeIdentity {
    agent_id: String,
    aliases: Vec<String>,
    /// May this agent ID be attested again (PSAT), or is it new every time?
    reattestable: bool,
    /// Attestor-specific facts for the audit log.
    details: Vec<(&'static str, String)>,
}

impl NodeService {
    /// A service over the shared state, with the Kubernetes PSAT attestor if
    /// configured (join tokens are always accepted).
    pub fn new(state: Arc<ServerState>, psat: Option<Arc<PsatAttestor>>) -> Self {
        Self { state, psat }
    }

    /// Runs the named attestor over the payload.
    async fn attest_node(&self, r: &AttestRequest) -> Result<NodeIdentity, Status> {
        let st = &self.state;
        match r.attestor.as_str() {
            join_token::ATTESTOR => {
                let token = join_token::redeem(st, &r.payload).await.map_err(|e| {
                    self.attest_failed(&r.attestor, e.outcome(), &e.to_string());
                    Status::from(e)
                })?;
                Ok(NodeIdentity {
                    agent_id: join_token::agent_id(&st.td_id(), &token.token_id),
                    aliases: if token.alias_id.is_empty() {
                        vec![]
                    } else {
                        vec![token.alias_id]
                    },
                    reattestable: false,
                    details: vec![],
                })
            }
            k8s_psat::ATTESTOR if self.psat.is_some() => {
                let psat = self.psat.as_ref().ok_or_else(|| Status::internal("psat"))?;
                let node = psat.attest(&r.payload).await.map_err(|e| {
                    self.attest_failed(&r.attestor, e.outcome(), &e.to_string());
                    Status::from(e)
                })?;
                Ok(NodeIdentity {
                    agent_id: node.agent_id,
                    aliases: vec![node.alias_id],
                    reattestable: true,
                    details: vec![
                        ("node_name", node.node_name),
                        ("service_account", node.service_account),
                        ("pod_uid", node.pod_uid),
                    ],
                })
            }
            other => {
                let supported = if self.psat.is_some() {
                    format!("{}, {}", join_token::ATTESTOR, k8s_psat::ATTESTOR)
                } else {
                    join_token::ATTESTOR.to_string()
                };
                self.attest_failed(other, "bad_request", "unsupported attestor");
                Err(Status::invalid_argument(format!(
                    "unsupported attestor {:?}; this server accepts: {supported}",
                    crate::audit::truncate(other, crate::audit::MAX_CALLER_FIELD)
                )))
            }
        }
    }

    async fn agent<T>(&self, req: &Request<T>) -> Result<AgentRecord, Status> {
        let leaf = req
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.certs.as_ref())
            .and_then(|c| c.first().cloned())
            .ok_or_else(|| {
                Status::unauthenticated("this call requires the agent's SVID as client certificate")
            })?;
        Ok(self.state.authenticate_agent(&leaf).await?)
    }

    /// Counts a refused attestation, and audits and logs it within the
    /// refusal rate limit. The caller chooses `attestor` and much of
    /// `reason`: the metric label comes from a fixed set and both are cut to
    /// [`MAX_CALLER_FIELD`](crate::audit::MAX_CALLER_FIELD) bytes. The audit
    /// record is queued, not awaited: nothing on the runtime waits for an fsync.
    fn attest_failed(&self, attestor: &str, outcome: &'static str, reason: &str) {
        let st = &self.state;
        st.metrics.attestation(attestor, outcome);
        let suppressed = match st.audit.refusals().admit() {
            crate::audit::Admit::No => {
                st.audit.shared().counters.refusals_suppressed.inc();
                return;
            }
            crate::audit::Admit::Yes { suppressed } => suppressed,
        };
        let max = crate::audit::MAX_CALLER_FIELD;
        let attestor = crate::audit::truncate(attestor, max);
        let reason = crate::audit::truncate(reason, max);
        let mut ev = Event::new("attestation_failed")
            .with("attestor", attestor.as_ref())
            .with("outcome", outcome)
            .with("reason", reason.as_ref());
        if suppressed > 0 {
            ev = ev.with("refusals_suppressed_before", suppressed);
        }
        st.audit.submit(ev);
        tracing::info!(attestor = %attestor, outcome, reason = %reason, suppressed, "node attestation refused");
    }
}

/// A store failure as the caller sees it: the database being unreachable is
/// `Unavailable` (retry later), anything else `Internal`.
fn store_unavailable(e: StoreError) -> Status {
    if e.is_unavailable() {
        Status::from(e)
    } else {
        Status::internal(e.to_string())
    }
}

fn item_status(code: Code, message: impl Into<String>) -> Option<ItemStatus> {
    Some(ItemStatus {
        code: code as i32,
        message: message.into(),
    })
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn attest(
        &self,
        req: Request<AttestRequest>,
    ) -> Result<Response<AttestResponse>, Status> {
        let r = req.into_inner();
        let st = &self.state;
        // Check the CSR before consuming a token: a bad request changes nothing.
        if let Err(e) = crate::ca::x509svid::parse_csr(&r.csr) {
            self.attest_failed(&r.attestor, "bad_request", &e.to_string());
            return Err(Status::invalid_argument(e.to_string()));
        }
        let node = self.attest_node(&r).await?;
        let agent_id = node.agent_id.clone();
        if node.reattestable
            && let Some(prev) = st
                .store
                .get_agent(&agent_id)
                .await
                .map_err(store_unavailable)?
            && prev.banned
        {
            let reason = format!("agent {agent_id} is banned; `agent evict` lets it attest again");
            self.attest_failed(&r.attestor, "banned", &reason);
            return Err(Status::permission_denied(reason));
        }
        let svid = issuance::sign_identity(
            st,
            &r.csr,
            &agent_id,
            st.config.agent_svid_ttl,
            "agent",
            SystemTime::now(),
        )
        .await?;
        let aliases = node.aliases;
        let record = AgentRecord {
            spiffe_id: agent_id.clone(),
            attestor: r.attestor.clone(),
            serial: svid.serial.clone(),
            prev_serial: String::new(),
            expires_at: unix(svid.not_after),
            banned: false,
            aliases: aliases.clone(),
            attested_at: unix(SystemTime::now()),
        };
        // The check above spares a banned node a signature; this conditional
        // write is what holds: a ban committed since the check refuses here,
        // and the SVID just signed is never handed out.
        match st.store.attest_agent(&record).await {
            Ok(()) => {}
            Err(StoreError::Banned(_)) => {
                let reason =
                    format!("agent {agent_id} is banned; `agent evict` lets it attest again");
                self.attest_failed(&r.attestor, "banned", &reason);
                st.audit.submit(
                    Event::new("agent_svid_withheld")
                        .with("agent", agent_id.clone())
                        .with("serial", svid.serial.clone())
                        .with("reason", reason.clone()),
                );
                return Err(Status::permission_denied(reason));
            }
            Err(e) => return Err(store_unavailable(e)),
        }
        st.metrics.attestation(&r.attestor, "ok");
        let event = node.details.into_iter().fold(
            Event::new("attestation_succeeded")
                .with("attestor", r.attestor)
                .with("agent", agent_id.clone())
                .with("aliases", aliases)
                .with("serial", svid.serial.clone()),
            |ev, (k, v)| ev.with(k, v),
        );
        st.audit
            .record(vec![event])
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        // The sync view re-reads the store and sets the gauges.
        st.notify_change();
        tracing::info!(agent = %agent_id, "agent attested");
        let bundle = st.own_bundle().await.map_err(store_unavailable)?;
        Ok(Response::new(AttestResponse {
            svid: Some(svid_to_proto(&svid)),
            bundle: Some(bundle),
        }))
    }

    async fn renew_agent(
        &self,
        req: Request<RenewAgentRequest>,
    ) -> Result<Response<RenewAgentResponse>, Status> {
        let agent = self.agent(&req).await?;
        let st = &self.state;
        let r = req.into_inner();
        let svid = issuance::sign_identity(
            st,
            &r.csr,
            &agent.spiffe_id,
            st.config.agent_svid_ttl,
            "agent",
            SystemTime::now(),
        )
        .await?;
        // Only serial and expiry are written, and only while the agent is
        // still the one authenticated above: a ban or eviction committed
        // meanwhile wins, and the new SVID is never handed out.
        if let Err(e) = st
            .store
            .renew_agent(
                &agent.spiffe_id,
                &agent.serial,
                &svid.serial,
                unix(svid.not_after),
            )
            .await
        {
            let id = &agent.spiffe_id;
            let status = match e {
                StoreError::Banned(_) => Status::permission_denied(format!("agent {id} is banned")),
                StoreError::NotFound(_) => Status::permission_denied(format!(
                    "unknown agent {id}: never attested, or evicted"
                )),
                StoreError::Conflict(m) => Status::aborted(m),
                e => store_unavailable(e),
            };
            tracing::warn!(agent = %id, code = ?status.code(), reason = %status.message(), "agent SVID renewal refused");
            // The SVID is on record as issued; say that it was withheld.
            st.audit
                .record(vec![
                    Event::new("agent_svid_withheld")
                        .with("agent", id.clone())
                        .with("serial", svid.serial.clone())
                        .with("reason", status.message().to_string()),
                ])
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
            return Err(status);
        }
        let bundle = st.own_bundle().await.map_err(store_unavailable)?;
        Ok(Response::new(RenewAgentResponse {
            svid: Some(svid_to_proto(&svid)),
            bundle: Some(bundle),
        }))
    }

    type SyncStream = ReceiverStream<Result<SyncResponse, Status>>;

    async fn sync(&self, req: Request<SyncRequest>) -> Result<Response<Self::SyncStream>, Status> {
        let agent = self.agent(&req).await?;
        let serial = req
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.certs.as_ref())
            .and_then(|c| c.first())
            .and_then(|leaf| meshid_identity::SvidInfo::from_der(leaf).ok())
            .map(|i| i.serial)
            .unwrap_or_default();
        let st = self.state.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut views = st.sync_view.subscribe();
        tokio::spawn(async move {
            st.metrics.sync_streams.inc();
            let mut agent = agent;
            let mut last: Option<SyncResponse> = None;
            loop {
                views.borrow_and_update();
                let msg = match st.sync_view.current() {
                    Some(view) => {
                        // A ban, an eviction or a superseded SVID ends the
                        // stream.
                        match view.agent(&agent.spiffe_id, &serial) {
                            Ok(a) => agent = a,
                            Err(e) => {
                                let _ = tx.send(Err(Status::from(e))).await;
                                break;
                            }
                        }
                        view.message_for(
                            &agent,
                            st.tainted.load().to_vec(),
                            st.rollouts.check_for(&agent.spiffe_id),
                            SystemTime::now(),
                        )
                        .map_err(store_unavailable)
                    }
                    // Not read yet (the store was down at start): wait.
                    None => Err(Status::unavailable(
                        "this server has not read its store yet; try again",
                    )),
                };
                let send = match (&msg, &last) {
                    (Ok(m), Some(l)) => m != l,
                    _ => true,
                };
                if send {
                    if let Ok(m) = &msg {
                        last = Some(m.clone());
                    }
                    let failed = msg.is_err();
                    if tx.send(msg).await.is_err() || failed {
                        break;
                    }
                }
                tokio::select! {
                    r = views.changed() => if r.is_err() { break },
                    () = tx.closed() => break,
                }
            }
            st.metrics.sync_streams.dec();
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn sign_x509_svids(
        &self,
        req: Request<SignX509SvidsRequest>,
    ) -> Result<Response<SignX509SvidsResponse>, Status> {
        let agent = self.agent(&req).await?;
        let requests = req
            .into_inner()
            .params
            .into_iter()
            .map(|p| X509Request {
                entry_id: p.entry_id,
                csr: p.csr,
            })
            .collect();
        let signed = issuance::sign_x509(&self.state, &agent, requests, SystemTime::now()).await?;
        let results = signed
            .into_iter()
            .map(|r| match r {
                Ok(s) => X509SvidResult {
                    svid: Some(svid_to_proto(&s)),
                    status: item_status(Code::Ok, ""),
                },
                Err(r) => X509SvidResult {
                    svid: None,
                    status: item_status(refusal_code(&r), r.to_string()),
                },
            })
            .collect();
        Ok(Response::new(SignX509SvidsResponse { results }))
    }

    async fn sign_jwt_svids(
        &self,
        req: Request<SignJwtSvidsRequest>,
    ) -> Result<Response<SignJwtSvidsResponse>, Status> {
        let agent = self.agent(&req).await?;
        let requests = req
            .into_inner()
            .params
            .into_iter()
            .map(|p| JwtRequest {
                entry_id: p.entry_id,
                audience: p.audience,
            })
            .collect();
        let signed = issuance::sign_jwt(&self.state, &agent, requests, SystemTime::now()).await?;
        let results = signed
            .into_iter()
            .map(|r| match r {
                Ok(j) => JwtSvidResult {
                    svid: Some(JwtSvid {
                        spiffe_id: j.spiffe_id,
                        token: j.jwt.token,
                        issued_at: j.jwt.issued_at,
                        expires_at: j.jwt.expires_at,
                    }),
                    status: item_status(Code::Ok, ""),
                },
                Err(r) => JwtSvidResult {
                    svid: None,
                    status: item_status(refusal_code(&r), r.to_string()),
                },
            })
            .collect();
        Ok(Response::new(SignJwtSvidsResponse { results }))
    }

    async fn sign_trust_probe(
        &self,
        req: Request<SignTrustProbeRequest>,
    ) -> Result<Response<SignTrustProbeResponse>, Status> {
        let agent = self.agent(&req).await?;
        super::node_trust::sign_trust_probe(&self.state, &agent, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn report_trust_check(
        &self,
        req: Request<ReportTrustCheckRequest>,
    ) -> Result<Response<ReportTrustCheckResponse>, Status> {
        let agent = self.agent(&req).await?;
        super::node_trust::report_trust_check(&self.state, &agent, req.into_inner())
            .await
            .map(Response::new)
    }
}
