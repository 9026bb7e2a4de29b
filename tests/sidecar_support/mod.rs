//! Test certificates for the sidecar tests: a CA per trust domain and leaf
//! X509-SVIDs with a URI SAN, made with rcgen.
#![allow(dead_code, clippy::unwrap_used)]

use meshid_identity::TrustBundles;
use meshid_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use meshid_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest,
    X509svidResponse,
};
use meshid_sidecar::CancellationToken;
use meshid_sidecar::identity::SvidMaterial;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;
use tokio_stream::wrappers::{UnixListenerStream, WatchStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use meshid_identity::verify::SpiffeServerVerifier;
use meshid_identity::{Authorizer, SpiffeId, crypto};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;

/// The trust domain of the tests.
pub const TD: &str = "example.org";

/// A test CA for one trust domain.
pub struct Ca {
    pub issuer: Issuer<'static, KeyPair>,
    pub der: CertificateDer<'static>,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(vec![]).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let uri = format!("spiffe://{TD}");
        params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self {
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    pub fn bundles(&self) -> TrustBundles {
        let mut b = TrustBundles::new();
        assert_eq!(b.add(TD, std::slice::from_ref(&self.der)), 0);
        b
    }

    /// A leaf X509-SVID for `id` with the given serial.
    pub fn svid(&self, id: &str, serial: u64) -> Svid {
        let mut params = CertificateParams::new(vec![]).unwrap();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
        params.serial_number = Some(serial.into());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::hours(1);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Svid {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        }
    }

    pub fn material(&self, id: &str, serial: u64) -> SvidMaterial {
        let s = self.svid(id, serial);
        SvidMaterial {
            chain: s.chain,
            key: s.key,
            bundles: self.bundles(),
        }
    }
}

pub struct Svid {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

type Pinned<T> = std::pin::Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Streams whatever is in the watch channel to every FetchX509SVID caller.
pub struct FakeAgent {
    pub current: watch::Receiver<X509svidResponse>,
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for FakeAgent {
    type FetchX509SVIDStream = Pinned<X509svidResponse>;
    async fn fetch_x509svid(
        &self,
        req: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        if req.metadata().get("workload.spiffe.io").is_none() {
            return Err(Status::invalid_argument("missing security header"));
        }
        let s = WatchStream::new(self.current.clone()).map(Ok);
        Ok(Response::new(Box::pin(s)))
    }
    type FetchX509BundlesStream = Pinned<X509BundlesResponse>;
    async fn fetch_x509_bundles(
        &self,
        _: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn fetch_jwtsvid(
        &self,
        _: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    type FetchJWTBundlesStream = Pinned<JwtBundlesResponse>;
    async fn fetch_jwt_bundles(
        &self,
        _: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn validate_jwtsvid(
        &self,
        _: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

pub fn svid_msg(ca: &Ca, id: &str, serial: u64) -> X509svid {
    let Svid { chain, key } = ca.svid(id, serial);
    X509svid {
        spiffe_id: id.to_string(),
        x509_svid: chain.iter().flat_map(|c| c.to_vec()).collect(),
        x509_svid_key: key.secret_der().to_vec(),
        bundle: ca.der.to_vec(),
        hint: String::new(),
    }
}

pub fn response(svids: Vec<X509svid>) -> X509svidResponse {
    X509svidResponse {
        svids,
        crl: vec![],
        federated_bundles: Default::default(),
    }
}

/// Serves the fake agent on `path` until `stop` is cancelled.
pub fn serve(
    path: &std::path::Path,
    rx: watch::Receiver<X509svidResponse>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(SpiffeWorkloadApiServer::new(FakeAgent { current: rx }))
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop.cancelled_owned())
            .await
            .unwrap();
    })
}

/// A client config presenting `svid` and requiring server `server_id`.
pub fn client_config(ca: &Ca, svid: Svid, server_id: &str) -> Arc<rustls::ClientConfig> {
    let provider = crypto::provider();
    let verifier = SpiffeServerVerifier::new(
        ca.bundles(),
        Authorizer::Exact(SpiffeId::new(server_id).unwrap()),
        &provider,
    );
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(crypto::versions(false))
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(svid.chain, svid.key)
            .unwrap(),
    )
}

pub async fn tls_connect(
    cfg: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("web.invalid").unwrap(), tcp)
        .await
}
