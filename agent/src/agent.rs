//! The running agent: node attestation, agent SVID renewal, the sync stream,
//! and minting/rotation of workload SVIDs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshid_proto::node::{RenewAgentRequest, SignX509SvidsRequest, SyncRequest, X509SvidParams};
use tokio::sync::{Notify, watch};

use crate::cache::{CachedSvid, Snapshot, renew_at};
use crate::config::{AgentConfig, NodeAttestorConfig};
use crate::metrics::Metrics;
use crate::server_client::{
    AgentIdentity, ClientError, IdentityStore, RetrySchedule, ServerClient, bound_by_expiry,
    is_server_failure, load_roots, new_key_and_csr,
};

/// Shared agent state.
pub struct Agent {
    /// Configuration.
    pub config: AgentConfig,
    /// Node API client.
    pub client: ServerClient,
    /// Snapshot publisher.
    pub snapshot: watch::Sender<Arc<Snapshot>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    ids: IdentityStore,
    kick: Notify,
    /// The agent's current SVID (bundle updates must keep verifying it).
    identity: arc_swap::ArcSwap<AgentIdentity>,
    /// Wakes the agent SVID renewal (its authority was tainted).
    renew_kick: Notify,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Agent")
    }
}

/// Exponential backoff with full jitter.
pub fn backoff(attempt: u32, max: Duration) -> Duration {
    let base = Duration::from_millis(200).saturating_mul(1u32 << attempt.min(16));
    base.min(max).mul_f64(0.5 + rand::random::<f64>() / 2.0)
}

