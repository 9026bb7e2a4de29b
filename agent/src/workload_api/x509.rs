//! FetchX509SVID and FetchX509Bundles: X509-SVIDs and bundles of the
//! caller's entries, streamed on every change.

use std::collections::{BTreeMap, HashSet};

use meshid_identity::spiffe_id;
use meshid_proto::types::Entry;
use meshid_proto::workload::{
    X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest, X509svidResponse,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::selection::Drops;
use super::{Encoded, WorkloadApi};
use crate::cache::{Snapshot, spiffe_id_problem};
use crate::metrics::OutcomeLabels;

pub(super) fn concat(ders: &[Vec<u8>]) -> Vec<u8> {
    ders.concat()
}

impl WorkloadApi {
    /// The X.509 response for `entries` (already servable). Only an SVID
    /// minted for the entry's current revision, naming the entry's SPIFFE
    /// ID, is served: after an entry change the old SVID is never sent,
    /// the new one follows as soon as it is minted.
    pub(crate) fn x509_response(
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
                let name = spiffe_id::strip_scheme(td);
                if let Some(b) = snap.federated.get(name) {
                    federated.insert(
                        spiffe_id::trust_domain_id(name),
                        concat(&b.x509_authorities),
                    );
                }
            }
        }
        (!svids.is_empty()).then(|| X509svidResponse {
            svids,
            crl: vec![],
            federated_bundles: federated.into_iter().collect(),
        })
    }

    pub(super) async fn fetch_x509svid_stream(
        &self,
        req: Request<X509svidRequest>,
    ) -> Result<Response<ReceiverStream<Result<X509svidResponse, Status>>>, Status> {
        let r = self.authenticate(&req).await.and_then(|sel| {
            let snap = self.agent.snapshot.borrow().clone();
            if self.served(&snap, &sel.0).is_empty() {
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
        Ok(Response::new(self.stream(sel, |snap, served, drops| {
            Ok(served.x509(snap, drops))
        })))
    }

    pub(super) async fn fetch_x509_bundles_stream(
        &self,
        req: Request<X509BundlesRequest>,
    ) -> Result<Response<ReceiverStream<Result<X509BundlesResponse, Status>>>, Status> {
        let r = self.authenticate(&req).await;
        self.count(
            "FetchX509Bundles",
            &r.as_ref().map(|_| ()).map_err(Clone::clone),
        );
        let sel = r?;
        Ok(Response::new(self.stream(sel, |snap, served, _| {
            let bundles =
                Self::bundle_map(snap, &served.entries(snap), |b| concat(&b.x509_authorities));
            Ok(snap.bundle.as_ref().map(|_| {
                Encoded::new(X509BundlesResponse {
                    crl: vec![],
                    bundles,
                })
            }))
        })))
    }
}
