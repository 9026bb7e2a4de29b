//! Certificates for the identity unit tests.

#![allow(clippy::unwrap_used)]

use meshid_identity::TrustBundles;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::SvidMaterial;

pub(crate) const TD: &str = "example.org";
pub(crate) const ME: &str = "spiffe://example.org/web";

pub(crate) struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
}

impl Ca {
    pub(crate) fn until(name: &str, not_after: time::OffsetDateTime) -> Self {
        let mut p = CertificateParams::new(vec![]).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        p.not_after = not_after;
        let key = KeyPair::generate().unwrap();
        let der = p.self_signed(&key).unwrap().der().clone();
        Self {
            der,
            issuer: Issuer::new(p, key),
        }
    }

    pub(crate) fn new(name: &str) -> Self {
        Self::until(
            name,
            time::OffsetDateTime::now_utc() + time::Duration::days(30),
        )
    }
}

/// An SVID for `ME` under `ca`, valid from `from` to `until` (minutes from
/// now).
pub(crate) fn svid_between(
    ca: &Ca,
    from: i64,
    until: i64,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let mut p = CertificateParams::new(vec![]).unwrap();
    p.subject_alt_names = vec![SanType::URI(ME.try_into().unwrap())];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now + time::Duration::minutes(from);
    p.not_after = now + time::Duration::minutes(until);
    let key = KeyPair::generate().unwrap();
    let der = p.signed_by(&key, &ca.issuer).unwrap().der().clone();
    (vec![der], PrivateKeyDer::Pkcs8(key.serialize_der().into()))
}

pub(crate) fn svid(ca: &Ca) -> Vec<CertificateDer<'static>> {
    svid_between(ca, -1, 60).0
}

pub(crate) fn bundle(cas: &[&Ca]) -> TrustBundles {
    let mut b = TrustBundles::new();
    let ders: Vec<_> = cas.iter().map(|c| c.der.clone()).collect();
    assert_eq!(b.add(TD, &ders), 0);
    b
}

pub(crate) fn material(ca: &Ca, roots: &[&Ca]) -> SvidMaterial {
    let (chain, key) = svid_between(ca, -1, 60);
    SvidMaterial {
        chain,
        key,
        bundles: bundle(roots),
    }
}
