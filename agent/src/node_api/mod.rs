//! What the agent's loops ask of the servers' node API, behind one trait:
//! [`NodeApi`]. [`tonic_client::TonicNodeApi`] is the real one (mTLS,
//! fail-over between servers); unit tests use an in-process fake that signs
//! with a test CA.

use std::fmt::Debug;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;

use futures::Stream;
use meshid_proto::node::{
    JwtSvidParams, RenewAgentResponse, ReportTrustCheckRequest, ReportTrustCheckResponse,
    SignJwtSvidsResponse, SignTrustProbeResponse, SignX509SvidsResponse, SyncResponse,
    X509SvidParams,
};

use crate::identity_store::AgentIdentity;

#[cfg(test)]
pub mod fake;
pub mod retry;
pub mod servers;
pub mod tonic_client;

pub use retry::{RetrySchedule, backoff, bound_by_expiry, is_server_failure};
pub use tonic_client::TonicNodeApi;

/// Failures talking to the server or handling the agent identity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server refused or failed a call.
    #[error("server: {0}")]
    Status(#[from] tonic::Status),
    /// The agent identity files are missing, unreadable or invalid.
    #[error("agent identity: {0}")]
    Identity(String),
    /// Local I/O.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// A fresh P-256 key (PKCS#8 DER) and a CSR for it.
pub fn new_key_and_csr() -> Result<(Vec<u8>, Vec<u8>), ClientError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| ClientError::Identity(e.to_string()))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| ClientError::Identity(e.to_string()))?;
    Ok((key.serialize_der(), csr.der().to_vec()))
}

/// The outcome of one node API call, with the generation of the connection
/// it was made on (for [`NodeApi::fail_over`]).
#[derive(Debug)]
pub struct Call<T> {
    /// Generation of the connection the call used.
    pub generation: u64,
    /// What the server answered.
    pub result: Result<T, tonic::Status>,
}

/// The sync stream: the full state, again on every change.
pub type SyncStream = Pin<Box<dyn Stream<Item = Result<SyncResponse, tonic::Status>> + Send>>;

/// The node API as the agent's loops use it.
#[async_trait::async_trait]
pub trait NodeApi: Debug + Send + Sync {
    /// Renews the agent SVID for `csr` (the server may send its bundle too).
    async fn renew_agent(&self, csr: Vec<u8>) -> Call<RenewAgentResponse>;

    /// Opens the sync stream of entries and bundles.
    async fn sync(&self) -> Call<SyncStream>;

    /// Signs a batch of X509-SVIDs (one result per item, in order).
    async fn sign_x509_svids(&self, params: Vec<X509SvidParams>) -> Call<SignX509SvidsResponse>;

    /// Signs a batch of JWT-SVIDs (one result per item, in order).
    async fn sign_jwt_svids(&self, params: Vec<JwtSvidParams>) -> Call<SignJwtSvidsResponse>;

    /// Has a probe SVID for the agent's own ID signed by the candidate
    /// authority of a staged trust change (`csr`: PKCS#10 DER).
    async fn sign_trust_probe(
        &self,
        rollout_id: String,
        csr: Vec<u8>,
    ) -> Call<SignTrustProbeResponse>;

    /// Sends this agent's verdict on a staged trust change.
    async fn report_trust_check(
        &self,
        report: ReportTrustCheckRequest,
    ) -> Call<ReportTrustCheckResponse>;

    /// A call made on the connection of `generation` failed in a way that
    /// blames the server: later calls go to the next server. A failure seen
    /// on an older connection than the current one changes nothing.
    fn fail_over(&self, generation: u64);

    /// Servers known (at least one).
    fn server_count(&self) -> usize;

    /// The server of the last successful connection, if any.
    fn current_server(&self) -> Option<SocketAddr>;

    /// Presents `id` on every new connection.
    fn set_identity(&self, id: &AgentIdentity) -> Result<(), ClientError>;

    /// Trusts `roots` for every later connection (the bundle changed).
    fn set_trust(&self, roots: &[Vec<u8>]) -> Result<(), ClientError>;
}
