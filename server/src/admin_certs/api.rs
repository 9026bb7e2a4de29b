//! The `AdminX509` service on the admin socket: mint admin certificates
//! under the `[admin_certs]` policy, revoke certificates, read the CRL.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshid_identity::svid::unix;
use meshid_proto::admin::admin_x509_server::AdminX509;
use meshid_proto::admin::{
    GetCrlRequest, GetCrlResponse, MintX509Request, MintX509Response, RevokeX509Request,
    RevokeX509Response,
};
use tonic::{Request, Response, Status};

use super::publisher::CrlPublisher;
use crate::audit::Event;
use crate::state::ServerState;
use crate::store::{IssuedRecord, RevokedCert};

/// `agent_id` of a minted certificate in the issuance journal: each one is a
/// slot of its own (`admin-cert:<serial>`), so minting a second certificate
/// for the same SPIFFE ID never hides the first from the CA views.
pub const MINTED_AGENT_PREFIX: &str = "admin-cert:";

/// RFC 5280 CRLReason names accepted by `x509 revoke --reason`.
pub const REASONS: &[(&str, i64)] = &[
    ("unspecified", 0),
    ("key-compromise", 1),
    ("ca-compromise", 2),
    ("affiliation-changed", 3),
    ("superseded", 4),
    ("cessation-of-operation", 5),
    ("privilege-withdrawn", 9),
];

/// The `AdminX509` gRPC service.
#[derive(Debug, Clone)]
pub struct X509AdminService {
    state: Arc<ServerState>,
    crl: Arc<CrlPublisher>,
}

impl X509AdminService {
    /// A service over `state`, publishing through `crl`.
    pub fn new(state: Arc<ServerState>, crl: Arc<CrlPublisher>) -> Self {
        Self { state, crl }
    }
}

/// A serial as the journal keeps it: lowercase hex, no separators.
pub fn normalize_serial(s: &str) -> Result<String, Status> {
    let hex: String = s
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    if hex.is_empty() || hex.len() > 40 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Status::invalid_argument(format!(
            "serial {s:?} is not a hex serial number (as `x509 mint` prints it)"
        )));
    }
    Ok(hex)
}

fn audit_unavailable(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!(
        "audit log not writable, refusing to act unaudited: {e}"
    ))
}

