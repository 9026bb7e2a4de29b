//! rustls verifiers for SPIFFE peers.
//!
//! Order of checks, each with its own error so metrics can tell them apart:
//! 1. the leaf is an X509-SVID leaf (X509-SVID §5.2): exactly one URI SAN
//!    holding a SPIFFE ID with a path, `cA` not set, key usage present with
//!    `digitalSignature` and without `keyCertSign` / `cRLSign`;
//! 2. the chain verifies (webpki) against the bundle of the leaf's trust
//!    domain, for the right extended key usage, at the current time; roots
//!    past their notAfter are not used as trust anchors;
//! 3. the SPIFFE ID is authorized by policy.
//!
//! A verifier is immutable: when bundles change, build a new one and swap the
//! whole rustls config, so no handshake ever sees a half-updated trust store.

mod chain;
mod errors;
mod leaf;
mod revocation;
mod verifiers;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use spiffe::SpiffeId;
use x509_parser::prelude::{FromDer, X509Certificate};

pub use chain::{CLOCK_SKEW_TOLERANCE, DENIED, verify_svid_chain};
pub use errors::{classify, describe};
pub use leaf::{LeafError, NOT_SVID, check_leaf};
pub use revocation::{REVOCATION_UNKNOWN, RevocationCheck, RevocationError};
pub use verifiers::{SpiffeClientVerifier, SpiffeServerVerifier};

/// The roots of one trust domain, each with its notAfter (Unix seconds).
#[derive(Clone, Default, PartialEq, Eq)]
struct Roots {
    anchors: Vec<TrustAnchor<'static>>,
    not_after: Vec<u64>,
}

/// Trust anchors per trust domain name (without scheme).
///
/// Each root keeps its notAfter: a root past it is never used to verify a
/// chain (webpki itself does not look at the validity of trust anchors), and
/// [`TrustBundles::prune_expired`] removes such roots when configs are built.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TrustBundles {
    roots: BTreeMap<String, Roots>,
}

impl fmt::Debug for TrustBundles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.roots.iter().map(|(k, v)| (k, v.anchors.len())))
            .finish()
    }
}

fn unix_secs(t: UnixTime) -> u64 {
    t.as_secs()
}

impl TrustBundles {
    /// Empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the DER root certificates of `trust_domain`. Certificates that are
    /// not usable as trust anchors are skipped and counted in the result; a
    /// root already present is not added twice.
    pub fn add(&mut self, trust_domain: &str, ders: &[CertificateDer<'_>]) -> usize {
        let mut skipped = 0;
        let roots = self.roots.entry(trust_domain.to_string()).or_default();
        for d in ders {
            let not_after = X509Certificate::from_der(d)
                .ok()
                .and_then(|(_, c)| u64::try_from(c.validity().not_after.timestamp()).ok());
            match (webpki::anchor_from_trusted_cert(d), not_after) {
                (Ok(a), Some(not_after)) => {
                    let a = a.to_owned();
                    if !roots.anchors.contains(&a) {
                        roots.anchors.push(a);
                        roots.not_after.push(not_after);
                    }
                }
                _ => skipped += 1,
            }
        }
        skipped
    }

    /// Trust domains present.
    pub fn trust_domains(&self) -> impl Iterator<Item = &str> {
        self.roots.keys().map(String::as_str)
    }

    /// How many roots `trust_domain` has (expired ones included).
    pub fn root_count(&self, trust_domain: &str) -> usize {
        self.roots.get(trust_domain).map_or(0, |r| r.anchors.len())
    }

    /// Removes every root whose notAfter is before `now`; returns how many
    /// were removed. A trust domain left without roots stays present and
    /// empty, so it trusts nothing.
    pub fn prune_expired(&mut self, now: UnixTime) -> usize {
        let now = unix_secs(now);
        let mut removed = 0;
        for r in self.roots.values_mut() {
            let before = r.anchors.len();
            (r.anchors, r.not_after) = std::mem::take(&mut r.anchors)
                .into_iter()
                .zip(std::mem::take(&mut r.not_after))
                .filter(|(_, na)| *na >= now)
                .unzip();
            removed += before - r.anchors.len();
        }
        removed
    }

    /// Replaces the roots of `trust_domain` with those `other` has for it.
    pub fn copy_domain_from(&mut self, other: &TrustBundles, trust_domain: &str) {
        match other.roots.get(trust_domain) {
            Some(r) => {
                self.roots.insert(trust_domain.to_string(), r.clone());
            }
            None => {
                self.roots.remove(trust_domain);
            }
        }
    }

    /// The roots of `td` that are valid at `now` (none if the trust domain
    /// is unknown).
    pub fn anchors_valid_at(&self, td: &str, now: UnixTime) -> Vec<TrustAnchor<'static>> {
        self.anchors_at(td, now)
            .map(|a| a.into_owned())
            .unwrap_or_default()
    }

    /// The roots of `td` that are valid at `now`, or `None` if there is none.
    fn anchors_at(&self, td: &str, now: UnixTime) -> Option<Cow<'_, [TrustAnchor<'static>]>> {
        let r = self.roots.get(td)?;
        let now = unix_secs(now);
        let anchors = if r.not_after.iter().all(|na| *na >= now) {
            Cow::Borrowed(r.anchors.as_slice())
        } else {
            Cow::Owned(
                r.anchors
                    .iter()
                    .zip(&r.not_after)
                    .filter(|(_, na)| **na >= now)
                    .map(|(a, _)| a.clone())
                    .collect(),
            )
        };
        (!anchors.is_empty()).then_some(anchors)
    }
}

/// SPIFFE ID policy applied after the chain verified.
#[derive(Clone)]
pub enum Authorizer {
    /// Any SPIFFE ID whose chain verifies.
    Any,
    /// Exactly this ID.
    Exact(SpiffeId),
    /// A predicate.
    Func(Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>),
}

impl fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("Any"),
            Self::Exact(id) => write!(f, "Exact({id})"),
            Self::Func(_) => f.write_str("Func"),
        }
    }
}

impl Authorizer {
    /// Whether `id` is allowed.
    pub fn allows(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(want) => want == id,
            Self::Func(f) => f(id),
        }
    }
}

#[cfg(test)]
mod tests;
