//! The admin API, served on a local Unix socket (0600) to callers with the
//! server's own uid or root. Every change is audited; destructive and bulk
//! calls honour `dry_run` and report exactly what they would change.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshid_proto::admin::admin_server::Admin;
use meshid_proto::admin::{
    Agent, AgentActionRequest, AgentActionResponse, CreateEntryRequest, CreateJoinTokenRequest,
    DeleteEntriesRequest, DeleteEntriesResponse, DeleteFederatedBundleRequest,
    DeleteFederatedBundleResponse, GetBundleRequest, GetEntryRequest, HealthRequest,
    HealthResponse, JoinToken, ListAgentsRequest, ListAgentsResponse, ListEntriesRequest,
    ListEntriesResponse, ListFederatedBundlesRequest, ListFederatedBundlesResponse,
    SetFederatedBundleRequest, UpdateEntryRequest, UpdateEntryResponse,
};
use meshid_proto::admin::{
    AuthorityActionRequest, AuthorityActionResponse, ImportAuthorityRequest,
    ListAuthoritiesRequest, ListAuthoritiesResponse,
};
use meshid_proto::types::{Bundle, Entry};
use tonic::{Request, Response, Status};

use super::admin_ca;
use crate::attest::join_token;
use crate::audit::Event;
use crate::state::{RESERVED_PATH, ServerState};
use crate::store::{AgentRecord, EntryFilter, StoreError};
use meshid_identity::svid::unix;

/// The admin API service.
#[derive(Debug, Clone)]
pub struct AdminService {
    state: Arc<ServerState>,
}

impl AdminService {
    /// A service over the shared state.
    pub fn new(state: Arc<ServerState>) -> Self {
        Self { state }
    }

    async fn audit(&self, ev: Event) -> Result<(), Status> {
        self.state
            .audit
            .record(vec![ev])
            .await
            .map_err(|e| Status::internal(e.to_string()))
    }
}

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::NotFound(m) => Status::not_found(m),
        StoreError::AlreadyExists(m) => Status::already_exists(m),
        StoreError::Conflict(m) => Status::aborted(m),
        other => Status::from(other),
    }
}

/// The admin API's filter as the store's: empty strings mean "any".
fn entry_filter(f: Option<meshid_proto::admin::EntryFilter>) -> EntryFilter {
    let f = f.unwrap_or_default();
    let some = |s: String| (!s.is_empty()).then_some(s);
    EntryFilter {
        parent_id: some(f.parent_id),
        spiffe_id: some(f.spiffe_id),
        selectors: f.selectors,
    }
}

