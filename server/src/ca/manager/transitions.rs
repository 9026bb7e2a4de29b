//! The journal's transitions of this server's own authorities (prepare,
//! activate, remove), each under the manager's lock, through the chain gate,
//! written with a revision check, audited and counted; and the signers
//! loaded from what the journal says is active.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use meshid_identity::svid::unix;
use meshid_proto::types::Authority;

use crate::audit::{AuditLog, Event};
use crate::ca::keys::KeyDir;
use crate::ca::mint::{self, JWT, X509};
use crate::ca::schedule::{self, Policy, Step, state};
use crate::ca::{CaError, JwtSigner, SigningCa};

use super::*;

impl Lifecycle {
    /// Runs one step of the plan (the lock held).
    pub(super) async fn run_step(
        &self,
        kind: &str,
        step: &Step,
        now: SystemTime,
    ) -> Result<(), CaError> {
        match step {
            Step::Bootstrap => {
                tracing::warn!(
                    kind,
                    "no usable active authority; making one and activating it now"
                );
                self.prepare_locked(kind, false, now, true)
                    .await
                    .map(|_| ())
            }
            Step::Prepare => self
                .prepare_locked(kind, false, now, false)
                .await
                .map(|_| ()),
            Step::Activate(id) => self.activate_locked(kind, id, now).await.map(|_| ()),
            Step::Remove(id) => self.remove_locked(kind, id, now, "removed").await,
            Step::NeedsOperator => {
                self.metrics.ca_transition(kind, "needs_operator");
                tracing::warn!(
                    kind,
                    "the next CA must be prepared by an operator (offline upstream): run \
                     `meshid server ca prepare --upstream-csr FILE`, sign it, then \
                     `meshid server ca import --cert FILE`"
                );
                Ok(())
            }
        }
    }

    pub(super) async fn live_counts(
        &self,
        now: i64,
    ) -> Result<HashMap<String, (i64, i64)>, CaError> {
        Ok(self
            .store
            .issued_summary(now)
            .await?
            .into_iter()
            .map(|s| (s.ca_id, (s.live, s.last_not_after)))
            .collect())
    }

    pub(super) fn count(&self, kind: &str, transition: &'static str) {
        self.metrics.ca_transition(kind, transition);
    }

    pub(super) fn policy(&self, kind: &str) -> &Policy {
        if kind == JWT {
            &self.jwt_policy
        } else {
            &self.x509_policy
        }
    }

    pub(super) async fn prepare_locked(
        &self,
        kind: &str,
        upstream_csr: bool,
        now: SystemTime,
        activate_now: bool,
    ) -> Result<Outcome, CaError> {
        let policy = self.policy(kind);
        let (mut rec, csr_pem) = if kind == JWT {
            let (rec, pkcs8) = mint::jwt_key(policy.ttl, &self.owner, now)?;
            self.keys.put_pkcs8(JWT, &rec.id, &pkcs8)?;
            (rec, String::new())
        } else if upstream_csr {
            let (key, csr) = mint::upstream_csr(&self.trust_domain, now)?;
            let id = mint::key_id(&key);
            self.keys.put(X509, &id, &key)?;
            let rec = Authority {
                id,
                kind: X509.into(),
                owner: self.owner.clone(),
                state: state::PENDING.into(),
                public_key: mint::key_public_key(&key),
                prepared_at: unix(now),
                origin: "imported".into(),
                revision: 1,
                ..Authority::default()
            };
            (rec, csr)
        } else {
            let (rec, key) = match &self.upstream {
                Some(u) => {
                    let up = mint::Upstream::load(u, now)?;
                    mint::under_upstream(&self.trust_domain, policy.ttl, &up, &self.owner, now)?
                }
                None => mint::self_signed(&self.trust_domain, policy.ttl, &self.owner, now)?,
            };
            self.keys.put(X509, &rec.id, &key)?;
            (rec, String::new())
        };
        if activate_now {
            rec.state = state::ACTIVE.into();
            rec.activated_at = unix(now);
            // Retire whatever is left (e.g. an expired active).
            let journal = self.store.list_authorities().await?;
            for old in own(&journal, &self.owner, kind)
                .into_iter()
                .filter(|a| a.state == state::ACTIVE)
            {
                tracing::warn!(kind, id = %old.id, "the active authority is no longer usable (it expired while the server was down?); agents holding only it must be re-bootstrapped");
                self.set_state(old, state::RETIRED, now).await?;
            }
        }
        self.store.insert_authority(&rec).await?;
        let transition = if activate_now {
            "bootstrapped"
        } else if rec.state == state::PENDING {
            "pending"
        } else {
            "prepared"
        };
        self.count(kind, transition);
        audit_write(
            &self.audit,
            Event::new(&format!("ca_{transition}"))
                .with("kind", kind)
                .with("id", rec.id.clone())
                .with("origin", rec.origin.clone())
                .with("not_after", rec.not_after),
        )
        .await?;
        tracing::info!(kind, id = %rec.id, state = %rec.state, not_after = rec.not_after, "authority {transition}");
        Ok(Outcome {
            summary: format!("{kind} authority {} {transition}", rec.id),
            changed: vec![rec],
            csr_pem,
            ..Outcome::default()
        })
    }

