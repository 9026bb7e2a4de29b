//! The operator's transitions of the CA journal (`meshid server ca …`):
//! prepare, activate, retire, taint, revoke and import, each with a dry run
//! that reports exactly what would change and which live certificates and
//! agents it affects.

use std::time::{Duration, SystemTime};

use meshid_identity::svid::unix;
use meshid_proto::types::Authority;

use super::{CaManager, Outcome, audit_write, check_activatable, own};
use crate::audit::Event;
use crate::ca::gate;
use crate::ca::mint::{self, X509};
use crate::ca::schedule::state;
use crate::ca::{CaError, SigningCa};
use crate::store::IssuedRecord;

/// How many live certificates a dry run or a refusal lists.
const AFFECTED_LIMIT: i64 = 1000;

impl CaManager {
    async fn find(&self, kind: &str, id: &str) -> Result<Authority, CaError> {
        let journal = self.store.list_authorities().await?;
        journal
            .into_iter()
            .find(|a| a.kind == kind && a.id == id && a.state != state::REMOVED)
            .ok_or_else(|| CaError::NotFound(id.into()))
    }

    async fn affected(
        &self,
        id: &str,
        now: SystemTime,
    ) -> Result<(Vec<IssuedRecord>, Vec<String>), CaError> {
        let recs = self
            .store
            .live_issued_by(id, unix(now), AFFECTED_LIMIT)
            .await?;
        let mut agents: Vec<String> = recs.iter().map(|r| r.agent_id.clone()).collect();
        agents.sort();
        agents.dedup();
        Ok((recs, agents))
    }

    fn require_own(&self, a: &Authority) -> Result<(), CaError> {
        if a.owner != self.owner {
            return Err(CaError::Refused(format!(
                "authority {} belongs to server {}; run this on that server",
                a.id, a.owner
            )));
        }
        Ok(())
    }

    /// `ca prepare`: makes the next authority now (or a key and CSR for an
    /// offline upstream CA).
    pub async fn prepare(
        &self,
        kind: &str,
        upstream_csr: bool,
        dry_run: bool,
    ) -> Result<Outcome, CaError> {
        let _g = self.lock.lock().await;
        let now = SystemTime::now();
        if upstream_csr && kind != X509 {
            return Err(CaError::Refused(
                "an upstream CSR is for X.509 CAs only".into(),
            ));
        }
        let journal = self.store.list_authorities().await?;
        if let Some(p) = own(&journal, &self.owner, kind)
            .iter()
            .find(|a| (a.state == state::PREPARED || a.state == state::PENDING) && !a.tainted)
        {
            return Err(CaError::Refused(format!(
                "{kind} authority {} is already {}; activate or retire it first",
                p.id, p.state
            )));
        }
        if !upstream_csr && kind == X509 && self.upstream.as_ref().is_some_and(|u| !u.has_key()) {
            return Err(CaError::Refused(
                "the upstream CA is offline: use --upstream-csr FILE, have the CSR signed, then \
                 `ca import`"
                    .into(),
            ));
        }
        if dry_run {
            return Ok(Outcome {
                summary: format!(
                    "would prepare a new {kind} authority ({}); it would be published at once and \
                     sign nothing until activated",
                    if upstream_csr {
                        "key and CSR for the offline upstream"
                    } else {
                        "valid for the configured lifetime"
                    }
                ),
                ..Outcome::default()
            });
        }
        self.prepare_locked(kind, upstream_csr, now, false).await
    }