fn entry_summary(e: &Entry) -> serde_json::Value {
    serde_json::json!({
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "parent_id": e.parent_id,
        "selectors": e.selectors.iter().map(|s| format!("{}:{}", s.r#type, s.value)).collect::<Vec<_>>(),
    })
}

fn agent_to_proto(a: &AgentRecord) -> Agent {
    Agent {
        spiffe_id: a.spiffe_id.clone(),
        attestor: a.attestor.clone(),
        serial: a.serial.clone(),
        expires_at: a.expires_at,
        banned: a.banned,
        aliases: a.aliases.clone(),
        attested_at: a.attested_at,
    }
}

/// A trust domain given as `td` or `spiffe://td`, as its name. It must be
/// in canonical form already (lowercase, no path): refused, not normalised.
pub fn normalize_td(td: &str) -> Result<String, Status> {
    meshid_identity::spiffe_id::trust_domain(td)
        .map(|t| t.to_string())
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

/// Checks an entry before it is stored; returns it normalized.
fn validate_entry(st: &ServerState, mut e: Entry) -> Result<Entry, Status> {
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

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_authorities(
        &self,
        req: Request<ListAuthoritiesRequest>,
    ) -> Result<Response<ListAuthoritiesResponse>, Status> {
        admin_ca::list(&self.state, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn prepare_authority(
        &self,
        req: Request<AuthorityActionRequest>,
    ) -> Result<Response<AuthorityActionResponse>, Status> {
        admin_ca::prepare(&self.state, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn activate_authority(
        &self,
        req: Request<AuthorityActionRequest>,
    ) -> Result<Response<AuthorityActionResponse>, Status> {
        admin_ca::activate(&self.state, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn retire_authority(
        &self,
        req: Request<AuthorityActionRequest>,
    ) -> Result<Response<AuthorityActionResponse>, Status> {
        admin_ca::retire(&self.state, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn taint_authority(
        &self,
        req: Request<AuthorityActionRequest>,
    ) -> Result<Response<AuthorityActionResponse>, Status> {
        admin_ca::taint(&self.state, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn revoke_authority(
        &self,
        req: Request<AuthorityActionRequest>,
    ) -> Result<Response<AuthorityActionResponse>, Status> {
        admin_ca::revoke(&self.state, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn import_authority(
        &self,
        req: Request<ImportAuthorityRequest>,
    ) -> Result<Response<AuthorityActionResponse>, Status> {
        admin_ca::import(&self.state, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn health(
        &self,
        _req: Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        let st = &self.state;
        let ready = st.ca.readiness(SystemTime::now()).await;
        if !ready.fatal.is_empty() {
            return Err(Status::unavailable(ready.fatal.join("; ")));
        }
        let entries = st.store.count_entries().await.map_err(store_status)?;
        let agents = st.store.list_agents().await.map_err(store_status)?.len();
        Ok(Response::new(HealthResponse {
            next_ca_not_after: st.metrics.ca_next_not_after.get(),
            warnings: ready.warnings,
            trust_domain: st.config.trust_domain.clone(),
            ca_not_after: unix(st.ca.signer().not_after()),
            entries,
            agents: i64::try_from(agents).unwrap_or(i64::MAX),
            node_address: st.node_address.get().cloned().unwrap_or_default(),
            metrics_address: st.metrics_address.get().cloned().unwrap_or_default(),
        }))
    }

    async fn create_join_token(
        &self,
        req: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<JoinToken>, Status> {
        let r = req.into_inner();
        let st = &self.state;
        if !r.spiffe_id.is_empty() {
            let id = meshid_identity::spiffe_id::workload_id(&r.spiffe_id)
                .map_err(|e| Status::invalid_argument(format!("invalid --spiffe-id: {e}")))?;
            if id.trust_domain().id_string() != st.td_id() {
                return Err(Status::invalid_argument(
                    "alias SPIFFE ID must be in this trust domain",
                ));
            }
        }
        let ttl = match u64::try_from(r.ttl) {
            Ok(0) => st.config.join_token_ttl,
            Ok(s) => Duration::from_secs(s),
            Err(_) => return Err(Status::invalid_argument("ttl must not be negative")),
        };
        let (token, rec) = join_token::create(st, ttl, &r.spiffe_id)
            .await
            .map_err(store_status)?;
        self.audit(
            Event::new("join_token_created")
                .with("token_id", rec.token_id.clone())
                .with("alias", rec.alias_id.clone())
                .with("expires_at", rec.expires_at),
        )
        .await?;
        Ok(Response::new(JoinToken {
            token,
            expires_at: rec.expires_at,
            spiffe_id: rec.alias_id,
        }))
    }

    async fn create_entry(
        &self,
        req: Request<CreateEntryRequest>,
    ) -> Result<Response<Entry>, Status> {
        let st = &self.state;
        let e = req
            .into_inner()
            .entry
            .ok_or_else(|| Status::invalid_argument("entry is required"))?;
        let mut e = validate_entry(st, e)?;
        e.id = uuid::Uuid::new_v4().to_string();
        self.refuse_shared_hint(&e).await?;
        e.revision = 1;
        e.created_at = unix(SystemTime::now());
        st.store.create_entry(&e).await.map_err(store_status)?;
        self.audit(Event::new("entry_created").with("entry", entry_summary(&e)))
            .await?;
        st.refresh_gauges().await;
        st.notify_change();
        Ok(Response::new(e))
    }

    async fn list_entries(
        &self,
        req: Request<ListEntriesRequest>,
    ) -> Result<Response<ListEntriesResponse>, Status> {
        let filter = entry_filter(req.into_inner().filter);
        let entries = self
            .state
            .store
            .list_entries(&filter)
            .await
            .map_err(store_status)?;
        Ok(Response::new(ListEntriesResponse { entries }))
    }

    async fn get_entry(&self, req: Request<GetEntryRequest>) -> Result<Response<Entry>, Status> {
        let id = req.into_inner().id;
        self.state
            .store
            .get_entry(&id)
            .await
            .map_err(store_status)?
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("entry {id} does not exist")))
    }

    async fn update_entry(
        &self,
        req: Request<UpdateEntryRequest>,
    ) -> Result<Response<UpdateEntryResponse>, Status> {
        let st = &self.state;
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
        self.refuse_shared_hint(&after).await?;
        after.created_at = before.created_at;
        after.revision = before.revision + 1;
        if !r.dry_run {
            st.store
                .update_entry(&after, before.revision)
                .await
                .map_err(store_status)?;
            self.audit(
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

    async fn delete_entries(
        &self,
        req: Request<DeleteEntriesRequest>,
    ) -> Result<Response<DeleteEntriesResponse>, Status> {
        let st = &self.state;
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
            st.refresh_gauges().await;
            st.notify_change();
        }
        Ok(Response::new(DeleteEntriesResponse {
            entries,
            dry_run: r.dry_run,
        }))
    }

    async fn get_bundle(
        &self,
        _req: Request<GetBundleRequest>,
    ) -> Result<Response<Bundle>, Status> {
        let st = &self.state;
        Ok(Response::new(st.own_bundle().await.map_err(store_status)?))
    }

    async fn list_federated_bundles(
        &self,
        _req: Request<ListFederatedBundlesRequest>,
    ) -> Result<Response<ListFederatedBundlesResponse>, Status> {
        let bundles = self
            .state
            .store
            .list_federated_bundles()
            .await
            .map_err(store_status)?;
        Ok(Response::new(ListFederatedBundlesResponse { bundles }))
    }

    async fn set_federated_bundle(
        &self,
        req: Request<SetFederatedBundleRequest>,
    ) -> Result<Response<Bundle>, Status> {
        let st = &self.state;
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
        self.audit(
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

    async fn delete_federated_bundle(
        &self,
        req: Request<DeleteFederatedBundleRequest>,
    ) -> Result<Response<DeleteFederatedBundleResponse>, Status> {
        let st = &self.state;
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
            self.audit(
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

    async fn list_agents(
        &self,
        _req: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        let agents = self.state.store.list_agents().await.map_err(store_status)?;
        Ok(Response::new(ListAgentsResponse {
            agents: agents.iter().map(agent_to_proto).collect(),
        }))
    }

    async fn ban_agent(
        &self,
        req: Request<AgentActionRequest>,
    ) -> Result<Response<AgentActionResponse>, Status> {
        let planned = crate::safe_ops::is_planned(&req);
        self.agent_action(req.into_inner(), true, planned).await
    }

    async fn evict_agent(
        &self,
        req: Request<AgentActionRequest>,
    ) -> Result<Response<AgentActionResponse>, Status> {
        let planned = crate::safe_ops::is_planned(&req);
        self.agent_action(req.into_inner(), false, planned).await
    }
}

impl AdminService {
    /// Workload API §5.2.1 and §6.2.1: the hints of the SVIDs in one
    /// response must be unique. Refuses `e` when another entry under the same
    /// parent carries the same hint and a caller matching one of the two
    /// necessarily matches the other (its selectors are a subset of the
    /// other's), since that caller would receive both.
    async fn refuse_shared_hint(&self, e: &Entry) -> Result<(), Status> {
        if e.hint.is_empty() {
            return Ok(());
        }
        let siblings = self
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
                "hint {:?} is already used by entry {} ({}) under the same parent, and a                  workload matching one of the two entries matches both: hints must be unique                  among the SVIDs one workload receives (Workload API §5.2.1, §6.2.1); choose                  another hint",
                e.hint, o.id, o.spiffe_id
            )));
        }
        Ok(())
    }

    async fn agent_action(
        &self,
        r: AgentActionRequest,
        ban: bool,
        planned: bool,
    ) -> Result<Response<AgentActionResponse>, Status> {
        let st = &self.state;
        crate::safe_ops::refuse_unplanned(st, planned, r.dry_run)?;
        let mut agent = st
            .store
            .get_agent(&r.spiffe_id)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("agent {} does not exist", r.spiffe_id)))?;
        let affected = st
            .store
            .list_entries_by_parents(&agent.parent_ids())
            .await
            .map_err(store_status)?
            .into_iter()
            .map(|e| e.id)
            .collect::<Vec<_>>();
        if !r.dry_run {
            if ban {
                // Sets the flag alone: a renewal racing the ban neither
                // undoes it nor is undone by it.
                agent = st
                    .store
                    .ban_agent(&agent.spiffe_id)
                    .await
                    .map_err(store_status)?;
            } else {
                st.store
                    .delete_agent(&agent.spiffe_id)
                    .await
                    .map_err(store_status)?;
            }
            self.audit(
                Event::new(if ban { "agent_banned" } else { "agent_evicted" })
                    .with("agent", agent.spiffe_id.clone())
                    .with("affected_entries", affected.clone()),
            )
            .await?;
            st.refresh_gauges().await;
            st.notify_change();
        }
        Ok(Response::new(AgentActionResponse {
            agent: Some(agent_to_proto(&agent)),
            affected_entry_ids: affected,
            dry_run: r.dry_run,
        }))
    }
}
