//! Bundles on the admin API: the own bundle as served, and federated bundles
//! checked before they are stored; a delete names the entries it affects.

use std::time::SystemTime;

use meshid_proto::admin::*;
use meshid_proto::types::Bundle;
use tonic::{Request, Response, Status};

use super::*;
use crate::audit::Event;
use crate::store::EntryFilter;

pub(super) async fn get_bundle(
    svc: &AdminService,
    _req: Request<GetBundleRequest>,
) -> Result<Response<Bundle>, Status> {
    let st = &svc.state;
    Ok(Response::new(st.own_bundle().await.map_err(store_status)?))
}

pub(super) async fn list_federated_bundles(
    svc: &AdminService,
    _req: Request<ListFederatedBundlesRequest>,
) -> Result<Response<ListFederatedBundlesResponse>, Status> {
    let bundles = svc
        .state
        .store
        .list_federated_bundles()
        .await
        .map_err(store_status)?;
    Ok(Response::new(ListFederatedBundlesResponse { bundles }))
}

pub(super) async fn set_federated_bundle(
    svc: &AdminService,
    req: Request<SetFederatedBundleRequest>,
) -> Result<Response<Bundle>, Status> {
    let st = &svc.state;
    let mut b = req
        .into_inner()
        .bundle
        .ok_or_else(|| Status::invalid_argument("bundle is required"))?;
    b.trust_domain = normalize_td(&b.trust_domain)?;
    if b.trust_domain == st.config.trust_domain {
        return Err(Status::invalid_argument(
            "cannot set this server's own trust domain as a federated bundle",
        ));
    }
    // An empty set of X.509 authorities is valid (Trust Domain and
    // Bundle §4.1.3): the domain vouches for no X509-SVID any more.
    if !b.x509_authorities.is_empty() {
        crate::ca::validate::validate_bundle_roots(&b.x509_authorities, SystemTime::now())
            .map_err(|e| {
                Status::invalid_argument(format!("bundle for {} refused: {e}", b.trust_domain))
            })?;
    }
    let old = st
        .store
        .get_bundle(&b.trust_domain)
        .await
        .map_err(store_status)?;
    b.sequence_number = old
        .map_or(1, |o| o.sequence_number + 1)
        .max(b.sequence_number);
    st.store.put_bundle(&b, true).await.map_err(store_status)?;
    svc.audit(
        Event::new("federated_bundle_set")
            .with("trust_domain", b.trust_domain.clone())
            .with("x509_authorities", b.x509_authorities.len())
            .with("jwt_authorities", b.jwt_authorities.len())
            .with("sequence_number", b.sequence_number),
    )
    .await?;
    st.notify_change();
    Ok(Response::new(b))
}

pub(super) async fn delete_federated_bundle(
    svc: &AdminService,
    req: Request<DeleteFederatedBundleRequest>,
) -> Result<Response<DeleteFederatedBundleResponse>, Status> {
    let st = &svc.state;
    let planned = crate::safe_ops::is_planned(&req);
    let r = req.into_inner();
    crate::safe_ops::refuse_unplanned(st, planned, r.dry_run)?;
    let td = normalize_td(&r.trust_domain)?;
    let bundle = st
        .store
        .get_bundle(&td)
        .await
        .map_err(store_status)?
        .filter(|_| td != st.config.trust_domain)
        .ok_or_else(|| Status::not_found(format!("no federated bundle for {td}")))?;
    let td_id = meshid_identity::spiffe_id::trust_domain_id(&td);
    let affected = st
        .store
        .list_entries(&EntryFilter::default())
        .await
        .map_err(store_status)?
        .into_iter()
        .filter(|e| e.federates_with.contains(&td_id))
        .map(|e| e.id)
        .collect::<Vec<_>>();
    if !r.dry_run {
        st.store.delete_bundle(&td).await.map_err(store_status)?;
        svc.audit(
            Event::new("federated_bundle_deleted")
                .with("trust_domain", td.clone())
                .with("affected_entries", affected.clone()),
        )
        .await?;
        st.notify_change();
    }
    Ok(Response::new(DeleteFederatedBundleResponse {
        bundle: Some(bundle),
        affected_entry_ids: affected,
        dry_run: r.dry_run,
    }))
}
