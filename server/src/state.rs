//! The running server's shared state and the operations both APIs use.

use std::sync::Arc;
use std::time::SystemTime;

use meshid_proto::types::{Bundle, Entry, X509Svid};
use tokio::sync::watch;

use crate::audit::{AuditLog, Event};
use crate::ca::{CaManager, IssuedSvid};
use crate::config::ServerConfig;
use crate::metrics::Metrics;
use crate::store::{AgentRecord, Store, StoreError};
use meshid_identity::svid::unix;

/// Shared by the node API, the admin API and background tasks.
pub struct ServerState {
    /// Configuration in effect.
    pub config: ServerConfig,
    /// The signing authorities (X.509 CA and JWT key) and their rotation.
    pub ca: Arc<CaManager>,
    /// Ids of tainted authorities, as last published (sent on every sync).
    pub tainted: arc_swap::ArcSwap<Vec<String>>,
    /// Staged trust changes (canary agents first).
    pub rollouts: crate::safe_ops::rollout::Rollouts,
    /// Wakes the CA loop after a manual transition.
    pub ca_changed: tokio::sync::Notify,
    /// The CA schedule's next transition (Unix seconds, what), for `ca show`.
    pub next_transition: arc_swap::ArcSwap<Option<(i64, String)>>,
    /// Persistent state.
    pub store: Arc<dyn Store>,
    /// Audit log.
    pub audit: AuditLog,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Group-commit writer for the issuance journal and its audit events.
    pub journal: crate::journal::Journal,
    /// The threads that verify CSRs and sign, one per core.
    pub signing: crate::signing_pool::SigningPool,
    /// Bumped on every change that agents must see (entries, bundles, agents).
    pub changes: watch::Sender<u64>,
    /// What the sync streams serve, read once per change for all of them.
    pub sync_view: crate::sync_view::SyncView,
    /// Addresses actually bound, for the Health RPC.
    pub node_address: std::sync::OnceLock<String>,
    /// Metrics address actually bound.
    pub metrics_address: std::sync::OnceLock<String>,
}

impl std::fmt::Debug for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerState").finish_non_exhaustive()
    }
}

pub use meshid_identity::spiffe_id::RESERVED_PATH;

/// Converts a signed SVID to the wire type.
pub fn svid_to_proto(s: &IssuedSvid) -> X509Svid {
    X509Svid {
        spiffe_id: s.spiffe_id.clone(),
        cert_chain: s.chain.clone(),
        expires_at: unix(s.not_after),
        serial: s.serial.clone(),
    }
}

impl ServerState {
    /// The state over an open store, audit log and started CA manager; starts
    /// the issuance journal's writer task.
    pub fn new(
        config: ServerConfig,
        ca: Arc<CaManager>,
        store: Arc<dyn Store>,
        audit: AuditLog,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let (changes, _) = watch::channel(0u64);
        Arc::new(Self {
            journal: crate::journal::Journal::start(store.clone(), audit.clone()),
            signing: crate::signing_pool::SigningPool::per_core(),
            config,
            ca,
            tainted: Default::default(),
            rollouts: Default::default(),
            ca_changed: Default::default(),
            next_transition: Default::default(),
            store,
            audit,
            metrics,
            changes,
            sync_view: Default::default(),
            node_address: Default::default(),
            metrics_address: Default::default(),
        })
    }

    /// `spiffe://<td>`.
    pub fn td_id(&self) -> String {
        self.config.trust_domain_id()
    }

    /// The server's own SPIFFE ID.
    pub fn server_id(&self) -> String {
        meshid_identity::spiffe_id::server_id(&self.config.trust_domain)
    }

    /// Signals agents that something changed.
    pub fn notify_change(&self) {
        self.changes.send_modify(|v| *v += 1);
    }

    /// The trust domain's own bundle, as last published, without anything
    /// that has expired since (never served, whatever the CA loop's timing).
    pub async fn own_bundle(&self) -> Result<Bundle, StoreError> {
        let b = self
            .store
            .get_bundle(&self.config.trust_domain)
            .await?
            .ok_or_else(|| StoreError::NotFound("own bundle not yet published".into()))?;
        Ok(crate::sync_view::servable_bundle(b, SystemTime::now()))
    }

