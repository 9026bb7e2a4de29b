//! The admin API, served on a local Unix socket (0600) to callers with the
//! server's own uid or root. Every change is audited; destructive and bulk
//! calls honour `dry_run` and report exactly what they would change.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshid_proto::admin::admin_server::Admin;
use meshid_proto::admin::{
    AgentActionRequest, AgentActionResponse, CreateEntryRequest, CreateJoinTokenRequest,
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

mod agents;
mod bundles;
mod entries;
use crate::attest::join_token;
use crate::audit::Event;
use crate::state::{RESERVED_PATH, ServerState};
use crate::store::{AgentRecord, StoreError};
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

/// A trust domain given as `td` or `spiffe://td`, as its name. It must be
/// in canonical form already (lowercase, no path): refused, not normalised.
pub fn normalize_td(td: &str) -> Result<String, Status> {
    meshid_identity::spiffe_id::trust_domain(td)
        .map(|t| t.to_string())
        .map_err(|e| Status::invalid_argument(e.to_string()))
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
        entries::create_entry(self, req).await
    }

    async fn list_entries(
        &self,
        req: Request<ListEntriesRequest>,
    ) -> Result<Response<ListEntriesResponse>, Status> {
        entries::list_entries(self, req).await
    }

    async fn get_entry(&self, req: Request<GetEntryRequest>) -> Result<Response<Entry>, Status> {
        entries::get_entry(self, req).await
    }

    async fn update_entry(
        &self,
        req: Request<UpdateEntryRequest>,
    ) -> Result<Response<UpdateEntryResponse>, Status> {
        entries::update_entry(self, req).await
    }

    async fn delete_entries(
        &self,
        req: Request<DeleteEntriesRequest>,
    ) -> Result<Response<DeleteEntriesResponse>, Status> {
        entries::delete_entries(self, req).await
    }

    async fn get_bundle(
        &self,
        _req: Request<GetBundleRequest>,
    ) -> Result<Response<Bundle>, Status> {
        bundles::get_bundle(self, _req).await
    }

    async fn list_federated_bundles(
        &self,
        _req: Request<ListFederatedBundlesRequest>,
    ) -> Result<Response<ListFederatedBundlesResponse>, Status> {
        bundles::list_federated_bundles(self, _req).await
    }

    async fn set_federated_bundle(
        &self,
        req: Request<SetFederatedBundleRequest>,
    ) -> Result<Response<Bundle>, Status> {
        bundles::set_federated_bundle(self, req).await
    }

    async fn delete_federated_bundle(
        &self,
        req: Request<DeleteFederatedBundleRequest>,
    ) -> Result<Response<DeleteFederatedBundleResponse>, Status> {
        bundles::delete_federated_bundle(self, req).await
    }

    async fn list_agents(
        &self,
        _req: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        agents::list_agents(self, _req).await
    }

    async fn ban_agent(
        &self,
        req: Request<AgentActionRequest>,
    ) -> Result<Response<AgentActionResponse>, Status> {
        agents::ban_agent(self, req).await
    }

    async fn evict_agent(
        &self,
        req: Request<AgentActionRequest>,
    ) -> Result<Response<AgentActionResponse>, Status> {
        agents::evict_agent(self, req).await
    }
}
