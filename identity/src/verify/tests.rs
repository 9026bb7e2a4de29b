#![allow(clippy::unwrap_used)]
//! The verifier every meshid part trusts, case by case. Clauses quoted
//! are from the SPIFFE X509-SVID standard.
use super::*;
use crate::svid::SvidError;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::ServerName;
use std::time::Duration;

const WEB: &str = "spiffe://example.org/web";

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
}

fn ca_with(td: &str, f: impl FnOnce(&mut CertificateParams)) -> Ca {
    let mut p = CertificateParams::new(vec![]).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, td);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.subject_alt_names = vec![SanType::URI(format!("spiffe://{td}").try_into().unwrap())];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(30);
    f(&mut p);
    let key = KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    Ca {
        der: cert.der().clone(),
        issuer: Issuer::new(p, key),
    }
}

fn ca(td: &str) -> Ca {
    ca_with(td, |_| {})
}

/// A good leaf SVID for `WEB`, then altered by `f`.
fn leaf(ca: &Ca, f: impl FnOnce(&mut CertificateParams)) -> CertificateDer<'static> {
    let mut p = CertificateParams::new(vec![]).unwrap();
    p.subject_alt_names = vec![SanType::URI(WEB.try_into().unwrap())];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::minutes(1);
    p.not_after = now + time::Duration::hours(1);
    f(&mut p);
    let key = KeyPair::generate().unwrap();
    p.signed_by(&key, &ca.issuer).unwrap().der().clone()
}

fn bundles(cas: &[(&str, &Ca)]) -> TrustBundles {
    let mut b = TrustBundles::new();
    for (td, ca) in cas {
        assert_eq!(b.add(td, std::slice::from_ref(&ca.der)), 0);
    }
    b
}

fn at(offset_secs: i64) -> UnixTime {
    let now = UnixTime::now().as_secs();
    UnixTime::since_unix_epoch(Duration::from_secs(now.saturating_add_signed(offset_secs)))
}

/// Verifies `leaf` as a client with `authorizer`, at `now`; the metric
/// label of the failure, or "ok".
fn client(
    b: TrustBundles,
    authorizer: Authorizer,
    leaf: &CertificateDer<'_>,
    now: UnixTime,
) -> (&'static str, String) {
    let v = SpiffeClientVerifier::new(b, authorizer, &crypto::provider(), true);
    match v.verify_client_cert(leaf, &[], now) {
        Ok(_) => ("ok", String::new()),
        Err(e) => (classify(&e), describe(&e)),
    }
}

fn any_client(b: TrustBundles, leaf: &CertificateDer<'_>) -> (&'static str, String) {
    client(b, Authorizer::Any, leaf, UnixTime::now())
}

use crate::crypto;

#[test]
fn good_leaf_verifies_as_client_and_server() {
    let ca = ca("example.org");
    let l = leaf(&ca, |_| {});
    assert_eq!(any_client(bundles(&[("example.org", &ca)]), &l).0, "ok");
    let v = SpiffeServerVerifier::new(
        bundles(&[("example.org", &ca)]),
        Authorizer::Exact(SpiffeId::new(WEB).unwrap()),
        &crypto::provider(),
    );
    let name = ServerName::try_from("web.invalid").unwrap();
    v.verify_server_cert(&l, &[], &name, &[], UnixTime::now())
        .unwrap();
    assert_eq!(
        verify_svid_chain(
            &bundles(&[("example.org", &ca)]),
            &[l],
            UnixTime::now(),
            &crypto::provider()
        )
        .unwrap()
        .to_string(),
        WEB
    );
}

/// "the chain verifies against the bundle of the leaf's trust domain":
/// a leaf claiming another trust domain is not accepted on the strength
/// of this trust domain's CA, even when both bundles are present.
#[test]
fn trust_domain_mismatch_is_unknown_ca() {
    let ours = ca("example.org");
    let theirs = ca("other.org");
    let forged = leaf(&ours, |p| {
        p.subject_alt_names = vec![SanType::URI("spiffe://other.org/web".try_into().unwrap())];
    });
    assert_eq!(
        any_client(bundles(&[("example.org", &ours)]), &forged).0,
        "unknown_ca"
    );
    assert_eq!(
        any_client(
            bundles(&[("example.org", &ours), ("other.org", &theirs)]),
            &forged
        )
        .0,
        "unknown_ca"
    );
    // And an unknown trust domain altogether.
    let (label, msg) = any_client(bundles(&[("other.org", &theirs)]), &leaf(&ours, |_| {}));
    assert_eq!(label, "unknown_ca", "{msg}");
}

