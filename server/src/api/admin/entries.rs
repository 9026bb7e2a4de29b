//! Registration entries on the admin API: checked before they are stored
//! (canonical IDs, selectors, TTLs, unique hints), audited, and deleted only
//! by ids or an explicit filter (`all` to mean every entry).

use std::time::SystemTime;

use meshid_proto::admin::*;
use meshid_proto::types::Entry;
use tonic::{Request, Response, Status};

use super::*;
use crate::audit::Event;
use crate::store::EntryFilter;
use meshid_identity::svid::unix;

pub(super) async fn create_entry(
    svc: &AdminService,
    req: Request<CreateEntryRequest>,
) -> Result<Response<Entry>, Status> {
    let st = &svc.state;
    let e = req
        .into_inner()
        .entry
        .ok_or_else(|| Status::invalid_argument("entry is required"))?;
    let mut e = validate_entry(st, e)?;
    e.id = uuid::Uuid::new_v4().to_string();
    refuse_shared_hint(svc, &e).await?;
    e.revision = 1;
    e.created_at = unix(SystemTime::now());
    st.store.create_entry(&e).await.map_err(store_status)?;
    svc.audit(Event::new("entry_created").with("entry", entry_summary(&e)))
        .await?;
    // The sync view re-reads the store and sets the gauges.
    st.notify_change();
    Ok(Response::new(e))
}

pub(super) async fn list_entries(
    svc: &AdminService,
    req: Request<ListEntriesRequest>,
) -> Result<Response<ListEntriesResponse>, Status> {
    let filter = entry_filter(req.into_inner().filter);
    let entries = svc
        .state
        .store
        .list_entries(&filter)
        .await
        .map_err(store_status)?;
    Ok(Response::new(ListEntriesResponse { entries }))
}

pub(super) async fn get_entry(
    svc: &AdminService,
    req: Request<GetEntryRequest>,
) -> Result<Response<Entry>, Status> {
    let id = req.into_inner().id;
    svc.state
        .store
        .get_entry(&id)
        .await
        .map_err(store_status)?
        .map(Response::new)
        .ok_or_else(|| Status::not_found(format!("entry {id} does not exist")))
}

pub(super) async fn update_entry(
    svc: &AdminService,
    req: Request<UpdateEntryRequest>,
) -> Result<Response<UpdateEntryResponse>, Status> {
    let st = &svc.state;
    let r = req.into_inner();
    let new = r
        .entry
        .ok_or_else(|| Status::invalid_argument("entry is required"))?;
    let before = st
        .store
        .get_entry(&new.id)
        .await
        .map_err(store_status)?
        .ok_or_else(|| Status::not_found(format!("entry {} does not exist", new.id)))?;
    let mut after = validate_entry(st, new)?;
    refuse_shared_hint(svc, &after).await?;
    after.created_at = before.created_at;
    after.revision = before.revision + 1;
    if !r.dry_run {
        st.store
            .update_entry(&after, before.revision)
            .await
            .map_err(store_status)?;
        svc.audit(
            Event::new("entry_updated")
                .with("before", entry_summary(&before))
                .with("after", entry_summary(&after)),
        )
        .await?;
        st.notify_change();
    }
    Ok(Response::new(UpdateEntryResponse {
        before: Some(before),
        after: Some(after),
        dry_run: r.dry_run,
    }))
}

pub(super) async fn delete_entries(
    svc: &AdminService,
    req: Request<DeleteEntriesRequest>,
) -> Result<Response<DeleteEntriesResponse>, Status> {
    let st = &svc.state;
    let planned = crate::safe_ops::is_planned(&req);
    let r = req.into_inner();
    crate::safe_ops::refuse_unplanned(st, planned, r.dry_run)?;
    let filter = entry_filter(r.filter);
    let entries = if !r.ids.is_empty() {
        if !filter.is_empty() || r.all {
            return Err(Status::invalid_argument(
                "give entry ids, or a filter, not both",
            ));
        }
        let found = st.store.get_entries(&r.ids).await.map_err(store_status)?;
        if let Some(missing) = r.ids.iter().find(|id| !found.iter().any(|e| &&e.id == id)) {
            return Err(Status::not_found(format!(
                "entry {missing} does not exist; nothing deleted"
            )));
        }
        found
    } else {
        if filter.is_empty() && !r.all {
            return Err(Status::invalid_argument(
                "refusing to delete every entry: give ids or a filter, or --all to mean it",
            ));
        }
        st.store.list_entries(&filter).await.map_err(store_status)?
    };
    if !r.dry_run && !entries.is_empty() {
        let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
        st.store.delete_entries(&ids).await.map_err(store_status)?;
        st.audit
            .record(
                entries
                    .iter()
                    .map(|e| Event::new("entry_deleted").with("entry", entry_summary(e)))
                    .collect(),
            )
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        // The sync view re-reads the store and sets the gauges.
        st.notify_change();
    }
    Ok(Response::new(DeleteEntriesResponse {
        entries,
        dry_run: r.dry_run,
    }))
}

