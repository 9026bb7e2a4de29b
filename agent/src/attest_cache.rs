//! Caches of workload attestation.
//!
//! [`AttestCache`]: the selectors of a process image, keyed by what pins it
//! (pid, start time, executable identity) and the credentials it connected
//! with. A call first re-checks its pinned process cheaply (pidfd, start
//! time, executable identity: [`Pinned::verify`]), so a recycled pid or an
//! `execve` since connecting is refused before the cache is consulted; a new
//! connection of a process that exec'd another binary pins another
//! executable, so another key. Concurrent calls of one process share one
//! attestation.
//!
//! [`NameCache`]: user and group names by id, so the name service is asked
//! at most once per [`NAME_TTL`] per id.

use std::collections::HashMap;
use std::hash::Hash;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshid_proto::types::Selector;
use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::attest::{AttestError, Caller, ExeId, Pinned, WorkloadAttestor};

/// How long one attestation serves the same process image. What can change
/// without an `execve` — supplementary groups, user and group names, whether
/// the executable's path still names the running file, the pod's labels —
/// is read again at most this much later.
pub const ATTESTATION_TTL: Duration = Duration::from_secs(5);
/// At most this many process images cached (expired ones are dropped first).
pub const ATTESTATION_CACHE_CAPACITY: usize = 4096;
/// How long a user or group name is reused.
pub const NAME_TTL: Duration = Duration::from_secs(30);

/// What identifies a process image and the credentials it connected with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcessKey {
    pid: i32,
    /// Field 22 of `/proc/<pid>/stat`: a recycled pid has another.
    start_time: u64,
    /// The executable it runs: an `execve` of another file changes it.
    exe: ExeId,
    uid: u32,
    gid: u32,
}

impl ProcessKey {
    /// The key of the process `pinned` at connect, connected as `uid`/`gid`.
    pub fn new(pinned: &Pinned, uid: u32, gid: u32) -> Self {
        Self {
            pid: pinned.pid(),
            start_time: pinned.start_time(),
            exe: pinned.exe(),
            uid,
            gid,
        }
    }
}

struct Slot {
    at: Instant,
    selectors: OnceCell<Vec<Selector>>,
}

/// Attestation results by [`ProcessKey`], each for at most a TTL.
pub struct AttestCache {
    ttl: Duration,
    capacity: usize,
    slots: Mutex<HashMap<ProcessKey, Arc<Slot>>>,
}

impl std::fmt::Debug for AttestCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttestCache")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Default for AttestCache {
    fn default() -> Self {
        Self::new(ATTESTATION_TTL, ATTESTATION_CACHE_CAPACITY)
    }
}

impl AttestCache {
    /// A cache keeping results for `ttl`, of at most `capacity` processes.
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            capacity: capacity.max(1),
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// The caller's selectors. A caller with a pinned process is re-checked
    /// against `proc_root` (still that process, still that executable), then
    /// served from the cache, or attested by `attestor` on the blocking pool
    /// (one attestation for concurrent calls of the same process image). A
    /// caller with nothing pinned is always attested afresh.
    pub async fn attest(
        &self,
        caller: Caller,
        attestor: Arc<dyn WorkloadAttestor>,
        proc_root: &Path,
    ) -> Result<Vec<Selector>, AttestError> {
        let Some(pinned) = caller.pinned.clone() else {
            return blocking(attestor, caller).await;
        };
        pinned.verify(proc_root)?;
        let key = ProcessKey::new(&pinned, caller.uid, caller.gid);
        self.get_or_attest(key, || blocking(attestor, caller)).await
    }

    /// The cached selectors of `key`, or those `attest` returns (cached
    /// unless it fails: a refusal is never reused).
    pub async fn get_or_attest<F, Fut>(
        &self,
        key: ProcessKey,
        attest: F,
    ) -> Result<Vec<Selector>, AttestError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<Selector>, AttestError>>,
    {
        let now = Instant::now();
        let slot = {
            let Ok(mut slots) = self.slots.lock() else {
                return attest().await;
            };
            match slots.get(&key) {
                Some(s) if now.duration_since(s.at) < self.ttl => s.clone(),
                _ => {
                    if slots.len() >= self.capacity {
                        slots.retain(|_, s| now.duration_since(s.at) < self.ttl);
                        if slots.len() >= self.capacity {
                            slots.clear();
                        }
                    }
                    let s = Arc::new(Slot {
                        at: now,
                        selectors: OnceCell::new(),
                    });
                    slots.insert(key, s.clone());
                    s
                }
            }
        };
        slot.selectors.get_or_try_init(attest).await.cloned()
    }
}

async fn blocking(
    attestor: Arc<dyn WorkloadAttestor>,
    caller: Caller,
) -> Result<Vec<Selector>, AttestError> {
    let pid = caller.pid.unwrap_or_default();
    tokio::task::spawn_blocking(move || attestor.attest(&caller))
        .await
        .unwrap_or_else(|e| {
            Err(AttestError::Proc {
                pid,
                reason: format!("attestation task failed: {e}"),
            })
        })
}

type Names<K> = Mutex<HashMap<K, (std::time::Instant, Option<String>)>>;

/// User and group names by id, each looked up at most once per TTL (a
/// failed lookup is not kept).
#[derive(Debug)]
pub struct NameCache {
    ttl: Duration,
    users: Names<u32>,
    groups: Names<u32>,
}

impl Default for NameCache {
    fn default() -> Self {
        Self::new(NAME_TTL)
    }
}

impl NameCache {
    /// A cache keeping names for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            users: Mutex::new(HashMap::new()),
            groups: Mutex::new(HashMap::new()),
        }
    }

    /// The name of user `uid`, if it has one.
    pub fn user(&self, uid: u32) -> Option<String> {
        Self::get(
            &self.users,
            self.ttl,
            std::time::Instant::now(),
            uid,
            |id| nix::unistd::User::from_uid(id.into()).map(|u| u.map(|u| u.name)),
        )
    }

    /// The name of group `gid`, if it has one.
    pub fn group(&self, gid: u32) -> Option<String> {
        Self::get(
            &self.groups,
            self.ttl,
            std::time::Instant::now(),
            gid,
            |id| nix::unistd::Group::from_gid(id.into()).map(|g| g.map(|g| g.name)),
        )
    }

    fn get<K: Hash + Eq + Copy, E>(
        names: &Names<K>,
        ttl: Duration,
        now: std::time::Instant,
        id: K,
        lookup: impl FnOnce(K) -> Result<Option<String>, E>,
    ) -> Option<String> {
        if let Ok(m) = names.lock()
            && let Some((at, name)) = m.get(&id)
            && now.duration_since(*at) < ttl
        {
            return name.clone();
        }
        let name = lookup(id).ok()?;
        if let Ok(mut m) = names.lock() {
            if m.len() >= 1024 {
                m.retain(|_, (at, _)| now.duration_since(*at) < ttl);
                if m.len() >= 1024 {
                    m.clear();
                }
            }
            m.insert(id, (now, name.clone()));
        }
        name
    }
}

#[cfg(test)]
#[path = "attest_cache_tests.rs"]
mod tests;
