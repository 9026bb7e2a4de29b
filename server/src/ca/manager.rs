//! The CA manager: the journal's transitions for this server's authorities,
//! the signers currently in use, and the bundle material built from the
//! journal of every server sharing the store.
//!
//! Every transition runs under one lock, goes through the chain gate, is
//! written to the store with a revision check (so two servers never both
//! apply it), audited, and counted; the caller then republishes the bundle,
//! which the sync streams push to every agent.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use meshid_identity::svid::unix;
use meshid_proto::types::{Authority, JwtKey};
use tokio::sync::Mutex;

use super::gate::{self, X509Bundle};
use super::keys::KeyDir;
use super::mint::{self, JWT, X509};
use super::schedule::{self, Plan, Policy, Step, state};
use super::{CaError, JwtSigner, SigningCa};
use crate::audit::AuditLog;
use crate::config::ServerConfig;
use crate::metrics::Metrics;
use crate::store::{IssuedRecord, Store};

mod legacy;
mod operations;
mod probe;
#[cfg(test)]
mod tests;
mod transitions;

use legacy::{import_legacy_jwt, import_legacy_x509};
pub use probe::PROBE_TTL;
use transitions::{audit_write, check_activatable, load_signer_jwt, load_signer_x509};

/// The result of a manual transition (or of its dry run).
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// The authorities as they are, or would be, after the transition.
    pub changed: Vec<Authority>,
    /// Live certificates affected.
    pub affected: Vec<IssuedRecord>,
    /// Agents holding them.
    pub affected_agents: Vec<String>,
    /// One sentence.
    pub summary: String,
    /// A PEM CSR for an offline upstream CA.
    pub csr_pem: String,
    /// Whether the caller must confirm (`yes`) to proceed.
    pub needs_confirmation: bool,
}

/// What the trust domain's bundle holds, from the journal.
#[derive(Debug, Clone, Default)]
pub struct BundleMaterial {
    /// X.509 roots (gated).
    pub x509: X509Bundle,
    /// JWT keys, each expiring with its authority.
    pub jwt: Vec<JwtKey>,
    /// Ids of tainted authorities that are still published.
    pub tainted: Vec<String>,
}

/// What `/readyz` and the health check report about the authorities.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Readiness {
    /// Reasons the server is not ready.
    pub fatal: Vec<String>,
    /// Loud warnings that do not (yet) make it unready.
    pub warnings: Vec<String>,
}

/// This server's authorities in the journal and the transitions between
/// their states: everything the manager does except hold the signers in
/// use, so that start-up runs the very same transitions before any signer
/// exists.
pub struct Lifecycle {
    trust_domain: String,
    owner: String,
    keys: KeyDir,
    store: Arc<dyn Store>,
    audit: AuditLog,
    metrics: Arc<Metrics>,
    x509_policy: Policy,
    jwt_policy: Policy,
    upstream: Option<crate::config::UpstreamConfig>,
}

/// Owns this server's authorities: their [`Lifecycle`] (reached through
/// `Deref`), the signers in use, and the lock every transition runs under.
pub struct CaManager {
    life: Lifecycle,
    x509: ArcSwap<SigningCa>,
    jwt: ArcSwap<JwtSigner>,
    lock: Mutex<()>,
    /// Prepared authorities a halted staged activation holds back from
    /// automatic activation (in memory: see `safe_ops/rollout.rs`).
    held: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Whether start-up had to make the X.509 CA (first start, or the old
    /// one expired while the server was down).
    created: bool,
}

impl std::ops::Deref for CaManager {
    type Target = Lifecycle;

    fn deref(&self) -> &Lifecycle {
        &self.life
    }
}

impl std::fmt::Debug for CaManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaManager")
            .field("owner", &self.owner)
            .field("x509", &self.x509.load().id())
            .field("jwt", &self.jwt.load().kid())
            .finish_non_exhaustive()
    }
}

