//! When each authority moves through the journal: a pure function of the
//! journal, what each authority signed, the policy and the clock, so that a
//! year of rotations can be checked in microseconds.
//!
//! For one server and one kind (X.509 CA or JWT key), with `T` the active
//! authority's lifetime:
//! - **prepare** a successor at `notBefore + T × prepare_at` (default ½): it is
//!   published in the bundle from then on, but signs nothing;
//! - **activate** it once it has been published for `publish_before_use`
//!   (default: `max_svid_ttl`, so every holder of a bundle has refreshed it),
//!   and at the latest at `notBefore + T × activate_by` (default ⅚); the old
//!   one becomes **retired**;
//! - **remove** a retired authority from the bundle once nothing it signed is
//!   still valid (X.509: the latest notAfter of its certificates; JWT: its
//!   retirement plus the longest token lifetime), or once it expires;
//! - with no usable active authority (first start, or the server was down past
//!   its end), create one and activate it at once.

use std::time::Duration;

use meshid_proto::types::Authority;

/// The states of the journal.
pub mod state {
    /// Published, not yet signing.
    pub const PREPARED: &str = "prepared";
    /// Signing.
    pub const ACTIVE: &str = "active";
    /// No longer signing, still published.
    pub const RETIRED: &str = "retired";
    /// Gone from the bundle.
    pub const REMOVED: &str = "removed";
    /// Key made, certificate awaited from an offline upstream CA.
    pub const PENDING: &str = "pending";
}

/// Rotation policy, from the server configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Lifetime of a new authority.
    pub ttl: Duration,
    /// Fraction of the active authority's lifetime at which its successor is
    /// prepared.
    pub prepare_at: f64,
    /// Fraction of the active authority's lifetime by which its successor is
    /// activated at the latest.
    pub activate_by: f64,
    /// How long a prepared authority is published before it may sign.
    pub publish_before_use: Duration,
    /// Longest lifetime of anything an authority signs (JWT removal).
    pub max_credential_ttl: Duration,
    /// Whether the server can make a successor by itself (false with an
    /// offline upstream CA: an operator must prepare and import).
    pub can_prepare: bool,
}

/// A transition due now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Make a new authority and activate it at once (no usable active one).
    Bootstrap,
    /// Make a prepared successor.
    Prepare,
    /// Activate this prepared authority (retiring the active one).
    Activate(String),
    /// Remove this retired authority from the bundle.
    Remove(String),
    /// A successor is due but must come from an operator (offline upstream).
    NeedsOperator,
}

/// What is due now and when the next transition is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Transitions due at `now`, in order.
    pub due: Vec<Step>,
    /// Unix seconds of the next transition after `now`, and what it is.
    pub next: Option<(i64, String)>,
}

