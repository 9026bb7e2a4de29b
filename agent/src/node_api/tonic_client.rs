//! The node API over tonic: one gRPC channel over mTLS whose client
//! certificate is swapped in place on renewal, fail-over between servers
//! (a new channel per generation), and attestation.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use hyper_util::rt::TokioIo;
use meshid_identity::verify::{Authorizer, SpiffeServerVerifier, TrustBundles};
use meshid_proto::node::node_client::NodeClient;
use meshid_proto::node::{
    AttestRequest, JwtSvidParams, RenewAgentRequest, RenewAgentResponse, ReportTrustCheckRequest,
    ReportTrustCheckResponse, SignJwtSvidsRequest, SignJwtSvidsResponse, SignTrustProbeRequest,
    SignTrustProbeResponse, SignX509SvidsRequest, SignX509SvidsResponse, SyncRequest,
    X509SvidParams,
};
use meshid_proto::types::Bundle;
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use tonic::transport::{Channel, Endpoint};

use super::servers::Servers;
use super::{Call, ClientError, NodeApi, SyncStream, new_key_and_csr};
use crate::identity_store::AgentIdentity;

/// Serves the current agent SVID to every new handshake.
#[derive(Debug, Default)]
struct ClientCert(ArcSwapOption<CertifiedKey>);

impl ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.load_full()
    }
    fn has_certs(&self) -> bool {
        self.0.load().is_some()
    }
}

/// Connection to the servers' node API.
#[derive(Clone)]
pub struct TonicNodeApi {
    /// The current channel and its generation (bumped on each new channel).
    channel: Arc<ArcSwap<(u64, Channel)>>,
    cert: Arc<ClientCert>,
    /// Rebuilt when the trust domain's bundle changes; read at each connect.
    connector: Arc<ArcSwap<tokio_rustls::TlsConnector>>,
    servers: Arc<Servers>,
    generation: Arc<AtomicU64>,
    td: String,
    kx: meshid_identity::crypto::KeyExchange,
}

