//! meshid sidecar: mTLS inbound and outbound proxies whose identity comes
//! from the SPIFFE Workload API.
//!
//! - [`config`]: the TOML file, defaults and validation.
//! - [`authz`]: SPIFFE ID allow policies (exact, trust domain, path prefix).
//! - [`identity`]: SVID updates → rustls configs, swapped atomically.
//! - [`inbound`] / [`outbound`]: the proxies.
//! - [`health`]: `/healthz`, `/readyz` (a real mTLS handshake) and `/metrics`.
//! - [`proxy_protocol`]: the PROXY v2 header carrying the peer's SPIFFE ID.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

pub mod authz;
pub mod cli;
pub mod config;
pub mod health;
pub mod identity;
pub mod inbound;
pub mod metrics;
pub mod outbound;
pub mod proxy_protocol;

use config::Validated;

use identity::{Identity, Policies};
use metrics::{DirLabels, Direction, Metrics};
/// The shutdown signal type [`Sidecar::bind`] takes (re-exported so callers
/// need no direct `tokio-util` dependency).
pub use tokio_util::sync::CancellationToken;

/// Buffer size for each direction of a proxied connection.
pub const COPY_BUFFER: usize = 64 * 1024;

/// Errors starting the sidecar.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SidecarError {
    /// A listener cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The admin server failed.
    #[error("admin server: {0}")]
    Admin(std::io::Error),
}

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

/// Policies for [`Identity`] from a validated config.
pub fn policies(v: &Validated) -> Policies {
    Policies {
        inbound: v.policies.iter().map(authz::Policy::authorizer).collect(),
        outbound: v.server_ids.clone(),
        allow_tls12: v.config.allow_tls12,
        key_exchange: v.config.tls_key_exchange,
    }
}

/// A sidecar with every listener bound, not yet serving.
#[derive(Debug)]
pub struct Sidecar {
    shared: Arc<Shared>,
    inbound: Vec<(TcpListener, Arc<inbound::InboundCtx>)>,
    outbound: Vec<(TcpListener, Arc<outbound::OutboundCtx>)>,
    admin: Option<TcpListener>,
    drain_timeout: Duration,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, SidecarError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| SidecarError::Bind { addr, source })
}

fn local(l: &TcpListener) -> SocketAddr {
    // A bound listener always has a local address; fall back to unspecified.
    l.local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

impl Sidecar {
    /// Binds every listener of `v`. Serving starts with [`Sidecar::run`];
    /// connections are refused until `identity` has an SVID.
    pub async fn bind(
        v: &Validated,
        identity: Arc<Identity>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<Self, SidecarError> {
        let mut inbound = Vec::new();
        for (idx, ib) in v.config.inbound.iter().enumerate() {
            let l = bind(ib.listen).await?;
            inbound.push((l, Arc::new(inbound::InboundCtx::new(idx, ib))));
        }
        let mut outbound = Vec::new();
        for (idx, ob) in v.config.outbound.iter().enumerate() {
            let l = bind(ob.listen).await?;
            outbound.push((l, Arc::new(outbound::OutboundCtx::new(idx, ob))));
        }
        let admin = match v.config.admin_address {
            Some(a) => Some(bind(a).await?),
            None => None,
        };
        let probe_target = inbound.first().map(|(l, _)| {
            let mut a = local(l);
            if a.ip().is_unspecified() {
                a.set_ip(if a.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                });
            }
            a
        });
        Ok(Self {
            shared: Arc::new(Shared {
                identity,
                metrics,
                handshake_timeout: v.config.handshake_timeout,
                connect_timeout: v.config.connect_timeout,
                budgets: Budgets::new(v.limits),
                tracker: TaskTracker::new(),
                shutdown,
                probe_target,
                probes: Probes::default(),
                log_limiter: LogLimiter::default(),
            }),
            inbound,
            outbound,
            admin,
            drain_timeout: v.config.drain_timeout,
        })
    }

    /// Bound inbound addresses, in config order.
    pub fn inbound_addrs(&self) -> Vec<SocketAddr> {
        self.inbound.iter().map(|(l, _)| local(l)).collect()
    }

    /// Bound outbound addresses, in config order.
    pub fn outbound_addrs(&self) -> Vec<SocketAddr> {
        self.outbound.iter().map(|(l, _)| local(l)).collect()
    }

    /// Bound admin address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(local)
    }

    /// The shared state.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Serves until the shutdown token is cancelled, then stops accepting
    /// and waits up to `drain_timeout` for open connections. Returns the
    /// number of connections cut when the drain timed out.
    pub async fn run(self) -> Result<usize, SidecarError> {
        let mut loops = tokio::task::JoinSet::new();
        for (l, ctx) in self.inbound {
            loops.spawn(inbound::serve(self.shared.clone(), l, ctx));
        }
        for (l, ctx) in self.outbound {
            loops.spawn(outbound::serve(self.shared.clone(), l, ctx));
        }
        let admin = self
            .admin
            .map(|l| tokio::spawn(health::serve(self.shared.clone(), l)));
        while loops.join_next().await.is_some() {}
        // Accept loops end only on shutdown.
        self.shared.tracker.close();
        let open = self.shared.tracker.len();
        if open > 0 {
            tracing::info!(open, timeout = ?self.drain_timeout, "draining connections");
        }
        let cut = match tokio::time::timeout(self.drain_timeout, self.shared.tracker.wait()).await {
            Ok(()) => 0,
            Err(_) => {
                let cut = self.shared.tracker.len();
                tracing::warn!(cut, "drain timeout: closing remaining connections");
                cut
            }
        };
        if let Some(a) = admin
            && let Ok(Err(e)) = a.await
        {
            return Err(SidecarError::Admin(e));
        }
        Ok(cut)
    }
}