    /// `ca activate`: the prepared authority signs from now on; the active
    /// one retires (its certificates stay valid until they expire).
    pub async fn activate(&self, kind: &str, id: &str, dry_run: bool) -> Result<Outcome, CaError> {
        let _g = self.lock.lock().await;
        let now = SystemTime::now();
        let journal = self.store.list_authorities().await?;
        let mine = own(&journal, &self.owner, kind);
        let p = if id.is_empty() {
            mine.iter()
                .filter(|a| a.state == state::PREPARED && !a.tainted)
                .max_by_key(|a| a.prepared_at)
                .cloned()
                .ok_or_else(|| {
                    CaError::Refused(format!(
                        "no prepared {kind} authority; run `ca prepare` first"
                    ))
                })?
        } else {
            self.find(kind, id).await?
        };
        self.require_own(&p)?;
        if p.state != state::PREPARED {
            return Err(CaError::Refused(format!(
                "authority {} is {}, only a prepared authority can be activated",
                p.id, p.state
            )));
        }
        if p.tainted {
            return Err(CaError::Refused(format!("authority {} is tainted", p.id)));
        }
        check_activatable(&self.trust_domain, &p, &self.keys, now)?;
        let old: Vec<Authority> = mine
            .into_iter()
            .filter(|a| a.state == state::ACTIVE)
            .collect();
        let mut affected = Vec::new();
        let mut agents = Vec::new();
        for o in &old {
            let (r, a) = self.affected(&o.id, now).await?;
            affected.extend(r);
            agents.extend(a);
        }
        let summary = format!(
            "{} {kind} authority {} becomes active; {} retires, and its {} live certificate(s) stay \
             valid until they expire",
            if dry_run {
                "would activate:"
            } else {
                "activated:"
            },
            p.id,
            old.iter()
                .map(|a| a.id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            affected.len()
        );
        if dry_run {
            let mut after = p.clone();
            after.state = state::ACTIVE.into();
            return Ok(Outcome {
                changed: vec![after],
                affected,
                affected_agents: agents,
                summary,
                ..Outcome::default()
            });
        }
        let changed = self.activate_locked(kind, &p.id, now).await?;
        self.release(&p.id);
        self.reload(now).await?;
        Ok(Outcome {
            changed,
            affected,
            affected_agents: agents,
            summary,
            ..Outcome::default()
        })
    }

    /// `ca retire`: takes a prepared or pending authority out of the way (it
    /// will never sign; it leaves the bundle by itself). The active one is
    /// replaced by activating its successor, not retired directly.
    pub async fn retire(&self, kind: &str, id: &str, dry_run: bool) -> Result<Outcome, CaError> {
        let _g = self.lock.lock().await;
        let now = SystemTime::now();
        let a = self.find(kind, id).await?;
        self.require_own(&a)?;
        match a.state.as_str() {
            state::PREPARED | state::PENDING => {}
            state::ACTIVE => {
                return Err(CaError::Refused(format!(
                    "authority {} is active: prepare and activate its successor instead \
                     (`ca prepare`, `ca activate`); it then retires by itself",
                    a.id
                )));
            }
            other => {
                return Err(CaError::Refused(format!(
                    "authority {} is already {other}",
                    a.id
                )));
            }
        }
        let mut after = a.clone();
        after.state = state::RETIRED.into();
        let summary = format!(
            "{} {kind} authority {}: it will never sign and leaves the bundle by itself",
            if dry_run { "would retire" } else { "retired" },
            a.id
        );
        if dry_run {
            return Ok(Outcome {
                changed: vec![after],
                summary,
                ..Outcome::default()
            });
        }
        let after = self.set_state(a, state::RETIRED, now).await?;
        self.count(kind, "retired");
        audit_write(
            &self.audit,
            Event::new("ca_retired")
                .with("kind", kind)
                .with("id", after.id.clone())
                .with("manual", true),
        )
        .await?;
        Ok(Outcome {
            changed: vec![after],
            summary,
            ..Outcome::default()
        })
    }

    /// `ca taint`: distrusts a (non-active) authority: agents re-mint
    /// everything it signed now, not at its usual renewal time.
    pub async fn taint(&self, kind: &str, id: &str, dry_run: bool) -> Result<Outcome, CaError> {
        let _g = self.lock.lock().await;
        let now = SystemTime::now();
        let a = self.find(kind, id).await?;
        self.require_own(&a)?;
        if a.state == state::ACTIVE {
            return Err(CaError::Refused(format!(
                "authority {} is active: prepare and activate a successor first (`ca prepare`, \
                 `ca activate`), then taint it",
                a.id
            )));
        }
        if a.tainted {
            return Err(CaError::Refused(format!(
                "authority {} is already tainted",
                a.id
            )));
        }
        let (affected, agents) = self.affected(&a.id, now).await?;
        let summary = format!(
            "{} {kind} authority {}: {} live certificate(s) held by {} agent(s) are re-minted under \
             the active authority now",
            if dry_run { "would taint" } else { "tainted" },
            a.id,
            affected.len(),
            agents.len()
        );
        let mut after = a.clone();
        after.tainted = true;
        after.tainted_at = unix(now);
        if dry_run {
            return Ok(Outcome {
                changed: vec![after],
                affected,
                affected_agents: agents,
                summary,
                ..Outcome::default()
            });
        }
        let expected = after.revision;
        after.revision += 1;
        self.store.update_authority(&after, expected).await?;
        self.count(kind, "tainted");
        audit_write(
            &self.audit,
            Event::new("ca_tainted")
                .with("kind", kind)
                .with("id", after.id.clone())
                .with("live_certificates", affected.len())
                .with("agents", agents.len()),
        )
        .await?;
        tracing::warn!(
            kind,
            id,
            live = affected.len(),
            "authority tainted; agents re-mint now"
        );
        Ok(Outcome {
            changed: vec![after],
            affected,
            affected_agents: agents,
            summary,
            ..Outcome::default()
        })
    }

    /// `ca revoke`: removes a non-active authority from the bundle now.
    /// Refused while live certificates depend on it, unless forced (and
    /// confirmed).
    pub async fn revoke(
        &self,
        kind: &str,
        id: &str,
        dry_run: bool,
        force: bool,
        yes: bool,
    ) -> Result<Outcome, CaError> {
        let _g = self.lock.lock().await;
        let now = SystemTime::now();
        let a = self.find(kind, id).await?;
        self.require_own(&a)?;
        if a.state == state::ACTIVE {
            return Err(CaError::Refused(format!(
                "authority {} is active: activate a successor and taint it first",
                a.id
            )));
        }
        let (affected, agents) = self.affected(&a.id, now).await?;
        let live = affected.len();
        let summary = format!(
            "{} {kind} authority {} from the bundle: {live} live certificate(s) held by {} agent(s) \
             would stop verifying",
            if dry_run { "would revoke" } else { "revoked" },
            a.id,
            agents.len()
        );
        if live > 0 && !force && !dry_run {
            return Err(CaError::Refused(format!(
                "refusing to revoke {kind} authority {}: {live} live certificate(s) held by {} \
                 agent(s) still depend on it (taint it and wait until they are re-minted; see \
                 `ca show`), or force it with --force --yes",
                a.id,
                agents.len()
            )));
        }
        let mut after = a.clone();
        after.state = state::REMOVED.into();
        // Through the gate, as the bundle would be (a forced revocation is
        // checked without the live certificates it deliberately orphans).
        if kind == X509 {
            let mut journal = self.store.list_authorities().await?;
            for j in journal.iter_mut().filter(|j| j.id == a.id) {
                j.state = state::REMOVED.into();
            }
            let live_map = self.live_counts(unix(now)).await?;
            let skip = a.id.clone();
            gate::x509_bundle(
                &journal,
                &|x| {
                    if (force || dry_run) && x == skip {
                        0
                    } else {
                        live_map.get(x).map_or(0, |v| v.0)
                    }
                },
                now,
            )?;
        }
        if dry_run {
            return Ok(Outcome {
                changed: vec![after],
                affected,
                affected_agents: agents,
                summary,
                needs_confirmation: live > 0,
                ..Outcome::default()
            });
        }
        if live > 0 && !yes {
            return Ok(Outcome {
                changed: vec![],
                affected,
                affected_agents: agents,
                summary: format!("not done: {summary}; confirm with --yes"),
                needs_confirmation: true,
                ..Outcome::default()
            });
        }
        self.remove_locked(kind, &a.id, now, "revoked").await?;
        Ok(Outcome {
            changed: vec![after],
            affected,
            affected_agents: agents,
            summary,
            ..Outcome::default()
        })
    }

    /// `ca import`: installs an intermediate signed by the offline upstream
    /// for the pending authority whose key it certifies, as prepared, after
    /// the gate.
    pub async fn import(&self, chain: Vec<Vec<u8>>, dry_run: bool) -> Result<Outcome, CaError> {
        let _g = self.lock.lock().await;
        let now = SystemTime::now();
        let up = self.upstream.as_ref().ok_or_else(|| {
            CaError::Refused("no [upstream] is configured: nothing to import into".into())
        })?;
        let upstream = mint::Upstream::load(up, now)?;
        let first = chain
            .first()
            .ok_or_else(|| CaError::Invalid("no certificate given".into()))?;
        let pk = mint::cert_public_key(first)
            .ok_or_else(|| CaError::Invalid("the certificate does not parse".into()))?;
        let journal = self.store.list_authorities().await?;
        let pending = own(&journal, &self.owner, X509)
            .into_iter()
            .find(|a| a.state == state::PENDING && a.public_key == pk)
            .ok_or_else(|| {
                CaError::Refused(
                    "the certificate is not for a pending authority of this server (its key does \
                     not match any CSR made by `ca prepare --upstream-csr`)"
                        .into(),
                )
            })?;
        let mut full = chain.clone();
        for c in &upstream.chain {
            if !full.contains(c) {
                full.push(c.clone());
            }
        }
        full.retain(|c| !upstream.roots.contains(c) || c == first);
        let min_na = now + self.x509_policy.max_credential_ttl * 2;
        gate::check_import(&full, &upstream.roots, min_na, now)?;
        let mut rec =
            mint::x509_record(full, upstream.roots.clone(), "imported", &self.owner, now)?;
        rec.public_key = Vec::new();
        let summary = format!(
            "{} intermediate {} (valid until {}) as prepared for pending key {}",
            if dry_run { "would import" } else { "imported" },
            rec.id,
            humantime::format_rfc3339_seconds(
                SystemTime::UNIX_EPOCH
                    + Duration::from_secs(u64::try_from(rec.not_after).unwrap_or(0))
            ),
            pending.id
        );
        if dry_run {
            return Ok(Outcome {
                changed: vec![rec],
                summary,
                ..Outcome::default()
            });
        }
        let key = self.keys.get(X509, &pending.id)?;
        if rec.id != pending.id {
            self.keys.put(X509, &rec.id, &key)?;
        }
        // Check the pair signs before anything is stored.
        SigningCa::from_authority(&self.trust_domain, &rec, key, now)?;
        self.store.insert_authority(&rec).await?;
        let done = self.set_state(pending, state::REMOVED, now).await?;
        if done.id != rec.id {
            self.keys.delete(X509, &done.id)?;
        }
        self.count(X509, "imported");
        audit_write(
            &self.audit,
            Event::new("ca_imported")
                .with("id", rec.id.clone())
                .with("not_after", rec.not_after),
        )
        .await?;
        Ok(Outcome {
            changed: vec![rec],
            summary,
            ..Outcome::default()
        })
    }
}
