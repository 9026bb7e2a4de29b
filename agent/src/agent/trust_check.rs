//! The canary's self-test of a staged trust change. When the sync stream
//! carries a `TrustCheckRequest` (this agent is a canary of a change the
//! server has not applied yet), the agent checks, locally:
//!
//! 1. every SVID it holds (its own and the workloads') still verifies
//!    against the bundle after the change;
//! 2. an SVID for its own ID signed by the authority the change puts to
//!    work (the candidate of an activation, the active one for a taint: a
//!    probe, `SignTrustProbe`, over a key made here) verifies against the bundle it
//!    holds now and the one after the change;
//! 3. an in-memory mTLS handshake (rustls, TLS 1.3, the SPIFFE verifiers)
//!    between the probe and its current SVID succeeds, in both roles;
//!
//! and reports the verdict (`ReportTrustCheck`). The server applies the
//! change only when every canary acknowledged.

use std::sync::Arc;
use std::time::SystemTime;

use meshid_identity::chain::verify_chain;
use meshid_identity::verify::{
    Authorizer, SpiffeClientVerifier, SpiffeServerVerifier, TrustBundles,
};
use meshid_proto::node::{ReportTrustCheckRequest, TrustCheckRequest};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};

use super::Agent;
use crate::node_api::{backoff, new_key_and_csr};

/// How often a verdict is sent before the agent gives up (the server then
/// counts the canary as not answering, and halts).
const REPORT_ATTEMPTS: u32 = 5;

impl Agent {
    /// Starts the self-test of a trust change the sync stream asks for,
    /// once per rollout.
    pub(super) fn on_trust_check(self: &Arc<Self>, req: Option<TrustCheckRequest>) {
        let Some(req) = req else { return };
        {
            let mut last = self
                .trust_checked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *last == req.rollout_id {
                return;
            }
            last.clone_from(&req.rollout_id);
        }
        let agent = self.clone();
        tokio::spawn(async move { agent.run_trust_check(req).await });
    }

    async fn run_trust_check(self: Arc<Self>, req: TrustCheckRequest) {
        tracing::info!(rollout = %req.rollout_id, change = %req.change, authority = %req.authority_id, "canary: checking a trust change before it applies");
        let (ok, reason) = match self.check_trust(&req).await {
            Ok(()) => {
                tracing::info!(rollout = %req.rollout_id, "canary: the trust change checks out");
                (true, String::new())
            }
            Err(reason) => {
                tracing::error!(rollout = %req.rollout_id, reason = %reason, "canary: refusing the trust change");
                (false, reason)
            }
        };
        for attempt in 0..REPORT_ATTEMPTS {
            let call = self
                .node
                .report_trust_check(ReportTrustCheckRequest {
                    rollout_id: req.rollout_id.clone(),
                    ok,
                    reason: reason.clone(),
                })
                .await;
            match call.result {
                Ok(_) => return,
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::FailedPrecondition | tonic::Code::PermissionDenied
                    ) =>
                {
                    tracing::warn!(error = %s.message(), "canary: verdict not taken (the rollout ended?)");
                    return;
                }
                Err(s) => {
                    tracing::warn!(error = %s.message(), "canary: cannot send the verdict; retrying");
                    tokio::time::sleep(backoff(attempt, self.config.max_backoff)).await;
                }
            }
        }
    }

    /// The three checks; the error says which failed and why.
    pub(super) async fn check_trust(&self, req: &TrustCheckRequest) -> Result<(), String> {
        let now = self.clock.now();
        let snap = self.snapshot.borrow().clone();
        let held: Vec<Vec<u8>> = snap
            .bundle
            .as_ref()
            .map(|b| b.x509_authorities.clone())
            .unwrap_or_default();
        let after = if req.x509_roots.is_empty() {
            held.clone()
        } else {
            req.x509_roots.clone()
        };
        let id = self.identity.load_full();
        verify_chain(&id.chain, &after, now).map_err(|e| {
            format!("this agent's SVID would not verify against the bundle after the change: {e}")
        })?;
        for s in snap.svids.values() {
            verify_chain(&s.chain, &after, now).map_err(|e| {
                format!(
                    "the SVID of {} would not verify against the bundle after the change: {e}",
                    s.spiffe_id
                )
            })?;
        }
        let (key, csr) = new_key_and_csr().map_err(|e| e.to_string())?;
        let probe = self
            .node
            .sign_trust_probe(req.rollout_id.clone(), csr)
            .await
            .result
            .map_err(|s| {
                format!(
                    "no probe SVID from authority {}: {}",
                    req.authority_id,
                    s.message()
                )
            })?
            .cert_chain;
        verify_chain(&probe, &held, now).map_err(|e| {
            format!(
                "an SVID signed by authority {} (the change's signer) does not verify against the \
                 bundle this agent holds: {e}",
                req.authority_id
            )
        })?;
        verify_chain(&probe, &after, now).map_err(|e| {
            format!(
                "an SVID signed by authority {} (the change's signer) does not verify against the \
                 bundle after the change: {e}",
                req.authority_id
            )
        })?;
        let td = &self.config.trust_domain;
        handshake(td, &after, (&probe, &key), (&id.chain, &id.key), now).map_err(|e| {
            format!("mTLS handshake, probe SVID as server, current SVID as client: {e}")
        })?;
        handshake(td, &after, (&id.chain, &id.key), (&probe, &key), now).map_err(|e| {
            format!("mTLS handshake, current SVID as server, probe SVID as client: {e}")
        })?;
        Ok(())
    }
}

