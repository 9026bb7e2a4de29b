//! What the agent serves: entries, SVIDs and bundles, published as immutable
//! snapshots through a `watch` channel so every Workload API stream sees each
//! change (rotation, entry change, bundle change) at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshid_proto::types::{Bundle, Entry, Selector};

/// One X509-SVID minted for an entry.
#[derive(Clone)]
pub struct CachedSvid {
    /// Entry it belongs to.
    pub entry_id: String,
    /// Entry revision it was minted for (a changed entry is re-minted).
    pub entry_revision: i64,
    /// SPIFFE ID.
    pub spiffe_id: String,
    /// DER chain, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 DER key, made on this node.
    pub key: Vec<u8>,
    /// Hex serial.
    pub serial: String,
    /// notAfter.
    pub not_after: SystemTime,
    /// When to renew (fraction of the lifetime from receipt, minus jitter).
    pub renew_at: SystemTime,
    /// Id of the authority that signed it (the leaf's authority key id).
    pub authority: String,
}

impl std::fmt::Debug for CachedSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedSvid")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

/// Renewal time: `fraction` of the remaining lifetime from `now`, less up to
/// 5% of it as jitter, so many SVIDs do not renew in the same instant.
pub fn renew_at(now: SystemTime, not_after: SystemTime, fraction: f64) -> SystemTime {
    let life = not_after.duration_since(now).unwrap_or_default();
    let jitter = life.mul_f64(0.05 * rand::random::<f64>());
    now + life.mul_f64(fraction).saturating_sub(jitter)
}

/// Why `id` cannot be served as a workload's SPIFFE ID, if it cannot: it
/// must be a valid SPIFFE ID already in canonical form (lowercase scheme and
/// trust domain, SPIFFE-ID §2.1), name a workload rather than a trust domain
/// (a path, X509-SVID §2) and be at most 2048 bytes (SPIFFE-ID §2.3); the
/// rules are `meshid_identity::spiffe_id`'s. Clients such as py-spiffe
/// refuse a whole response holding one that is not.
pub fn spiffe_id_problem(id: &str) -> Option<&'static str> {
    use meshid_identity::spiffe_id::IdError;
    match meshid_identity::spiffe_id::workload_id(id) {
        Ok(_) => None,
        Err(IdError::TooLong { .. }) => Some("longer than 2048 bytes"),
        Err(IdError::NotCanonical { .. }) => Some("scheme or trust domain not in lowercase"),
        Err(IdError::NoPath { .. }) => Some("a trust domain ID, not a workload ID"),
        Err(_) => Some("not a valid SPIFFE ID"),
    }
}

/// An immutable view of everything the agent serves.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Entries this agent may serve, in the server's order (shared between
    /// snapshots: publishing an SVID does not copy them).
    pub entries: Arc<Vec<Entry>>,
    /// Minted SVIDs by entry id.
    pub svids: HashMap<String, Arc<CachedSvid>>,
    /// Own trust domain bundle.
    pub bundle: Option<Bundle>,
    /// Federated bundles by trust domain name.
    pub federated: HashMap<String, Bundle>,
    /// The agent's own SVID notAfter (readiness).
    pub agent_not_after: Option<SystemTime>,
    /// Ids of tainted authorities: what they signed is re-minted now.
    pub tainted: std::collections::HashSet<String>,
}

impl Snapshot {
    /// Entries whose selectors are all among `selectors`.
    #[cfg(test)]
    pub fn matching(&self, selectors: &[Selector]) -> Vec<&Entry> {
        self.matching_indices(selectors)
            .into_iter()
            .filter_map(|i| self.entries.get(i))
            .collect()
    }

    /// Indices in `entries` of the entries whose selectors are all among
    /// `selectors`.
    pub fn matching_indices(&self, selectors: &[Selector]) -> Vec<usize> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| {
                !e.selectors.is_empty() && e.selectors.iter().all(|s| selectors.contains(s))
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// Whether an SVID for `e` is missing, for an old revision, or due.
    pub fn needs_mint(&self, e: &Entry, now: SystemTime) -> bool {
        match self.svids.get(&e.id) {
            None => true,
            Some(s) => {
                s.entry_revision != e.revision
                    || s.renew_at <= now
                    || self.tainted.contains(&s.authority)
            }
        }
    }

    /// Earliest renewal time among cached SVIDs.
    pub fn next_renewal(&self) -> Option<SystemTime> {
        self.svids.values().map(|s| s.renew_at).min()
    }

    /// Seconds until the earliest renewal (metrics).
    pub fn seconds_to_next_renewal(&self, now: SystemTime) -> i64 {
        self.next_renewal()
            .map(|t| {
                i64::try_from(t.duration_since(now).unwrap_or(Duration::ZERO).as_secs())
                    .unwrap_or(i64::MAX)
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(v: &str) -> Selector {
        Selector {
            r#type: "unix".into(),
            value: v.into(),
        }
    }

    #[test]
    fn entry_matches_only_if_all_selectors_present() {
        let snap = Snapshot {
            entries: vec![
                Entry {
                    id: "a".into(),
                    selectors: vec![sel("uid:1000")],
                    ..Entry::default()
                },
                Entry {
                    id: "b".into(),
                    selectors: vec![sel("uid:1000"), sel("gid:5")],
                    ..Entry::default()
                },
                Entry {
                    id: "c".into(),
                    selectors: vec![],
                    ..Entry::default()
                },
            ]
            .into(),
            ..Snapshot::default()
        };
        let ids = |s: &[Selector]| {
            snap.matching(s)
                .iter()
                .map(|e| e.id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&[sel("uid:1000")]), vec!["a"]);
        assert_eq!(ids(&[sel("uid:1000"), sel("gid:5")]), vec!["a", "b"]);
        assert!(ids(&[sel("uid:1001")]).is_empty());
    }

    #[test]
    fn renewal_is_three_quarters_with_small_jitter() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        for _ in 0..100 {
            let at = renew_at(now, now + Duration::from_secs(100), 0.75);
            let d = at.duration_since(now).expect("after").as_secs_f64();
            assert!((70.0..=75.0).contains(&d), "{d}");
        }
    }
}
