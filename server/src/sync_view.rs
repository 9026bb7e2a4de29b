//! What every sync stream serves, read from the store once per change for
//! all of them.
//!
//! A change (through this server, or through another server sharing the
//! database) wakes one refresher, which reads the entries, agents and bundles
//! once and publishes them as an immutable [`View`]. Each sync stream then
//! picks its agent's entries out of the view in memory and sends only if they
//! differ from what it sent last, so a change costs one read of the store
//! per server, not one per connected agent, and reaches only the agents it
//! concerns. Changes that arrive while a read is running are coalesced into
//! the next read. When the store cannot be read the last good view stays
//! served (streams are kept; the refresher retries), as the node API's
//! `/readyz` already reports the store's health.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use meshid_identity::svid::unix;
use meshid_proto::node::SyncResponse;
use meshid_proto::types::{Bundle, Entry};
use tokio::sync::watch;

use crate::state::{AgentAuthError, ServerState};
use crate::store::{AgentRecord, EntryFilter, StoreError};

/// Wait between attempts to read the store after a failed read.
const RETRY: Duration = Duration::from_millis(500);

/// One consistent read of what agents are sent.
#[derive(Debug, Default)]
pub struct View {
    /// Every entry, in creation order.
    entries: Vec<Entry>,
    /// Indexes into `entries` by parent ID.
    by_parent: HashMap<String, Vec<usize>>,
    /// Every agent by SPIFFE ID.
    agents: HashMap<String, AgentRecord>,
    /// The own bundle as stored (expired authorities are left out when sent).
    own_bundle: Option<Bundle>,
    /// Federated bundles by trust domain name.
    federated: HashMap<String, Bundle>,
}

impl View {
    /// Reads the store.
    async fn read(st: &ServerState) -> Result<Self, StoreError> {
        let entries = st.store.list_entries(&EntryFilter::default()).await?;
        let mut by_parent: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            by_parent.entry(e.parent_id.clone()).or_default().push(i);
        }
        let agents = st
            .store
            .list_agents()
            .await?
            .into_iter()
            .map(|a| (a.spiffe_id.clone(), a))
            .collect();
        let own_bundle = st.store.get_bundle(&st.config.trust_domain).await?;
        let federated = st
            .store
            .list_federated_bundles()
            .await?
            .into_iter()
            .map(|b| (b.trust_domain.clone(), b))
            .collect();
        Ok(Self {
            entries,
            by_parent,
            agents,
            own_bundle,
            federated,
        })
    }

    /// The agent as of this view, if it still may sync: known, not banned,
    /// and `serial` its current or previous SVID.
    pub fn agent(&self, spiffe_id: &str, serial: &str) -> Result<AgentRecord, AgentAuthError> {
        crate::state::admit_agent(spiffe_id, serial, self.agents.get(spiffe_id).cloned())
    }

    /// Entries parented by any of `parents`, in creation order.
    pub fn entries_for(&self, parents: &[String]) -> Vec<Entry> {
        let mut idx: Vec<usize> = parents
            .iter()
            .filter_map(|p| self.by_parent.get(p))
            .flatten()
            .copied()
            .collect();
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter().map(|i| self.entries[i].clone()).collect()
    }

    /// The sync message for an agent (`trust_check`: set for a canary of a
    /// staged trust change).
    pub fn message_for(
        &self,
        agent: &AgentRecord,
        tainted: Vec<String>,
        trust_check: Option<meshid_proto::node::TrustCheckRequest>,
        now: SystemTime,
    ) -> Result<SyncResponse, StoreError> {
        let entries = self.entries_for(&agent.parent_ids());
        let mut wanted: Vec<&str> = entries
            .iter()
            .flat_map(|e| e.federates_with.iter())
            .map(|td| meshid_identity::spiffe_id::strip_scheme(td))
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let federated_bundles = wanted
            .into_iter()
            .filter_map(|td| self.federated.get(td).cloned())
            .collect();
        let bundle = self
            .own_bundle
            .clone()
            .map(|b| servable_bundle(b, now))
            .ok_or_else(|| StoreError::NotFound("own bundle not yet published".into()))?;
        Ok(SyncResponse {
            entries,
            bundle: Some(bundle),
            federated_bundles,
            tainted_authorities: tainted,
            trust_check,
        })
    }
}

/// The own bundle without anything that has expired at `now`: never served,
/// whatever the CA loop's timing.
pub fn servable_bundle(mut b: Bundle, now: SystemTime) -> Bundle {
    let (roots, dropped) = meshid_identity::chain::prune_roots(&b.x509_authorities, now);
    if !dropped.is_empty() {
        tracing::debug!(?dropped, "expired CA left out of the served bundle");
        b.x509_authorities = roots;
    }
    let t = unix(now);
    b.jwt_authorities
        .retain(|k| k.expires_at == 0 || k.expires_at > t);
    b
}

/// The current view and a signal that a newer one is published.
#[derive(Debug)]
pub struct SyncView {
    current: ArcSwapOption<View>,
    published: watch::Sender<u64>,
}

impl Default for SyncView {
    fn default() -> Self {
        Self {
            current: ArcSwapOption::empty(),
            published: watch::channel(0).0,
        }
    }
}

impl SyncView {
    /// The latest view, if one was read yet.
    pub fn current(&self) -> Option<Arc<View>> {
        self.current.load_full()
    }

    /// Wakes when a newer view is published.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.published.subscribe()
    }

    /// Reads the store once and publishes the result.
    pub async fn refresh(&self, st: &ServerState) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let view = View::read(st).await?;
        let entries = view.entries.len();
        st.metrics
            .entries
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
        st.metrics
            .agents
            .set(i64::try_from(view.agents.len()).unwrap_or(i64::MAX));
        self.current.store(Some(Arc::new(view)));
        self.published.send_modify(|g| *g += 1);
        tracing::debug!(entries, took = ?started.elapsed(), "sync view refreshed");
        Ok(())
    }
}

/// Keeps `st.sync_view` current: a read at start, then one per burst of
/// changes (`st.changes`), retried while the store cannot be read. Ends when
/// the state is dropped.
pub fn spawn_refresher(st: &Arc<ServerState>) {
    let weak = Arc::downgrade(st);
    let mut changes = st.changes.subscribe();
    tokio::spawn(async move {
        loop {
            changes.borrow_and_update();
            let Some(st) = weak.upgrade() else { break };
            if let Err(e) = st.sync_view.refresh(&st).await {
                tracing::warn!(error = %e, "cannot read the store for the sync streams; serving the last view");
                drop(st);
                tokio::time::sleep(RETRY).await;
                continue;
            }
            drop(st);
            if changes.changed().await.is_err() {
                break;
            }
        }
    });
}
