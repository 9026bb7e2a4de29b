//! The production feed of [`Identity`]: the Workload API through the
//! `spiffe` crate's `X509Source`, which reconnects with backoff and keeps the
//! last SVID while the agent is away.

use std::sync::Arc;
use std::time::Duration;

use meshid_identity::{SpiffeId, TrustBundles};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

use super::{Identity, IdentityError, SvidMaterial};

/// Picks the SVID with a given SPIFFE ID.
#[derive(Debug)]
struct IdPicker(SpiffeId);

impl spiffe::x509_source::SvidPicker for IdPicker {
    fn pick_svid(&self, svids: &[Arc<spiffe::X509Svid>]) -> Option<usize> {
        svids.iter().position(|s| s.spiffe_id() == &self.0)
    }
}

fn material_from_source(source: &spiffe::X509Source) -> Result<SvidMaterial, IdentityError> {
    let wl = |e: spiffe::X509SourceError| IdentityError::WorkloadApi(e.to_string());
    let svid = source.svid().map_err(wl)?;
    let chain = svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(svid.private_key().as_bytes().to_vec().into());
    let mut bundles = TrustBundles::new();
    for (td, bundle) in source.bundle_set().map_err(wl)?.iter() {
        let ders: Vec<CertificateDer<'_>> = bundle
            .authorities()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes()))
            .collect();
        let skipped = bundles.add(td.as_str(), &ders);
        if skipped > 0 {
            tracing::warn!(trust_domain = %td, skipped, "bundle certificates unusable as trust anchors");
        }
    }
    Ok(SvidMaterial {
        chain,
        key,
        bundles,
    })
}

/// Feeds `identity` from the Workload API at `endpoint` until `shutdown`.
///
/// Connecting is retried with exponential backoff (1 s … 30 s) until the
/// first SVID arrives; afterwards the `X509Source` reconnects by itself and
/// keeps the last SVID while the agent is unreachable, so the sidecar keeps
/// serving with it.
pub async fn run_workload_api(
    identity: Arc<Identity>,
    endpoint: String,
    want: Option<SpiffeId>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_secs(1);
    let source = loop {
        let mut builder = spiffe::X509Source::builder()
            .endpoint(&endpoint)
            .reconnect_backoff(Duration::from_millis(500), Duration::from_secs(30));
        if let Some(id) = &want {
            builder = builder.picker(IdPicker(id.clone()));
        }
        let attempt = tokio::select! {
            r = builder.build() => r,
            () = shutdown.cancelled() => return,
        };
        match attempt {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!(%endpoint, error = %e, retry_in = ?backoff, "workload API not ready");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    };
    let mut updates = source.updated();
    loop {
        match material_from_source(&source).and_then(|m| identity.update(m)) {
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "SVID update refused; keeping the previous one"),
        }
        tokio::select! {
            r = updates.changed() => if let Err(e) = r {
                tracing::error!(error = %e, "workload API source closed");
                return;
            },
            () = shutdown.cancelled() => break,
        }
    }
    source.shutdown().await;
}
