//! Whether a Workload API update may be used: the SVID chain against the
//! update's bundle, else against the last good one (see the module docs of
//! [`crate::identity`]). Pure: no state, no I/O.

use std::time::{Duration, SystemTime};

use meshid_identity::TrustBundles;
use meshid_identity::crypto;
use meshid_identity::verify::{describe, verify_svid_chain};
use rustls_pki_types::{CertificateDer, UnixTime};

/// What to do with a Workload API update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleDecision {
    /// The SVID verifies against the update's bundle: take the update.
    Accept,
    /// The update's bundle would not verify the SVID but the last good one
    /// does: keep the last good bundle of `trust_domain`.
    KeepLastBundle {
        /// The SVID's trust domain.
        trust_domain: String,
        /// Why the update's bundle does not verify the SVID.
        reason: String,
    },
    /// The SVID verifies against neither: refuse the whole update.
    Refuse {
        /// Why the SVID does not verify against the update's bundle.
        reason: String,
    },
}

/// Decides whether an update with SVID `chain` and `bundles` (expired roots
/// already pruned) may be used, given the last good bundles (`None` before
/// the first SVID).
pub fn decide_update(
    chain: &[CertificateDer<'_>],
    bundles: &TrustBundles,
    last_good: Option<&TrustBundles>,
    now: SystemTime,
) -> BundleDecision {
    let provider = crypto::provider();
    let now = UnixTime::since_unix_epoch(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO),
    );
    let err = match verify_svid_chain(bundles, chain, now, &provider) {
        Ok(_) => return BundleDecision::Accept,
        Err(e) => describe(&e),
    };
    match last_good.map(|lg| verify_svid_chain(lg, chain, now, &provider)) {
        Some(Ok(id)) => BundleDecision::KeepLastBundle {
            trust_domain: id.trust_domain().as_str().to_string(),
            reason: err,
        },
        _ => BundleDecision::Refuse { reason: err },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::identity::test_support::{Ca, TD, bundle, svid, svid_between};

    fn keep() -> BundleDecision {
        BundleDecision::KeepLastBundle {
            trust_domain: TD.into(),
            reason: String::new(),
        }
    }

    /// Compares decisions ignoring the reason text.
    fn same(a: &BundleDecision, b: &BundleDecision) -> bool {
        match (a, b) {
            (BundleDecision::Accept, BundleDecision::Accept) => true,
            (
                BundleDecision::KeepLastBundle {
                    trust_domain: x, ..
                },
                BundleDecision::KeepLastBundle {
                    trust_domain: y, ..
                },
            ) => x == y,
            (BundleDecision::Refuse { .. }, BundleDecision::Refuse { .. }) => true,
            _ => false,
        }
    }

    /// (what, SVID chain, update bundle, last good bundle, expected).
    type Case = (
        &'static str,
        Vec<CertificateDer<'static>>,
        TrustBundles,
        Option<TrustBundles>,
        BundleDecision,
    );

    #[test]
    fn decide_update_cases() {
        let old = Ca::new("old");
        let new = Ca::new("new");
        let stranger = Ca::new("stranger");
        let refuse = BundleDecision::Refuse {
            reason: String::new(),
        };
        let cases: Vec<Case> = vec![
            (
                "first SVID, verifies",
                svid(&old),
                bundle(&[&old]),
                None,
                BundleDecision::Accept,
            ),
            (
                "first SVID, untrusted",
                svid(&stranger),
                bundle(&[&old]),
                None,
                refuse.clone(),
            ),
            (
                "rotation: both roots, SVID under the old one",
                svid(&old),
                bundle(&[&old, &new]),
                Some(bundle(&[&old])),
                BundleDecision::Accept,
            ),
            (
                "rotation: both roots, SVID under the new one",
                svid(&new),
                bundle(&[&old, &new]),
                Some(bundle(&[&old, &new])),
                BundleDecision::Accept,
            ),
            (
                "new SVID together with a new bundle",
                svid(&new),
                bundle(&[&new]),
                Some(bundle(&[&old])),
                BundleDecision::Accept,
            ),
            (
                "bundle drops the root of the current SVID",
                svid(&old),
                bundle(&[&new]),
                Some(bundle(&[&old])),
                keep(),
            ),
            (
                "empty own bundle",
                svid(&old),
                TrustBundles::new(),
                Some(bundle(&[&old])),
                keep(),
            ),
            (
                "new SVID whose root is in neither bundle",
                svid(&new),
                bundle(&[&old]),
                Some(bundle(&[&old])),
                refuse.clone(),
            ),
            (
                "expired SVID",
                svid_between(&old, -120, -60).0,
                bundle(&[&old]),
                Some(bundle(&[&old])),
                refuse.clone(),
            ),
            (
                "no certificate",
                vec![],
                bundle(&[&old]),
                Some(bundle(&[&old])),
                refuse.clone(),
            ),
        ];
        for (what, chain, b, last, want) in &cases {
            let got = decide_update(chain, b, last.as_ref(), SystemTime::now());
            assert!(same(&got, want), "{what}: got {got:?}, want {want:?}");
        }
    }
}
