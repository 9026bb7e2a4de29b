//! What one snapshot serves to one selector set, worked out once per
//! snapshot and shared by every call and stream of callers with that set:
//! the servable entries and the encoded X.509-SVID response.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use meshid_proto::types::{Entry, Selector};
use meshid_proto::workload::X509svidResponse;

use super::WorkloadApi;
use super::selection::Drops;
use crate::cache::Snapshot;

/// At most this many selector sets remembered per snapshot.
const CAPACITY: usize = 1024;

/// A message and its encoding (streams compare encodings to skip a message
/// identical to the last one sent).
#[derive(Debug)]
pub(crate) struct Encoded<T> {
    /// The message.
    pub(crate) msg: T,
    /// Its protobuf encoding.
    pub(crate) bytes: Vec<u8>,
}

impl<T: prost::Message> Encoded<T> {
    pub(crate) fn new(msg: T) -> Arc<Self> {
        let bytes = msg.encode_to_vec();
        Arc::new(Self { msg, bytes })
    }
}

/// What a snapshot serves to one selector set.
#[derive(Debug)]
pub(crate) struct Served {
    /// Indices of the servable entries in the snapshot's entries.
    entries: Vec<usize>,
    x509: OnceLock<Option<Arc<Encoded<X509svidResponse>>>>,
}

impl Served {
    /// The servable entries, out of the snapshot this was worked out for.
    pub(crate) fn entries<'a>(&self, snap: &'a Snapshot) -> Vec<&'a Entry> {
        self.entries
            .iter()
            .filter_map(|&i| snap.entries.get(i))
            .collect()
    }

    /// No entry can be served.
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The X.509-SVID response (built on first use), if there is one yet.
    pub(crate) fn x509(
        &self,
        snap: &Snapshot,
        drops: &Drops,
    ) -> Option<Arc<Encoded<X509svidResponse>>> {
        self.x509
            .get_or_init(|| {
                WorkloadApi::x509_response(snap, &self.entries(snap), drops).map(Encoded::new)
            })
            .clone()
    }
}

#[derive(Default)]
struct State {
    /// The snapshot the map is about (held weakly: its allocation, so its
    /// address, cannot be reused while this is held).
    snap: Weak<Snapshot>,
    by_selectors: HashMap<Vec<(String, String)>, Arc<Served>>,
}

/// [`Served`] by selector set, for the latest snapshot asked about.
#[derive(Default)]
pub(crate) struct ServedCache {
    state: Mutex<State>,
}

impl std::fmt::Debug for ServedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServedCache")
    }
}

fn key(selectors: &[Selector]) -> Vec<(String, String)> {
    let mut k: Vec<(String, String)> = selectors
        .iter()
        .map(|s| (s.r#type.clone(), s.value.clone()))
        .collect();
    k.sort();
    k.dedup();
    k
}

impl ServedCache {
    /// What `snap` serves to a caller with `selectors`.
    pub(crate) fn get(
        &self,
        snap: &Arc<Snapshot>,
        selectors: &[Selector],
        drops: &Drops,
    ) -> Arc<Served> {
        let k = key(selectors);
        if let Ok(st) = self.state.lock()
            && std::ptr::eq(st.snap.as_ptr(), Arc::as_ptr(snap))
            && let Some(s) = st.by_selectors.get(&k)
        {
            return s.clone();
        }
        let served = Arc::new(Served {
            entries: drops.servable_indices(snap, selectors),
            x509: OnceLock::new(),
        });
        let Ok(mut st) = self.state.lock() else {
            return served;
        };
        if !std::ptr::eq(st.snap.as_ptr(), Arc::as_ptr(snap)) {
            // Another snapshot (normally the next one): start over. A stream
            // still on an older one briefly takes the map back; each answer
            // is about the snapshot it was asked for either way.
            st.snap = Arc::downgrade(snap);
            st.by_selectors.clear();
        }
        if st.by_selectors.len() >= CAPACITY {
            st.by_selectors.clear();
        }
        st.by_selectors.entry(k).or_insert(served).clone()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use meshid_proto::types::Bundle;

    use super::*;

    fn sel(v: &str) -> Selector {
        Selector {
            r#type: "unix".into(),
            value: v.into(),
        }
    }

    fn snapshot(ids: &[&str]) -> Arc<Snapshot> {
        Arc::new(Snapshot {
            entries: ids
                .iter()
                .map(|id| Entry {
                    id: (*id).into(),
                    spiffe_id: format!("spiffe://example.org/{id}"),
                    selectors: vec![sel("uid:1")],
                    ..Entry::default()
                })
                .collect::<Vec<_>>()
                .into(),
            bundle: Some(Bundle {
                trust_domain: "example.org".into(),
                x509_authorities: vec![vec![9]],
                ..Bundle::default()
            }),
            ..Snapshot::default()
        })
    }

    /// One answer per snapshot and selector set (in any order); a new
    /// snapshot is worked out again.
    #[test]
    fn shared_per_snapshot_and_selector_set() {
        let drops = Drops {
            seen: Mutex::new(HashSet::new()),
            metric: Default::default(),
        };
        let cache = ServedCache::default();
        let one = snapshot(&["a"]);
        let a = cache.get(&one, &[sel("uid:1"), sel("gid:1")], &drops);
        let b = cache.get(&one, &[sel("gid:1"), sel("uid:1"), sel("uid:1")], &drops);
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.entries(&one).len(), 1);
        let other = cache.get(&one, &[sel("uid:2")], &drops);
        assert!(other.is_empty());

        let two = snapshot(&["a", "b"]);
        let c = cache.get(&two, &[sel("uid:1"), sel("gid:1")], &drops);
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(c.entries(&two).len(), 2);
        // A caller still on the older snapshot gets that snapshot's answer.
        assert_eq!(
            cache.get(&one, &[sel("uid:1")], &drops).entries(&one).len(),
            1
        );
        // No SVID minted yet: no X.509 response.
        assert!(c.x509(&two, &drops).is_none());
    }
}
