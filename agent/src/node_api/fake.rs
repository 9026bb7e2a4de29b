//! An in-process node API for unit tests: signs with a real test CA
//! (rcgen), counts calls, and can be told to fail a number of calls or to
//! be unreachable until a given time (of the agent's clock).

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use meshid_proto::node::{
    JwtSvid, JwtSvidParams, JwtSvidResult, RenewAgentResponse, SignJwtSvidsResponse,
    SignX509SvidsResponse, SyncResponse, X509SvidParams, X509SvidResult,
};
use meshid_proto::types::{Bundle, Entry, X509Svid};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateSigningRequestDer;
use tokio::sync::watch;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::WatchStream;

use super::{Call, ClientError, NodeApi, SyncStream, new_key_and_csr};
use crate::clock::SharedClock;
use crate::identity_store::AgentIdentity;

/// The trust domain of the fake.
pub const TD: &str = "example.org";

/// Calls the fake has answered (or refused), by kind.
#[derive(Debug, Default)]
pub struct Counts {
    /// RenewAgent calls.
    pub renew: AtomicUsize,
    /// SignX509Svids calls.
    pub x509_calls: AtomicUsize,
    /// X509-SVIDs signed.
    pub x509_signed: AtomicUsize,
    /// SignJwtSvids calls.
    pub jwt_calls: AtomicUsize,
    /// Sync calls.
    pub sync: AtomicUsize,
}

#[derive(Debug)]
struct Faults {
    /// Calls still to fail with Unavailable.
    fail_next: u32,
    /// Every call before this time fails with Unavailable.
    unreachable_until: Option<SystemTime>,
}

/// The fake node API.
#[derive(Debug)]
pub struct FakeNode {
    clock: SharedClock,
    ca_key: KeyPair,
    ca_params: CertificateParams,
    root: Vec<u8>,
    /// Lifetime of the X509-SVIDs (workload and agent) it signs.
    x509_ttl: Mutex<Duration>,
    /// Lifetime of the JWT-SVIDs it signs.
    pub jwt_ttl: Duration,
    faults: Mutex<Faults>,
    state: watch::Sender<SyncResponse>,
    generation: AtomicU64,
    servers: AtomicUsize,
    /// What it was asked.
    pub counts: Counts,
    /// When each SignX509Svids call came (the agent's clock).
    pub x509_times: Mutex<Vec<SystemTime>>,
    /// Trust check verdicts reported.
    pub trust_reports: Mutex<Vec<meshid_proto::node::ReportTrustCheckRequest>>,
}

fn unavailable() -> tonic::Status {
    tonic::Status::unavailable("fake server unreachable")
}

impl FakeNode {
    /// A fake with a fresh CA, valid for a year from `clock`'s now.
    pub fn new(clock: SharedClock) -> Self {
        let now = clock.now();
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("CA key");
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "fake CA");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.subject_alt_names = vec![SanType::URI(
            meshid_identity::spiffe_id::trust_domain_id(TD)
                .try_into()
                .expect("IA5"),
        )];
        p.not_before = (now - Duration::from_secs(3600)).into();
        p.not_after = (now + Duration::from_secs(365 * 86400)).into();
        p.use_authority_key_identifier_extension = true;
        let root = p.self_signed(&ca_key).expect("CA").der().to_vec();
        let bundle = Bundle {
            trust_domain: TD.into(),
            x509_authorities: vec![root.clone()],
            ..Bundle::default()
        };
        let (state, _) = watch::channel(SyncResponse {
            bundle: Some(bundle),
            ..SyncResponse::default()
        });
        Self {
            clock,
            ca_key,
            ca_params: p,
            root,
            x509_ttl: Mutex::new(Duration::from_secs(100)),
            jwt_ttl: Duration::from_secs(100),
            faults: Mutex::new(Faults {
                fail_next: 0,
                unreachable_until: None,
            }),
            state,
            generation: AtomicU64::new(0),
            servers: AtomicUsize::new(1),
            counts: Counts::default(),
            x509_times: Mutex::new(Vec::new()),
            trust_reports: Mutex::new(Vec::new()),
        }
    }

    /// The trust domain's root (DER).
    pub fn root(&self) -> Vec<u8> {
        self.root.clone()
    }

    /// The next `n` calls fail with Unavailable.
    pub fn set_server_count(&self, n: usize) {
        self.servers.store(n.max(1), Ordering::Relaxed);
    }

    /// The connection generation (bumped by each fail-over).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// The next `n` calls fail as an unreachable server would.
    pub fn fail_next(&self, n: u32) {
        self.faults.lock().expect("lock").fail_next = n;
    }

    /// Every call fails with Unavailable until `t` (the agent's clock).
    pub fn unreachable_until(&self, t: SystemTime) {
        self.faults.lock().expect("lock").unreachable_until = Some(t);
    }

    /// Replaces the entries the sync stream carries (sent at once).
    pub fn set_entries(&self, entries: Vec<Entry>) {
        self.state.send_modify(|s| s.entries = entries);
    }

    /// Asks the agent, on the sync stream, to check a trust change.
    pub fn set_trust_check(&self, check: Option<meshid_proto::node::TrustCheckRequest>) {
        self.state.send_modify(|s| s.trust_check = check);
    }

    /// Whether this call is refused.
    fn refused(&self) -> bool {
        let mut f = self.faults.lock().expect("lock");
        if f.unreachable_until.is_some_and(|t| self.clock.now() < t) {
            return true;
        }
        if f.fail_next > 0 {
            f.fail_next -= 1;
            return true;
        }
        false
    }

    fn call<T>(&self, result: Result<T, tonic::Status>) -> Call<T> {
        Call {
            generation: self.generation.load(Ordering::Relaxed),
            result,
        }
    }

    /// Signs `spiffe_id` for the key of `csr` (DER), for `x509_ttl`.
    fn sign(&self, csr: &[u8], spiffe_id: &str) -> X509Svid {
        let now = self.clock.now();
        let ttl = *self.x509_ttl.lock().expect("lock");
        let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(
            csr.to_vec(),
        ))
        .expect("CSR");
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().expect("IA5"))];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = (now - Duration::from_secs(10)).into();
        let not_after = now + ttl;
        p.not_after = not_after.into();
        p.use_authority_key_identifier_extension = true;
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = p.signed_by(&csr.public_key, &issuer).expect("sign");
        let der = cert.der().to_vec();
        let info = meshid_identity::SvidInfo::from_der(&der).expect("SVID");
        X509Svid {
            spiffe_id: spiffe_id.into(),
            cert_chain: vec![der],
            expires_at: meshid_identity::svid::unix(info.not_after),
            serial: info.serial,
        }
    }

    /// The agent's SPIFFE ID.
    pub fn agent_id() -> String {
        meshid_identity::spiffe_id::agent_id(
            &meshid_identity::spiffe_id::trust_domain_id(TD),
            "join_token",
            &["test"],
        )
    }

    /// A freshly signed agent identity (not counted as a call).
    pub fn agent_identity(&self) -> AgentIdentity {
        let (key, csr) = new_key_and_csr().expect("key");
        AgentIdentity::new(&self.sign(&csr, &Self::agent_id()), key).expect("identity")
    }
}

