//! What every connection task shares: identity, metrics, the connection
//! budgets per direction, the handshake probes and the log limiter.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config;
use crate::identity::Identity;
use crate::metrics::{DirLabels, Direction, Metrics};

/// What every connection task shares.
#[derive(Debug)]
pub struct Shared {
    /// The current identity.
    pub identity: Arc<Identity>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// TLS handshake time limit.
    pub handshake_timeout: Duration,
    /// Dial time limit.
    pub connect_timeout: Duration,
    /// Connection budgets.
    pub budgets: Budgets,
    /// Tracks connection tasks for draining.
    pub tracker: TaskTracker,
    /// Cancelled on SIGTERM: stop accepting and drain.
    pub shutdown: CancellationToken,
    /// Where `/readyz` handshakes: the first inbound listener, if any.
    pub probe_target: Option<SocketAddr>,
    /// Readiness-probe connections in flight (exempt from the budgets).
    pub probes: Probes,
    /// Keeps repeated refusals and handshake failures from flooding the log.
    pub log_limiter: LogLimiter,
}

/// Connection budgets: one per direction, and a pool for inbound
/// connections still handshaking. A connection that finds its budget spent is
/// closed at accept and counted (`connections_refused_total`); the accept
/// loops never wait on a budget, so one direction cannot stall the other.
#[derive(Debug)]
pub struct Budgets {
    /// Open inbound connections, handshaking ones included.
    pub inbound: Arc<Semaphore>,
    /// Open outbound connections.
    pub outbound: Arc<Semaphore>,
    /// Inbound connections still in their handshake.
    pub pending_handshakes: Arc<Semaphore>,
}

impl Budgets {
    /// Budgets of the given sizes.
    pub fn new(limits: config::Limits) -> Self {
        Self {
            inbound: Arc::new(Semaphore::new(limits.inbound)),
            outbound: Arc::new(Semaphore::new(limits.outbound)),
            pending_handshakes: Arc::new(Semaphore::new(limits.pending_handshakes)),
        }
    }
}

/// Why a connection was refused at accept (the `reason` metric label).
pub const REFUSED_CONNECTIONS: &str = "connections";
/// Why a connection was refused at accept: the handshake pool is full.
pub const REFUSED_PENDING: &str = "pending_handshakes";

/// A slot in the pool of connections still handshaking; the
/// `pending_handshakes` gauge follows it.
#[derive(Debug)]
pub struct PendingSlot {
    _permit: Option<OwnedSemaphorePermit>,
    metrics: Arc<Metrics>,
    direction: Direction,
}

impl PendingSlot {
    fn new(permit: Option<OwnedSemaphorePermit>, metrics: Arc<Metrics>, d: Direction) -> Self {
        metrics
            .pending_handshakes
            .get_or_create(&DirLabels { direction: d })
            .inc();
        Self {
            _permit: permit,
            metrics,
            direction: d,
        }
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.metrics
            .pending_handshakes
            .get_or_create(&DirLabels {
                direction: self.direction,
            })
            .dec();
    }
}

/// What an accepted connection holds while it lives.
#[derive(Debug)]
pub struct Admission {
    /// The direction's connection budget (none for readiness probes).
    pub connection: Option<OwnedSemaphorePermit>,
    /// The handshake pool slot, released once the handshake is over.
    pub pending: PendingSlot,
}

impl Shared {
    /// Admits a connection just accepted from `peer`, or counts, logs and
    /// returns why not. Readiness probes of this process are exempt.
    pub fn admit(&self, direction: Direction, peer: SocketAddr) -> Result<Admission, &'static str> {
        let m = self.metrics.clone();
        if direction == Direction::Inbound && self.probes.contains(&peer) {
            return Ok(Admission {
                connection: None,
                pending: PendingSlot::new(None, m, direction),
            });
        }
        let (budget, limit_key) = match direction {
            Direction::Inbound => (&self.budgets.inbound, "max_inbound_connections"),
            Direction::Outbound => (&self.budgets.outbound, "max_outbound_connections"),
        };
        let refuse = |reason: &'static str, key: &'static str| {
            self.metrics.count_refused(direction, reason);
            if let Some(suppressed) = self.log_limiter.check(direction_str(direction), reason) {
                tracing::warn!(
                    direction = direction_str(direction),
                    %peer,
                    reason,
                    limit = key,
                    suppressed,
                    "{} connection refused: {key} reached",
                    direction_str(direction)
                );
            }
            reason
        };
        let connection = budget
            .clone()
            .try_acquire_owned()
            .map_err(|_| refuse(REFUSED_CONNECTIONS, limit_key))?;
        let pending = match direction {
            Direction::Inbound => Some(
                self.budgets
                    .pending_handshakes
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| refuse(REFUSED_PENDING, "max_pending_handshakes"))?,
            ),
            Direction::Outbound => None,
        };
        Ok(Admission {
            connection: Some(connection),
            pending: PendingSlot::new(pending, m, direction),
        })
    }
}