/// X509-SVID §4.4: leaf SVIDs carry id-kp-serverAuth and id-kp-clientAuth;
/// a certificate lacking the purpose it is used for is refused.
#[test]
fn wrong_eku_is_bad_purpose() {
    let ca = ca("example.org");
    let server_only = leaf(&ca, |p| {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    });
    let (label, msg) = any_client(bundles(&[("example.org", &ca)]), &server_only);
    assert_eq!(label, "bad_purpose", "{msg}");
    let client_only = leaf(&ca, |p| {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    });
    let v = SpiffeServerVerifier::new(
        bundles(&[("example.org", &ca)]),
        Authorizer::Any,
        &crypto::provider(),
    );
    let name = ServerName::try_from("web.invalid").unwrap();
    let e = v
        .verify_server_cert(&client_only, &[], &name, &[], UnixTime::now())
        .unwrap_err();
    assert_eq!(classify(&e), "bad_purpose");
    let e = verify_svid_chain(
        &bundles(&[("example.org", &ca)]),
        &[client_only],
        UnixTime::now(),
        &crypto::provider(),
    )
    .unwrap_err();
    assert_eq!(classify(&e), "bad_purpose", "own SVIDs need both purposes");
}

#[test]
fn expired_and_not_yet_valid_leaves_are_refused() {
    let ca = ca("example.org");
    let l = leaf(&ca, |_| {});
    let b = || bundles(&[("example.org", &ca)]);
    let (label, msg) = client(b(), Authorizer::Any, &l, at(2 * 3600));
    assert_eq!(label, "expired", "{msg}");
    assert!(msg.starts_with("certificate expired"), "{msg}");
    let (label, msg) = client(b(), Authorizer::Any, &l, at(-3600));
    assert_eq!(label, "not_yet_valid", "{msg}");
    assert_eq!(client(b(), Authorizer::Any, &l, at(0)).0, "ok");
}

#[test]
fn denied_spiffe_id_is_refused_after_the_chain_verified() {
    let ca = ca("example.org");
    let l = leaf(&ca, |_| {});
    let other = Authorizer::Exact(SpiffeId::new("spiffe://example.org/payments").unwrap());
    let (label, msg) = client(bundles(&[("example.org", &ca)]), other, &l, UnixTime::now());
    assert_eq!(label, "denied");
    assert_eq!(msg, format!("{DENIED}: {WEB}"));
    // A chain that does not verify is refused for that, not for policy.
    let stranger = ca_with("example.org", |_| {});
    let other = Authorizer::Exact(SpiffeId::new("spiffe://example.org/payments").unwrap());
    let (label, _m) = client(
        bundles(&[("example.org", &stranger)]),
        other,
        &l,
        UnixTime::now(),
    );
    assert_eq!(label, "unknown_ca", "{_m}");
}