/// Attests the node with the configured attestor. A join token is tried
/// once (it is spent either way); a Kubernetes PSAT is presented again with
/// backoff while the server is unreachable, since a DaemonSet pod often starts
/// before the server does.
async fn attest_node(
    client: &ServerClient,
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
        crate::server_client::create_data_dir(&config.data_dir)?;
        let ids = IdentityStore::new(&config.data_dir);
        let persisted = ids.load()?;
        let roots = match (&persisted, &config.trust_bundle_path) {
            (Some((_, roots)), _) if !roots.is_empty() => roots.clone(),
            (_, Some(p)) => load_roots(p)?,
            _ => anyhow::bail!(
                "no trust bundle: set trust_bundle_path (PEM from `meshid server bundle show`)"
            ),
        };
        let client = ServerClient::new(
            config.server_address.to_vec(),
            &config.trust_domain,
            &roots,
            config.tls_key_exchange,
        )?;
        let metrics = Metrics::new();
        let psat = matches!(config.node_attestor, NodeAttestorConfig::K8sPsat { .. });
        let id = match persisted {
            Some((id, _)) if !(psat && id.info.not_after <= SystemTime::now()) => {
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
        client.set_identity(&id)?;
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
            client,
            snapshot,
            metrics,
            ids,
            kick: Notify::new(),
            identity: arc_swap::ArcSwap::from_pointee(id.clone()),
            renew_kick: Notify::new(),
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
            .set(s.seconds_to_next_renewal(SystemTime::now()));
    }

    async fn renew_agent_loop(self: Arc<Self>, mut id: AgentIdentity) {
        let mut schedule = RetrySchedule::new(self.config.max_backoff);
        let mut at = renew_at(
            SystemTime::now(),
            id.info.not_after,
            self.config.rotation_fraction,
        );
        loop {
            let tainted = |id: &AgentIdentity| {
                id.chain
                    .first()
                    .and_then(|l| meshid_identity::svid::authority_key_id(l))
                    .is_some_and(|a| self.snapshot.borrow().tainted.contains(&a))
            };
            if !tainted(&id) {
                tokio::select! {
                    () = tokio::time::sleep(at.duration_since(SystemTime::now()).unwrap_or_default()) => {},
                    () = self.renew_kick.notified() => {
                        if !tainted(&id) { continue; }
                    },
                }
            }
            if tainted(&id) {
                tracing::warn!(spiffe_id = %id.info.spiffe_id, "agent SVID was signed by a tainted authority; renewing now");
            }
            let (generation, mut node) = self.client.node_at();
            let res: Result<_, ClientError> = async {
                let (key, csr) = new_key_and_csr()?;
                let r = node
                    .renew_agent(RenewAgentRequest { csr })
                    .await?
                    .into_inner();
                let svid = r
                    .svid
                    .ok_or_else(|| ClientError::Identity("no SVID in renewal".into()))?;
                let new = AgentIdentity::new(&svid, key)?;
                if let Some(b) = &r.bundle {
                    self.ids.save(&new, b)?;
                }
                Ok(new)
            }
            .await;
            match res {
                Ok(new) => {
                    schedule.succeeded();
                    self.client.set_identity(&new).ok();
                    self.identity.store(Arc::new(new.clone()));
                    id = new;
                    self.metrics
                        .agent_not_after
                        .set(meshid_identity::svid::unix(id.info.not_after));
                    let na = id.info.not_after;
                    self.publish(|s| s.agent_not_after = Some(na));
                    at = renew_at(
                        SystemTime::now(),
                        id.info.not_after,
                        self.config.rotation_fraction,
                    );
                    tracing::info!(spiffe_id = %id.info.spiffe_id, serial = %id.info.serial, "agent SVID renewed");
                }
                Err(e) => {
                    self.metrics.agent_renewal_failures.inc();
                    if id.info.not_after <= SystemTime::now() {
                        tracing::error!(error = %e, not_after = %humantime::format_rfc3339_seconds(id.info.not_after),
                            "agent SVID has EXPIRED and cannot be renewed; workloads keep their current SVIDs until they expire. Re-attest with a new join token (restart with --join-token)");
                    } else {
                        tracing::warn!(error = %e, "agent SVID renewal failed; retrying");
                    }
                    if let ClientError::Status(s) = &e
                        && is_server_failure(s)
                    {
                        self.client.fail_over(generation);
                    }
                    let left = id.info.not_after.duration_since(SystemTime::now()).ok();
                    at = SystemTime::now() + schedule.next_delay(self.client.server_count(), left);
                }
            }
        }
    }

    /// Time left on the soonest-expiring credential still valid: the agent
    /// SVID or a workload SVID. Retries never wait longer than a fraction of
    /// it (see [`RetrySchedule`]).
    fn time_left(&self) -> Option<Duration> {
        let now = SystemTime::now();
        let snap = self.snapshot.borrow().clone();
        std::iter::once(self.identity.load().info.not_after)
            .chain(snap.svids.values().map(|s| s.not_after))
            .filter_map(|t| t.duration_since(now).ok())
            .filter(|d| !d.is_zero())
            .min()
    }

    /// Keeps one sync stream open, to one server at a time: when it fails
    /// or ends, the next server is tried (see [`RetrySchedule`]).
    async fn sync_loop(self: Arc<Self>) {
        let mut schedule = RetrySchedule::new(self.config.max_backoff);
        loop {
            let (generation, mut node) = self.client.node_at();
            let res: Result<(), ClientError> = async {
                let mut stream = node.sync(SyncRequest {}).await?.into_inner();
                let mut first = true;
                while let Some(msg) = stream.message().await? {
                    if first {
                        first = false;
                        if let Some(a) = self.client.current_server() {
                            tracing::info!(server = %a, "sync stream open");
                        }
                    }
                    schedule.succeeded();
                    let entries = msg.entries;
                    let bundle = msg.bundle;
                    let federated: HashMap<String, _> = msg
                        .federated_bundles
                        .into_iter()
                        .map(|b| (b.trust_domain.clone(), b))
                        .collect();
                    let bundle = bundle.and_then(|b| self.accept_bundle(b));
                    let tainted: std::collections::HashSet<String> =
                        msg.tainted_authorities.into_iter().collect();
                    if !tainted.is_empty() {
                        self.renew_kick.notify_one();
                    }
                    self.publish(|s| {
                        s.tainted = tainted;
                        let ids: std::collections::HashSet<&String> =
                            entries.iter().map(|e| &e.id).collect();
                        s.svids.retain(|id, _| ids.contains(id));
                        s.entries = entries;
                        if bundle.is_some() {
                            s.bundle = bundle;
                        }
                        s.federated = federated;
                    });
                    self.kick.notify_one();
                }
                Ok(())
            }
            .await;
            self.metrics.sync_reconnects.inc();
            self.client.fail_over(generation);
            let wait = schedule.next_delay(self.client.server_count(), self.time_left());
            match res {
                Ok(()) => tracing::warn!(retry_in = ?wait, "sync stream ended; reconnecting"),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?wait, "sync stream failed; reconnecting")
                }
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Checks a bundle from the server before it is used, served or
    /// persisted: expired (or not yet valid) roots are left out, and an
    /// update that would no longer verify the agent's own SVID is refused
    /// (the last good bundle stays, and the refusal is logged and counted).
    fn accept_bundle(
        &self,
        mut b: meshid_proto::types::Bundle,
    ) -> Option<meshid_proto::types::Bundle> {
        let now = SystemTime::now();
        let current = self.snapshot.borrow().bundle.clone();
        if current.as_ref().is_some_and(|c| {
            c.x509_authorities == b.x509_authorities && c.jwt_authorities == b.jwt_authorities
        }) {
            return Some(b);
        }
        let (roots, dropped) = meshid_identity::chain::prune_roots(&b.x509_authorities, now);
        for d in &dropped {
            tracing::warn!(root = %d, "left out of the bundle");
        }
        let id = self.identity.load_full();
        if let Err(e) = meshid_identity::chain::verify_chain(&id.chain, &roots, now) {
            self.metrics.bundle_refused.inc();
            tracing::error!(
                sequence_number = b.sequence_number,
                error = %e,
                "bundle update refused: it would not verify this agent's own SVID; keeping the last good bundle"
            );
            return None;
        }
        b.x509_authorities = roots;
        if let Err(e) = self.client.set_trust(&b.x509_authorities) {
            tracing::error!(error = %e, "cannot trust the new bundle for the node API");
        }
        if let Err(e) = self.ids.save_bundle(&b) {
            tracing::warn!(error = %e, "cannot persist bundle");
        }
        self.metrics.bundle_updates.inc();
        tracing::info!(
            sequence_number = b.sequence_number,
            x509_authorities = b.x509_authorities.len(),
            jwt_authorities = b.jwt_authorities.len(),
            "bundle updated"
        );
        Some(b)
    }

    async fn mint_loop(self: Arc<Self>) {
        let mut retry_at: HashMap<String, (SystemTime, u32)> = HashMap::new();
        // Failed signing calls (the server, not an entry, is at fault).
        let mut calls = RetrySchedule::new(self.config.max_backoff);
        loop {
            let now = SystemTime::now();
            let snap = self.snapshot.borrow().clone();
            let due: Vec<_> = snap
                .entries
                .iter()
                .filter(|e| snap.needs_mint(e, now))
                .filter(|e| retry_at.get(&e.id).is_none_or(|(t, _)| *t <= now))
                .cloned()
                .collect();
            for chunk in due.chunks(self.config.sign_batch_size) {
                let mut keys = Vec::with_capacity(chunk.len());
                let mut params = Vec::with_capacity(chunk.len());
                for e in chunk {
                    match new_key_and_csr() {
                        Ok((k, csr)) => {
                            keys.push(k);
                            params.push(X509SvidParams {
                                entry_id: e.id.clone(),
                                csr,
                            });
                        }
                        Err(err) => tracing::error!(error = %err, "cannot make a key"),
                    }
                }
                let (generation, mut node) = self.client.node_at();
                match node.sign_x509_svids(SignX509SvidsRequest { params }).await {
                    Ok(r) => {
                        calls.succeeded();
                        let received = SystemTime::now();
                        let mut minted = Vec::new();
                        for ((e, key), res) in chunk.iter().zip(keys).zip(r.into_inner().results) {
                            match res.svid {
                                Some(svid) => {
                                    retry_at.remove(&e.id);
                                    let not_after = SystemTime::UNIX_EPOCH
                                        + Duration::from_secs(
                                            u64::try_from(svid.expires_at).unwrap_or(0),
                                        );
                                    if snap
                                        .svids
                                        .get(&e.id)
                                        .is_some_and(|c| snap.tainted.contains(&c.authority))
                                    {
                                        self.metrics.tainted_reminted.inc();
                                    }
                                    let authority = svid
                                        .cert_chain
                                        .first()
                                        .and_then(|l| meshid_identity::svid::authority_key_id(l))
                                        .unwrap_or_default();
                                    minted.push(Arc::new(CachedSvid {
                                        authority,
                                        entry_id: e.id.clone(),
                                        entry_revision: e.revision,
                                        spiffe_id: svid.spiffe_id,
                                        chain: svid.cert_chain,
                                        key,
                                        serial: svid.serial,
                                        not_after,
                                        renew_at: renew_at(
                                            received,
                                            not_after,
                                            self.config.rotation_fraction,
                                        ),
                                    }));
                                }
                                None => {
                                    let st = res.status.unwrap_or_default();
                                    let n = retry_at.get(&e.id).map_or(0, |(_, n)| n + 1);
                                    let left = snap
                                        .svids
                                        .get(&e.id)
                                        .and_then(|c| c.not_after.duration_since(received).ok());
                                    retry_at.insert(
                                        e.id.clone(),
                                        (
                                            received
                                                + bound_by_expiry(
                                                    backoff(n, self.config.max_backoff),
                                                    left,
                                                ),
                                            n,
                                        ),
                                    );
                                    tracing::warn!(entry = %e.id, code = st.code, message = %st.message, "SVID not issued; keeping the current one and retrying");
                                }
                            }
                        }
                        self.metrics.rotations.inc_by(minted.len() as u64);
                        for m in &minted {
                            tracing::info!(spiffe_id = %m.spiffe_id, serial = %m.serial, not_after = %humantime::format_rfc3339_seconds(m.not_after), "SVID minted");
                        }
                        self.publish(|s| {
                            for m in minted {
                                // Only keep SVIDs for entries still present.
                                if s.entries.iter().any(|e| e.id == m.entry_id) {
                                    s.svids.insert(m.entry_id.clone(), m);
                                }
                            }
                        });
                    }
                    Err(status) => {
                        self.metrics.sign_failures.inc();
                        // The server went away (perhaps mid-batch): the whole
                        // batch is asked again, of the next server first.
                        if is_server_failure(&status) {
                            self.client.fail_over(generation);
                        }
                        let now = SystemTime::now();
                        let left = chunk
                            .iter()
                            .filter_map(|e| snap.svids.get(&e.id))
                            .filter_map(|c| c.not_after.duration_since(now).ok())
                            .chain(self.time_left())
                            .min();
                        let wait = calls.next_delay(self.client.server_count(), left);
                        for e in chunk {
                            let n = retry_at.get(&e.id).map_or(0, |(_, n)| *n);
                            retry_at.insert(e.id.clone(), (now + wait, n));
                        }
                        tracing::warn!(error = %status, "signing call failed; keeping current SVIDs and retrying");
                    }
                }
            }
            retry_at.retain(|id, _| snap.entries.iter().any(|e| &e.id == id));
            let snap = self.snapshot.borrow().clone();
            let next = snap
                .next_renewal()
                .into_iter()
                .chain(retry_at.values().map(|(t, _)| *t))
                .min()
                .unwrap_or_else(|| SystemTime::now() + Duration::from_secs(60));
            let wait = next
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .max(Duration::from_millis(10));
            tokio::select! {
                () = tokio::time::sleep(wait) => {},
                () = self.kick.notified() => {},
            }
        }
    }
}
