//! Keeps a fresh CRL, signed by the active X.509 CA, and serves it.
//!
//! The CRL is rebuilt from the store's revocations every `crl_refresh` (at
//! most half of `crl_validity`, so a published CRL is replaced long before
//! its nextUpdate), at once after a revocation through this server, and
//! whenever the active CA changed. It is served on the metrics listener as
//! `GET /crl` (DER, `application/pkix-crl`) and `GET /crl.pem`.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use axum::http::StatusCode;
use axum::routing::get;

use crate::ca::crl::{CrlError, SignedCrl};
use crate::state::ServerState;
use crate::store::StoreError;

/// Why the CRL could not be rebuilt (the last one stays published).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The revocations could not be read.
    #[error("reading revocations: {0}")]
    Store(#[from] StoreError),
    /// Signing failed.
    #[error("{0}")]
    Sign(#[from] CrlError),
}

/// The CRL currently published, and the task that renews it.
#[derive(Debug, Default)]
pub struct CrlPublisher {
    current: ArcSwapOption<SignedCrl>,
}

impl CrlPublisher {
    /// Builds the first CRL (an error here stops start-up) and starts the
    /// renewal task.
    pub async fn start(state: Arc<ServerState>) -> Result<Arc<Self>, PublishError> {
        let p = Arc::new(Self::default());
        p.rebuild(&state).await?;
        let weak = Arc::downgrade(&state);
        let me = p.clone();
        let refresh = state.config.admin_certs.crl_refresh;
        drop(state);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(refresh).await;
                let Some(st) = weak.upgrade() else { break };
                if let Err(e) = me.rebuild(&st).await {
                    let left = me.current().map_or(0, |c| {
                        c.next_update - meshid_identity::svid::unix(SystemTime::now())
                    });
                    tracing::error!(
                        error = %e,
                        next_update_in_secs = left,
                        "cannot rebuild the CRL; the last one stays published until its nextUpdate"
                    );
                }
            }
        });
        Ok(p)
    }

    /// The CRL currently published.
    pub fn current(&self) -> Option<Arc<SignedCrl>> {
        self.current.load_full()
    }

    /// Rebuilds and publishes the CRL from the store, signed by the active CA.
    pub async fn rebuild(&self, st: &ServerState) -> Result<Arc<SignedCrl>, PublishError> {
        let now = SystemTime::now();
        let revoked = st
            .store
            .list_revoked(meshid_identity::svid::unix(now))
            .await?;
        let ca = st.ca.signer();
        let validity = st.config.admin_certs.crl_validity;
        let crl = tokio::task::spawn_blocking(move || ca.sign_crl(&revoked, validity, now))
            .await
            .map_err(|e| CrlError::Sign(e.to_string()))??;
        let crl = Arc::new(crl);
        let prev = self.current.swap(Some(crl.clone()));
        if prev
            .as_ref()
            .is_none_or(|p| p.revoked != crl.revoked || p.ca_id != crl.ca_id)
        {
            tracing::info!(
                revoked = crl.revoked,
                ca = %crl.ca_id,
                crl_number = crl.number,
                next_update = crl.next_update,
                "CRL published"
            );
        }
        Ok(crl)
    }

    /// `GET /crl` (DER) and `GET /crl.pem`, for the metrics listener.
    pub fn routes(self: &Arc<Self>) -> axum::Router {
        let der = self.clone();
        let pem = self.clone();
        axum::Router::new()
            .route(
                "/crl",
                get(move || {
                    let p = der.clone();
                    async move {
                        match p.current() {
                            Some(c) => (
                                StatusCode::OK,
                                [("content-type", "application/pkix-crl")],
                                c.der.clone(),
                            ),
                            None => (
                                StatusCode::SERVICE_UNAVAILABLE,
                                [("content-type", "text/plain")],
                                b"no CRL published yet\n".to_vec(),
                            ),
                        }
                    }
                }),
            )
            .route(
                "/crl.pem",
                get(move || {
                    let p = pem.clone();
                    async move {
                        match p.current() {
                            Some(c) => (
                                StatusCode::OK,
                                [("content-type", "application/x-pem-file")],
                                c.pem.clone(),
                            ),
                            None => (
                                StatusCode::SERVICE_UNAVAILABLE,
                                [("content-type", "text/plain")],
                                "no CRL published yet\n".to_string(),
                            ),
                        }
                    }
                }),
            )
    }
}
