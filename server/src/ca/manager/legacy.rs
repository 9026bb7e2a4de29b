//! The files of the older single-CA layout (`<data_dir>/ca/signing-ca.{pem,key}`
//! and `ca/jwt.key`), imported once into the journal as the active
//! authorities, so that an upgraded server keeps the trust its agents hold.

use std::sync::Arc;
use std::time::SystemTime;

use meshid_identity::svid::unix;
use meshid_proto::types::Authority;

use super::audit_write;
use crate::audit::{AuditLog, Event};
use crate::ca::keys::KeyDir;
use crate::ca::mint::{self, JWT, X509};
use crate::ca::schedule::state;
use crate::ca::{CaError, JwtSigner, SigningCa};
use crate::config::ServerConfig;
use crate::store::Store;

/// Imports `<data_dir>/ca/signing-ca.{pem,key}` of an older layout as the
/// active X.509 authority, if it is still valid.
pub(super) async fn import_legacy_x509(
    cfg: &ServerConfig,
    owner: &str,
    keys: &KeyDir,
    store: &Arc<dyn Store>,
    audit: &AuditLog,
    now: SystemTime,
) -> Result<(), CaError> {
    let dir = cfg.data_dir.join("ca");
    let (cert, key) = (dir.join("signing-ca.pem"), dir.join("signing-ca.key"));
    if !cert.exists() || !key.exists() {
        return Ok(());
    }
    let chain = mint::read_pem_certs(&cert)?;
    let kp = mint::read_key(&key)?;
    let (roots, origin) = match &cfg.upstream {
        Some(u) => (mint::Upstream::load(u, now)?.roots, "upstream"),
        None => (chain.first().cloned().into_iter().collect(), "self_signed"),
    };
    let mut full = chain.clone();
    if let Some(u) = &cfg.upstream {
        for c in mint::Upstream::load(u, now)?.chain {
            if !full.contains(&c) {
                full.push(c);
            }
        }
    }
    let mut rec = mint::x509_record(full, roots, origin, owner, now)?;
    if SigningCa::from_authority(&cfg.trust_domain, &rec, mint::read_key(&key)?, now).is_err() {
        tracing::warn!(path = %cert.display(), "CA of the older layout is not usable; not imported");
        return Ok(());
    }
    keys.put(X509, &rec.id, &kp)?;
    rec.state = state::ACTIVE.into();
    rec.activated_at = unix(now);
    store.insert_authority(&rec).await?;
    audit_write(
        audit,
        Event::new("ca_imported_legacy").with("id", rec.id.clone()),
    )
    .await?;
    let _ = std::fs::remove_file(&key);
    tracing::info!(id = %rec.id, "CA of the older layout imported into the journal");
    Ok(())
}

pub(super) async fn import_legacy_jwt(
    cfg: &ServerConfig,
    owner: &str,
    keys: &KeyDir,
    store: &Arc<dyn Store>,
    audit: &AuditLog,
    now: SystemTime,
) -> Result<(), CaError> {
    let path = cfg.data_dir.join("ca").join("jwt.key");
    let Ok(der) = std::fs::read(&path) else {
        return Ok(());
    };
    let ttl = cfg.jwt_policy().ttl;
    let signer = JwtSigner::from_pkcs8(&der, now + ttl)?;
    let rec = Authority {
        id: signer.kid().to_string(),
        kind: JWT.into(),
        owner: owner.into(),
        state: state::ACTIVE.into(),
        public_key: signer.public_key_der().to_vec(),
        not_before: unix(now),
        not_after: unix(now + ttl),
        prepared_at: unix(now),
        activated_at: unix(now),
        origin: "self_signed".into(),
        revision: 1,
        ..Authority::default()
    };
    keys.put_pkcs8(JWT, &rec.id, &der)?;
    store.insert_authority(&rec).await?;
    audit_write(
        audit,
        Event::new("ca_imported_legacy")
            .with("kind", JWT)
            .with("id", rec.id.clone()),
    )
    .await?;
    let _ = std::fs::remove_file(&path);
    Ok(())
}
