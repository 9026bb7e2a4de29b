//! The chain gate: what the trust domain's bundle may hold. Run before a
//! bundle is stored or published, and before an authority is imported or
//! activated, so that an expired, not-yet-valid or mis-constrained CA is
//! never served, and a bundle change never orphans a live certificate.

use std::time::SystemTime;

use meshid_identity::svid::{to_system_time, unix};
use meshid_proto::types::Authority;
use x509_parser::prelude::*;

use super::schedule::state;
use super::{CaError, validate};

/// The X.509 authorities of a bundle, and what was left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct X509Bundle {
    /// DER roots, in journal order, without duplicates.
    pub roots: Vec<Vec<u8>>,
    /// Authorities or roots left out because they expired (for the log).
    pub pruned: Vec<String>,
}

/// Whether an authority belongs in the bundle: prepared, active or retired,
/// and not yet expired.
pub fn published(a: &Authority, now: i64) -> bool {
    matches!(
        a.state.as_str(),
        state::PREPARED | state::ACTIVE | state::RETIRED
    ) && a.not_after > now
}

fn root_not_after(der: &[u8]) -> Option<i64> {
    X509Certificate::from_der(der)
        .ok()
        .map(|(_, c)| unix(to_system_time(c.validity().not_after)))
}

/// Builds the X.509 roots of the bundle from the journal and checks them:
/// expired authorities and roots are pruned; every published authority's
/// chain must verify to the roots (validity window, CA and pathLen,
/// keyCertSign, signatures); and every authority that still has live
/// certificates (`live(id) > 0`) must keep verifying, or the bundle is
/// refused with the number of certificates it would orphan.
pub fn x509_bundle(
    journal: &[Authority],
    live: &dyn Fn(&str) -> i64,
    now: SystemTime,
) -> Result<X509Bundle, CaError> {
    let t = unix(now);
    let mut out = X509Bundle::default();
    for a in journal.iter().filter(|a| a.kind == super::mint::X509) {
        if !published(a, t) {
            if a.state != state::REMOVED && a.state != state::PENDING && a.not_after <= t {
                out.pruned.push(format!("authority {} (expired)", a.id));
            }
            continue;
        }
        for r in &a.roots {
            if out.roots.contains(r) {
                continue;
            }
            if root_not_after(r).is_none_or(|na| na <= t) {
                out.pruned
                    .push(format!("a root of authority {} (expired)", a.id));
                continue;
            }
            out.roots.push(r.clone());
        }
    }
    for a in journal
        .iter()
        .filter(|a| a.kind == super::mint::X509 && published(a, t))
    {
        validate::validate_chain(&a.chain, &out.roots, now).map_err(|e| {
            CaError::Refused(format!(
                "{} authority {} does not verify against the bundle: {e}",
                a.state, a.id
            ))
        })?;
    }
    for a in journal.iter().filter(|a| a.kind == super::mint::X509) {
        let n = live(&a.id);
        if n > 0 && validate::validate_chain(&a.chain, &out.roots, now).is_err() {
            return Err(CaError::Refused(format!(
                "the bundle would orphan {n} live certificate(s) signed by authority {}; \
                 taint it and wait until they are re-minted, or force",
                a.id
            )));
        }
    }
    if out.roots.is_empty() {
        return Err(CaError::Refused(
            "the bundle would hold no X.509 authority".into(),
        ));
    }
    Ok(out)
}

/// Checks a CA chain offered for import (an intermediate signed offline):
/// valid now, a CA with keyCertSign and a path length that allows signing
/// leaves, verifying to `roots`, and not ending before `min_not_after`
/// (an intermediate must outlive what it will sign).
pub fn check_import(
    chain: &[Vec<u8>],
    roots: &[Vec<u8>],
    min_not_after: SystemTime,
    now: SystemTime,
) -> Result<SystemTime, CaError> {
    let na = validate::validate_chain(chain, roots, now)?;
    if na < min_not_after {
        return Err(CaError::Refused(format!(
            "the chain ends at {}, before {}: it could not sign certificates for their full lifetime",
            humantime::format_rfc3339_seconds(na),
            humantime::format_rfc3339_seconds(min_not_after)
        )));
    }
    Ok(na)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ca(ttl: u64, now: SystemTime) -> Authority {
        let (mut a, _) =
            super::super::mint::self_signed("example.org", Duration::from_secs(ttl), "s", now)
                .expect("ca");
        a.state = state::ACTIVE.into();
        a
    }

    #[test]
    fn expired_authorities_are_pruned_not_served() {
        let now = SystemTime::now();
        let old = ca(60, now - Duration::from_secs(120));
        let cur = ca(600, now);
        let b = x509_bundle(&[old.clone(), cur.clone()], &|_| 0, now).expect("bundle");
        assert_eq!(b.roots, cur.roots);
        assert_eq!(b.pruned.len(), 1);
    }

    #[test]
    fn removing_a_root_with_live_certificates_is_refused() {
        let now = SystemTime::now();
        let a = ca(600, now);
        let mut b = ca(600, now);
        b.state = state::RETIRED.into();
        let mut removed = b.clone();
        removed.state = state::REMOVED.into();
        let id = b.id.clone();
        let live = move |x: &str| if x == id { 3 } else { 0 };
        let err = x509_bundle(&[a.clone(), removed], &live, now).expect_err("orphans");
        assert!(err.to_string().contains("orphan 3 live"), "{err}");
        assert!(x509_bundle(&[a, b], &live, now).is_ok());
    }
}