#[tonic::async_trait]
impl AdminX509 for X509AdminService {
    async fn mint_x509(
        &self,
        req: Request<MintX509Request>,
    ) -> Result<Response<MintX509Response>, Status> {
        let r = req.into_inner();
        let st = &self.state;
        let policy = &st.config.admin_certs;
        let ttl = Duration::from_secs(u64::try_from(r.ttl).unwrap_or(0));
        if let Err(refused) = policy.check_mint(&st.config.trust_domain, &r.spiffe_id, ttl) {
            tracing::warn!(spiffe_id = %r.spiffe_id, ttl_secs = r.ttl, reason = %refused, "admin certificate refused");
            st.metrics.issued("admin", "refused", 1);
            let mut id = r.spiffe_id.clone();
            id.truncate(256);
            st.audit
                .record(vec![
                    Event::new("admin_cert_refused")
                        .with("spiffe_id", id)
                        .with("ttl", r.ttl)
                        .with("reason", refused.label())
                        .with("detail", refused.to_string()),
                ])
                .await
                .map_err(audit_unavailable)?;
            return Err(Status::failed_precondition(refused.to_string()));
        }
        let now = SystemTime::now();
        let ca = st.ca.signer();
        let csr = r.csr;
        let id = r.spiffe_id.clone();
        let signer = ca.clone();
        let svid =
            tokio::task::spawn_blocking(move || signer.sign_x509_svid(&csr, &id, &[], ttl, now))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| {
                    st.metrics.issued("admin", "invalid", 1);
                    Status::invalid_argument(e.to_string())
                })?;
        let rec = IssuedRecord {
            serial: svid.serial.clone(),
            spiffe_id: svid.spiffe_id.clone(),
            entry_id: String::new(),
            agent_id: format!("{MINTED_AGENT_PREFIX}{}", svid.serial),
            not_after: unix(svid.not_after),
            issued_at: unix(now),
            ca_id: ca.id().to_string(),
        };
        let ev = Event::new("admin_cert_minted")
            .with("serial", rec.serial.clone())
            .with("spiffe_id", rec.spiffe_id.clone())
            .with("ca", rec.ca_id.clone())
            .with("ttl", r.ttl)
            .with("not_after", rec.not_after);
        if let Err(e) = st.journal.commit(vec![rec], vec![ev]).await {
            tracing::error!(error = %e, "cannot record a minted certificate; not handing it out");
            st.metrics.issued("admin", "error", 1);
            return Err(e.into());
        }
        st.metrics.issued("admin", "ok", 1);
        tracing::info!(serial = %svid.serial, spiffe_id = %svid.spiffe_id, not_after = unix(svid.not_after), "admin certificate minted");
        let bundle = st
            .own_bundle()
            .await
            .map(|b| b.x509_authorities)
            .unwrap_or_default();
        Ok(Response::new(MintX509Response {
            cert_chain: svid.chain,
            serial: svid.serial,
            not_after: unix(svid.not_after),
            bundle,
        }))
    }

    async fn revoke_x509(
        &self,
        req: Request<RevokeX509Request>,
    ) -> Result<Response<RevokeX509Response>, Status> {
        let r = req.into_inner();
        let st = &self.state;
        let serial = normalize_serial(&r.serial)?;
        let reason_name = if r.reason.is_empty() {
            "unspecified"
        } else {
            r.reason.as_str()
        };
        let reason = REASONS
            .iter()
            .find(|(n, _)| *n == reason_name)
            .map(|(_, c)| *c)
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "unknown reason {reason_name:?}: one of {}",
                    REASONS
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        let issued = st
            .store
            .get_issued(&serial)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no certificate with serial {serial} was issued by this trust domain's servers"
                ))
            })?;
        let now = unix(SystemTime::now());
        if issued.not_after < now {
            return Err(Status::failed_precondition(format!(
                "certificate {serial} ({}) expired at {}; an expired certificate is refused \
                 anyway and needs no revocation",
                issued.spiffe_id, issued.not_after
            )));
        }
        let rc = RevokedCert {
            serial: serial.clone(),
            spiffe_id: issued.spiffe_id.clone(),
            not_after: issued.not_after,
            revoked_at: now,
            reason,
        };
        let added = st
            .store
            .revoke_cert(&rc)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        st.audit
            .record(vec![
                Event::new("x509_revoked")
                    .with("serial", serial.clone())
                    .with("spiffe_id", issued.spiffe_id.clone())
                    .with("not_after", issued.not_after)
                    .with("reason", reason_name)
                    .with("already_revoked", !added),
            ])
            .await
            .map_err(audit_unavailable)?;
        tracing::warn!(serial = %serial, spiffe_id = %issued.spiffe_id, reason = reason_name, "certificate revoked");
        let crl = self.crl.rebuild(st).await.map_err(|e| {
            Status::internal(format!(
                "revocation recorded, but the CRL could not be rebuilt ({e}); it is retried every crl_refresh"
            ))
        })?;
        Ok(Response::new(RevokeX509Response {
            serial,
            spiffe_id: issued.spiffe_id,
            not_after: issued.not_after,
            crl_number: crl.number,
            already_revoked: !added,
        }))
    }

    async fn get_crl(
        &self,
        _req: Request<GetCrlRequest>,
    ) -> Result<Response<GetCrlResponse>, Status> {
        let c = self
            .crl
            .current()
            .ok_or_else(|| Status::unavailable("no CRL published yet"))?;
        Ok(Response::new(GetCrlResponse {
            der: c.der.clone(),
            this_update: c.this_update,
            next_update: c.next_update,
            crl_number: c.number,
            revoked: i64::try_from(c.revoked).unwrap_or(i64::MAX),
        }))
    }
}