/// This server instance's id in the journal: `<data_dir>/server-id`, made
/// once.
pub fn server_instance_id(data_dir: &Path) -> Result<String, CaError> {
    let p = data_dir.join("server-id");
    match std::fs::read_to_string(&p) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Ok(_) | Err(_) => {
            let id = uuid::Uuid::new_v4().simple().to_string();
            super::keyfile::write_file(&p, id.as_bytes(), 0o644).map_err(super::io_err(&p))?;
            Ok(id)
        }
    }
}

fn own<'a>(journal: &'a [Authority], owner: &str, kind: &str) -> Vec<Authority> {
    journal
        .iter()
        .filter(|a: &&'a Authority| a.owner == owner && a.kind == kind && a.state != state::REMOVED)
        .cloned()
        .collect()
}

impl CaManager {
    /// Loads this server's authorities from the journal, importing the files
    /// of an older layout (`ca/signing-ca.{pem,key}`, `ca/jwt.key`) once,
    /// makes whatever is missing, and refuses to start without a usable
    /// active X.509 CA.
    pub async fn start(
        cfg: &ServerConfig,
        store: Arc<dyn Store>,
        audit: AuditLog,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, CaError> {
        let owner = server_instance_id(&cfg.data_dir)?;
        let keys = KeyDir::new(&cfg.data_dir);
        let now = SystemTime::now();
        let journal = store.list_authorities().await?;
        if own(&journal, &owner, X509).is_empty() {
            import_legacy_x509(cfg, &owner, &keys, &store, &audit, now).await?;
        }
        if own(&journal, &owner, JWT).is_empty() {
            import_legacy_jwt(cfg, &owner, &keys, &store, &audit, now).await?;
        }
        let life = Lifecycle {
            trust_domain: cfg.trust_domain.clone(),
            owner,
            keys,
            store,
            audit,
            metrics,
            x509_policy: cfg.x509_policy(),
            jwt_policy: cfg.jwt_policy(),
            upstream: cfg.upstream.clone(),
        };
        // Make what is missing, or replace what expired while the server was
        // down, with the transitions the CA loop uses; at start-up an
        // authority is made even when automatic rotation is off.
        let journal = life.store.list_authorities().await?;
        let mut created = false;
        for kind in [X509, JWT] {
            let boot = Policy {
                can_prepare: kind == JWT || life.upstream.as_ref().is_none_or(|u| u.has_key()),
                ..*life.policy(kind)
            };
            let mine = own(&journal, &life.owner, kind);
            for step in schedule::plan(&mine, &|_| 0, unix(now), &boot).due {
                match step {
                    Step::Bootstrap => {
                        life.prepare_locked(kind, false, now, true).await?;
                        created |= kind == X509;
                    }
                    Step::Activate(id) => {
                        life.activate_locked(kind, &id, now).await?;
                    }
                    Step::NeedsOperator => {
                        return Err(CaError::Refused(
                            "no usable active CA, and the upstream CA is offline: prepare the next \
                             intermediate with `meshid server ca prepare --upstream-csr FILE` on a \
                             running server before the active one ends, or configure \
                             upstream.cert_path/key_path"
                                .into(),
                        ));
                    }
                    Step::Prepare | Step::Remove(_) => {}
                }
            }
        }
        let journal = life.store.list_authorities().await?;
        let x509 = load_signer_x509(
            &life.trust_domain,
            &own(&journal, &life.owner, X509),
            &life.keys,
            now,
        )?;
        let jwt = load_signer_jwt(&own(&journal, &life.owner, JWT), &life.keys)?;
        let m = Arc::new(Self {
            life,
            x509: ArcSwap::from_pointee(x509),
            jwt: ArcSwap::from_pointee(jwt),
            lock: Mutex::new(()),
            held: Default::default(),
            created,
        });
        m.refresh_gauges(&journal);
        Ok(m)
    }

    /// Whether start-up made the X.509 CA rather than loading it.
    pub fn created_at_start(&self) -> bool {
        self.created
    }

    /// The X.509 CA that signs now.
    pub fn signer(&self) -> Arc<SigningCa> {
        self.x509.load_full()
    }

    /// The JWT key that signs now.
    pub fn jwt_signer(&self) -> Arc<JwtSigner> {
        self.jwt.load_full()
    }

    /// This server's instance id (the journal's `owner`).
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The X.509 rotation policy in effect.
    pub fn x509_policy(&self) -> &Policy {
        &self.x509_policy
    }

    /// The journal (every server's authorities).
    pub async fn journal(&self) -> Result<Vec<Authority>, CaError> {
        Ok(self.store.list_authorities().await?)
    }

    /// Live certificate count and latest notAfter per authority.
    pub async fn issued_by_authority(&self) -> Result<HashMap<String, (i64, i64)>, CaError> {
        self.live_counts(unix(SystemTime::now())).await
    }

    /// The bundle's content from the journal, through the gate.
    pub async fn bundle_material(&self, now: SystemTime) -> Result<BundleMaterial, CaError> {
        let journal = self.store.list_authorities().await?;
        let live = self.live_counts(unix(now)).await?;
        self.material_for(&journal, &live, now)
    }

    fn material_for(
        &self,
        journal: &[Authority],
        live: &HashMap<String, (i64, i64)>,
        now: SystemTime,
    ) -> Result<BundleMaterial, CaError> {
        let t = unix(now);
        let x509 = gate::x509_bundle(journal, &|id| live.get(id).map_or(0, |v| v.0), now)?;
        let jwt = journal
            .iter()
            .filter(|a| a.kind == JWT && gate::published(a, t))
            .map(|a| JwtKey {
                key_id: a.id.clone(),
                public_key: a.public_key.clone(),
                expires_at: a.not_after,
            })
            .collect();
        let tainted = journal
            .iter()
            .filter(|a| a.tainted && gate::published(a, t))
            .map(|a| a.id.clone())
            .collect();
        Ok(BundleMaterial { x509, jwt, tainted })
    }

    fn refresh_gauges(&self, journal: &[Authority]) {
        let m = &self.metrics;
        m.ca_not_after.set(unix(self.x509.load().not_after()));
        m.jwt_key_not_after.set(unix(self.jwt.load().not_after()));
        let next = own(journal, &self.owner, X509)
            .iter()
            .filter(|a| a.state == state::PREPARED && !a.tainted)
            .map(|a| a.not_after)
            .max()
            .unwrap_or(0);
        m.ca_next_not_after.set(next);
        if let Some(up) = &self.upstream
            && let Ok(u) = mint::Upstream::load(up, SystemTime::now())
        {
            m.upstream_not_after.set(unix(u.not_after));
        }
    }

    /// Runs the transitions due now. Returns the plan's next transition and
    /// whether anything changed (the bundle must then be republished).
    pub async fn tick(&self, now: SystemTime) -> Result<(Option<(i64, String)>, bool), CaError> {
        let _g = self.lock.lock().await;
        let mut changed = false;
        let mut next: Option<(i64, String)> = None;
        // Plan again after acting: one transition can make the next one due
        // (or schedule it), and the returned time must be the real next one,
        // or the loop would sleep past it. The journal and the issued
        // summary are read once per round, for both kinds; a quiet tick is
        // one round (two reads).
        let mut settled = [false; 2];
        for _round in 0..4 {
            let journal = self.store.list_authorities().await?;
            let live = self.live_counts(unix(now)).await?;
            for (k, kind) in [X509, JWT].into_iter().enumerate() {
                if settled[k] {
                    continue;
                }
                let mine = own(&journal, &self.owner, kind);
                let Plan { mut due, next: n } = schedule::plan(
                    &mine,
                    &|id| live.get(id).map_or(0, |v| v.1),
                    unix(now),
                    self.policy(kind),
                );
                due.retain(|s| match s {
                    Step::Activate(id) if self.is_held(id) => {
                        tracing::warn!(kind, id, "not activating: a staged activation of this authority halted (see `meshid server ca rollout status`); retire it, or activate it with --no-canary");
                        false
                    }
                    _ => true,
                });
                let acting = due.iter().any(|s| *s != Step::NeedsOperator);
                if !acting
                    && let Some(n) = n
                    && next.as_ref().is_none_or(|x| n.0 < x.0)
                {
                    next = Some(n);
                }
                let mut failed = false;
                for step in due {
                    match self.run_step(kind, &step, now).await {
                        Ok(()) => changed |= step != Step::NeedsOperator,
                        Err(e) => {
                            failed = true;
                            self.metrics.ca_transition(kind, "failed");
                            tracing::error!(kind, step = ?step, error = %e, "CA transition failed; will retry");
                        }
                    }
                }
                settled[k] = !acting || failed;
            }
            if settled.iter().all(|s| *s) {
                break;
            }
        }
        if changed {
            self.reload(now).await?;
        }
        Ok((next, changed))
    }

    /// Re-reads the active signers from the journal.
    async fn reload(&self, now: SystemTime) -> Result<(), CaError> {
        let journal = self.store.list_authorities().await?;
        let x = load_signer_x509(
            &self.trust_domain,
            &own(&journal, &self.owner, X509),
            &self.keys,
            now,
        )?;
        let j = load_signer_jwt(&own(&journal, &self.owner, JWT), &self.keys)?;
        if x.id() != self.x509.load().id() {
            tracing::info!(id = %x.id(), not_after = %humantime::format_rfc3339_seconds(x.not_after()), "X.509 signing CA in use");
        }
        if j.kid() != self.jwt.load().kid() {
            tracing::info!(kid = %j.kid(), "JWT signing key in use");
        }
        self.x509.store(Arc::new(x));
        self.jwt.store(Arc::new(j));
        self.refresh_gauges(&journal);
        Ok(())
    }

    /// Why the trust material needs attention now: `fatal` (not ready) when
    /// there is no usable active authority, or the active one is past its
    /// latest activation point with no valid successor; `warnings` for an
    /// upstream chain ending within `upstream.warn_before`.
    pub async fn readiness(&self, now: SystemTime) -> Readiness {
        let mut r = Readiness::default();
        let t = unix(now);
        let journal = match self.store.list_authorities().await {
            Ok(j) => j,
            Err(e) => {
                r.fatal.push(format!("CA journal unreadable: {e}"));
                return r;
            }
        };
        let w = &mut r.fatal;
        for kind in [X509, JWT] {
            let mine = own(&journal, &self.owner, kind);
            let active = mine
                .iter()
                .find(|a| a.state == state::ACTIVE && schedule::usable(a, t));
            let Some(a) = active else {
                w.push(format!("no usable active {kind} authority"));
                continue;
            };
            let p = self.policy(kind);
            let latest =
                a.not_before + ((a.not_after - a.not_before) as f64 * p.activate_by) as i64;
            let successor = mine
                .iter()
                .any(|s| s.state == state::PREPARED && !s.tainted && s.not_after > a.not_after);
            if t >= latest && !successor {
                w.push(format!(
                    "active {kind} authority {} ends at {} and no valid successor is prepared",
                    a.id,
                    humantime::format_rfc3339_seconds(
                        SystemTime::UNIX_EPOCH
                            + Duration::from_secs(u64::try_from(a.not_after).unwrap_or(0))
                    )
                ));
            }
        }
        let signer = self.signer();
        if let Err(e) = signer.revalidate(now) {
            w.push(format!("the signing CA is not usable: {e}"));
        }
        if let Some(u) = &self.upstream {
            let w = &mut r.warnings;
            match mint::Upstream::load(u, now) {
                Ok(up) if up.not_after < now + u.warn_before => w.push(format!(
                    "the upstream CA chain ends at {} (within {})",
                    humantime::format_rfc3339_seconds(up.not_after),
                    humantime::format_duration(u.warn_before)
                )),
                Ok(_) => {}
                Err(e) => w.push(format!("upstream CA: {e}")),
            }
        }
        for w in &r.warnings {
            tracing::warn!(warning = %w, "trust material needs attention");
        }
        r
    }
}
