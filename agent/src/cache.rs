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
    /// Entries this agent may serve, in the server's order.
    pub entries: Vec<Entry>,
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
    pub fn matching(&self, selectors: &[Selector]) -> Vec<&Entry> {
        self.entries
            .iter()
            .filter(|e| {
                !e.selectors.is_empty() && e.selectors.iter().all(|s| selectors.contains(s))
            })
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

/// Key of a cached JWT-SVID: the entry, the entry revision it was signed
/// for (an entry change misses the cache at once), and the sorted, deduped
/// audience.
pub type JwtCacheKey = (String, i64, Vec<String>);

#[derive(Debug)]
struct JwtCached {
    svid: meshid_proto::workload::Jwtsvid,
    refresh_at: SystemTime,
    last_used: u64,
}

/// JWT-SVIDs already signed, reused until `refresh_at` (half their
/// lifetime), bounded to `capacity` entries: expired ones and those of
/// entries no longer current go first, then the least recently used.
#[derive(Debug)]
pub struct JwtSvidCache {
    map: HashMap<JwtCacheKey, JwtCached>,
    capacity: usize,
    tick: u64,
}

impl JwtSvidCache {
    /// An empty cache holding at most `capacity` JWT-SVIDs.
    pub fn new(capacity: usize) -> Self {
        Self {
            map: HashMap::new(),
            capacity: capacity.max(1),
            tick: 0,
        }
    }

    /// Number of cached JWT-SVIDs.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The JWT-SVID for `key`, if cached and not yet due for refresh.
    pub fn get(
        &mut self,
        key: &JwtCacheKey,
        now: SystemTime,
    ) -> Option<meshid_proto::workload::Jwtsvid> {
        self.tick += 1;
        let tick = self.tick;
        match self.map.get_mut(key) {
            Some(c) if c.refresh_at > now => {
                c.last_used = tick;
                Some(c.svid.clone())
            }
            Some(_) => {
                self.map.remove(key);
                None
            }
            None => None,
        }
    }

    /// Caches `svid` under `key` until `refresh_at`. `current(entry_id,
    /// revision)` says whether an entry revision is still current; the rest
    /// are dropped first when the cache is full.
    pub fn insert(
        &mut self,
        key: JwtCacheKey,
        svid: meshid_proto::workload::Jwtsvid,
        refresh_at: SystemTime,
        now: SystemTime,
        current: impl Fn(&str, i64) -> bool,
    ) {
        if self.map.len() >= self.capacity && !self.map.contains_key(&key) {
            self.map
                .retain(|(id, rev, _), c| c.refresh_at > now && current(id, *rev));
            while self.map.len() >= self.capacity {
                let Some(oldest) = self
                    .map
                    .iter()
                    .min_by_key(|(_, c)| c.last_used)
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                self.map.remove(&oldest);
            }
        }
        self.tick += 1;
        self.map.insert(
            key,
            JwtCached {
                svid,
                refresh_at,
                last_used: self.tick,
            },
        );
    }

    /// Drops everything cached for entries (or entry revisions) that are
    /// no longer current.
    pub fn retain_current(&mut self, current: impl Fn(&str, i64) -> bool) {
        self.map.retain(|(id, rev, _), _| current(id, *rev));
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
            ],
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

    fn jwt(id: &str) -> meshid_proto::workload::Jwtsvid {
        meshid_proto::workload::Jwtsvid {
            spiffe_id: id.into(),
            svid: "t".into(),
            hint: String::new(),
        }
    }

    /// Issue 12 finding 8: a changed entry (new revision) misses the cache,
    /// and the cache stays bounded whatever the callers ask for.
    #[test]
    fn jwt_cache_is_keyed_by_revision_and_bounded() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let later = now + Duration::from_secs(60);
        let aud = vec!["a".to_string()];
        let mut c = JwtSvidCache::new(3);
        c.insert(
            ("e".into(), 1, aud.clone()),
            jwt("spiffe://td/old"),
            later,
            now,
            |_, _| true,
        );
        assert_eq!(
            c.get(&("e".into(), 1, aud.clone()), now)
                .map(|j| j.spiffe_id),
            Some("spiffe://td/old".into())
        );
        // The entry changed: revision 2 is a miss.
        assert!(c.get(&("e".into(), 2, aud.clone()), now).is_none());
        // Due for refresh: a miss, and dropped.
        assert!(c.get(&("e".into(), 1, aud.clone()), later).is_none());
        assert!(c.is_empty());

        // Bounded: the least recently used goes when full.
        for i in 0..3 {
            c.insert(
                ("e".into(), 1, vec![i.to_string()]),
                jwt("x"),
                later,
                now,
                |_, _| true,
            );
        }
        assert!(c.get(&("e".into(), 1, vec!["0".into()]), now).is_some());
        c.insert(
            ("e".into(), 1, vec!["3".into()]),
            jwt("x"),
            later,
            now,
            |_, _| true,
        );
        assert_eq!(c.len(), 3);
        assert!(
            c.get(&("e".into(), 1, vec!["1".into()]), now).is_none(),
            "LRU evicted"
        );
        assert!(c.get(&("e".into(), 1, vec!["0".into()]), now).is_some());
        // Entries no longer current go before anything else.
        c.insert(
            ("f".into(), 1, vec!["z".into()]),
            jwt("x"),
            later,
            now,
            |id, _| id != "e",
        );
        assert_eq!(c.len(), 1);
        c.insert(
            ("e".into(), 7, aud.clone()),
            jwt("x"),
            later,
            now,
            |_, _| true,
        );
        c.retain_current(|id, rev| id == "e" && rev == 7);
        assert_eq!(c.len(), 1);
        for i in 0..1000 {
            c.insert(
                ("e".into(), 7, vec![i.to_string()]),
                jwt("x"),
                later,
                now,
                |_, _| true,
            );
        }
        assert_eq!(c.len(), 3);
    }
}
