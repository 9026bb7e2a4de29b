//! Minting and rotation of workload SVIDs: every entry without a current
//! SVID, or whose SVID is due (renewal timing in `cache.rs`) or signed by a
//! tainted authority, is signed in batches; failures are retried without
//! ever dropping an SVID still valid.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshid_proto::node::X509SvidParams;

use super::Agent;
use crate::cache::{CachedSvid, renew_at};
use crate::node_api::{
    RetrySchedule, backoff, bound_by_expiry, is_server_failure, new_key_and_csr,
};

impl Agent {
    /// Mints what is due, then sleeps until the next renewal or retry, or
    /// until the sync stream changes the entries.
    pub(super) async fn mint_loop(self: Arc<Self>) {
        let mut retry_at: HashMap<String, (SystemTime, u32)> = HashMap::new();
        // Failed signing calls (the server, not an entry, is at fault).
        let mut calls = RetrySchedule::new(self.config.max_backoff);
        loop {
            let now = self.clock.now();
            let snap = self.snapshot.borrow().clone();
            let due: Vec<_> = snap
                .entries
                .iter()
                .filter(|e| snap.needs_mint(e, now))
                .filter(|e| retry_at.get(&e.id).is_none_or(|(t, _)| *t <= now))
                .cloned()
                .collect();
            for chunk in due.chunks(self.config.sign_batch_size) {
                let mut keys = Vec::with_capacity(chunk.len());
                let mut params = Vec::with_capacity(chunk.len());
                for e in chunk {
                    match new_key_and_csr() {
                        Ok((k, csr)) => {
                            keys.push(k);
                            params.push(X509SvidParams {
                                entry_id: e.id.clone(),
                                csr,
                            });
                        }
                        Err(err) => tracing::error!(error = %err, "cannot make a key"),
                    }
                }
                let call = self.node.sign_x509_svids(params).await;
                let generation = call.generation;
                match call.result {
                    Ok(r) => {
                        calls.succeeded();
                        let received = self.clock.now();
                        let mut minted = Vec::new();
                        for ((e, key), res) in chunk.iter().zip(keys).zip(r.results) {
                            match res.svid {
                                Some(svid) => {
                                    retry_at.remove(&e.id);
                                    let not_after = SystemTime::UNIX_EPOCH
                                        + Duration::from_secs(
                                            u64::try_from(svid.expires_at).unwrap_or(0),
                                        );
                                    if snap
                                        .svids
                                        .get(&e.id)
                                        .is_some_and(|c| snap.tainted.contains(&c.authority))
                                    {
                                        self.metrics.tainted_reminted.inc();
                                    }
                                    let authority = svid
                                        .cert_chain
                                        .first()
                                        .and_then(|l| meshid_identity::svid::authority_key_id(l))
                                        .unwrap_or_default();
                                    minted.push(Arc::new(CachedSvid {
                                        authority,
                                        entry_id: e.id.clone(),
                                        entry_revision: e.revision,
                                        spiffe_id: svid.spiffe_id,
                                        chain: svid.cert_chain,
                                        key,
                                        serial: svid.serial,
                                        not_after,
                                        renew_at: renew_at(
                                            received,
                                            not_after,
                                            self.config.rotation_fraction,
                                        ),
                                    }));
                                }
                                None => {
                                    let st = res.status.unwrap_or_default();
                                    let n = retry_at.get(&e.id).map_or(0, |(_, n)| n + 1);
                                    let left = snap
                                        .svids
                                        .get(&e.id)
                                        .and_then(|c| c.not_after.duration_since(received).ok());
                                    retry_at.insert(
                                        e.id.clone(),
                                        (
                                            received
                                                + bound_by_expiry(
                                                    backoff(n, self.config.max_backoff),
                                                    left,
                                                ),
                                            n,
                                        ),
                                    );
                                    tracing::warn!(entry = %e.id, code = st.code, message = %st.message, "SVID not issued; keeping the current one and retrying");
                                }
                            }
                        }
                        self.metrics.rotations.inc_by(minted.len() as u64);
                        for m in &minted {
                            tracing::info!(spiffe_id = %m.spiffe_id, serial = %m.serial, not_after = %humantime::format_rfc3339_seconds(m.not_after), "SVID minted");
                        }
                        self.publish(|s| {
                            for m in minted {
                                // Only keep SVIDs for entries still present.
                                if s.entries.iter().any(|e| e.id == m.entry_id) {
                                    s.svids.insert(m.entry_id.clone(), m);
                                }
                            }
                        });
                    }
                    Err(status) => {
                        self.metrics.sign_failures.inc();
                        // The server went away (perhaps mid-batch): the whole
                        // batch is asked again, of the next server first.
                        if is_server_failure(&status) {
                            self.node.fail_over(generation);
                        }
                        let now = self.clock.now();
                        let left = chunk
                            .iter()
                            .filter_map(|e| snap.svids.get(&e.id))
                            .filter_map(|c| c.not_after.duration_since(now).ok())
                            .chain(self.time_left())
                            .min();
                        let wait = calls.next_delay(self.node.server_count(), left);
                        for e in chunk {
                            let n = retry_at.get(&e.id).map_or(0, |(_, n)| *n);
                            retry_at.insert(e.id.clone(), (now + wait, n));
                        }
                        tracing::warn!(error = %status, "signing call failed; keeping current SVIDs and retrying");
                    }
                }
            }
            retry_at.retain(|id, _| snap.entries.iter().any(|e| &e.id == id));
            let snap = self.snapshot.borrow().clone();
            // An SVID waiting for its retry wakes the loop at its retry
            // time, not at its (past) renewal time.
            let next = snap
                .svids
                .iter()
                .filter(|(id, _)| !retry_at.contains_key(*id))
                .map(|(_, s)| s.renew_at)
                .chain(retry_at.values().map(|(t, _)| *t))
                .min()
                .unwrap_or_else(|| self.clock.now() + Duration::from_secs(60));
            let wait = self.clock.until(next).max(Duration::from_millis(10));
            tokio::select! {
                () = tokio::time::sleep(wait) => {},
                () = self.kick.notified() => {},
            }
        }
    }
}
