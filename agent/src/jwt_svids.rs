//! JWT-SVIDs for the Workload API: signed through the node API, cached
//! until half their lifetime (never served past it), at most
//! [`JWT_CACHE_CAPACITY`] of them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meshid_proto::node::JwtSvidParams;
use meshid_proto::types::Entry;
use meshid_proto::workload::Jwtsvid;
use tonic::Status;

use crate::cache::{Snapshot, spiffe_id_problem};
use crate::clock::SharedClock;
use crate::node_api::NodeApi;
use crate::node_api::retry::is_server_failure;

/// At most this many JWT-SVIDs are cached.
pub const JWT_CACHE_CAPACITY: usize = 1024;

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
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the cache is empty.
    #[cfg(test)]
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

/// The agent's JWT-SVIDs: one cache in front of the node API.
#[derive(Debug)]
pub struct JwtSvids {
    node: Arc<dyn NodeApi>,
    clock: SharedClock,
    cache: Mutex<JwtSvidCache>,
}

impl JwtSvids {
    /// JWT-SVIDs signed by `node`, at most `capacity` cached.
    pub fn new(node: Arc<dyn NodeApi>, clock: SharedClock, capacity: usize) -> Self {
        Self {
            node,
            clock,
            cache: Mutex::new(JwtSvidCache::new(capacity)),
        }
    }

    /// Signs through the node API. A failure that blames the server fails
    /// over as the X.509 path does, and is tried once on each other server
    /// at once: the caller is waiting, so there is no backoff to sit out.
    async fn sign(
        &self,
        params: Vec<JwtSvidParams>,
    ) -> Result<meshid_proto::node::SignJwtSvidsResponse, Status> {
        let mut tries = self.node.server_count().max(1);
        loop {
            let call = self.node.sign_jwt_svids(params.clone()).await;
            match call.result {
                Ok(r) => return Ok(r),
                Err(s) => {
                    let blame_server = is_server_failure(&s);
                    if blame_server {
                        self.node.fail_over(call.generation);
                    }
                    tries -= 1;
                    if !blame_server || tries == 0 {
                        return Err(Status::unavailable(format!(
                            "cannot reach the server to sign a JWT-SVID: {}",
                            s.message()
                        )));
                    }
                }
            }
        }
    }

    /// The JWT-SVIDs of `entries` (servable entries of `snap`, not empty)
    /// for `audience`; `aud` is the checked audience (sorted, deduped) that
    /// keys the cache. Cached ones are reused until half their lifetime;
    /// the rest are signed in one call. `invalid(entry, problem)` is told
    /// about a signed SVID whose SPIFFE ID cannot be served. The result
    /// keeps the entries' order (the first is the default).
    pub async fn fetch(
        &self,
        snap: &Snapshot,
        entries: &[&Entry],
        audience: &[String],
        aud: &[String],
        invalid: impl Fn(&Entry, &'static str),
    ) -> Result<Vec<Jwtsvid>, Status> {
        let current =
            |id: &str, rev: i64| snap.entries.iter().any(|e| e.id == id && e.revision == rev);
        let now = self.clock.now();
        let mut out = Vec::new();
        let mut missing = Vec::new();
        {
            let mut cache = self
                .cache
                .lock()
                .map_err(|_| Status::internal("cache poisoned"))?;
            for e in entries {
                match cache.get(&(e.id.clone(), e.revision, aud.to_vec()), now) {
                    Some(svid) if svid.spiffe_id == e.spiffe_id => out.push((
                        e.id.clone(),
                        Jwtsvid {
                            hint: e.hint.clone(),
                            ..svid
                        },
                    )),
                    _ => missing.push(*e),
                }
            }
        }
        if !missing.is_empty() {
            let params = missing
                .iter()
                .map(|e| JwtSvidParams {
                    entry_id: e.id.clone(),
                    audience: audience.to_vec(),
                })
                .collect();
            let resp = self.sign(params).await?;
            let mut cache = self
                .cache
                .lock()
                .map_err(|_| Status::internal("cache poisoned"))?;
            cache.retain_current(current);
            for (e, res) in missing.iter().zip(resp.results) {
                let Some(j) = res.svid else { continue };
                if let Some(p) = spiffe_id_problem(&j.spiffe_id) {
                    invalid(e, p);
                    continue;
                }
                let svid = Jwtsvid {
                    spiffe_id: j.spiffe_id,
                    svid: j.token,
                    hint: e.hint.clone(),
                };
                // Signed for the entry as the server has it now; cached only
                // when that is the revision this agent serves.
                if svid.spiffe_id == e.spiffe_id {
                    let half = u64::try_from((j.expires_at - j.issued_at) / 2).unwrap_or(0);
                    cache.insert(
                        (e.id.clone(), e.revision, aud.to_vec()),
                        svid.clone(),
                        now + Duration::from_secs(half),
                        now,
                        current,
                    );
                }
                out.push((e.id.clone(), svid));
            }
        }
        // Keep the entries' order: the first is the default.
        let order: Vec<&String> = entries.iter().map(|e| &e.id).collect();
        out.sort_by_key(|(id, _)| order.iter().position(|o| *o == id));
        Ok(out.into_iter().map(|(_, s)| s).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
