//! The sync stream: entries and bundles from the server, each message
//! published as a new snapshot; bundles checked before they are used.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt as _;

use super::Agent;
use crate::node_api::{ClientError, RetrySchedule};

impl Agent {
    /// Keeps one sync stream open, to one server at a time: when it fails
    /// or ends, the next server is tried (see [`RetrySchedule`]).
    pub(super) async fn sync_loop(self: Arc<Self>) {
        let mut schedule = RetrySchedule::new(self.config.max_backoff);
        loop {
            let call = self.node.sync().await;
            let generation = call.generation;
            let res: Result<(), ClientError> = async {
                let mut stream = call.result?;
                let mut first = true;
                while let Some(msg) = stream.next().await.transpose()? {
                    if first {
                        first = false;
                        if let Some(a) = self.node.current_server() {
                            tracing::info!(server = %a, "sync stream open");
                        }
                    }
                    schedule.succeeded();
                    let entries = msg.entries;
                    let bundle = msg.bundle;
                    let federated: HashMap<String, _> = msg
                        .federated_bundles
                        .into_iter()
                        .map(|b| (b.trust_domain.clone(), b))
                        .collect();
                    let bundle = bundle.and_then(|b| self.accept_bundle(b));
                    let tainted: std::collections::HashSet<String> =
                        msg.tainted_authorities.into_iter().collect();
                    if !tainted.is_empty() {
                        self.renew_kick.notify_one();
                    }
                    self.publish(|s| {
                        s.tainted = tainted;
                        let ids: std::collections::HashSet<&String> =
                            entries.iter().map(|e| &e.id).collect();
                        s.svids.retain(|id, _| ids.contains(id));
                        s.entries = Arc::new(entries);
                        if bundle.is_some() {
                            s.bundle = bundle;
                        }
                        s.federated = federated;
                    });
                    self.kick.notify_one();
                    self.on_trust_check(msg.trust_check);
                }
                Ok(())
            }
            .await;
            self.metrics.sync_reconnects.inc();
            self.node.fail_over(generation);
            let wait = schedule.next_delay(self.node.server_count(), self.time_left());
            match res {
                Ok(()) => tracing::warn!(retry_in = ?wait, "sync stream ended; reconnecting"),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?wait, "sync stream failed; reconnecting")
                }
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Checks a bundle from the server before it is used, served or
    /// persisted: expired (or not yet valid) roots are left out, and an
    /// update that would no longer verify the agent's own SVID is refused
    /// (the last good bundle stays, and the refusal is logged and counted).
    pub(super) fn accept_bundle(
        &self,
        mut b: meshid_proto::types::Bundle,
    ) -> Option<meshid_proto::types::Bundle> {
        let now = self.clock.now();
        let current = self.snapshot.borrow().bundle.clone();
        if current.as_ref().is_some_and(|c| {
            c.x509_authorities == b.x509_authorities && c.jwt_authorities == b.jwt_authorities
        }) {
            return Some(b);
        }
        let (roots, dropped) = meshid_identity::chain::prune_roots(&b.x509_authorities, now);
        for d in &dropped {
            tracing::warn!(root = %d, "left out of the bundle");
        }
        let id = self.identity.load_full();
        if let Err(e) = meshid_identity::chain::verify_chain(&id.chain, &roots, now) {
            self.metrics.bundle_refused.inc();
            tracing::error!(
                sequence_number = b.sequence_number,
                error = %e,
                "bundle update refused: it would not verify this agent's own SVID; keeping the last good bundle"
            );
            return None;
        }
        b.x509_authorities = roots;
        if let Err(e) = self.node.set_trust(&b.x509_authorities) {
            tracing::error!(error = %e, "cannot trust the new bundle for the node API");
        }
        if let Err(e) = self.ids.save_bundle(&b) {
            tracing::warn!(error = %e, "cannot persist bundle");
        }
        self.metrics.bundle_updates.inc();
        tracing::info!(
            sequence_number = b.sequence_number,
            x509_authorities = b.x509_authorities.len(),
            jwt_authorities = b.jwt_authorities.len(),
            "bundle updated"
        );
        Some(b)
    }
}
