//! The running agent: node attestation at start, then three loops over the
//! node API ([`NodeApi`]): agent SVID renewal (`renewal.rs`), the sync
//! stream of entries and bundles (`sync.rs`), and minting/rotation of
//! workload SVIDs (`mint.rs`). Every wait is a `tokio::time` sleep and every
//! wall-clock reading comes from the agent's [`Clock`](crate::clock::Clock),
//! so the schedules are tested in paused time.

use std::sync::Arc;

use tokio::sync::{Notify, watch};

use crate::cache::Snapshot;
use crate::clock::SharedClock;
use crate::config::{AgentConfig, NodeAttestorConfig};
use crate::identity_store::{AgentIdentity, IdentityStore, create_data_dir, load_roots};
use crate::metrics::Metrics;
use crate::node_api::{ClientError, NodeApi, TonicNodeApi};

mod mint;
mod renewal;
mod sync;
#[cfg(test)]
mod tests;
mod trust_check;

pub use crate::node_api::backoff;

/// Shared agent state.
pub struct Agent {
    /// Configuration.
    pub config: AgentConfig,
    /// The servers' node API.
    pub node: Arc<dyn NodeApi>,
    /// Snapshot publisher.
    pub snapshot: watch::Sender<Arc<Snapshot>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Wall-clock time.
    pub clock: SharedClock,
    ids: IdentityStore,
    kick: Notify,
    /// The agent's current SVID (bundle updates must keep verifying it).
    identity: arc_swap::ArcSwap<AgentIdentity>,
    /// Wakes the agent SVID renewal (its authority was tainted).
    renew_kick: Notify,
    /// The staged trust change this agent last checked (once per rollout).
    trust_checked: std::sync::Mutex<String>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Agent")
    }
}

/// Attests the node with the configured attestor. A join token is tried
/// once (it is spent either way); a Kubernetes PSAT is presented again with
/// backoff while the server is unreachable, since a DaemonSet pod often starts
/// before the server does.
async fn attest_node(
    client: &TonicNodeApi,
    config: &AgentConfig,
    join_token: Option<String>,
) -> anyhow::Result<(AgentIdentity, meshid_proto::types::Bundle)> {
    match &config.node_attestor {
        NodeAttestorConfig::JoinToken => {
            let token = join_token
                .or_else(|| config.join_token.clone())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "no persisted agent SVID and no join token: pass --join-token, set \
                     MESHID_JOIN_TOKEN or set join_token"
                    )
                })?;
            client
                .attest("join_token", token.into_bytes())
                .await
                .map_err(|e| anyhow::anyhow!("node attestation failed: {e}"))
        }
        NodeAttestorConfig::K8sPsat {
            cluster,
            token_path,
        } => {
            let mut attempt = 0u32;
            loop {
                let token = std::fs::read_to_string(token_path).map_err(|e| {
                    anyhow::anyhow!(
                        "k8s_psat: cannot read the projected token {}: {e}",
                        token_path.display()
                    )
                })?;
                let payload = serde_json::to_vec(&serde_json::json!({
                    "cluster": cluster,
                    "token": token.trim(),
                }))?;
                match client.attest("k8s_psat", payload).await {
                    Ok(r) => return Ok(r),
                    Err(ClientError::Status(s)) if s.code() != tonic::Code::Unavailable => {
                        anyhow::bail!("node attestation failed: {s}")
                    }
                    Err(e) => {
                        let wait = backoff(attempt, config.max_backoff);
                        tracing::warn!(error = %e, retry_in = ?wait, "node attestation: server unavailable");
                        tokio::time::sleep(wait).await;
                        attempt = attempt.saturating_add(1);
                    }
                }
            }
        }
    }
}

impl Agent {
    /// Loads the persisted identity or attests the node.
    pub async fn start(
        config: AgentConfig,
        join_token: Option<String>,
    ) -> anyhow::Result<Arc<Self>> {
        let clock = crate::clock::system();
        create_data_dir(&config.data_dir)?;
        let ids = IdentityStore::new(&config.data_dir);
        let persisted = ids.load()?;
        let roots = match (&persisted, &config.trust_bundle_path) {
            (Some((_, roots)), _) if !roots.is_empty() => roots.clone(),
            (_, Some(p)) => load_roots(p)?,
            _ => anyhow::bail!(
                "no trust bundle: set trust_bundle_path (PEM from `meshid server bundle show`)"
            ),
        };
        let client = TonicNodeApi::new(
            config.server_address.to_vec(),
            &config.trust_domain,
            &roots,
            config.tls_key_exchange,
        )?;
        let psat = matches!(config.node_attestor, NodeAttestorConfig::K8sPsat { .. });
        let id = match persisted {
            Some((id, _)) if !(psat && id.info.not_after <= clock.now()) => {
                tracing::info!(spiffe_id = %id.info.spiffe_id, "resuming with persisted agent SVID; no attestation needed");
                id
            }
            _ => {
                let (id, bundle) = attest_node(&client, &config, join_token).await?;
                ids.save(&id, &bundle)?;
                tracing::info!(spiffe_id = %id.info.spiffe_id, "node attested");
                id
            }
        };
        Ok(Self::spawn(config, Arc::new(client), clock, ids, id)?)
    }

    /// An agent holding the identity `id`, talking to `node`, reading time
    /// from `clock`; its loops are spawned at once.
    pub(crate) fn spawn(
        config: AgentConfig,
        node: Arc<dyn NodeApi>,
        clock: SharedClock,
        ids: IdentityStore,
        id: AgentIdentity,
    ) -> Result<Arc<Self>, ClientError> {
        node.set_identity(&id)?;
        let metrics = Metrics::new();
        metrics
            .agent_not_after
            .set(meshid_identity::svid::unix(id.info.not_after));
        let snap = Snapshot {
            agent_not_after: Some(id.info.not_after),
            ..Snapshot::default()
        };
        let (snapshot, _) = watch::channel(Arc::new(snap));
        let agent = Arc::new(Self {
            config,
            node,
            snapshot,
            metrics,
            clock,
            ids,
            kick: Notify::new(),
            identity: arc_swap::ArcSwap::from_pointee(id.clone()),
            renew_kick: Notify::new(),
            trust_checked: Default::default(),
        });
        tokio::spawn(agent.clone().renew_agent_loop(id));
        tokio::spawn(agent.clone().sync_loop());
        tokio::spawn(agent.clone().mint_loop());
        Ok(agent)
    }

    fn publish(&self, f: impl FnOnce(&mut Snapshot)) {
        self.snapshot.send_modify(|s| {
            let mut next = (**s).clone();
            f(&mut next);
            *s = Arc::new(next);
        });
        let s = self.snapshot.borrow().clone();
        self.metrics
            .svids_cached
            .set(i64::try_from(s.svids.len()).unwrap_or(i64::MAX));
        self.metrics
            .next_rotation
            .set(s.seconds_to_next_renewal(self.clock.now()));
    }
}