    pub(super) async fn set_state(
        &self,
        a: Authority,
        to: &str,
        now: SystemTime,
    ) -> Result<Authority, CaError> {
        let (a, expected) = moved(a, to, now);
        self.store.update_authority(&a, expected).await?;
        Ok(a)
    }

    pub(super) async fn activate_locked(
        &self,
        kind: &str,
        id: &str,
        now: SystemTime,
    ) -> Result<Vec<Authority>, CaError> {
        let journal = self.store.list_authorities().await?;
        let mine = own(&journal, &self.owner, kind);
        let p = mine
            .iter()
            .find(|a| a.id == id)
            .cloned()
            .ok_or_else(|| CaError::NotFound(id.into()))?;
        check_activatable(&self.trust_domain, &p, &self.keys, now)?;
        // The predecessor's retirement and the successor's activation in
        // one store transaction: never a moment without an active authority.
        let mut writes: Vec<(Authority, i64)> = mine
            .into_iter()
            .filter(|a| a.state == state::ACTIVE)
            .map(|old| moved(old, state::RETIRED, now))
            .collect();
        writes.push(moved(p, state::ACTIVE, now));
        self.store.update_authorities(&writes).await?;
        let changed: Vec<Authority> = writes.into_iter().map(|(a, _)| a).collect();
        self.count(kind, "activated");
        for a in &changed {
            audit_write(
                &self.audit,
                Event::new(if a.state == state::ACTIVE {
                    "ca_activated"
                } else {
                    "ca_retired"
                })
                .with("kind", kind)
                .with("id", a.id.clone())
                .with("not_after", a.not_after),
            )
            .await?;
        }
        tracing::info!(kind, id, "authority activated");
        Ok(changed)
    }

    pub(super) async fn remove_locked(
        &self,
        kind: &str,
        id: &str,
        now: SystemTime,
        transition: &'static str,
    ) -> Result<(), CaError> {
        let journal = self.store.list_authorities().await?;
        let a = own(&journal, &self.owner, kind)
            .into_iter()
            .find(|a| a.id == id)
            .ok_or_else(|| CaError::NotFound(id.into()))?;
        let a = self.set_state(a, state::REMOVED, now).await?;
        // A removed authority never signs again.
        self.keys.delete(kind, &a.id)?;
        self.count(kind, transition);
        audit_write(
            &self.audit,
            Event::new(&format!("ca_{transition}"))
                .with("kind", kind)
                .with("id", a.id.clone()),
        )
        .await?;
        tracing::info!(kind, id, "authority {transition} from the bundle");
        Ok(())
    }
}

pub(super) fn check_activatable(
    td: &str,
    p: &Authority,
    keys: &KeyDir,
    now: SystemTime,
) -> Result<(), CaError> {
    let t = unix(now);
    if !schedule::usable(p, t) {
        return Err(CaError::Refused(format!(
            "authority {} is outside its validity window ({}..{})",
            p.id, p.not_before, p.not_after
        )));
    }
    if p.kind == X509 {
        let key = keys.get(X509, &p.id)?;
        SigningCa::from_authority(td, p, key, now)?;
    } else {
        let der = keys.get_pkcs8(JWT, &p.id)?;
        JwtSigner::from_pkcs8(&der, SystemTime::UNIX_EPOCH)?;
    }
    Ok(())
}

pub(super) async fn audit_write(audit: &AuditLog, ev: Event) -> Result<(), CaError> {
    audit
        .record(vec![ev])
        .await
        .map_err(|e| CaError::Audit(e.to_string()))
}

pub(super) fn load_signer_x509(
    td: &str,
    mine: &[Authority],
    keys: &KeyDir,
    now: SystemTime,
) -> Result<SigningCa, CaError> {
    let a = mine
        .iter()
        .filter(|a| a.state == state::ACTIVE)
        .max_by_key(|a| a.activated_at)
        .ok_or_else(|| CaError::Refused("no active X.509 CA".into()))?;
    SigningCa::from_authority(td, a, keys.get(X509, &a.id)?, now)
}

pub(super) fn load_signer_jwt(mine: &[Authority], keys: &KeyDir) -> Result<JwtSigner, CaError> {
    let a = mine
        .iter()
        .filter(|a| a.state == state::ACTIVE)
        .max_by_key(|a| a.activated_at)
        .ok_or_else(|| CaError::Refused("no active JWT key".into()))?;
    let na = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(a.not_after).unwrap_or(0));
    JwtSigner::from_pkcs8(&keys.get_pkcs8(JWT, &a.id)?, na)
}

/// `a` moved to state `to` at `now`, with its next revision; and the
/// revision the store must still hold for the move to apply.
fn moved(mut a: Authority, to: &str, now: SystemTime) -> (Authority, i64) {
    let expected = a.revision;
    a.revision += 1;
    a.state = to.into();
    match to {
        state::ACTIVE => a.activated_at = unix(now),
        state::RETIRED => a.retired_at = unix(now),
        state::REMOVED => a.removed_at = unix(now),
        _ => {}
    }
    (a, expected)
}
