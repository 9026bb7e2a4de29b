//! What the demo's last scene needs: an upstream CA chain whose
//! intermediate expired 24 minutes ago.

use std::path::{Path, PathBuf};

pub(super) fn expired_intermediate(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let root_key = KeyPair::generate()?;
    let mut rp = CertificateParams::new(Vec::<String>::new())?;
    rp.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    rp.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    rp.distinguished_name
        .push(DnType::CommonName, "corp root CA");
    let root = rp.self_signed(&root_key)?;
    let key = KeyPair::generate()?;
    let mut ip = CertificateParams::new(Vec::<String>::new())?;
    ip.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    ip.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    ip.distinguished_name
        .push(DnType::CommonName, "corp intermediate CA (expired)");
    ip.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(400);
    ip.not_after = time::OffsetDateTime::now_utc() - time::Duration::minutes(24);
    let int = ip.signed_by(&key, &Issuer::new(rp, root_key))?;
    let cert = dir.join("upstream.pem");
    let k = dir.join("upstream.key");
    std::fs::write(&cert, format!("{}{}", int.pem(), root.pem()))?;
    std::fs::write(&k, key.serialize_pem())?;
    Ok((cert, k))
}