#[async_trait::async_trait]
impl NodeApi for FakeNode {
    async fn sign_trust_probe(
        &self,
        _rollout_id: String,
        csr: Vec<u8>,
    ) -> Call<meshid_proto::node::SignTrustProbeResponse> {
        let svid = self.sign(&csr, &Self::agent_id());
        self.call(Ok(meshid_proto::node::SignTrustProbeResponse {
            cert_chain: svid.cert_chain,
        }))
    }

    async fn report_trust_check(
        &self,
        report: meshid_proto::node::ReportTrustCheckRequest,
    ) -> Call<meshid_proto::node::ReportTrustCheckResponse> {
        self.trust_reports.lock().expect("lock").push(report);
        self.call(Ok(meshid_proto::node::ReportTrustCheckResponse {}))
    }

    async fn renew_agent(&self, csr: Vec<u8>) -> Call<RenewAgentResponse> {
        self.counts.renew.fetch_add(1, Ordering::Relaxed);
        if self.refused() {
            return self.call(Err(unavailable()));
        }
        let svid = self.sign(&csr, &Self::agent_id());
        self.call(Ok(RenewAgentResponse {
            svid: Some(svid),
            bundle: None,
        }))
    }

    async fn sync(&self) -> Call<SyncStream> {
        self.counts.sync.fetch_add(1, Ordering::Relaxed);
        if self.refused() {
            return self.call(Err(unavailable()));
        }
        let stream = WatchStream::new(self.state.subscribe()).map(Ok);
        self.call(Ok(Box::pin(stream) as SyncStream))
    }

    async fn sign_x509_svids(&self, params: Vec<X509SvidParams>) -> Call<SignX509SvidsResponse> {
        self.counts.x509_calls.fetch_add(1, Ordering::Relaxed);
        self.x509_times.lock().expect("lock").push(self.clock.now());
        if self.refused() {
            return self.call(Err(unavailable()));
        }
        let entries = self.state.borrow().entries.clone();
        let results = params
            .iter()
            .map(|p| match entries.iter().find(|e| e.id == p.entry_id) {
                Some(e) => {
                    self.counts.x509_signed.fetch_add(1, Ordering::Relaxed);
                    X509SvidResult {
                        svid: Some(self.sign(&p.csr, &e.spiffe_id)),
                        status: None,
                    }
                }
                None => X509SvidResult {
                    svid: None,
                    status: Some(meshid_proto::types::Status {
                        code: tonic::Code::NotFound as i32,
                        message: "no such entry".into(),
                    }),
                },
            })
            .collect();
        self.call(Ok(SignX509SvidsResponse { results }))
    }

    async fn sign_jwt_svids(&self, params: Vec<JwtSvidParams>) -> Call<SignJwtSvidsResponse> {
        let n = self.counts.jwt_calls.fetch_add(1, Ordering::Relaxed);
        if self.refused() {
            return self.call(Err(unavailable()));
        }
        let entries = self.state.borrow().entries.clone();
        let now = meshid_identity::svid::unix(self.clock.now());
        let ttl = i64::try_from(self.jwt_ttl.as_secs()).expect("ttl");
        let results = params
            .iter()
            .map(|p| JwtSvidResult {
                svid: entries
                    .iter()
                    .find(|e| e.id == p.entry_id)
                    .map(|e| JwtSvid {
                        spiffe_id: e.spiffe_id.clone(),
                        token: format!("token-{n}"),
                        issued_at: now,
                        expires_at: now + ttl,
                    }),
                status: None,
            })
            .collect();
        self.call(Ok(SignJwtSvidsResponse { results }))
    }

    fn fail_over(&self, generation: u64) {
        let _ = self.generation.compare_exchange(
            generation,
            generation + 1,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    fn server_count(&self) -> usize {
        self.servers.load(Ordering::Relaxed)
    }

    fn current_server(&self) -> Option<SocketAddr> {
        None
    }

    fn set_identity(&self, _id: &AgentIdentity) -> Result<(), ClientError> {
        Ok(())
    }

    fn set_trust(&self, _roots: &[Vec<u8>]) -> Result<(), ClientError> {
        Ok(())
    }
}