/// `inbound` or `outbound`.
pub fn direction_str(d: Direction) -> &'static str {
    match d {
        Direction::Inbound => "inbound",
        Direction::Outbound => "outbound",
    }
}

/// Source addresses of this process's own readiness probes in flight, so
/// the inbound listener can exempt them from the connection budgets (a probe
/// must succeed while idle peers fill the handshake pool). At most
/// [`Probes::MAX`] run at once.
#[derive(Debug)]
pub struct Probes {
    addrs: Mutex<HashSet<SocketAddr>>,
    /// Limits concurrent probes.
    pub slots: Semaphore,
}

impl Default for Probes {
    fn default() -> Self {
        Self {
            addrs: Mutex::default(),
            slots: Semaphore::new(Self::MAX),
        }
    }
}

impl Probes {
    /// Concurrent readiness probes.
    pub const MAX: usize = 4;

    /// Registers a probe's source address until the guard is dropped.
    pub fn register(&self, addr: SocketAddr) -> ProbeGuard<'_> {
        if let Ok(mut a) = self.addrs.lock() {
            a.insert(addr);
        }
        ProbeGuard { probes: self, addr }
    }

    fn contains(&self, addr: &SocketAddr) -> bool {
        self.addrs.lock().is_ok_and(|a| a.contains(addr))
    }
}

/// Unregisters a probe's source address on drop.
#[derive(Debug)]
pub struct ProbeGuard<'a> {
    probes: &'a Probes,
    addr: SocketAddr,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut a) = self.probes.addrs.lock() {
            a.remove(&self.addr);
        }
    }
}

/// A kind of logged event: two static names.
type LogKind = (&'static str, &'static str);

/// At most one log line per kind of event and [`LogLimiter::INTERVAL`]; the
/// next line says how many were left out. Kinds are static strings, so the
/// state stays small whatever peers send.
#[derive(Debug, Default)]
pub struct LogLimiter {
    state: Mutex<HashMap<LogKind, (Instant, u64)>>,
}

impl LogLimiter {
    /// Minimum time between two lines of one kind.
    pub const INTERVAL: Duration = Duration::from_secs(10);

    /// `Some(left_out)` when a line of kind `(a, b)` is due now.
    pub fn check(&self, a: &'static str, b: &'static str) -> Option<u64> {
        let Ok(mut state) = self.state.lock() else {
            return Some(0);
        };
        let now = Instant::now();
        match state.get_mut(&(a, b)) {
            Some((last, left_out)) if now.duration_since(*last) < Self::INTERVAL => {
                *left_out += 1;
                None
            }
            Some((last, left_out)) => {
                let n = *left_out;
                *last = now;
                *left_out = 0;
                Some(n)
            }
            None => {
                state.insert((a, b), (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_limiter_lets_one_line_per_kind_and_interval_through() {
        let l = LogLimiter::default();
        assert_eq!(l.check("inbound", "tls"), Some(0));
        assert_eq!(l.check("inbound", "tls"), None);
        assert_eq!(l.check("inbound", "tls"), None);
        assert_eq!(l.check("inbound", "timeout"), Some(0), "kinds are separate");
        // Age the entry: the next line says how many were left out.
        if let Ok(mut s) = l.state.lock()
            && let Some((last, _)) = s.get_mut(&("inbound", "tls"))
        {
            *last = last.checked_sub(LogLimiter::INTERVAL).unwrap_or(*last);
        }
        assert_eq!(l.check("inbound", "tls"), Some(2));
        assert_eq!(l.check("inbound", "tls"), None);
    }
}