/// X509-SVID §5.2: "the validator MUST ensure that the `CA` field in the
/// basic constraints extension is set to `false`, and that `keyCertSign`
/// and `cRLSign` are not set in the key usage extension. The validator
/// MUST also ensure that the scheme of the SPIFFE ID is set to `spiffe`,
/// and MUST ensure that the SPIFFE ID has a non-root path component ...
/// SVIDs containing more than one URI SAN MUST be rejected."
/// X509-SVID §4.3: "Leaf SVIDs MUST set `digitalSignature`."
#[test]
fn leaf_rules_of_x509_svid() {
    let ca = ca("example.org");
    type Alter = fn(&mut CertificateParams);
    let cases: &[(&str, Alter, LeafError)] = &[
        (
            "CA certificate as leaf",
            |p| {
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
                p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            },
            LeafError::Ca,
        ),
        (
            "cA=true with leaf key usage",
            |p| p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0)),
            LeafError::Ca,
        ),
        (
            "keyCertSign on a leaf",
            |p| {
                p.key_usages = vec![
                    KeyUsagePurpose::DigitalSignature,
                    KeyUsagePurpose::KeyCertSign,
                ];
            },
            LeafError::KeyCertSign,
        ),
        (
            "cRLSign on a leaf",
            |p| {
                p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign];
            },
            LeafError::CrlSign,
        ),
        (
            "no digitalSignature",
            |p| p.key_usages = vec![KeyUsagePurpose::KeyEncipherment],
            LeafError::NoDigitalSignature,
        ),
        (
            "no key usage extension",
            |p| p.key_usages = vec![],
            LeafError::NoKeyUsage,
        ),
        (
            "two URI SANs",
            |p| {
                p.subject_alt_names = vec![
                    SanType::URI(WEB.try_into().unwrap()),
                    SanType::URI("spiffe://example.org/admin".try_into().unwrap()),
                ];
            },
            LeafError::Svid(SvidError::MultipleUris(2)),
        ),
        (
            "no URI SAN",
            |p| p.subject_alt_names = vec![SanType::DnsName("web".try_into().unwrap())],
            LeafError::Svid(SvidError::NoSpiffeId),
        ),
        (
            "root path (the trust domain's own ID)",
            |p| {
                p.subject_alt_names =
                    vec![SanType::URI("spiffe://example.org".try_into().unwrap())];
            },
            LeafError::RootPath("spiffe://example.org".into()),
        ),
    ];
    for (what, alter, want) in cases {
        let l = leaf(&ca, alter);
        assert_eq!(check_leaf(&l).as_ref(), Err(want), "{what}");
        let (label, msg) = any_client(bundles(&[("example.org", &ca)]), &l);
        assert_eq!(label, "not_svid", "{what}: {msg}");
        assert_eq!(msg, format!("{NOT_SVID}: {want}"), "{what}");
    }
    // Not the spiffe scheme.
    let l = leaf(&ca, |p| {
        p.subject_alt_names = vec![SanType::URI("https://example.org/web".try_into().unwrap())];
    });
    assert!(matches!(
        check_leaf(&l),
        Err(LeafError::Svid(SvidError::InvalidSpiffeId { .. }))
    ));
    assert_eq!(
        any_client(bundles(&[("example.org", &ca)]), &l).0,
        "not_svid"
    );
    // Garbage DER.
    assert!(matches!(
        check_leaf(b"\x30\x03\x02\x01\x00"),
        Err(LeafError::Svid(SvidError::Malformed(_)))
    ));
}

/// webpki does not look at the validity of trust anchors; the bundle
/// does: a root past its notAfter verifies nothing, even a leaf that is
/// itself still within its validity window.
#[test]
fn expired_root_is_not_a_trust_anchor() {
    let short = ca_with("example.org", |p| {
        p.not_after = time::OffsetDateTime::now_utc() + time::Duration::minutes(30);
    });
    let l = leaf(&short, |_| {});
    let b = || bundles(&[("example.org", &short)]);
    assert_eq!(client(b(), Authorizer::Any, &l, at(0)).0, "ok");
    let (label, msg) = client(b(), Authorizer::Any, &l, at(45 * 60));
    assert_eq!(label, "unknown_ca", "{msg}");

    // Pruning: an expired root goes, a valid one stays.
    let good = ca("example.org");
    let mut both = bundles(&[("example.org", &short), ("example.org", &good)]);
    assert_eq!(both.root_count("example.org"), 2);
    assert_eq!(both.prune_expired(at(0)), 0);
    assert_eq!(both.prune_expired(at(45 * 60)), 1);
    assert_eq!(both.root_count("example.org"), 1);
    let l2 = leaf(&good, |_| {});
    assert_eq!(client(both.clone(), Authorizer::Any, &l2, at(0)).0, "ok");
    assert_eq!(client(both, Authorizer::Any, &l, at(0)).0, "unknown_ca");
}

#[test]
fn bundles_skip_unusable_and_duplicate_roots() {
    let ca = ca("example.org");
    let mut b = TrustBundles::new();
    let garbage = CertificateDer::from(vec![0x30, 0x00]);
    assert_eq!(b.add("example.org", &[ca.der.clone(), garbage]), 1);
    assert_eq!(b.add("example.org", std::slice::from_ref(&ca.der)), 0);
    assert_eq!(b.root_count("example.org"), 1);
    assert_eq!(b, bundles(&[("example.org", &ca)]));
    let mut c = TrustBundles::new();
    c.copy_domain_from(&b, "example.org");
    assert_eq!(c, b);
    c.copy_domain_from(&TrustBundles::new(), "example.org");
    assert_eq!(c.root_count("example.org"), 0);
}