/// A lazily connecting channel. Connections live as long as the channel, so a
/// new identity needs a new channel: HTTP/2 would otherwise keep using the
/// connection (and certificate) it already has.
fn make_channel(
    connector: Arc<ArcSwap<tokio_rustls::TlsConnector>>,
    servers: Arc<Servers>,
) -> Channel {
    Endpoint::from_static("http://meshid-server")
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect_with_connector_lazy(tower::service_fn(move |_| {
            let (connector, servers) = (connector.clone(), servers.clone());
            async move {
                let tls = servers.connect(&connector.load_full()).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
}

impl std::fmt::Debug for TonicNodeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TonicNodeApi")
    }
}

impl TonicNodeApi {
    /// A lazily connecting client for the servers at `addrs` (`host:port`
    /// each; a name may resolve to several servers), trusting `roots` (DER)
    /// for `td`, with the key exchange groups of `kx`.
    pub fn new(
        addrs: Vec<String>,
        td: &str,
        roots: &[Vec<u8>],
        kx: meshid_identity::crypto::KeyExchange,
    ) -> Result<Self, ClientError> {
        let cert = Arc::new(ClientCert::default());
        let connector = Arc::new(ArcSwap::from_pointee(Self::connector(
            td, roots, &cert, kx,
        )?));
        let servers = Arc::new(Servers::new(addrs));
        let channel = ArcSwap::from_pointee((0, make_channel(connector.clone(), servers.clone())));
        Ok(Self {
            channel: Arc::new(channel),
            cert,
            connector,
            servers,
            generation: Arc::new(AtomicU64::new(0)),
            td: td.to_string(),
            kx,
        })
    }

    fn new_channel(&self) {
        let g = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        self.channel.store(Arc::new((
            g,
            make_channel(self.connector.clone(), self.servers.clone()),
        )));
    }

    /// Servers known (from the last resolution of the configured addresses).
    pub fn server_count(&self) -> usize {
        self.servers.count.load(Ordering::Relaxed)
    }

    /// The server of the last successful connection, if any.
    pub fn current_server(&self) -> Option<SocketAddr> {
        self.servers.current()
    }

    /// A call made with the client of `node_at` returning `generation`
    /// failed in a way that blames the server: later calls go to a new
    /// connection, to the next server first. Calls already under way keep
    /// their connection. A failure seen through an older channel than the
    /// current one (another loop already failed over) changes nothing.
    pub fn fail_over(&self, generation: u64) {
        if self.channel.load().0 != generation {
            return;
        }
        if let Some(a) = self.servers.current() {
            tracing::warn!(server = %a, "failing over to the next server");
        }
        self.servers.advance();
        self.new_channel();
    }

    /// Trusts `roots` for every later connection to the server (the bundle
    /// changed: a CA rotation). Established connections stay.
    pub fn set_trust(&self, roots: &[Vec<u8>]) -> Result<(), ClientError> {
        self.connector.store(Arc::new(Self::connector(
            &self.td, roots, &self.cert, self.kx,
        )?));
        Ok(())
    }

    fn connector(
        td: &str,
        roots: &[Vec<u8>],
        cert: &Arc<ClientCert>,
        kx: meshid_identity::crypto::KeyExchange,
    ) -> Result<tokio_rustls::TlsConnector, ClientError> {
        let provider = meshid_identity::crypto::provider_for(kx);
        let mut bundles = TrustBundles::new();
        let ders: Vec<CertificateDer<'static>> = roots
            .iter()
            .map(|d| CertificateDer::from(d.clone()))
            .collect();
        bundles.add(td, &ders);
        let server_id = meshid_identity::spiffe_id::server_id(td)
            .parse()
            .map_err(|e| ClientError::Identity(format!("server ID: {e}")))?;
        let verifier = SpiffeServerVerifier::new(bundles, Authorizer::Exact(server_id), &provider);
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(meshid_identity::crypto::versions(false))
            .map_err(|e| ClientError::Identity(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(cert.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        // A resumed session keeps the identity of the session it resumes: the
        // unauthenticated attestation, or an agent SVID since renewed.
        cfg.resumption = rustls::client::Resumption::disabled();
        Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
    }

    /// Presents `id` on every new connection.
    pub fn set_identity(&self, id: &AgentIdentity) -> Result<(), ClientError> {
        self.cert.0.store(Some(Arc::new(id.certified_key()?)));
        self.new_channel();
        Ok(())
    }

    /// The gRPC client and the generation of its channel, for
    /// [`TonicNodeApi::fail_over`].
    fn node_at(&self) -> (u64, NodeClient<Channel>) {
        let c = self.channel.load();
        (c.0, NodeClient::new(c.1.clone()))
    }

    /// Attests with the named node attestor and its payload.
    pub async fn attest(
        &self,
        attestor: &str,
        payload: Vec<u8>,
    ) -> Result<(AgentIdentity, Bundle), ClientError> {
        let (key, csr) = new_key_and_csr()?;
        let r = self
            .node_at()
            .1
            .attest(AttestRequest {
                attestor: attestor.into(),
                payload,
                csr,
            })
            .await?
            .into_inner();
        let svid = r
            .svid
            .ok_or_else(|| ClientError::Identity("server sent no SVID".into()))?;
        let bundle = r
            .bundle
            .ok_or_else(|| ClientError::Identity("server sent no bundle".into()))?;
        Ok((AgentIdentity::new(&svid, key)?, bundle))
    }
}

#[async_trait::async_trait]
impl NodeApi for TonicNodeApi {
    async fn renew_agent(&self, csr: Vec<u8>) -> Call<RenewAgentResponse> {
        let (generation, mut node) = self.node_at();
        let result = node
            .renew_agent(RenewAgentRequest { csr })
            .await
            .map(tonic::Response::into_inner);
        Call { generation, result }
    }

    async fn sync(&self) -> Call<SyncStream> {
        let (generation, mut node) = self.node_at();
        let result = node
            .sync(SyncRequest {})
            .await
            .map(|r| Box::pin(r.into_inner()) as SyncStream);
        Call { generation, result }
    }

    async fn sign_x509_svids(&self, params: Vec<X509SvidParams>) -> Call<SignX509SvidsResponse> {
        let (generation, mut node) = self.node_at();
        let result = node
            .sign_x509_svids(SignX509SvidsRequest { params })
            .await
            .map(tonic::Response::into_inner);
        Call { generation, result }
    }

    async fn sign_jwt_svids(&self, params: Vec<JwtSvidParams>) -> Call<SignJwtSvidsResponse> {
        let (generation, mut node) = self.node_at();
        let result = node
            .sign_jwt_svids(SignJwtSvidsRequest { params })
            .await
            .map(tonic::Response::into_inner);
        Call { generation, result }
    }

    async fn sign_trust_probe(
        &self,
        rollout_id: String,
        csr: Vec<u8>,
    ) -> Call<SignTrustProbeResponse> {
        let (generation, mut node) = self.node_at();
        let result = node
            .sign_trust_probe(SignTrustProbeRequest { rollout_id, csr })
            .await
            .map(tonic::Response::into_inner);
        Call { generation, result }
    }

    async fn report_trust_check(
        &self,
        report: ReportTrustCheckRequest,
    ) -> Call<ReportTrustCheckResponse> {
        let (generation, mut node) = self.node_at();
        let result = node
            .report_trust_check(report)
            .await
            .map(tonic::Response::into_inner);
        Call { generation, result }
    }

    fn fail_over(&self, generation: u64) {
        TonicNodeApi::fail_over(self, generation);
    }

    fn server_count(&self) -> usize {
        TonicNodeApi::server_count(self)
    }

    fn current_server(&self) -> Option<SocketAddr> {
        TonicNodeApi::current_server(self)
    }

    fn set_identity(&self, id: &AgentIdentity) -> Result<(), ClientError> {
        TonicNodeApi::set_identity(self, id)
    }

    fn set_trust(&self, roots: &[Vec<u8>]) -> Result<(), ClientError> {
        TonicNodeApi::set_trust(self, roots)
    }
}