fn frac(nb: i64, na: i64, f: f64) -> i64 {
    let life = (na - nb).max(0) as f64;
    nb + (life * f).round() as i64
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// Whether an authority can sign at `now`.
pub fn usable(a: &Authority, now: i64) -> bool {
    a.not_before <= now && now < a.not_after
}

/// When a retired authority leaves the bundle.
pub fn removal_time(a: &Authority, last_signed_not_after: i64, policy: &Policy) -> i64 {
    let dependents = if a.kind == super::mint::JWT {
        a.retired_at.saturating_add(secs(policy.max_credential_ttl))
    } else {
        last_signed_not_after
    };
    // A short grace after retirement covers a signing call that took the
    // authority just before it was retired and is still being journaled;
    // and it is gone from the bundle a second before it expires at the
    // latest.
    dependents
        .max(
            a.retired_at
                .saturating_add(super::x509svid::BACKDATE.as_secs() as i64),
        )
        .min(a.not_after - 1)
}

/// When a prepared authority becomes active, given the active one.
pub fn activation_time(active: &Authority, prepared: &Authority, policy: &Policy) -> i64 {
    let published = prepared
        .prepared_at
        .saturating_add(secs(policy.publish_before_use));
    let latest = frac(active.not_before, active.not_after, policy.activate_by);
    published.min(latest).max(prepared.not_before)
}

/// Plans the transitions of one server's authorities of one kind.
/// `last_signed` gives, per authority id, the latest notAfter of anything
/// it signed.
pub fn plan(
    own: &[Authority],
    last_signed: &dyn Fn(&str) -> i64,
    now: i64,
    policy: &Policy,
) -> Plan {
    let mut due = Vec::new();
    let mut next: Option<(i64, String)> = None;
    let mut later = |t: i64, what: String| {
        if t > now && next.as_ref().is_none_or(|(n, _)| t < *n) {
            next = Some((t, what));
        }
    };
    let newest = |st: &str| {
        own.iter()
            .filter(|a| a.state == st)
            .max_by_key(|a| (a.activated_at, a.prepared_at))
    };
    let active = newest(state::ACTIVE).filter(|a| usable(a, now));
    let prepared = own
        .iter()
        .filter(|a| a.state == state::PREPARED && !a.tainted && a.not_after > now)
        .max_by_key(|a| a.prepared_at);
    let pending = own.iter().any(|a| a.state == state::PENDING);

    match (active, prepared) {
        (None, Some(p)) if usable(p, now) => due.push(Step::Activate(p.id.clone())),
        (None, _) => {
            if policy.can_prepare {
                due.push(Step::Bootstrap);
            } else {
                due.push(Step::NeedsOperator);
            }
        }
        (Some(a), Some(p)) => {
            let t = activation_time(a, p, policy);
            if now >= t {
                due.push(Step::Activate(p.id.clone()));
            } else {
                later(t, format!("activate {} {}", a.kind, p.id));
            }
        }
        (Some(a), None) => {
            let t = frac(a.not_before, a.not_after, policy.prepare_at);
            if now >= t && !pending {
                due.push(if policy.can_prepare {
                    Step::Prepare
                } else {
                    Step::NeedsOperator
                });
            } else if !pending {
                later(t, format!("prepare the next {}", a.kind));
            }
        }
    }
    for r in own.iter().filter(|a| a.state == state::RETIRED) {
        let t = removal_time(r, last_signed(&r.id), policy);
        if now >= t {
            due.push(Step::Remove(r.id.clone()));
        } else {
            later(t, format!("remove retired {} {}", r.kind, r.id));
        }
    }
    Plan { due, next }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(ttl: u64, svid: u64) -> Policy {
        Policy {
            ttl: Duration::from_secs(ttl),
            prepare_at: 0.5,
            activate_by: 5.0 / 6.0,
            publish_before_use: Duration::from_secs(svid),
            max_credential_ttl: Duration::from_secs(svid),
            can_prepare: true,
        }
    }

    fn auth(id: &str, st: &str, nb: i64, ttl: i64) -> Authority {
        Authority {
            id: id.into(),
            kind: "x509".into(),
            state: st.into(),
            not_before: nb,
            not_after: nb + ttl,
            prepared_at: nb,
            activated_at: if st == state::ACTIVE { nb } else { 0 },
            ..Authority::default()
        }
    }

    /// Applies due steps the way the manager does, with SVIDs signed by
    /// the active authority every second, each `svid` long (capped).
    fn simulate(ttl: i64, svid: i64, until: i64) -> Vec<(i64, Vec<String>, Option<String>)> {
        let p = policy(ttl as u64, svid as u64);
        let mut own: Vec<Authority> = Vec::new();
        let mut last: std::collections::HashMap<String, i64> = Default::default();
        let mut n = 0;
        let mut trace = Vec::new();
        for now in 0..until {
            loop {
                let pl = plan(&own, &|id| last.get(id).copied().unwrap_or(0), now, &p);
                if pl.due.is_empty() {
                    break;
                }
                for step in pl.due {
                    match step {
                        Step::Bootstrap | Step::Prepare => {
                            n += 1;
                            let mut a = auth(&format!("ca{n}"), state::PREPARED, now, ttl);
                            if step == Step::Bootstrap {
                                a.state = state::ACTIVE.into();
                                a.activated_at = now;
                            }
                            own.push(a);
                        }
                        Step::Activate(id) => {
                            for a in own.iter_mut() {
                                if a.state == state::ACTIVE {
                                    a.state = state::RETIRED.into();
                                    a.retired_at = now;
                                }
                            }
                            let a = own.iter_mut().find(|a| a.id == id).expect("prepared");
                            a.state = state::ACTIVE.into();
                            a.activated_at = now;
                        }
                        Step::Remove(id) => {
                            let a = own.iter_mut().find(|a| a.id == id).expect("retired");
                            a.state = state::REMOVED.into();
                        }
                        Step::NeedsOperator => unreachable!(),
                    }
                }
            }
            let active = own
                .iter()
                .find(|a| a.state == state::ACTIVE)
                .map(|a| a.id.clone());
            if let Some(a) = own.iter().find(|a| a.state == state::ACTIVE) {
                let na = (now + svid).min(a.not_after);
                let e = last.entry(a.id.clone()).or_insert(0);
                *e = (*e).max(na);
            }
            let published: Vec<String> = own
                .iter()
                .filter(|a| a.state != state::REMOVED && a.not_after > now)
                .map(|a| a.id.clone())
                .collect();
            trace.push((now, published, active));
        }
        trace
    }

    #[test]
    fn a_year_of_daily_cas_never_gaps_and_always_overlaps() {
        // 24 h CA, 1 h SVIDs, one step per 10 minutes would be enough, but
        // every second of a year is 31.5 M plans: check a year of 60 s CAs
        // with 8 s SVIDs at one-second resolution instead (same ratios as
        // a 24 h CA with 3.2 h SVIDs).
        let trace = simulate(60, 8, 60 * 24 * 30);
        let mut both = 0;
        let mut activations = 0;
        let mut prev_active = None;
        for (now, published, active) in &trace {
            let active = active.as_ref().expect("always an active CA");
            assert!(
                published.contains(active),
                "t={now}: active CA not published"
            );
            assert!(published.len() <= 3, "t={now}: {published:?}");
            if published.len() >= 2 {
                both += 1;
            }
            if prev_active.as_ref() != Some(active) {
                activations += 1;
                prev_active = Some(active.clone());
            }
        }
        assert!(both > 0);
        // A new CA every half lifetime.
        assert!(activations >= 60 * 24 * 30 / 30 - 2, "{activations}");
    }

    #[test]
    fn successor_published_long_enough_before_it_signs() {
        let p = policy(60, 8);
        let a = auth("a", state::ACTIVE, 0, 60);
        let mut b = auth("b", state::PREPARED, 30, 60);
        b.prepared_at = 30;
        assert_eq!(activation_time(&a, &b, &p), 38);
        // Prepared late: activated at 5/6 of the old lifetime at the latest.
        b.prepared_at = 48;
        assert_eq!(activation_time(&a, &b, &p), 50);
        let pl = plan(std::slice::from_ref(&a), &|_| 0, 29, &p);
        assert!(pl.due.is_empty());
        assert_eq!(pl.next.map(|n| n.0), Some(30));
        assert_eq!(plan(&[a], &|_| 0, 30, &p).due, vec![Step::Prepare]);
    }

    #[test]
    fn retired_ca_stays_until_its_last_svid_expires() {
        let p = policy(60, 8);
        let mut r = auth("r", state::RETIRED, 0, 60);
        r.retired_at = 38;
        assert_eq!(removal_time(&r, 46, &p), 48);
        assert_eq!(removal_time(&r, 52, &p), 52);
        // Never beyond its own end.
        assert_eq!(removal_time(&r, 90, &p), 59);
        let mut j = r.clone();
        j.kind = "jwt".into();
        assert_eq!(removal_time(&j, 0, &p), 48);
    }

    #[test]
    fn expired_active_is_replaced_at_once_and_offline_upstream_asks_operator() {
        let p = policy(60, 8);
        let a = auth("a", state::ACTIVE, 0, 60);
        assert_eq!(
            plan(std::slice::from_ref(&a), &|_| 0, 61, &p).due,
            vec![Step::Bootstrap]
        );
        let b = auth("b", state::PREPARED, 50, 60);
        assert_eq!(
            plan(&[a.clone(), b], &|_| 0, 61, &p).due,
            vec![Step::Activate("b".into())]
        );
        let offline = Policy {
            can_prepare: false,
            ..p
        };
        assert_eq!(
            plan(&[a], &|_| 0, 31, &offline).due,
            vec![Step::NeedsOperator]
        );
        assert_eq!(
            plan(&[], &|_| 0, 0, &offline).due,
            vec![Step::NeedsOperator]
        );
    }

    #[test]
    fn tainted_prepared_is_never_activated() {
        let p = policy(60, 8);
        let a = auth("a", state::ACTIVE, 0, 60);
        let mut b = auth("b", state::PREPARED, 30, 60);
        b.tainted = true;
        // The tainted one does not count: a fresh successor is prepared.
        assert_eq!(plan(&[a, b], &|_| 0, 45, &p).due, vec![Step::Prepare]);
    }
}