fn certs(chain: &[Vec<u8>]) -> Vec<CertificateDer<'static>> {
    chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect()
}

fn key(pkcs8: &[u8]) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8.to_vec()))
}

/// The agent's clock reading, for the verifiers (the agent reads wall-clock
/// time only through its `Clock`).
#[derive(Debug)]
struct At(SystemTime);

impl rustls::time_provider::TimeProvider for At {
    fn current_time(&self) -> Option<UnixTime> {
        self.0
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()
            .map(UnixTime::since_unix_epoch)
    }
}

/// One TLS 1.3 mutual handshake in memory between `server` and `client`
/// (chain, PKCS#8 key), each verifying the other against `roots` with the
/// SPIFFE verifiers at `now`.
pub(crate) fn handshake(
    trust_domain: &str,
    roots: &[Vec<u8>],
    server: (&[Vec<u8>], &[u8]),
    client: (&[Vec<u8>], &[u8]),
    now: SystemTime,
) -> Result<(), String> {
    let provider = meshid_identity::crypto::provider();
    let time: Arc<dyn rustls::time_provider::TimeProvider> = Arc::new(At(now));
    let mut bundles = TrustBundles::new();
    bundles.add(trust_domain, &certs(roots));
    let versions = meshid_identity::crypto::versions(false);
    let e = |e: rustls::Error| e.to_string();
    let server_cfg = rustls::ServerConfig::builder_with_details(provider.clone(), time.clone())
        .with_protocol_versions(versions)
        .map_err(e)?
        .with_client_cert_verifier(SpiffeClientVerifier::new(
            bundles.clone(),
            Authorizer::Any,
            &provider,
            true,
        ))
        .with_single_cert(certs(server.0), key(server.1))
        .map_err(e)?;
    let client_cfg = rustls::ClientConfig::builder_with_details(provider.clone(), time)
        .with_protocol_versions(versions)
        .map_err(e)?
        .dangerous()
        .with_custom_certificate_verifier(SpiffeServerVerifier::new(
            bundles,
            Authorizer::Any,
            &provider,
        ))
        .with_client_auth_cert(certs(client.0), key(client.1))
        .map_err(e)?;
    let name = ServerName::try_from("meshid-trust-check").map_err(|e| e.to_string())?;
    let mut c = rustls::ClientConnection::new(Arc::new(client_cfg), name).map_err(e)?;
    let mut s = rustls::ServerConnection::new(Arc::new(server_cfg)).map_err(e)?;
    for _ in 0..16 {
        if !c.is_handshaking() && !s.is_handshaking() {
            return Ok(());
        }
        let mut buf = Vec::new();
        c.write_tls(&mut buf).map_err(|e| e.to_string())?;
        let mut rd = &buf[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).map_err(|e| e.to_string())?;
            s.process_new_packets()
                .map_err(|e| format!("server side: {e}"))?;
        }
        buf.clear();
        s.write_tls(&mut buf).map_err(|e| e.to_string())?;
        let mut rd = &buf[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).map_err(|e| e.to_string())?;
            c.process_new_packets()
                .map_err(|e| format!("client side: {e}"))?;
        }
    }
    Err("the handshake did not finish".into())
}
