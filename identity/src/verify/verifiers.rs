//! The rustls verifiers: servers and clients are verified by SPIFFE ID.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use webpki::KeyUsage;

use super::chain::Core;
use super::revocation::RevocationCheck;
use super::{Authorizer, TrustBundles};

/// Verifies servers by SPIFFE ID; the TLS server name is not used.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    core: Core,
}

impl SpiffeServerVerifier {
    /// A verifier that trusts `bundles` and admits servers `authorizer` allows.
    pub fn new(
        bundles: TrustBundles,
        authorizer: Authorizer,
        provider: &CryptoProvider,
    ) -> Arc<Self> {
        Self::with_revocation(bundles, authorizer, provider, None)
    }

    /// As [`SpiffeServerVerifier::new`], with a revocation check run after
    /// the chain verified.
    pub fn with_revocation(
        bundles: TrustBundles,
        authorizer: Authorizer,
        provider: &CryptoProvider,
        revocation: Option<Arc<dyn RevocationCheck>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            core: Core {
                bundles,
                authorizer,
                algs: provider.signature_verification_algorithms,
                revocation,
            },
        })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.core
            .verify(end_entity, intermediates, now, KeyUsage::server_auth())?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.core.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.core.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.core.algs.supported_schemes()
    }
}

/// Verifies clients by SPIFFE ID.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    core: Core,
    mandatory: bool,
}

impl SpiffeClientVerifier {
    /// A verifier that trusts `bundles` and admits clients `authorizer`
    /// allows. With `mandatory` false, a client may present no certificate
    /// (the application must then refuse what needs identity).
    pub fn new(
        bundles: TrustBundles,
        authorizer: Authorizer,
        provider: &CryptoProvider,
        mandatory: bool,
    ) -> Arc<Self> {
        Self::with_revocation(bundles, authorizer, provider, mandatory, None)
    }

    /// As [`SpiffeClientVerifier::new`], with a revocation check run after
    /// the chain verified.
    pub fn with_revocation(
        bundles: TrustBundles,
        authorizer: Authorizer,
        provider: &CryptoProvider,
        mandatory: bool,
        revocation: Option<Arc<dyn RevocationCheck>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            core: Core {
                bundles,
                authorizer,
                algs: provider.signature_verification_algorithms,
                revocation,
            },
            mandatory,
        })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.core
            .verify(end_entity, intermediates, now, KeyUsage::client_auth())?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.core.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.core.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.core.algs.supported_schemes()
    }
}
