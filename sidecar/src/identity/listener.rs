//! The TLS side of each listener. A listener carries its own policy (an
//! inbound listener its `allow` authorizer, an outbound one the `server_id`
//! it requires) in an [`InboundTls`] / [`OutboundTls`] handle registered
//! with [`super::Identity`]; every accepted SVID update builds the
//! listener's rustls config (and, inbound, a ticket key of its own) and
//! swaps it into the handle. A handshake loads the handle's config at
//! ClientHello time; a resumed session is re-verified with the handle's
//! config current at that moment.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use meshid_identity::verify::{SpiffeClientVerifier, SpiffeServerVerifier};
use meshid_identity::{Authorizer, SpiffeId, SvidInfo};
use rustls::client::danger::ServerCertVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::SingleCertAndKey;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::tickets::SvidBoundTicketer;
use super::{Base, IdentityError};

/// ALPN protocol of the sidecar-to-sidecar HTTP/2 tunnel.
pub const ALPN_H2: &[u8] = b"h2";

/// An inbound listener's policy and its current TLS config.
#[derive(Debug)]
pub struct InboundTls {
    authorizer: Authorizer,
    tickets: bool,
    alpn: Vec<Vec<u8>>,
    current: ArcSwapOption<InboundConfig>,
}

/// An inbound listener's rustls config of one snapshot.
#[derive(Debug)]
pub struct InboundConfig {
    /// The snapshot's generation.
    pub generation: u64,
    /// The server config: the listener's verifier and ticket key.
    pub config: Arc<ServerConfig>,
    verifier: Arc<SpiffeClientVerifier>,
}

impl InboundTls {
    /// A listener allowing peers `authorizer` lets in; `tickets` turns TLS
    /// 1.3 session tickets on; `alpn` lists the ALPN protocols it speaks.
    pub(crate) fn new(authorizer: Authorizer, tickets: bool, alpn: Vec<Vec<u8>>) -> Self {
        Self {
            authorizer,
            tickets,
            alpn,
            current: ArcSwapOption::empty(),
        }
    }

    /// The config of the newest snapshot, `None` before the first SVID.
    pub fn current(&self) -> Option<Arc<InboundConfig>> {
        self.current.load_full()
    }

    pub(crate) fn build(&self, snap: &Base<'_>) -> Result<InboundConfig, IdentityError> {
        let verifier = SpiffeClientVerifier::with_revocation(
            snap.bundles.clone(),
            self.authorizer.clone(),
            &snap.tls.provider,
            true,
            snap.revocation.clone(),
        );
        let mut cfg = ServerConfig::builder_with_provider(snap.tls.provider.clone())
            .with_protocol_versions(snap.tls.versions)?
            .with_client_cert_verifier(verifier.clone())
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(snap.key.clone())));
        if self.tickets {
            cfg.ticketer = SvidBoundTicketer::shared(snap.not_after)?;
        } else {
            cfg.send_tls13_tickets = 0;
        }
        cfg.alpn_protocols = self.alpn.clone();
        Ok(InboundConfig {
            generation: snap.generation,
            config: Arc::new(cfg),
            verifier,
        })
    }

    pub(crate) fn install(&self, c: InboundConfig) {
        self.current.store(Some(Arc::new(c)));
    }
}

impl InboundConfig {
    /// Re-verifies the peer of a resumed session: the chain `peer` (leaf
    /// first, as the ticket carried it) against this config's bundle, at the
    /// current time, and the listener's policy — what a full handshake would
    /// check, minus the proof of key possession that the original handshake
    /// made. Returns the peer's SPIFFE ID.
    pub fn reverify_resumed(&self, peer: &[CertificateDer<'_>]) -> Result<SpiffeId, rustls::Error> {
        let (leaf, intermediates) = peer
            .split_first()
            .ok_or(rustls::Error::NoCertificatesPresented)?;
        self.verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())?;
        // The verifier admitted the leaf, so it parses as an SVID.
        SvidInfo::from_der(leaf)
            .map(|i| i.spiffe_id)
            .map_err(|e| rustls::Error::General(e.to_string()))
    }
}

/// An outbound listener's required upstream ID and its current TLS config.
#[derive(Debug)]
pub struct OutboundTls {
    server_id: SpiffeId,
    resume: bool,
    alpn: Vec<Vec<u8>>,
    current: ArcSwapOption<OutboundConfig>,
}

/// An outbound listener's rustls config of one snapshot.
#[derive(Debug)]
pub struct OutboundConfig {
    /// The snapshot's generation.
    pub generation: u64,
    /// The client config: the listener's verifier, our SVID.
    pub config: Arc<ClientConfig>,
    verifier: Arc<SpiffeServerVerifier>,
}

impl OutboundTls {
    /// A listener requiring upstream `server_id`; `resume` keeps a client
    /// session cache; `alpn` lists the ALPN protocols it offers.
    pub(crate) fn new(server_id: SpiffeId, resume: bool, alpn: Vec<Vec<u8>>) -> Self {
        Self {
            server_id,
            resume,
            alpn,
            current: ArcSwapOption::empty(),
        }
    }

    /// The SPIFFE ID the upstream must present.
    pub fn server_id(&self) -> &SpiffeId {
        &self.server_id
    }

    /// The config of the newest snapshot, `None` before the first SVID.
    pub fn current(&self) -> Option<Arc<OutboundConfig>> {
        self.current.load_full()
    }

    pub(crate) fn build(&self, snap: &Base<'_>) -> Result<OutboundConfig, IdentityError> {
        let verifier = SpiffeServerVerifier::with_revocation(
            snap.bundles.clone(),
            Authorizer::Exact(self.server_id.clone()),
            &snap.tls.provider,
            snap.revocation.clone(),
        );
        let mut cfg = ClientConfig::builder_with_provider(snap.tls.provider.clone())
            .with_protocol_versions(snap.tls.versions)?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(snap.key.clone())));
        if !self.resume {
            cfg.resumption = rustls::client::Resumption::disabled();
        }
        cfg.alpn_protocols = self.alpn.clone();
        Ok(OutboundConfig {
            generation: snap.generation,
            config: Arc::new(cfg),
            verifier,
        })
    }

    pub(crate) fn install(&self, c: OutboundConfig) {
        self.current.store(Some(Arc::new(c)));
    }
}

impl OutboundConfig {
    /// Re-verifies the upstream of a resumed session, as
    /// [`InboundConfig::reverify_resumed`] does for inbound peers: the chain
    /// from the session cache against this config's bundle, at the current
    /// time, and the listener's `server_id`.
    pub fn reverify_resumed_upstream(
        &self,
        upstream: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        let (leaf, intermediates) = upstream
            .split_first()
            .ok_or(rustls::Error::NoCertificatesPresented)?;
        // The SPIFFE verifiers do not look at the TLS server name.
        let name = ServerName::try_from("upstream.invalid")
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        self.verifier
            .verify_server_cert(leaf, intermediates, &name, &[], UnixTime::now())?;
        Ok(())
    }
}