/// A chain through an intermediate verifies; the intermediate's own
/// validity is checked (by webpki), so an expired intermediate fails.
#[test]
fn chain_through_intermediate() {
    let root = ca("example.org");
    let inter = {
        let mut p = CertificateParams::new(vec![]).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        p.distinguished_name.push(DnType::CommonName, "inter");
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::minutes(30);
        let key = KeyPair::generate().unwrap();
        let der = p.signed_by(&key, &root.issuer).unwrap().der().clone();
        Ca {
            der,
            issuer: Issuer::new(p, key),
        }
    };
    let l = leaf(&inter, |_| {});
    let v = SpiffeClientVerifier::new(
        bundles(&[("example.org", &root)]),
        Authorizer::Any,
        &crypto::provider(),
        true,
    );
    v.verify_client_cert(&l, std::slice::from_ref(&inter.der), at(0))
        .unwrap();
    let e = v
        .verify_client_cert(&l, std::slice::from_ref(&inter.der), at(45 * 60))
        .unwrap_err();
    assert_eq!(classify(&e), "expired");
    let e = v.verify_client_cert(&l, &[], at(0)).unwrap_err();
    assert_eq!(classify(&e), "unknown_ca", "intermediate missing");
}

/// A revocation check with a fixed answer, counting its calls.
#[derive(Debug)]
struct Fixed(Result<(), RevocationError>, std::sync::atomic::AtomicUsize);
impl RevocationCheck for Fixed {
    fn check(
        &self,
        _id: &SpiffeId,
        _ee: &CertificateDer<'_>,
        _im: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<(), RevocationError> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.0.clone()
    }
}

#[test]
fn revocation_hook_runs_after_the_chain_and_before_policy() {
    let a = ca("example.org");
    let other = ca("example.org");
    let good = leaf(&a, |_| {});
    let foreign = leaf(&other, |_| {});
    let p = crypto::provider();
    let run = |answer: Result<(), RevocationError>,
               authorizer: Authorizer,
               l: &CertificateDer<'_>|
     -> (&'static str, String, usize) {
        let hook = Arc::new(Fixed(answer, std::sync::atomic::AtomicUsize::new(0)));
        let v = SpiffeClientVerifier::with_revocation(
            bundles(&[("example.org", &a)]),
            authorizer,
            &p,
            true,
            Some(hook.clone()),
        );
        let calls = || hook.1.load(std::sync::atomic::Ordering::Relaxed);
        match v.verify_client_cert(l, &[], UnixTime::now()) {
            Ok(_) => ("ok", String::new(), calls()),
            Err(e) => (classify(&e), describe(&e), calls()),
        }
    };
    assert_eq!(run(Ok(()), Authorizer::Any, &good).0, "ok");
    let (label, msg, _) = run(Err(RevocationError::Revoked), Authorizer::Any, &good);
    assert_eq!(label, "revoked");
    assert!(msg.contains("revoked"), "{msg}");
    let (label, msg, _) = run(
        Err(RevocationError::Unknown("CRL stale".into())),
        Authorizer::Any,
        &good,
    );
    assert_eq!(label, "revocation_unknown");
    assert!(msg.contains("CRL stale"), "{msg}");
    // A revoked peer is refused as revoked even where policy would deny it.
    let none = Authorizer::Func(Arc::new(|_| false));
    assert_eq!(run(Err(RevocationError::Revoked), none, &good).0, "revoked");
    // An unverified chain never reaches the hook.
    let (label, _, calls) = run(Err(RevocationError::Revoked), Authorizer::Any, &foreign);
    assert_eq!((label, calls), ("unknown_ca", 0));
    // The server verifier runs it too.
    let v = SpiffeServerVerifier::with_revocation(
        bundles(&[("example.org", &a)]),
        Authorizer::Any,
        &p,
        Some(Arc::new(Fixed(
            Err(RevocationError::Revoked),
            std::sync::atomic::AtomicUsize::new(0),
        ))),
    );
    let name = ServerName::try_from("x.invalid").unwrap();
    let e = v
        .verify_server_cert(&good, &[], &name, &[], UnixTime::now())
        .unwrap_err();
    assert_eq!(classify(&e), "revoked");
}
