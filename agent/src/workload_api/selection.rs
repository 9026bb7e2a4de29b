//! Which of a caller's entries can be served: entries whose SPIFFE ID
//! breaks the spec, and later entries sharing a hint, are left out (logged
//! and counted once per entry revision and reason).

use std::collections::HashSet;
use std::sync::Mutex;

use meshid_proto::types::{Entry, Selector};

use crate::cache::{Snapshot, spiffe_id_problem};

/// Entries left out of responses: logged and counted once per entry
/// revision and reason, not on every response.
pub(crate) struct Drops {
    pub(crate) seen: Mutex<HashSet<(String, i64, &'static str)>>,
    pub(crate) metric: prometheus_client::metrics::family::Family<
        crate::metrics::DropLabels,
        prometheus_client::metrics::counter::Counter,
    >,
}

impl Drops {
    pub(crate) fn note(&self, e: &Entry, reason: &'static str, detail: &str) {
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        if seen.len() > 4096 {
            seen.clear();
        }
        if seen.insert((e.id.clone(), e.revision, reason)) {
            self.metric
                .get_or_create(&crate::metrics::DropLabels { reason })
                .inc();
            tracing::warn!(entry = %e.id, revision = e.revision, spiffe_id = %e.spiffe_id.chars().take(256).collect::<String>(), reason, detail, "entry left out of Workload API responses");
        }
    }

    /// The caller's entries the agent can serve, in the server's order: an
    /// entry with a SPIFFE ID that breaks the spec is left out (the others
    /// are still served), and of entries sharing a hint only the first is
    /// kept (Workload API §5.2.1, §6.2.1: hints are unique in a response).
    pub(crate) fn servable<'a>(
        &self,
        snap: &'a Snapshot,
        selectors: &[Selector],
    ) -> Vec<&'a Entry> {
        self.servable_indices(snap, selectors)
            .into_iter()
            .filter_map(|i| snap.entries.get(i))
            .collect()
    }

    /// As [`Drops::servable`]: the entries' indices in the snapshot.
    pub(crate) fn servable_indices(&self, snap: &Snapshot, selectors: &[Selector]) -> Vec<usize> {
        let mut hints: HashSet<&str> = HashSet::new();
        snap.matching_indices(selectors)
            .into_iter()
            .filter(|&i| {
                let Some(e) = snap.entries.get(i) else {
                    return false;
                };
                if let Some(p) = spiffe_id_problem(&e.spiffe_id) {
                    self.note(e, "invalid_spiffe_id", p);
                    return false;
                }
                if !e.hint.is_empty() && !hints.insert(e.hint.as_str()) {
                    self.note(
                        e,
                        "duplicate_hint",
                        "another entry of this caller has the same hint; the first is kept",
                    );
                    return false;
                }
                true
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::SystemTime;

    use meshid_proto::types::Bundle;

    use super::*;
    use crate::cache::CachedSvid;
    use crate::workload_api::WorkloadApi;

    fn drops() -> Drops {
        Drops {
            seen: Mutex::new(HashSet::new()),
            metric: Default::default(),
        }
    }

    fn sel() -> Selector {
        Selector {
            r#type: "unix".into(),
            value: "uid:1".into(),
        }
    }

    fn entry(id: &str, spiffe_id: &str, hint: &str, revision: i64) -> Entry {
        Entry {
            id: id.into(),
            spiffe_id: spiffe_id.into(),
            hint: hint.into(),
            revision,
            selectors: vec![sel()],
            ..Entry::default()
        }
    }

    fn svid(e: &Entry, revision: i64, spiffe_id: &str) -> Arc<CachedSvid> {
        Arc::new(CachedSvid {
            entry_id: e.id.clone(),
            entry_revision: revision,
            spiffe_id: spiffe_id.into(),
            chain: vec![vec![1]],
            key: vec![2],
            serial: "01".into(),
            not_after: SystemTime::now(),
            renew_at: SystemTime::now(),
            authority: String::new(),
        })
    }

    /// SPIFFE-ID §2.1 (lowercase scheme and trust domain), §2.3 (2048
    /// bytes), X509-SVID §2 (a workload ID has a path); issue 16 item 1: an
    /// entry that breaks them is left out, the caller's others are served.
    #[test]
    fn unservable_spiffe_ids() {
        for bad in [
            "SPIFFE://EXAMPLE.ORG/Upper".to_string(),
            "spiffe://Example.org/x".to_string(),
            "spiffe://example.org".to_string(),
            "spiffe://example.org/".to_string(),
            format!("spiffe://example.org/{}", "a".repeat(2100)),
            "spiffe://example.org/a//b".to_string(),
            "https://example.org/x".to_string(),
        ] {
            assert!(spiffe_id_problem(&bad).is_some(), "{bad}");
        }
        assert_eq!(spiffe_id_problem("spiffe://example.org/Upper/ok-1"), None);
    }

    /// Workload API §5.2.1/§6.2.1 (hints unique in a response), issue 16
    /// items 1 and 4, issue 12 finding 8 (never an SVID of an older entry
    /// revision).
    #[test]
    fn servable_entries_and_x509_response() {
        let good = entry("a", "spiffe://example.org/a", "h", 1);
        let bad = entry("b", "SPIFFE://EXAMPLE.ORG/B", "", 1);
        let dup = entry("c", "spiffe://example.org/c", "h", 1);
        let other = entry("d", "spiffe://example.org/d", "", 3);
        let mut snap = Snapshot {
            entries: vec![bad.clone(), good.clone(), dup.clone(), other.clone()].into(),
            bundle: Some(Bundle {
                trust_domain: "example.org".into(),
                x509_authorities: vec![vec![9]],
                ..Bundle::default()
            }),
            ..Snapshot::default()
        };
        let d = drops();
        let ids: Vec<&str> = d
            .servable(&snap, &[sel()])
            .iter()
            .map(|e| e.id.as_str())
            .collect();
        assert_eq!(ids, ["a", "d"]);
        assert_eq!(
            d.metric
                .get_or_create(&crate::metrics::DropLabels {
                    reason: "invalid_spiffe_id"
                })
                .get(),
            1
        );
        // Counted once per entry revision, not per response.
        d.servable(&snap, &[sel()]);
        assert_eq!(
            d.metric
                .get_or_create(&crate::metrics::DropLabels {
                    reason: "duplicate_hint"
                })
                .get(),
            1
        );

        // d's SVID was minted for revision 2; the entry is at 3 now.
        snap.svids
            .insert("a".into(), svid(&good, 1, &good.spiffe_id));
        snap.svids
            .insert("d".into(), svid(&other, 2, "spiffe://example.org/old-d"));
        let entries = [&good, &other];
        let r = WorkloadApi::x509_response(&snap, &entries, &d).expect("response");
        let got: Vec<&str> = r.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
        assert_eq!(got, ["spiffe://example.org/a"]);
        // Once minted for revision 3 it is served.
        snap.svids
            .insert("d".into(), svid(&other, 3, &other.spiffe_id));
        let r = WorkloadApi::x509_response(&snap, &entries, &d).expect("response");
        assert_eq!(r.svids.len(), 2);
        // Only stale SVIDs: nothing to send yet.
        snap.svids.clear();
        snap.svids
            .insert("d".into(), svid(&other, 2, "spiffe://example.org/old-d"));
        assert!(WorkloadApi::x509_response(&snap, &entries, &d).is_none());
    }
}