/// The operator-facing message for a handshake error.
pub fn describe_io(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(err) => meshid_identity::verify::describe(err),
        None => e.to_string(),
    }
}

/// A finer, bounded kind of a handshake failure, for log rate limiting: a
/// burst of one kind of bad input does not hide a different one.
pub fn failure_detail(e: &std::io::Error) -> &'static str {
    use rustls::{Error as E, InvalidMessage as M};
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(E::InvalidMessage(M::InvalidContentType)) => "not_tls",
        Some(E::InvalidMessage(_)) => "malformed",
        Some(E::PeerIncompatible(_)) => "incompatible",
        Some(E::PeerMisbehaved(_)) => "misbehaved",
        Some(E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. }) => {
            "unexpected_message"
        }
        Some(E::AlertReceived(_)) => "alert",
        Some(E::InvalidCertificate(_) | E::NoCertificatesPresented) => "certificate",
        Some(_) => "other",
        None => "io",
    }
}

/// Whether the first bytes of a connection look like a plaintext HTTP
/// request (an HTTP/1 method or the HTTP/2 preface) rather than TLS.
pub fn looks_like_http(first: &[u8]) -> bool {
    const METHODS: &[&[u8]] = &[
        b"GET ",
        b"POST ",
        b"PUT ",
        b"HEAD ",
        b"DELETE ",
        b"OPTIONS ",
        b"PATCH ",
        b"CONNECT ",
        b"TRACE ",
        b"PRI ",
    ];
    METHODS.iter().any(|m| {
        let n = first.len().min(m.len());
        n >= 4 && first[..n] == m[..n]
    })
}

/// Metric label for a handshake error.
pub fn classify_io(e: &std::io::Error) -> &'static str {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(
            err @ (rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::PeerIncompatible(rustls::PeerIncompatible::NoKxGroupsInCommon)
            | rustls::Error::AlertReceived(_)),
        ) => meshid_identity::verify::classify(err),
        Some(_) => "tls",
        None if e.kind() == std::io::ErrorKind::InvalidData => "tls",
        None => "io",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_http_is_recognised() {
        for yes in [
            &b"GET / HT"[..],
            b"POST /x",
            b"OPTIONS ",
            b"PRI * HT",
            b"DELE",
        ] {
            assert!(looks_like_http(yes), "{yes:?}");
        }
        for no in [
            &b"\x16\x03\x01\x02\x00"[..],
            b"GE",
            b"GETX",
            b"",
            b"\0\0\0\0\0",
        ] {
            assert!(!looks_like_http(no), "{no:?}");
        }
    }

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
