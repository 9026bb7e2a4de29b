//! Unit tests of [`super::Identity`]: updates, bundle refusals, per-listener
//! ticket keys, re-verification of resumed sessions.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use meshid_identity::{Authorizer, SpiffeId, crypto::KeyExchange};

use super::test_support::{Ca, ME, TD, bundle, material, svid, svid_between};
use super::{Identity, IdentityError, SvidMaterial, TlsSettings};
use crate::metrics::Metrics;

fn identity() -> (Arc<Identity>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let settings = TlsSettings {
        allow_tls12: false,
        key_exchange: KeyExchange::default(),
    };
    (Identity::new(settings, metrics.clone()), metrics)
}

#[test]
fn update_keeps_last_good_bundle_when_it_would_orphan_our_svid() {
    let (id, m) = identity();
    let old = Ca::new("old");
    let new = Ca::new("new");
    let first = id.update(material(&old, &[&old])).unwrap();
    assert_eq!(first.generation, 1);
    // Same SVID, bundle without its root: refused, nothing changes.
    let again = id
        .update(SvidMaterial {
            chain: first.chain.clone(),
            key: svid_between(&old, -1, 60).1,
            bundles: bundle(&[&new]),
        })
        .unwrap();
    assert!(Arc::ptr_eq(&first, &again), "no new snapshot");
    assert_eq!(m.bundle_updates_refused.get(), 1);
    assert_eq!(again.bundles, bundle(&[&old]));
    // Rotation: both roots, then a new SVID under the new root with the
    // new root alone — each accepted.
    let both = id.update(material(&old, &[&old, &new])).unwrap();
    assert_eq!(both.bundles.root_count(TD), 2);
    let rotated = id.update(material(&new, &[&new])).unwrap();
    assert_eq!(rotated.bundles, bundle(&[&new]));
    assert_eq!(m.bundle_updates_refused.get(), 1);
    assert_eq!(m.rotations.get(), 3);
    // An SVID that verifies against nothing: refused whole.
    let stranger = Ca::new("stranger");
    let err = id.update(material(&stranger, &[&new])).unwrap_err();
    assert!(matches!(err, IdentityError::Untrusted(_)), "{err}");
    assert_eq!(m.svid_updates_refused.get(), 1);
}

#[test]
fn identical_update_builds_nothing() {
    let (id, m) = identity();
    let ca = Ca::new("ca");
    let (chain, key) = svid_between(&ca, -1, 60);
    let key2 = key.clone_key();
    let a = id
        .update(SvidMaterial {
            chain: chain.clone(),
            key,
            bundles: bundle(&[&ca]),
        })
        .unwrap();
    let b = id
        .update(SvidMaterial {
            chain,
            key: key2,
            bundles: bundle(&[&ca]),
        })
        .unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(m.rotations.get(), 1);
}

/// A root past its notAfter is pruned before the decision and never
/// reaches a verifier.
#[test]
fn expired_roots_are_pruned() {
    let (id, m) = identity();
    let live = Ca::new("live");
    let dead = Ca::until(
        "dead",
        time::OffsetDateTime::now_utc() - time::Duration::hours(1),
    );
    let snap = id.update(material(&live, &[&live, &dead])).unwrap();
    assert_eq!(m.expired_roots_pruned.get(), 1);
    assert_eq!(snap.bundles, bundle(&[&live]));
}

/// Each inbound listener has its own ticket key: a ticket of one is
/// opaque to another, of the same snapshot; a new snapshot brings new keys.
#[test]
fn ticket_keys_are_per_listener() {
    let (id, _) = identity();
    let ca = Ca::new("ca");
    let a = id.inbound_listener(Authorizer::Any, vec![]).unwrap();
    let snap = id.update(material(&ca, &[&ca])).unwrap();
    // Registered after the first update: built at once.
    let b = id.inbound_listener(Authorizer::Any, vec![]).unwrap();
    let (ca_, cb) = (a.current().unwrap(), b.current().unwrap());
    assert_eq!((ca_.generation, cb.generation), (1, 1));
    let (ta, tb) = (&ca_.config.ticketer, &cb.config.ticketer);
    let t = ta.encrypt(b"session").unwrap();
    assert_eq!(ta.decrypt(&t).unwrap(), b"session");
    assert!(
        tb.decrypt(&t).is_none(),
        "listener B opened listener A's ticket"
    );
    assert!(snap.probe_server.send_tls13_tickets == 0);
    id.update(material(&ca, &[&ca])).unwrap();
    let next = a.current().unwrap();
    assert_eq!(next.generation, 2);
    assert!(
        next.config.ticketer.decrypt(&t).is_none(),
        "new snapshot, new key"
    );
}

/// A resumed session's peer chain is re-verified: an expired peer SVID
/// and a peer the listener's policy does not allow are refused.
#[test]
fn resumed_peers_are_reverified() {
    let (id, _) = identity();
    let allowed = id
        .inbound_listener(Authorizer::Exact(SpiffeId::new(ME).unwrap()), vec![])
        .unwrap();
    let other = id
        .inbound_listener(
            Authorizer::Exact(SpiffeId::new("spiffe://example.org/payments").unwrap()),
            vec![],
        )
        .unwrap();
    let ca = Ca::new("ca");
    id.update(material(&ca, &[&ca])).unwrap();
    let (allowed, other) = (allowed.current().unwrap(), other.current().unwrap());
    let peer = svid(&ca);
    assert_eq!(allowed.reverify_resumed(&peer).unwrap().to_string(), ME);
    let denied = other.reverify_resumed(&peer).unwrap_err();
    assert_eq!(meshid_identity::verify::classify(&denied), "denied");
    let expired = svid_between(&ca, -120, -60).0;
    let e = allowed.reverify_resumed(&expired).unwrap_err();
    assert_eq!(meshid_identity::verify::classify(&e), "expired");
    assert!(allowed.reverify_resumed(&[]).is_err());
}

/// Outbound, the upstream chain of a resumed session is re-verified
/// against the listener's `server_id` and the current time.
#[test]
fn resumed_upstreams_are_reverified() {
    let (id, _) = identity();
    let me = id
        .outbound_listener(SpiffeId::new(ME).unwrap(), vec![])
        .unwrap();
    let db = id
        .outbound_listener(SpiffeId::new("spiffe://example.org/db").unwrap(), vec![])
        .unwrap();
    let ca = Ca::new("ca");
    id.update(material(&ca, &[&ca])).unwrap();
    let (me, db) = (me.current().unwrap(), db.current().unwrap());
    let upstream = svid(&ca);
    me.reverify_resumed_upstream(&upstream).unwrap();
    let e = db.reverify_resumed_upstream(&upstream).unwrap_err();
    assert_eq!(meshid_identity::verify::classify(&e), "denied");
    let expired = svid_between(&ca, -120, -60).0;
    let e = me.reverify_resumed_upstream(&expired).unwrap_err();
    assert_eq!(meshid_identity::verify::classify(&e), "expired");
}