    /// Builds the own bundle from the CA journal through the chain gate, and
    /// publishes it if it changed (bumping its sequence number). A bundle the
    /// gate refuses is never published: the last good one stays, and the
    /// refusal is logged and counted.
    pub async fn publish_own_bundle(&self) -> anyhow::Result<Bundle> {
        let now = SystemTime::now();
        let material = match self.ca.bundle_material(now).await {
            Ok(m) => m,
            Err(e) => {
                self.metrics.bundle_refused.inc();
                tracing::error!(error = %e, "bundle refused by the chain gate; the last good bundle stays published");
                return Err(e.into());
            }
        };
        for p in &material.x509.pruned {
            tracing::debug!(pruned = %p, "left out of the bundle");
        }
        if **self.tainted.load() != material.tainted {
            // Agents learn of a taint on their sync stream, even when the
            // bundle itself did not change.
            self.tainted.store(Arc::new(material.tainted.clone()));
            self.notify_change();
        }
        let stored = self.store.get_bundle(&self.config.trust_domain).await?;
        let seq = stored.as_ref().map_or(0, |b| b.sequence_number);
        let next = Bundle {
            trust_domain: self.config.trust_domain.clone(),
            x509_authorities: material.x509.roots,
            jwt_authorities: material.jwt,
            sequence_number: seq + 1,
            refresh_hint: i64::try_from(self.config.max_svid_ttl.as_secs() / 10)
                .unwrap_or(300)
                .clamp(1, 300),
        };
        if let Some(old) = stored
            && old.x509_authorities == next.x509_authorities
            && old.jwt_authorities == next.jwt_authorities
        {
            return Ok(old);
        }
        self.store.put_bundle(&next, false).await?;
        self.audit
            .record(vec![
                Event::new("bundle_published")
                    .with("trust_domain", next.trust_domain.clone())
                    .with("sequence_number", next.sequence_number)
                    .with("x509_authorities", next.x509_authorities.len())
                    .with("jwt_authorities", next.jwt_authorities.len()),
            ])
            .await?;
        tracing::info!(
            sequence_number = next.sequence_number,
            x509_authorities = next.x509_authorities.len(),
            jwt_authorities = next.jwt_authorities.len(),
            "bundle published"
        );
        self.notify_change();
        Ok(next)
    }

    /// Bundles of the trust domains the entries federate with.
    pub async fn federated_bundles_for(
        &self,
        entries: &[Entry],
    ) -> Result<Vec<Bundle>, StoreError> {
        let mut wanted: Vec<String> = entries
            .iter()
            .flat_map(|e| e.federates_with.iter())
            .map(|td| meshid_identity::spiffe_id::strip_scheme(td).to_string())
            .collect();
        wanted.sort();
        wanted.dedup();
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self
            .store
            .list_federated_bundles()
            .await?
            .into_iter()
            .filter(|b| wanted.contains(&b.trust_domain))
            .collect())
    }

    /// Refreshes the entry and agent gauges.
    pub async fn refresh_gauges(&self) {
        if let Ok(n) = self.store.count_entries().await {
            self.metrics.entries.set(n);
        }
        if let Ok(a) = self.store.list_agents().await {
            self.metrics
                .agents
                .set(i64::try_from(a.len()).unwrap_or(i64::MAX));
        }
    }

    /// Looks up the agent behind a verified client certificate. Refuses
    /// unknown (never attested or evicted) and banned agents, and SVIDs the
    /// agent has since replaced.
    pub async fn authenticate_agent(&self, leaf_der: &[u8]) -> Result<AgentRecord, AgentAuthError> {
        let info = meshid_identity::SvidInfo::from_der(leaf_der)
            .map_err(|e| AgentAuthError::BadCertificate(e.to_string()))?;
        let id = info.spiffe_id.to_string();
        let agent = self.store.get_agent(&id).await?;
        admit_agent(&id, &info.serial, agent)
    }
}

/// Whether an agent as stored may call with an SVID of this serial: it must
/// exist, not be banned, and the serial be its current or previous one.
pub fn admit_agent(
    id: &str,
    serial: &str,
    stored: Option<AgentRecord>,
) -> Result<AgentRecord, AgentAuthError> {
    let agent = stored.ok_or_else(|| AgentAuthError::Unknown(id.to_string()))?;
    if agent.banned {
        return Err(AgentAuthError::Banned(id.to_string()));
    }
    if serial != agent.serial && serial != agent.prev_serial {
        return Err(AgentAuthError::Superseded {
            agent: id.to_string(),
            serial: serial.to_string(),
        });
    }
    Ok(agent)
}

/// Why a client certificate does not authenticate an agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentAuthError {
    /// The certificate is not a readable SVID.
    #[error("client certificate: {0}")]
    BadCertificate(String),
    /// No such agent: never attested, or evicted.
    #[error("unknown agent {0}: never attested, or evicted")]
    Unknown(String),
    /// The agent is banned.
    #[error("agent {0} is banned")]
    Banned(String),
    /// The agent has renewed since this SVID was issued.
    #[error("agent {agent} presented SVID serial {serial} which has been superseded")]
    Superseded {
        /// The agent's SPIFFE ID.
        agent: String,
        /// The presented serial.
        serial: String,
    },
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
}