/// Workload API §5.2.1 and §6.2.1: the hints of the SVIDs in one
/// response must be unique. Refuses `e` when another entry under the same
/// parent carries the same hint and a caller matching one of the two
/// necessarily matches the other (its selectors are a subset of the
/// other's), since that caller would receive both.
pub(super) async fn refuse_shared_hint(svc: &AdminService, e: &Entry) -> Result<(), Status> {
    if e.hint.is_empty() {
        return Ok(());
    }
    let siblings = svc
        .state
        .store
        .list_entries(&EntryFilter {
            parent_id: Some(e.parent_id.clone()),
            ..EntryFilter::default()
        })
        .await
        .map_err(store_status)?;
    let set = |x: &Entry| {
        x.selectors
            .iter()
            .map(|s| (s.r#type.clone(), s.value.clone()))
            .collect::<std::collections::BTreeSet<_>>()
    };
    let mine = set(e);
    if let Some(o) = siblings.iter().find(|o| {
        o.id != e.id && o.hint == e.hint && {
            let theirs = set(o);
            mine.is_subset(&theirs) || theirs.is_subset(&mine)
        }
    }) {
        return Err(Status::invalid_argument(format!(
            "hint {:?} is already used by entry {} ({}) under the same parent, and a \
             workload matching one of the two entries matches both: hints must be unique \
             among the SVIDs one workload receives (Workload API §5.2.1, §6.2.1); choose \
             another hint",
            e.hint, o.id, o.spiffe_id
        )));
    }
    Ok(())
}

/// The admin API's filter as the store's: empty strings mean "any".
pub(super) fn entry_filter(f: Option<meshid_proto::admin::EntryFilter>) -> EntryFilter {
    let f = f.unwrap_or_default();
    let some = |s: String| (!s.is_empty()).then_some(s);
    EntryFilter {
        parent_id: some(f.parent_id),
        spiffe_id: some(f.spiffe_id),
        selectors: f.selectors,
    }
}

pub(super) fn entry_summary(e: &Entry) -> serde_json::Value {
    serde_json::json!({
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "parent_id": e.parent_id,
        "selectors": e.selectors.iter().map(|s| format!("{}:{}", s.r#type, s.value)).collect::<Vec<_>>(),
    })
}

/// Checks an entry before it is stored; returns it normalized.
pub(super) fn validate_entry(st: &ServerState, mut e: Entry) -> Result<Entry, Status> {
    let td = st.td_id();
    let id = meshid_identity::spiffe_id::workload_id(&e.spiffe_id)
        .map_err(|err| Status::invalid_argument(format!("invalid --spiffe-id: {err}")))?;
    if id.trust_domain().id_string() != td {
        return Err(Status::invalid_argument(format!(
            "SPIFFE ID {} is not in this server's trust domain {td}",
            e.spiffe_id
        )));
    }
    if id.path().starts_with(RESERVED_PATH) {
        return Err(Status::invalid_argument(format!(
            "SPIFFE IDs under {td}{RESERVED_PATH} are reserved for meshid itself"
        )));
    }
    meshid_identity::spiffe_id::workload_id(&e.parent_id)
        .map_err(|err| Status::invalid_argument(format!("invalid --parent-id: {err}")))?;
    if e.selectors.is_empty() {
        return Err(Status::invalid_argument(
            "an entry needs at least one selector (type:key:value)",
        ));
    }
    for s in &e.selectors {
        if s.r#type.is_empty() || s.value.is_empty() || s.r#type.contains(':') {
            return Err(Status::invalid_argument(format!(
                "invalid selector {:?}:{:?}; expected type:value such as unix:uid:1000",
                s.r#type, s.value
            )));
        }
    }
    let max = i64::try_from(st.config.max_svid_ttl.as_secs()).unwrap_or(i64::MAX);
    for (name, ttl) in [("x509 TTL", e.x509_svid_ttl), ("JWT TTL", e.jwt_svid_ttl)] {
        if ttl < 0 || ttl > max {
            return Err(Status::invalid_argument(format!(
                "{name} {ttl}s is outside 0..={max}s (max_svid_ttl)"
            )));
        }
    }
    for d in &e.dns_names {
        rustls_pki_types::DnsName::try_from(d.as_str())
            .map_err(|_| Status::invalid_argument(format!("invalid DNS name {d:?}")))?;
    }
    e.federates_with = e
        .federates_with
        .iter()
        .map(|t| normalize_td(t).map(meshid_identity::spiffe_id::trust_domain_id))
        .collect::<Result<_, _>>()?;
    if e.hint.len() > 256 {
        return Err(Status::invalid_argument("hint is longer than 256 bytes"));
    }
    Ok(e)
}
