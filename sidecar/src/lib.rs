//! meshid sidecar: mTLS inbound and outbound proxies whose identity comes
//! from the SPIFFE Workload API.
//!
//! - [`config`]: the TOML file, defaults and validation.
//! - [`authz`]: SPIFFE ID allow policies (exact, trust domain, path prefix).
//! - [`identity`]: SVID updates → rustls configs, swapped atomically.
//! - [`inbound`] / [`outbound`]: the proxies; [`copy`]: their byte copy loop;
//!   [`peer_io`]: the read-ahead under each TLS session.
//! - [`health`]: `/healthz`, `/readyz` (a real mTLS handshake) and `/metrics`.
//! - [`proxy_protocol`]: the PROXY v2 header carrying the peer's SPIFFE ID.
//! - [`tunnel`]: HTTP/2 CONNECT tunnels between sidecars (`tunnel = "h2"`).
//! - `shared`: what every connection task shares (budgets, probes, the log
//!   limiter); `failure`: how a failed connection is described and labelled.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

pub mod authz;
pub mod cli;
pub mod config;
mod copy;
mod crl;
mod failure;
mod health;
pub mod identity;
pub mod inbound;
pub mod metrics;
mod outbound;
mod peer_io;
pub mod proxy_protocol;
mod shared;
mod tunnel;

pub use shared::{
    Admission, Budgets, LogLimiter, PendingSlot, ProbeGuard, Probes, Shared, direction_str,
};

use config::Validated;

use identity::{Identity, IdentityError, TlsSettings};
use metrics::Metrics;
/// The shutdown signal type [`Sidecar::bind`] takes (re-exported so callers
/// need no direct `tokio-util` dependency).
pub use tokio_util::sync::CancellationToken;

pub use copy::COPY_BUFFER;

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
    /// A listener's TLS config cannot be built from the current SVID.
    #[error("listener TLS: {0}")]
    Tls(#[from] IdentityError),
}

/// The TLS settings every listener of `v` shares, for [`Identity::new`].
pub fn tls_settings(v: &Validated) -> TlsSettings {
    TlsSettings {
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
        for ib in &v.inbound {
            let l = bind(ib.settings.listen).await?;
            let alpn = match ib.settings.tunnel {
                Some(config::Tunnel::H2) => vec![identity::ALPN_H2.to_vec()],
                None => vec![],
            };
            let tls = identity.inbound_listener(ib.policy.authorizer(), alpn)?;
            inbound.push((l, Arc::new(inbound::InboundCtx::new(&ib.settings, tls))));
        }
        let mut outbound = Vec::new();
        for ob in &v.outbound {
            let l = bind(ob.settings.listen).await?;
            let alpn = match ob.settings.tunnel {
                Some(config::Tunnel::H2) => vec![identity::ALPN_H2.to_vec()],
                None => vec![],
            };
            let tls = identity.outbound_listener(ob.server_id.clone(), alpn)?;
            outbound.push((l, Arc::new(outbound::OutboundCtx::new(&ob.settings, tls))));
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

    /// The TLS handle (policy and current config) of each inbound
    /// listener, in config order.
    pub fn inbound_tls(&self) -> Vec<Arc<identity::InboundTls>> {
        self.inbound.iter().map(|(_, c)| c.tls().clone()).collect()
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
